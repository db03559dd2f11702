"""Attention layers on top of :func:`fastattn.attention`: projections, heads, output projection.

The seeds' convention is used throughout: a token is a row, a weight matrix has shape
``(d_in, d_out)`` and a projection is ``x @ w`` (PyTorch's ``nn.Linear`` stores the transpose).
The projections are plain NumPy matrix products; the attention itself is the fused kernel.
"""

from __future__ import annotations

import numbers

import numpy as np

from .._api import attention
from .._validate import broadcast_shapes, check_dtype, native_dtype, shapes_of


def _dtypes(**arrays: np.ndarray) -> tuple[np.dtype, np.dtype]:
    """(dtype the projections compute in, dtype handed to the kernel), as ``attention`` promotes.

    Integer and bool inputs compute in float64; float16 and bfloat16 accumulate in float32 and are
    rounded back, as a half-precision model stores its activations.
    """
    for name, a in arrays.items():
        check_dtype(name, a)
    try:
        result = np.result_type(*(a.dtype for a in arrays.values()))
    except TypeError:  # numpy's DTypePromotionError, e.g. bfloat16 with float16 or an integer
        listed = ", ".join(f"{name} {a.dtype}" for name, a in arrays.items())
        raise TypeError(f"these dtypes have no common dtype: {listed}") from None
    result = native_dtype(result)  # big-endian inputs project to native-order arrays
    if result.kind in "iub":
        return np.dtype(np.float64), np.dtype(np.float64)
    if result.itemsize == 2:
        return np.dtype(np.float32), result
    return result, result


def _check_matrix(name: str, w: np.ndarray, rows: int, why: str, **context) -> None:
    if w.ndim != 2:
        raise ValueError(f"{name} must be 2-D (d_in, d_out); got {shapes_of(**{name: w})}")
    if w.shape[0] != rows:
        raise ValueError(
            f"{name} must have {rows} rows ({why}); got {shapes_of(**context, **{name: w})}"
        )


def _check_bias(name: str, b: np.ndarray | None, w_name: str, w: np.ndarray) -> None:
    if b is not None and b.shape != (w.shape[1],):
        raise ValueError(
            f"{name} must have shape ({w.shape[1]},), one entry per column of {w_name}; got "
            f"{shapes_of(**{name: b, w_name: w})}"
        )


def _linear(a: np.ndarray, w: np.ndarray, b: np.ndarray | None, compute, store) -> np.ndarray:
    """``a @ w + b`` accumulated in ``compute``, returned in ``store``; never writes to inputs."""
    y = np.matmul(a.astype(compute, copy=False), w.astype(compute, copy=False))
    if b is not None:
        y += b.astype(compute, copy=False)  # y is a fresh array: adding in place saves a copy
    return y.astype(store, copy=False)


def _optional(b) -> np.ndarray | None:
    return None if b is None else np.asarray(b)


