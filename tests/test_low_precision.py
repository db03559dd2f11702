"""float16 and bfloat16 inputs: computed in float32, returned in the input dtype, read natively
by the decode kernel (half the bytes of K and V)."""

from __future__ import annotations

import numpy as np
import pytest

import fastattn
from layouts import in_layout, qkv
from tolerances import assert_close_to_reference, check

ml_dtypes = pytest.importorskip("ml_dtypes", reason="bfloat16 tests need ml_dtypes")
HALVES = [np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16)]


@pytest.mark.parametrize("dtype", HALVES, ids=str)
@pytest.mark.parametrize("L,S", [(1, 1), (1, 3000), (3, 700), (4, 50), (5, 300), (64, 200)])
def test_half_inputs(backend, rng, dtype, L, S):
    q, k, v = (a.astype(dtype) for a in qkv(rng, (2, 3), L, S, 40, 24, np.float32))
    out = check(backend, q, k, v)
    assert out.dtype == dtype
    check(backend, q, k, v, causal=True, align="bottom_right", return_lse=True)
    check(backend, q, k, v, mask=rng.random((L, S)) < 0.7, kv_lengths=[S, S // 2])


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
