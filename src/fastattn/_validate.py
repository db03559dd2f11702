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

# The kernel's own dtypes. A set: `dtype in _NATIVE` is one hash lookup, the fast path of the
# per-call checks below (a (1, 1, 1, 1, 8) call spends more time here than in the kernel).
_NATIVE = frozenset((np.dtype(np.float32), np.dtype(np.float64)))


@dataclass(eq=False)  # not frozen: a frozen __init__ costs microseconds per call
class Plan:
    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    mask: np.ndarray | None  # bool, or additive in ``dtype``
    dtype: np.dtype  # what the kernel computes in, and the lse's dtype
    # q, k and v are stored in `storage`: `dtype`, or a 16-bit float the kernel widens on load.
    out_dtype: np.dtype  # what the caller gets back: out and weights (the lse stays in `dtype`)
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
    # Query i's diagonal is key i + offset: 0 aligns top-left, S - L bottom-right.
    offset: int = 0
    window: tuple[int | None, int | None] = (None, None)  # keys i+offset-left .. i+offset+right
    alibi: np.ndarray | None = None  # slopes in ``dtype``, broadcastable to ``batch``
    softcap: float | None = None
    return_lse: bool = False
    kv_lengths: np.ndarray | None = None  # int64, broadcastable to ``batch``
    similarity: str = "dot"
    storage: np.dtype | None = None  # None: the same as dtype
    sinks: np.ndarray | None = None  # sink logits in ``dtype``, broadcastable to ``batch``
    # Operands that live on a GPU, by name (q, k, v, mask), read in place by a device backend;
    # the plan's arrays of those names are then stand-ins (see ``stand_in``). None: all on host.
    device: dict | None = None

    def band(self) -> tuple[int | None, int | None]:
        """(lo, hi): query i sees keys i + lo <= j <= i + hi (None: unbounded), from the
        causal flag, the window and the alignment together."""
        return band(self.window, self.causal, self.offset)

    def band_within(self, bound: int) -> tuple[int, int]:
        """band() as a kernel takes it (see ``band_within``)."""
        return band_within(self.band(), bound)


def band(window: tuple[int | None, int | None], causal: bool,
         offset: int) -> tuple[int | None, int | None]:
    """(lo, hi): query i sees keys i + lo <= j <= i + hi (None: unbounded), for a window
    (left, right) and the causal flag around the diagonal key i + offset."""
    left, right = window
    lo = None if left is None else offset - left
    hi = None if right is None else offset + right
    if causal:
        hi = offset if hi is None else min(hi, offset)
    return lo, hi


def band_within(lo_hi: tuple[int | None, int | None], bound: int) -> tuple[int, int]:
    """A band as a kernel takes it: an unbounded side as -bound or bound, and a side past them
    clamped to them (a kernel's "no bound", far enough from int64's limits that i + bound
    cannot overflow)."""
    lo, hi = lo_hi
    return (-bound if lo is None else max(lo, -bound), bound if hi is None else min(hi, bound))


def shapes_of(**arrays) -> str:
    """"q (2, 4, 8, 16), k (...)": the arrays' names and shapes, for messages (None skipped)."""
    return ", ".join(f"{name} {tuple(np.shape(a))}" for name, a in arrays.items()
                     if a is not None)


def is_bfloat16(dtype: np.dtype) -> bool:
    """ml_dtypes' bfloat16 (recognized by name, so fastattn never imports ml_dtypes)."""
    # kind and itemsize first: dtype.name is slow, and this runs on every call
    return dtype.kind == "V" and dtype.itemsize == 2 and dtype.name == "bfloat16"


def is_half(dtype: np.dtype) -> bool:
    """16-bit floats, stored as given and computed in float32."""
    return dtype.char == "e" or is_bfloat16(dtype)


def native_dtype(dtype: np.dtype) -> np.dtype:
    """``dtype`` in the machine's byte order (the dtype itself when it already is)."""
    return dtype if dtype.isnative else dtype.newbyteorder("=")


