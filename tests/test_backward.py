"""The backward pass: fastattn.attention_backward against the reference gradient (every option,
drawn by the property tests' strategy, on every ISA path), the reference against finite
differences and PyTorch's autograd, float32 accuracy against PyTorch's, and the argument checks.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import fastattn
from fastattn import reference
from fastattn._gradients import sum_to
from fastattn._validate import prepare_backward
from layouts import LAYOUTS, assert_unchanged, copies, in_layout
from test_properties import problems
from tolerances import HALF_EXTRA_ULPS, HALF_FORMATS, half_ulp, rule_for

pytestmark = pytest.mark.native  # the sanitizer build runs these (.ci/sanitize.sh)

# Options of the forward that the backward does not take.
_FORWARD_ONLY = ("return_weights", "return_lse")


def _options(kwargs: dict) -> dict:
    return {n: a for n, a in kwargs.items() if n not in _FORWARD_ONLY}


def _max_abs(a) -> float:
    a = np.asarray(a, np.float64)
    return float(np.abs(a[np.isfinite(a)]).max(initial=0.0))


def check_backward(q, k, v, dout_rng, **options):
    """Runs forward and backward, checks the inputs are untouched and each gradient against the
    reference: shape, dtype, NaN/inf positions, and finite values within

        3 * (error of the formula evaluated plainly in the compute dtype) + floor,

    the floor 16 eps (1 + |s|) sqrt(L + S + E + Ev) * (magnitude of the gradient's terms, see
    _term_magnitudes): the kernel's sums run over keys, queries and features in blocks, each a
    random walk of roundings, and dP - D cancels to exactly 0 in the reference where the kernel
    keeps the rounding of out (all values equal); with tiny sizes the plain evaluation may be
    exact by luck. 16-bit gradients also get the forward's extra ulps of their dtype, and one
    ulp of the terms' magnitude for D, which comes from the 16-bit out; bfloat16 one more for
    the weights P and dS, which the AVX512-BF16 kernel rounds to bfloat16 for its products."""
    with np.errstate(all="ignore"):
        out, lse = fastattn.attention(q, k, v, return_lse=True, **options)
        dout = dout_rng.standard_normal(out.shape).astype(out.dtype)
    saved = copies(q, k, v, out, lse, dout, options.get("mask"))
    got = fastattn.attention_backward(q, k, v, out, lse, dout, **options)
    assert_unchanged([q, k, v, out, lse, dout, options.get("mask")], saved)
    with np.errstate(all="ignore"):
        want = reference.attention_backward(q, k, v, out, lse, dout, **options)
        plan, _, _, d = prepare_backward(q, k, v, out, lse, dout, **options)
        rule = rule_for(plan.dtype)
        exact = reference.gradients_in(rule.exact, plan, d)
        base = reference.gradients_in(rule.baseline, plan, d)
    eps = float(np.finfo(plan.dtype).eps)
    # Each weight is recomputed from its logit s and lse as exp2((s - lse) * log2 e): a relative
    # error of ~|s - lse| eps, as in the forward (tolerances.py); the logit's terms set it.
    with np.errstate(all="ignore"):
        logits = 1 + _max_abs(reference.logits_in(np.float64, dataclasses.replace(
            plan, q=np.abs(plan.q), k=np.abs(plan.k), scale=abs(plan.scale), softcap=None,
            mask=None if plan.mask is None or plan.mask.dtype == np.bool_ else np.abs(plan.mask),
            alibi=None if plan.alibi is None else -np.abs(plan.alibi))))
    size = logits * np.sqrt(plan.L + plan.S + plan.E + plan.Ev)
    for name, g, w, x, b, m in zip(("dq", "dk", "dv"), got, want, exact, base,
                                   _term_magnitudes(plan, d)):
        assert g.shape == w.shape and g.dtype == w.dtype, (name, g.shape, g.dtype, w.shape, w.dtype)
        for what, test in (("NaN", np.isnan), ("+inf", np.isposinf), ("-inf", np.isneginf)):
            bad = test(g) != test(w)
            assert not bad.any(), f"{name}: {what} positions differ at {np.argwhere(bad)[:5]}"
        fin = np.isfinite(w) & np.isfinite(x) & np.isfinite(b)
        x = np.asarray(x, np.longdouble)
        tol = rule.factor * _max_abs(b[fin] - x[fin]) + 16 * eps * size * max(m, _max_abs(x[fin]))
        half = np.dtype(plan.out_dtype).name
        if half in HALF_FORMATS:  # D = rowsum(dO * O), O rounded: at most half an ulp of m
            tol += 2.0 ** -HALF_FORMATS[half][0] * m
        if half == "bfloat16":  # the pairs kernel rounds P and dS to bfloat16: half an ulp each
            tol += 2.0 ** -HALF_FORMATS[half][0] * m
        tol_each = np.full(fin.sum(), tol)
        if np.dtype(g.dtype).name in HALF_FORMATS:
            tol_each = tol_each + HALF_EXTRA_ULPS * half_ulp(x[fin], g.dtype)
        elif g.dtype != plan.dtype:  # float32 q with float64 k: dq rounded once to float32
            tol_each = tol_each + np.finfo(g.dtype).eps * np.abs(x[fin]).astype(np.float64)
        err = np.abs(g[fin].astype(np.longdouble) - x[fin]).astype(np.float64)
        assert not np.any(err > tol_each), (
            f"{name}: max error {err.max():.3e}, allowed {tol:.3e} (baseline "
            f"{_max_abs(b[fin] - x[fin]):.3e}, max|exact| {_max_abs(x[fin]):.3e})")
    assert len(got) == len(want) == 3 + (plan.sinks is not None)
    if plan.sinks is not None:
        _check_sinks(got[3], want[3], plan, d, eps * size)
    return got


def _check_sinks(got, want, plan, dout, rel) -> None:
    """dsinks = -sum_i p_i D_i: within rel times the magnitude of its terms,
    sum_i p_i |dO_i|.(P_i |V|) (the kernel's out and lse, in the compute dtype, give p_i and D_i;
    out's own terms, P |V|, bound its error where they cancel: an out of 1e-9 from weights times
    values of 1), plus a rounding of its own dtype."""
    assert got.shape == want.shape and got.dtype == want.dtype, (got.shape, got.dtype, want.dtype)
    with np.errstate(all="ignore"):
        unit = reference._unit_plan(np.float64, plan)
        _, _, lse = reference.attention_in(np.float64, unit)
        out = reference.attention_in(np.float64, dataclasses.replace(unit, v=np.abs(unit.v)))[0]
        sink = np.broadcast_to(plan.sinks.astype(np.float64), plan.batch)[..., None]
        p, adout = np.exp(sink - lse), np.abs(dout.astype(np.float64))
        mag = np.abs(sum_to((p * (adout * out).sum(-1)).sum(-1), plan.sinks.shape, 1))
    # The kernel's exp gives 0 below the smallest normal number: weights that small, and out's
    # share of them, are dropped (up to S tiny max|v| in each out_i).
    dropped = (p * adout.sum(-1)).sum(-1) * plan.S * np.finfo(plan.dtype).tiny * _max_abs(plan.v)
    tol = 16 * rel * (mag + 1e-300) + np.abs(sum_to(dropped, plan.sinks.shape, 1))
    if np.dtype(plan.out_dtype).name in HALF_FORMATS:  # D = rowsum(dO * O), O rounded (<= 1 ulp)
        ulps = (p * (adout * half_ulp(out, plan.out_dtype)).sum(-1)).sum(-1)
        tol = tol + np.abs(sum_to(ulps, plan.sinks.shape, 1))
    if np.dtype(got.dtype).name in HALF_FORMATS:
        tol = tol + HALF_EXTRA_ULPS * half_ulp(want, got.dtype)
    elif got.dtype != plan.dtype:
        tol = tol + np.finfo(got.dtype).eps * np.abs(want.astype(np.float64))
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    fin = np.isfinite(want)
    err = np.abs(got[fin].astype(np.float64) - want[fin].astype(np.float64))
    assert np.all(err <= tol[fin]), f"dsinks: error {err.max():.3e}, allowed {tol[fin].min():.3e}"


def _term_magnitudes(plan, dout) -> tuple[float, float, float]:
    """Bounds on the terms summed into dq, dk and dv: dS_ij = P_ij (dP_ij - D_i) is at most
    2 P_ij max|dO| max|v|; dq_i sums dS_ij k_j |scale| over keys (weights summing to 1), dk_j
    and dv_j sum over queries (column sums of P, up to L), and over the batch entries and query
    heads that share one k, v (or q) row. Cosine similarity divides by the smallest row norm."""
    with np.errstate(all="ignore"):
        weights = reference.attention_in(np.float64, plan)[1]
    col = float(np.nan_to_num(weights).sum(axis=-2).max(initial=0.0))
    entries = int(np.prod(plan.batch))
    copies_q = entries / max(int(np.prod(plan.q.shape[:-2])), 1)
    copies_kv = entries / max(int(np.prod(plan.k.shape[:-2])), 1)
    rows = np.abs(np.nan_to_num(np.asarray(dout, np.float64))).sum(axis=-1)
    ds = 2 * float(rows.max(initial=0.0)) * _max_abs(plan.v)  # |dP|, |D| <= sum_c |dO_c| max|v|
    q_mag, k_mag = _max_abs(plan.q), _max_abs(plan.k)
    q_div = k_div = 1.0
    if plan.similarity == "cosine":
        # (a zero row is divided by 1: the normalisation is the identity there)
        norms = [np.sqrt((a.astype(np.float64) ** 2).sum(-1)) for a in (plan.q, plan.k)]
        q_div, k_div = (1 / float(np.where(n == 0, 1, n).min(initial=1.0)) for n in norms)
        q_mag = k_mag = 1.0
    scale = abs(plan.scale)
    return (scale * ds * k_mag * q_div * copies_q, scale * ds * q_mag * col * k_div * copies_kv,
            _max_abs(dout) * col * copies_kv)


@given(p=problems(max_len=200))
def test_matches_reference(backend, p):
    check_backward(p.q, p.k, p.v, np.random.default_rng(p.q.size), **_options(p.kwargs))


def test_float64_equals_reference_to_1e10(rng):
    # The target: float64 gradients equal the reference to ~1e-10 relative.
    q, k, v = (rng.standard_normal((2, 3, 150, 40)) for _ in range(3))
    mask = rng.random((150, 150)) < 0.8
    options = dict(mask=mask, causal=True, softcap=10.0, alibi_slopes=np.array([0.1, 0.2, 0.3]))
    out, lse = fastattn.attention(q, k, v, return_lse=True, **options)
    dout = rng.standard_normal(out.shape)
    got = fastattn.attention_backward(q, k, v, out, lse, dout, **options)
    want = reference.attention_backward(q, k, v, out, lse, dout, **options)
    for g, w in zip(got, want):
        assert np.abs(g - w).max() <= 1e-10 * np.abs(w).max()


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("batch", [(), (1,), (2, 1)])
def test_key_chunks_and_threads(rng, threads, batch):
    # Fewer batch entries than threads splits each entry's key blocks into chunks whose partial
    # dQ are summed; S = 700 gives several key blocks on every path.
    q = rng.standard_normal(batch + (90, 24))
    k, v = (rng.standard_normal(batch + (700, 24)) for _ in range(2))
    check_backward(q, k, v, rng, num_threads=threads, causal=True, align="bottom_right")


_OPTION_CASES = {
    "plain": {},
    "causal": dict(causal=True),
    "bottom_right window": dict(window=(3, 1), align="bottom_right"),
    "bool mask": dict(mask="bool"),
    "additive mask": dict(mask="float"),
    "scale": dict(scale=0.3),
    "softcap": dict(softcap=1.5),
    "alibi": dict(alibi_slopes=np.array([0.2, 0.7])),
    "kv_lengths": dict(kv_lengths=np.array([3, 6])),
    "cosine": dict(similarity="cosine"),
    "sinks": dict(sinks=np.array([0.5, -1.0])),
    "gqa": dict(enable_gqa=True),
    "everything": dict(causal=True, mask="float", softcap=2.0, alibi_slopes=np.array([0.3, 0.1]),
                       similarity="cosine", scale=0.8, sinks=np.array([[0.2, 1.0], [-0.5, 0.0]])),
}


def _small_problem(rng, options):
    q = rng.standard_normal((2, 2, 5, 3))
    kv_heads = 1 if options.get("enable_gqa") else 2
    k = rng.standard_normal((2, kv_heads, 6, 3))
    v = rng.standard_normal((kv_heads, 6, 4))  # broadcast along the batch axis as well
    options = dict(options)
    if options.get("mask") == "bool":
        options["mask"] = rng.random((5, 6)) < 0.6
    elif options.get("mask") == "float":
        options["mask"] = rng.standard_normal((2, 1, 5, 6))
    return q, k, v, options


@pytest.mark.parametrize("name", list(_OPTION_CASES))
def test_kernel_matches_reference_per_option(rng, name):
    q, k, v, options = _small_problem(rng, _OPTION_CASES[name])
    check_backward(q, k, v, rng, **options)


@pytest.mark.parametrize("name", list(_OPTION_CASES))
def test_reference_matches_finite_differences(rng, name):
    # Central differences of sum(reference.attention * dout) with h = 1e-6: truncation ~h^2 and
    # rounding ~eps / h, 1e-9 or so; 1e-6 relative leaves room for curvature.
    q, k, v, options = _small_problem(rng, _OPTION_CASES[name])
    out, lse = reference.attention(q, k, v, return_lse=True, **options)
    dout = rng.standard_normal(out.shape)
    grads = reference.attention_backward(q, k, v, out, lse, dout, **options)
    h = 1e-6
    sinks = options.pop("sinks", None)
    assert len(grads) == 3 + (sinks is not None)
    args = [q, k, v] + ([] if sinks is None else [sinks])

    def loss(*a):
        extra = {} if sinks is None else {"sinks": a[3]}
        return (reference.attention(*a[:3], **options, **extra) * dout).sum()

    for which, g in enumerate(grads):
        numeric = np.zeros_like(args[which])
        for idx in np.ndindex(numeric.shape):
            plus, minus = ([a.copy() for a in args] for _ in range(2))
            plus[which][idx] += h
            minus[which][idx] -= h
            numeric[idx] = (loss(*plus) - loss(*minus)) / (2 * h)
        assert np.allclose(g, numeric, rtol=1e-6, atol=1e-7), (which, np.abs(g - numeric).max())


def _torch():
    return pytest.importorskip("torch", reason="PyTorch is not installed: no autograd to compare")


@pytest.mark.parametrize("name", ["plain", "causal", "bool mask", "additive mask", "scale", "gqa"])
def test_matches_torch_autograd(rng, name):
    # PyTorch's SDPA takes these options; its float64 autograd and ours agree to rounding.
    torch = _torch()
    q, k, v, options = _small_problem(rng, _OPTION_CASES[name])
    v = np.broadcast_to(v, k.shape[:-1] + (4,)).copy()  # SDPA does not broadcast batch axes
    tq, tk, tv = (torch.tensor(a, requires_grad=True) for a in (q, k, v))
    mask = options.get("mask")
    tout = torch.nn.functional.scaled_dot_product_attention(
        tq, tk, tv, attn_mask=None if mask is None else torch.tensor(mask),
        is_causal=options.get("causal", False), scale=options.get("scale"),
        enable_gqa=options.get("enable_gqa", False))
    dout = rng.standard_normal(tuple(tout.shape))
    want = torch.autograd.grad(tout, (tq, tk, tv), torch.tensor(dout))
    out, lse = fastattn.attention(q, k, v, return_lse=True, **options)
    for grads in (fastattn.attention_backward(q, k, v, out, lse, dout, **options),
                  reference.attention_backward(q, k, v, out, lse, dout, **options)):
        for g, w in zip(grads, want):
            assert np.allclose(g, w.numpy(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("shape, options", [
    ((2, 4, 256, 256, 64), {}),
    ((1, 2, 300, 200, 32), dict(causal=True, align="bottom_right")),
    ((2, 8, 128, 160, 64), dict(enable_gqa=True)),
])
def test_float32_error_within_3x_torch(rng, shape, options):
    # The target: float32 gradients no worse than 3x PyTorch's float32 autograd, both
    # measured against a float64 oracle on the same inputs.
    torch = _torch()
    B, H, L, S, E = shape
    hk = 2 if options.get("enable_gqa") else H
    q = rng.standard_normal((B, H, L, E), dtype=np.float32)
    k, v = (rng.standard_normal((B, hk, S, E), dtype=np.float32) for _ in range(2))
    tq, tk, tv = (torch.tensor(a, requires_grad=True) for a in (q, k, v))
    align = options.get("align") == "bottom_right"
    is_causal = options.get("causal", False)
    mask = None
    if is_causal and align:  # SDPA's causal is top-left: give it the bottom-right one as a mask
        mask = torch.ones(L, S, dtype=torch.bool).tril(S - L)
        is_causal = False
    tout = torch.nn.functional.scaled_dot_product_attention(
        tq, tk, tv, attn_mask=mask, is_causal=is_causal,
        enable_gqa=options.get("enable_gqa", False))
    dout = rng.standard_normal(tuple(tout.shape)).astype(np.float32)
    theirs = torch.autograd.grad(tout, (tq, tk, tv), torch.tensor(dout))
    out, lse = fastattn.attention(q, k, v, return_lse=True, **options)
    ours = fastattn.attention_backward(q, k, v, out, lse, dout, **options)
    q64, k64, v64 = (a.astype(np.float64) for a in (q, k, v))
    o64, l64 = reference.attention(q64, k64, v64, return_lse=True, **options)
    oracle = reference.attention_backward(q64, k64, v64, o64, l64, dout.astype(np.float64),
                                          **options)
    for name, o, t, x in zip("qkv", ours, theirs, oracle):
        err, torch_err = np.abs(o - x).max(), np.abs(t.numpy() - x).max()
        assert err <= 3 * torch_err, f"d{name}: ours {err:.3e}, PyTorch's {torch_err:.3e}"


@given(p=problems(max_len=200), data=st.data())
def test_bfloat16_matches_reference(backend, p, data):
    # Every option and layout with q, k and v in bfloat16: on the AVX512-BF16 path the kernel
    # reads them (and out and dout) as stored and multiplies bfloat16 pairs; elsewhere they are
    # widened to float32 first.
    bf16 = np.dtype(pytest.importorskip("ml_dtypes", reason="bfloat16 needs ml_dtypes").bfloat16)
    q, k, v = (in_layout(a.astype(bf16), data.draw(st.sampled_from(LAYOUTS), label=name))
               for a, name in zip((p.q, p.k, p.v), "qkv"))
    check_backward(q, k, v, np.random.default_rng(p.q.size), **_options(p.kwargs))


@pytest.mark.skipif("avx512bf16" not in fastattn.available_isas(),
                    reason="this CPU (or build) has no AVX512-BF16 path")
@pytest.mark.parametrize("shape, options", [
    ((2, 3, 70, 130, 40, 24), {}),
    ((1, 2, 200, 300, 33, 17), dict(causal=True, num_threads=2)),  # odd E and Ev, key chunks
    ((2, 1, 65, 129, 64, 64), dict(softcap=5.0, window=(20, 3))),
])
def test_bfloat16_pairs_run_natively(rng, shape, options):
    # The AVX512-BF16 backward multiplies bfloat16 pairs (P and dS rounded to bfloat16), the
    # avx512 path widens the inputs to float32 first: both within tolerance of the reference,
    # and not the same bits, which shows the pairs ran rather than a silent widening.
    bf16 = np.dtype(pytest.importorskip("ml_dtypes", reason="bfloat16 needs ml_dtypes").bfloat16)
    B, H, L, S, E, Ev = shape
    q = rng.standard_normal((B, H, L, E)).astype(bf16)
    k = rng.standard_normal((B, H, S, E)).astype(bf16)
    v = rng.standard_normal((B, H, S, Ev)).astype(bf16)
    # A path without bfloat16 pairs: avx512, or where a test build leaves it out, the next.
    widening = next(i for i in ("avx512", "avx2", "baseline") if i in fastattn.available_isas())
    results = {}
    for isa in ("avx512bf16", widening):
        fastattn.set_isa(isa)
        try:
            results[isa] = check_backward(q, k, v, np.random.default_rng(1), **options)
        finally:
            fastattn.set_isa("")
    for g, w in zip(results["avx512bf16"], results[widening]):
        assert g.dtype == w.dtype == bf16
        assert not np.array_equal(g.view(np.uint16), w.view(np.uint16))


@pytest.mark.parametrize("threads", [1, 2])
def test_bfloat16_gradients_rounded_as_numpy_rounds(rng, threads):
    # The kernel writes bfloat16 gradients itself where nothing is summed after it; where q
    # broadcasts (summed in float32 afterwards) NumPy rounds them. Both round to nearest even:
    # the same bits. One batch entry on two threads also sums dQ over key chunks.
    bf16 = np.dtype(pytest.importorskip("ml_dtypes", reason="bfloat16 needs ml_dtypes").bfloat16)
    q = rng.standard_normal((1, 1, 90, 24)).astype(bf16)
    k, v = (rng.standard_normal((1, 1, 700, 24)).astype(bf16) for _ in range(2))
    out, lse = fastattn.attention(q, k, v, return_lse=True, causal=True)
    dout = rng.standard_normal(out.shape).astype(bf16)
    opts = dict(causal=True, num_threads=threads)
    direct = fastattn.attention_backward(q, k, v, out, lse, dout, **opts)
    summed = fastattn.attention_backward(q[0], k, v, out, lse, dout, **opts)
    assert direct[0].shape == (1, 1, 90, 24) and summed[0].shape == (1, 90, 24)
    for g, w in zip(direct, summed):
        assert g.dtype == w.dtype == bf16
        np.testing.assert_array_equal(g.reshape(w.shape).view(np.uint16), w.view(np.uint16))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_returns_its_dtype(rng, dtype):
    dt = np.dtype(np.float16) if dtype == "float16" else np.dtype(pytest.importorskip(
        "ml_dtypes", reason="bfloat16 needs ml_dtypes").bfloat16)
    q, k, v = (rng.standard_normal((2, 2, 70, 16)).astype(dt) for _ in range(3))
    grads = check_backward(q, k, v, rng, causal=True)
    assert all(g.dtype == dt for g in grads)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("options", [dict(causal=True), dict(sinks=[0.5, -1.0]),
                                     dict(similarity="cosine", window=(5, 0))], ids=str)
def test_half_lse_rounded_by_the_caller_is_recomputed(rng, dtype, options):
    """The forward returns a float32 lse for 16-bit inputs, used as given; one rounded to 16 bits
    (too coarse to rebuild the weights from) is recomputed in float32 instead: the same
    gradients up to an ulp of their dtype, and lse of a few units, where a bfloat16 rounding
    of it would move every weight of a row by up to 1.6%."""
    dt = np.dtype(np.float16) if dtype == "float16" else np.dtype(pytest.importorskip(
        "ml_dtypes", reason="bfloat16 needs ml_dtypes").bfloat16)
    q = (rng.standard_normal((2, 2, 30, 16)) * 3).astype(dt)
    k, v = (rng.standard_normal((2, 2, 40, 16)).astype(dt) for _ in range(2))
    out, lse = fastattn.attention(q, k, v, return_lse=True, **options)
    assert out.dtype == dt and lse.dtype == np.float32
    assert np.abs(lse.astype(dt).astype(np.float32) - lse).max() > 1e-4  # the rounding shows
    dout = rng.standard_normal(out.shape).astype(dt)
    given = fastattn.attention_backward(q, k, v, out, lse, dout, **options)
    rounded = fastattn.attention_backward(q, k, v, out, lse.astype(dt), dout, **options)
    assert len(given) == len(rounded) == 3 + ("sinks" in options)
    for g, r in zip(given[:3], rounded[:3]):
        assert g.dtype == r.dtype == dt
        g, r = g.astype(np.float64), r.astype(np.float64)
        assert np.all(np.abs(g - r) <= half_ulp(np.maximum(np.abs(g), np.abs(r)), dt))
    if "sinks" in options:  # float64, from the float32 lse given or recomputed
        np.testing.assert_allclose(rounded[3], given[3], rtol=1e-4, atol=1e-6)


def test_rows_with_no_key_have_zero_gradients(rng):
    q, k, v = (rng.standard_normal((1, 2, 6, 4)) for _ in range(3))
    mask = np.ones((6, 6), bool)
    mask[2] = False  # query 2 sees no key
    mask[:, 5] = False  # key 5 takes part in no row
    out, lse = fastattn.attention(q, k, v, mask=mask, return_lse=True)
    dq, dk, dv = fastattn.attention_backward(q, k, v, out, lse, np.ones_like(out), mask=mask)
    assert np.all(dq[..., 2, :] == 0) and np.all(dk[..., 5, :] == 0) and np.all(dv[..., 5, :] == 0)
    assert np.abs(dq).sum() > 0


def test_nan_propagates_as_the_reference(rng):
    q, k, v = (rng.standard_normal((1, 5, 4)) for _ in range(3))
    q[0, 1, 2] = np.nan
    with np.errstate(all="ignore"):
        got = check_backward(q, k, v, rng)
    assert np.isnan(got[0][0, 1]).all() and np.isfinite(got[0][0, 0]).all()


@pytest.mark.parametrize("L, S, batch", [(0, 5, (2,)), (4, 0, (2,)), (4, 5, (0,))])
def test_empty(rng, L, S, batch):
    q = rng.standard_normal(batch + (L, 3))
    k, v = (rng.standard_normal(batch + (S, 3)) for _ in range(2))
    grads = check_backward(q, k, v, rng)
    assert [g.shape for g in grads] == [q.shape, k.shape, v.shape]
    assert not any(np.any(g) for g in grads)


def test_bad_arguments(rng):
    q, k, v = (rng.standard_normal((2, 5, 4)) for _ in range(3))
    out, lse = fastattn.attention(q, k, v, return_lse=True)
    with pytest.raises(ValueError, match=r"out of shape \(2, 4, 4\).*\(2, 5, 4\)"):
        fastattn.attention_backward(q, k, v, out[:, :4], lse, out)
    with pytest.raises(ValueError, match=r"lse of shape \(2, 5, 1\)"):
        fastattn.attention_backward(q, k, v, out, lse[..., None], out)
    with pytest.raises(ValueError, match=r"dout of shape \(5, 4\)"):
        fastattn.attention_backward(q, k, v, out, lse, out[0])
    with pytest.raises(TypeError, match="dout has dtype int64"):
        fastattn.attention_backward(q, k, v, out, lse, np.ones(out.shape, np.int64))
    with pytest.raises(ValueError, match=r"q \(2, 5, 4\), k \(2, 5, 3\)"):
        fastattn.attention_backward(q, k[..., :3], v, out, lse, out)
    with pytest.raises(TypeError, match="complex"):
        fastattn.attention_backward(q.astype(complex), k, v, out, lse, out)


def test_strided_out_lse_and_dout(rng):
    # out, lse and dout are read through their strides: views of larger arrays, reversed and
    # Fortran-ordered, give the gradients of their contiguous copies exactly.
    q, k, v = (rng.standard_normal((2, 3, 40, 8)) for _ in range(3))
    out, lse = fastattn.attention(q, k, v, return_lse=True, causal=True)
    dout = rng.standard_normal(out.shape)
    wide = np.zeros(out.shape[:-1] + (2 * out.shape[-1],))
    wide[..., ::2] = out
    lse_rev = lse[..., ::-1].copy()[..., ::-1]
    dout_f = np.asfortranarray(dout)
    got = fastattn.attention_backward(q, k, v, wide[..., ::2], lse_rev, dout_f, causal=True)
    want = fastattn.attention_backward(q, k, v, out, lse, dout, causal=True)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)
