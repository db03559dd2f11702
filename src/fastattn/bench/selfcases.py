"""fastattn against itself: the speed its variants owe their arguments (no peer has them all).

Each :class:`SelfCase` times a fastattn call (a window, 16-bit inputs) against a baseline
fastattn call, interleaved round by round, after the forward table.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from .._api import attention
from .cases import numpy_dtype
from .timing import aligned, best_of, calibrate


@dataclass(frozen=True)
class SelfCase:
    """A fastattn call timed against a baseline fastattn call, interleaved; target is the
    minimum median ratio baseline time / variant time."""

    name: str
    shape: tuple  # (B, H, L, S, E)
    variant: str  # what is measured
    baseline: str  # what it is compared with
    target: float
    memory_bound: bool = False
    causal: bool = False  # both calls

    def calls(self, threads: int) -> tuple[Callable[[], Any], Callable[[], Any], int, int]:
        """(variant call, baseline call, bytes of K/V each reads) with inputs made up front.

        The variant is a window (name "window-...") or the float32 inputs in the 16-bit dtype
        named by `variant`."""
        B, H, L, S, E = self.shape
        rng = np.random.default_rng(0)
        q, k, v = (rng.standard_normal((B, H, n, E), dtype=np.float32) for n in (L, S, S))
        plain = (q, k, v)
        kw = dict(num_threads=threads, causal=self.causal)
        if self.name.startswith("window"):
            return (lambda: attention(*plain, window=(255, 0), **kw),
                    lambda: attention(*plain, **kw), 0, 0)
        lowp = tuple(a.astype(numpy_dtype(self.variant)) for a in plain)
        return (lambda: attention(*lowp, **kw), lambda: attention(*plain, **kw),
                k.nbytes, k.nbytes // 2)


SELF_CASES: tuple[SelfCase, ...] = (
    SelfCase("window-8k", (1, 8, 8192, 8192, 64), "window=(255, 0)", "full attention", 10.0),
    # Without AMX, bfloat16 owes 1.3x float32 (its pairs do twice the multiply-adds per
    # instruction); on Intel its tiles widen to float32 (csrc/cpu_features.cpp): no target.
    SelfCase("bfloat16-4k", (1, 8, 4096, 4096, 64), "bfloat16", "float32", 1.3),
    SelfCase("bfloat16-causal-4k", (1, 8, 4096, 4096, 64), "bfloat16", "float32", 1.3,
             causal=True),
    SelfCase("bfloat16-batch-1k", (4, 8, 1024, 1024, 64), "bfloat16", "float32", 1.3),
    SelfCase("float16-decode", (16, 32, 1, 8192, 128), "float16", "float32", 1.0,
             memory_bound=True),
)
SELF_CASES_BY_NAME = {c.name: c for c in SELF_CASES}


def run_self_case(case: SelfCase, rounds: int, calls: int, threads: int) -> dict:
    """Times a SelfCase; returns its row as a dict (times, ratio, pass, K/V GB/s)."""
    row: dict[str, Any] = dict(case=case.name, shape=str(case.shape), variant=case.variant,
                               baseline=case.baseline, target=case.target)
    try:
        variant, baseline, kv32, kv16 = case.calls(threads)
    except ImportError as exc:
        row["status"] = f"absent: {exc}"
        return row
    samplings = [calibrate(f, calls)[1] for f in (variant, baseline)]
    tv: list[float] = []
    tb: list[float] = []
    for r in range(rounds):
        pair = [(variant, samplings[0], tv), (baseline, samplings[1], tb)]
        for fn, sampling, out in (pair if r % 2 == 0 else pair[::-1]):
            out.append(best_of(fn, *sampling))
    ratios = [b / v for v, b in zip(tv, tb)]
    row.update(status="ok", variant_s=statistics.median(tv), baseline_s=statistics.median(tb),
               ratio=statistics.median(ratios))
    row["passed"] = row["ratio"] >= case.target
    if case.memory_bound:
        row["variant_kv_gbs"] = 2 * kv16 / row["variant_s"] / 1e9
        row["baseline_kv_gbs"] = 2 * kv32 / row["baseline_s"] / 1e9
    return row


def format_self_table(rows: list[dict]) -> str:
    head = ["case", "shape", "variant", "time", "baseline", "time", "ratio", "target", "pass",
            "K/V GB/s"]
    cells = [head]
    for r in rows:
        if r.get("status") != "ok":
            cells.append([r["case"], r["shape"], r["variant"], r.get("status", "-"),
                          r["baseline"], "-", "-", f">={r['target']:g}", "-", "-"])
            continue
        bw = "-"
        if "variant_kv_gbs" in r:
            bw = f"{r['variant_kv_gbs']:.1f} vs {r['baseline_kv_gbs']:.1f}"
        cells.append([r["case"], r["shape"], r["variant"], f"{r['variant_s'] * 1e3:.1f} ms",
                      r["baseline"], f"{r['baseline_s'] * 1e3:.1f} ms", f"{r['ratio']:.2f}",
                      f">={r['target']:g}", "PASS" if r["passed"] else "FAIL", bw])
    return aligned(cells)
