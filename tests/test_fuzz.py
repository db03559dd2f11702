"""Differential fuzzing: whole random calls (fuzz_calls.py) on every backend against the reference.

The reference decides what a call must do. If it raises, the backend raises an exception of the
same type, one of the documented ones. If it returns, the backend returns results of the same
shapes and dtypes, leaves its inputs alone, gives the same bits when called again, and its values
are held to the strictest check that is fair for those inputs:

exact
    Scores cannot overflow the compute dtype and v holds no NaN, inf or entry so large that a sum
    over S keys could overflow: the tolerance table's check (tolerances.py), NaN and inf included.
    NaN and inf in q, k or the mask are exact too: IEEE arithmetic puts them in the same places
    whatever the order of evaluation.
special values
    As exact, but v holds NaN, inf or huge entries. A key of weight 0 (masked, or whose weight
    underflows) multiplies its NaN by 0 in the reference's matrix product while a kernel may skip
    it, and a weight may underflow in float32 where it does not in float64; so each output entry
    is fixed only as far as the keys that certainly take part fix it (``_judge_special``).
overflow
    Scores may overflow the compute dtype (float32 inputs of 1e30, a non-finite scale): a float32
    kernel then rightly gives inf or NaN where the float64 reference is finite. Only what holds
    for any rounding is checked (``_judge_sane``): each finite output entry lies between the
    smallest and largest value of its column, weights lie in [0, 1] and rows of them sum to 1.

CI runs ``FASTATTN_FUZZ_EXAMPLES`` examples per backend (default 800: about 40 s for the four
CPU paths on 2 cores). A longer run, 10,000 examples per backend (about 14 minutes), with the
share of each kind of call::

    FASTATTN_FUZZ_EXAMPLES=10000 python -m pytest -q -p no:cacheprovider tests/test_fuzz.py \
        --hypothesis-show-statistics
"""

from __future__ import annotations

import inspect
import math
import os

import numpy as np
import pytest
from hypothesis import event, given, settings

import fastattn
from fastattn import reference
from fastattn._validate import prepare
from fuzz_calls import ARGUMENTS, DTYPES, Call, calls, ml_dtypes
from layouts import assert_unchanged, copies, in_layout
from tolerances import HALF_EXTRA_ULPS, ROW_SUM_EPS_PER_KEY, assert_close_to_reference

pytestmark = pytest.mark.native  # the sanitizer build runs these (.ci/sanitize.sh)

EXAMPLES = int(os.environ.get("FASTATTN_FUZZ_EXAMPLES", "800"))
DOCUMENTED_ERRORS = (ValueError, TypeError)
# Arguments of fastattn.attention that the fuzzer does not draw, and why.
NOT_DRAWN = {"backend": "the backend fixture chooses it"}


def test_bfloat16_is_drawn():
    pytest.importorskip("ml_dtypes", reason="the fuzzer draws bfloat16 only with ml_dtypes")
    assert "bfloat16" in DTYPES


def test_every_argument_has_a_strategy():
    params = inspect.signature(fastattn.attention).parameters
    names = {n for n, p in params.items() if p.kind is p.KEYWORD_ONLY} - set(NOT_DRAWN)
    assert names == set(ARGUMENTS), (
        f"fuzz_calls.ARGUMENTS lacks {sorted(names - set(ARGUMENTS))}, has unknown "
        f"{sorted(set(ARGUMENTS) - names)}"
    )


@settings(max_examples=EXAMPLES)
@given(call=calls())
def test_backend_matches_reference(backend, call: Call):
    judge(backend, call)


# --- the judge ----------------------------------------------------------------------------


def _finfo(dtype):
    dtype = np.dtype(dtype)
    return ml_dtypes.finfo(dtype) if dtype.name == "bfloat16" else np.finfo(dtype)


def _wide(a: np.ndarray) -> np.ndarray:
    """``a`` in a NumPy float dtype (exactly), so that NaN compares equal to NaN in bfloat16 too."""
    return a.astype(np.float64) if a.dtype.name == "bfloat16" else a


def _arrays(call: Call) -> list:
    return [call.q, call.k, call.v, *call.kwargs.values()]


def _split(result, plan) -> tuple:
    """(out, weights or None, lse or None) from what attention returned for ``plan``."""
    wants_w, wants_lse = plan.return_weights, plan.return_lse
    parts = list(result) if wants_w or wants_lse else [result]
    out = parts.pop(0)
    weights = parts.pop(0) if wants_w else None
    lse = parts.pop(0) if wants_lse else None
    return out, weights, lse


def _max_finite(a) -> float:
    if a is None:
        return 0.0
    a = np.asarray(a, dtype=np.float64)
    return float(np.abs(a[np.isfinite(a)]).max(initial=0.0))


