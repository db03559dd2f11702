"""The CUDA backend: checks, device transfers and the launch of
:mod:`fastattn.backends.cuda_kernel` (``backend="cuda"``, and ``"auto"`` for device arrays).

Importing this module does not import numba: that happens on the first call, so that
``import fastattn`` never does and a missing piece gives an error that says how to install it.
NumPy inputs go through :func:`~fastattn._validate.prepare` as on the CPU and come back as NumPy
arrays. Device inputs (anything with ``__cuda_array_interface__``, or Numba's simulated device
arrays) are checked from their shape and dtype alone, read in place through their strides, and
come back as Numba device arrays.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import sys
import threading

import numpy as np

from .._validate import (
    Plan,
    check_dtype,
    compute_dtypes,
    is_bfloat16,
    native,
    on_device,
    prepare,
    stand_in,
)
from .cpu import overflow_exponents, scale_up, scaled_down

INSTALL = 'pip install "fastattn[cuda]"'

# Arguments of ``attention`` the GPU kernel does not implement, each with the value that means
# "not used", e.g. ``{"similarity": "dot"}``. A call with any other value raises
# NotImplementedError naming the argument (never a wrong answer). Today the kernel implements
# every argument; add here any that ``attention`` grows before the kernel learns it.
UNSUPPORTED: dict = {}

# Plan fields the kernel reads. A field added to Plan later and not listed here is accepted only
# at its dataclass default (see ``_unsupported``).
PLAN_FIELDS = set(
    "q k v mask dtype out_dtype batch L S E Ev kv_group causal scale return_weights num_threads "
    "offset window alibi softcap return_lse kv_lengths similarity storage sinks device".split()
)
# dtypes the kernel reads and writes. bfloat16 (ml_dtypes) NumPy inputs are widened to float32
# on the host and the result rounded back there; bfloat16 device arrays are not supported.
_KERNEL_DTYPES = {np.dtype(t) for t in (np.float16, np.float32, np.float64)}

# The simulator runs one kernel at a time (it patches the kernel's module while it runs).
_SIM_LOCK = threading.Lock()
# (numba.cuda, the kernel module) once _require_cuda has found them usable.
_READY: tuple | None = None


def _require_cuda():
    """(numba.cuda, the kernel module), or an error saying what is missing and how to get it."""
    global _READY
    if _READY is not None:
        return _READY
    if importlib.util.find_spec("numba") is None:
        raise ImportError(
            f"the CUDA backend needs numba and numba-cuda, which are not installed; install "
            f"them with: {INSTALL}"
        )
    if importlib.util.find_spec("numba_cuda") is None:
        raise ImportError(
            f"the CUDA backend needs NVIDIA's numba-cuda package, which is not installed "
            f"(numba is); install it with: {INSTALL}"
        )
    from numba import cuda

    if not cuda.config.ENABLE_CUDASIM and not cuda.is_available():
        try:
            cuda.current_context()
            reason = "numba-cuda reports no usable device"
        except Exception as e:  # noqa: BLE001 - its message says what the driver lacks
            reason = " ".join(str(e).split())
        raise RuntimeError(
            f"the CUDA backend found no usable NVIDIA GPU or driver ({reason}). numba-cuda is "
            f"installed; it needs an NVIDIA GPU with its driver (the CUDA toolkit comes with "
            f"{INSTALL}). Without a GPU, NUMBA_ENABLE_CUDASIM=1 runs the kernel on Numba's CPU "
            "simulator (slow), or use backend='cpu'."
        )
    if cuda.config.ENABLE_CUDASIM:
        _lock_simulator_shared_arrays()
    from . import cuda_kernel

    _READY = (cuda, cuda_kernel)
    return _READY


def _lock_simulator_shared_arrays() -> None:
    """Makes the simulator's ``cuda.shared.array`` safe for the threads of a block (once).

    The simulator runs each CUDA thread as a Python thread and hands every thread of a launch
    the array first made for the calling line: it looks the line up, and if absent makes the
    array and stores it. Two threads switched between the look-up and the store (the look-up
    walks the stack, slow enough for it under load) get two arrays, and the kernel reads the
    key tile another thread loaded into the other one: garbage, the output of a block wrong.
    (Seen in CI as a row equal to one key's value; made certain by slowing ``np.empty``,
    tests/test_cuda.py.) Here the look-up and the store are one step under a lock, the array
    keyed by the calling line as before. A simulator without that internal store is left as
    it is.
    """
    from numba.cuda.simulator import kernelapi

    shared = kernelapi.FakeCUDAShared
    with _SIM_LOCK:  # installed once, even by concurrent first calls
        if getattr(shared.array, "fastattn_locked", False):
            return
        try:
            store = shared(0)._allocations
        except (AttributeError, TypeError):
            store = None
        if isinstance(store, dict):
            shared.array = _locked_array(shared.array, kernelapi)


def _locked_array(original, kernelapi):
    """``FakeCUDAShared.array`` with its look-up and store under one lock."""
    lock = threading.Lock()

    def array(self, shape, dtype, alignment=None):
        if shape == 0 or alignment is not None:  # dynamic memory (no look-up), or an error
            return original(self, shape, dtype, alignment)
        caller = sys._getframe(1)
        key = (caller.f_code.co_filename, caller.f_lineno)
        with lock:
            found = self._allocations.get(key)
            if found is None:
                found = self._allocations[key] = kernelapi.np.empty(shape, _numpy_dtype(dtype))
        return found

    array.fastattn_locked = True  # type: ignore[attr-defined]
    return array


def _numpy_dtype(dtype) -> np.dtype:
    """A NumPy dtype from a Numba type (``float32``) or anything NumPy reads as one."""
    from numba.core import types
    from numba.np import numpy_support

    return numpy_support.as_dtype(dtype) if isinstance(dtype, types.Type) else np.dtype(dtype)


def _check_options(options: dict) -> None:
    for name, default in UNSUPPORTED.items():
        value = options.get(name, default)
        if not _equal(value, default):
            raise NotImplementedError(
                f"{name}={value!r} is not supported by the CUDA backend yet; use backend='cpu'"
            )


def _unsupported(plan: Plan) -> str | None:
    """A Plan field the kernel does not know must be at its default, or the answer could be
    wrong: the message naming it, or None."""
    if plan.similarity not in ("dot", "cosine"):
        return (f"similarity={plan.similarity!r} is not supported by the CUDA backend yet; "
                "use backend='cpu'")
    for f in dataclasses.fields(plan):
        if f.name in PLAN_FIELDS:
            continue
        value = getattr(plan, f.name)
        if f.default is dataclasses.MISSING or not _equal(value, f.default):
            return f"{f.name}={value!r} is not supported by the CUDA backend yet; use backend='cpu'"
    return None


def _equal(a, b) -> bool:
    try:
        return bool(a is b or a == b)
    except (TypeError, ValueError):
        return False


# --- operands ---------------------------------------------------------------------------


@dataclasses.dataclass
class _Operand:
    flat: object  # 1-D device array holding every element the operand reads
    base: int  # element offset of the operand's [0, ..., 0] in ``flat``
    strides: tuple  # element strides, 0 along broadcast axes


def _device_info(a):
    """(shape, dtype, byte strides or None for C order) of a device array, without copies."""
    if hasattr(a, "__cuda_array_interface__"):
        cai = a.__cuda_array_interface__
        return tuple(cai["shape"]), np.dtype(cai["typestr"]), cai.get("strides")
    return tuple(a.shape), np.dtype(a.dtype), tuple(a.strides)  # the simulator's device array


def _byte_strides(shape, dtype, strides):
    if strides is not None:
        return tuple(strides)
    out, step = [], dtype.itemsize
    for n in reversed(shape):
        out.append(step)
        step *= max(n, 1)
    return tuple(reversed(out))


def _dummy(cuda, dtype):
    return cuda.to_device(np.zeros(1, dtype))


def _from_host(cuda, a: np.ndarray) -> _Operand:
    """Copies ``a`` to the device: broadcast (stride-0) axes go over as one entry."""
    if a.size == 0:
        return _Operand(_dummy(cuda, a.dtype), 0, (0,) * a.ndim)
    sub = tuple(slice(0, 1) if s == 0 else slice(None) for s in a.strides)
    c = np.ascontiguousarray(a[sub])
    strides = tuple(0 if n == 1 else s // c.itemsize for n, s in zip(c.shape, c.strides))
    return _Operand(cuda.to_device(c.reshape(-1)), 0, strides)


def _from_device(cuda, a) -> _Operand:
    """A device operand read in place: a 1-D window over the memory its strides span."""
    shape, dtype, strides = _device_info(a)
    strides = _byte_strides(shape, dtype, strides)
    if any(s % dtype.itemsize for s in strides):
        raise NotImplementedError(
            f"device array strides {strides} that are not multiples of the item size "
            f"({dtype.itemsize} bytes) are not supported by the CUDA backend"
        )
    if math.prod(shape) == 0:
        return _Operand(_dummy(cuda, dtype), 0, (0,) * len(shape))
    el = tuple(0 if n == 1 else s // dtype.itemsize for n, s in zip(shape, strides))
    lo = sum(min(0, (n - 1) * s) for n, s in zip(shape, el))
    hi = sum(max(0, (n - 1) * s) for n, s in zip(shape, el))
    if hasattr(a, "__cuda_array_interface__"):
        cai = a.__cuda_array_interface__
        window = {
            "shape": (hi - lo + 1,),
            "typestr": dtype.str,
            "data": (cai["data"][0] + lo * dtype.itemsize, False),  # only ever read
            "strides": None,
            "version": 3,
            # The producer's stream, if it names one: its pending writes are waited for.
            "stream": cai.get("stream"),
        }
        flat = cuda.from_cuda_array_interface(window, owner=a, sync=True)
    else:  # the simulator: a view of the NumPy array it wraps, from its lowest address
        host = a._ary
        first = host[
            tuple(slice(n - 1, n) if s < 0 else slice(0, 1) for n, s in zip(shape, host.strides))
        ]
        view = np.lib.stride_tricks.as_strided(first, (hi - lo + 1,), (dtype.itemsize,))
        flat = type(a)(view)
    return _Operand(flat, -lo, el)


def _batch_offsets(op: _Operand, shape, batch, kv_group=1) -> np.ndarray:
    """Element offset of each batch entry's matrix; batch axes align right, as NumPy's."""
    nb = math.prod(batch)
    off = np.full(nb, op.base, np.int64)
    idx = np.unravel_index(np.arange(nb), batch) if batch else ()
    strides = (0,) * (len(shape) - len(op.strides)) + tuple(op.strides)
    for a in range(1, len(shape) - 1):  # batch axis -a-2 of the operand, -a of the batch
        n, s = shape[-a - 2], strides[-a - 2]
        if n == 1 or s == 0:
            continue
        i = idx[len(batch) - a]
        off += (i // kv_group if a == 1 else i) * s
    return off


def _matrix_strides(op: _Operand, shape):
    """Element strides of the last two axes, 0 where the axis is broadcast (size 1)."""
    strides = (0, 0) + tuple(op.strides)
    return tuple(0 if n == 1 else s for n, s in zip(shape[-2:], strides[-2:]))


# --- the call ---------------------------------------------------------------------------


class CudaBackend:
    """:func:`fastattn.attention` on the GPU; see there. ``num_threads`` is checked and ignored.

    ``plan`` raises ImportError when numba or numba-cuda is not installed (the message says how
    to install them) and RuntimeError without a usable NVIDIA GPU or driver; ``supports`` names
    an argument the GPU kernel does not implement (``UNSUPPORTED``).

    Examples
    --------
    >>> import numpy as np, fastattn
    >>> q = np.ones((2, 3, 4), np.float32)
    >>> fastattn.attention(q, q, q, backend="cuda").shape  # doctest: +SKIP
    (2, 3, 4)
    """

    name = "cuda"

    def claims(self, arrays: tuple) -> bool:
        return any(on_device(a) for a in arrays)

    def plan(self, q, k, v, *, mask=None, **options) -> Plan:
        """``prepare`` for the GPU: NumPy inputs as on the CPU; device inputs through stand-ins
        (every check, no copy), named in ``plan.device`` to be read in place."""
        cuda, _ = _require_cuda()
        _check_options(options)
        arrays = {"q": q, "k": k, "v": v, "mask": mask}
        device = {name: on_device(a) for name, a in arrays.items() if a is not None}
        options = {name: _to_host(cuda, a) for name, a in options.items()}
        if not any(device.values()):
            return prepare(q, k, v, mask=mask, **options)
        plan = _prepare_device(arrays, device, options)
        return dataclasses.replace(
            plan, device={name: arrays[name] for name, on in device.items() if on})

    def supports(self, plan: Plan) -> str | None:
        return _unsupported(plan)

    def forward(self, plan: Plan) -> tuple:
        """(out, weights or None, lse or None): NumPy arrays for a plan of NumPy inputs, device
        arrays where any input lives on the GPU."""
        cuda, kernel = _require_cuda()
        device = plan.device or {}
        ops = {}
        for name in ("q", "k", "v", "mask"):
            if name in device:
                ops[name] = _from_device(cuda, device[name])
            elif getattr(plan, name) is not None:
                a = getattr(plan, name)
                ops[name] = _from_host(
                    cuda,
                    a if a.dtype in _KERNEL_DTYPES or a.dtype == np.bool_ else a.astype(plan.dtype),
                )
        results = _run(cuda, kernel, plan, ops)
        if not device:
            results = _to_numpy(cuda, kernel, plan, ops, results)
        out, *rest = results
        weights = rest.pop(0) if plan.return_weights else None
        return out, weights, (rest[0] if plan.return_lse else None)

    def backward(self, plan, out, lse, dout, dtypes, recompute_lse):
        raise NotImplementedError("the CUDA backend has a forward kernel, not yet a backward "
                                  "one; use backend='cpu'")


def _to_numpy(cuda, kernel, plan: Plan, ops: dict, results: list) -> list:
    """The results of a plan of NumPy inputs, copied back to the host: out and weights in the
    output dtype, lse (last) in the compute dtype."""
    results = [r.copy_to_host() for r in results]
    out = results[0]
    # As on the CPU (backends.cpu.run): an output the accumulator could not hold runs again
    # with v scaled down by a power of two per column, the output scaled back up.
    exponents = None if np.isfinite(out).all() else overflow_exponents(plan, plan.v)
    if exponents is not None:
        kernel_v = plan.v.dtype if plan.v.dtype in _KERNEL_DTYPES else plan.dtype
        ops["v"] = _from_host(cuda, scaled_down(plan, plan.v, exponents, kernel_v))
        results[0] = _run(cuda, kernel, plan, ops)[0].copy_to_host()
        scale_up(results[0], exponents)
    n = len(results) - plan.return_lse
    dtypes = [plan.out_dtype] * n + [plan.dtype] * plan.return_lse
    return [r.astype(d, copy=False) for r, d in zip(results, dtypes)]


def _to_host(cuda, a):
    """Per-batch options (ALiBi slopes, kv_lengths) are small: read them on the host."""
    if hasattr(a, "__cuda_array_interface__"):
        return cuda.as_cuda_array(a).copy_to_host()
    return a.copy_to_host() if getattr(a, "__cuda_ndarray__", False) else a


def _check_device_dtype(name, dtype) -> None:
    if not dtype.isnative:  # the kernel reads native numbers; a device copy is not made here
        order = {">": "big-endian", "<": "little-endian"}.get(dtype.byteorder, dtype.byteorder)
        raise TypeError(
            f"{name}: a device array in non-native byte order ({order}, dtype {dtype.str}) is "
            "not supported by the CUDA backend; convert it to native byte order first, or pass "
            "a NumPy array (converted on the host)"
        )
    if is_bfloat16(dtype):
        raise NotImplementedError(
            f"{name}: bfloat16 device arrays are not supported by the CUDA "
            "backend yet (bfloat16 NumPy arrays are); use float16 or float32"
        )
    check_dtype(name, stand_in((), dtype))


def _prepare_device(arrays, device, kwargs) -> Plan:
    """``prepare`` on stand-ins of the device operands: every check, no copy."""
    dtypes = {}
    args = {}
    for name in ("q", "k", "v"):
        a = arrays[name]
        if device[name]:
            shape, dtype, _ = _device_info(a)
            _check_device_dtype(name, dtype)
            dtypes[name], args[name] = dtype, shape
        else:
            args[name] = native(np.asarray(a))
            dtypes[name] = args[name].dtype
            check_dtype(name, args[name])
    dtype, out_dtype = compute_dtypes(*dtypes.values())
    for name in ("q", "k", "v"):
        if device[name]:
            args[name] = stand_in(args[name], dtype)  # no copy: already the compute dtype
    mask = arrays["mask"]
    if mask is not None and device["mask"]:
        shape, mdtype, _ = _device_info(mask)
        _check_device_dtype("mask", mdtype)
        float_mask = mdtype.kind == "f" and mdtype.itemsize <= 8
        mask = stand_in(shape, dtype if float_mask else mdtype)  # a bad dtype: prepare's error
    plan = prepare(args["q"], args["k"], args["v"], mask=mask, **kwargs)
    return dataclasses.replace(plan, dtype=dtype, out_dtype=out_dtype)


def _run(cuda, kernel, plan: Plan, ops: dict) -> list:
    """Launches the kernel; [out, weights?, lse?] as flat-backed device arrays, lse in the
    compute dtype (float32 for 16-bit inputs)."""
    batch, L, S, Ev = plan.batch, plan.L, plan.S, plan.Ev
    nb = math.prod(batch)
    # What the kernel writes: the caller's dtype, or the compute dtype to be rounded by the host.
    out_dtype = plan.out_dtype if plan.out_dtype in _KERNEL_DTYPES else np.dtype(plan.dtype)
    lse_dtype = np.dtype(plan.dtype)  # the accumulator's: a 16-bit lse is too coarse
    shapes = [batch + (L, Ev)]
    if plan.return_weights:
        shapes.append(batch + (L, S))
    if plan.return_lse:
        shapes.append(batch + (L,))
    if nb == 0 or L == 0 or S == 0:  # nothing to launch: empty, or rows with no key
        return _no_launch(cuda, plan, shapes, out_dtype, lse_dtype)

    tiles = kernel.TILES[np.dtype(plan.dtype)]
    out = cuda.device_array(nb * L * Ev, out_dtype) if Ev else _dummy(cuda, out_dtype)
    w = cuda.device_array(nb * L * S, out_dtype) if plan.return_weights else _dummy(cuda, out_dtype)
    lse = cuda.device_array(nb * L, lse_dtype) if plan.return_lse else _dummy(cuda, lse_dtype)
    table, masks, m_strides, mask_kind = _batch_table(cuda, kernel, plan, ops, tiles.dtype.type)
    q, k, v = ops["q"], ops["k"], ops["v"]
    simulator = bool(cuda.config.ENABLE_CUDASIM)
    # One thread per query row; a whole number of warps on a GPU. The simulator runs each
    # thread as a Python thread, so there it starts no more than there are rows.
    rows = min(tiles.block_m, L if simulator else 32 * -(-L // 32))
    grid = -(-L // rows) * nb
    args = (
        q.flat, k.flat, v.flat, *masks, out, w, lse,
        *(cuda.to_device(a) for a in table),
        L, S, plan.E, Ev,
        *_matrix_strides(q, plan.q.shape),
        *_matrix_strides(k, plan.k.shape),
        *_matrix_strides(v, plan.v.shape),
        *m_strides,
        mask_kind,
        *plan.band_within(kernel.NO_BOUND),
        plan.offset,
        tiles.dtype.type(plan.scale),
        tiles.dtype.type(plan.softcap or 0.0),
        int(plan.similarity == "cosine"),
        int(plan.return_weights),
        int(plan.return_lse),
    )
    if simulator:
        # The simulator's kernel[grid, block] sets the dimensions on the one shared kernel
        # object and returns it: configured and launched under one lock, or a concurrent call
        # launches with another call's grid (found by test_concurrent_calls).
        with _SIM_LOCK:
            kernel.KERNELS[tiles.dtype][grid, rows](*args)
    else:
        kernel.KERNELS[tiles.dtype][grid, rows](*args)

    results = [out.reshape(shapes[0]) if Ev else cuda.device_array(shapes[0], out_dtype)]
    if plan.return_weights:
        results.append(w.reshape(shapes[1]))
    if plan.return_lse:
        results.append(lse.reshape(shapes[-1]))
    return results


def _no_launch(cuda, plan: Plan, shapes: list, out_dtype, lse_dtype) -> list:
    """The results of a plan with nothing to compute (an empty batch or no rows: empty arrays;
    no keys: zero outputs and weights, an lse of -inf, or of the sink where there is one)."""
    fills = [0] + [0] * plan.return_weights + [-np.inf] * plan.return_lse
    dtypes = [out_dtype] * (1 + plan.return_weights) + [lse_dtype] * plan.return_lse
    results = [np.full(s, f, d) for s, f, d in zip(shapes, fills, dtypes)]
    if plan.return_lse and plan.sinks is not None:  # a row with no key: lse is the sink
        results[-1][...] = plan.sinks[..., None]
    return [cuda.to_device(r) for r in results]


def _batch_table(cuda, kernel, plan: Plan, ops: dict, acc) -> tuple:
    """What the kernel reads per batch entry and of the mask: ((offsets table, ALiBi slopes,
    sink logits), (bool mask, float mask), the mask's matrix strides, the mask kind)."""
    batch, S = plan.batch, plan.S
    nb = math.prod(batch)
    table = np.empty((nb, 5), np.int64)
    table[:, kernel.Q_OFF] = _batch_offsets(ops["q"], plan.q.shape, batch)
    table[:, kernel.K_OFF] = _batch_offsets(ops["k"], plan.k.shape, batch, plan.kv_group)
    table[:, kernel.V_OFF] = _batch_offsets(ops["v"], plan.v.shape, batch, plan.kv_group)
    table[:, kernel.KV_LEN] = (
        S if plan.kv_lengths is None else np.broadcast_to(plan.kv_lengths, batch).reshape(-1)
    )
    mask_kind, m_strides = kernel.NO_MASK, (0, 0)
    bmask, fmask = _dummy(cuda, np.bool_), _dummy(cuda, acc)
    table[:, kernel.M_OFF] = 0
    if plan.mask is not None:
        m = ops["mask"]
        table[:, kernel.M_OFF] = _batch_offsets(m, plan.mask.shape, batch)
        m_strides = _matrix_strides(m, plan.mask.shape)
        if plan.mask.dtype == np.bool_:
            mask_kind, bmask = kernel.BOOL_MASK, m.flat
        else:
            mask_kind, fmask = kernel.FLOAT_MASK, m.flat
    alibi = (
        np.zeros(nb, acc)
        if plan.alibi is None
        else (np.broadcast_to(plan.alibi, batch).reshape(-1).astype(acc))
    )
    sinks = (
        np.full(nb, -np.inf, acc)
        if plan.sinks is None
        else (np.broadcast_to(plan.sinks, batch).reshape(-1).astype(acc))
    )
    return (table, alibi, sinks), (bmask, fmask), m_strides, mask_kind


BACKEND = CudaBackend()
