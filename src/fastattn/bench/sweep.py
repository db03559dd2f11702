"""``python -m fastattn bench --plot``: time against sequence length, log-log, for fastattn and
every peer present."""

from __future__ import annotations

import math

from .cases import Case
from .forward import run_case
from .peers import ADAPTERS, peers
from .timing import DEFAULT_THREADS

PLOT_LENGTHS = (256, 512, 1024, 2048, 4096)


def sweep(lengths=PLOT_LENGTHS, rounds: int = 3, calls: int = 2,
          threads: int = DEFAULT_THREADS) -> dict[str, list[float]]:
    """Seconds per call of (1, 8, L, L, 64) for each L, per implementation present."""
    names = ["fastattn"] + [p for p in peers() if not ADAPTERS[p].missing()]
    times: dict[str, list[float]] = {n: [] for n in names}
    for n in lengths:
        case = Case(f"L{n}", 1, 8, n, n, 64)
        row = run_case(case, rounds, calls, threads, None)
        for name in names:
            times[name].append(row.times.get(name, math.nan))
    return times


def plot(path: str, lengths=PLOT_LENGTHS, threads: int = DEFAULT_THREADS,
         rounds: int = 3) -> None:
    """Log-log plot of time against L = S for (1, 8, L, L, 64), saved to `path`."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    times = sweep(lengths, rounds=rounds, threads=threads)
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for name, ts in times.items():
        ax.loglog(lengths, [t * 1e3 for t in ts], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [str(n) for n in lengths])
    ax.set_xlabel("sequence length L = S")
    ax.set_ylabel("time per call (ms)")
    ax.set_title(f"attention (1, 8, L, L, 64) float32, {threads} threads")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
