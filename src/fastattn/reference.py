"""The oracle: attention as the textbook formula, in NumPy float64.

Every backend is tested against this module. It takes the same arguments as
:func:`fastattn.attention` and goes through the same argument checks, then computes
``softmax(q kᵀ · scale + mask) v`` directly, building the full ``L x S`` score matrix.
"""

from __future__ import annotations

import numpy as np

from ._validate import Plan, prepare


def attention(q, k, v, **kwargs):
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
    kwargs.pop("backend", None)
    plan = prepare(q, k, v, **kwargs)
    out, weights, lse = attention_in(np.float64, plan)
    results = [out.astype(plan.out_dtype)]
    if plan.return_weights:
        results.append(weights.astype(plan.out_dtype))
    if plan.return_lse:
        results.append(lse.astype(plan.out_dtype))
    return results[0] if len(results) == 1 else tuple(results)


def _unit_rows(x):
    """Rows scaled to length 1; a zero row stays zero (its cosine with anything is taken as 0)."""
    norm = np.sqrt((x * x).sum(axis=-1, keepdims=True))
    return x / np.where(norm == 0, 1, norm)


def logits_in(dtype, plan: Plan) -> np.ndarray:
    """The final scores ``(..., L, S)`` of a plan in ``dtype``: -inf where a key takes no part."""
    if 0 in plan.batch:
        return np.zeros(plan.batch + (plan.L, plan.S), dtype)
    q, k = plan.q.astype(dtype), plan.k.astype(dtype)
    if plan.similarity == "cosine":
        q, k = _unit_rows(q), _unit_rows(k)
    if plan.kv_group > 1:  # q head h reads kv head h // group
        k = np.repeat(k, plan.kv_group, axis=-3)
    scores = q @ np.swapaxes(k, -1, -2) * np.asarray(plan.scale, dtype)
    if plan.softcap is not None:
        c = np.asarray(plan.softcap, dtype)
        scores = c * np.tanh(scores / c)
    # d = j - (i + offset): how far key j lies right of query i's (aligned) diagonal.
    d = np.arange(plan.S)[None, :] - (np.arange(plan.L)[:, None] + plan.offset)
    lo, hi = plan.band()
    keep = np.ones((plan.L, plan.S), dtype=bool)
    if lo is not None:
        keep &= d >= lo - plan.offset
    if hi is not None:
        keep &= d <= hi - plan.offset
    if plan.kv_lengths is not None:  # key j takes part only if j < kv_lengths[b]
        keep = keep & (np.arange(plan.S) < plan.kv_lengths[..., None, None])
    if plan.mask is not None and plan.mask.dtype == np.bool_:
        keep = keep & plan.mask
    elif plan.mask is not None:
        scores = scores + plan.mask.astype(dtype)
    if plan.alibi is not None:
        scores = scores - plan.alibi.astype(dtype)[..., None, None] * np.abs(d).astype(dtype)
    return np.where(keep, scores, -np.inf)


def attention_in(dtype, plan: Plan) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(output, weights, log-sum-exp) of a prepared plan, the formula evaluated in ``dtype``.

    Tests use it to measure how far a plain float32 computation of the same formula is from
    float64: that error sets the tolerance of the float32 kernels.
    """
    full = plan.batch + (plan.L,)
    if 0 in plan.batch:  # nothing to compute (and k may hold heads that q's zero heads never read)
        return (np.zeros(full + (plan.Ev,), dtype), np.zeros(full + (plan.S,), dtype),
                np.zeros(full, dtype))
    scores = logits_in(dtype, plan)
    v = plan.v.astype(dtype)
    if plan.kv_group > 1:
        v = np.repeat(v, plan.kv_group, axis=-3)
    m = scores.max(axis=-1, keepdims=True, initial=-np.inf)
    sink = None
    if plan.sinks is not None:  # one more logit per row that joins the denominator only
        sink = plan.sinks.astype(dtype)[..., None, None]
        m = np.maximum(m, sink)  # broadcasts: the scores may not span every batch axis yet
    m = np.where(m == -np.inf, 0, m)  # a row with no key left: all weights 0, output 0
    weights = np.exp(scores - m)
    total = weights.sum(axis=-1, keepdims=True)
    if sink is not None:
        total = total + np.exp(sink - m)
    with np.errstate(divide="ignore"):
        lse = (m + np.log(total))[..., 0]  # -inf for a row with no key
    weights = weights / np.where(total == 0, 1, total)
    out = weights @ v
    return (np.broadcast_to(out, full + (plan.Ev,)), np.broadcast_to(weights, full + (plan.S,)),
            np.broadcast_to(lse, full))
