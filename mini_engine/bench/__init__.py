"""The benchmark harness behind `mini-engine bench` and benchmarks/batch_size_bench.py.

spec.py (what to measure) -> harness.py (one process per target, runner_process.py)
-> workload.py (closed/open-loop load through the dynamic batcher) -> metrics.py
(per-trial figures, mean and spread) -> report.py (table, CSV, JSON, PNG).
"""
from .harness import run_bench
from .spec import BenchSpec, Target

__all__ = ["BenchSpec", "Target", "run_bench"]
