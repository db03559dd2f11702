"""positional_encoding: the table of "Attention Is All You Need", entry by entry, and its errors."""

from __future__ import annotations

import math

import numpy as np
import pytest

import fastattn
from fastattn import positional_encoding


def by_the_formula(length, dim, base=10000.0):
    """PE[pos, 2i] = sin(pos / base^(2i/dim)), PE[pos, 2i+1] = cos(...), one entry at a time."""
    table = np.empty((length, dim))
    for pos in range(length):
        for col in range(dim):
            two_i = col - col % 2
            angle = pos / base ** (two_i / dim)
            table[pos, col] = math.sin(angle) if col % 2 == 0 else math.cos(angle)
    return table


@pytest.mark.parametrize("length,dim,base", [
    (1, 1, 10000.0), (5, 2, 10000.0), (7, 8, 10000.0), (6, 7, 10000.0), (9, 5, 100.0),
    (50, 16, 10000.0), (4, 3, 2.5),
])
def test_matches_the_formula(length, dim, base):
    got = positional_encoding(length, dim, base=base)
    assert got.shape == (length, dim) and got.dtype == np.float64
    # Both sides take sin/cos of the same float64 angle up to one rounding of base**(2i/dim).
    np.testing.assert_allclose(got, by_the_formula(length, dim, base), rtol=0, atol=1e-13)


def test_first_columns_and_odd_dim():
    pe = positional_encoding(10, 5)
    pos = np.arange(10)
    np.testing.assert_allclose(pe[:, 0], np.sin(pos), atol=1e-15)  # 2i = 0: wavelength 2 pi
    np.testing.assert_allclose(pe[:, 1], np.cos(pos), atol=1e-15)
    np.testing.assert_allclose(pe[:, 4], np.sin(pos / 10000.0 ** (4 / 5)), atol=1e-15)
    np.testing.assert_array_equal(pe[0], [0, 1, 0, 1, 0])  # position 0: sin 0, cos 0
    assert np.all(np.abs(pe) <= 1)


def test_offsets_are_rotations():
    """The property the paper chose sinusoids for: PE[p + k] is a linear function of PE[p],
    each (sin, cos) pair rotated by the angle k / base^(2i/dim)."""
    dim, k = 8, 3
    pe = positional_encoding(20, dim)
    for i in range(dim // 2):
        theta = k / 10000.0 ** (2 * i / dim)
        # [sin(a + t), cos(a + t)] = [sin a, cos a] @ [[cos t, -sin t], [sin t, cos t]]
        rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
        np.testing.assert_allclose(pe[k:, 2 * i:2 * i + 2], pe[:-k, 2 * i:2 * i + 2] @ rot,
                                   atol=1e-12)


def test_empty_and_dtypes():
    assert positional_encoding(0, 4).shape == (0, 4)
    f32 = positional_encoding(6, 4, dtype=np.float32)
    assert f32.dtype == np.float32
    np.testing.assert_array_equal(f32, positional_encoding(6, 4).astype(np.float32))
    assert positional_encoding(np.int64(3), np.int32(2)).shape == (3, 2)


def test_bfloat16_table():
    ml_dtypes = pytest.importorskip("ml_dtypes", reason="bfloat16 comes from ml_dtypes")
    got = positional_encoding(4, 4, dtype=ml_dtypes.bfloat16)
    assert got.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(got, positional_encoding(4, 4).astype(ml_dtypes.bfloat16))


def test_added_to_embeddings_makes_attention_see_order():
    """Without positions, permuting the tokens permutes the outputs; with them, it does not."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 6))
    perm = [2, 0, 3, 1]
    plain = fastattn.attention(x, x, x)
    np.testing.assert_allclose(fastattn.attention(x[perm], x[perm], x[perm]), plain[perm],
                               atol=1e-14)
    pe = positional_encoding(4, 6)
    xp, xq = x + pe, x[perm] + pe
    assert not np.allclose(fastattn.attention(xq, xq, xq), fastattn.attention(xp, xp, xp)[perm])


@pytest.mark.parametrize("args,kwargs,exc,match", [
    ((-1, 4), {}, ValueError, "length must be >= 0"),
    ((3, 0), {}, ValueError, "dim must be >= 1"),
    ((3, -2), {}, ValueError, "dim must be >= 1"),
    ((3.0, 4), {}, TypeError, "length must be an int"),
    ((3, 4.5), {}, TypeError, "dim must be an int"),
    ((True, 4), {}, TypeError, "length must be an int"),
    ((3, 4), dict(base=0.0), ValueError, "base must be positive"),
    ((3, 4), dict(base=-10.0), ValueError, "base must be positive"),
    ((3, 4), dict(base=float("inf")), ValueError, "base must be positive and finite"),
    ((3, 4), dict(base=float("nan")), ValueError, "base must be positive and finite"),
    ((3, 4), dict(base="10000"), TypeError, "base must be a real number"),
    ((3, 4), dict(dtype=np.int32), TypeError, "dtype must be a float dtype"),
])
def test_bad_arguments(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        positional_encoding(*args, **kwargs)
