"""fastattn on PyTorch tensors, as the custom operator ``torch.ops.fastattn.attention``.

``import fastattn.torch`` imports torch; ``import fastattn`` never does. CPU tensors reach the
C++ kernel without copies (``Tensor.numpy()`` shares memory; bfloat16 through a view of its
bits), any strides, and the results come back as tensors over the kernel's own output arrays.

The operator always returns ``(out, lse, weights)``: the log-sum-exp is what the backward pass
needs, and costs the kernel one number per query row. Autograd runs fastattn's fused backward
kernel (:func:`fastattn.attention_backward`) as a second operator,
``torch.ops.fastattn.attention_backward``, so ``torch.compile`` traces training steps too.
:func:`attention` returns what :func:`fastattn.attention` returns for the same flags.
"""

from __future__ import annotations

import inspect
import numbers
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from . import _core, backends
from ._api import attention as _np_attention
from ._habits import explains_habits
from ._validate import checked_flags, native, prepare, stand_in, window_bounds

__all__ = ["attention", "attention_with_kvcache"]

_NO_GRAD_FOR = (
    "fastattn.torch.attention differentiates with respect to q, k, v and sinks; not with "
    "respect to mask or alibi_slopes (detach them)"
)


def _bfloat16() -> np.dtype:
    import ml_dtypes  # only where bfloat16 tensors are used

    return np.dtype(ml_dtypes.bfloat16)


# Built at import, outside any fake-tensor mode (where a tensor cannot answer .numpy()).
_NUMPY_DTYPES = {t: torch.empty(0, dtype=t).numpy().dtype for t in (
    torch.float16, torch.float32, torch.float64, torch.int8, torch.int16, torch.int32,
    torch.int64, torch.uint8, torch.bool, torch.complex64, torch.complex128)}


def _numpy_dtype(dtype: torch.dtype) -> np.dtype:
    """The NumPy dtype of a torch dtype (bfloat16: ml_dtypes'); TypeError naming it if none."""
    if dtype == torch.bfloat16:
        return _bfloat16()
    if dtype not in _NUMPY_DTYPES:
        raise TypeError(f"fastattn does not take tensors of dtype {dtype}")
    return _NUMPY_DTYPES[dtype]


_TORCH_DTYPES = {d: t for t, d in _NUMPY_DTYPES.items()}


def _torch_dtype(dtype: np.dtype) -> torch.dtype:
    return torch.bfloat16 if dtype.kind == "V" else _TORCH_DTYPES[dtype]


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    """A NumPy view of a CPU tensor: same memory, same strides. A lazily negated or conjugated
    view (``x.conj().imag``, ``x._neg_view()``) is read as its values, through a resolved copy."""
    if t.requires_grad:  # .numpy() refuses those; the op itself never records a graph
        t = t.detach()
    try:
        if t.dtype == torch.bfloat16:  # NumPy has no bfloat16: view the bits, as ml_dtypes' type
            return t.view(torch.int16).numpy().view(_bfloat16())
        return t.numpy()
    except RuntimeError:  # checked only here: the bits cost every call ~0.2 us a tensor to ask
        if not (t.is_neg() or t.is_conj()):
            raise
    return _to_numpy(t.resolve_conj().resolve_neg())


def _from_numpy(a: np.ndarray) -> torch.Tensor:
    if a.dtype.kind == "V":
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def _options(mask, causal, scale, enable_gqa, num_threads, align, window_left, window_right,
             alibi_slopes, softcap, kv_lengths, similarity, sinks) -> dict[str, Any]:
    return dict(mask=mask, causal=causal, scale=scale, enable_gqa=enable_gqa,
                num_threads=num_threads, align=align, window=(window_left, window_right),
                alibi_slopes=alibi_slopes, softcap=softcap, kv_lengths=kv_lengths,
                similarity=similarity, sinks=sinks)


_TENSOR_OPTIONS = ("mask", "alibi_slopes", "kv_lengths", "sinks")
# Module-level names for the common call's checks: each torch.X lookup costs ~40 ns of a 4 us call.
_Tensor, _F32, _F64 = torch.Tensor, torch.float32, torch.float64
_is_compiling, _grad_enabled = torch.compiler.is_compiling, torch.is_grad_enabled
# None unless a torch.func transform (vmap, grad, ...) runs: then the tensors are functorch's
# wrappers, which have no storage to read (80 ns; asking each tensor, 200 ns). A torch without
# functorch has no transforms.
_transform: Callable[[], object] = getattr(
    getattr(torch._C, "_functorch", None), "peek_interpreter_stack", None) or (lambda: None)


