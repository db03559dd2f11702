"""The backends every contract test runs on.

Each entry of ``BACKENDS`` maps a name to a factory of a context manager that activates the
backend and yields a callable with the signature of :func:`fastattn.attention`. Each CPU
instruction-set path this machine runs is one entry; the CUDA backend is one more when asked for
or present (``FASTATTN_TEST_CUDA``, see cuda_backend.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import fastattn
from cuda_backend import cuda_backends


@contextlib.contextmanager
def _cpu_isa(isa: str):
    fastattn.set_isa(isa)
    try:
        assert fastattn.active_isa() == isa
        yield fastattn.attention
    finally:
        fastattn.set_isa("")


BACKENDS: dict[str, Callable[[], contextlib.AbstractContextManager]] = {
    f"cpu-{isa}": (lambda isa=isa: _cpu_isa(isa)) for isa in fastattn.available_isas()
}
BACKENDS.update(cuda_backends())


@dataclass(frozen=True)
class Backend:
    name: str
    attention: Callable

    def __call__(self, *args, **kwargs):
        return self.attention(*args, **kwargs)