def _score_bound(plan) -> float:
    """A bound of the magnitudes a score reaches while the kernel computes it (inf for a
    non-finite scale or ALiBi slope): of sum_e |q_e k_e|, before and after the scale multiplies
    it (the kernel, as the textbook formula, forms q . k first), not of the final score, since
    partial sums can exceed it."""
    alibi = plan.alibi
    if not math.isfinite(plan.scale) or (alibi is not None and not np.isfinite(alibi).all()):
        return math.inf
    scale = max(abs(plan.scale), 1.0)
    if plan.similarity == "cosine":  # unit rows: |q . k| <= 1
        qk = scale
    else:
        qk = scale * max(plan.E, 1) * _max_finite(plan.q) * _max_finite(plan.k)
    mask = plan.mask if plan.mask is not None and plan.mask.dtype != np.bool_ else None
    distance = plan.L + plan.S + abs(plan.offset)
    return qk + _max_finite(mask) + _max_finite(alibi) * distance


def judge(backend, call: Call) -> None:
    saved = copies(*_arrays(call))
    try:
        with np.errstate(all="ignore"):
            want = reference.attention(call.q, call.k, call.v, **call.kwargs)
    except Exception as e:  # noqa: BLE001 - which exception is what is checked
        assert isinstance(e, DOCUMENTED_ERRORS), f"the reference raised {type(e).__name__}: {e}"
        event(f"raises {type(e).__name__}")  # --hypothesis-show-statistics counts the kinds
        try:
            backend(call.q, call.k, call.v, **call.kwargs)
        except Exception as got:  # noqa: BLE001
            assert type(got) is type(e), f"raised {type(got).__name__}({got}), the reference {e!r}"
        else:
            raise AssertionError(f"no error; the reference raises {e!r}")
        assert_unchanged(_arrays(call), saved)
        return

    with np.errstate(all="ignore"):  # warnings are not the contract; values are
        try:
            got = backend(call.q, call.k, call.v, **call.kwargs)
        except NotImplementedError as e:  # a GPU backend refuses what it lacks, by name
            assert not backend.name.startswith("cpu"), f"the CPU backend raised {e!r}"
            event("not implemented by this backend")
            return
        again = backend(call.q, call.k, call.v, **call.kwargs)
    assert_unchanged(_arrays(call), saved)
    plan = prepare(call.q, call.k, call.v, **call.kwargs)
    got, again, want = _split(got, plan), _split(again, plan), _split(want, plan)
    for name, g, a, w in zip(("out", "weights", "lse"), got, again, want):
        if w is None:
            continue
        assert isinstance(g, np.ndarray) and g.shape == w.shape and g.dtype == w.dtype, (
            f"{name}: {type(g).__name__} {getattr(g, 'shape', '')} {getattr(g, 'dtype', '')}, "
            f"the reference gives {w.shape} {w.dtype}"
        )
        np.testing.assert_array_equal(_wide(a), _wide(g), err_msg=f"{name}: a second call differs")

    _judge_sane(plan, got)
    big = float(np.finfo(plan.dtype).max) / 64  # room for the kernel's s * log2(e) and sums
    bound = _score_bound(plan)
    if not bound < big:
        event("overflow")
        return  # only the sanity checks hold
    v = plan.v.astype(np.float64)
    special = ~np.isfinite(v) | (np.abs(v) * max(plan.S, 1) >= big)
    event("special values" if special.any() else "exact")
    if special.any():
        _judge_special(backend, call, plan, got, special, bound, big)
    else:
        assert_close_to_reference(_join(got), call.q, call.k, call.v, **call.kwargs)


def _join(parts):
    present = [p for p in parts if p is not None]
    return present[0] if len(present) == 1 else tuple(present)


def _judge_sane(plan, got) -> None:
    """What holds for any rounding: outputs within their column's range, weights within [0, 1]."""
    out, weights, _ = got
    eps_out = float(_finfo(plan.out_dtype).eps)
    eps = float(np.finfo(plan.dtype).eps)
    if plan.S == 0 and out.size:  # no key at all: zeros, never NaN
        assert np.all(out == 0), "S == 0 must give zeros"
    if plan.S and plan.Ev and out.size:
        v = plan.v.astype(np.float64).reshape(-1, plan.Ev)
        finite_v = np.where(np.isfinite(v), v, np.nan)
        with np.errstate(all="ignore"):  # all-NaN columns give NaN: no finite value there
            lo = np.fmin(np.nanmin(finite_v, axis=0, initial=np.inf), 0.0)
            hi = np.fmax(np.nanmax(finite_v, axis=0, initial=-np.inf), 0.0)
        # Each output is sum(p_j v_j) / sum(p_j): within [lo, hi] up to a rounding per key.
        slack = np.maximum(-lo, hi) * (4 * eps * (plan.S + 4) + HALF_EXTRA_ULPS * eps_out)
        o = out.astype(np.float64)
        inside = ~np.isfinite(o) | ((o >= lo - slack) & (o <= hi + slack))
        assert inside.all(), (
            f"out: {o[~inside][:5]} lie outside their columns' range of v "
            f"[{lo.min():.3g}, {hi.max():.3g}] at {np.argwhere(~inside)[:5].tolist()}"
        )
    if weights is not None and weights.size:
        w = weights.astype(np.float64)
        row_tol = ROW_SUM_EPS_PER_KEY * eps * plan.S + eps_out * plan.S * (eps_out > eps)
        assert np.all((w >= 0) | np.isnan(w)) and np.all((w <= 1 + row_tol) | np.isnan(w)), (
            "weights outside [0, 1]"
        )
        rows = w.sum(-1)
        rows = rows[np.isfinite(rows)]
        ok = (rows == 0) | (np.abs(rows - 1) <= row_tol)
        if plan.sinks is not None:  # the sink takes its share of each row: sums below 1
            ok = rows <= 1 + row_tol
        assert ok.all(), f"weight rows sum to {rows[~ok][:5]}, not 1 (or 0 for a row with no key)"


