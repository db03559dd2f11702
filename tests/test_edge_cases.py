"""Edge cases: empty sizes, rows with no key, NaN/inf, large logits, strides, long sums."""

from __future__ import annotations

import numpy as np
import pytest

from layouts import LAYOUTS, assert_unchanged, copies, in_layout, qkv, values
from tolerances import assert_close_to_reference, check

pytestmark = pytest.mark.native  # the sanitizer build runs these (.ci/sanitize.sh)

# --- sizes --------------------------------------------------------------------------------


@pytest.mark.parametrize("batch,L,S,E,Ev", [
    ((2,), 0, 5, 4, 3),  # L == 0
    ((2,), 5, 0, 4, 3),  # S == 0
    ((0,), 5, 6, 4, 3),  # zero batch
    ((3, 0), 5, 6, 4, 3),
    ((2,), 0, 0, 4, 3),
    ((2,), 7, 9, 1, 5),  # E == 1
    ((2,), 7, 9, 5, 1),  # Ev == 1
    ((), 1, 1, 1, 1),
    ((3,), 13, 31, 3, 7),  # odd sizes
    ((1,), 67, 129, 33, 65),  # one past the tile and vector sizes
    ((1,), 5, 1000, 257, 3),
    ((2,), 3, 17, 513, 9),  # E larger than a tile's panel
])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("weights", [False, True])
def test_sizes(backend, rng, batch, L, S, E, Ev, dtype, weights):
    q, k, v = qkv(rng, batch, L, S, E, Ev, dtype)
    got = check(backend, q, k, v, return_weights=weights)
    out = got[0] if weights else got
    assert out.shape == batch + (L, Ev)
    if weights:
        assert got[1].shape == batch + (L, S)
    if S == 0:  # no key at all: zeros, never NaN
        assert np.all(out == 0)


# --- rows with no key left ----------------------------------------------------------------


@pytest.mark.parametrize("L,S", [(1, 9), (3, 100), (50, 70), (2, 4096), (70, 3000)])
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_rows_with_no_key_are_zero(backend, rng, L, S, kind):
    q, k, v = qkv(rng, (2,), L, S, 8, 6)
    keep = rng.random((2, L, S)) < 0.5
    keep[:, 0] = False  # row 0: nothing
    keep[1] = False  # batch entry 1: nothing at all
    if L > 1:
        keep[0, 1] = False
        keep[0, 1, -1] = True  # row 1: only the last key (the last split of a long row)
    mask = keep if kind == "bool" else np.where(keep, 0.0, -np.inf).astype(np.float32)
    for causal in (False, True):
        out, w = check(backend, q, k, v, mask=mask, causal=causal, return_weights=True,
                       num_threads=2)
        out2 = check(backend, q, k, v, mask=mask, causal=causal, num_threads=2)
        for o in (out, out2):
            assert not np.isnan(o).any()
            assert np.all(o[:, 0] == 0) and np.all(o[1] == 0)
        assert np.all(w[:, 0] == 0) and np.all(w[1] == 0)
        if L > 1 and not causal:
            np.testing.assert_array_equal(out2[0, 1], v[0, -1])  # one key: weight exactly 1


def test_causal_with_mask_hiding_the_first_key(backend, rng):
    q, k, v = qkv(rng, (), 6, 6, 4, 3)
    mask = np.ones(6, bool)
    mask[0] = False
    out = check(backend, q, k, v, mask=mask, causal=True)
    assert np.all(out[0] == 0) and not np.isnan(out).any()


