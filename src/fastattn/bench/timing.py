"""Timing: the best of a few calls, the sampling of fast calls, BLAS thread limits, and the
aligned text tables every benchmark table prints."""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from typing import Any, Callable, NamedTuple

#: Threads for every implementation unless told otherwise.
DEFAULT_THREADS = 2
#: Each timed sample lasts at least this long (tiny calls are looped and averaged).
MIN_SAMPLE_S = 0.005
#: Fast calls take the best of more samples per round, up to this much time each round.
ROUND_BUDGET_S = 0.03
MAX_SAMPLES = 20


def blas_threads(n: int):
    """A context limiting NumPy's BLAS to n threads (threadpoolctl when installed)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return nullcontext()
    return threadpool_limits(n, user_api="blas")


def best_of(fn: Callable[[], Any], calls: int, inner: int = 1) -> float:
    """Seconds per call: the best of `calls` samples, each the mean of `inner` calls."""
    best = math.inf
    for _ in range(calls):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        best = min(best, (time.perf_counter() - t0) / inner)
    return best


class Sampling(NamedTuple):
    """How one implementation is timed in a round: the best of `samples` means of `inner`."""

    samples: int
    inner: int


def calibrate(call: Callable[[], Any], calls: int) -> tuple[Any, Sampling]:
    """Runs a call twice (warm-up, then timed) -> (first result, its sampling).

    Calls shorter than MIN_SAMPLE_S are looped within a sample; fast ones take the best of
    more samples (a noisy neighbour's burst then misses some of them), within ROUND_BUDGET_S.
    """
    result = call()
    t = max(best_of(call, 1), 1e-9)
    inner = max(1, int(MIN_SAMPLE_S / t))
    samples = max(calls, min(MAX_SAMPLES, int(ROUND_BUDGET_S / (t * inner))))
    return result, Sampling(samples, inner)


def aligned(cells: list[list[str]]) -> str:
    """Rows of cells as left-aligned columns, a rule under the first (header) row."""
    widths = [max(len(line[i]) for line in cells) for i in range(len(cells[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
