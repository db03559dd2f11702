"""float16 and bfloat16 inputs: computed in float32, returned in the input dtype, read natively
by the decode kernel (half the bytes of K and V)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import fastattn
from fastattn import reference
from fastattn._validate import prepare
from layouts import LAYOUTS, in_layout, qkv
from test_properties import problems
from tolerances import assert_close_to_reference, check

pytestmark = pytest.mark.native  # the sanitizer build runs these (.ci/sanitize.sh)

ml_dtypes = pytest.importorskip("ml_dtypes", reason="bfloat16 tests need ml_dtypes")
HALVES = [np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16)]


@given(p=problems(max_len=200), data=st.data())
def test_bfloat16_matches_reference(backend, p, data):
    # Every option and layout with q, k and v all in bfloat16, which the AVX512-BF16 tiles read
    # as pairs (v packed by fastattn.backends.cpu): a Fortran-ordered v once came out wrong there.
    q, k, v = (in_layout(a.astype(HALVES[1]), data.draw(st.sampled_from(LAYOUTS), label=name))
               for a, name in zip((p.q, p.k, p.v), "qkv"))
    check(backend, q, k, v, **p.kwargs)


@pytest.mark.parametrize("dtype", HALVES, ids=str)
@pytest.mark.parametrize("L,S", [(1, 1), (1, 3000), (3, 700), (4, 50), (5, 300), (64, 200)])
def test_half_inputs(backend, rng, dtype, L, S):
    q, k, v = (a.astype(dtype) for a in qkv(rng, (2, 3), L, S, 40, 24, np.float32))
    out = check(backend, q, k, v)
    assert out.dtype == dtype
    check(backend, q, k, v, causal=True, align="bottom_right", return_lse=True)
    check(backend, q, k, v, mask=rng.random((L, S)) < 0.7, kv_lengths=[S, S // 2])


def assert_lse_float32(lse, q, k, v, **kwargs) -> None:
    """``lse`` of 16-bit inputs is float32 and as accurate as float32 makes it: far closer to the
    float64 truth than the 16-bit rounding of that truth, which it must not carry."""
    dtype = np.result_type(q, k, v)
    assert lse.dtype == np.float32, f"lse of {dtype} inputs came back as {lse.dtype}"
    plan = prepare(q, k, v, **kwargs)
    exact = reference.attention_in(np.float64, plan)[2]
    finite = np.isfinite(exact)
    assert finite.any()
    np.testing.assert_array_equal(np.isfinite(lse), finite)
    err = np.abs(lse[finite].astype(np.float64) - exact[finite]).max()
    rounding = np.abs(exact[finite].astype(dtype).astype(np.float64) - exact[finite]).max()
    # lse of 2..10 here: a bfloat16 rounds it by up to 0.03, a float16 by up to 0.004; float32
    # and the kernel's sums err by ~1e-6.
    assert rounding > 1e-3, rounding  # the draw does show the 16-bit rounding
    assert err < rounding / 100, (err, rounding)


@pytest.mark.parametrize("dtype", HALVES, ids=str)
@pytest.mark.parametrize("kwargs", [
    dict(), dict(causal=True, return_weights=True), dict(mask="bool", kv_lengths=[40, 25]),
    dict(enable_gqa=True), dict(sinks=[0.5, 3.0, -1.0], window=(9, 2)),
], ids=str)
def test_half_lse_is_float32(backend, rng, dtype, kwargs):
    """return_lse of float16 and bfloat16 inputs gives a float32 lse (the compute dtype, as
    FlashAttention, xformers and flex_attention return it), out and weights in the inputs'
    dtype; the row kernel, the weights path, masks, GQA's grouped rows and sinks alike."""
    H = 3
    if kwargs.get("enable_gqa"):
        H = 1  # three query heads per kv head: the grouped-query path
    q, k, v = qkv(rng, (2, 3), 7, 40, 16, 8, np.float32)
    k, v = k[:, :H], v[:, :H]
    q = (q * 3).astype(dtype)  # logits of a few units: lse of 2..10
    k, v = k.astype(dtype), v.astype(dtype)
    if kwargs.get("mask") == "bool":
        kwargs = dict(kwargs, mask=rng.random((7, 40)) < 0.7)
    kwargs = dict(kwargs, return_lse=True)
    got = check(backend, q, k, v, **kwargs)
    out, lse = got[0], got[-1]
    assert out.dtype == dtype
    if kwargs.get("return_weights"):
        assert got[1].dtype == dtype
    assert_lse_float32(lse, q, k, v, **kwargs)