def self_attention(x, w_q, w_k, w_v, *, b_q=None, b_k=None, b_v=None, **attention_kwargs):
    """Self-attention of embeddings: ``attention(x @ w_q + b_q, x @ w_k + b_k, x @ w_v + b_v)``.

    Each row of ``x`` is a token's embedding. It is projected to a query, a key and a value, and
    each token's output is the softmax-weighted sum of the values, weighted by how well its query
    matches every key (seeds 001-004).

    Parameters
    ----------
    x : array_like, shape (..., L, d_model)
        Token embeddings (with positional encoding added, if any). Leading axes are batch axes.
    w_q, w_k : array_like, shape (d_model, d_k)
        Query and key weights, used as ``x @ w`` (one column per output feature).
    w_v : array_like, shape (d_model, d_v)
        Value weights.
    b_q, b_k : array_like, shape (d_k,), optional
        Biases added to the queries and keys.
    b_v : array_like, shape (d_v,), optional
        Bias added to the values.
    **attention_kwargs
        Passed to :func:`fastattn.attention` (``mask``, ``causal``, ``scale``, ``return_weights``,
        ...). The default scale is ``1 / sqrt(d_k)``.

    Returns
    -------
    out : ndarray, shape (..., L, d_v)
        Or whatever :func:`fastattn.attention` returns for these keyword arguments, e.g.
        ``(out, weights)`` with ``return_weights=True``, weights of shape ``(..., L, L)``.

    Raises
    ------
    ValueError
        Shapes that do not fit (the message names them).
    TypeError
        Complex, object or string inputs, or dtypes with no common type.

    Notes
    -----
    The projections are computed in the dtype :func:`fastattn.attention` computes in: float32 and
    float64 as the inputs promote, integers and bools in float64, float16 and bfloat16 accumulated
    in float32 and rounded back to the input dtype. Inputs are never modified.

    Examples
    --------
    >>> import numpy as np
    >>> import fastattn
    >>> rng = np.random.default_rng(0)
    >>> x = rng.standard_normal((2, 5, 8), dtype=np.float32)
    >>> w_q, w_k, w_v = (rng.standard_normal((8, 4), dtype=np.float32) for _ in range(3))
    >>> out, weights = fastattn.self_attention(x, w_q, w_k, w_v, causal=True, return_weights=True)
    >>> out.shape, weights.shape, out.dtype
    ((2, 5, 4), (2, 5, 5), dtype('float32'))
    >>> ref = fastattn.reference.attention(x @ w_q, x @ w_k, x @ w_v, causal=True)
    >>> bool(np.allclose(out, ref, atol=1e-5))
    True
    """
    x, w_q, w_k, w_v = (np.asarray(a) for a in (x, w_q, w_k, w_v))
    b_q, b_k, b_v = _optional(b_q), _optional(b_k), _optional(b_v)
    biases = {n: b for n, b in (("b_q", b_q), ("b_k", b_k), ("b_v", b_v)) if b is not None}
    compute, store = _dtypes(x=x, w_q=w_q, w_k=w_k, w_v=w_v, **biases)
    if x.ndim < 2:
        raise ValueError(f"x must be at least 2-D (..., L, d_model); got {shapes_of(x=x)}")
    d_model = x.shape[-1]
    for name, w in (("w_q", w_q), ("w_k", w_k), ("w_v", w_v)):
        _check_matrix(name, w, d_model, "x's last axis, d_model", x=x)
    if w_q.shape[1] != w_k.shape[1]:
        raise ValueError(
            "w_q and w_k must have the same number of columns (d_k), since queries meet keys in a "
            f"dot product; got {shapes_of(w_q=w_q, w_k=w_k)}"
        )
    for name, b, w_name, w in (("b_q", b_q, "w_q", w_q), ("b_k", b_k, "w_k", w_k),
                               ("b_v", b_v, "w_v", w_v)):
        _check_bias(name, b, w_name, w)
    q = _linear(x, w_q, b_q, compute, store)
    k = _linear(x, w_k, b_k, compute, store)
    v = _linear(x, w_v, b_v, compute, store)
    return attention(q, k, v, **attention_kwargs)


def _check_heads(num_heads, num_kv_heads) -> tuple[int, int]:
    for name, n in (("num_heads", num_heads), ("num_kv_heads", num_kv_heads)):
        if isinstance(n, bool) or not isinstance(n, numbers.Integral):
            raise TypeError(f"{name} must be an int, got {n!r}")
        if n < 1:
            raise ValueError(f"{name} must be >= 1, got {n}")
    if num_heads % num_kv_heads:
        raise ValueError(
            f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads}): each "
            "key/value head serves a group of query heads"
        )
    return int(num_heads), int(num_kv_heads)


