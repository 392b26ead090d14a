"""`mini-engine compare`: real backends, each in its own process, on an ONNX export of a checkpoint."""
import json

import pytest

from conftest import run_cli


@pytest.fixture(scope="module")
def export_dir(hf_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("compare") / "onnx"
    run_cli("export", "onnx", "--model", hf_dir, "--out", out, "--exporter", "torchscript", check=True)
    return out


def test_torch_and_onnxruntime_agree_and_unavailable_backends_are_listed(hf_dir, export_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Hello world\n\nThe quick brown fox\n")
    proc = run_cli("compare", "--model", hf_dir, "--backends", "torch:cpu,onnxruntime:cpu,tensorrt:cuda",
                   "--set", f'backend.options.onnx_path="{export_dir}"', "--set", 'backend.name="onnxruntime"',
                   "--prompts", prompts, "-n", 5, "--atol", "1e-3", "--json", check=True)
    report = json.loads(proc.stdout)
    backends = {b["backend"]: b for b in report["backends"]}
    assert backends["torch:cpu"]["available"] and backends["onnxruntime:cpu"]["available"]
    assert not backends["tensorrt:cuda"]["available"] and backends["tensorrt:cuda"]["reason"]
    (pair,) = report["pairs"]
    assert pair["prompts"] == 2 and pair["prompts_identical"] == 2 and pair["first_divergence"] == [None, None]
    assert pair["max_abs_diff"] < 1e-3 and pair["top1_agreement"] == 1.0 and report["passed"]
    assert backends["onnxruntime:cpu"]["decode_ms_per_token"] > 0


def test_a_pair_beyond_tolerance_exits_non_zero_with_the_table(hf_dir, export_dir):
    proc = run_cli("compare", "--model", hf_dir, "--backends", "torch:cpu,onnxruntime:cpu",
                   "--set", f'backend.options.onnx_path="{export_dir}"', "--set", 'backend.name="onnxruntime"',
                   "-n", 2, "--atol", "0")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "FAIL (atol 0)" in proc.stdout and "max |logit diff|" in proc.stderr


@pytest.mark.parametrize("args, message", [
    (("--backends", "torch:cpu"), "at least two"),
    (("--backends", "torch:cpu,torch:cpu"), "twice"),
    (("--backends", "torch:cpu,onnxruntime:cpu", "--prompts", "/nonexistent/prompts.txt"), "cannot read"),
    (("--backends", "torch:cpu,nosuch:cpu"), "fewer than two backends ran"),
])
def test_bad_compare_input_is_one_line(args, message):
    proc = run_cli("compare", "--model", "random:tiny", *args)
    lines = [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith(("note:", "running"))]
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert len(lines) == 1 and message in lines[0], proc.stderr
