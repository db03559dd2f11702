"""The softmax's vectorized exp2, against exact 2**x over the range the kernel feeds it."""

import numpy as np
import pytest

import fastattn
from fastattn import _core

pytestmark = pytest.mark.native  # the sanitizer build runs these (.ci/sanitize.sh)

# (dtype, lowest argument that returns a normal number): below it the kernel returns exactly 0.
RANGES = [(np.float32, -126.0), (np.float64, -1022.0)]


@pytest.fixture(params=fastattn.available_isas())
def isa(request):
    fastattn.set_isa(request.param)
    yield request.param
    fastattn.set_isa("")


@pytest.mark.parametrize("dtype,lowest", RANGES)
def test_exp2_error_below_one_ulp(isa, dtype, lowest):
    # The kernel only sees s - max <= 0; a dense grid plus random points covers the range.
    rng = np.random.default_rng(0)
    x = np.concatenate([np.linspace(lowest, 0, 200_001), rng.uniform(lowest, 0, 200_000)])
    x = x.astype(dtype)
    exact = np.exp2(x.astype(np.longdouble))
    got = _core.exp2(x)
    rel = np.abs(got - exact) / exact
    # Stated bound (csrc/simd.hpp): relative error below 1 ulp of the dtype.
    assert rel.max() <= np.finfo(dtype).eps, (isa, float(rel.max()))


@pytest.mark.parametrize("dtype,lowest", RANGES)
def test_exp2_special_values(isa, dtype, lowest):
    x = np.array([0.0, -0.0, -np.inf, np.nan, lowest - 0.5, lowest * 4, -1e30], dtype)
    got = _core.exp2(x)
    assert got[0] == 1 and got[1] == 1  # exp2(0) is exactly 1: an unchanged max rescales by 1
    assert got[2] == 0 and np.isnan(got[3])
    assert np.all(got[4:] == 0)  # underflow gives 0, never a denormal


def test_exp2_rejects_other_dtypes():
    with pytest.raises(TypeError, match="int64"):
        _core.exp2(np.zeros(3, np.int64))
