"""Shared fixtures: Hypothesis profiles, the ``backend`` fixture (see backends.py), ``rng``."""

from __future__ import annotations

import os
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

from backends import BACKENDS, Backend

# "ci" (default) keeps the whole suite within the CI budget of ~4 minutes on 2 cores;
# HYPOTHESIS_PROFILE=long runs many more examples for a local soak.
_COMMON = dict(
    deadline=None,  # kernel timings vary with machine load; correctness is what is tested
    print_blob=True,  # a failing example can be replayed with @reproduce_failure
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                           HealthCheck.data_too_large],
)
settings.register_profile("ci", max_examples=400, **_COMMON)
settings.register_profile("long", max_examples=3000, **_COMMON)
# .ci/sanitize.sh: the sanitizers slow the kernel ~3x and every test runs on each ISA path.
settings.register_profile("sanitize", max_examples=60, **_COMMON)
# .ci/cuda.sh: the CUDA simulator runs the kernel as Python, a thread at a time (~100x slower).
settings.register_profile("simulator", max_examples=100, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(params=list(BACKENDS))
def backend(request) -> Backend:
    """One backend (a CPU instruction-set path, later CUDA), active for the whole test."""
    with BACKENDS[request.param]() as fn:
        yield Backend(request.param, fn)


def pytest_collection_modifyitems(items):
    """A test run on a CUDA entry of ``BACKENDS`` (a fixture parametrized by its names) is
    marked ``cuda``, so ``-m cuda`` selects everything the CUDA backend runs; the other markers
    are declared by the tests."""
    cuda = {name for name in BACKENDS if name.startswith("cuda")}
    for item in items:
        spec = getattr(item, "callspec", None)
        if spec is not None and any(
            isinstance(p, str) and p in cuda for p in spec.params.values()
        ):
            item.add_marker(pytest.mark.cuda)


@pytest.fixture
def rng(request) -> np.random.Generator:
    """A generator seeded from the test's id, so every test draws the same data on every run."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))
