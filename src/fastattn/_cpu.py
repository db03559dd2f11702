"""The CPU backend: runs a :class:`~fastattn._validate.Plan` on the compiled C++ kernel."""

from __future__ import annotations

import numpy as np

from . import _core
from ._validate import Plan


def run(plan: Plan) -> tuple[np.ndarray, np.ndarray | None]:
    """(output, weights or None) for a prepared plan, in the plan's output dtype."""
    L, S, E, Ev = plan.L, plan.S, plan.E, plan.Ev
    out = np.empty(plan.batch + (L, Ev), plan.dtype)
    weights = np.empty(plan.batch + (L, S), plan.dtype) if plan.return_weights else None
    mask = plan.mask
    mask_kind = 0 if mask is None else (1 if mask.dtype == np.bool_ else 2)
    _core.attention(
        plan.dtype == np.float64,
        plan.batch,
        L,
        S,
        E,
        Ev,
        plan.q,
        plan.k,
        plan.v,
        mask_kind,
        mask,
        plan.causal,
        0,
        plan.scale,
        plan.kv_group,
        out,
        weights,
        plan.num_threads or 0,
    )
    if plan.out_dtype != plan.dtype:
        out = out.astype(plan.out_dtype)
        weights = None if weights is None else weights.astype(plan.out_dtype)
    return out, weights
