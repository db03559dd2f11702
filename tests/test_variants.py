"""The peers' variants of attention: alignment, sliding windows, ALiBi, softcapping, the
log-sum-exp, kv_lengths and cosine similarity, each against the reference and against an
independent formulation of the same thing."""

from __future__ import annotations

import numpy as np
import pytest

from layouts import qkv, values
from tolerances import assert_close_to_reference, check

pytestmark = pytest.mark.native  # the sanitizer build runs these (.ci/sanitize.sh)

SHAPES = [(1, 1), (7, 7), (3, 17), (17, 3), (100, 257), (257, 100), (2, 2000), (4, 700)]


def band(L, S, offset, left=None, right=None, causal=False):
    """The bool mask of keys query i sees, written out: the independent formulation."""
    d = np.arange(S)[None, :] - np.arange(L)[:, None] - offset
    keep = np.ones((L, S), bool)
    if left is not None:
        keep &= d >= -left
    if right is not None:
        keep &= d <= right
    if causal:
        keep &= d <= 0
    return keep


# --- alignment ----------------------------------------------------------------------------


@pytest.mark.parametrize("L,S", SHAPES)
def test_causal_bottom_right(backend, rng, L, S):
    q, k, v = qkv(rng, (2,), L, S, 16, 8)
    out = check(backend, q, k, v, causal=True, align="bottom_right", num_threads=2)
    assert_close_to_reference(out, q, k, v, mask=band(L, S, S - L, causal=True))
    # The last query sees every key.
    assert_close_to_reference(out[:, -1:], q[:, -1:], k, v)


def test_decode_step_bottom_right_is_full_attention(backend, rng):
    # One new query against a KV cache: bottom-right causal hides nothing; top-left hides all
    # keys but the first.
    q, k, v = qkv(rng, (2, 3), 1, 500, 32, 16)
    out = check(backend, q, k, v, causal=True, align="bottom_right")
    assert_close_to_reference(out, q, k, v)
    top = check(backend, q, k, v, causal=True)
    assert_close_to_reference(top, q, k[..., :1, :], v[..., :1, :])


# --- sliding windows ----------------------------------------------------------------------


@pytest.mark.parametrize("L,S", SHAPES)
@pytest.mark.parametrize("window", [(0, 0), (3, None), (None, 2), (5, 5), (64, 0), (200, 130)])
@pytest.mark.parametrize("align", ["top_left", "bottom_right"])
def test_window(backend, rng, L, S, window, align):
    q, k, v = qkv(rng, (2,), L, S, 8, 4)
    offset = S - L if align == "bottom_right" else 0
    out = check(backend, q, k, v, window=window, align=align, num_threads=2)
    assert_close_to_reference(out, q, k, v, mask=band(L, S, offset, *window))


@pytest.mark.parametrize("L,S", [(300, 300), (70, 1500), (3, 900)])
def test_window_with_causal_mask_gqa_weights(backend, rng, L, S):
    q = values(rng, (2, 4, L, 16), np.float32)
    k, v = values(rng, (2, 2, S, 16), np.float32), values(rng, (2, 2, S, 8), np.float32)
    m = rng.random((2, 1, L, S)) < 0.8
    out, w = check(backend, q, k, v, window=(40, 7), causal=True, mask=m, enable_gqa=True,
                   return_weights=True)
    keep = band(L, S, 0, 40, 7, causal=True) & m
    assert np.all(w[np.broadcast_to(~keep, w.shape)] == 0)


def test_window_skips_work(backend, rng):
    # A window of 8 over 4096 keys reads a few blocks per query tile: the keys outside it may
    # hold anything (NaN included) without changing the result.
    q, k, v = qkv(rng, (1,), 4096, 4096, 16, 8)
    out = check(backend, q, k, v, window=(8, 0))
    k2, v2 = k.copy(), v.copy()
    k2[:, :-300], v2[:, :-300] = np.nan, np.nan
    np.testing.assert_array_equal(backend(q[:, -200:], k2, v2, window=(8, 0), align="bottom_right"),
                                  out[:, -200:])


# --- ALiBi --------------------------------------------------------------------------------


