"""Options and fixtures of the pytest-benchmark comparisons in this folder."""

from __future__ import annotations

import pytest

from fastattn.bench.timing import DEFAULT_THREADS
from fastattn.bench.timing import blas_threads as limit_blas_threads


def pytest_addoption(parser):
    parser.addoption("--bench-threads", type=int, default=DEFAULT_THREADS,
                     help="threads for every implementation (default %(default)s)")


@pytest.fixture(scope="session")
def threads(request) -> int:
    return request.config.getoption("--bench-threads")


@pytest.fixture(scope="session", autouse=True)
def blas_threads(threads):
    """Holds NumPy's BLAS (the reference's and the NumPy version's matmuls) to `threads`."""
    with limit_blas_threads(threads):
        yield
