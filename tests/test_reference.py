"""The oracle itself against an independent, loop-by-loop reading of the contract.

Every backend is compared with ``fastattn.reference``; these tests make sure the reference means
what the contract says (top-left causal, bool/float masks, empty rows give zeros, default scale).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from fastattn import reference
from tolerances import ORACLE_RTOL


def naive(q, k, v, mask=None, causal=False, scale=None):
    """2-D attention one query at a time, in Python floats (math.fsum)."""
    L, E = q.shape
    S = k.shape[0]
    scale = 1 / math.sqrt(E) if scale is None else scale
    mask = None if mask is None else np.broadcast_to(mask, (L, S))
    out = np.zeros((L, v.shape[1]))
    for i in range(L):
        logits = {}
        for j in range(S):
            if causal and j > i:
                continue
            s = scale * math.fsum(float(a) * float(b) for a, b in zip(q[i], k[j]))
            if mask is not None and mask.dtype == bool:
                if not mask[i, j]:
                    continue
            elif mask is not None:
                s += float(mask[i, j])
            if s != -math.inf:
                logits[j] = s
        if not logits:
            continue  # no key left: zeros
        m = max(logits.values())
        w = {j: math.exp(s - m) for j, s in logits.items()}
        total = math.fsum(w.values())
        for c in range(v.shape[1]):
            out[i, c] = math.fsum(w[j] * float(v[j, c]) for j in w) / total
    return out


@pytest.mark.parametrize("L,S", [(5, 5), (3, 7), (7, 3), (1, 1), (4, 0), (0, 4)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mask_kind", [None, "bool", "float"])
def test_reference_is_the_formula(rng, L, S, causal, mask_kind):
    q, k, v = rng.standard_normal((L, 3)), rng.standard_normal((S, 3)), rng.standard_normal((S, 2))
    mask = None
    if mask_kind == "bool":
        mask = rng.random((L, S)) < 0.6
        if L and S:
            mask[0] = False  # a row with no key left
    elif mask_kind == "float":
        mask = rng.standard_normal((L, S))
        mask[rng.random((L, S)) < 0.3] = -np.inf
    want = naive(q, k, v, mask, causal)
    np.testing.assert_allclose(reference.attention(q, k, v, mask=mask, causal=causal), want,
                               rtol=ORACLE_RTOL, atol=ORACLE_RTOL)
    # The float mask is added after scaling.
    scale = -1.7
    np.testing.assert_allclose(
        reference.attention(q, k, v, mask=mask, causal=causal, scale=scale),
        naive(q, k, v, mask, causal, scale), rtol=ORACLE_RTOL, atol=ORACLE_RTOL)


def test_reference_hand_computed():
    # scale 0: uniform weights; causal top-left with L > S: row i sees keys 0..min(i, S-1).
    q = np.zeros((3, 1))
    k = np.zeros((2, 1))
    v = np.array([[1.0], [3.0]])
    got = reference.attention(q, k, v, causal=True, scale=0.0)
    np.testing.assert_allclose(got, [[1.0], [2.0], [2.0]], rtol=ORACLE_RTOL)
    # A float mask of log-weights gives exactly those weights.
    got = reference.attention(q[:1], k, v, mask=np.log([[1.0, 3.0]]), scale=1.0)
    np.testing.assert_allclose(got, [[0.25 * 1 + 0.75 * 3]], rtol=ORACLE_RTOL)
