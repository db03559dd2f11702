"""The public entry point, :func:`attention`."""

from __future__ import annotations

from . import _cpu
from ._validate import prepare


def attention(q, k, v, *, mask=None, causal=False, scale=None, enable_gqa=False,
              return_weights=False, num_threads=None):
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
        Query ``i`` attends to keys ``j <= i`` (top-left aligned, as PyTorch's ``is_causal``).
        Combines with ``mask``.
    scale : float, optional
        Multiplies ``q kᵀ``; defaults to ``1 / sqrt(E)``.
    enable_gqa : bool, default False
        Grouped-query attention: k and v may have ``Hkv`` heads on axis -3 where q has ``Hq``,
        ``Hq % Hkv == 0``; query head ``h`` reads kv head ``h // (Hq // Hkv)``, without copies.
    return_weights : bool, default False
        Also return the attention weights, shape ``(..., L, S)``, rows summing to 1.
    num_threads : int, optional
        Threads for this call. None uses all cores, within ``OMP_NUM_THREADS`` and threadpoolctl's
        limits.

    Returns
    -------
    out : ndarray, shape (..., L, Ev)
        float32 or float64 as the inputs promote (``np.result_type``); integer and bool inputs
        compute in float64; float16 computes in float32 and is returned as float16.
    weights : ndarray, shape (..., L, S)
        Only with ``return_weights=True``.

    Raises
    ------
    ValueError
        Shapes that do not fit (the message names them), or a bad ``num_threads``.
    TypeError
        Complex, object or string inputs, a mask that is neither bool nor float.

    Notes
    -----
    A query row with no key left (all masked, or ``S == 0``) gives zeros, never NaN.

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
    plan = prepare(q, k, v, mask=mask, causal=causal, scale=scale, enable_gqa=enable_gqa,
                   return_weights=return_weights, num_threads=num_threads)
    out, weights = _cpu.run(plan)
    return (out, weights) if plan.return_weights else out