def _split_heads(a: np.ndarray, heads: int) -> np.ndarray:
    """(..., L, heads * d) -> (..., heads, L, d), a view of the projection (no copy)."""
    return np.swapaxes(a.reshape(a.shape[:-1] + (heads, a.shape[-1] // heads)), -2, -3)


def _merge_heads(a: np.ndarray) -> np.ndarray:
    """(..., heads, L, d) -> (..., L, heads * d): the heads' outputs side by side, per token."""
    a = np.swapaxes(a, -2, -3)
    return a.reshape(a.shape[:-2] + (a.shape[-2] * a.shape[-1],))


def multi_head_attention(x, w_q, w_k, w_v, w_o, *, num_heads, context=None, num_kv_heads=None,
                         b_q=None, b_k=None, b_v=None, b_o=None, **attention_kwargs):
    """Multi-head attention: project, split into heads, attend, concatenate the heads, project out.

    Query head ``h`` reads columns ``h * d_head : (h + 1) * d_head`` of ``x @ w_q``; key/value head
    ``g`` the same columns of ``context @ w_k`` and ``context @ w_v``. With ``num_kv_heads`` smaller
    than ``num_heads`` (grouped-query attention) query head ``h`` reads key/value head
    ``h // (num_heads // num_kv_heads)``, without repeating them. The heads' outputs are
    concatenated in head order and multiplied by ``w_o``.

    Parameters
    ----------
    x : array_like, shape (..., L, d_model)
        The sequence whose tokens ask (the queries). Leading axes are batch axes.
    w_q : array_like, shape (d_model, num_heads * d_head)
        Query weights, used as ``x @ w_q``.
    w_k : array_like, shape (d_context, num_kv_heads * d_head)
        Key weights, used as ``context @ w_k``.
    w_v : array_like, shape (d_context, num_kv_heads * d_v)
        Value weights; ``d_v`` (per head) may differ from ``d_head``.
    w_o : array_like, shape (num_heads * d_v, d_out)
        Output projection of the concatenated heads.
    num_heads : int
        Number of query heads; must divide ``w_q``'s columns.
    context : array_like, shape (..., S, d_context), optional
        The sequence that supplies keys and values (cross attention, e.g. a decoder attending to
        an encoder's output). Defaults to ``x`` (self-attention). Its batch axes broadcast
        against ``x``'s.
    num_kv_heads : int, optional
        Number of key/value heads (grouped-query attention); must divide ``num_heads``. Defaults
        to ``num_heads``.
    b_q, b_k, b_v, b_o : array_like, optional
        Biases of the four projections, one entry per column of the matching weight.
    **attention_kwargs
        Passed to :func:`fastattn.attention`, which sees ``q`` of shape
        ``(..., num_heads, L, d_head)`` and ``k``, ``v`` of ``(..., num_kv_heads, S, d)``: a mask
        broadcasts against ``(..., num_heads, L, S)`` (a key padding mask of shape ``(B, S)``
        becomes ``mask[:, None, None, :]``). The default scale is ``1 / sqrt(d_head)``.
        ``enable_gqa`` is set from ``num_kv_heads`` and may not be passed.

    Returns
    -------
    out : ndarray, shape (..., L, d_out)
        With ``return_weights=True`` (or other arguments that make :func:`fastattn.attention`
        return a tuple), a tuple whose first item is ``out`` and whose other items are the
        attention's, per head: e.g. ``(out, weights)`` with ``weights`` of shape
        ``(..., num_heads, L, S)`` (not averaged over heads).

    Raises
    ------
    ValueError
        Shapes that do not fit (the message names them), head counts that do not divide.
    TypeError
        Bad dtypes, non-integer head counts, or ``enable_gqa`` among the keyword arguments.

    Notes
    -----
    The head split is a view of each projection (a reshape and an axis swap), read by the kernel
    through its strides; only the merge before ``w_o`` copies, ``L x num_heads * d_v`` values.
    Dtypes are handled as in :func:`self_attention`. Inputs are never modified.

    Examples
    --------
    >>> import numpy as np
    >>> import fastattn
    >>> rng = np.random.default_rng(0)
    >>> x = rng.standard_normal((2, 6, 16), dtype=np.float32)
    >>> w_q, w_o = (rng.standard_normal((16, 16), dtype=np.float32) / 4 for _ in range(2))
    >>> w_k, w_v = (rng.standard_normal((16, 8), dtype=np.float32) / 4 for _ in range(2))
    >>> out, weights = fastattn.multi_head_attention(
    ...     x, w_q, w_k, w_v, w_o, num_heads=4, num_kv_heads=2, causal=True, return_weights=True)
    >>> out.shape, weights.shape
    ((2, 6, 16), (2, 4, 6, 6))
    """
    if "enable_gqa" in attention_kwargs:
        raise TypeError("multi_head_attention sets enable_gqa itself from num_kv_heads")
    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    num_heads, num_kv_heads = _check_heads(num_heads, num_kv_heads)
    x, w_q, w_k, w_v, w_o = (np.asarray(a) for a in (x, w_q, w_k, w_v, w_o))
    ctx = x if context is None else np.asarray(context)
    b_q, b_k, b_v, b_o = (_optional(b) for b in (b_q, b_k, b_v, b_o))
    named = {"x": x, "w_q": w_q, "w_k": w_k, "w_v": w_v, "w_o": w_o}
    if context is not None:
        named["context"] = ctx
    for name, b in (("b_q", b_q), ("b_k", b_k), ("b_v", b_v), ("b_o", b_o)):
        if b is not None:
            named[name] = b
    compute, store = _dtypes(**named)

    for name, a in (("x", x), ("context", ctx)):
        if a.ndim < 2:
            raise ValueError(f"{name} must be at least 2-D (..., length, features); got "
                             f"{shapes_of(**{name: a})}")
    if context is not None:
        try:
            broadcast_shapes(x.shape[:-2], ctx.shape[:-2])
        except ValueError:
            raise ValueError(
                "the batch axes of x and context do not broadcast; got "
                f"{shapes_of(x=x, context=ctx)}"
            ) from None
    ctx_name = "x" if context is None else "context"
    _check_matrix("w_q", w_q, x.shape[-1], "x's last axis", x=x)
    _check_matrix("w_k", w_k, ctx.shape[-1], f"{ctx_name}'s last axis", **{ctx_name: ctx})
    _check_matrix("w_v", w_v, ctx.shape[-1], f"{ctx_name}'s last axis", **{ctx_name: ctx})
    if w_q.shape[1] % num_heads:
        raise ValueError(
            f"w_q's columns must split into num_heads={num_heads} heads; got {shapes_of(w_q=w_q)}"
        )
    d_head = w_q.shape[1] // num_heads
    if w_k.shape[1] != num_kv_heads * d_head:
        raise ValueError(
            f"w_k must have num_kv_heads * d_head = {num_kv_heads} * {d_head} columns "
            f"(d_head = w_q's columns / num_heads = {num_heads}); got {shapes_of(w_q=w_q, w_k=w_k)}"
        )
    if w_v.shape[1] % num_kv_heads:
        raise ValueError(
            f"w_v's columns must split into num_kv_heads={num_kv_heads} heads; got "
            f"{shapes_of(w_v=w_v)}"
        )
    d_v = w_v.shape[1] // num_kv_heads
    _check_matrix("w_o", w_o, num_heads * d_v,
                  f"num_heads * d_v = {num_heads} * {d_v}, the concatenated heads", w_v=w_v)
    for name, b, w_name, w in (("b_q", b_q, "w_q", w_q), ("b_k", b_k, "w_k", w_k),
                               ("b_v", b_v, "w_v", w_v), ("b_o", b_o, "w_o", w_o)):
        _check_bias(name, b, w_name, w)

    q = _split_heads(_linear(x, w_q, b_q, compute, store), num_heads)
    k = _split_heads(_linear(ctx, w_k, b_k, compute, store), num_kv_heads)
    v = _split_heads(_linear(ctx, w_v, b_v, compute, store), num_kv_heads)
    result = attention(q, k, v, enable_gqa=num_kv_heads != num_heads, **attention_kwargs)
    heads, extras = (result[0], result[1:]) if isinstance(result, tuple) else (result, None)
    out = _linear(_merge_heads(heads), w_o, b_o, compute, store)
    return out if extras is None else (out, *extras)


