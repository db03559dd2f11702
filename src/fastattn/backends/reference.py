"""The float64 NumPy reference (:mod:`fastattn.reference`) as a backend: ``backend="reference"``.

It builds the whole ``L x S`` score matrix, so it is for checking, not for speed; ``"auto"``
never picks it.
"""

from __future__ import annotations

import numpy as np

from .. import reference as oracle
from .._validate import Plan, prepare


class ReferenceBackend:
    """The textbook formula in float64, on NumPy arrays (see :mod:`fastattn.reference`)."""

    name = "reference"

    def claims(self, arrays: tuple) -> bool:
        return False

    def plan(self, q, k, v, **options) -> Plan:
        return prepare(q, k, v, **options)

    def supports(self, plan: Plan) -> str | None:
        if plan.device:
            return "the reference backend takes NumPy arrays, not device arrays"
        return None

    def forward(self, plan: Plan):
        return oracle.run(plan)

    def backward(self, plan: Plan, out: np.ndarray, lse: np.ndarray, dout: np.ndarray,
                 dtypes: tuple[np.dtype, ...], recompute_lse: bool) -> tuple[np.ndarray, ...]:
        return oracle.run_backward(plan, dout, dtypes)  # recomputes everything from q, k, v


BACKEND = ReferenceBackend()
