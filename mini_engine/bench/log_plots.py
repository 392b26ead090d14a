"""Plots of the server's request log (matplotlib, Agg backend), one series per (endpoint, mode):

- latency_cdf.png: CDFs of e2e latency and TTFT (streaming vs batch side by side);
- ttft_vs_e2e.png: each answered request's TTFT against its e2e latency;
- tokens_per_s_over_time.png: each answered request's tokens/s at its completion time;
- memory_over_time.png: the server's RSS (and device memory where logged) over time.
"""
from __future__ import annotations

from pathlib import Path

from .log_analysis import PLOTS, LogRow


def write_plots(rows: list[LogRow], out: Path, title: str = "") -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    t0 = min(r.time for r in rows)
    groups: dict[tuple[str, str], list[LogRow]] = {}
    for r in sorted(rows, key=lambda r: r.time):
        groups.setdefault(r.group, []).append(r)
    series = {f"{endpoint} ({mode})": g for (endpoint, mode), g in sorted(groups.items())}

    def since(r: LogRow) -> float:
        return (r.time - t0).total_seconds()

    def finish(fig, ax_list, name: str) -> Path:
        for ax in ax_list:
            ax.grid(True, alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
            else:
                ax.text(0.5, 0.5, "no data in the log", ha="center", va="center", transform=ax.transAxes)
        if title:
            fig.suptitle(title, fontsize=10)
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        return out / name

    written = []
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, key, label in ((axes[0], "e2e_ms", "e2e latency (ms)"), (axes[1], "ttft_ms", "TTFT (ms)")):
        for i, (name, g) in enumerate(series.items()):
            v = np.sort([getattr(r, key) for r in g if r.answered and getattr(r, key) is not None])
            if v.size:  # starts at 0 on the first value: a group of one request is a visible step too
                ax.step(np.r_[v[0], v], np.r_[0, np.arange(1, v.size + 1) / v.size], where="post", color=f"C{i}",
                        label=f"{name}, n={v.size}")
        ax.set_xlabel(label)
        ax.set_ylabel("fraction of requests")
        ax.set_ylim(0, 1.02)
    written.append(finish(fig, axes, PLOTS[0]))

    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    for i, (name, g) in enumerate(series.items()):
        pts = [(r.e2e_ms, r.ttft_ms) for r in g if r.answered and r.e2e_ms is not None and r.ttft_ms is not None]
        if pts:
            ax.scatter(*zip(*pts), s=12, alpha=0.7, color=f"C{i}", label=name)
    ax.set_xlabel("e2e latency (ms)")
    ax.set_ylabel("TTFT (ms)")
    written.append(finish(fig, [ax], PLOTS[1]))

    fig, ax = plt.subplots(figsize=(8, 4.8))
    for i, (name, g) in enumerate(series.items()):
        pts = [(since(r), r.tokens_per_s) for r in g if r.answered and r.tokens_per_s is not None]
        if pts:
            ax.plot(*zip(*pts), marker="o", markersize=3, linewidth=0.8, color=f"C{i}", label=name)
    ax.set_xlabel("time since the log's first completion (s)")
    ax.set_ylabel("tokens/s of the request")
    ax.set_ylim(bottom=0)
    written.append(finish(fig, [ax], PLOTS[2]))

    fig, ax = plt.subplots(figsize=(8, 4.8))
    ordered = sorted(rows, key=lambda r: r.time)
    for key, label, color in (("rss_mib", "RSS", "C0"), ("device_mem_mib", "device memory", "C3")):
        pts = [(since(r), getattr(r, key)) for r in ordered if getattr(r, key) is not None]
        if pts:
            ax.plot(*zip(*pts), marker=".", markersize=4, linewidth=1, color=color, label=label)
    ax.set_xlabel("time since the log's first completion (s)")
    ax.set_ylabel("MiB")
    ax.set_ylim(bottom=0)
    written.append(finish(fig, [ax], PLOTS[3]))
    return written
