"""``MultiHeadAttention``: a layer object that owns its weights, for people who think in layers."""

from __future__ import annotations

import math
import numbers

import numpy as np

from .._validate import is_bfloat16
from .layers import multi_head_attention


def _glorot_uniform(rng: np.random.Generator, fan_in: int, fan_out: int, dtype) -> np.ndarray:
    # Glorot & Bengio (2010): U(-a, a), a = sqrt(6 / (fan_in + fan_out)), keeps the variance of
    # activations and of gradients about equal across the layer. Drawn in float64 so that the
    # same seed gives the same weights (rounded) in every dtype.
    limit = math.sqrt(6.0 / (fan_in + fan_out)) if fan_in + fan_out else 0.0
    return rng.uniform(-limit, limit, size=(fan_in, fan_out)).astype(dtype)


class MultiHeadAttention:
    """A multi-head attention layer with its own weights, run by :func:`multi_head_attention`.

    Parameters
    ----------
    d_model : int
        Features per token, of the input and of the output.
    num_heads : int
        Number of query heads.
    num_kv_heads : int, optional
        Number of key/value heads (grouped-query attention); must divide ``num_heads``. Defaults
        to ``num_heads``.
    d_head : int, optional
        Features per head (queries, keys and values). Defaults to ``d_model // num_heads``, which
        then must divide exactly.
    bias : bool, default True
        Whether the four projections have biases (initialized to zero, as PyTorch does).
    dtype : dtype, default np.float32
        Dtype of the weights: float16, bfloat16 (``ml_dtypes.bfloat16``), float32 or float64.
    seed : int, numpy.random.SeedSequence or numpy.random.Generator, optional
        Seeds ``np.random.default_rng`` for the Glorot/Xavier-uniform initialization of ``w_q``,
        ``w_k``, ``w_v`` and ``w_o``, drawn in that order. The same seed gives the same weights.

    Attributes
    ----------
    w_q : ndarray, shape (d_model, num_heads * d_head)
    w_k, w_v : ndarray, shape (d_model, num_kv_heads * d_head)
    w_o : ndarray, shape (num_heads * d_head, d_model)
        The projections, used as ``x @ w``. They may be replaced by arrays of the same shape.
    b_q, b_k, b_v, b_o : ndarray or None
        Biases, one entry per column of the matching weight; None with ``bias=False``.
    d_model, num_heads, num_kv_heads, d_head : int

    Examples
    --------
    >>> import numpy as np
    >>> import fastattn
    >>> layer = fastattn.MultiHeadAttention(16, num_heads=4, num_kv_heads=2, seed=0)
    >>> layer
    MultiHeadAttention(d_model=16, num_heads=4, num_kv_heads=2, d_head=4, bias=True, dtype=float32)
    >>> layer.w_q.shape, layer.w_k.shape, layer.w_o.shape
    ((16, 16), (16, 8), (16, 16))
    >>> x = np.random.default_rng(1).standard_normal((3, 7, 16), dtype=np.float32)
    >>> layer(x, causal=True).shape
    (3, 7, 16)
    >>> memory = np.zeros((3, 5, 16), dtype=np.float32)  # e.g. an encoder's output
    >>> out, weights = layer(x, context=memory, return_weights=True)
    >>> out.shape, weights.shape
    ((3, 7, 16), (3, 4, 7, 5))
    """

    def __init__(self, d_model, num_heads, *, num_kv_heads=None, d_head=None, bias=True,
                 dtype=np.float32, seed=None):
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        for name, n, low in (("d_model", d_model, 1), ("num_heads", num_heads, 1),
                             ("num_kv_heads", num_kv_heads, 1),
                             ("d_head", 1 if d_head is None else d_head, 1)):
            if isinstance(n, bool) or not isinstance(n, numbers.Integral):
                raise TypeError(f"{name} must be an int, got {n!r}")
            if n < low:
                raise ValueError(f"{name} must be >= {low}, got {n}")
        if num_heads % num_kv_heads:
            raise ValueError(
                f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})"
            )
        if d_head is None:
            if d_model % num_heads:
                raise ValueError(
                    f"d_model ({d_model}) is not a multiple of num_heads ({num_heads}); "
                    "pass d_head"
                )
            d_head = d_model // num_heads
        dtype = np.dtype(dtype)
        if not ((dtype.kind == "f" and dtype.itemsize <= 8) or is_bfloat16(dtype)):
            raise TypeError(
                f"dtype {dtype} is not a float dtype fastattn takes (float16, bfloat16, float32, "
                "float64)"
            )
        self.d_model, self.num_heads = int(d_model), int(num_heads)
        self.num_kv_heads, self.d_head = int(num_kv_heads), int(d_head)
        self.dtype = dtype
        rng = np.random.default_rng(seed)
        q_cols, kv_cols = self.num_heads * self.d_head, self.num_kv_heads * self.d_head
        self.w_q = _glorot_uniform(rng, self.d_model, q_cols, dtype)
        self.w_k = _glorot_uniform(rng, self.d_model, kv_cols, dtype)
        self.w_v = _glorot_uniform(rng, self.d_model, kv_cols, dtype)
        self.w_o = _glorot_uniform(rng, q_cols, self.d_model, dtype)
        zeros = (lambda n: np.zeros(n, dtype)) if bias else (lambda n: None)
        self.b_q, self.b_k, self.b_v, self.b_o = (zeros(q_cols), zeros(kv_cols), zeros(kv_cols),
                                                  zeros(self.d_model))

    def __call__(self, x, context=None, **attention_kwargs):
        """Attention of ``x`` over itself, or over ``context`` (cross attention).

        Parameters
        ----------
        x : array_like, shape (..., L, d_model)
        context : array_like, shape (..., S, d_model), optional
            Supplies keys and values; defaults to ``x``.
        **attention_kwargs
            Passed to :func:`fastattn.attention` through :func:`multi_head_attention` (``mask``,
            ``causal``, ``return_weights``, ...).

        Returns
        -------
        out : ndarray, shape (..., L, d_model)
            Or a tuple ``(out, ...)`` as :func:`multi_head_attention` returns it.
        """
        return multi_head_attention(
            x, self.w_q, self.w_k, self.w_v, self.w_o, num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads, context=context, b_q=self.b_q, b_k=self.b_k,
            b_v=self.b_v, b_o=self.b_o, **attention_kwargs,
        )

    def __repr__(self) -> str:
        return (f"MultiHeadAttention(d_model={self.d_model}, num_heads={self.num_heads}, "
                f"num_kv_heads={self.num_kv_heads}, d_head={self.d_head}, "
                f"bias={self.b_q is not None}, dtype={self.dtype})")
