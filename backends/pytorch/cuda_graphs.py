"""CUDA-graph capture of the PyTorch runner's decode step.

A GPT-2 decode step at small batch launches a few hundred short kernels; on a
fast GPU the launch overhead, not the math, bounds it. Replaying a captured
graph issues them all at once. A graph has fixed shapes and addresses, so:

- one graph per bucketed batch size (1, 2, 4, 8, then steps of 8); a batch
  replays the smallest bucket that fits and the rows above it are padding;
- attention always spans the whole allocated KV length, with the mask
  hiding positions not yet written (the eager step slices [:past + 1]);
- the write position is a device tensor, not a Python int baked into the graph;
- inputs travel in one host buffer, copied to a static device buffer per step.

Padding rows have an all-zero mask; their KV writes put the old value back,
so whatever slot sits in a padding row keeps its cache intact.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np


def graph_buckets(max_batch: int) -> tuple[int, ...]:
    """Batch sizes that get a graph: 1, 2, 4, 8, 16, 24, ... and `max_batch` itself."""
    if max_batch < 1:
        return ()
    sizes = [b for b in (1, 2, 4) if b < max_batch]
    sizes += list(range(8, max_batch, 8))
    sizes.append(max_batch)
    return tuple(sizes)


def bucket_for(n: int, buckets: Sequence[int]) -> int | None:
    """Smallest bucket holding `n` rows, or None when `n` exceeds the largest."""
    return next((b for b in buckets if b >= n), None)


class GraphKV:
    """KV cache for a captured step: writes at a device-tensor position, reads the full length.

    `valid` [B] is False for padding rows, whose write puts back the value
    already there instead of the new one.
    """

    def __init__(self, keys, values, write_pos, valid):
        self.keys, self.values = keys, values
        self.write_pos, self.valid = write_pos, valid[:, None, None, None]

    def update(self, layer: int, k, v):
        import torch

        kb, vb = self.keys[layer], self.values[layer]
        for buf, new in ((kb, k), (vb, v)):
            old = buf.index_select(2, self.write_pos)
            buf.index_copy_(2, self.write_pos, torch.where(self.valid, new, old))
        return kb, vb


class DecodeGraphs:
    """Per-bucket CUDA graphs of one decode step over fixed KV buffers.

    `keys`/`values` are the runner's buffers [rows, H, max_len, D] (rows is at
    least the largest bucket used). Graphs are captured on first use of a
    bucket and stay valid as long as these buffers do.
    """

    def __init__(self, model, keys: list, values: list, buckets: Sequence[int]):
        import torch

        self.torch = torch
        self.model, self.keys, self.values = model, keys, values
        self.rows, self.max_len = int(keys[0].shape[0]), int(keys[0].shape[2])
        self.buckets = tuple(b for b in buckets if b <= self.rows)
        self.device = keys[0].device
        self.pool = torch.cuda.graph_pool_handle()  # buckets share one memory pool
        self.graphs: dict[int, tuple[Any, Any, Any, Any]] = {}
        self.replays = 0

    def handles(self, step) -> bool:
        return (step.seq_len == 1 and step.past_len >= 1 and step.logits == "last"
                and bucket_for(step.batch_size, self.buckets) is not None)

    def run(self, step) -> np.ndarray:
        """Logits [n, V] for the first n = step.batch_size rows of the KV buffers."""
        torch = self.torch
        n, past = step.batch_size, step.past_len
        b = bucket_for(n, self.buckets)
        if b not in self.graphs:
            self.graphs[b] = self._capture(b)
        graph, host, dev, logits = self.graphs[b]
        # host layout: ids [b] | positions [b] | write position [1] | mask [b, max_len]
        host.zero_()
        h = host.numpy()
        h[:n] = step.input_ids[:, 0]
        h[b:b + n] = step.position_ids[:, 0]
        h[2 * b] = past
        h[2 * b + 1:].reshape(b, self.max_len)[:n, :past + 1] = step.attention_mask
        dev.copy_(host, non_blocking=True)
        graph.replay()
        self.replays += 1
        return logits[:n].cpu().numpy()

    def _capture(self, b: int):
        torch = self.torch
        host = torch.zeros(2 * b + 1 + b * self.max_len, dtype=torch.int64).pin_memory()
        dev = torch.zeros_like(host, device=self.device)  # all-zero mask: warm-up writes nothing
        ids, pos = dev[:b].view(b, 1), dev[b:2 * b].view(b, 1)
        write_pos = dev[2 * b:2 * b + 1]
        mask = dev[2 * b + 1:].view(b, self.max_len)

        def step():
            valid = mask.gather(1, write_pos.expand(b, 1))[:, 0] > 0
            kv = GraphKV([k[:b] for k in self.keys], [v[:b] for v in self.values], write_pos, valid)
            return self.model.step(ids, pos, mask, kv, last_only=True)

        with torch.inference_mode():
            # Warm up on a side stream so lazy initialisation (cuBLAS handles,
            # kernel selection) happens outside the capture.
            side = torch.cuda.Stream(device=self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(2):
                    step()
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                logits = step()
        return graph, host, dev, logits

    def describe(self) -> dict[str, Any]:
        return {"buckets": list(self.buckets), "captured": sorted(self.graphs), "replays": self.replays,
                "kv_rows": self.rows, "kv_len": self.max_len}