def _check_devices(q: torch.Tensor, **tensors) -> None:
    """ValueError naming the devices unless every tensor of ``tensors`` is on q's device (as
    torch's scaled_dot_product_attention refuses them: the kernel reads them all in one place)."""
    device = q.device
    wrong = [f"{name} on {t.device}" for name, t in tensors.items()
             if t is not None and t.device != device]
    if wrong:
        raise ValueError(f"fastattn.torch.attention takes every tensor on q's device ({device}); "
                         f"got {', '.join(wrong)}")


def _numpy_options(opts: dict) -> None:
    """The tensor options of ``opts`` (mask, alibi_slopes, kv_lengths, sinks) as NumPy views."""
    for name in _TENSOR_OPTIONS:
        if opts[name] is not None:
            opts[name] = _to_numpy(opts[name])


def _run_cpu(q, k, v, opts: dict, return_weights: bool, return_lse: bool):
    """(out, lse or None, weights or None) as NumPy arrays over CPU tensors' memory: out and
    weights in the output dtype, lse in the compute dtype (float32 for 16-bit inputs, as a
    backward pass wants it), as :func:`fastattn.attention` returns them."""
    _numpy_options(opts)
    plan = prepare(_to_numpy(q), _to_numpy(k), _to_numpy(v), **opts,
                   return_weights=return_weights, return_lse=return_lse)
    out, weights, lse = backends.run(backends.select("cpu", ()), plan)
    return out, lse, weights


def _attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    causal: bool,
    scale: float | None,
    enable_gqa: bool,
    num_threads: int | None,
    align: str,
    window_left: int | None,
    window_right: int | None,
    alibi_slopes: torch.Tensor | None,
    softcap: float | None,
    kv_lengths: torch.Tensor | None,
    similarity: str,
    sinks: torch.Tensor | None,
    return_weights: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, lse, weights): lse in the compute dtype, weights empty unless ``return_weights``."""
    _check_devices(q, k=k, v=v, mask=mask, alibi_slopes=alibi_slopes, kv_lengths=kv_lengths,
                   sinks=sinks)
    opts = _options(mask, causal, scale, enable_gqa, num_threads, align, window_left,
                    window_right, alibi_slopes, softcap, kv_lengths, similarity, sinks)
    if q.device.type != "cpu":
        return _on_gpu(q, k, v, opts, return_weights)
    out, lse, weights = _run_cpu(q, k, v, opts, return_weights, True)
    return (_from_numpy(out), _from_numpy(lse),
            torch.empty(0, dtype=_torch_dtype(out.dtype)) if weights is None
            else _from_numpy(weights))


# The op's inputs by name, in its order: its autograd formula returns one gradient per input.
_ATTENTION_INPUTS = tuple(inspect.signature(_attention).parameters)
_attention_op = torch.library.custom_op("fastattn::attention", mutates_args=())(_attention)


def _on_gpu(q, k, v, opts, return_weights):
    """CUDA tensors on fastattn's Numba CUDA kernel (the ``cuda`` extra), in place."""
    if q.device.type != "cuda":
        raise ValueError(f"fastattn.torch takes CPU or CUDA tensors, got device {q.device}")
    results = _np_attention(q, k, v, **opts, return_weights=return_weights, return_lse=True,
                            backend="cuda")  # ImportError saying what to install without it
    out, lse = (torch.as_tensor(r, device=q.device) for r in (results[0], results[-1]))
    weights = (torch.as_tensor(results[1], device=q.device) if return_weights
               else out.new_empty(0))
    compute = torch.float64 if out.dtype == torch.float64 else torch.float32
    return out, lse.to(compute), weights


def _hint(n) -> int:
    """A size as an int; a symbolic one (dynamic shapes) by its hint, adding no guard, so a
    compiled graph is not specialized to one sequence length."""
    if isinstance(n, torch.SymInt):
        from torch.fx.experimental.symbolic_shapes import optimization_hint

        return int(optimization_hint(n))
    return int(n)


