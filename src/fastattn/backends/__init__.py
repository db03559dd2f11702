"""The backends that run a :class:`~fastattn._validate.Plan`, behind one interface, and their
registry: :func:`fastattn.attention` and :func:`fastattn.attention_backward` look a backend up
here by the name given as ``backend=`` (or pick one for ``"auto"``) and call it, nothing more.

A backend is an object with (in the style of xformers' ``fmha`` operators):

``name``
    What ``backend=`` calls it.
``claims(arrays) -> bool``
    Whether ``backend="auto"`` runs inputs like these (q, k, v, mask) on it: the first
    registered backend that claims them runs them.
``plan(q, k, v, **options) -> Plan``
    The arguments checked and resolved (:func:`~fastattn._validate.prepare`, or its device
    form: operands that live on a GPU are read through stand-ins and named in ``plan.device``).
``supports(plan) -> str | None``
    Why it cannot run this plan (the message of the NotImplementedError raised), None if it can.
``forward(plan) -> (out, weights or None, lse or None)``
    Out and weights in ``plan.out_dtype``, lse in the compute dtype ``plan.dtype``.
``backward(plan, out, lse, dout, dtypes, recompute_lse) -> (dq, dk, dv[, dsinks])``
    The gradients in ``dtypes``; NotImplementedError where the backend has no backward pass.

The callers of the interface (``fastattn.attention``, ``fastattn.dask``, ``fastattn.torch``)
are not backends: Dask runs its chunks and torch its CPU tensors on the ``"cpu"`` backend.
Registering a backend is :func:`register`; the order of registration is the order in which
``"auto"`` asks them.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from .._validate import Plan
from . import cpu, cuda, reference


class Backend(Protocol):
    """What :func:`fastattn.attention` needs of a backend (see the module's docstring)."""

    name: str

    def claims(self, arrays: tuple) -> bool: ...

    def plan(self, q, k, v, **options) -> Plan: ...

    def supports(self, plan: Plan) -> str | None: ...

    def forward(self, plan: Plan) -> tuple[Any, Any, Any]: ...

    def backward(self, plan: Plan, out: np.ndarray, lse: np.ndarray, dout: np.ndarray,
                 dtypes: tuple[np.dtype, ...], recompute_lse: bool) -> tuple[np.ndarray, ...]:
        ...


REGISTRY: dict[str, Backend] = {}


def register(backend: Backend) -> Backend:
    """Adds a backend under its name (replacing one of that name); returns it."""
    REGISTRY[backend.name] = backend
    return backend


def names() -> tuple[str, ...]:
    """The values ``backend=`` accepts: ``"auto"``, then every registered backend's name."""
    return ("auto", *REGISTRY)


def select(name: str, arrays: tuple) -> Backend:
    """The backend called ``name``, or for ``"auto"`` the first that claims ``arrays``;
    ValueError naming the accepted values for any other name."""
    found = REGISTRY.get(name)
    if found is not None:
        return found
    if name == "auto":
        for backend in REGISTRY.values():
            if backend.claims(arrays):
                return backend
    raise ValueError(f"backend must be one of {names()}, got {name!r}")


def run(backend: Backend, plan: Plan) -> tuple[Any, Any, Any]:
    """``backend.forward(plan)``, or NotImplementedError with the reason it cannot run it."""
    reason = backend.supports(plan)
    if reason is not None:
        raise NotImplementedError(reason)
    return backend.forward(plan)


register(cpu.BACKEND)
register(cuda.BACKEND)
register(reference.BACKEND)

__all__ = ["Backend", "REGISTRY", "register", "names", "select", "run"]
