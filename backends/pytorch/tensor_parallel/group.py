"""Start the ranks of a tensor-parallel group, drive them step by step, notice when one dies.

Rank 0 is the engine's own process (vLLM's driver worker): it computes its share of every step,
and the logits end there with no extra copy between processes. Ranks 1..tp-1 are spawned
processes. Each step rank 0 writes the step's arrays to every rank's pipe, then all ranks run it;
the collectives (gloo on 127.0.0.1) carry a timeout, and a collective that fails or times out is
turned into a TensorParallelError naming the rank that died (its exit code or signal) or the
timeout. After a failure the group is unusable: every later call raises the same error.
"""
from __future__ import annotations

import os
import signal
import time
from datetime import timedelta

import numpy as np

from mini_engine.errors import MiniEngineError

from . import wire
from .worker import SETUP_TIMEOUT_S, RankSpec, join_group, run_rank


class TensorParallelError(MiniEngineError):
    """A rank died, timed out or failed: the group cannot run steps any more."""


def cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


class TensorParallelGroup:
    def __init__(self, source, tp: int, threads: int, linear: str, timeout_s: float, comm: str = "shm"):
        import multiprocessing as mp

        import torch.distributed as dist

        self.tp, self.threads, self.timeout_s, self.comm = tp, threads, timeout_s, comm
        self.shm_path = None
        self.problem: str | None = None
        self.procs, self.conns, self.rank0 = [], [], None
        self.steps, self.step_s, self.send_s = 0, 0.0, 0.0
        t0 = time.perf_counter()
        setup = timedelta(seconds=max(timeout_s, SETUP_TIMEOUT_S))
        store = dist.TCPStore("127.0.0.1", 0, tp, is_master=True, timeout=setup, wait_for_workers=False)
        ctx = mp.get_context("spawn")  # fork would copy the engine's threads and OpenMP state
        try:
            if comm == "shm":
                from .shm import create_file

                self.shm_path = create_file(tp)
            for r in range(1, tp):
                mine, theirs = ctx.Pipe()
                p = ctx.Process(target=run_rank, args=(theirs, RankSpec(source, r, tp, threads, linear, store.port,
                                                                           timeout_s, self.shm_path)),
                                name=f"mini-engine-tp-rank{r}", daemon=True)
                p.start()
                theirs.close()
                self.procs.append(p)
                self.conns.append(mine)
            pg = self._collective(lambda: join_group(0, tp, store.port, timeout_s, store=store), "joining the group")
            from .rank import Rank

            self.rank0 = Rank(pg, source, 0, tp, threads, linear, timeout_s, self.shm_path,
                              lambda: all(p.exitcode is None for p in self.procs))
            self._wait_ready()
            self._unlink_shm()  # every rank has it mapped: nothing is left in /dev/shm, however we end
        except BaseException:
            self.close()
            raise
        self.store = store
        self.load_s = time.perf_counter() - t0

    # ----- steps -------------------------------------------------------------------------
    def allocate(self, num_blocks: int, block_size: int) -> None:
        self._send(wire.pack_pool(num_blocks, block_size))
        self.rank0.allocate(num_blocks, block_size)

    def free(self) -> None:
        if self.problem is None:
            self._send(wire.FREE)
        self.rank0.free()

    def execute(self, step) -> np.ndarray:
        t0 = time.perf_counter()
        self._send(wire.pack_step(step))
        t1 = time.perf_counter()
        logits = self._collective(lambda: self.rank0.step(step), "a step")
        self.steps += 1
        self.send_s += t1 - t0
        self.step_s += time.perf_counter() - t0
        return logits.numpy()

    def _send(self, message: bytes) -> None:
        self.check()
        for r, conn in enumerate(self.conns, start=1):
            try:
                conn.send_bytes(message)
            except OSError as e:
                raise self._fail(e, f"sending to rank {r}") from None

    def _collective(self, fn, what: str):
        try:
            return fn()
        except TensorParallelError:
            raise
        except Exception as e:  # gloo raises RuntimeError (peer closed, timeout); anything else is ours too
            raise self._fail(e, what) from None

    # ----- failure ---------------------------------------------------------------------------
    def check(self) -> None:
        """Raise at once if the group failed or a rank has exited since the last step."""
        if self.problem is None:
            dead = [r for r, p in enumerate(self.procs, start=1) if p.exitcode is not None]
            if dead:
                self._fail(None, "checking the ranks")
        if self.problem is not None:
            raise TensorParallelError(self.problem)

    def health_problem(self) -> str | None:
        """Why the group cannot run, or None (cheap: for /health)."""
        if self.problem is None and any(p.exitcode is not None for p in self.procs):
            self._fail(None, "checking the ranks")
        return self.problem

    def _fail(self, error: BaseException | None, what: str) -> TensorParallelError:
        # A killed rank's peers see its sockets close a moment before its exit code is collected.
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline and all(p.exitcode is None for p in self.procs):
            time.sleep(0.02)
        reasons = []
        for r, (p, conn) in enumerate(zip(self.procs, self.conns), start=1):
            if p.exitcode is None:
                continue
            detail = _exit_reason(p.exitcode)
            report = _last_error(conn)
            reasons.append(f"rank {r} (pid {p.pid}) {detail}" + (f": {report}" if report else ""))
        if reasons:
            message = "; ".join(reasons)
        elif error is not None and ("timed out" in str(error).lower() or "timeout" in str(error).lower()):
            message = (f"a rank did not answer within backend.options.tp_timeout_s = {self.timeout_s:g} s "
                       f"while {what} (is it stuck?)")
        else:
            message = f"{what} failed: {type(error).__name__}: {str(error).splitlines()[0] if error else ''}"
        self.problem = f"tensor-parallel group of {self.tp} ranks failed: {message}; restart the engine"
        return TensorParallelError(self.problem)

    def _wait_ready(self) -> None:
        from multiprocessing.connection import wait

        pending = dict(zip(self.conns, range(1, self.tp)))
        deadline = time.monotonic() + max(self.timeout_s, SETUP_TIMEOUT_S)  # loading is not a step
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TensorParallelError(f"tensor-parallel ranks {sorted(pending.values())} did not load the "
                                          f"model in time")
            for conn in wait(list(pending), timeout=left):
                try:
                    msg = conn.recv_bytes()
                except (EOFError, OSError):
                    msg = b""
                if msg[:1] != wire.READY:
                    raise self._fail(RuntimeError(msg[1:].decode(errors="replace") or "exited"), "loading")
                del pending[conn]

    # ----- shutdown ------------------------------------------------------------------------------
    def _unlink_shm(self) -> None:
        if self.shm_path is not None:
            try:
                os.unlink(self.shm_path)
            except FileNotFoundError:
                pass

    def close(self) -> None:
        self._unlink_shm()
        for conn in self.conns:
            try:
                conn.send_bytes(wire.QUIT)
            except OSError:
                pass
        for p in self.procs:
            p.join(timeout=5)
            if p.exitcode is None:
                p.kill()
                p.join(timeout=5)
        for conn in self.conns:
            conn.close()
        self.procs, self.conns = [], []
        self.rank0 = None

    # ----- facts -----------------------------------------------------------------------------------
    def stats(self) -> dict:
        """Rank 0's cumulative timings (the benchmark differences two snapshots)."""
        comm = self.rank0.comm.snapshot() if self.rank0 is not None else {}
        return {"steps": self.steps, "step_s": self.step_s, "send_s": self.send_s, **comm}

    def describe(self) -> dict:
        facts = dict(self.rank0.facts) if self.rank0 is not None else {}
        comm = ("shared memory (spinning waits; gloo for tensors over 2 MiB)" if self.comm == "shm" else "gloo")
        return {"size": self.tp, "threads_per_rank": self.threads, "collectives": comm, "timeout_s": self.timeout_s,
                "rank0": "the engine's process", "pids": [os.getpid()] + [p.pid for p in self.procs],
                "per_rank": facts, "embeddings": "replicated", "lm_head": "vocab-split, gathered on rank 0",
                "load_s": round(getattr(self, "load_s", 0.0), 2), "problem": self.problem, **self.stats()}


def _exit_reason(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def _last_error(conn) -> str:
    """The traceback's last line a dying rank sent, if it had time to."""
    try:
        while conn.poll(0):
            msg = conn.recv_bytes()
            if msg[:1] == wire.ERROR:
                lines = msg[1:].decode(errors="replace").strip().splitlines()
                return lines[-1] if lines else ""
    except (EOFError, OSError):
        pass
    return ""