def native(a: np.ndarray) -> np.ndarray:
    """``a`` with its values in the machine's byte order: ``a`` itself when they already are
    (bool and every 1-byte dtype included), else a converted copy, so that no kernel reads a
    byte-swapped array's bytes as native numbers. Dtypes fastattn does not take are returned as
    they are, for the dtype checks to reject."""
    dtype = a.dtype
    if dtype in _NATIVE or dtype.isnative:
        return a
    if is_bfloat16(dtype):  # through its bits: exact whatever ml_dtypes' casts do
        bits = a.view(np.dtype(np.uint16).newbyteorder(dtype.byteorder))
        return bits.astype(np.uint16).view(native_dtype(dtype))
    if dtype.kind in "fiu":
        return a.astype(native_dtype(dtype))
    return a


def broadcast_shapes(*shapes: tuple[int, ...]) -> tuple[int, ...]:
    """``np.broadcast_shapes`` for any number of axes (NumPy's stops at 32, with a
    RuntimeError, where arrays and the kernel take 64): ValueError where they do not broadcast."""
    ndim = max(map(len, shapes), default=0)
    out = [1] * ndim
    for shape in shapes:
        first = ndim - len(shape)
        for i, n in enumerate(shape, first):
            if n != out[i]:
                if out[i] == 1:
                    out[i] = n
                elif n != 1:
                    raise ValueError(f"shapes {shapes} do not broadcast")
    return tuple(out)


def check_dtype(name: str, a: np.ndarray) -> None:
    """TypeError naming ``name`` and its dtype unless fastattn reads arrays of that dtype."""
    if a.dtype in _NATIVE or is_bfloat16(a.dtype):
        return
    if a.dtype.kind not in "fiub" or (a.dtype.kind == "f" and a.dtype.itemsize > 8):
        raise TypeError(
            f"{name} has dtype {a.dtype}; fastattn takes float16, bfloat16, float32, float64, "
            "integer or bool arrays"
        )


def compute_dtypes(*dtypes: np.dtype) -> tuple[np.dtype, np.dtype]:
    """(dtype the kernel computes in, dtype returned) for inputs of these dtypes."""
    first = dtypes[0]
    if first in _NATIVE and all(d == first for d in dtypes):
        return first, first
    if not all(d.isnative for d in dtypes):  # the kernel computes in the machine's byte order
        dtypes = tuple(native_dtype(d) for d in dtypes)
        first = dtypes[0]
    try:
        result = first if all(d == first for d in dtypes) else np.result_type(*dtypes)
    except TypeError:  # float16 with bfloat16: neither holds the other, float32 holds both
        result = np.dtype(np.float32)
    if result.kind in "iub":
        return np.dtype(np.float64), np.dtype(np.float64)
    if is_half(result):
        return np.dtype(np.float32), result
    return result, result


def storage_dtype(dtype: np.dtype, *dtypes: np.dtype) -> np.dtype:
    """How q, k and v reach the kernel: as given when all three are the same 16-bit float
    (kernels read them natively, halving memory traffic), else in the compute dtype."""
    first = dtypes[0]
    return first if is_half(first) and all(d == first for d in dtypes) else dtype


