"""The public entry point, :func:`attention`."""

from __future__ import annotations

import numpy as np

from . import _core, backends  # backends.cuda imports numba only when the GPU is asked for
from ._gradients import gradient_dtype
from ._habits import explains_habits
from ._validate import Plan, is_half, prepare_backward

# backend= values the C-level fast path serves (NumPy inputs on the CPU kernel).
_PLAIN_BACKENDS = ("auto", "cpu")


@explains_habits
def attention(q, k, v, *, mask=None, causal=False, scale=None, enable_gqa=False,
              return_weights=False, num_threads=None, align="top_left", window=None,
              alibi_slopes=None, softcap=None, return_lse=False, kv_lengths=None,
              similarity="dot", sinks=None, backend="auto"):
    """Scaled dot-product attention, ``softmax(q kᵀ · scale + mask) v``, by a fused C++ kernel.

    The semantics are those of PyTorch's ``scaled_dot_product_attention``. The kernel never
    builds the ``L x S`` score matrix (unless ``return_weights`` asks for it), releases the GIL
    while it runs, and never modifies its inputs.

    Parameters
    ----------
    q : array_like, shape (..., L, E)
        Queries. Leading axes are batch axes and broadcast (NumPy rules) against k's and v's.
    k : array_like, shape (..., S, E)
        Keys.
    v : array_like, shape (..., S, Ev)
        Values.
    mask : array_like of bool or float, optional
        Broadcastable to ``(..., L, S)``. Bool: True means the key takes part. Float: added to the
        scaled scores. A broadcast mask is read by strides, never expanded.
    causal : bool, default False
        Query ``i`` attends to keys ``j <= i`` (top-left aligned, as PyTorch's ``is_causal``;
        see ``align``). Combines with ``mask`` and ``window``.
    scale : float, optional
        Multiplies ``q kᵀ``; defaults to ``1 / sqrt(E)``.
    enable_gqa : bool, default False
        Grouped-query attention: k and v may have ``Hkv`` heads on axis -3 where q has ``Hq``,
        ``Hq % Hkv == 0``; query head ``h`` reads kv head ``h // (Hq // Hkv)``, without copies.
    return_weights : bool, default False
        Also return the attention weights, shape ``(..., L, S)``, rows summing to 1.
    num_threads : int, optional
        Threads for this call. None uses all cores, within ``OMP_NUM_THREADS`` and threadpoolctl's
        limits. Never more than the cores this process may run on (its CPU affinity): a larger
        number runs one thread per core.
    align : {"top_left", "bottom_right"}, default "top_left"
        Where query ``i``'s diagonal sits when ``L != S``: key ``i`` (top-left, PyTorch) or key
        ``i + S - L`` (bottom-right, FlashAttention: the last query sees the last key, as a
        KV-cache decode step needs). Applies to ``causal``, ``window`` and ``alibi_slopes``.
    window : (int or None, int or None), optional
        Sliding window ``(left, right)``: query ``i`` sees key ``j`` only when
        ``d - left <= j <= d + right``, ``d`` its aligned diagonal; None leaves a side unbounded.
        Key blocks outside the band are never computed.
    alibi_slopes : array_like, shape (H,) or (B, H), optional
        ALiBi: adds ``-slope * |d - j|`` to the scores (``d`` the aligned diagonal). Broadcasts
        against the batch axes like any batch operand ((H,) is per head, axis -3).
    softcap : float, optional
        Scores become ``softcap * tanh(scores / softcap)`` after scaling, before masks and ALiBi.
    return_lse : bool, default False
        Also return the natural log-sum-exp of each row's final scores, shape ``(..., L)``,
        ``-inf`` for a row with no key (used to merge partial attentions exactly), in the
        compute dtype: float32 for float16 and bfloat16 inputs.
    kv_lengths : array_like of int, optional
        Key padding without a mask: in batch entry ``b`` only the first ``kv_lengths[b]`` keys
        take part. Its axes are the leading batch axes (shape ``(B,)`` for ``(B, H, L, E)``
        inputs), size-1 axes broadcast; values must lie in ``[0, S]``.
    similarity : {"dot", "cosine"}, default "dot"
        ``"cosine"`` scales query and key rows to unit length before the product (cosine
        similarity, as in the seed documents); ``scale`` still applies. A zero row stays zero.
    sinks : array_like, shape (H,) or (B, H), optional
        Attention sinks (gpt-oss): one logit per head that joins the softmax's denominator and
        nothing else, ``weights_j = exp(s_j) / (exp(sink) + sum_i exp(s_i))``, so a row may
        attend to "nothing". Broadcasts like ``alibi_slopes``; the lse includes it.
    backend : {"auto", "cpu", "cuda", "reference"}, default "auto"
        ``"auto"`` runs NumPy inputs on the CPU and inputs that live on a GPU (anything with
        ``__cuda_array_interface__``) on the GPU, returning device arrays for them. ``"cuda"`` on
        NumPy inputs copies them to the GPU and returns NumPy arrays. The GPU needs the ``cuda``
        extra (``pip install "fastattn[cuda]"``). ``"reference"`` computes the textbook formula
        in float64 with NumPy (:mod:`fastattn.reference`: slow, for checking), returning the
        same dtypes. The backends are those of :mod:`fastattn.backends`.

    Returns
    -------
    out : ndarray, shape (..., L, Ev)
        float32 or float64 as the inputs promote (``np.result_type``); integer and bool inputs
        compute in float64; float16 computes in float32 and is returned as float16.
    weights : ndarray, shape (..., L, S)
        Only with ``return_weights=True``.
    lse : ndarray, shape (..., L)
        Only with ``return_lse=True``. Outputs come as ``(out, weights?, lse?)`` in that order.
        In the compute dtype, not the output's: float32 for float16 and bfloat16 inputs (as
        FlashAttention's ``softmax_lse``), since a 16-bit lse is too coarse to rebuild the
        weights from or to merge partial results exactly (bfloat16 rounds an lse of 8 by up to
        0.016, every weight of the row by 1.6%); float32 and float64 as ``out``.

    Raises
    ------
    ValueError
        Shapes that do not fit (the message names them), a bad ``num_threads``, ``align``,
        ``window``, ``softcap`` or ``kv_lengths`` value.
    TypeError
        Complex, object or string inputs, a mask that is neither bool nor float.

    Notes
    -----
    A query row with no key left (all masked, or ``S == 0``) gives zeros, not NaN, as long as
    ``v`` is finite: the output is ``weights @ v``, and ``0 * NaN`` is NaN here as in the reference.

    A call made on Python's main thread runs the pending signal handlers about every 20 ms while
    the kernel works: Ctrl-C raises ``KeyboardInterrupt`` out of a long call within that time.

    Arrays in non-native byte order (``">f4"`` on a little-endian machine, byte-swapped
    bfloat16) are read as the values they hold, through a native-order copy; results come in
    the native-order dtype, equal bit for bit to those of the same values in native order.
    (Device arrays in non-native order are a TypeError.)

    Examples
    --------
    >>> import numpy as np
    >>> import fastattn
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((2, 4, 16, 8), dtype=np.float32) for _ in range(3))
    >>> out = fastattn.attention(q, k, v, causal=True)
    >>> out.shape, out.dtype
    ((2, 4, 16, 8), dtype('float32'))
    >>> bool(np.allclose(out, fastattn.reference.attention(q, k, v, causal=True), atol=1e-5))
    True
    """
    # The common call (no option but causal, scale and num_threads; NumPy arrays of one native
    # dtype and batch shape) is checked and run at C level; anything else, including every
    # call that needs an error message, takes the general path below.
    if (mask is None and enable_gqa is False and return_weights is False and return_lse is False
            and window is None and alibi_slopes is None and softcap is None and kv_lengths is None
            and align == "top_left" and similarity == "dot" and sinks is None
            and backend in _PLAIN_BACKENDS):
        out = _core.attention_plain(q, k, v, causal, scale, num_threads)
        if out is not None:
            return out
    impl = backends.select(backend, (q, k, v, mask))
    plan = impl.plan(q, k, v, mask=mask, causal=causal, scale=scale, enable_gqa=enable_gqa,
                     return_weights=return_weights, num_threads=num_threads, align=align,
                     window=window, alibi_slopes=alibi_slopes, softcap=softcap,
                     return_lse=return_lse, kv_lengths=kv_lengths, similarity=similarity,
                     sinks=sinks)
    return results(plan, backends.run(impl, plan))


