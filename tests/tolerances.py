"""The one tolerance table of the test suite, and ``assert_close_to_reference``.

A backend's result is compared with the formula evaluated in a wider dtype ("exact"). The error
allowed is a multiple of the error a plain NumPy evaluation of the same formula in the compute
dtype ("baseline") makes against that exact result, plus a floor:

    max |out - exact|  <=  FACTOR * max |baseline - exact|
                           + eps * max|v| * (FLOOR_EPS * (1 + |s|) + SUM_EPS * sqrt(S)
                                             + DOT_EPS * |s| * sqrt(E))

where ``|s|`` bounds the terms of a logit (``|scale| |q|.|k| + |mask| + |bias|``) of a key with
a non-negligible weight and S the number of keys. float16 and bfloat16 results (computed in
float32) also get one ulp of their dtype at the output's magnitude; their lse is float32 and
held to float32's rule.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from fastattn import reference
from fastattn._validate import prepare
from layouts import assert_unchanged, copies

# Whether longdouble is wider than float64 (x86 Linux: 80-bit). Where it is not (e.g. macOS arm64)
# the float64 baseline has no truth to be measured against, and only the floor applies.
_LONGDOUBLE_WIDER = np.finfo(np.longdouble).eps < np.finfo(np.float64).eps


@dataclass(frozen=True)
class Rule:
    baseline: type  # dtype of the plain NumPy evaluation whose error sets the scale
    exact: type  # dtype of the evaluation taken as the truth
    factor: float  # allowed multiple of the baseline's error
    floor_eps: float  # floor, in eps of the compute dtype times max|v| * (1 + largest logit)
    sum_eps: float  # floor, in eps times max|v| * sqrt(S): the error of the kernel's running sums
    dot_eps: float  # floor, in eps times max|v| * |s| * sqrt(E): the error of its dot products


TOLERANCES = {
    # 3x: the kernel blocks its sums and uses its own exp2 where NumPy sums pairwise/BLAS and uses
    # libm's exp, so its rounding differs from (not exceeds by much) the plain evaluation's.
    # Floor 4 eps: with tiny sizes the baseline may be exact by luck; and the kernel rounds each
    # weight's exponent once more (exp(s - m) as exp2((s - m) * log2 e)), a relative error
    # ~|s - m| eps per weight, bounded here by the logit's terms.
    # sqrt(S): its running sums over S keys err like a random walk, ~0.5 sqrt(S) eps measured,
    # which a baseline can dodge by luck (e.g. all values equal gives an exact NumPy result);
    # sqrt(E): so do its dot products over E features (relative to |s|), which a baseline on
    # small integers computes exactly.
    np.dtype(np.float32): Rule(np.float32, np.float64, factor=3.0, floor_eps=4.0, sum_eps=1.0,
                                 dot_eps=1.0),
    # Same reasoning one precision up; the truth is longdouble (64-bit mantissa on x86).
    np.dtype(np.float64): Rule(np.float64, np.longdouble if _LONGDOUBLE_WIDER else np.float64,
                               factor=3.0, floor_eps=4.0 if _LONGDOUBLE_WIDER else 64.0,
                               sum_eps=1.0, dot_eps=1.0),
}
# float16 / bfloat16 output: computed in float32 (rule above), then rounded once (<= 1 ulp), at
# the magnitude of the output's terms (sum_j p_j |v_j|, not |out|, which cancellation can make
# small): the bfloat16 tiles round the weights p_j to bfloat16 for their products, as
# FlashAttention does, an error of at most half an ulp of that magnitude.
# The bfloat16 tiles round each weight and then the output: up to ~1.5 ulps when the terms
# share a sign (1.07 measured by the fuzzer), hence 2.
HALF_EXTRA_ULPS = 2.0
# Mantissa bits and smallest normal exponent of the 16-bit floats, for their ulp.
HALF_FORMATS = {"float16": (10, -14), "bfloat16": (7, -126)}


def half_ulp(x, dtype) -> np.ndarray:
    """One ulp of the 16-bit float ``dtype`` at the magnitude of ``x`` (float64)."""
    nmant, minexp = HALF_FORMATS[np.dtype(dtype).name]
    x = np.abs(np.asarray(x, np.float64))
    with np.errstate(divide="ignore"):
        e = np.floor(np.log2(np.where(x > 0, x, 1.0)))
    return np.exp2(np.maximum(e, minexp) - nmant)
# Attention weights of a row sum to 1 up to one rounding per term (the division) and the sum.
ROW_SUM_EPS_PER_KEY = 2.0
# The reference against a loop-by-loop float64 reading of the formula (math.fsum): both round
# only a few times per entry, so ~1e-15 apart; 1e-12 leaves margin for exp of logits ~10.
ORACLE_RTOL = 1e-12


def rule_for(compute_dtype) -> Rule:
    return TOLERANCES[np.dtype(compute_dtype)]


def _max_abs(a) -> float:
    a = np.asarray(a, dtype=np.float64)
    finite = a[np.isfinite(a)]
    return float(np.abs(finite).max(initial=0.0))


def _logit_magnitude(plan, exact_weights, eps) -> float:
    """Largest magnitude of the terms of a logit, ``|scale| |q|.|k| + |mask| + |ALiBi bias|``,
    among keys whose exact weight exceeds eps: the logits' rounding error scales with it (with
    cancellation in q.k it is far larger than the logit itself)."""
    def mag(a):
        return None if a is None or a.dtype == np.bool_ else np.abs(a)

    alibi = None if plan.alibi is None else -np.abs(plan.alibi)
    absolute = dataclasses.replace(plan, q=np.abs(plan.q), k=np.abs(plan.k), mask=(
        plan.mask if plan.mask is not None and plan.mask.dtype == np.bool_ else mag(plan.mask)),
        alibi=alibi, scale=abs(plan.scale), softcap=None)
    s = np.broadcast_to(reference.logits_in(np.float64, absolute), exact_weights.shape)
    keep = (np.asarray(exact_weights, np.float64) > eps) & np.isfinite(s)
    return float(np.abs(s[keep]).max(initial=0.0))


def _compare(name, got, want, exact, baseline, rule, eps, floor, out_dtype, context,
             magnitude=None):
    assert isinstance(got, np.ndarray), f"{name}: expected an ndarray, got {type(got).__name__}"
    assert got.shape == want.shape, f"{name}: shape {got.shape}, the reference gives {want.shape}"
    assert got.dtype == want.dtype, f"{name}: dtype {got.dtype}, the reference gives {want.dtype}"
    # Non-finite results exactly where the reference has them (NaN and inf propagate alike).
    for what, test in (("NaN", np.isnan), ("+inf", np.isposinf), ("-inf", np.isneginf)):
        bad = test(got) != test(want)
        assert not bad.any(), (
            f"{name}: {what} positions differ from the reference at {np.argwhere(bad)[:5].tolist()}"
            f" ({context})"
        )
    finite = np.isfinite(want)
    exact = np.asarray(exact)[finite]
    ok = np.isfinite(np.asarray(baseline)[finite]) & np.isfinite(exact)
    base_err = _max_abs(np.asarray(baseline)[finite][ok] - exact[ok])
    tol = rule.factor * base_err + floor
    tol_each = np.full(exact.shape, tol)
    if np.dtype(out_dtype).name in HALF_FORMATS:
        scale = np.abs(exact) if magnitude is None else np.maximum(np.abs(exact), magnitude)
        tol_each = tol_each + HALF_EXTRA_ULPS * half_ulp(scale, out_dtype)
    err = np.abs(got[finite].astype(np.longdouble) - exact).astype(np.float64)
    if err.size and np.any(err > tol_each):
        i = int(np.argmax(err - tol_each))
        where = np.argwhere(finite)[i].tolist()
        raise AssertionError(
            f"{name}: max error {err.max():.3e} exceeds the tolerance at {where}: got "
            f"{float(got[finite][i])!r}, exact {float(exact[i])!r}, allowed {tol_each[i]:.3e} "
            f"(baseline error {base_err:.3e}, {context})"
        )


def assert_close_to_reference(fn_out, q, k, v, **kwargs) -> None:
    """Checks a backend's result of ``attention(q, k, v, **kwargs)`` against the reference.

    Shape, dtype and the positions of NaN/inf must match ``fastattn.reference.attention``; finite
    values must be within the tolerance table's rule. With ``return_weights`` / ``return_lse``
    ``fn_out`` is ``(out, weights?, lse?)`` and each is checked.
    """
    with np.errstate(all="ignore"):
        plan = prepare(q, k, v, **kwargs)
        want = reference.attention(q, k, v, **kwargs)
        rule = rule_for(plan.dtype)
        exact_out, exact_w, exact_lse = reference.attention_in(rule.exact, plan)
        base_out, base_w, base_lse = reference.attention_in(rule.baseline, plan)
        eps = float(np.finfo(plan.dtype).eps)
        logits = _logit_magnitude(plan, exact_w, eps)
        if plan.sinks is not None:  # the sink is rounded like a logit where it joins the sum
            logits = max(logits, _max_abs(plan.sinks))
    context = (f"batch {plan.batch}, L={plan.L}, S={plan.S}, E={plan.E}, Ev={plan.Ev}, "
               f"compute {plan.dtype}, largest logit {logits:.3g}")
    n_out = 1 + plan.return_weights + plan.return_lse
    if n_out > 1:
        assert isinstance(fn_out, tuple) and len(fn_out) == n_out, f"expected {n_out} outputs"
        got, want = list(fn_out), list(want)
    else:
        got, want = [fn_out], [want]
    out, want_out = got.pop(0), want.pop(0)
    floor = eps * (rule.floor_eps * (1 + logits) + rule.sum_eps * np.sqrt(plan.S)
                   + rule.dot_eps * logits * np.sqrt(plan.E))
    terms = None
    if np.dtype(plan.out_dtype).name in HALF_FORMATS:  # sum_j p_j |v_j|: the terms' magnitude
        with np.errstate(all="ignore"):
            terms = reference.attention_in(np.float64, dataclasses.replace(
                plan, v=np.abs(plan.v.astype(np.float64))))[0][np.isfinite(want_out)]
    _compare("out", out, want_out, exact_out, base_out, rule, eps, _max_abs(plan.v) * floor,
             plan.out_dtype, context, terms)
    if plan.return_weights:  # weights are at most 1
        _compare("weights", got.pop(0), want.pop(0), exact_w, base_w, rule, eps, floor,
                 plan.out_dtype, context)
    if plan.return_lse:  # the same floor without max|v|: the logits' error, then the log's
        # In the compute dtype for every input dtype (float32 for 16-bit inputs): no 16-bit
        # rounding allowed.
        _compare("lse", got.pop(0), want.pop(0), exact_lse, base_lse, rule, eps, floor,
                 plan.dtype, context)


def check(backend, q, k, v, **kwargs):
    """Runs the backend, checks its inputs are untouched and its result against the reference."""
    saved = copies(q, k, v, kwargs.get("mask"))
    got = backend(q, k, v, **kwargs)
    assert_unchanged([q, k, v, kwargs.get("mask")], saved)
    assert_close_to_reference(got, q, k, v, **kwargs)
    return got
# The name of earlier versions of this file.
FLOAT16_EXTRA_ULPS = HALF_EXTRA_ULPS
