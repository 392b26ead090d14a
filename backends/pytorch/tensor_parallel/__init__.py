"""Tensor parallelism for the torch backend on CPU: Megatron-style GPT-2 over gloo ranks.

TorchRunner stays the public runner; with backend.options.tensor_parallel_size > 1 it hands
the paged path to a TensorParallelGroup (group.py), whose ranks hold shard.py's slices.
"""
from .group import TensorParallelError, TensorParallelGroup, cpu_cores

__all__ = ["TensorParallelError", "TensorParallelGroup", "cpu_cores"]
