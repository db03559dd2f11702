"""The CPU backend: runs a :class:`~fastattn._validate.Plan` on the compiled C++ kernel
(``backend="cpu"``, and ``"auto"`` for arrays on the host)."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from .. import _core
from .._gradients import sinks_gradient, sum_to
from .._validate import Plan, is_bfloat16, on_device, prepare

# 16-bit storage codes of the compiled kernel (fastattn::Storage).
_STORAGE = {"float16": 1, "bfloat16": 2}


def _unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to length 1 (norms taken in float64); zero rows stay zero."""
    return _unit_rows_and_norms(x)[0]


def _unit_rows_and_norms(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(unit rows, norms (..., 1)), norms in float64 and 1 for a zero row (which stays zero)."""
    norm = np.sqrt(np.einsum("...e,...e->...", x, x, dtype=np.float64))[..., None]
    norm = np.where(norm == 0, 1, norm)
    return (x / norm).astype(x.dtype, copy=False), norm


def _bfloat16_pairs(q: np.ndarray, k: np.ndarray, v: np.ndarray):
    """bfloat16 bits (uint16) laid out for the kernel's bfloat16 tiles: q and k with E padded to
    even (a zero feature changes no score), k contiguous along it, and v packed in pairs of keys:
    ``vp[..., j // 2, c]`` holds keys j and j + 1 (even j; an odd S pairs the last with zero) of
    column c, low half first. Broadcast batch axes stay broadcast (only the last two are copied).
    """
    if q.shape[-1] % 2:
        q = np.concatenate([q, np.zeros(q.shape[:-1] + (1,), q.dtype)], axis=-1)
        k = np.concatenate([k, np.zeros(k.shape[:-1] + (1,), k.dtype)], axis=-1)
    if k.strides[-1] != k.itemsize:  # also after padding: concatenate keeps a Fortran layout
        k = np.ascontiguousarray(k)
    # Pairs by integer ops along whole rows: a copy through a (..., S/2, Ev, 2) transpose took
    # 3 ms of a 17 ms (4, 8, 1024, 1024, 64) call, these 0.3 ms.
    lo, hi = v[..., 0::2, :], v[..., 1::2, :]
    # (..., (S + 1) // 2, Ev), an odd last key paired with zero; C order whatever v's layout
    # (the kernel reads a pair row by row)
    vp = lo.astype(np.uint32, order="C")
    vp[..., : hi.shape[-2], :] |= hi.astype(np.uint32) << 16
    return q, k, vp


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _bfloat16_amx(q: np.ndarray, k: np.ndarray, v: np.ndarray):
    """bfloat16 bits (uint16) laid out for the kernel's AMX tiles: q and k with E padded with
    zero features to a multiple of 32 (a tile row), k contiguous along it (read in place when it
    already is), and v transposed, ``vt[..., s, c]`` a view of a ``(..., Ev32, S32)`` array
    whose rows (value columns) hold the keys contiguously, zero-padded to multiples of 32.
    Broadcast batch axes stay broadcast.
    """
    E = q.shape[-1]
    pad = _round_up(E, 32) - E
    if pad:
        q = np.concatenate([q, np.zeros(q.shape[:-1] + (pad,), q.dtype)], axis=-1)
        k = np.concatenate([k, np.zeros(k.shape[:-1] + (pad,), k.dtype)], axis=-1)
    if k.strides[-1] != k.itemsize:
        k = np.ascontiguousarray(k)
    S, Ev = v.shape[-2:]
    vt = np.zeros(v.shape[:-2] + (_round_up(Ev, 32), _round_up(S, 32)), v.dtype)
    vt[..., :Ev, :S] = np.swapaxes(v, -1, -2)
    return q, k, np.swapaxes(vt, -1, -2)


def _trailing(a: np.ndarray | None) -> np.ndarray | None:
    """A per-batch-entry array with two unit matrix axes, as the kernel's operands have."""
    return None if a is None else a.reshape(a.shape + (1, 1))


def _problem(plan: Plan, q: np.ndarray, k: np.ndarray, v: np.ndarray) -> list[Any]:
    """The kernel arguments both passes share, batch shape to kv_group (see _core.attention)."""
    mask = plan.mask
    mask_kind = 0 if mask is None else (1 if mask.dtype == np.bool_ else 2)
    return [
        plan.batch,
        plan.L,
        plan.S,
        plan.E,
        plan.Ev,
        q,
        k,
        v,
        mask_kind,
        mask,
        *plan.band_within(_core.NO_BOUND),
        plan.offset,
        plan.scale,
        plan.softcap or 0.0,
        _trailing(plan.alibi),
        _trailing(plan.kv_lengths),
        plan.kv_group,
    ]


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
    lse = np.empty(plan.batch + (L, 1), plan.dtype) if plan.return_lse else None
    q, k, v = plan.q, plan.k, plan.v
    if plan.similarity == "cosine":  # normalized in the compute dtype: no 16-bit storage left
        q, k = _unit_rows(q.astype(plan.dtype)), _unit_rows(k.astype(plan.dtype))
        v = v.astype(plan.dtype, copy=False)
    if _launch(plan, q, k, v, out, weights, lse) == _core.NONFINITE:
        exponents = overflow_exponents(plan, v)
        if exponents is not None:  # again with v scaled down, then the output scaled back up
            _launch(plan, q, k, scaled_down(plan, v, exponents, v.dtype), out, weights, lse)
            scale_up(out, exponents)
    if lse is not None:
        lse = lse[..., 0]
    if plan.out_dtype != plan.dtype:
        out = out.astype(plan.out_dtype)
        weights = None if weights is None else weights.astype(plan.out_dtype)
    return out, weights, lse


def _launch(plan: Plan, q: np.ndarray, k: np.ndarray, v: np.ndarray, out: np.ndarray,
            weights: np.ndarray | None, lse: np.ndarray | None) -> int:
    """Runs the forward kernel on q, k and v as stored (16-bit storage read as given, packed or
    widened, as the kernel asks); ``_core.RAN``, or ``_core.NONFINITE`` when an output was not
    finite before normalization."""
    args = _problem(plan, q, k, v) + [out, weights, lse, plan.num_threads or 0,
                                      _trailing(plan.sinks)]
    storage = 0
    if q.dtype == k.dtype == v.dtype != plan.dtype:
        storage = _STORAGE[v.dtype.name]
        args[5:8] = (a.view(np.uint16) for a in (q, k, v))  # bits, strides kept
    status = _core.attention(plan.dtype == np.float64, storage, *args)
    if status == _core.WIDEN:  # 16-bit storage the kernel does not read here: widen once
        args[5:8] = (a.astype(plan.dtype) for a in (q, k, v))
        status = _core.attention(plan.dtype == np.float64, 0, *args)
    elif status == _core.PAIRS:
        args[3] = plan.E + plan.E % 2
        args[5:8] = _bfloat16_pairs(args[5], args[6], args[7])
        status = _core.attention(False, 3, *args)
    elif status == _core.AMX:
        args[3] = _round_up(plan.E, 32)
        args[5:8] = _bfloat16_amx(args[5], args[6], args[7])
        status = _core.attention(False, 4, *args)
    return status


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
    grads = _bfloat16_backward(plan, q, k, v, out, lse, dout, dtypes)
    if grads is None:  # in the compute dtype
        q, k, v, out, dout = (a.astype(plan.dtype, copy=False) for a in (q, k, v, out, dout))
        grads = [np.zeros(plan.batch + shape, plan.dtype)
                 for shape in ((plan.L, plan.E), (plan.S, plan.E), (plan.S, plan.Ev))]
        args = _problem(plan, q, k, v) + [out, lse[..., None], plan.num_threads or 0, dout,
                                          *grads]
        _core.attention_backward(plan.dtype == np.float64, 0, *args)
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


def _bfloat16_backward(plan: Plan, q: np.ndarray, k: np.ndarray, v: np.ndarray, out: np.ndarray,
                       lse: np.ndarray, dout: np.ndarray, dtypes: tuple[np.dtype, ...]
                       ) -> list[np.ndarray] | None:
    """The gradients of the full batch shape by the kernel's bfloat16 backward, which reads q,
    k, v, out and dout as stored (bfloat16 pair products, float32 sums), or None where it does
    not run (other dtypes, or a CPU without AVX512-BF16 pairs). They come as bfloat16 when that
    is their dtype and nothing is summed after the kernel (no broadcast, no GQA), else float32.
    """
    if not (plan.dtype == np.float32 and is_bfloat16(q.dtype)
            and q.dtype == k.dtype == v.dtype == out.dtype == dout.dtype):
        return None
    shapes = ((plan.L, plan.E), (plan.S, plan.E), (plan.S, plan.Ev))
    direct = all(a.shape == plan.batch + s and d == q.dtype
                 for a, s, d in zip((q, k, v), shapes, dtypes))
    grads = [np.zeros(plan.batch + s, np.uint16 if direct else plan.dtype) for s in shapes]
    bits = [a.view(np.uint16) for a in (q, k, v, out, dout)]
    args = _problem(plan, *bits[:3]) + [bits[3], lse[..., None], plan.num_threads or 0, bits[4],
                                        *grads, direct]
    status = _core.attention_backward(False, _STORAGE["bfloat16"], *args)
    if status == _core.WIDEN:
        return None
    return [g.view(q.dtype) for g in grads] if direct else grads


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
