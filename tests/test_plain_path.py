"""The C-level path of the common call (``_core.attention_plain``).

``fastattn.attention`` hands calls with no option but ``causal``, ``scale`` and ``num_threads``
to a Cython function that checks and runs them without building a Plan. It must give exactly
what the general path gives, and decline (return None) every call it does not fully check, so
that the general path runs them and raises its errors.
"""

from __future__ import annotations

import numpy as np
import pytest

import fastattn
from fastattn import _core
from fastattn._validate import prepare
from fastattn.backends import cpu as cpu_backend
from layouts import assert_unchanged, copies, in_layout


def _general(q, k, v, **kwargs):
    return cpu_backend.run(prepare(q, k, v, **kwargs))[0]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kwargs", [{}, {"causal": True}, {"scale": 0.3}, {"num_threads": 1},
                                    {"causal": True, "scale": 2.0, "num_threads": 2}])
@pytest.mark.parametrize("shape", [(1, 1, 1, 1, 8), (2, 3, 70, 50, 16), (5, 3, 7), (9, 4)])
def test_plain_path_equals_general_path(backend, rng, dtype, kwargs, shape):
    if not backend.name.startswith("cpu-"):
        pytest.skip("the C-level path of the common call is the CPU backend's; the GPU backend "
                    "answers the contract suites")
    *batch, L, E = shape
    q = rng.standard_normal(shape).astype(dtype)
    k = rng.standard_normal((*batch, L + 3, E)).astype(dtype)
    v = rng.standard_normal((*batch, L + 3, E + 1)).astype(dtype)
    out = _core.attention_plain(q, k, v, kwargs.get("causal", False), kwargs.get("scale"),
                                kwargs.get("num_threads"))
    assert out is not None
    np.testing.assert_array_equal(out, _general(q, k, v, **kwargs))
    np.testing.assert_array_equal(backend(q, k, v, **kwargs), out)


@pytest.mark.parametrize("layout", ["C", "F", "T", "step", "neg"])
def test_plain_path_reads_any_layout(rng, layout):
    q, k, v = (in_layout(rng.standard_normal((2, 3, 33, 20)).astype(np.float32), layout)
               for _ in range(3))
    saved = copies(q, k, v)
    out = _core.attention_plain(q, k, v, True, None, None)
    assert_unchanged([q, k, v], saved)
    assert out is not None
    np.testing.assert_array_equal(out, _general(q, k, v, causal=True))


@pytest.mark.parametrize(
    "case",
    ["broadcast batch", "mixed dtypes", "float16", "list", "empty", "unaligned", "numpy bool",
     "numpy scale", "bool threads", "zero threads"],
)
def test_plain_path_declines_what_it_does_not_check(rng, case):
    q, k, v = (rng.standard_normal((2, 4, 8)).astype(np.float32) for _ in range(3))
    causal, scale, threads = False, None, None
    if case == "broadcast batch":
        k, v = k[:1], v[:1]
    elif case == "mixed dtypes":
        v = v.astype(np.float64)
    elif case == "float16":
        q, k, v = (a.astype(np.float16) for a in (q, k, v))
    elif case == "list":
        q = q.tolist()
    elif case == "empty":
        q = q[:, :0]
    elif case == "unaligned":
        k = in_layout(k, "unaligned")
    elif case == "numpy bool":
        causal = np.bool_(True)
    elif case == "numpy scale":
        scale = np.float64(0.5)
    elif case == "bool threads":
        threads = True
    elif case == "zero threads":
        threads = 0
    assert _core.attention_plain(q, k, v, causal, scale, threads) is None
    if case in ("zero threads", "bool threads"):
        with pytest.raises((ValueError, TypeError), match="num_threads"):
            fastattn.attention(q, k, v, num_threads=threads)
    else:  # the general path answers, as the reference does
        out = fastattn.attention(q, k, v, causal=causal, scale=scale, num_threads=threads)
        want = fastattn.reference.attention(q, k, v, causal=causal, scale=scale)
        np.testing.assert_allclose(out, want.astype(out.dtype), rtol=1e-2, atol=1e-3)
