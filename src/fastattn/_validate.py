"""Argument checks and NumPy semantics, resolved once for every backend.

``prepare`` turns the arguments of :func:`fastattn.attention` into a :class:`Plan`: arrays in the
dtype the kernel computes in, one broadcast batch shape, and element strides for each operand
(0 along broadcast axes), so no backend ever expands a broadcast operand into a copy.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np

_NATIVE = (np.dtype(np.float32), np.dtype(np.float64))


@dataclass(frozen=True)
class Plan:
    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    mask: np.ndarray | None  # bool, or additive in ``dtype``
    dtype: np.dtype  # what the kernel computes in
    out_dtype: np.dtype  # what the caller gets back
    batch: tuple[int, ...]
    L: int
    S: int
    E: int
    Ev: int
    kv_group: int  # q head h reads kv head h // kv_group (last batch axis)
    causal: bool
    scale: float
    return_weights: bool
    num_threads: int | None


def _shapes(**arrays) -> str:
    return ", ".join(f"{name} {tuple(a.shape)}" for name, a in arrays.items())


def _check_dtype(name: str, a: np.ndarray) -> None:
    if a.dtype.kind not in "fiub" or (a.dtype.kind == "f" and a.dtype.itemsize > 8):
        raise TypeError(
            f"{name} has dtype {a.dtype}; fastattn takes float16, float32, float64, integer or "
            "bool arrays"
        )


def compute_dtypes(*dtypes: np.dtype) -> tuple[np.dtype, np.dtype]:
    """(dtype the kernel computes in, dtype returned) for inputs of these dtypes."""
    first = dtypes[0]
    result = first if all(d == first for d in dtypes) else np.result_type(*dtypes)
    if result.kind in "iub":
        return np.dtype(np.float64), np.dtype(np.float64)
    if result == np.float16:
        return np.dtype(np.float32), result
    return result, result


def _as_kernel_array(a: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``a`` in ``dtype``, copied only when the dtype differs or it is not aligned to its items."""
    a = a.astype(dtype, copy=False)
    return a if a.flags.aligned else np.array(a, copy=True)


def prepare(
    q,
    k,
    v,
    *,
    mask=None,
    causal=False,
    scale=None,
    enable_gqa=False,
    return_weights=False,
    num_threads=None,
) -> Plan:
    """Checks the arguments of ``attention`` and resolves broadcasting and dtypes."""
    q, k, v = np.asarray(q), np.asarray(k), np.asarray(v)
    for name, a in (("q", q), ("k", k), ("v", v)):
        _check_dtype(name, a)
    if min(q.ndim, k.ndim, v.ndim) < 2:
        raise ValueError(f"q, k and v must be at least 2-D; got {_shapes(q=q, k=k, v=v)}")
    L, E = q.shape[-2:]
    S, Ek = k.shape[-2:]
    Sv, Ev = v.shape[-2:]
    if Ek != E:
        raise ValueError(f"q and k must have the same last axis (E); got {_shapes(q=q, k=k)}")
    if Sv != S:
        raise ValueError(f"k and v must have the same number of keys (S); got {_shapes(k=k, v=v)}")

    kv_group = 1
    qb, kb, vb = q.shape[:-2], k.shape[:-2], v.shape[:-2]
    if enable_gqa:
        if min(q.ndim, k.ndim, v.ndim) < 3:
            raise ValueError(
                f"enable_gqa needs a head axis (-3) in q, k and v; got {_shapes(q=q, k=k, v=v)}"
            )
        hq, hk, hv = qb[-1], kb[-1], vb[-1]
        if hk != hv:
            raise ValueError(f"k and v must have the same number of heads; got {_shapes(k=k, v=v)}")
        if hk not in (1, hq):
            if hk == 0 or hq % hk:
                raise ValueError(
                    "enable_gqa: the number of query heads must be a multiple of the number of "
                    f"key/value heads; got {_shapes(q=q, k=k, v=v)}"
                )
            kv_group = max(hq // hk, 1)  # hq == 0: an empty batch, nothing to group
            kb, vb = kb[:-1] + (hq,), vb[:-1] + (hq,)
    try:
        batch = qb if qb == kb == vb else np.broadcast_shapes(qb, kb, vb)
    except ValueError:
        raise ValueError(
            f"the batch axes of q, k and v do not broadcast; got {_shapes(q=q, k=k, v=v)}"
        ) from None

    dtype, out_dtype = compute_dtypes(q.dtype, k.dtype, v.dtype)

    if mask is not None:
        mask = np.asarray(mask)
        if mask.dtype.kind == "b":
            mask_array = mask
        elif mask.dtype.kind == "f" and mask.dtype.itemsize <= 8:
            mask_array = mask
        else:
            raise TypeError(
                f"mask has dtype {mask.dtype}; it must be bool (True = the key takes part) or "
                "float (added to the scores)"
            )
        target = batch + (L, S)
        try:
            ok = np.broadcast_shapes(mask.shape, target) == target
        except ValueError:
            ok = False
        if not ok:
            raise ValueError(
                f"mask of shape {tuple(mask.shape)} does not broadcast to the scores' shape "
                f"{target} of {_shapes(q=q, k=k, v=v)}"
            )
        if mask.ndim < 2:
            mask_array = mask_array.reshape((1,) * (2 - mask.ndim) + mask.shape)
        mask = _as_kernel_array(mask_array, np.dtype(np.bool_) if mask.dtype.kind == "b" else dtype)

    if scale is None:
        scale = 1.0 / math.sqrt(E) if E > 0 else 1.0
    elif isinstance(scale, numbers.Real):
        scale = float(scale)
    else:
        raise TypeError(f"scale must be a real number, got {type(scale).__name__}")

    if num_threads is not None:
        if isinstance(num_threads, bool) or not isinstance(num_threads, numbers.Integral):
            raise TypeError(f"num_threads must be an int or None, got {num_threads!r}")
        if num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {num_threads}")
        num_threads = int(num_threads)

    return Plan(
        q=_as_kernel_array(q, dtype),
        k=_as_kernel_array(k, dtype),
        v=_as_kernel_array(v, dtype),
        mask=mask,
        dtype=dtype,
        out_dtype=out_dtype,
        batch=tuple(batch),
        L=L,
        S=S,
        E=E,
        Ev=Ev,
        kv_group=kv_group,
        causal=bool(causal),
        scale=scale,
        return_weights=bool(return_weights),
        num_threads=num_threads,
    )
