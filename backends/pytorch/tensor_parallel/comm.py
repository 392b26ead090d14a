"""The group's collectives, timed: what a step spends summing partial products and gathering logits.

Two transports: shared memory with spinning waits (shm.py, the default: a decode step's tensors
are small and latency is all that matters) and gloo (the process group; also every tensor too big
for a shared-memory slot, e.g. a long prefill's all-reduce).

Rank 0's figures are the ones reported. Its time inside an all-reduce includes waiting for the
slowest rank to arrive, so it measures imbalance between ranks as well as the transfer.
"""
from __future__ import annotations

import time

import numpy as np
import torch


class Comm:
    def __init__(self, pg, rank: int, world: int, timeout_s: float, shm=None):
        from datetime import timedelta

        import torch.distributed as dist

        self.pg, self.rank, self.world, self.shm = pg, rank, world, shm
        # backend.options.tp_timeout_s bounds every collective of a step (joining had longer).
        self.reduce_opts = dist.AllreduceOptions()
        self.reduce_opts.timeout = timedelta(seconds=timeout_s)
        self.gather_opts = dist.GatherOptions()
        self.gather_opts.rootRank = 0
        self.gather_opts.timeout = timedelta(seconds=timeout_s)
        self.reset()

    def reset(self) -> None:
        self.all_reduce_s = self.gather_s = 0.0
        self.all_reduce_calls = self.all_reduce_bytes = self.gather_bytes = 0

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        if self.shm is not None and self.shm.fits(t.numel()):
            self.shm.all_reduce(t.numpy())
        else:
            self.pg.allreduce([t], self.reduce_opts).wait()
        self.all_reduce_s += time.perf_counter() - t0
        self.all_reduce_calls += 1
        self.all_reduce_bytes += t.numel() * t.element_size()
        return t

    def gather_logits(self, part: torch.Tensor, vocab: int) -> torch.Tensor:
        """Every rank's [M, share] logits to rank 0 as [M, vocab]; other ranks get [0, vocab]."""
        t0 = time.perf_counter()
        if self.shm is not None and self.shm.fits(part.numel()):
            parts = self.shm.gather(part.numpy())
            out = (torch.from_numpy(np.concatenate(parts, axis=1)[:, :vocab]) if parts is not None
                   else part.new_empty((0, vocab)))
        elif self.rank == 0:
            parts = [torch.empty_like(part) for _ in range(self.world)]
            self.pg.gather([parts], [part], self.gather_opts).wait()
            out = torch.cat(parts, dim=1)[:, :vocab]
        else:
            self.pg.gather([], [part], self.gather_opts).wait()
            out = part.new_empty((0, vocab))
        self.gather_s += time.perf_counter() - t0
        self.gather_bytes += part.numel() * part.element_size() * (self.world - 1)
        return out

    def snapshot(self) -> dict:
        return {"all_reduce_s": self.all_reduce_s, "all_reduce_calls": self.all_reduce_calls,
                "all_reduce_bytes": self.all_reduce_bytes, "gather_s": self.gather_s,
                "gather_bytes": self.gather_bytes}