def _as_kernel_array(a: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``a`` in ``dtype``, copied only when the dtype differs or it is not aligned to its items."""
    if a.dtype != dtype:
        a = a.astype(dtype)
    return a if a.flags.aligned else np.array(a, copy=True)


ALIGNS = ("top_left", "bottom_right")
SIMILARITIES = ("dot", "cosine")


def window_bounds(window) -> tuple[int | None, int | None]:
    """``window`` checked: (left, right), each an int >= 0 or None (unbounded)."""
    if window is None:
        return None, None
    try:
        left, right = window
    except (TypeError, ValueError):
        raise TypeError(f"window must be a pair (left, right), got {window!r}") from None
    out: list[int | None] = []
    for name, w in (("left", left), ("right", right)):
        if w is None:
            out.append(None)
            continue
        if isinstance(w, bool) or not isinstance(w, numbers.Integral):
            raise TypeError(f"window {name} must be an int >= 0 or None, got {w!r}")
        if w < 0:
            raise ValueError(f"window {name} must be >= 0 or None, got {w}")
        out.append(int(w))
    return out[0], out[1]


def per_batch(name, a, batch, kinds, dtype, shapes, given=None) -> np.ndarray:
    """``a`` checked to hold one value per batch entry (broadcasting), in ``dtype``.

    ``given`` is the shape the caller passed, for the message, if ``a`` was reshaped.
    ``dtype`` None: checked only, returned in native byte order but its own dtype.
    """
    a = native(np.asarray(a))
    if a.dtype.kind not in kinds and not ("f" in kinds and is_bfloat16(a.dtype)):
        raise TypeError(f"{name} has dtype {a.dtype}")
    try:
        ok = a.ndim <= len(batch) and broadcast_shapes(a.shape, batch) == batch
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(f"{name} of shape {given or tuple(a.shape)} does not fit the batch shape "
                         f"{batch} of {shapes}")
    return a if dtype is None else _as_kernel_array(a, dtype)


def checked_flag(name: str, value) -> bool:
    """A switch must be a bool (Python's or NumPy's): a string or a number is refused, never
    read as True (``causal="bottom_right"`` would be, and means ``align``)."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    hint = ""
    if name == "causal" and value in ALIGNS:
        hint = f"; for causal attention aligned {value}, pass causal=True, align={value!r}"
    raise TypeError(f"{name} must be True or False, got {value!r} "
                    f"({type(value).__name__}){hint}")


def checked_flags(**flags) -> None:
    """checked_flag for each switch given by name."""
    for name, value in flags.items():
        checked_flag(name, value)


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
    align="top_left",
    window=None,
    alibi_slopes=None,
    softcap=None,
    return_lse=False,
    kv_lengths=None,
    similarity="dot",
    sinks=None,
    diagonal_offset=None,
) -> Plan:
    """Checks the arguments of ``attention`` and resolves broadcasting and dtypes."""
    checked_flags(causal=causal, enable_gqa=enable_gqa, return_weights=return_weights,
                  return_lse=return_lse)
    q, k, v = _operands(q, k, v)
    L, E = q.shape[-2:]
    S, Ev = v.shape[-2:]
    batch, kv_group = _batch_shape(q, k, v, enable_gqa)
    dtype, out_dtype = compute_dtypes(q.dtype, k.dtype, v.dtype)
    storage = storage_dtype(dtype, q.dtype, k.dtype, v.dtype)
    if mask is not None:
        mask = checked_mask(mask, batch + (L, S), dtype, shapes_of(q=q, k=k, v=v))
    scale = checked_scale(scale, E)
    num_threads = checked_num_threads(num_threads)
    if align not in ALIGNS:
        raise ValueError(f"align must be one of {ALIGNS}, got {align!r}")
    if similarity not in SIMILARITIES:
        raise ValueError(f"similarity must be one of {SIMILARITIES}, got {similarity!r}")
    if diagonal_offset is None:
        offset = S - L if align == "bottom_right" else 0
    else:  # internal: a block of a larger problem keeps that problem's diagonal
        offset = int(diagonal_offset)
    shapes = (shapes_of(q=q, k=k, v=v)
              if alibi_slopes is not None or kv_lengths is not None or sinks is not None else "")
    if alibi_slopes is not None:
        alibi_slopes = per_batch("alibi_slopes", alibi_slopes, batch, "fiub", dtype, shapes)
    if sinks is not None:
        sinks = per_batch("sinks", sinks, batch, "fiub", dtype, shapes)
    if kv_lengths is not None:
        kv_lengths = _kv_lengths(kv_lengths, batch, S, shapes)
    if softcap is not None:
        softcap = checked_softcap(softcap)
    return Plan(
        q=_as_kernel_array(q, storage), k=_as_kernel_array(k, storage),
        v=_as_kernel_array(v, storage), mask=mask, dtype=dtype, out_dtype=out_dtype,
        batch=tuple(batch), L=L, S=S, E=E, Ev=Ev, kv_group=kv_group, causal=bool(causal),
        scale=scale, return_weights=bool(return_weights), num_threads=num_threads,
        offset=offset, window=window_bounds(window), alibi=alibi_slopes, softcap=softcap,
        return_lse=bool(return_lse), kv_lengths=kv_lengths, similarity=similarity,
        storage=storage, sinks=sinks,
    )


