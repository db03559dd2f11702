"""Test data: arrays of given values in every memory layout the kernel must accept."""

from __future__ import annotations

import numpy as np

# C order, Fortran order, last two axes transposed, strided slices, negative strides, an address
# that is not a multiple of the itemsize, zero strides (np.broadcast_to) on the batch axes or on
# the row axis (all rows the same).
LAYOUTS = ("C", "F", "T", "step", "neg", "unaligned", "bcast_batch", "bcast_rows")


def values(rng: np.random.Generator, shape, dtype, magnitude=1.0) -> np.ndarray:
    """Random values of ``dtype``: normals times ``magnitude``, small integers, or random bools."""
    dtype = np.dtype(dtype)
    if dtype.kind == "b":
        return rng.random(shape) < 0.5
    if dtype.kind in "iu":
        lo = 0 if dtype.kind == "u" else -3
        return rng.integers(lo, 4, size=shape).astype(dtype)
    return (rng.standard_normal(shape) * magnitude).astype(dtype)


def in_layout(a: np.ndarray, layout: str) -> np.ndarray:
    """An array equal to ``a`` (for the broadcast layouts: ``a`` made constant along the
    broadcast axes first) laid out in memory as ``layout`` says."""
    a = np.asarray(a)
    if layout == "C" or a.ndim == 0:
        return np.ascontiguousarray(a)
    if layout == "F":
        return np.asfortranarray(a)
    if layout == "T" and a.ndim >= 2:
        return np.swapaxes(np.ascontiguousarray(np.swapaxes(a, -1, -2)), -1, -2)
    if layout == "step":
        base = np.zeros(tuple(2 * n + 1 for n in a.shape), a.dtype)
        view = base[tuple(slice(1, None, 2) for _ in a.shape)]
        view[...] = a
        return view
    if layout == "neg":
        flip = tuple(slice(None, None, -1) for _ in a.shape)
        return np.ascontiguousarray(a[flip])[flip]
    if layout == "unaligned" and a.dtype.itemsize > 1:
        raw = np.zeros(a.nbytes + a.dtype.itemsize, np.uint8)
        view = raw[1 : 1 + a.nbytes].view(a.dtype).reshape(a.shape)
        view[...] = a
        return view
    if layout == "bcast_batch" and a.ndim >= 3:
        return np.broadcast_to(a[:1], a.shape)
    if layout == "bcast_rows" and a.ndim >= 2 and a.shape[-2] > 0:
        return np.broadcast_to(a[..., :1, :], a.shape)
    return np.ascontiguousarray(a)


def _flags(a: np.ndarray) -> tuple:
    f = a.flags
    return (f.c_contiguous, f.f_contiguous, f.writeable, f.aligned, f.owndata, a.strides)


def copies(*arrays):
    """Deep copies, with their flags, to check later that the inputs were not modified."""
    return [(np.array(a, copy=True), _flags(a)) for a in arrays if isinstance(a, np.ndarray)]


def assert_unchanged(arrays, saved) -> None:
    arrays = [a for a in arrays if isinstance(a, np.ndarray)]
    assert len(arrays) == len(saved)
    for a, (before, flags) in zip(arrays, saved):
        nan = a.dtype.kind in "fc" or a.dtype.name == "bfloat16"
        assert np.array_equal(a, before, equal_nan=nan), "an input was modified"
        assert _flags(a) == flags, "an input's flags or strides changed"


def qkv(rng, batch, L, S, E, Ev, dtype=np.float32, kv_batch=None):
    """Random C-contiguous q (batch, L, E), k (kv_batch, S, E), v (kv_batch, S, Ev)."""
    kv_batch = batch if kv_batch is None else kv_batch
    return (values(rng, batch + (L, E), dtype), values(rng, kv_batch + (S, E), dtype),
            values(rng, kv_batch + (S, Ev), dtype))
