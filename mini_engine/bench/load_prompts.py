"""The prompts a load run sends: synthetic ones of a given length, or a dataset file's.

Synthetic prompts are seeded and different for every request, so a prefix cache cannot
answer them from an earlier one:
- "text": `length` common English words that GPT-2's tokenizer keeps as one token each
  (the words of bench/workload.py), so the prompt is exactly `length` GPT-2 tokens;
- "ids": `length` token ids below 50000 (GPT-2's vocabulary is 50257; 50256 is
  <|endoftext|>), sent as `prompt: [ids]`, which the Completions API accepts.

A dataset is JSONL (one {"prompt": str | [ids], "max_tokens": int (optional)} per line) or
plain text (one prompt per line); requests take its entries in order, cycling when there
are fewer entries than requests.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError

MAX_ID = 50000
PROMPT_TYPES = ("text", "ids")


@dataclass(frozen=True)
class Prompt:
    prompt: str | list[int]
    max_tokens: int | None = None  # the dataset's own, else the run's --max-tokens
    tokens: int | None = None  # known length in tokens (synthetic prompts, id lists)


def synthetic_prompts(n: int, length: int, seed: int, prompt_type: str = "text") -> list[Prompt]:
    import numpy as np

    from .workload import _WORDS

    if prompt_type not in PROMPT_TYPES:
        raise ConfigError(f"prompt type {prompt_type!r}: expected one of {', '.join(PROMPT_TYPES)}")
    if length < 1:
        raise ConfigError(f"--prompt-len {length}: must be >= 1")
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        if prompt_type == "ids":
            out.append(Prompt([int(i) for i in rng.integers(0, MAX_ID, size=length)], tokens=length))
        else:
            words = rng.integers(0, len(_WORDS), size=length)
            out.append(Prompt("".join(" " + _WORDS[i] for i in words), tokens=length))
    return out


def dataset_prompts(path: str | Path, n: int) -> list[Prompt]:
    entries = read_dataset(path)
    return [entries[i % len(entries)] for i in range(n)]


def read_dataset(path: str | Path) -> list[Prompt]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"--dataset {path}: no such file") from None
    except IsADirectoryError:
        raise ConfigError(f"--dataset {path}: is a directory, expected a JSONL or text file") from None
    except UnicodeDecodeError:
        raise ConfigError(f"--dataset {path}: not UTF-8 text") from None
    except OSError as e:
        raise ConfigError(f"--dataset {path}: {e.strerror or e}") from None
    lines = [(i, line) for i, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not lines:
        raise ConfigError(f"--dataset {path}: no prompts (the file is empty)")
    jsonl = path.suffix.lower() == ".jsonl" or lines[0][1].lstrip().startswith("{")
    if not jsonl:
        return [Prompt(line) for _, line in lines]
    return [_entry(path, i, line) for i, line in lines]


def _entry(path: Path, lineno: int, line: str) -> Prompt:
    where = f"--dataset {path}, line {lineno}"
    try:
        obj = json.loads(line)
    except ValueError as e:
        raise ConfigError(f"{where}: not JSON ({e.msg})") from None
    if not isinstance(obj, dict) or "prompt" not in obj:
        raise ConfigError(f'{where}: expected an object with "prompt" (and optionally "max_tokens")')
    prompt, max_tokens = obj["prompt"], obj.get("max_tokens")
    ids = isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                                                      for t in prompt)
    if not (isinstance(prompt, str) and prompt) and not ids:
        raise ConfigError(f'{where}: "prompt" must be a non-empty string or a list of token ids')
    if max_tokens is not None and (not isinstance(max_tokens, int) or isinstance(max_tokens, bool)
                                   or max_tokens < 1):
        raise ConfigError(f'{where}: "max_tokens" must be an integer >= 1')
    return Prompt(prompt, max_tokens, len(prompt) if ids else None)
