"""The gradient math around the kernels' backward pass: sums over broadcast and grouped axes,
gradient dtypes, and the attention sinks' gradient (which the kernel does not compute)."""

from __future__ import annotations

import numpy as np

from ._validate import Plan, is_bfloat16, native_dtype


def sum_to(grad: np.ndarray, shape: tuple, kv_group: int) -> np.ndarray:
    """``grad`` of the broadcast batch shape summed to an operand's own ``shape``: over the
    batch axes it broadcast along, and over each group of query heads that shared one kv head
    (``kv_group``, last batch axis), as autograd sums them."""
    if kv_group > 1 and len(shape) >= 3 and shape[-3] != 1:
        g = grad.shape
        grad = grad.reshape(g[:-3] + (g[-3] // kv_group, kv_group) + g[-2:]).sum(axis=-3)
    lead = grad.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(lead + i for i, n in enumerate(shape)
                                      if n == 1 and grad.shape[lead + i] != 1)
    if axes:
        grad = grad.sum(axis=axes)
        grad = grad.reshape(shape)
    return grad


def gradient_dtype(dtype: np.dtype, plan: Plan) -> np.dtype:
    """The dtype of an input's gradient: the input's own when it is a float (16-bit ones
    included), else the compute dtype (integer and bool inputs compute in float64)."""
    if dtype.kind == "f" or is_bfloat16(dtype):
        return native_dtype(dtype)  # values of ">f4" come back as "<f4" (on little-endian)
    return plan.out_dtype


def sinks_gradient(plan: Plan, out: np.ndarray, lse: np.ndarray, dout: np.ndarray) -> np.ndarray:
    """The gradient of the sink logits, of their shape: a sink only joins each row's
    denominator, so d out_i / d sink = -p_i out_i with p_i = exp(sink - lse_i) its weight, and
    the gradient is -sum_i p_i (dout_i . out_i), summed over the entries that share the sink.
    ``out``, ``lse`` and ``dout`` as the forward returned them (lse includes the sink)."""
    assert plan.sinks is not None
    sink = np.broadcast_to(plan.sinks.astype(np.float64), plan.batch)[..., None]
    with np.errstate(over="ignore", invalid="ignore"):
        p = np.exp(sink - lse.astype(np.float64))  # sink -inf (none): 0
    d = np.einsum("...e,...e->...", dout.astype(np.float64), out.astype(np.float64))
    return sum_to(-(p * d).sum(axis=-1), plan.sinks.shape, 1)
