"""The contract, item by item: shapes, dtypes, scale, masks, causal, GQA, weights."""

from __future__ import annotations

import numpy as np
import pytest

from layouts import qkv, values
from tolerances import ROW_SUM_EPS_PER_KEY, assert_close_to_reference, check

pytestmark = pytest.mark.native  # the sanitizer build runs these (.ci/sanitize.sh)

# --- shapes -------------------------------------------------------------------------------


@pytest.mark.parametrize("qs,ks,vs,want", [
    ((5, 4), (7, 4), (7, 3), (5, 3)),  # 2-D
    ((2, 3, 5, 4), (2, 3, 7, 4), (2, 3, 7, 6), (2, 3, 5, 6)),
    ((2, 1, 5, 4), (3, 7, 4), (7, 6), (2, 3, 5, 6)),  # NumPy broadcasting of the batch axes
    ((5, 4), (2, 3, 7, 4), (1, 3, 7, 2), (2, 3, 5, 2)),  # q broadcast over k's batch
    ((1, 1, 1, 2, 5, 4), (3, 1, 7, 4), (2, 1, 1, 7, 4), (1, 2, 3, 2, 5, 4)),
])
def test_batch_axes_broadcast(backend, rng, qs, ks, vs, want):
    q, k, v = values(rng, qs, np.float32), values(rng, ks, np.float32), values(rng, vs, np.float32)
    out = check(backend, q, k, v)
    assert out.shape == want
    # Each batch entry is the 2-D attention of its broadcast operands.
    qb, kb, vb = (np.broadcast_to(a, want[:-2] + a.shape[-2:]) for a in (q, k, v))
    idx = tuple(n - 1 for n in want[:-2])
    assert_close_to_reference(out[idx], qb[idx], kb[idx], vb[idx])


def test_array_likes(backend):
    q = [[1.0, 0.0], [0.0, 1.0]]
    out = check(backend, q, q, [[1, 2], [3, 4]])
    assert isinstance(out, np.ndarray) and out.dtype == np.float64


# --- dtypes -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtypes,want", [
    ((np.float32,) * 3, np.float32),
    ((np.float64,) * 3, np.float64),
    ((np.float32, np.float64, np.float32), np.float64),
    ((np.float16,) * 3, np.float16),
    ((np.float16, np.float32, np.float16), np.float32),
    ((np.int32,) * 3, np.float64),
    ((np.int64, np.int8, np.uint16), np.float64),
    ((np.bool_,) * 3, np.float64),
    ((np.bool_, np.int16, np.int8), np.float64),
    ((np.int8, np.float32, np.float32), np.float32),  # np.result_type(int8, float32)
    ((np.int64, np.float32, np.float32), np.float64),  # np.result_type(int64, float32)
    ((np.uint8, np.float16, np.float16), np.float16),
])
def test_output_dtype(backend, rng, dtypes, want):
    q, k, v = (values(rng, s, d) for s, d in zip([(2, 9, 5), (2, 11, 5), (2, 11, 3)], dtypes))
    out, weights = check(backend, q, k, v, return_weights=True)
    assert out.dtype == want and weights.dtype == want
    assert np.result_type(*dtypes) == want or np.result_type(*dtypes).kind in "iub"


def test_float16_is_computed_in_float32(backend, rng):
    # Long sums: a float16 computation would be off by many float16 ulps; the tolerance allows
    # the float32 rule's error plus one float16 rounding.
    q, k, v = qkv(rng, (2,), 16, 3000, 64, 8, np.float16)
    out = check(backend, q, k, v)
    assert out.dtype == np.float16


# --- scale --------------------------------------------------------------------------------


def test_scale_defaults_to_inverse_sqrt_e(backend, rng):
    q, k, v = qkv(rng, (3,), 20, 30, 17, 5)
    out = check(backend, q, k, v)
    np.testing.assert_array_equal(out, backend(q, k, v, scale=1 / np.sqrt(17)))
    assert not np.allclose(out, backend(q, k, v, scale=1.0), atol=1e-4)


