"""float32 at large logits: as accurate as the textbook formula evaluated in float32.

With inputs of magnitude ~10-200 the logits reach 1e3-1e5, where one float32 ulp of a logit is
1e-4 to 1e-2 and the weights of two near-equal top scores hang on the last bits of their
difference. The textbook formula rounds each logit once (``q . k * scale``) and subtracts the
maximum before ``exp``; the kernel does the same (csrc/online_softmax.hpp). It used to round the
logits in base 2 (q pre-multiplied by ``scale * log2 e``), and in such draws its error was over
3x the formula's in 3% of calls, up to 30x.

Single calls compare by luck (a logit difference smaller than an ulp can round to the exact
value), so the test is statistical over a fixed set of draws on every CPU path with FMA.

The formula's products are float32 dot products taken as one multiply-add per term, in order
(what a plain loop, or a BLAS kernel with one accumulator per output, computes), not NumPy's
matmul: its rounding depends on the BLAS kernel OpenBLAS picks for the CPU (SkylakeX on an AMD
Zen 4, Haswell where OPENBLAS_CORETYPE pins it), and against SkylakeX's the same kernel was over
10x in 1.25% of these draws, against Haswell's in 0.25%. Against the in-order formula the kernel
is over 3x in 0.5-0.75% and never over 10x (on every path; it was the base-2 logits' 5.3% and
1.3% against NumPy's matmul; PyTorch's SDPA is over 3x in 7.9%).
"""

from __future__ import annotations

import numpy as np
import pytest

from fastattn import reference

DRAWS = 400


def _matmul_float32(a, b):
    """a @ b (batched) in float32, each output a chain of multiply-adds in order: a product of two
    float32 is exact in float64, so each step rounds once, as a fused multiply-add does."""
    out = np.zeros(a.shape[:-1] + b.shape[-1:], np.float32)
    for e in range(a.shape[-1]):
        step = a[..., :, e, None].astype(np.float64) * b[..., None, e, :].astype(np.float64)
        out = (step + out).astype(np.float32)
    return out


def _textbook_float32(q, k, v):
    s = _matmul_float32(q, np.swapaxes(k, -1, -2)) * np.float32(1 / np.sqrt(q.shape[-1]))
    p = np.exp(s - s.max(axis=-1, keepdims=True))
    return _matmul_float32(p / p.sum(axis=-1, keepdims=True), v)


def _draw(rng):
    L, S, E = int(rng.integers(1, 40)), int(rng.integers(2, 300)), int(rng.integers(1, 130))
    mag = 10 ** rng.uniform(1, 2.3)
    q = (rng.standard_normal((1, L, E)) * mag).astype(np.float32)
    k = (rng.standard_normal((1, S, E)) * mag).astype(np.float32)
    v = rng.standard_normal((1, S, E)).astype(np.float32)
    if rng.random() < 0.5:  # two near-equal top scores for every query
        k[0, 1] = k[0, 0] * (1 + rng.standard_normal() * 1e-6)
        q[0, :] = k[0, 0] * rng.uniform(0.5, 1.5)
    return q, k, v


def test_large_logits_as_accurate_as_the_textbook_formula(backend):
    if backend.name == "cpu-baseline":
        pytest.skip("the portable baseline path has no FMA: its products are rounded before they "
                    "are summed, where the formula's BLAS rounds once per multiply-add")
    if backend.name == "cuda-sim":
        pytest.skip("the CUDA simulator runs the kernel's arithmetic as NumPy scalars, with none "
                    "of a GPU's fused multiply-adds: its rounding, which this test weighs over "
                    "400 calls (a minute of simulation), is a GPU's to show")
    rng = np.random.default_rng(20261130)
    ratios = []
    for _ in range(DRAWS):
        q, k, v = _draw(rng)
        exact = reference.attention(*(a.astype(np.float64) for a in (q, k, v)))
        ours = np.abs(backend(q, k, v) - exact).max()
        textbook = np.abs(_textbook_float32(q, k, v) - exact).max()
        ratios.append(ours / max(textbook, 1e-7))
    ratios = np.array(ratios)
    assert np.median(ratios) <= 1.0, np.quantile(ratios, [0.5, 0.9, 0.99])
    assert (ratios > 3).mean() <= 0.035, np.sort(ratios)[-20:]
    assert (ratios > 10).mean() <= 0.005, np.sort(ratios)[-20:]
