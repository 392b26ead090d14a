"""`mini-engine bench` end to end through the real CLI (random:tiny, tiny request counts)."""
import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import run_cli

from mini_engine.bench.metrics import COLUMNS

# What the issue requires every result row to carry.
REQUIRED = ["target", "backend", "device", "mode", "batch_size", "throughput_rps", "tokens_per_s",
            "latency_mean_ms", "latency_p50_ms", "latency_p90_ms", "latency_p95_ms", "latency_p99_ms",
            "mean_batch_size", "peak_rss_mb", "status", "reason"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_tiny_forward_sweep_writes_csv_json_png_and_lists_unavailable_targets_as_skipped(tmp_path):
    out = tmp_path / "run"
    proc = run_cli("bench", "--model", "random:tiny", "--targets", "torch:cpu,nosuch:cpu,tensorrt:cpu",
                   "--batch-sizes", "1,2", "--requests", 4, "--trials", 2, "--warmup", 1, "--no-progress",
                   "--out", out, check=True, timeout=300)
    with (out / "bench.csv").open() as f:
        reader = csv.DictReader(f)
        header, rows = reader.fieldnames, list(reader)
    assert header == list(COLUMNS) and set(REQUIRED) <= set(header)
    ok = [r for r in rows if r["status"] == "ok"]
    assert [(r["target"], r["mode"], r["batch_size"]) for r in ok] == [("torch:cpu", "forward", "1"),
                                                                       ("torch:cpu", "forward", "2")]
    for r in ok:
        assert float(r["throughput_rps"]) > 0
        assert abs(float(r["tokens_per_s"]) / float(r["throughput_rps"]) - 8) < 0.01  # 8-token prompts
        assert float(r["latency_p50_ms"]) <= float(r["latency_p99_ms"])
        assert 1 <= float(r["mean_batch_size"]) <= int(r["batch_size"])
        assert float(r["peak_rss_mb"]) > 50 and float(r["bandwidth_gbps"]) > 0
        assert float(r["machine_bandwidth_gbps"]) > 0 and r["threads"]
    skipped = {r["target"]: r["reason"] for r in rows if r["status"] == "skipped"}
    assert "unknown backend 'nosuch'" in skipped["nosuch:cpu"]
    assert "tensorrt" in skipped["tensorrt:cpu"]

    result = json.loads((out / "bench.json").read_text())
    assert result["columns"]["throughput_rps"]["unit"] == "requests/s"
    assert result["columns"]["latency_p95_ms"]["unit"] == "ms"
    meta = result["meta"]
    assert meta["model"] == "random:tiny" and meta["machine"]["cpu_count"] >= 1
    assert "torch" in meta["machine"]["libraries"] and meta["config"]["batching"]["max_queue_delay_ms"] == 2.0
    assert meta["targets"]["torch:cpu"]["runner"]["backend"] == "torch"
    assert len(result["results"]) == len(rows)
    (gain,) = result["best_vs_batch1"]
    assert gain["target"] == "torch:cpu" and gain["speedup"] > 0
    for name in ("throughput_vs_batch_size.png", "latency_mean_vs_batch_size.png",
                 "latency_p50_p95_vs_batch_size.png", "summary.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
    assert "torch:cpu" in proc.stdout and "skipped: nosuch:cpu" in proc.stdout
    assert f"wrote {out}: bench.csv, bench.json, 4 plots (" in proc.stderr and "logs/" in proc.stderr


def test_naive_vs_optimized_generate_table(tmp_path):
    out = tmp_path / "nvo"
    proc = run_cli("bench", "--model", "random:tiny", "--targets", "torch:cpu", "--mode", "naive-vs-optimized",
                   "--batch-sizes", "4", "--requests", 4, "--max-new-tokens", 4, "--prompt-len", 4, "--warmup", 0,
                   "--no-progress", "--out", out, check=True, timeout=300)
    result = json.loads((out / "bench.json").read_text())
    modes = {r["mode"]: r for r in result["results"]}
    assert set(modes) == {"generate", "naive"} and all(r["status"] == "ok" for r in modes.values())
    gen = modes["generate"]
    assert abs(gen["tokens_per_s"] / gen["throughput_rps"] - 4) < 0.01  # 4 tokens per request
    for key in ("ttft_mean_ms", "itl_mean_ms", "tpot_mean_ms"):
        assert gen[key] > 0
    (row,) = result["comparison"]
    assert row["prompt_len"] == 4 and row["batch_size"] == 4 and row["max_new_tokens"] == 4
    assert row["tokens_generated"] == 16 and row["speedup"] > 0
    assert (out / "naive_vs_optimized.csv").exists()
    assert "speedup" in proc.stdout


def _bench_nothing_measurable(*args, cwd):
    """A bench run in which no target can run: quick, and exactly the case that once left stale plots."""
    from conftest import CLI

    return subprocess.run(CLI + ["bench", "--model", "random:tiny", "--targets", "nosuch:cpu", "--no-progress",
                                 *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_default_out_is_a_new_directory_per_run(tmp_path):
    runs = [_bench_nothing_measurable(cwd=tmp_path) for _ in range(2)]
    dirs = sorted((tmp_path / "result" / "bench").iterdir())
    assert len(dirs) == 2  # the second run did not overwrite the first, even within the same second
    for proc, d in zip(runs, dirs):
        assert proc.returncode != 0 and "no target could be measured" in proc.stderr
        assert f"wrote {d.relative_to(tmp_path)}: bench.csv, bench.json, no plots (no target was measured)" \
            in proc.stderr
        assert sorted(p.name for p in d.iterdir() if p.is_file()) == ["bench.csv", "bench.json"]


def test_non_empty_out_is_refused_without_force_and_force_leaves_no_stale_plots(tmp_path):
    out = tmp_path / "old"
    (out / "logs").mkdir(parents=True)
    for name in ("bench.csv", "summary.png", "throughput_vs_batch_size.png", "naive_vs_optimized.csv",
                 "logs/torch_cpu.log", "notes.txt"):
        (out / name).write_text("earlier run")
    proc = _bench_nothing_measurable("--out", out, cwd=tmp_path)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [f"Error: --out {out} is not empty; pass --force to replace the "
                                                f"results in it, or choose another directory (without --out "
                                                f"each run gets a new result/bench/<UTC time>)"]
    assert (out / "bench.csv").read_text() == "earlier run"

    proc = _bench_nothing_measurable("--out", out, "--force", cwd=tmp_path)
    assert "no plots (no target was measured)" in proc.stderr and "and plots" not in proc.stderr
    left = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert left == ["bench.csv", "bench.json", "notes.txt"]  # the user's own file stays
    with (out / "bench.csv").open() as f:
        assert [r["status"] for r in csv.DictReader(f)] == ["skipped"] * 5


def test_bad_flags_are_one_line_errors(tmp_path):
    for args in (["--batch-sizes", "1,x"], ["--concurrency", "2", "--request-rate", "5"],
                 ["--option", "torchthreads"]):
        proc = run_cli("bench", "--model", "random:tiny", "--out", tmp_path / "bad", *args)
        assert proc.returncode != 0
        assert "Traceback" not in proc.stderr and proc.stderr.strip().count("\n") == 0, proc.stderr


def test_script_has_the_same_flags():
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "batch_size_bench.py"
    proc = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    for flag in ("--requests", "--batch-sizes", "--trials", "--targets", "--mode"):
        assert flag in proc.stdout


def test_generate_bench_rounds_take_ratios_within_each_round(tmp_path):
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "generate_bench.py"
    out = tmp_path / "gen"
    subprocess.run([sys.executable, script, "--model", "random:tiny", "--targets", "hf:cpu,torch:cpu@gemv=off",
                    "--batch-sizes", "1", "--runs", "1", "--rounds", "2", "--new-tokens", "4", "--out", out],
                   check=True, capture_output=True, timeout=300)
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [(r["round"], r["target"], r["status"]) for r in rows] == [
        (0, "hf:cpu", "ok"), (0, "torch:cpu@gemv=off", "ok"), (1, "hf:cpu", "ok"), (1, "torch:cpu@gemv=off", "ok")]
    for hf, torch_row in (rows[0:2], rows[2:4]):
        assert torch_row["vs_hf"] == torch_row["tokens_per_s"] / hf["tokens_per_s"]
        assert torch_row["runner"]["gemv"] == "off"  # the per-target option reached the backend
    assert "Across rounds" in out.with_suffix(".md").read_text()
    bad = subprocess.run([sys.executable, script, "--targets", "torch:cpu@gemv"], capture_output=True, text=True)
    assert bad.returncode != 0 and bad.stderr.strip() == "target option '@gemv' must be KEY=VALUE, e.g. torch:cpu@gemv=off"


def test_continuous_mode_compares_naive_static_and_continuous(tmp_path):
    from mini_engine.bench.continuous import COLUMNS as CB_COLUMNS

    out = tmp_path / "cb"
    proc = run_cli("bench", "--mode", "continuous", "--model", "random:tiny", "--targets", "torch:cpu",
                   "--requests", 10, "--naive-requests", 2, "--prompt-lens", "4:24", "--output-lens", "3:12",
                   "--batch-sizes", "2,4", "--max-num-seqs", 4, "--no-progress", "--out", out, check=True, timeout=300)
    with (out / "bench.csv").open() as f:
        reader = csv.DictReader(f)
        header, rows = reader.fieldnames, list(reader)
    assert header == list(CB_COLUMNS)
    points = [(r["mode"], r["arrivals"].split()[0], r["batch_size"]) for r in rows]
    assert points == [("naive", "burst", "1"), ("static", "burst", "2"), ("static", "burst", "4"),
                      ("continuous", "burst", "4"), ("static", "poisson", points[4][2]), ("continuous", "poisson", "4")]
    tokens = {int(r["tokens_generated"]) for r in rows if r["mode"] != "naive"}
    assert len(tokens) == 1  # every point generates the same workload
    cont = [r for r in rows if r["mode"] == "continuous"]
    assert all(int(r["padded_tokens"]) == 0 and float(r["peak_kv_mib"]) > 0 for r in cont)
    assert all(int(r["padded_tokens"]) > 0 for r in rows if r["mode"] == "static" and r["arrivals"] == "burst")
    assert all(0 <= float(r["engine_overhead_pct"]) < 100 for r in rows)
    assert (out / "continuous.png").read_bytes()[:8] == PNG_MAGIC
    assert (out / "continuous_vs_static.csv").is_file()
    assert "continuous" in proc.stdout and "x static" in proc.stdout


def test_continuous_batching_benchmark_scripts_run(tmp_path):
    """long_context, prefix_cache and grid benchmarks end to end on random:tiny (their figures are the
    committed runs on random:gpt2; this only keeps the scripts working)."""
    root = Path(__file__).parent.parent / "benchmarks"
    runs = {"long_context_bench.py": ["--batch-sizes", "1,2", "--contexts", "8,16", "--steps", "2"],
            "prefix_cache_bench.py": ["--prefix-len", "32", "--requests", "1"],
            "grid_bench.py": ["--prompt-lens", "8", "--batch-sizes", "1,2", "--max-tokens", "4"]}
    for script, args in runs.items():
        out = tmp_path / script.replace(".py", "")
        proc = subprocess.run([sys.executable, str(root / script), "--model", "random:tiny", "--targets",
                               "torch:cpu,onnxruntime:cpu", *args, "--out", str(out)],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        report = json.loads(out.with_suffix(".json").read_text())
        assert report["rows"] and report["cpu"] and "python " not in report["command"]
        assert "torch:cpu" in out.with_suffix(".md").read_text()


def test_block_size_bench_script_runs(tmp_path):
    """benchmarks/block_size_bench.py end to end on random:tiny, two block sizes, one round."""
    script = Path(__file__).parent.parent / "benchmarks" / "block_size_bench.py"
    out = tmp_path / "block_size"
    proc = subprocess.run([sys.executable, str(script), "--model", "random:tiny", "--block-sizes", "4,16",
                           "--rounds", "1", "--requests", "3", "--prompt-lens", "4:12", "--output-lens", "2:6",
                           "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.with_suffix(".json").read_text())
    assert [r["block_size"] for r in report["rows"]] == [4, 16]
    assert all(r["tokens_per_s"] > 0 and r["vs_first"] for r in report["rows"])
    bad = subprocess.run([sys.executable, str(script), "--block-sizes", "16,x"], capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--block-sizes" in bad.stderr


def test_ort_op_profile_script_runs():
    """benchmarks/ort_op_profile.py end to end on random:tiny (its figures are the committed int8 runs)."""
    pytest.importorskip("onnxruntime")
    script = Path(__file__).parent.parent / "benchmarks" / "ort_op_profile.py"
    proc = subprocess.run([sys.executable, str(script), "--model", "random:tiny", "--dtype", "float32",
                           "--steps", "3", "--past", "4"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "model_run:" in proc.stdout and "| GroupQueryAttention |" in proc.stdout


def test_train_proxy_checkpoint_script_writes_a_loadable_checkpoint(tmp_path):
    """benchmarks/train_proxy_checkpoint.py, a few steps: the directory it writes is a checkpoint the
    engine loads (its figures come from the committed 20-minute run)."""
    script = Path(__file__).parent.parent / "benchmarks" / "train_proxy_checkpoint.py"
    out = tmp_path / "proxy"
    proc = subprocess.run([sys.executable, str(script), "--out", str(out), "--max-steps", "2", "--corpus-mb", "0.2",
                           "--layers", "1", "--width", "64", "--heads", "1", "--batch", "2", "--seq", "16"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    info = json.loads((out / "train_info.json").read_text())
    assert info["steps"] == 2 and info["corpus"]["tokens"] > 0 and "proxy" in info["what"]
    from mini_engine.model.source import resolve_model

    assert resolve_model(str(out)).config.n_layer == 1


def test_logit_margin_script_runs():
    script = Path(__file__).parent.parent / "benchmarks" / "logit_margin.py"
    proc = subprocess.run([sys.executable, str(script), "--models", "random:tiny"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "| random:tiny |" in proc.stdout