def test_reference_half_lse_is_float32(rng):
    # The oracle returns what the backends return: lse in the compute dtype.
    for dtype in HALVES:
        q, k, v = (a.astype(dtype) for a in qkv(rng, (2, 3), 7, 40, 16, 8, np.float32))
        q = (q.astype(np.float32) * 3).astype(dtype)
        out, w, lse = reference.attention(q, k, v, return_weights=True, return_lse=True)
        assert out.dtype == w.dtype == dtype
        assert_lse_float32(lse, q, k, v)
        # Mixed 16-bit formats compute in float32 and return float32 throughout.
        got = reference.attention(q, k.astype(HALVES[dtype == HALVES[0]]), v, return_lse=True)
        assert [a.dtype for a in got] == [np.float32] * 2


@pytest.mark.parametrize("dtype", HALVES, ids=str)
@pytest.mark.parametrize("layout", ["F", "T", "step", "neg", "bcast_batch", "bcast_rows"])
def test_half_layouts_in_the_decode_kernel(backend, rng, dtype, layout):
    # Widened on load whatever the strides: in place, strided gathers, broadcast heads.
    q, k, v = (in_layout(a.astype(dtype), layout) for a in qkv(rng, (2, 3), 2, 600, 33, 17))
    check(backend, q, k, v, num_threads=2)


@pytest.mark.parametrize("dtype", HALVES, ids=str)
def test_half_special_values(backend, dtype):
    # inf, NaN, the largest finite value and subnormals survive the widening.
    info = ml_dtypes.finfo(dtype) if dtype.name == "bfloat16" else np.finfo(dtype)
    k = np.zeros((1, 6, 4), dtype)
    v = np.array([0, 1, float(info.max), float(info.smallest_subnormal), np.inf, np.nan],
                 np.float32)[None, :, None].repeat(4, -1).astype(dtype)
    q = np.zeros((1, 1, 4), dtype)
    mask = np.eye(6, dtype=bool)[None, :, None, :]  # one key each: the value itself comes back
    q = np.broadcast_to(q, (6, 1, 4))
    out = backend(q, k, v, mask=mask[0])
    want = fastattn.reference.attention(q, k, v, mask=mask[0])
    np.testing.assert_array_equal(out.astype(np.float32), want.astype(np.float32))


@pytest.mark.parametrize("dtype", HALVES, ids=str)
def test_mixed_halves_compute_in_float32(backend, rng, dtype):
    q, k, v = qkv(rng, (2,), 3, 20, 8, 4)
    other = HALVES[1] if dtype == HALVES[0] else HALVES[0]
    out = check(backend, q.astype(dtype), k.astype(other), v.astype(dtype))
    assert out.dtype == np.float32  # neither 16-bit float holds the other
    assert check(backend, q.astype(dtype), k, v).dtype == np.float32
    assert check(backend, q.astype(dtype), k.astype(np.int8), v.astype(dtype)).dtype == dtype


def test_bfloat16_mask(backend, rng):
    q, k, v = qkv(rng, (2,), 3, 20, 8, 4)
    m = rng.standard_normal((3, 20)).astype(ml_dtypes.bfloat16)
    out = check(backend, q, k, v, mask=m)
    assert_close_to_reference(out, q, k, v, mask=m.astype(np.float32))


@pytest.mark.skipif("avx512bf16" not in fastattn.available_isas(),
                    reason="this CPU (or build) has no AVX512-BF16 path")