def results(plan: Plan, outputs: tuple):
    """What ``attention`` returns for a plan, from a backend's (out, weights, lse)."""
    out, weights, lse = outputs
    found = [out] + [weights] * plan.return_weights + [lse] * plan.return_lse
    return out if len(found) == 1 else tuple(found)


def run(plan: Plan, backend: str = "cpu"):
    """Runs a prepared plan on a backend (the CPU's by default) and returns what ``attention``
    returns for it."""
    return results(plan, backends.run(backends.select(backend, ()), plan))


@explains_habits
def attention_backward(q, k, v, out, lse, dout, *, mask=None, causal=False, scale=None,
                       enable_gqa=False, num_threads=None, align="top_left", window=None,
                       alibi_slopes=None, softcap=None, kv_lengths=None, similarity="dot",
                       sinks=None, backend="auto"):
    """Gradients of :func:`attention` with respect to q, k and v, by a fused C++ kernel.

    The FlashAttention backward pass: the attention weights are recomputed block by block from
    the forward's log-sum-exp instead of being stored, so memory stays ``O((L + S) E)`` per
    thread, never ``O(L S)``. Key blocks outside a causal or sliding-window band, or past
    ``kv_lengths``, are skipped as in the forward.

    Parameters
    ----------
    q, k, v : array_like
        The forward's inputs.
    out, lse : array_like, shapes (..., L, Ev) and (..., L)
        What ``attention(q, k, v, return_lse=True, **options)`` returned for the same options.
    dout : array_like, shape (..., L, Ev)
        The gradient of the loss with respect to ``out``.
    mask, causal, scale, enable_gqa, num_threads, align, window, alibi_slopes, softcap, \
kv_lengths, similarity, sinks
        As for :func:`attention`, and the same as in the forward call.
    backend : {"auto", "cpu", "reference"}, default "auto"
        ``"auto"`` and ``"cpu"`` run the C++ kernel; ``"reference"`` the float64 NumPy formula
        (:func:`fastattn.reference.attention_backward`). ``"cuda"`` raises
        NotImplementedError: the CUDA backend has no backward pass yet.

    Returns
    -------
    dq, dk, dv : ndarray
        Shapes and dtypes of q, k and v (integer and bool inputs give float64). Where k and v
        broadcast along batch axes, or serve several query heads (``enable_gqa``), their
        gradients are the sums over those uses, as autograd gives. A query with no key has
        zero gradients; keys that take part in no row have zero ``dk`` and ``dv``.
    dsinks : ndarray
        Only with ``sinks``: their gradient, of their shape, ``-sum_i exp(sink - lse_i) D_i``
        with ``D_i = dout_i . out_i``, summed over the rows and batch entries each sink serves.

    Raises
    ------
    ValueError
        As :func:`attention`, and when ``out``, ``lse`` or ``dout`` do not have the forward's
        output shapes (the message names them).
    TypeError
        As :func:`attention`, and for ``out``, ``lse`` or ``dout`` that are not float arrays.

    Notes
    -----
    float32 and float64 compute in their own precision; float16 and bfloat16 in float32, with
    gradients returned in the input dtype. bfloat16 on AVX512-BF16 (where the forward multiplies
    bfloat16 pairs) multiplies bfloat16 pairs too, with float32 sums, the weights P and dS
    rounded to bfloat16 for their products. For 16-bit inputs the forward returns ``lse`` in
    float32, which is used as given; a 16-bit ``lse`` (rounded by the caller) is too coarse to
    rebuild the weights from, and is recomputed in float32 instead. Arrays in non-native byte
    order are read as their values, as by :func:`attention`; gradients come in native order.

    Examples
    --------
    >>> import numpy as np
    >>> import fastattn
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((2, 4, 16, 8)) for _ in range(3))
    >>> out, lse = fastattn.attention(q, k, v, causal=True, return_lse=True)
    >>> dout = np.ones_like(out)  # the gradient of out.sum()
    >>> dq, dk, dv = fastattn.attention_backward(q, k, v, out, lse, dout, causal=True)
    >>> ref = fastattn.reference.attention_backward(q, k, v, out, lse, dout, causal=True)
    >>> all(np.allclose(a, b, rtol=1e-10, atol=1e-12) for a, b in zip((dq, dk, dv), ref))
    True
    """
    impl = backends.select(backend, (q, k, v))
    # A float32 lse of 16-bit inputs (what the forward returns) is used as given.
    lse_exact = not is_half(np.asarray(lse).dtype)
    plan, out, lse, dout = prepare_backward(
        q, k, v, out, lse, dout, mask=mask, causal=causal, scale=scale, enable_gqa=enable_gqa,
        num_threads=num_threads, align=align, window=window, alibi_slopes=alibi_slopes,
        softcap=softcap, kv_lengths=kv_lengths, similarity=similarity, sinks=sinks)
    dtypes = tuple(gradient_dtype(np.asarray(a).dtype, plan) for a in (q, k, v))
    if sinks is not None:
        dtypes += (gradient_dtype(np.asarray(sinks).dtype, plan),)
    return impl.backward(plan, out, lse, dout, dtypes, not lse_exact)