@pytest.mark.parametrize("L,S", SHAPES)
@pytest.mark.parametrize("slopes_shape", [(3,), (2, 3), (2, 1), (1,)])
def test_alibi(backend, rng, L, S, slopes_shape):
    q, k, v = qkv(rng, (2, 3), L, S, 8, 4)
    slopes = rng.random(slopes_shape) * 0.5
    for align, offset in (("top_left", 0), ("bottom_right", S - L)):
        out = check(backend, q, k, v, alibi_slopes=slopes, align=align, causal=True)
        # ALiBi is an additive mask of -slope * |i + offset - j|.
        dist = np.abs(np.arange(S)[None, :] - np.arange(L)[:, None] - offset)
        bias = -np.broadcast_to(slopes, (2, 3))[..., None, None] * dist
        assert_close_to_reference(out, q, k, v, mask=bias, causal=True, align=align)


def test_alibi_slopes_errors(backend, rng):
    q, k, v = qkv(rng, (2, 3), 4, 5, 8, 4)
    with pytest.raises(ValueError, match=r"\(4,\)"):
        backend(q, k, v, alibi_slopes=np.ones(4))
    with pytest.raises(TypeError, match="complex"):
        backend(q, k, v, alibi_slopes=np.ones(3, complex))


# --- attention sinks ----------------------------------------------------------------------


@pytest.mark.parametrize("L,S", [(1, 1), (3, 17), (100, 257), (2, 2000)])
@pytest.mark.parametrize("sinks_shape", [(3,), (2, 3), (1,)])
def test_sinks(backend, rng, L, S, sinks_shape):
    q, k, v = qkv(rng, (2, 3), L, S, 16, 8)
    sinks = rng.standard_normal(sinks_shape) * 4
    sinks.flat[0] = 30.0  # far above every score: weights near 0, exp2 must not overflow
    out, lse = check(backend, q, k, v, sinks=sinks, causal=True, align="bottom_right",
                     return_lse=True)
    # A sink is one more key whose logit is the sink and whose value is 0.
    keep = band(L, S, S - L, causal=True)
    bias = np.broadcast_to(np.where(keep, 0.0, -np.inf), (2, 3, L, S))
    sink_col = np.broadcast_to(np.broadcast_to(sinks, (2, 3))[..., None, None], (2, 3, L, 1))
    k1 = np.concatenate([k, np.zeros((2, 3, 1, 16), k.dtype)], -2)
    v1 = np.concatenate([v, np.zeros((2, 3, 1, 8), v.dtype)], -2)
    assert_close_to_reference((out, lse), q, k1, v1, mask=np.concatenate([bias, sink_col], -1),
                               return_lse=True)


def test_sinks_row_with_no_key(backend, rng):
    q, k, v = qkv(rng, (2, 3), 3, 40, 8, 4)
    sinks = np.array([0.5, -1.0, 2.0])
    out, lse = check(backend, q, k, v, sinks=sinks, kv_lengths=[0, 40], return_lse=True)
    assert np.all(out[0] == 0)
    np.testing.assert_array_equal(lse[0], np.broadcast_to(sinks[:, None], (3, 3)).astype(lse.dtype))


def test_sinks_errors(backend, rng):
    q, k, v = qkv(rng, (2, 3), 4, 5, 8, 4)
    with pytest.raises(ValueError, match=r"sinks of shape \(4,\)"):
        backend(q, k, v, sinks=np.ones(4))
    with pytest.raises(TypeError, match="complex"):
        backend(q, k, v, sinks=np.ones(3, complex))


# --- softcap ------------------------------------------------------------------------------


@pytest.mark.parametrize("cap", [0.5, 5.0, 30.0, 1e4])
@pytest.mark.parametrize("L,S", [(5, 9), (100, 257), (2, 1000)])
def test_softcap(backend, rng, cap, L, S):
    q, k, v = qkv(rng, (2,), L, S, 16, 8)
    q *= 4
    out = check(backend, q, k, v, softcap=cap, causal=True, return_weights=L > 4)
    # Applied to the scaled scores, before the mask: q k^T s -> c tanh(q k^T s / c).
    s = q.astype(np.float64) @ k.astype(np.float64).swapaxes(-1, -2) / 4
    capped = cap * np.tanh(s / cap)
    fake_q = np.concatenate([np.ones(s.shape[:-1] + (1,)), capped], -1)  # logits as a product
    eye = np.broadcast_to(np.eye(S), (2, S, S))
    fake_k = np.concatenate([np.zeros(s.shape[:-2] + (S, 1)), eye], -1)
    want = np.asarray(out[0] if isinstance(out, tuple) else out)
    assert_close_to_reference(want, fake_q.astype(np.float32), fake_k.astype(np.float32), v,
                              scale=1.0, causal=True)


