"""pytest-benchmark comparisons: fastattn, its float64 reference, plain NumPy and every
registered peer (PyTorch SDPA, ONNX Runtime MultiHeadAttention, OpenVINO
ScaledDotProductAttention) over a small grid of shapes.

The implementations are the adapters of :mod:`fastattn.bench.peers` (the ``python -m fastattn
bench`` table); each benchmark also checks its output against fastattn's.
"""

from __future__ import annotations

from functools import cache

import numpy as np
import pytest

from fastattn.bench.cases import TOLERANCE, Case, Inputs, make_inputs
from fastattn.bench.peers import ADAPTERS, Adapter, peers

GRID = (
    Case("small", 8, 8, 128, 128, 64),
    Case("mid", 1, 8, 512, 512, 64),
    Case("mid-causal", 1, 8, 512, 512, 64, causal=True),
    Case("padding", 4, 8, 256, 256, 64, padding=True),
    Case("long", 1, 8, 2048, 2048, 64),
    Case("decode", 4, 8, 1, 4096, 128, memory_bound=True),
)
IMPLS = ("fastattn", "reference", "numpy", *peers())


@cache
def inputs(case: Case) -> Inputs:
    return make_inputs(case)


@cache
def expected(case: Case) -> np.ndarray:
    """fastattn's output, which every implementation is checked against."""
    runner = ADAPTERS["fastattn"].prepare(inputs(case), case, threads=None)
    return runner.to_numpy(runner.call())


def adapter_for(impl: str, case: Case) -> Adapter:
    """The adapter, or a skip naming the missing package or the unsupported case."""
    adapter = ADAPTERS[impl]
    for module in adapter.modules:
        pytest.importorskip(module, reason=f"{impl} needs {module}, which is not installed")
    if not adapter.supports(case):
        pytest.skip(f"{impl} has no equivalent of case {case.name}")
    return adapter


@pytest.mark.parametrize("case", GRID, ids=lambda c: c.name)
@pytest.mark.parametrize("impl", IMPLS)
def test_attention(benchmark, impl, case, threads):
    adapter = adapter_for(impl, case)
    runner = adapter.prepare(inputs(case), case, threads)
    benchmark.group = f"{case.name} {case.shape}{' causal' if case.causal else ''}"
    benchmark.extra_info["gflops_counted"] = case.flops / 1e9
    result = benchmark(runner.call)
    out = runner.to_numpy(result)
    np.testing.assert_allclose(out, expected(case), rtol=0, atol=TOLERANCE[case.dtype])
