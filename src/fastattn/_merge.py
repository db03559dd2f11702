"""Exact merging of attention results computed over disjoint sets of keys.

Attention over keys ``K1 ∪ K2`` is the two partial attentions weighted by their softmax mass:
``out = (e^{lse1} out1 + e^{lse2} out2) / (e^{lse1} + e^{lse2})`` and
``lse = log(e^{lse1} + e^{lse2})``. This is what sequence-parallel attention, split-KV decoding and
:mod:`fastattn.dask` use to combine work done in pieces.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np

from ._validate import is_bfloat16, native


def _check_parts(outs, lses) -> tuple[list[np.ndarray], list[np.ndarray]]:
    # In native byte order: merged (and returned) as the values they hold, in the native dtypes.
    outs, lses = [native(np.asarray(o)) for o in outs], [native(np.asarray(s)) for s in lses]
    if len(outs) != len(lses):
        raise ValueError(f"merge_attention needs one lse per output; got {len(outs)} outputs "
                         f"and {len(lses)} lses")
    if not outs:
        raise ValueError("merge_attention needs at least one partial result")
    for name, parts in (("out", outs), ("lse", lses)):
        for i, a in enumerate(parts):
            if a.dtype.kind != "f" and not is_bfloat16(a.dtype):
                raise TypeError(f"{name}[{i}] has dtype {a.dtype}; partial results must be "
                                "floating point")
    first_out, first_lse = outs[0].shape, lses[0].shape
    if outs[0].ndim < 1 or first_out[:-1] != first_lse:
        raise ValueError(f"out[0] of shape {first_out} and lse[0] of shape {first_lse} do not "
                         "fit: an output is (..., L, Ev) and its lse (..., L)")
    for i, (o, s) in enumerate(zip(outs, lses)):
        if o.shape != first_out or s.shape != first_lse:
            raise ValueError(f"partial results differ in shape: out[{i}] {o.shape}, lse[{i}] "
                             f"{s.shape}; out[0] {first_out}, lse[0] {first_lse}")
    return outs, lses


def _promote(parts: list[np.ndarray]) -> np.dtype:
    """The dtype ``parts`` promote to; float32 for float16 with bfloat16 (neither holds the
    other, float32 holds both), as ``attention`` computes such inputs."""
    try:
        return np.result_type(*(p.dtype for p in parts))
    except TypeError:
        return np.dtype(np.float32)


def merge_attention(outs: Sequence, lses: Sequence) -> tuple[np.ndarray, np.ndarray]:
    """Merges partial attention results over disjoint key sets into the result over all keys.

    Each part is what ``fastattn.attention(q, k_i, v_i, return_lse=True)`` returns for the same
    queries and one subset of the keys (a chunk of the sequence, one device's shard of a KV cache).
    The merge is exact: up to rounding it equals attention over the union of the keys, and since
    it returns its own log-sum-exp, merges compose (``merge(merge(a, b), c) == merge(a, b, c)``),
    so parts can be combined in a tree.

    Parameters
    ----------
    outs : sequence of array_like, each of shape (..., L, Ev)
        Partial outputs, all of the same shape.
    lses : sequence of array_like, each of shape (..., L)
        Their natural log-sum-exp per query row (``return_lse=True``); ``-inf`` marks a row that
        saw no key in that part, whose output then takes no part in the merge.

    Returns
    -------
    out : ndarray, shape (..., L, Ev)
        The merged output; a row no part saw any key for is 0.
    lse : ndarray, shape (..., L)
        The merged log-sum-exp, ``-inf`` for such a row. ``out`` is in the dtype the outputs
        promote to and ``lse`` in the dtype the lses promote to, so the parts of 16-bit inputs
        (16-bit outputs, float32 lses, as ``attention`` returns them) merge to the same; the
        arithmetic is done in at least float32 and in the widest dtype of all the parts
        (float16 and bfloat16 parts are merged in float32).

    Raises
    ------
    ValueError
        No parts, a different number of outputs and lses, or shapes that differ or do not fit.
    TypeError
        Inputs that are not floating point.

    Notes
    -----
    Each part is weighted by ``exp(lse_i - max_j lse_j)``, so no exponential overflows and the
    largest part has weight 1: the denominator is at least 1, whatever the scores' magnitude.

    Examples
    --------
    >>> import numpy as np
    >>> import fastattn
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((2, 5, 8)) for _ in range(3))
    >>> parts = [fastattn.attention(q, k[:, a:b], v[:, a:b], return_lse=True)
    ...          for a, b in ((0, 2), (2, 5))]
    >>> out, lse = fastattn.merge_attention([o for o, _ in parts], [s for _, s in parts])
    >>> want, want_lse = fastattn.attention(q, k, v, return_lse=True)
    >>> bool(np.allclose(out, want)), bool(np.allclose(lse, want_lse))
    (True, True)
    """
    outs, lses = _check_parts(outs, lses)
    out_dtype, lse_dtype = _promote(outs), _promote(lses)
    # 16-bit sums would lose ~3 digits; a float64 lse of a float32 out is merged in float64.
    work = np.promote_types(np.promote_types(np.float32, out_dtype), lse_dtype)
    lses = [s.astype(work) for s in lses]
    with np.errstate(invalid="ignore"):  # NaN partials (e.g. from +inf scores) propagate as NaN
        m = functools.reduce(np.maximum, lses)
        # A row no part saw: all weights must come out 0, not exp(-inf - -inf) = NaN.
        shift = np.where(m == -np.inf, 0, m)
        total = np.zeros(m.shape, work)
        acc, term = np.zeros(outs[0].shape, work), np.empty(outs[0].shape, work)
        for o, s in zip(outs, lses):  # in place: outputs can be large, and temporaries cost
            w = np.exp(s - shift)
            total += w
            w = w[..., None]
            np.multiply(o, w, out=term)
            # A part of weight 0 adds exactly nothing, even where its output is not finite.
            np.add(acc, term, out=acc, where=w != 0)
        empty = total == 0
        out = np.divide(acc, np.where(empty, 1, total)[..., None], out=acc)
        with np.errstate(divide="ignore"):
            lse = np.where(empty, -np.inf, shift + np.log(np.where(empty, 1, total)))
    return out.astype(out_dtype, copy=False), lse.astype(lse_dtype, copy=False)


def add_sinks(out: np.ndarray, lse: np.ndarray, sinks) -> tuple[np.ndarray, np.ndarray]:
    """(out, lse) over all keys, with attention sinks (one logit per batch entry, broadcast
    against ``lse``'s leading axes) joined to each row's denominator once.

    Partial results must be computed and merged without the sinks, or each part would count
    them; this is the one place they enter (fastattn.dask, after its merge tree).
    """
    sinks = np.asarray(sinks, lse.dtype)[..., None]
    total = np.logaddexp(lse, sinks)
    with np.errstate(invalid="ignore"):  # -inf - -inf: a row with no key and no sink
        share = np.where(lse == -np.inf, 0, np.exp(lse - total))
    return out * share[..., None].astype(out.dtype), total
