"""One rank's share of the model and of the KV pool, and how it runs a paged step.

The same code runs on rank 0 (inside the engine's process) and on every spawned rank.
"""
from __future__ import annotations


class Rank:
    def __init__(self, pg, source, rank: int, tp: int, threads: int, linear: str, timeout_s: float,
                 shm_path: str | None = None, alive=None):
        import torch

        from mini_engine.model.weights import build_model

        from .comm import Comm
        from .shard import shard_model

        self.torch, self.rank, self.tp, self.threads = torch, rank, tp, threads
        self.cfg = source.config
        shm = None
        if shm_path is not None:
            from .shm import ShmCollectives

            shm = ShmCollectives(shm_path, rank, tp, timeout_s, alive)
        self.comm = Comm(pg, rank, tp, timeout_s, shm)
        self.model = build_model(source, "float32", "cpu")
        self.facts = shard_model(self.model, rank, tp, self.comm, linear)
        self.heads = self.facts["heads"]
        self.pool_keys: list = []
        self.pool_values: list = []

    def allocate(self, num_blocks: int, block_size: int) -> None:
        from ..paged_attention import allocate_pool

        # This rank's heads (n_head / tp) of every block.
        self.pool_keys, self.pool_values = allocate_pool(self.cfg.n_layer, num_blocks, self.heads, block_size,
                                                         self.cfg.head_dim)

    def free(self) -> None:
        self.pool_keys = self.pool_values = []

    def step(self, step):
        """Logits [len(logits_rows), V] on rank 0; an empty tensor elsewhere."""
        from ..paged_attention import PagedKV

        torch = self.torch
        kv = PagedKV(self.pool_keys, self.pool_values, step, self.heads, self.cfg.head_dim, self.threads)
        with torch.inference_mode():
            return self.model.paged_step(torch.from_numpy(step.input_ids), torch.from_numpy(step.position_ids),
                                         kv, torch.from_numpy(step.logits_indices))
