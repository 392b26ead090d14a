"""The loop of a spawned rank (1..tp-1): join the group, load its share, run what rank 0 sends.

A rank waits for commands on its pipe without a timeout (an idle engine sends none), and leaves
when the pipe closes: rank 0's process ended, however it ended. Inside a step every collective
has the group's timeout. An exception is sent to rank 0 as text before the rank exits, so the
engine can say what went wrong rather than only that a peer vanished.
"""
from __future__ import annotations

import os
import traceback
from dataclasses import dataclass
from datetime import timedelta


SETUP_TIMEOUT_S = 120.0


@dataclass
class RankSpec:
    source: object  # ModelSource
    rank: int
    tp: int
    threads: int
    linear: str
    port: int
    timeout_s: float
    shm_path: str | None  # the shared-memory collectives' file (None: gloo only)


def join_group(rank: int, tp: int, port: int, timeout_s: float, store=None):
    """The group's gloo backend, built directly on a TCPStore rather than through
    init_process_group: no process-wide default group, so an engine process can hold several
    runners (vLLM's stateless_init_torch_distributed_process_group does the same)."""
    import torch.distributed as dist

    # Joining waits for every rank to start (spawn + import torch: seconds on a loaded machine);
    # the group's own timeout applies to each collective of a step (comm.py).
    timeout = timedelta(seconds=max(timeout_s, SETUP_TIMEOUT_S))
    if store is None:
        store = dist.TCPStore("127.0.0.1", port, tp, is_master=False, timeout=timeout)
    # Gloo would pick its interface from the hostname; the group lives on this machine only.
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    return dist.ProcessGroupGloo(dist.PrefixStore("tp", store), rank, tp, timeout)


def run_rank(conn, spec: RankSpec) -> None:
    from . import wire

    try:
        import torch

        torch.set_num_threads(spec.threads)
        pg = join_group(spec.rank, spec.tp, spec.port, spec.timeout_s)
        from .rank import Rank

        parent = os.getppid()
        rank = Rank(pg, spec.source, spec.rank, spec.tp, spec.threads, spec.linear, spec.timeout_s,
                    spec.shm_path, lambda: os.getppid() == parent)
        conn.send_bytes(wire.READY)
        while True:
            try:
                data = memoryview(bytearray(conn.recv_bytes()))
            except (EOFError, OSError):
                break  # rank 0 is gone
            kind, body = bytes(data[:1]), data[1:]
            if kind == wire.STEP:
                rank.step(wire.unpack_step(body))
            elif kind == wire.POOL:
                rank.allocate(*wire.unpack_pool(body))
            elif kind == wire.FREE:
                rank.free()
            elif kind == wire.QUIT:
                break
    except BaseException:  # noqa: BLE001 - rank 0 reports it
        try:
            conn.send_bytes(wire.ERROR + traceback.format_exc().encode())
        except OSError:
            pass
        os._exit(1)