def _judge_special(backend, call: Call, plan, got, special, bound, big) -> None:
    """v holds NaN, inf or huge entries (``special``); q, k and the mask are safe.

    The same call with those entries set to 0 (same layout) is held to the exact check; then
    each output entry of the original call is judged by the keys of its row and column:

    - a row with no key gives 0 (unless a masked key's v is special: the reference multiplies it
      by its weight 0, giving NaN, and so may a kernel); a row whose scores hold NaN gives NaN;
    - "sure" keys, whose weight is far above underflow even allowing for the rounding of their
      scores, must contribute: a NaN, or +inf and -inf, give NaN; +inf alone gives +inf;
    - "unsure" keys (weight 0 or tiny) may or may not: a special entry there, or a huge one
      anywhere, allows any value (still within the sanity bounds, and NaN, or inf of its sign);
    - otherwise the entry must equal that of the call without special values, bit for bit:
      its column's arithmetic is the same in both.

    Weights and log-sum-exp do not depend on v: bit for bit those of the call without them.
    """
    v0 = np.array(call.v)  # its own dtype (bfloat16 too), special entries 0
    v0[special] = 0
    v0 = in_layout(v0, call.v_layout) if isinstance(call.v, np.ndarray) else v0
    with np.errstate(all="ignore"):
        clean = backend(call.q, call.k, v0, **call.kwargs)
    assert_close_to_reference(clean, call.q, call.k, v0, **call.kwargs)
    clean = _split(clean, plan)
    for name, g, c in zip(("weights", "lse"), got[1:], clean[1:]):
        if g is not None:
            np.testing.assert_array_equal(_wide(g), _wide(c),
                                          err_msg=f"{name} depend on v's special values")

    if 0 in plan.batch:  # empty results (shapes checked above); v may hold unread heads
        return
    eps = float(np.finfo(plan.dtype).eps)
    with np.errstate(all="ignore"):
        W = np.asarray(reference.attention_in(np.float64, plan)[1], np.float64)
        v = plan.v.astype(np.float64)
        if plan.kv_group > 1:
            v = np.repeat(v, plan.kv_group, axis=-3)
        # A score's rounding error is below a few eps times the bound; a weight may move by as
        # many e-folds. Sure: above the compute dtype's smallest normal number (2^24 times, for
        # the kernel's exp2 flushing to 0 there) even after that.
        log_floor = math.log(float(np.finfo(plan.dtype).tiny) * 2**24) + 8 * eps * (bound + 1)
        sure = np.log(W) > log_floor
        unsure = ~sure & ~np.isnan(W)

        def through(keys, which):  # entry (row, column) has a key in `keys` with `which` in v
            return (keys.astype(np.float64) @ which.astype(np.float64)) > 0

        huge = np.isfinite(v) & (np.abs(v) * max(plan.S, 1) >= big)
        nan_sure = through(sure, np.isnan(v))
        pinf_sure, ninf_sure = through(sure, np.isposinf(v)), through(sure, np.isneginf(v))
        shaky = through(unsure, ~np.isfinite(v) | huge) | through(sure, huge)
        row_nan = np.isnan(W).any(-1, keepdims=True)
        empty = ~row_nan & (W == 0).all(-1, keepdims=True)
    out, clean_out = got[0].astype(np.float64), clean[0].astype(np.float64)
    shape = out.shape
    empty, row_nan = np.broadcast_to(empty, shape), np.broadcast_to(row_nan, shape)
    must_nan = row_nan | np.broadcast_to(nan_sure | (pinf_sure & ninf_sure), shape)
    pinf = np.broadcast_to(pinf_sure, shape) & ~must_nan
    ninf = np.broadcast_to(ninf_sure, shape) & ~must_nan
    shaky = np.broadcast_to(shaky, shape)
    plain = ~(empty | must_nan | pinf | ninf | shaky)
    nan = np.isnan(out)
    checks = {
        "a row with no key must give 0": ~empty | (out == 0) | shaky,
        "NaN from a key that takes part": ~must_nan | empty | nan,
        "+inf from a key that takes part": ~pinf | empty | (out == np.inf) | (shaky & nan),
        "-inf from a key that takes part": ~ninf | empty | (out == -np.inf) | (shaky & nan),
        "same as without the special values": ~plain | (out == clean_out) | (nan & np.isnan(
            clean_out)),
    }
    for what, ok in checks.items():
        assert ok.all(), (
            f"{what}: at {np.argwhere(~ok)[:5].tolist()} got {out[~ok][:5]}, without special "
            f"values {clean_out[~ok][:5]}"
        )