# --- NaN and inf --------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["q", "k", "v"])
@pytest.mark.parametrize("L", [2, 60])
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_nan_and_inf_propagate_like_the_reference(backend, rng, where, L, value):
    q, k, v = qkv(rng, (2,), L, 150, 8, 5)
    a = {"q": q, "k": k, "v": v}[where]
    a[1, a.shape[1] // 2, 3] = value
    out = check(backend, q, k, v)  # NaN/inf positions must equal the reference's
    if np.isnan(value):
        want_rows = {"q": [L // 2], "k": range(L), "v": range(L)}[where]
        nan = np.isnan(out[1])
        assert nan[list(want_rows)].any(-1).all()
        assert not np.isnan(out[0]).any()


# --- large logits -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("L", [3, 40])
def test_large_logits_with_exact_ties(backend, rng, dtype, L):
    # q, k of +-30 with scale 25: logits are multiples of 45000 apart; the top ties share the
    # weight and every other weight underflows to exactly 0. (Logits of ~1e5 are only good to
    # ~1e5 eps, so the ties' weights may differ by that: the tolerance rule's logit term.)
    q = np.where(rng.random((2, L, 4)) < 0.5, -30.0, 30.0).astype(dtype)
    k = np.where(rng.random((2, 40, 4)) < 0.5, -30.0, 30.0).astype(dtype)
    v = rng.standard_normal((2, 40, 3)).astype(dtype)
    out, w = check(backend, q, k, v, scale=25.0, return_weights=True)
    s = np.einsum("ble,bse->bls", q.astype(np.float64), k.astype(np.float64))
    top = s == s.max(-1, keepdims=True)
    assert np.isfinite(out).all() and np.all(w[~top] == 0) and np.all(w[top] > 0)
    check(backend, q, k, v, scale=25.0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("L,S", [(3, 500), (100, 200)])
def test_large_logits(backend, rng, dtype, L, S):
    q = (rng.uniform(-1, 1, (2, L, 4)) * 30).astype(dtype)
    k = (rng.uniform(-1, 1, (2, S, 4)) * 30).astype(dtype)
    v = rng.standard_normal((2, S, 5)).astype(dtype)
    for mask in (None, np.where(rng.random((L, S)) < 0.5, -1e4, 0.0)):
        out = check(backend, q, k, v, scale=25.0, mask=mask)
        assert np.isfinite(out).all()
    # Logits of about +-750 (exp overflows without the max subtracted).
    q1 = np.full((2, L, 1), 30.0, dtype)
    k1 = rng.uniform(-1, 1, (2, S, 1)).astype(dtype)
    out = check(backend, q1, k1, v, scale=25.0)
    assert np.isfinite(out).all()


# --- strides and memory layouts -----------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("operand", ["q", "k", "v", "mask", "all"])
@pytest.mark.parametrize("L", [3, 70])
def test_layouts(backend, rng, layout, operand, L):
    arrays = dict(zip("qkv", qkv(rng, (2, 3), L, 90, 12, 7, np.float64)))
    arrays["mask"] = rng.standard_normal((2, 3, L, 90))
    for name in arrays:
        if operand in (name, "all"):
            arrays[name] = in_layout(arrays[name], layout)
    for causal in (False, True):
        check(backend, arrays["q"], arrays["k"], arrays["v"], mask=arrays["mask"],
              causal=causal)


def test_broadcast_views_and_read_only_inputs(backend, rng):
    q = np.broadcast_to(values(rng, (1, 6, 8), np.float32), (4, 6, 8))
    k = values(rng, (4, 20, 8), np.float32)
    k.flags.writeable = False
    v = np.broadcast_to(values(rng, (20, 1), np.float32), (4, 20, 3))  # zero column stride
    mask = np.broadcast_to(rng.random((1, 20)) < 0.7, (4, 6, 20))
    check(backend, q, k, v, mask=mask)


def test_inputs_are_never_modified_nor_aliased(backend, rng):
    q, k, v = qkv(rng, (2,), 10, 10, 6, 6)
    q_, k_, v_ = q.copy(), k.copy(), v.copy()
    saved = copies(q, k, v)
    out, w = backend(q, k, v, return_weights=True, mask=np.ones(10, bool))
    assert_unchanged([q, k, v], saved)
    np.testing.assert_array_equal(q, q_)
    np.testing.assert_array_equal(k, k_)
    np.testing.assert_array_equal(v, v_)
    assert not any(np.shares_memory(out, a) or np.shares_memory(w, a) for a in (q, k, v))


# --- accuracy of long sums ----------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("L", [2, 64])
def test_long_sums_of_equal_terms(backend, dtype, L):
    # Equal weights over S = 4096 keys holding the same value: the exact output is that value.
    # Plain NumPy gets it almost exactly; the rule allows 3x its error plus a floor of
    # ~(4 + sqrt(S)) eps. A running sum of S equal terms errs like S eps instead.
    S = 4096
    q = np.ones((1, L, 8), dtype)
    k = np.zeros((1, S, 8), dtype)
    v = np.broadcast_to(np.array([0.7, -1.3, 0.1], dtype), (1, S, 3))
    out = backend(q, k, v, num_threads=1)
    assert_close_to_reference(out, q, k, v, num_threads=1)