@pytest.mark.parametrize("scale", [0.0, -0.5, 1e-3, 3.0, np.float32(0.25), 2])
def test_explicit_scale(backend, rng, scale):
    q, k, v = qkv(rng, (2,), 10, 12, 8, 4)
    out = check(backend, q, k, v, scale=scale)
    if scale == 0:  # uniform weights: the mean of the values
        assert_close_to_reference(out, q, k, np.broadcast_to(v.mean(-2, keepdims=True), v.shape))


# --- masks --------------------------------------------------------------------------------

B, H, L, S = 2, 3, 9, 13
MASK_SHAPES = [(S,), (L, S), (1, S), (L, 1), (1, 1), (), (H, 1, 1), (B, 1, 1, S), (1, H, L, S),
               (B, H, L, S), (B, 1, L, 1), (1, 1, 1, 1)]


def _mask_layouts(m):
    yield "C", m
    if m.ndim >= 2:
        yield "transposed", np.ascontiguousarray(m.swapaxes(-1, -2)).swapaxes(-1, -2)
        yield "fortran", np.asfortranarray(m)
        yield "negative", np.ascontiguousarray(m[..., ::-1, ::-1])[..., ::-1, ::-1]
        yield "stepped", np.repeat(np.repeat(m, 2, -1), 3, -2)[..., ::3, ::2]
    if m.ndim >= 1:
        yield "broadcast view", np.broadcast_to(m[..., :1], m.shape)


@pytest.mark.parametrize("shape", MASK_SHAPES, ids=str)
@pytest.mark.parametrize("kind", ["bool", "float32", "float64", "float16"])
def test_mask_broadcast_forms(backend, rng, shape, kind):
    q, k, v = qkv(rng, (B, H), L, S, 8, 5)
    if kind == "bool":
        m = rng.random(shape) < 0.6
    else:
        m = rng.standard_normal(shape).astype(kind)
        m[rng.random(shape) < 0.3] = -np.inf
    for _, mm in _mask_layouts(np.asarray(m)):
        check(backend, q, k, v, mask=mm)
        check(backend, q[..., :3, :], k, v, mask=mm[..., :3, :] if mm.ndim >= 2 and
              mm.shape[-2] == L else mm)  # a few queries: the row kernel


def test_bool_mask_removes_keys(backend, rng):
    q, k, v = qkv(rng, (2,), 6, 40, 8, 3)
    keep = rng.random(40) < 0.5
    out = check(backend, q, k, v, mask=keep)
    assert_close_to_reference(out, q, k[:, keep], v[:, keep])
    # The same as an additive mask of 0 and -inf.
    additive = np.where(keep, 0.0, -np.inf).astype(np.float32)
    assert_close_to_reference(backend(q, k, v, mask=additive), q, k[:, keep], v[:, keep])


def test_float_mask_is_added_to_scaled_scores(backend, rng):
    q, k, v = qkv(rng, (), 5, 7, 4, 3, np.float64)
    m = rng.standard_normal((5, 7))
    out = check(backend, q, k, v, mask=m, scale=2.0)
    # 2 q k^T + m is the unscaled, unmasked score matrix of q' = [q, m], k' = [2 k, I].
    assert_close_to_reference(out, np.hstack([q, m]), np.hstack([2 * k, np.eye(7)]), v, scale=1.0)
    # scale 0 leaves the mask: log-weights give those weights.
    w = rng.random((5, 7)) + 0.1
    out = check(backend, q, k, v, mask=np.log(w), scale=0.0)
    assert_close_to_reference(out, np.log(w), np.eye(7), v, scale=1.0)
    # A constant added to every score changes nothing.
    assert_close_to_reference(backend(q, k, v, mask=np.full((5, 7), 7.5)), q, k, v)


# --- causal -------------------------------------------------------------------------------


@pytest.mark.parametrize("L,S", [(1, 1), (7, 7), (3, 17), (17, 3), (100, 257), (257, 100),
                                 (2, 2000), (4, 5000)])