def test_softcap_bounds_logits(backend, rng):
    # Huge logits capped at 2: weights stay within e^-4 of each other.
    q, k, v = qkv(rng, (), 3, 50, 8, 4)
    out, w = check(backend, q * 1e3, k, v, softcap=2.0, return_weights=True)
    assert np.all(w.max(-1) / w.min(-1) <= np.exp(4) * 1.001)


def test_softcap_tanh_accuracy(backend):
    # Scores across the switch of the tanh approximation (|x| = 0.625 c) and far beyond.
    x = np.concatenate([np.linspace(-3, 3, 601), [-50, -20, 1e-6, 20, 50]])
    q = x[:, None].astype(np.float64)
    k = np.ones((1, 1))
    v = np.ones((1, 1))
    _, lse = backend(q, k, v, softcap=1.0, scale=1.0, return_lse=True)
    np.testing.assert_allclose(lse, np.tanh(x), rtol=4e-16, atol=4e-16)
    _, lse32 = backend(q.astype(np.float32), k.astype(np.float32), v.astype(np.float32),
                       softcap=1.0, scale=1.0, return_lse=True)
    np.testing.assert_allclose(lse32, np.tanh(x), rtol=2e-7, atol=2e-7)


def test_softcap_errors(backend, rng):
    q, k, v = qkv(rng, (), 3, 5, 8, 4)
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="softcap"):
            backend(q, k, v, softcap=bad)
    with pytest.raises(TypeError, match="softcap"):
        backend(q, k, v, softcap="2")