@_attention_op.register_fake
def _(q, k, v, mask, causal, scale, enable_gqa, num_threads, align, window_left, window_right,
      alibi_slopes, softcap, kv_lengths, similarity, sinks, return_weights):
    # prepare on zero-stride stand-ins: every check and shape rule of the real call, no data
    # (as fastattn.dask does for its graphs); the sizes out are taken from the symbolic shapes.
    _check_devices(q, k=k, v=v, mask=mask, alibi_slopes=alibi_slopes, kv_lengths=kv_lengths,
                   sinks=sinks)

    def fake(t):
        return None if t is None else stand_in(map(_hint, t.shape), _numpy_dtype(t.dtype))

    opts = _options(fake(mask), causal, scale, enable_gqa, num_threads, align, window_left,
                    window_right, fake(alibi_slopes), softcap, fake(kv_lengths), similarity,
                    fake(sinks))
    plan = prepare(fake(q), fake(k), fake(v), **opts, return_weights=return_weights)
    # Each batch axis from an operand that has it at full size (q first: under GQA the heads)
    batch = []
    for i, size in enumerate(plan.batch):
        for t in (q, k, v):
            j = t.dim() - 2 - len(plan.batch) + i
            if j >= 0 and _hint(t.shape[j]) == size:
                batch.append(t.shape[j])
                break
        else:
            batch.append(size)
    L, S, Ev = q.shape[-2], k.shape[-2], v.shape[-1]
    out = q.new_empty((*batch, L, Ev), dtype=_torch_dtype(plan.out_dtype))
    lse = q.new_empty((*batch, L), dtype=_torch_dtype(plan.dtype))
    weights = q.new_empty((*batch, L, S) if return_weights else (0,), dtype=out.dtype)
    return out, lse, weights


@torch.library.custom_op("fastattn::attention_backward", mutates_args=())
def _attention_backward_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    dout: torch.Tensor,
    mask: torch.Tensor | None,
    causal: bool,
    scale: float | None,
    enable_gqa: bool,
    num_threads: int | None,
    align: str,
    window_left: int | None,
    window_right: int | None,
    alibi_slopes: torch.Tensor | None,
    softcap: float | None,
    kv_lengths: torch.Tensor | None,
    similarity: str,
    sinks: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, dsinks) by :func:`fastattn.attention_backward`; dsinks empty without sinks."""
    _check_devices(q, k=k, v=v, out=out, lse=lse, dout=dout, mask=mask, alibi_slopes=alibi_slopes,
                   kv_lengths=kv_lengths, sinks=sinks)
    if q.device.type != "cpu":
        raise NotImplementedError("fastattn's backward pass runs on the CPU only: the CUDA "
                                  "backend has a forward kernel, not yet a backward one")
    from ._api import attention_backward

    opts = _options(mask, causal, scale, enable_gqa, num_threads, align, window_left,
                    window_right, alibi_slopes, softcap, kv_lengths, similarity, sinks)
    _numpy_options(opts)
    grads = attention_backward(*(_to_numpy(t) for t in (q, k, v, out, lse, dout)), **opts)
    # Contiguous, as the fake implementation says (the kernel's sums over broadcast axes can
    # come back in other layouts).
    dq, dk, dv = (_from_numpy(np.ascontiguousarray(g)) for g in grads[:3])
    dsinks = _from_numpy(np.ascontiguousarray(grads[3])) if sinks is not None else q.new_empty(0)
    return dq, dk, dv, dsinks


@_attention_backward_op.register_fake
def _(q, k, v, out, lse, dout, mask, causal, scale, enable_gqa, num_threads, align, window_left,
      window_right, alibi_slopes, softcap, kv_lengths, similarity, sinks):
    _check_devices(q, k=k, v=v, out=out, lse=lse, dout=dout, mask=mask, alibi_slopes=alibi_slopes,
                   kv_lengths=kv_lengths, sinks=sinks)
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape),
            q.new_empty(0) if sinks is None else sinks.new_empty(sinks.shape))


def _setup_context(ctx, inputs, output):
    x = dict(zip(_ATTENTION_INPUTS, inputs))
    out, lse, _weights = output
    ctx.save_for_backward(*(x[name] for name in ("q", "k", "v")), out, lse,
                          *(x[name] for name in ("mask", "alibi_slopes", "kv_lengths", "sinks")))
    ctx.options = tuple(x[name] for name in (
        "causal", "scale", "enable_gqa", "num_threads", "align", "window_left", "window_right",
        "softcap", "similarity"))
    # Unused outputs then get None, not zeros: a gradient through lse or the weights is told
    # apart from none without looking at the data.
    ctx.set_materialize_grads(False)


def _backward(ctx, dout, dlse, dweights):
    """The gradient through ``out`` by the fused backward kernel (attention_backward)."""
    if dlse is not None or dweights is not None:
        raise NotImplementedError(
            "fastattn.torch computes gradients through the attention output only, not through "
            "the returned lse or weights")
    q, k, v, out, lse, mask, alibi_slopes, kv_lengths, sinks = ctx.saved_tensors
    if dout is None:
        return (None,) * len(_ATTENTION_INPUTS)
    (causal, scale, enable_gqa, num_threads, align, window_left, window_right, softcap,
     similarity) = ctx.options
    # Under torch.func transforms, the op through an autograd.Function that they take
    backward = (_attention_backward_op if _is_compiling() or _transform() is None
                else _AttentionBackwardFunction.apply)
    dq, dk, dv, dsinks = backward(
        q, k, v, out, lse, dout, mask, causal, scale, enable_gqa, num_threads, align,
        window_left, window_right, alibi_slopes, softcap, kv_lengths, similarity, sinks)
    grads = dict.fromkeys(_ATTENTION_INPUTS)  # one per input of the op, in its order
    grads.update(q=dq, k=dk, v=dv, sinks=dsinks if sinks is not None else None)
    return tuple(grads.values())


_attention_op.register_autograd(_backward, setup_context=_setup_context)


class _AttentionFunction(torch.autograd.Function):
    """The op with its autograd formula, for calls under torch.func transforms (vmap, grad,
    vjp, jacrev): the autograd a custom op registers is not one they take. Batched (vmap) by
    running the op and its backward on the batched tensors."""

    generate_vmap_rule = True

    @staticmethod
    def forward(*inputs):
        return _attention_op(*inputs)

    setup_context = staticmethod(_setup_context)
    backward = staticmethod(_backward)


class _AttentionBackwardFunction(torch.autograd.Function):
    """The backward op under torch.func transforms, where grad of grad reaches it: an error
    saying so, as the op's own autograd gives outside them."""

    generate_vmap_rule = True

    @staticmethod
    def forward(*inputs):
        return _attention_backward_op(*inputs)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *grads):
        raise NotImplementedError("fastattn.torch computes first derivatives only: its backward "
                                  "pass has no gradient of its own")


