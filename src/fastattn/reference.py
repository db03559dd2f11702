"""The oracle: attention as the textbook formula, in NumPy float64.

Every backend is tested against this module. It takes the same arguments as
:func:`fastattn.attention` and goes through the same argument checks, then computes
``softmax(q kᵀ · scale + mask) v`` directly, building the full ``L x S`` score matrix.
"""

from __future__ import annotations

import numpy as np

from ._validate import Plan, prepare


def attention(q, k, v, *, mask=None, causal=False, scale=None, enable_gqa=False,
              return_weights=False, num_threads=None):
    """Reference scaled dot-product attention; same contract as :func:`fastattn.attention`.

    ``num_threads`` is accepted for symmetry and ignored.

    Examples
    --------
    >>> import numpy as np
    >>> from fastattn import reference
    >>> q = k = v = np.eye(2)
    >>> reference.attention(q, k, v, scale=0.0)
    array([[0.5, 0.5],
           [0.5, 0.5]])
    """
    plan = prepare(q, k, v, mask=mask, causal=causal, scale=scale, enable_gqa=enable_gqa,
                   return_weights=return_weights, num_threads=num_threads)
    out, weights = attention_in(np.float64, plan)
    out = out.astype(plan.out_dtype)
    return (out, weights.astype(plan.out_dtype)) if plan.return_weights else out


def attention_in(dtype, plan: Plan) -> tuple[np.ndarray, np.ndarray]:
    """(output, weights) of a prepared plan, the formula evaluated in ``dtype``.

    Tests use it to measure how far a plain float32 computation of the same formula is from
    float64: that error sets the tolerance of the float32 kernels.
    """
    q, k, v = (plan.q.astype(dtype), plan.k.astype(dtype), plan.v.astype(dtype))
    if plan.kv_group > 1:  # q head h reads kv head h // group
        k = np.repeat(k, plan.kv_group, axis=-3)
        v = np.repeat(v, plan.kv_group, axis=-3)
    scores = q @ np.swapaxes(k, -1, -2) * np.asarray(plan.scale, dtype)
    keep = np.ones((plan.L, plan.S), dtype=bool)
    if plan.causal:
        keep = np.tri(plan.L, plan.S, dtype=bool)  # query i sees keys j <= i
    if plan.mask is not None and plan.mask.dtype == np.bool_:
        keep = keep & plan.mask
    elif plan.mask is not None:
        scores = scores + plan.mask.astype(dtype)
    scores = np.where(keep, scores, -np.inf)
    m = scores.max(axis=-1, keepdims=True, initial=-np.inf)
    m = np.where(m == -np.inf, 0, m)  # a row with no key left: all weights 0, output 0
    weights = np.exp(scores - m)
    total = weights.sum(axis=-1, keepdims=True)
    weights = weights / np.where(total == 0, 1, total)
    out = weights @ v
    full = plan.batch + (plan.L,)
    return np.broadcast_to(out, full + (plan.Ev,)), np.broadcast_to(weights, full + (plan.S,))