@pytest.mark.parametrize("L", [5, 300])
def test_bfloat16_tiles_run_natively(rng, L):
    # The AVX512-BF16 tiles multiply bfloat16 pairs (weights rounded to bfloat16), the other
    # paths widen the inputs to float32 first: both within tolerance, and not the same bits,
    # which shows the native path ran rather than a silent widening.
    bf16 = np.dtype(ml_dtypes.bfloat16)
    q, k, v = (a.astype(bf16) for a in qkv(rng, (2, 3), L, 257, 33, 24, np.float32))
    # A path without bfloat16 tiles: avx512, or where a test build leaves it out, the next.
    widening = next(i for i in ("avx512", "avx2", "baseline") if i in fastattn.available_isas())
    results = {}
    for isa in ("avx512bf16", widening):
        fastattn.set_isa(isa)
        try:
            results[isa] = fastattn.attention(q, k, v, return_weights=L > 100)
            if isa == widening:
                want = fastattn.attention(*(a.astype(np.float32) for a in (q, k, v)))
        finally:
            fastattn.set_isa("")
        assert_close_to_reference(results[isa], q, k, v, return_weights=L > 100)
    native, widened = (np.asarray(results[i][0] if L > 100 else results[i]) for i in results)
    assert not np.array_equal(native.astype(np.float32), widened.astype(np.float32))
    np.testing.assert_array_equal(widened.astype(np.float32),
                                  want.astype(bf16).astype(np.float32))


@pytest.mark.skipif("amx" not in fastattn.available_isas(),
                    reason="this CPU (or build) has no AMX path: an AMX CPU, or a test build with "
                           "FASTATTN_AMX_EMULATE (.ci/amx_emulated.sh)")
@pytest.mark.parametrize("shape", [(2, 3, 70, 257, 33, 24), (1, 2, 64, 64, 64, 64),
                                   (2, 1, 130, 300, 80, 100), (1, 1, 5, 31, 128, 7)],
                         ids=lambda s: "x".join(map(str, s)))
def test_amx_tiles(rng, shape):
    # k padded to 32 features, v transposed and padded, the last rows of K from a zero-padded
    # copy: every layout edge of the AMX products, with the options that touch the score block.
    # Not the bits of the widened float32 path: the AMX tiles ran.
    B, H, L, S, E, Ev = shape
    bf16 = np.dtype(ml_dtypes.bfloat16)
    q, k, v = (a.astype(bf16) for a in qkv(rng, (B, H), L, S, E, Ev, np.float32))
    fastattn.set_isa("amx")
    try:
        assert fastattn._core.bfloat16_tiles() == "amx"
        out = fastattn.attention(q, k, v)
        assert_close_to_reference(out, q, k, v)
        for kwargs in (dict(causal=True, return_lse=True), dict(return_weights=True),
                       dict(mask=rng.random((L, S)) < 0.7, kv_lengths=[S // 2] * B),
                       dict(softcap=3.0, alibi_slopes=rng.random(H), window=(40, 3))):
            assert_close_to_reference(fastattn.attention(q, k, v, **kwargs), q, k, v, **kwargs)
        gqa = fastattn.attention(np.concatenate([q, q], axis=1), k, v, enable_gqa=True)
        assert_close_to_reference(gqa, np.concatenate([q, q], axis=1), k, v, enable_gqa=True)
    finally:
        fastattn.set_isa("")
    widened = fastattn.attention(*(a.astype(np.float32) for a in (q, k, v))).astype(bf16)
    assert not np.array_equal(out.astype(np.float32), widened.astype(np.float32))


@pytest.mark.parametrize("dtype", HALVES, ids=str)
def test_half_alibi_slopes(backend, rng, dtype):
    # Slopes take the 16-bit dtypes the inputs take, with the same meaning as their float32 values.
    q, k, v = qkv(rng, (2, 3), 5, 40, 8, 4)
    slopes = (rng.random(3) * 0.5).astype(dtype)
    out = check(backend, q, k, v, alibi_slopes=slopes, causal=True)
    np.testing.assert_array_equal(out, backend(q, k, v, alibi_slopes=slopes.astype(np.float32),
                                               causal=True))
