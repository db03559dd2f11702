"""The CPU backend: runs a :class:`~fastattn._validate.Plan` on the compiled C++ kernel
(``backend="cpu"``, and ``"auto"`` for arrays on the host)."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from .. import _core
from .._gradients import sinks_gradient, sum_to
from .._validate import Plan, is_bfloat16, on_device, prepare


def _unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to length 1 (norms taken in float64); zero rows stay zero."""
    return _unit_rows_and_norms(x)[0]


def _unit_rows_and_norms(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(unit rows, norms (..., 1)), norms in float64 and 1 for a zero row (which stays zero)."""
    norm = np.sqrt(np.einsum("...e,...e->...", x, x, dtype=np.float64))[..., None]
    norm = np.where(norm == 0, 1, norm)
    return (x / norm).astype(x.dtype, copy=False), norm


def _problem(plan: Plan, q: np.ndarray, k: np.ndarray, v: np.ndarray, *, sinks: bool = True,
             **arrays: Any) -> _core.Problem:
    """The kernel's problem: the plan's options on these q, k and v (as stored: the kernel reads
    16-bit storage as it needs) and the other arrays (out, weights, lse; the backward pass's
    dout, dq, dk and dv). ``sinks=False``: without the plan's sinks (the backward pass's lse
    already holds them)."""
    lo, hi = plan.band_within(_core.NO_BOUND)
    return _core.Problem(
        q=q, k=k, v=v, mask=plan.mask, band_lo=lo, band_hi=hi, offset=plan.offset,
        scale=plan.scale, softcap=plan.softcap or 0.0, alibi=plan.alibi,
        kv_lengths=plan.kv_lengths, sinks=plan.sinks if sinks else None, kv_group=plan.kv_group,
        num_threads=plan.num_threads or 0, **arrays)


def _grouped_queries(plan: Plan) -> Plan | None:
    """Under grouped-query attention, the same problem with the query heads that share a kv head
    as rows of one batch entry (``(..., Hkv, group * L, E)``), where nothing tells those rows
    apart: no mask, ALiBi, sink or per-head kv_lengths, and a band that hides no key from any
    row. Each kv head's K and V are then read once for all its query heads, not once per head:
    a decode step (L = 1) of a model with 4 query heads per kv head read them 4 times."""
    g, batch = plan.kv_group, plan.batch
    if (g == 1 or plan.return_weights or plan.mask is not None or plan.alibi is not None
            or plan.sinks is not None or plan.q.shape[:-2] != batch or 0 in batch
            or plan.L == 0):
        return None
    lengths = plan.kv_lengths
    if lengths is not None and lengths.ndim == len(batch) and lengths.shape[-1] != 1:
        return None
    lo, hi = plan.band()
    if (lo is not None and lo > -(plan.L - 1)) or (hi is not None and hi < plan.S - 1):
        return None
    grouped = batch[:-1] + (batch[-1] // g,)
    return dataclasses.replace(
        plan, q=plan.q.reshape(grouped + (g * plan.L, plan.E)), batch=grouped, L=g * plan.L,
        kv_group=1, causal=False, window=(None, None), offset=0)


def run(plan: Plan) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """(output, weights or None, lse or None) for a prepared plan: output and weights in the
    plan's output dtype, lse in its compute dtype (float32 for 16-bit inputs: a 16-bit lse is too
    coarse to rebuild the weights from or to merge partial results exactly)."""
    grouped = _grouped_queries(plan)
    if grouped is not None:
        out, _, lse = run(grouped)
        return (out.reshape(plan.batch + (plan.L, plan.Ev)), None,
                None if lse is None else lse.reshape(plan.batch + (plan.L,)))
    L, S, Ev = plan.L, plan.S, plan.Ev
    out = np.empty(plan.batch + (L, Ev), plan.dtype)
    weights = np.empty(plan.batch + (L, S), plan.dtype) if plan.return_weights else None
    lse = np.empty(plan.batch + (L,), plan.dtype) if plan.return_lse else None
    q, k, v = plan.q, plan.k, plan.v
    if plan.similarity == "cosine":  # normalized in the compute dtype: no 16-bit storage left
        q, k = _unit_rows(q.astype(plan.dtype)), _unit_rows(k.astype(plan.dtype))
        v = v.astype(plan.dtype, copy=False)
    problem = _problem(plan, q, k, v, out=out, weights=weights, lse=lse)
    if _core.attention(problem) & _core.OUTPUT_NONFINITE:
        exponents = overflow_exponents(plan, v)
        if exponents is not None:  # again with v scaled down, then the output scaled back up
            v = scaled_down(plan, v, exponents, v.dtype)
            _core.attention(_problem(plan, q, k, v, out=out, weights=weights, lse=lse))
            scale_up(out, exponents)
    if plan.out_dtype != plan.dtype:
        out = out.astype(plan.out_dtype)
        weights = None if weights is None else weights.astype(plan.out_dtype)
    return out, weights, lse


def overflow_exponents(plan: Plan, v: np.ndarray) -> np.ndarray | None:
    """Per value column, the power of two e to divide v by so that the kernel's accumulator, a
    sum of at most S weights of at most 1 times the column's values, stays below a quarter of
    the compute dtype's largest value; None when no column needs it (the output was not finite
    for another reason: an inf or a NaN in the inputs, whose result the reference shares).

    Dividing by a power of two is exact (but for values that become subnormal, 2**-e below the
    column's largest, which no finite weight can make matter), and so is the multiplication of
    the output that undoes it, which overflows only where the normalized result itself exceeds
    the dtype's range, as the reference's does. Only calls whose output was not finite pay for
    this pass over v.
    """
    if plan.S == 0 or v.size == 0:
        return None
    amax = np.max(np.abs(v), axis=tuple(range(v.ndim - 1))).astype(np.float64)
    headroom = float(np.log2(np.finfo(plan.dtype).max / 4))
    with np.errstate(divide="ignore", invalid="ignore"):
        need = np.log2(float(plan.S)) + np.log2(amax) - headroom
    exponents = np.where(np.isfinite(need) & (need > 0), np.ceil(need), 0).astype(np.int32)
    return exponents if exponents.any() else None


def scaled_down(plan: Plan, v: np.ndarray, exponents: np.ndarray, dtype) -> np.ndarray:
    """A copy of v in ``dtype`` with each column divided by 2**exponents (exact)."""
    scaled = v.astype(plan.dtype) * np.ldexp(np.ones((), plan.dtype), -exponents)
    return scaled.astype(dtype, copy=False)


def scale_up(out: np.ndarray, exponents: np.ndarray) -> None:
    """Undoes scaled_down on an output, in place: inf where the mean exceeds the range."""
    with np.errstate(over="ignore"):
        np.ldexp(out, exponents, out=out)


def run_backward(plan: Plan, out: np.ndarray, lse: np.ndarray, dout: np.ndarray,
                 dtypes: tuple[np.dtype, ...], recompute_lse: bool = True
                 ) -> tuple[np.ndarray, ...]:
    """(dq, dk, dv), and dsinks when the plan has sinks, for the upstream gradient ``dout``,
    given the forward's ``out`` and ``lse`` (lse in the compute dtype; out and dout in it or in
    q's 16-bit storage), in ``dtypes`` (q's, k's, v's and the sinks'). ``recompute_lse=False``:
    the lse of 16-bit inputs was given in float32 and is used as it is."""
    grouped = _grouped_queries(plan)
    if grouped is not None:  # as the forward runs it: dK and dV summed over the group in place
        rows = grouped.batch + (grouped.L,)
        dq, *rest = run_backward(grouped, out.reshape(rows + (plan.Ev,)), lse.reshape(rows),
                                 dout.reshape(rows + (plan.Ev,)), dtypes, recompute_lse)
        return (dq.reshape(plan.q.shape), *rest)
    q, k, v = plan.q, plan.k, plan.v  # as stored
    if plan.similarity == "cosine":  # the kernel's gradients are those of the unit rows
        (q, q_norm), (k, k_norm) = (_unit_rows_and_norms(a.astype(plan.dtype, copy=False))
                                    for a in (q, k))
        v = v.astype(plan.dtype, copy=False)
    if plan.out_dtype != plan.dtype and recompute_lse:
        # A 16-bit lse is too coarse to recompute the weights from (bfloat16 rounds an lse of 8
        # by up to 0.016, every weight of the row by 1.6%): lse again, in float32, by the
        # forward kernel on the inputs as stored with no value column (Ev = 0: scores and
        # softmax only, half a forward). The 16-bit out serves D = rowsum(dO * O), whose
        # rounding is that of the gradients returned.
        scores_only = dataclasses.replace(
            plan, q=q, k=k, v=v[..., :0], Ev=0, similarity="dot", return_lse=True,
            return_weights=False, out_dtype=plan.dtype)
        fresh = run(scores_only)[2]
        assert fresh is not None  # return_lse
        lse = fresh
    # The kernel reads q, k, v, out and dout as stored when all five are stored alike (16-bit
    # storage too: bfloat16 as pairs where the CPU has them, else widened), and writes the
    # gradients as bfloat16 where that is their dtype and nothing is summed after it (no
    # broadcast, no GQA), else in the compute dtype.
    if not q.dtype == k.dtype == v.dtype == out.dtype == dout.dtype:
        q, k, v, out, dout = (a.astype(plan.dtype, copy=False) for a in (q, k, v, out, dout))
    shapes = ((plan.L, plan.E), (plan.S, plan.E), (plan.S, plan.Ev))
    direct = is_bfloat16(q.dtype) and all(
        a.shape == plan.batch + s and d == q.dtype for a, s, d in zip((q, k, v), shapes, dtypes))
    grads = [np.zeros(plan.batch + s, q.dtype if direct else plan.dtype) for s in shapes]
    _core.attention_backward(_problem(plan, q, k, v, sinks=False, out=out, lse=lse, dout=dout,
                                      dq=grads[0], dk=grads[1], dv=grads[2]))
    dq, dk, dv = grads
    dq = sum_to(dq, q.shape, 1)
    dk, dv = sum_to(dk, k.shape, plan.kv_group), sum_to(dv, v.shape, plan.kv_group)
    if plan.similarity == "cosine":  # through x / |x|: remove the part along the unit row
        dq = (dq - q * np.einsum("...e,...e->...", q, dq)[..., None]) / q_norm
        dk = (dk - k * np.einsum("...e,...e->...", k, dk)[..., None]) / k_norm
    grads = [dq, dk, dv]
    if plan.sinks is not None:  # from the lse used above: recomputed in float32 for 16 bits
        grads.append(sinks_gradient(plan, out, lse, dout))
    return tuple(g.astype(d, copy=False) for g, d in zip(grads, dtypes))


class CpuBackend:
    """The compiled C++ kernel on NumPy arrays: every option, forward and backward."""

    name = "cpu"

    def claims(self, arrays: tuple) -> bool:
        return not any(on_device(a) for a in arrays)

    def plan(self, q, k, v, **options) -> Plan:
        return prepare(q, k, v, **options)

    def supports(self, plan: Plan) -> str | None:
        if plan.device:
            return ("the CPU backend takes NumPy arrays; device arrays run on backend='cuda' "
                    "(or 'auto')")
        return None

    def forward(self, plan: Plan) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        return run(plan)

    def backward(self, plan: Plan, out: np.ndarray, lse: np.ndarray, dout: np.ndarray,
                 dtypes: tuple[np.dtype, ...], recompute_lse: bool) -> tuple[np.ndarray, ...]:
        return run_backward(plan, out, lse, dout, dtypes, recompute_lse)


BACKEND = CpuBackend()