def _real(name: str, x) -> float | None:
    if x is None:
        return None
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {x!r}")
    return float(x)


def _tensor(x, device: torch.device) -> torch.Tensor | None:
    """Array-likes (NumPy arrays, lists) for the op's tensor arguments, on ``device`` (q's); a
    NumPy array in either byte order, read as its values."""
    if x is None or isinstance(x, torch.Tensor):
        return x
    t = _from_numpy(native(np.ascontiguousarray(x)))
    return t if device.type == "cpu" else t.to(device)


@explains_habits
def attention(q, k, v, *, mask=None, causal=False, scale=None, enable_gqa=False,
              return_weights=False, num_threads=None, align="top_left", window=None,
              alibi_slopes=None, softcap=None, return_lse=False, kv_lengths=None,
              similarity="dot", sinks=None):
    """:func:`fastattn.attention` on PyTorch tensors, through the custom op ``fastattn::attention``.

    Takes every argument of :func:`fastattn.attention` with the same meaning (``mask``,
    ``alibi_slopes``, ``kv_lengths`` and ``sinks`` as tensors or array-likes) and returns what it
    returns, as tensors: ``out`` in the inputs' dtype (float32, float64, float16, bfloat16; the
    16-bit ones computed in float32), ``lse`` in the compute dtype (float32 for 16-bit inputs).
    CPU tensors are read and written without copies, in any strides; CUDA tensors run on
    fastattn's CUDA kernel (``pip install "fastattn[cuda]"``). ``torch.compile`` (also with
    ``fullgraph=True``) and ``torch.export`` trace through it as one operator.

    Differentiable (autograd) with respect to q, k, v and sinks, through the output; the
    gradient is fastattn's fused backward kernel. Not with respect to mask or alibi_slopes, nor
    through the returned lse or weights. Under torch.func's ``vmap`` (the op once per batch
    entry), ``grad``, ``vjp`` and ``jacrev`` too; not forward mode (``jvp``), nor second
    derivatives.

    Raises
    ------
    NotImplementedError
        mask or alibi_slopes require grad, or a gradient flows into the returned lse or weights.
    ValueError, TypeError
        As :func:`fastattn.attention`; ValueError also where a tensor argument is not on q's
        device.

    Examples
    --------
    >>> import torch, fastattn.torch
    >>> q = k = v = torch.randn(2, 4, 16, 8)
    >>> fastattn.torch.attention(q, k, v, causal=True).shape
    torch.Size([2, 4, 16, 8])
    """
    if (mask is None and alibi_slopes is None and kv_lengths is None and sinks is None
            and softcap is None and window is None and enable_gqa is False
            and return_weights is False and return_lse is False and align == "top_left"
            and similarity == "dot"
            and type(q) is _Tensor and type(k) is _Tensor and type(v) is _Tensor
            and not _is_compiling()  # (first: what follows does not trace)
            and _transform() is None
            and q.is_cpu and k.is_cpu and v.is_cpu
            and not (q.is_neg() or k.is_neg() or v.is_neg())  # a lazily negated view
            and not (_grad_enabled()
                     and (q.requires_grad or k.requires_grad or v.requires_grad))):
        # The common call, as fastattn.attention takes it: checked and run at C level, the
        # tensors read through data_ptr() and stride() (a 5 us call spent 1.6 us in .numpy()
        # views and 1.5 us in this function's general checks); None: the general path below.
        plain = _core.attention_plain_tensors(q, k, v, causal, scale, num_threads, _F32, _F64)
        if plain is not None:
            return torch.from_numpy(plain)
    if not (isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor)
            and isinstance(v, torch.Tensor)):
        raise TypeError("fastattn.torch.attention takes torch tensors q, k and v; got "
                        f"{type(q).__name__}, {type(k).__name__}, {type(v).__name__} "
                        "(fastattn.attention takes NumPy arrays)")
    checked_flags(causal=causal, enable_gqa=enable_gqa, return_weights=return_weights,
                  return_lse=return_lse)
    left, right = (None, None) if window is None else window_bounds(window)
    if not (mask is None and alibi_slopes is None and kv_lengths is None and sinks is None):
        device = q.device
        mask, alibi_slopes, kv_lengths, sinks = (
            _tensor(mask, device), _tensor(alibi_slopes, device), _tensor(kv_lengths, device),
            _tensor(sinks, device))
    needs_grad = torch.is_grad_enabled() and (
        q.requires_grad or k.requires_grad or v.requires_grad
        or (sinks is not None and sinks.requires_grad))
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                       for t in (mask, alibi_slopes)):
        raise NotImplementedError(_NO_GRAD_FOR)
    if scale is not None or softcap is not None:
        scale, softcap = _real("scale", scale), _real("softcap", softcap)
    _check_devices(q, k=k, v=v, mask=mask, alibi_slopes=alibi_slopes, kv_lengths=kv_lengths,
                   sinks=sinks)
    out, lse, weights = _run(q, k, v, needs_grad, (
        mask, bool(causal), scale, bool(enable_gqa), num_threads, align, left, right,
        alibi_slopes, softcap, kv_lengths, similarity, sinks), bool(return_weights), return_lse)
    results = [out] + [weights] * bool(return_weights) + [lse] * bool(return_lse)
    return out if len(results) == 1 else tuple(results)


