"""Values near the dtype's largest: the output is finite wherever the reference's is.

The kernels sum weights times values before they divide by the sum of the weights, so values of
magnitude 1e36 over 1024 keys overflowed float32's accumulator (inf where the answer is 1e36).
A call whose output is not finite runs again with v scaled down by a power of two per column.
"""

from __future__ import annotations

import numpy as np
import pytest

import fastattn
from fastattn import reference
from fastattn.backends import cpu as cpu_backend

pytestmark = pytest.mark.native  # the sanitizer build runs these (.ci/sanitize.sh)

BIG = {np.float32: 1e36, np.float64: 1e306}


def _problem(rng, dtype, batch=(2, 3), L=5, S=1024, E=16, Ev=8, kv_heads=None):
    """q, k small (a spread of weights over many keys) and v near the dtype's largest in every
    column but one, which holds ordinary values (its scale must not be touched)."""
    kv = batch[:-1] + (kv_heads or batch[-1],)
    q = (rng.standard_normal(batch + (L, E)) * 0.05).astype(dtype)
    k = rng.standard_normal(kv + (S, E)).astype(dtype)
    v = rng.uniform(0.5, 1.0, kv + (S, Ev)) * BIG[dtype]
    v[..., 1] = rng.standard_normal(kv + (S,))
    v[..., 2] *= np.where(rng.random(kv + (S,)) < 0.5, -1, 1)  # both signs
    return q, k, v.astype(dtype)


def _assert_matches(out, ref, v, dtype):
    """Finite, and within a few ulps of each column's largest |v| (the rounding of a weighted
    mean of that column's values, whose signs may cancel)."""
    assert np.isfinite(ref).all()
    assert np.isfinite(out).all(), "an output that the reference has finite is not"
    rtol = 1e-5 if dtype == np.float32 else 1e-12
    scale = np.max(np.abs(v.astype(np.float64)), axis=tuple(range(v.ndim - 1)))
    err = np.abs(out.astype(np.float64) - ref)
    assert (err < rtol * scale).all(), f"error {np.max(err / scale):.3g} of max|v| > {rtol}"


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("L", [1, 5, 100])  # the row (decode) kernel and the tiles
@pytest.mark.parametrize("num_threads", [1, 2])  # 2: split keys, partials merged
def test_large_values_finite(backend, rng, dtype, L, num_threads):
    q, k, v = _problem(rng, dtype, L=L)
    copies = [a.copy() for a in (q, k, v)]
    out = backend(q, k, v, num_threads=num_threads)
    _assert_matches(out, reference.attention(q, k, v), v, dtype)
    for a, c in zip((q, k, v), copies):
        np.testing.assert_array_equal(a, c)  # the scaled v is a copy


@pytest.mark.parametrize("options", [
    {"causal": True},
    {"return_weights": True, "return_lse": True},
    {"mask": "additive"},
    {"kv_heads": 1},  # grouped-query attention: the query heads of a kv head as rows
    {"sinks": True},
    {"similarity": "cosine"},
])
def test_large_values_with_options(rng, options):
    options = dict(options)
    kv_heads = options.pop("kv_heads", None)
    q, k, v = _problem(rng, np.float32, L=70, kv_heads=kv_heads)
    if options.pop("mask", None):
        options["mask"] = rng.standard_normal((70, 1024)).astype(np.float32)
    if options.pop("sinks", None):
        options["sinks"] = np.float32(0.5) * np.ones(3, np.float32)
    got = fastattn.attention(q, k, v, **options)
    want = reference.attention(q, k, v, **options)
    if isinstance(want, tuple):
        _assert_matches(got[0], want[0], v, np.float32)
        np.testing.assert_allclose(got[1], want[1], rtol=1e-4, atol=1e-7)  # weights
        np.testing.assert_allclose(got[2], want[2], rtol=1e-5)  # lse: v plays no part
    else:
        _assert_matches(got, want, v, np.float32)


@pytest.mark.parametrize("L", [1, 100])  # the row kernel's and the tiles' bfloat16 storage
def test_large_values_bfloat16(rng, L):
    ml_dtypes = pytest.importorskip("ml_dtypes", reason="bfloat16 arrays need ml_dtypes")
    q, k, v = (a.astype(ml_dtypes.bfloat16) for a in _problem(rng, np.float32, L=L))
    out = fastattn.attention(q, k, v)
    ref = reference.attention(q, k, v).astype(np.float32)
    got = out.astype(np.float32)
    assert np.isfinite(got).all()
    scale = np.max(np.abs(v.astype(np.float32)), axis=(0, 1, 2))
    err = np.abs(got - ref)
    assert (err < 2**-7 * scale).all(), f"error {np.max(err / scale):.3g} of max|v|"


def test_half_the_largest_value(rng):
    """Every value half the largest finite float32: the weighted mean is that value, not inf.
    (At the largest value itself the mean's rounding, a few ulps, may round it up to inf.)"""
    big = np.finfo(np.float32).max / 2
    q, k, _ = _problem(rng, np.float32, L=3)
    v = np.full(k.shape[:-1] + (8,), big, np.float32)
    out = fastattn.attention(q, k, v)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, big, rtol=1e-6)


def test_result_beyond_the_range_is_inf_as_in_the_reference():
    """A mean beyond float32's range is inf in the reference's float32 result too."""
    q = np.zeros((1, 2, 4), np.float32)
    k = np.zeros((1, 2, 4), np.float32)
    v = np.full((1, 2, 2), np.finfo(np.float32).max, np.float32)
    v[..., 1] = -v[..., 1]
    ref = reference.attention(q, k, v)
    np.testing.assert_array_equal(fastattn.attention(q, k, v), ref)


def test_inf_and_nan_inputs_as_in_the_reference(rng):
    """An inf or a NaN in v is no overflow: the output is the reference's, non-finite where it
    is, and v is not rescaled for it (one launch)."""
    q, k, v = (rng.standard_normal((1, 4, 8)).astype(np.float32) for _ in range(3))
    v[0, 1, 0] = np.inf
    v[0, 2, 1] = np.nan
    out = fastattn.attention(q, k, v)
    ref = reference.attention(q, k, v)
    np.testing.assert_array_equal(np.isfinite(out), np.isfinite(ref))
    assert cpu_backend.overflow_exponents(fastattn._validate.prepare(q, k, v), v) is None


def test_common_case_runs_the_kernel_once(rng, monkeypatch):
    """Ordinary values: one launch, no pass over v (the check rides on the output's write)."""
    launches = []
    real = fastattn._core.attention

    def counting(*args):
        launches.append(1)
        return real(*args)

    monkeypatch.setattr(fastattn._core, "attention", counting)
    q, k, v = (rng.standard_normal((2, 70, 16)).astype(np.float32) for _ in range(3))
    fastattn.attention(q, k, v, return_lse=True)
    assert len(launches) == 1
    qb, kb, vb = _problem(rng, np.float32, L=70)
    fastattn.attention(qb, kb, vb, return_lse=True)
    assert len(launches) == 3  # overflowed, then scaled


@pytest.mark.torch
def test_torch_large_values(rng):
    torch = pytest.importorskip("torch", reason="the torch operator's test needs torch")
    import fastattn.torch as fat

    q, k, v = _problem(rng, np.float32, L=5)
    out = fat.attention(*(torch.from_numpy(a) for a in (q, k, v)))
    _assert_matches(out.numpy(), reference.attention(q, k, v), v, np.float32)
