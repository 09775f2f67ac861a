"""docs/performance.png: the throughput of each configuration of the throughput part, a bar for
its median and a dot for each run. matplotlib comes with `make bench-deps`; SciStream itself does
not need it.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from pathlib import Path

from .throughput import Result


def plot(results: Sequence[Result], path: Path) -> str:
    """A bar per configuration (its median) with a dot per run, as a PNG at `path`; what was done,
    in one line. Without matplotlib, no plot, said so."""
    try:
        # By name: matplotlib is no dependency of SciStream, only of its benchmark.
        matplotlib = importlib.import_module("matplotlib")
        matplotlib.use("Agg")  # no display: a file
        plt = importlib.import_module("matplotlib.pyplot")
    except ImportError:
        return f"no plot: matplotlib is not installed (make bench-deps installs it); {path} unchanged"
    shown = list(results)[::-1]  # the first configuration at the top
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(shown) + 1.2), dpi=100)
    for i, result in enumerate(shown):
        runs = [run.gbps for run in result.runs]
        ax.barh(i, result.gbps, color="#4c72b0" if result.name.startswith("SciStream") else "#aaaaaa")
        ax.plot(runs, [i] * len(runs), "k.", markersize=4)
        ax.text(
            max(result.gbps, *runs), i, f"  {result.gbps:.2f}", va="center", fontsize=8
        )  # beside every dot
    ax.set_yticks(range(len(shown)), [result.name for result in shown], fontsize=8)
    ax.set_xlabel("Gbit/s, one iperf3 stream (bar: median; dots: runs)")
    ax.set_title("Throughput per configuration, make bench", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return f"plot written to {path}"
