"""`mini-engine bench` compares precisions in one run: per-target @dtype and --dtype for all."""
import json

from conftest import run_cli


def test_float32_and_int8_targets_in_one_run_record_their_own_weight_bytes(tmp_path):
    out = tmp_path / "run"
    run_cli("bench", "--model", "random:tiny", "--mode", "generate", "--targets", "torch:cpu@float32,torch:cpu@int8",
            "--batch-sizes", "1", "--requests", 2, "--trials", 1, "--no-progress", "--out", out,
            check=True, timeout=300)
    rows = {r["target"]: r for r in json.loads((out / "bench.json").read_text())["results"]}
    f32, i8 = rows["torch:cpu@float32"], rows["torch:cpu@int8"]
    assert (f32["status"], i8["status"]) == ("ok", "ok")
    assert (f32["dtype"], i8["dtype"]) == ("float32", "int8")
    # int8 weights and their scales: about a quarter of the float32 bytes a step reads
    assert 0.2 < i8["weight_bytes"] / f32["weight_bytes"] < 0.35
    assert i8["bandwidth_gbps"] > 0 and i8["tokens_per_s"] > 0


def test_an_unknown_dtype_is_refused_naming_the_precisions(tmp_path):
    proc = run_cli("bench", "--model", "random:tiny", "--mode", "generate", "--dtype", "int3",
                   "--out", tmp_path / "bad")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "'int3' is not one of" in proc.stderr and "'int8'" in proc.stderr and "'int4'" in proc.stderr