def _run(q, k, v, needs_grad: bool, args: tuple, return_weights: bool, return_lse: bool):
    """(out, lse, weights) as tensors (lse and weights None where not asked for, on the eager
    path); ``args`` are the op's arguments between v and return_weights."""
    if (type(q) is type(k) is type(v) is torch.Tensor and q.is_cpu and not needs_grad
            and not torch.compiler.is_compiling() and _transform() is None):
        # Eager CPU calls skip the dispatcher (~10 us) and convert only what they return; the
        # op's own function runs, so the two paths cannot differ.
        opts = _options(*args)
        out, lse, weights = _run_cpu(q, k, v, opts, return_weights, return_lse)
        return (_from_numpy(out), None if lse is None else _from_numpy(lse),
                None if weights is None else _from_numpy(weights))
    # Under torch.func transforms, the op through an autograd.Function that they take
    op = (_attention_op if _is_compiling() or _transform() is None
          else _AttentionFunction.apply)
    return op(q, k, v, *args, return_weights)


# --- attention over a KV cache ----------------------------------------------------------------

def _attention_with_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor | None,
    v: torch.Tensor | None,
    cache_seqlens: torch.Tensor,
    block_table: torch.Tensor | None,
    cache_batch_idx: torch.Tensor | None,
    num_splits: int,
    causal: bool,
    scale: float | None,
    window_left: int | None,
    window_right: int | None,
    alibi_slopes: torch.Tensor | None,
    softcap: float | None,
    sinks: torch.Tensor | None,
    num_threads: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse): fastattn.attention_with_kvcache on CPU tensors, the caches written in place
    through NumPy views of their memory."""
    _check_devices(q, k_cache=k_cache, v_cache=v_cache, k=k, v=v, cache_seqlens=cache_seqlens,
                   block_table=block_table, cache_batch_idx=cache_batch_idx,
                   alibi_slopes=alibi_slopes, sinks=sinks)
    if q.device.type != "cpu":
        raise NotImplementedError("fastattn.torch.attention_with_kvcache runs on CPU tensors; "
                                  f"got {q.device}")
    from ._kvcache import attention_with_kvcache as kv_attention

    def view(t):
        return None if t is None else _to_numpy(t)

    out, lse = kv_attention(
        view(q), _to_numpy(k_cache), _to_numpy(v_cache), view(k), view(v),
        cache_seqlens=view(cache_seqlens), block_table=view(block_table),
        cache_batch_idx=view(cache_batch_idx), num_splits=num_splits, causal=causal,
        scale=scale, window=None if window_left is None and window_right is None
        else (window_left, window_right), alibi_slopes=view(alibi_slopes), softcap=softcap,
        sinks=view(sinks), return_lse=True, num_threads=num_threads)
    return _from_numpy(out), _from_numpy(lse)


_kvcache_op = torch.library.custom_op("fastattn::attention_with_kvcache",
                                      mutates_args=("k_cache", "v_cache"))(_attention_with_kvcache)


@_kvcache_op.register_fake
def _(q, k_cache, v_cache, k, v, cache_seqlens, block_table, cache_batch_idx, num_splits,
      causal, scale, window_left, window_right, alibi_slopes, softcap, sinks, num_threads):
    B, H, L = q.shape[:3]
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    return (q.new_empty((B, H, L, v_cache.shape[-1])), q.new_empty((B, H, L), dtype=compute))


@explains_habits
def attention_with_kvcache(q, k_cache, v_cache, k=None, v=None, *, cache_seqlens,
                           block_table=None, cache_batch_idx=None, num_splits=0, causal=False,
                           scale=None, window=None, alibi_slopes=None, softcap=None, sinks=None,
                           return_lse=False, num_threads=None):
    """:func:`fastattn.attention_with_kvcache` on PyTorch CPU tensors, as the custom operator
    ``torch.ops.fastattn.attention_with_kvcache``, which declares that it writes ``k_cache``
    and ``v_cache`` (so ``torch.compile`` traces it). Inference only: no gradients.

    ``cache_seqlens``, ``block_table`` and ``cache_batch_idx`` are integer tensors (or, like
    ``alibi_slopes`` and ``sinks``, anything ``torch.as_tensor`` takes). Returns ``out``, or
    ``(out, lse)`` with ``return_lse``.

    Examples
    --------
    >>> import torch, fastattn.torch
    >>> k_cache = torch.zeros(1, 2, 32, 16)
    >>> v_cache = torch.zeros_like(k_cache)
    >>> q, k, v = torch.randn(1, 4, 1, 16), torch.randn(1, 2, 1, 16), torch.randn(1, 2, 1, 16)
    >>> out = fastattn.torch.attention_with_kvcache(q, k_cache, v_cache, k, v,
    ...                                             cache_seqlens=torch.tensor([3]))
    >>> out.shape, bool((k_cache[0, :, 3] == k[0, :, 0]).all())
    (torch.Size([1, 4, 1, 16]), True)
    """
    left, right = window_bounds(window)
    if causal is not True and causal is not False:
        raise TypeError(f"causal must be True or False, got {causal!r}")
    if isinstance(num_splits, bool) or not isinstance(num_splits, numbers.Integral):
        raise TypeError(f"num_splits must be an int >= 0, got {num_splits!r}")
    device = q.device

    def tensor(x):
        return None if x is None else _tensor(x, device)

    out, lse = _kvcache_op(q, k_cache, v_cache, k, v, tensor(cache_seqlens), tensor(block_table),
                           tensor(cache_batch_idx), int(num_splits), causal,
                           _real("scale", scale), left, right, tensor(alibi_slopes),
                           _real("softcap", softcap), tensor(sinks), num_threads)
    return (out, lse) if return_lse else out
