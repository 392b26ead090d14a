"""`mini-engine analyze` on hand-written request logs, in the server's format (server.log_csv)."""
import csv
import json

import pytest
from conftest import run_cli

from mini_engine.bench.log_analysis import LOG_COLUMNS, PLOTS, SUMMARY_COLUMNS, read_log, summarize
from mini_engine.errors import MiniEngineError

HEADER = ",".join(LOG_COLUMNS)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# timestamp, id, endpoint, mode, prompt, output, queue, ttft, e2e, tok/s, finish, status, rss, device mem
ROWS = """\
2025-03-01T10:00:00.000+00:00,r1,/v1/completions,stream,8,16,1.0,10,100,160,length,200,500.0,,torch,cpu
2025-03-01T10:00:01.000+00:00,r2,/v1/completions,stream,8,16,3.0,20,200,80,length,200,510.5,,torch,cpu
2025-03-01T10:00:02.000+00:00,r3,/v1/completions,stream,8,16,5.0,30,300,53,stop,200,505.0,,torch,cpu
2025-03-01T10:00:03.000+00:00,r4,/v1/completions,stream,8,16,7.0,40,400,40,length,200,520.0,,torch,cpu
2025-03-01T10:00:04.000+00:00,r5,/v1/completions,stream,8,2,,5,,,abort,499,530.0,,torch,cpu
2025-03-01T10:00:05.000+00:00,r6,/v1/completions,batch,8,16,2.0,50,50,320,length,200,515.0,,torch,cpu
2025-03-01T10:00:06.000+00:00,r7,/v1/completions,batch,8,0,,,,,timeout,504,540.0,,torch,cpu
2025-03-01T10:00:07Z,r8,/generate,batch,4,8,1.0,70,70,114.3,stop,200,512.0,,torch,cpu
2025-03-01T10:00:08.500,r9,/generate,batch,0,0,,,,,error,500,511.0,,torch,cpu
"""


def write_log(path, rows=ROWS, header=HEADER):
    path.write_text(header + "\n" + rows)
    return path


def test_summary_numbers_per_endpoint_and_mode(tmp_path):
    groups = {(g["endpoint"], g["mode"]): g for g in summarize(read_log(write_log(tmp_path / "log.csv")))}
    assert list(groups) == [("/generate", "batch"), ("/v1/completions", "batch"), ("/v1/completions", "stream"),
                            ("(all)", "(all)")]
    stream = groups["/v1/completions", "stream"]
    assert (stream["count"], stream["errors"], stream["aborted"], stream["answered"]) == (5, 0, 1, 4)
    # TTFT 10, 20, 30, 40 (the aborted row's 5 is left out); numpy's linear percentiles
    assert stream["ttft_mean_ms"] == 25.0 and stream["ttft_p50_ms"] == 25.0
    assert stream["ttft_p95_ms"] == pytest.approx(38.5) and stream["ttft_p99_ms"] == pytest.approx(39.7)
    assert stream["e2e_mean_ms"] == 250.0 and stream["e2e_p95_ms"] == pytest.approx(385.0)
    assert stream["tokens_per_s_mean"] == pytest.approx((160 + 80 + 53 + 40) / 4)
    assert stream["queue_mean_ms"] == 4.0 and stream["output_tokens_mean"] == 16.0
    assert stream["max_rss_mib"] == 530.0  # memory from every row, the aborted one too
    assert stream["max_device_mem_mib"] is None  # CPU: the column is empty
    batch = groups["/v1/completions", "batch"]
    assert (batch["count"], batch["errors"], batch["answered"]) == (2, 1, 1)  # 504 timeout is an error
    assert batch["e2e_p99_ms"] == 50.0 and batch["max_rss_mib"] == 540.0
    gen = groups["/generate", "batch"]
    assert (gen["count"], gen["errors"], gen["ttft_mean_ms"]) == (2, 1, 70.0)
    total = groups["(all)", "(all)"]
    assert (total["count"], total["errors"], total["aborted"], total["answered"]) == (9, 2, 1, 6)
    assert total["max_rss_mib"] == 540.0


