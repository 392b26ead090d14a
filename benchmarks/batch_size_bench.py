#!/usr/bin/env python
"""Batch-size sweep across backends: the same harness and flags as `mini-engine bench`.

    python benchmarks/batch_size_bench.py --requests 1024 --batch-sizes 1,2,4,8,16 --trials 10
    python benchmarks/batch_size_bench.py --targets torch:cpu,onnxruntime:cpu --out result/cpu/forward

See `mini-engine bench --help` for every flag and the README section "Benchmarking".
"""
import sys

from mini_engine.cli import cli

if __name__ == "__main__":
    sys.exit(cli(["bench", *sys.argv[1:]], prog_name="batch_size_bench.py"))
