"""The training benchmark (``python -m fastattn bench --backward``): forward + backward.

fastattn's ``attention(..., return_lse=True)`` then ``attention_backward`` against PyTorch's
``scaled_dot_product_attention`` then ``torch.autograd.grad``, interleaved round by round in one
run, and our backward alone against our forward (FlashAttention's ratio is ~2.5: five matrix
products against two). The gradients are checked against PyTorch's after the timing.
"""

from __future__ import annotations

import statistics
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._api import attention, attention_backward
from .machine import machine_info, machine_line
from .timing import aligned, best_of, blas_threads, calibrate


@dataclass(frozen=True)
class TrainCase:
    name: str
    shape: tuple  # (B, H, L, S, E)
    dtype: str = "float32"
    causal: bool = False
    kv_heads: int | None = None  # grouped-query attention: k and v have this many heads
    target: float = 1.3  # torch time / fastattn time, forward + backward
    backward_target: float = 2.5  # our backward's time / our forward's, at most


TRAIN_CASES = (
    TrainCase("train", (4, 8, 1024, 1024, 64)),
    TrainCase("train-causal", (1, 8, 2048, 2048, 64), causal=True),
    TrainCase("train-gqa", (4, 8, 1024, 1024, 64), kv_heads=2),
    TrainCase("train-bf16", (4, 8, 1024, 1024, 64), dtype="bfloat16"),
)
# Gradients of float32 (bfloat16) against PyTorch's, relative to their largest magnitude: both
# err ~1e-6 (~1e-2 in bfloat16) from the float64 truth.
TOLERANCE = {"float32": 1e-4, "bfloat16": 5e-2}


def _inputs(case: TrainCase):
    B, H, L, S, E = case.shape
    rng = np.random.default_rng(0)
    hk = case.kv_heads or H
    q = rng.standard_normal((B, H, L, E), dtype=np.float32)
    k, v = (rng.standard_normal((B, hk, S, E), dtype=np.float32) for _ in range(2))
    dout = rng.standard_normal((B, H, L, E), dtype=np.float32)
    if case.dtype == "bfloat16":
        import ml_dtypes

        q, k, v, dout = (a.astype(ml_dtypes.bfloat16) for a in (q, k, v, dout))
    return q, k, v, dout


def _calls(case: TrainCase, threads: int):
    """(ours forward + backward, torch's, our backward alone, our forward alone)."""
    import torch
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    torch.set_num_threads(threads)
    q, k, v, dout = _inputs(case)
    opts: dict[str, Any] = dict(causal=case.causal, enable_gqa=case.kv_heads is not None,
                                num_threads=threads)

    def ours():
        out, lse = attention(q, k, v, return_lse=True, **opts)
        return attention_backward(q, k, v, out, lse, dout, **opts)

    def tensor(a):
        t = torch.from_numpy(a.astype(np.float32))
        return t.to(torch.bfloat16) if case.dtype == "bfloat16" else t

    tq, tk, tv = (tensor(a).requires_grad_() for a in (q, k, v))
    tdout = tensor(dout)

    def theirs():
        out = sdpa(tq, tk, tv, is_causal=case.causal, enable_gqa=case.kv_heads is not None)
        return torch.autograd.grad(out, (tq, tk, tv), tdout)

    out, lse = attention(q, k, v, return_lse=True, **opts)
    return (ours, theirs, lambda: attention_backward(q, k, v, out, lse, dout, **opts),
            lambda: attention(q, k, v, return_lse=True, **opts))


def run_train_case(case: TrainCase, rounds: int, calls: int, threads: int) -> dict:
    row: dict[str, Any] = dict(case=case.name, shape=str(case.shape), dtype=case.dtype)
    try:
        fns = _calls(case, threads)
    except ImportError as exc:
        row["status"] = f"absent: {exc.name}"
        return row
    samplings = [calibrate(f, calls)[1] for f in fns]
    times: list[list[float]] = [[] for _ in fns]
    for r in range(rounds):  # interleaved, the order rotating, as the forward table's
        order = list(range(len(fns)))
        order = order[r % len(order):] + order[:r % len(order)]
        for i in order:
            times[i].append(best_of(fns[i], *samplings[i]))
    ours, theirs, bwd, fwd = (statistics.median(t) for t in times)
    ratio = statistics.median(t / o for o, t in zip(times[0], times[1]))
    bwd_ratio = statistics.median(b / f for b, f in zip(times[2], times[3]))
    got, want = fns[0](), fns[1]()
    err = max(float(np.abs(g.astype(np.float32) - w.float().numpy()).max()
                    / max(float(w.float().abs().max()), 1e-30)) for g, w in zip(got, want))
    row.update(status="ok", ours=ours, theirs=theirs, ratio=ratio, backward=bwd, forward=fwd,
               backward_ratio=bwd_ratio, error=err, correct=err <= TOLERANCE[case.dtype],
               passed=ratio >= case.target and bwd_ratio <= case.backward_target,
               target=case.target, backward_target=case.backward_target)
    return row


def format_train_table(rows: list[dict]) -> str:
    head = ["case", "shape", "dtype", "fastattn fwd+bwd", "torch fwd+grad", "ratio", "target",
            "bwd", "fwd", "bwd/fwd", "target", "pass", "rel err vs torch"]
    cells = [head]
    for r in rows:
        if r.get("status") != "ok":
            cells.append([r["case"], r["shape"], r["dtype"], r.get("status", "-")]
                         + ["-"] * (len(head) - 4))
            continue
        cells.append([r["case"], r["shape"], r["dtype"], f"{r['ours'] * 1e3:.1f} ms",
                      f"{r['theirs'] * 1e3:.1f} ms", f"{r['ratio']:.2f}", f">={r['target']:g}",
                      f"{r['backward'] * 1e3:.1f} ms", f"{r['forward'] * 1e3:.1f} ms",
                      f"{r['backward_ratio']:.2f}", f"<={r['backward_target']:g}",
                      "PASS" if r["passed"] else "FAIL",
                      f"{r['error']:.1e}" + ("" if r["correct"] else " WRONG")])
    return aligned(cells)


def train_table(rounds: int, calls: int, threads: int, file=sys.stdout) -> list[dict]:
    """Runs every TrainCase and prints the machine line and the table; returns the rows."""
    print(machine_line(machine_info(threads)), file=file, flush=True)
    with blas_threads(threads):
        rows = [run_train_case(c, rounds, calls, threads) for c in TRAIN_CASES]
    print("\nforward + backward (ratio: median over rounds of torch time / fastattn time; "
          "bwd/fwd: our backward's time over our forward's):", file=file)
    print(format_train_table(rows), file=file, flush=True)
    return rows
