"""The oracle: attention as the textbook formula, in NumPy float64.

Every backend is tested against this module. It takes the same arguments as
:func:`fastattn.attention` and goes through the same argument checks, then computes
``softmax(q kᵀ · scale + mask) v`` directly, building the full ``L x S`` score matrix.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from ._gradients import gradient_dtype, sum_to
from ._validate import Plan, prepare, prepare_backward


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
    out, weights, lse = run(plan)
    results = [out] + [weights] * plan.return_weights + [lse] * plan.return_lse
    return results[0] if len(results) == 1 else tuple(results)


def run(plan: Plan) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """(output, weights or None, lse or None) of a prepared plan, computed in float64: output
    and weights in the plan's output dtype, lse in its compute dtype (float32 for 16-bit
    inputs), as :func:`attention` returns them."""
    out, weights, lse = attention_in(np.float64, plan)
    return (out.astype(plan.out_dtype),
            weights.astype(plan.out_dtype) if plan.return_weights else None,
            lse.astype(plan.dtype) if plan.return_lse else None)


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


def attention_backward(q, k, v, out, lse, dout, **kwargs):
    """Reference gradient of :func:`attention`; the contract of :func:`fastattn.attention_backward`.

    The textbook formula in float64 with the full ``L x S`` matrices: ``P`` recomputed from the
    scores, ``dV = Pᵀ dO``, ``dP = dO Vᵀ``, ``dS = P (dP - rowsum(P dP))`` (a key whose weight is 0
    contributes nothing, even where ``dP`` is infinite), the softcap's ``1 - tanh²``, then
    ``dQ = dS K · scale`` and ``dK = dSᵀ Q · scale``, and the cosine normalisation's chain rule.
    ``out`` and ``lse`` are checked, not used: the reference recomputes everything from q, k, v.

    Examples
    --------
    >>> import numpy as np
    >>> from fastattn import reference
    >>> q = k = v = np.eye(2)
    >>> out, lse = reference.attention(q, k, v, return_lse=True)
    >>> dq, dk, dv = reference.attention_backward(q, k, v, out, lse, np.ones((2, 2)))
    >>> dv.tolist()
    [[1.0, 1.0], [1.0, 1.0]]
    """
    kwargs.pop("backend", None)
    plan, _, _, dout = prepare_backward(q, k, v, out, lse, dout, **kwargs)
    dtypes = tuple(gradient_dtype(np.asarray(a).dtype, plan) for a in (q, k, v))
    if plan.sinks is not None:
        dtypes += (gradient_dtype(np.asarray(kwargs["sinks"]).dtype, plan),)
    return run_backward(plan, dout, dtypes)


def run_backward(plan: Plan, dout: np.ndarray, dtypes: tuple[np.dtype, ...]
                 ) -> tuple[np.ndarray, ...]:
    """(dq, dk, dv), and dsinks when the plan has sinks, of a prepared plan in float64, returned
    in ``dtypes`` (q's, k's, v's and the sinks')."""
    dq, dk, dv = gradients_in(np.float64, plan, dout)
    grads = tuple(g.astype(d, copy=False) for g, d in zip((dq, dk, dv), dtypes))
    if plan.sinks is None:
        return grads
    # The sink's weight in row i is exp(sink - lse_i); d out_i / d sink = -weight * out_i.
    unit = _unit_plan(np.float64, plan)
    out_ref, _, lse_ref = attention_in(np.float64, unit)
    sink = np.broadcast_to(plan.sinks.astype(np.float64), plan.batch)[..., None]
    with np.errstate(invalid="ignore"):
        weight = np.exp(sink - lse_ref)
    d = (dout.astype(np.float64) * out_ref).sum(axis=-1)
    dsinks = sum_to(-(weight * d).sum(axis=-1), plan.sinks.shape, 1)
    return grads + (dsinks.astype(dtypes[3]),)


def _unit_plan(dtype, plan: Plan) -> Plan:
    """The plan with cosine similarity's unit rows in place of q and k (as given otherwise)."""
    if plan.similarity != "cosine":
        return plan
    return replace(plan, q=_unit_rows(plan.q.astype(dtype)), k=_unit_rows(plan.k.astype(dtype)),
                   similarity="dot")


def gradients_in(dtype, plan: Plan, dout) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(dq, dk, dv) of a prepared plan in ``dtype``, summed to the shapes of its q, k and v.

    Tests use it, like :func:`attention_in`, to measure a plain evaluation in the compute dtype.
    """
    shapes = (plan.q.shape, plan.k.shape, plan.v.shape)
    if 0 in plan.batch:
        return np.zeros(shapes[0], dtype), np.zeros(shapes[1], dtype), np.zeros(shapes[2], dtype)
    q, k = plan.q.astype(dtype), plan.k.astype(dtype)
    qn, kn = np.ones(q.shape[:-1] + (1,), dtype), np.ones(k.shape[:-1] + (1,), dtype)
    if plan.similarity == "cosine":  # gradients with respect to the unit rows, then the chain rule
        qn, kn = (np.sqrt((x * x).sum(axis=-1, keepdims=True)) for x in (q, k))
        qn, kn = np.where(qn == 0, 1, qn), np.where(kn == 0, 1, kn)
        q, k = q / qn, k / kn
    unit = replace(plan, q=q, k=k, similarity="dot")
    weights = attention_in(dtype, unit)[1]
    dout = dout.astype(dtype)
    kh, vh = k, plan.v.astype(dtype)
    if plan.kv_group > 1:
        kh, vh = (np.repeat(x, plan.kv_group, axis=-3) for x in (kh, vh))
    dp = dout @ np.swapaxes(vh, -1, -2)
    ds = weights * (dp - (weights * dp).sum(axis=-1, keepdims=True))
    ds = np.where(weights == 0, 0, ds)
    if plan.softcap is not None:  # d/dz c tanh(z / c) = 1 - tanh²(z / c)
        z = (q @ np.swapaxes(kh, -1, -2)) * np.asarray(plan.scale, dtype)
        ds = ds * (1 - np.tanh(z / np.asarray(plan.softcap, dtype)) ** 2)
    ds = ds * np.asarray(plan.scale, dtype)
    dq = ds @ kh
    dk = np.swapaxes(ds, -1, -2) @ np.broadcast_to(q, plan.batch + q.shape[-2:])
    dv = np.swapaxes(weights, -1, -2) @ dout
    if plan.similarity == "cosine":
        dq = _unit_rows_backward(np.broadcast_to(q, dq.shape),
                                 np.broadcast_to(qn, dq.shape[:-1] + (1,)), dq)
        kb = np.repeat(k, plan.kv_group, axis=-3) if plan.kv_group > 1 else k
        knb = np.repeat(kn, plan.kv_group, axis=-3) if plan.kv_group > 1 else kn
        dk = _unit_rows_backward(np.broadcast_to(kb, dk.shape),
                                 np.broadcast_to(knb, dk.shape[:-1] + (1,)), dk)
    return (sum_to(dq, shapes[0], 1), sum_to(dk, shapes[1], plan.kv_group),
            sum_to(dv, shapes[2], plan.kv_group))


def _unit_rows_backward(unit, norm, grad):
    """Gradient through ``x / |x|`` given the unit rows, the norms (1 for a zero row, where the
    normalisation is the identity) and the gradient with respect to the unit rows."""
    return (grad - unit * (unit * grad).sum(axis=-1, keepdims=True)) / norm