# --- log-sum-exp --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
@pytest.mark.parametrize("L,S", [(1, 1), (3, 3000), (70, 130), (5, 0)])
def test_return_lse(backend, rng, dtype, L, S):
    q, k, v = qkv(rng, (2, 2), L, S, 16, 8, dtype)
    m = rng.random((L, S)) < 0.8
    if L and S:
        m[0] = False  # a row with no key: lse -inf
    out, w, lse = check(backend, q, k, v, mask=m, causal=True, return_weights=True,
                        return_lse=True)
    out2, lse2 = check(backend, q, k, v, mask=m, causal=True, return_lse=True)
    # lse in the compute dtype: float32 for float16 inputs (out keeps float16)
    assert lse.shape == (2, 2, L) and lse.dtype == (np.float32 if dtype == np.float16 else dtype)
    assert out.dtype == w.dtype == dtype
    assert np.all(np.isneginf(lse[..., ~(m & np.tri(L, S, dtype=bool)).any(-1)]))
    # Without weights few queries take the row kernel: the same result up to rounding.
    np.testing.assert_allclose(out, out2, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(lse, lse2, rtol=1e-5, atol=1e-6)


def test_lse_merges_halves(backend, rng):
    # The log-sum-exp of two key halves gives the full attention: what merging relies on.
    q, k, v = qkv(rng, (2,), 9, 40, 8, 4, np.float64)
    o1, l1 = backend(q, k[:, :25], v[:, :25], return_lse=True)
    o2, l2 = backend(q, k[:, 25:], v[:, 25:], return_lse=True)
    full, lf = backend(q, k, v, return_lse=True)
    np.testing.assert_allclose(np.logaddexp(l1, l2), lf, rtol=1e-13)
    w1, w2 = np.exp(l1 - lf)[..., None], np.exp(l2 - lf)[..., None]
    np.testing.assert_allclose(o1 * w1 + o2 * w2, full, rtol=1e-12, atol=1e-14)


# --- kv_lengths ---------------------------------------------------------------------------


@pytest.mark.parametrize("L,S", [(9, 13), (100, 300), (2, 3000)])
def test_kv_lengths(backend, rng, L, S):
    q, k, v = qkv(rng, (3, 2), L, S, 16, 8)
    lengths = np.array([S, S // 2, 0])
    out, w = check(backend, q, k, v, kv_lengths=lengths, return_weights=True)
    mask = (np.arange(S) < lengths[:, None])[:, None, None, :]
    assert_close_to_reference(out, q, k, v, mask=mask)
    assert np.all(out[2] == 0) and np.all(w[1, ..., S // 2:] == 0)
    # With causal, a window and bottom-right alignment too.
    for kw in (dict(causal=True), dict(window=(5, 5), align="bottom_right")):
        out = check(backend, q, k, v, kv_lengths=lengths, **kw)
        assert_close_to_reference(out, q, k, v, mask=mask, **kw)


def test_kv_lengths_forms_and_errors(backend, rng):
    q, k, v = qkv(rng, (3, 2), 4, 10, 8, 4)
    full = check(backend, q, k, v, kv_lengths=np.array([[3, 4], [5, 6], [7, 8]]))
    assert_close_to_reference(full[1, 0], q[1, 0], k[1, 0, :5], v[1, 0, :5])
    check(backend, q, k, v, kv_lengths=np.int64(4))
    check(backend, q, k, v, kv_lengths=[[2], [3], [10]])
    with pytest.raises(ValueError, match=r"\[0, S=10\]"):
        backend(q, k, v, kv_lengths=[1, 11, 2])
    with pytest.raises(ValueError, match=r"\(2,\)"):
        backend(q, k, v, kv_lengths=[1, 2])
    with pytest.raises(TypeError, match="float"):
        backend(q, k, v, kv_lengths=[1.0, 2.0, 3.0])


# --- cosine similarity --------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cosine_similarity(backend, rng, dtype):
    q, k, v = qkv(rng, (2,), 20, 30, 16, 8, dtype)
    q[0, 3] = 0  # a zero query: cosine 0 with every key, uniform weights
    out = check(backend, q, k, v, similarity="cosine")
    unit = lambda x: x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-300)  # noqa: E731
    assert_close_to_reference(out, unit(q.astype(np.float64)).astype(dtype),
                              unit(k.astype(np.float64)).astype(dtype), v, scale=1 / 4)
    # Scale invariance of rows: cosine ignores lengths.
    np.testing.assert_allclose(backend(q * 7, k * 0.1, v, similarity="cosine"), out,
                               rtol=1e-5 if dtype == np.float32 else 1e-12, atol=1e-6)


# --- argument errors ----------------------------------------------------------------------


def test_variant_argument_errors(backend, rng):
    q, k, v = qkv(rng, (), 3, 5, 8, 4)
    with pytest.raises(ValueError, match="align"):
        backend(q, k, v, align="center")
    with pytest.raises(ValueError, match="similarity"):
        backend(q, k, v, similarity="euclid")
    with pytest.raises(ValueError, match="window left"):
        backend(q, k, v, window=(-1, 2))
    with pytest.raises(TypeError, match="window"):
        backend(q, k, v, window=3)
    with pytest.raises(TypeError, match="window right"):
        backend(q, k, v, window=(1, 2.5))


def test_everything_at_once(backend, rng):
    q = values(rng, (2, 4, 70, 24), np.float32)
    k, v = values(rng, (2, 2, 150, 24), np.float32), values(rng, (2, 2, 150, 12), np.float32)
    kw = dict(mask=rng.standard_normal((70, 150)).astype(np.float32), causal=True,
              align="bottom_right", window=(60, 3), alibi_slopes=np.linspace(0.1, 0.4, 4),
              softcap=8.0, kv_lengths=[150, 100], enable_gqa=True, similarity="cosine",
              return_weights=True, return_lse=True, scale=3.0)
    check(backend, q, k, v, **kw)
    check(backend, q[:, :, :3], k, v, **{**kw, "mask": kw["mask"][:3], "return_weights": False})


@pytest.mark.parametrize("L", [3, 70])
def test_hidden_keys_ignore_their_additive_mask(backend, rng, L):
    # A key outside the band is gone whatever the float mask adds to it, +inf included: the band
    # is applied after the mask (found by the fuzzer: -inf + inf made NaN rows).
    q, k, v = qkv(rng, (2,), L, 9, 8, 4)
    m = np.zeros((L, 9), np.float32)
    m[:, 5:] = np.inf
    out = check(backend, q, k, v, mask=m, causal=True)
    assert np.isfinite(out[:, :5]).all()  # rows 0-4 see only finite logits
    check(backend, q, k, v, mask=m, window=(1, 1), alibi_slopes=np.ones(1))


def test_nan_row_weights_are_nan_everywhere(backend):
    # A NaN logit makes its whole row NaN, keys past kv_lengths included (0 / NaN), as the
    # reference has it (found by the differential fuzzer).
    q, k = np.zeros((1, 0), np.float32), np.zeros((6, 0), np.float32)
    v = np.ones((6, 5), np.float32)
    out, w = check(backend, q, k, v, mask=np.array([np.nan], np.float32), kv_lengths=5,
                   return_weights=True)
    assert np.isnan(w).all() and np.isnan(out).all()


def test_zero_query_heads_with_variants(backend):
    q, k = np.zeros((0, 1, 0), np.float32), np.zeros((2, 0, 0), np.float32)
    out = check(backend, q, k, k, enable_gqa=True, alibi_slopes=np.ones(1), kv_lengths=0)
    assert out.shape == (0, 1, 0)
