"""A PagedStep as one byte string: what rank 0 sends every other rank before a step.

One message per rank per step (a pipe write of a few hundred bytes): the token ids, positions,
row starts, context lengths, slot mapping, logits rows and block tables the ranks need to run
the same step on their heads. Logits never travel this way (they come back through the
process group's gather).
"""
from __future__ import annotations

import numpy as np

STEP, POOL, FREE, QUIT, READY, ERROR = b"S", b"P", b"F", b"Q", b"R", b"E"


def pack_step(step) -> bytes:
    n, b = step.num_tokens, step.num_rows
    tables = np.ascontiguousarray(step.block_tables, np.int32)
    head = np.array([n, b, tables.shape[1], len(step.logits_rows), step.block_size], np.int64)
    body = np.concatenate([head, step.input_ids, step.position_ids, step.query_start, step.context_lens,
                           step.slot_mapping, step.logits_rows]).astype(np.int64, copy=False)
    return STEP + body.tobytes() + tables.tobytes()


def unpack_step(data: memoryview):
    from mini_engine.core.plan import PagedStep

    n, b, width, m, block_size = (int(x) for x in np.frombuffer(data, np.int64, 5))
    ints = np.frombuffer(data, np.int64, 5 + 3 * n + 2 * b + 1 + m)[5:]
    at = 0

    def take(k):
        nonlocal at
        at += k
        return ints[at - k:at]

    ids, pos, starts, context, slots, rows = take(n), take(n), take(b + 1), take(b), take(n), take(m)
    tables = np.frombuffer(data, np.int32, b * width, offset=8 * (5 + len(ints))).reshape(b, width)
    return PagedStep(ids, pos, starts, context, tables, slots, rows, block_size)


def pack_pool(num_blocks: int, block_size: int) -> bytes:
    return POOL + np.array([num_blocks, block_size], np.int64).tobytes()


def unpack_pool(data: memoryview) -> tuple[int, int]:
    num_blocks, block_size = np.frombuffer(data, np.int64, 2)
    return int(num_blocks), int(block_size)
