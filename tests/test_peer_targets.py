"""generate_bench.py's peer targets (CTranslate2, llama.cpp) without the peers installed: CI has no
`peers` extra, so these check the one-line refusals and the ratio bookkeeping, not the peers' speed."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import peer_targets  # noqa: E402


def _without_peers(tmp_path) -> dict:
    """An environment where importing either peer fails, whether or not the extra is installed here."""
    for module in ("ctranslate2", "llama_cpp"):
        (tmp_path / module).mkdir()
        (tmp_path / module / "__init__.py").write_text(f'raise ImportError("No module named {module!r}")\n')
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))


@pytest.mark.parametrize("target,dist", [("ct2:cpu@int8", "ctranslate2"), ("llamacpp:cpu@q8_0", "llama-cpp-python")])
def test_a_peer_without_its_package_fails_in_one_line_naming_the_extra(tmp_path, target, dist):
    proc = subprocess.run([sys.executable, BENCH / "generate_bench.py", "--model", "random:tiny",
                           "--targets", f"torch:cpu,{target}", "--batch-sizes", "1", "--runs", "1",
                           "--new-tokens", "2", "--out", tmp_path / "out"],
                          capture_output=True, text=True, timeout=120, env=_without_peers(tmp_path))
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert dist in lines[0] and "pip install -e '.[peers]'" in lines[0]
    assert not (tmp_path / "out.json").exists()  # refused before any target ran


@pytest.mark.parametrize("target,message", [
    ("llamacpp:cpu@int8", "llamacpp: precision '@int8' is not one of q8_0, f32, f16, bf16"),
    ("ct2:cpu@q8_0", "ct2: precision '@q8_0' is not one of int8, float32, int16, bfloat16"),
    ("ct2:cpu@int8@gemv=off", "ct2: takes no @KEY=VALUE options, got '@gemv=off'"),
])
def test_a_peer_precision_it_does_not_run_is_refused(target, message):
    proc = subprocess.run([sys.executable, BENCH / "generate_bench.py", "--targets", target],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and proc.stderr.strip() == message


def _row(target, batch, tps, dtype, rnd=0, tokens=None, **extra):
    return dict(target=target, batch_size=batch, tokens_per_s=tps, dtype=dtype, round=rnd, status="ok",
                first_tokens=tokens or [[1, 2, 3]], **extra)


def test_peer_ratios_take_the_best_int8_target_of_the_same_round_and_batch():
    rows = [_row("hf:cpu", 1, 10.0, "float32"),
            _row("torch:cpu@float32", 1, 40.0, "float32"), _row("onnxruntime:cpu@float32", 1, 50.0, "float32"),
            _row("torch:cpu@int8", 1, 100.0, "int8"), _row("onnxruntime:cpu@int8", 1, 120.0, "int8"),
            _row("llamacpp:cpu@q8_0", 1, 80.0, "q8_0", tokens=[[1, 2, 4]], peer=True),
            _row("ct2:cpu@int8", 1, 60.0, "int8", peer=True),
            # another round: its own best, never the other round's
            _row("onnxruntime:cpu@int8", 1, 30.0, "int8", rnd=1), _row("ct2:cpu@int8", 1, 60.0, "int8", rnd=1,
                                                                    peer=True)]
    peer_targets.add_peer_ratios(rows)
    llama, ct2, ct2_r1 = rows[5], rows[6], rows[8]
    assert llama["best_int8_target"] == "onnxruntime:cpu@int8" and llama["best_int8_vs_peer"] == 120 / 80
    assert ct2["best_int8_vs_peer"] == 2.0 and ct2_r1["best_int8_vs_peer"] == 0.5
    assert rows[4]["vs_best_float32"] == 120 / 50 and "vs_best_float32" not in ct2  # peers are not ours
    assert llama["agrees_with_hf"] == 0.0 and llama["first_token_agrees_with_hf"] == 1.0
    assert ct2["agrees_with_hf"] == 1.0