def _operands(q, k, v) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """q, k and v as native-order arrays of dtypes fastattn reads, their matrix axes checked."""
    q, k, v = np.asarray(q), np.asarray(k), np.asarray(v)
    if not (q.dtype.isnative and k.dtype.isnative and v.dtype.isnative):
        q, k, v = native(q), native(k), native(v)  # values, not bytes: ">f4" is read as such
    for name, a in (("q", q), ("k", k), ("v", v)):
        check_dtype(name, a)
    if min(q.ndim, k.ndim, v.ndim) < 2:
        raise ValueError(f"q, k and v must be at least 2-D; got {shapes_of(q=q, k=k, v=v)}")
    E = q.shape[-1]
    S, Ek = k.shape[-2:]
    Sv = v.shape[-2]
    if Ek != E:
        raise ValueError(f"q and k must have the same last axis (E); got {shapes_of(q=q, k=k)}")
    if Sv != S:
        raise ValueError(
            f"k and v must have the same number of keys (S); got {shapes_of(k=k, v=v)}")
    return q, k, v


def _batch_shape(q: np.ndarray, k: np.ndarray, v: np.ndarray, enable_gqa) -> tuple[tuple, int]:
    """(the broadcast batch shape, kv_group): q head h reads kv head h // kv_group."""
    kv_group = 1
    qb, kb, vb = q.shape[:-2], k.shape[:-2], v.shape[:-2]
    if enable_gqa:
        if min(q.ndim, k.ndim, v.ndim) < 3:
            raise ValueError(
                f"enable_gqa needs a head axis (-3) in q, k and v; got {shapes_of(q=q, k=k, v=v)}"
            )
        hq, hk, hv = qb[-1], kb[-1], vb[-1]
        if hk != hv:
            raise ValueError(
                f"k and v must have the same number of heads; got {shapes_of(k=k, v=v)}")
        if hk not in (1, hq):
            if hk == 0 or hq % hk:
                raise ValueError(
                    "enable_gqa: the number of query heads must be a multiple of the number of "
                    f"key/value heads; got {shapes_of(q=q, k=k, v=v)}"
                )
            kv_group = max(hq // hk, 1)  # hq == 0: an empty batch, nothing to group
            kb, vb = kb[:-1] + (hq,), vb[:-1] + (hq,)
    try:
        batch = qb if qb == kb == vb else broadcast_shapes(qb, kb, vb)
    except ValueError:
        raise ValueError(
            f"the batch axes of q, k and v do not broadcast; got {shapes_of(q=q, k=k, v=v)}"
        ) from None
    return batch, kv_group


def checked_mask(mask, target: tuple, dtype: np.dtype, shapes: str) -> np.ndarray:
    """The mask checked to broadcast to the scores' shape ``target``: bool as given, float in
    ``dtype``, with at least two axes."""
    mask = np.asarray(mask)
    if mask.dtype.kind == "b":
        mask_array = mask
    elif (mask.dtype.kind == "f" and mask.dtype.itemsize <= 8) or is_bfloat16(mask.dtype):
        mask_array = native(mask)
    else:
        raise TypeError(
            f"mask has dtype {mask.dtype}; it must be bool (True = the key takes part) or "
            "float (added to the scores)"
        )
    try:
        ok = broadcast_shapes(mask.shape, target) == target
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(
            f"mask of shape {tuple(mask.shape)} does not broadcast to the scores' shape "
            f"{target} of {shapes}"
        )
    if mask.ndim < 2:
        mask_array = mask_array.reshape((1,) * (2 - mask.ndim) + mask.shape)
    return _as_kernel_array(mask_array, np.dtype(np.bool_) if mask.dtype.kind == "b" else dtype)


def checked_scale(scale, E: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(E) if E > 0 else 1.0
    if isinstance(scale, numbers.Real):
        return float(scale)
    raise TypeError(f"scale must be a real number, got {type(scale).__name__}")


def checked_num_threads(num_threads) -> int | None:
    if num_threads is None:
        return None
    if isinstance(num_threads, bool) or not isinstance(num_threads, numbers.Integral):
        raise TypeError(f"num_threads must be an int or None, got {num_threads!r}")
    if num_threads < 1:
        raise ValueError(f"num_threads must be >= 1, got {num_threads}")
    return int(num_threads)


def _kv_lengths(kv_lengths, batch: tuple, S: int, shapes: str) -> np.ndarray:
    """kv_lengths checked (integers in [0, S], one per batch entry) as int64."""
    lengths = np.asarray(kv_lengths)
    if lengths.dtype.kind not in "iu":
        raise TypeError(f"kv_lengths has dtype {lengths.dtype}; it must be an integer array")
    # A (B,) array counts along the first batch axis, as the number of batch axes it has.
    given = tuple(lengths.shape)
    lengths = lengths.reshape(given + (1,) * max(len(batch) - lengths.ndim, 0))
    lengths = per_batch("kv_lengths", lengths, batch, "iu", None, shapes, given)
    # Checked in the dtype given: a uint64 2**64 - 1 is no int64 -1 to the message.
    if lengths.size and (lengths.min() < 0 or lengths.max() > S):
        raise ValueError(f"kv_lengths must lie in [0, S={S}]; got values from "
                         f"{lengths.min()} to {lengths.max()}")
    return _as_kernel_array(lengths, np.dtype(np.int64))


def checked_softcap(softcap) -> float:
    if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real):
        raise TypeError(f"softcap must be a positive real number, got {softcap!r}")
    softcap = float(softcap)
    if not softcap > 0 or not math.isfinite(softcap):
        raise ValueError(f"softcap must be a positive finite number, got {softcap}")
    return softcap


def stand_in(shape, dtype) -> np.ndarray:
    """A zero-stride view of one zero of ``dtype`` with ``shape``: what ``prepare`` needs to
    check a call and plan it (shapes, dtypes, options) from arrays it does not read, as the CUDA
    backend (device arrays), Dask (lazy arrays) and torch's fake tensors have them."""
    return np.broadcast_to(np.zeros((), dtype), tuple(int(n) for n in shape))


def on_device(a) -> bool:
    """Whether ``a`` lives on a GPU: CUDA Array Interface, or a (simulated) Numba device array."""
    if type(a) is np.ndarray:  # the common call: no attribute lookups
        return False
    return hasattr(a, "__cuda_array_interface__") or bool(getattr(a, "__cuda_ndarray__", False))


def _float_operand(name: str, a, shape: tuple, dtype: np.dtype, shapes: str) -> np.ndarray:
    a = native(np.asarray(a))
    if not (a.dtype.kind == "f" and a.dtype.itemsize <= 8) and not is_bfloat16(a.dtype):
        raise TypeError(f"{name} has dtype {a.dtype}; it must be a float array")
    if a.shape != shape:
        raise ValueError(f"{name} of shape {tuple(a.shape)} does not match the forward's {name} "
                         f"shape {shape} of {shapes}")
    return _as_kernel_array(a, dtype)


def prepare_backward(q, k, v, out, lse, dout, **kwargs):
    """``prepare`` for ``attention_backward``: the forward's checks, then those of ``out`` and
    ``lse`` (as ``attention(..., return_lse=True)`` returned them) and ``dout``. lse comes in
    the compute dtype; out and dout in it too, or in q, k and v's 16-bit storage when they are
    given in it (the kernel may read them so). Returns ``(plan, out, lse, dout)``."""
    plan = prepare(q, k, v, **kwargs)
    shapes = shapes_of(q=plan.q, k=plan.k, v=plan.v)
    rows = plan.batch + (plan.L,)

    def dtype_of(a) -> np.dtype:
        given = native_dtype(np.asarray(a).dtype)  # _float_operand converts ">f2" to "<f2"
        return given if given == plan.storage else plan.dtype

    out = _float_operand("out", out, rows + (plan.Ev,), dtype_of(out), shapes)
    lse = _float_operand("lse", lse, rows, plan.dtype, shapes)
    dout = _float_operand("dout", dout, rows + (plan.Ev,), dtype_of(dout), shapes)
    return plan, out, lse, dout