def test_cli_prints_the_table_and_writes_csv_json_and_plots_beside_the_log(tmp_path):
    log = write_log(tmp_path / "server_log.csv")
    proc = run_cli("analyze", log, check=True, timeout=120)
    out = tmp_path / "server_log_analysis"
    table = proc.stdout.splitlines()
    assert table[0].split()[:4] == ["endpoint", "mode", "count", "errors"]
    stream_line = next(line for line in table if "stream" in line)
    assert stream_line.split()[:10] == ["/v1/completions", "stream", "5", "0", "(+1", "aborted)", "25.0", "25.0",
                                        "38.5", "39.7"]
    assert f"wrote {out}: summary.csv, summary.json, " in proc.stderr
    with (out / "summary.csv").open() as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames == list(SUMMARY_COLUMNS) and len(rows) == 4
    assert rows[2]["endpoint"] == "/v1/completions" and rows[2]["mode"] == "stream"
    assert rows[2]["ttft_p95_ms"] == "38.5" and rows[2]["max_device_mem_mib"] == ""
    summary = json.loads((out / "summary.json").read_text())
    assert summary["columns"]["e2e_p95_ms"]["unit"] == "ms" and len(summary["groups"]) == 4
    meta = summary["meta"]
    assert meta["rows"] == 9 and meta["backends"] == ["torch"] and meta["devices"] == ["cpu"]
    assert meta["span_s"] == 8.5 and meta["statuses"] == {"200": 6, "499": 1, "500": 1, "504": 1}
    for name in PLOTS:
        assert (out / name).read_bytes()[:8] == PNG_MAGIC, name


def test_no_plots_and_device_memory(tmp_path):
    rows = ("2025-03-01T10:00:00+00:00,a,/generate/stream,stream,4,4,1,2,3,1333,length,200,900,120.5,torch,cuda\n"
            "2025-03-01T10:00:01+00:00,b,/generate/stream,stream,4,4,1,4,5,800,length,200,901,130.0,torch,cuda\n")
    log = write_log(tmp_path / "gpu.csv", rows)
    out = tmp_path / "out"
    out.mkdir()
    (out / "latency_cdf.png").write_bytes(b"stale")  # an earlier analysis's plot must not stay beside new CSVs
    run_cli("analyze", log, "--out", out, "--no-plots", check=True, timeout=60)
    assert sorted(p.name for p in out.iterdir()) == ["summary.csv", "summary.json"]
    (group,) = json.loads((out / "summary.json").read_text())["groups"]  # one group: no (all) row
    assert group["max_device_mem_mib"] == 130.0 and group["ttft_p50_ms"] == 3.0
    run_cli("analyze", log, "--out", out, check=True, timeout=60)
    assert (out / "memory_over_time.png").read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize("content, message", [
    (None, "no such file"),
    ("", "empty file"),
    (HEADER + "\n", "the log has a header but no requests"),
    ("a,b\n1,2\n", "not a request log: its header has none of the columns timestamp,request_id"),
    (HEADER.replace(",ttft_ms", "").replace(",rss_mib", "") + "\n", "missing columns ttft_ms, rss_mib"),
    (HEADER + "\n" + ROWS.splitlines()[0].replace(",8,16,", ",eight,16,", 1) + "\n",
     "line 2: prompt_tokens 'eight': not an integer"),
    (HEADER + "\n" + ROWS.splitlines()[0] + "\n" + ROWS.splitlines()[1].replace(",200,510.5", ",ok,510.5") + "\n",
     "line 3: status 'ok': not an integer"),
    (HEADER + "\n" + ROWS.splitlines()[0].replace(",10,100,", ",10,fast,") + "\n", "e2e_ms 'fast': not a number"),
    (HEADER + "\n" + "yesterday" + ROWS.splitlines()[0][29:] + "\n", "timestamp 'yesterday': not an ISO-8601 time"),
    (HEADER + "\n2025-03-01T10:00:00Z,r1,/v1/completions\n", "line 2: fewer fields than the header's"),
    (HEADER + "\n" + ROWS.splitlines()[0] + ",extra\n", "line 2: more fields than the header's"),
])
def test_bad_logs_are_one_error_line(tmp_path, content, message):
    log = tmp_path / "log.csv"
    if content is not None:
        log.write_text(content)
    with pytest.raises(MiniEngineError, match=message.replace("(", r"\(").replace("+", r"\+")):
        read_log(log)
    proc = run_cli("analyze", log, "--out", tmp_path / "out", timeout=60)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: {log}") and message in lines[0]
    assert not (tmp_path / "out").exists()


def test_binary_file_and_directory(tmp_path):
    blob = tmp_path / "blob.csv"
    blob.write_bytes(b"\xff\xfe\x00\x01")
    with pytest.raises(MiniEngineError, match="not UTF-8 text"):
        read_log(blob)
    proc = run_cli("analyze", tmp_path, timeout=60)
    assert proc.returncode == 2 and "is a directory" in proc.stderr and "Traceback" not in proc.stderr