def test_causal_is_top_left(backend, rng, L, S):
    q, k, v = qkv(rng, (2,), L, S, 16, 8)
    out = check(backend, q, k, v, causal=True, num_threads=2)
    assert_close_to_reference(out, q, k, v, mask=np.tri(L, S, dtype=bool))
    # Query i sees keys 0..i: changing a key j > i leaves row i alone.
    if S > L:
        v2 = v.copy()
        v2[:, L:] = 100.0
        np.testing.assert_array_equal(backend(q, k, v2, causal=True, num_threads=2), out)


@pytest.mark.parametrize("L,S", [(6, 6), (3, 11), (11, 3), (2, 3000)])
def test_causal_and_mask_both_apply(backend, rng, L, S):
    q, k, v = qkv(rng, (2,), L, S, 8, 4)
    m = rng.random((L, S)) < 0.5
    out = check(backend, q, k, v, mask=m, causal=True, num_threads=2)
    assert_close_to_reference(out, q, k, v, mask=m & np.tri(L, S, dtype=bool))
    f = np.where(m, 0.5, -np.inf)
    check(backend, q, k, v, mask=f, causal=True, num_threads=2)


# --- grouped-query attention --------------------------------------------------------------


@pytest.mark.parametrize("hq,hkv", [(6, 1), (6, 2), (6, 3), (6, 6), (4, 2), (1, 1)])
@pytest.mark.parametrize("L", [3, 40])
def test_gqa(backend, rng, hq, hkv, L):
    q, _, _ = qkv(rng, (2, hq), L, 1, 16, 1)
    _, k, v = qkv(rng, (2, hkv), 1, 50, 16, 8)
    out = check(backend, q, k, v, enable_gqa=True)
    g = hq // hkv
    assert_close_to_reference(out, q, np.repeat(k, g, axis=-3), np.repeat(v, g, axis=-3))
    # Query head h reads kv head h // g.
    for h in (0, hq // 2, hq - 1):
        assert_close_to_reference(out[1, h], q[1, h], k[1, h // g], v[1, h // g])


def test_gqa_with_broadcast_batch_mask_causal_weights(backend, rng):
    q = values(rng, (2, 6, 10, 8), np.float32)
    k, v = values(rng, (1, 2, 12, 8), np.float32), values(rng, (2, 12, 5), np.float32)
    m = rng.random((1, 6, 10, 12)) < 0.7
    check(backend, q, k, v, enable_gqa=True, mask=m, causal=True, return_weights=True)


def test_gqa_zero_query_heads(backend, rng):
    # Hq = 0 is a multiple of Hkv = 2: an empty result (as with any empty batch), or at least a
    # ValueError that names the shapes.
    q = values(rng, (0, 3, 4), np.float32)
    k = v = values(rng, (2, 5, 4), np.float32)
    try:
        out = backend(q, k, v, enable_gqa=True)
    except ValueError as e:
        assert "(0, 3, 4)" in str(e) and "(2, 5, 4)" in str(e), str(e)
    else:
        assert out.shape == (0, 3, 4)


# --- attention weights --------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
@pytest.mark.parametrize("L,S", [(1, 5), (4, 300), (70, 130), (9, 0)])
def test_return_weights(backend, rng, dtype, L, S):
    q, k, v = qkv(rng, (2, 2), L, S, 16, 8, dtype)
    m = rng.random((L, S)) < 0.8
    if L and S:
        m[0] = False  # a row with no key left
    out, w = check(backend, q, k, v, mask=m, causal=True, return_weights=True)
    assert w.shape == (2, 2, L, S) and w.dtype == dtype
    rows = w.astype(np.float64).sum(-1)
    empty = ~(m & np.tri(L, S, dtype=bool)).any(-1)
    eps = np.finfo(np.float32 if dtype == np.float16 else dtype).eps
    tol = ROW_SUM_EPS_PER_KEY * eps * max(S, 1) + (np.finfo(dtype).eps * S if dtype == np.float16
                                                   else 0)
    np.testing.assert_allclose(rows[..., ~empty], 1.0, atol=tol)
    assert np.all(w[..., empty, :] == 0) and np.all(out[..., empty, :] == 0)
    assert np.all(w >= 0)
    # Without weights (another code path for few queries) the output is as good.
    check(backend, q, k, v, mask=m, causal=True)
