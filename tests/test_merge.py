"""merge_attention: partial attentions over disjoint key sets merge into the one-shot result."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fastattn
from fastattn import merge_attention
from fastattn._api import run
from fastattn._merge import add_sinks
from fastattn._validate import prepare
from layouts import assert_unchanged, copies
from test_properties import problems
from tolerances import assert_close_to_reference

pytestmark = pytest.mark.native  # the sanitizer build runs these (.ci/sanitize.sh)


def _key_slice(a, s0, s1, S):
    """``a`` (broadcastable to ``(..., L, S)``) restricted to keys ``s0:s1``; size-1 key axes
    broadcast and stay."""
    a = np.asarray(a)
    return a if a.ndim == 0 or a.shape[-1] == 1 else a[..., s0:s1]


def split_attention(q, k, v, cuts, **kwargs):
    """Attention with the keys cut at ``cuts`` (sorted; repeats give empty parts), each part run
    on its own as a block of the whole problem, then merged. Returns what ``attention`` does with
    ``return_lse=True``."""
    whole = prepare(q, k, v, **kwargs)
    S, dtype = whole.S, whole.dtype
    # Partials in the compute dtype: float16 inputs are merged in float32, rounded once at the end.
    q, k, v = (np.asarray(x).astype(dtype) for x in (q, k, v))
    kwargs = dict(kwargs, return_lse=True, return_weights=False)
    kwargs.pop("align", None)
    mask, lengths = kwargs.pop("mask", None), kwargs.pop("kv_lengths", None)
    kwargs.pop("sinks", None)  # joined once, after the merge: each part would count them
    outs, lses = [], []
    for s0, s1 in zip([0, *cuts], [*cuts, S]):
        part = prepare(
            q, k[..., s0:s1, :], v[..., s0:s1, :],
            mask=None if mask is None else _key_slice(mask, s0, s1, S),
            kv_lengths=None if lengths is None else np.clip(np.asarray(lengths) - s0, 0, s1 - s0),
            diagonal_offset=whole.offset - s0, **kwargs)
        out, lse = run(part)
        outs.append(out)
        lses.append(lse)
    out, lse = merge_attention(outs, lses)
    if whole.sinks is not None:
        out, lse = add_sinks(out, lse, whole.sinks)
    return out.astype(whole.out_dtype), lse.astype(whole.dtype)  # lse: the compute dtype


@st.composite
def split_problems(draw):
    p = draw(problems(max_len=120))
    p.kwargs.update(return_lse=True, return_weights=False)
    S = p.k.shape[-2]
    n = draw(st.integers(1, 5))
    cuts = sorted(draw(st.lists(st.integers(0, S), min_size=n - 1, max_size=n - 1)))
    return p, cuts


@settings(max_examples=120)
@given(pc=split_problems())
def test_split_keys_merge_to_the_reference(pc):
    p, cuts = pc
    saved = copies(p.q, p.k, p.v, p.kwargs.get("mask"))
    got = split_attention(p.q, p.k, p.v, cuts, **p.kwargs)
    assert_unchanged([p.q, p.k, p.v, p.kwargs.get("mask")], saved)
    assert_close_to_reference(got, p.q, p.k, p.v, **p.kwargs)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kwargs", [
    dict(), dict(causal=True), dict(causal=True, align="bottom_right"), dict(window=(3, 2)),
    dict(window=(4, 0), align="bottom_right"), dict(alibi_slopes=[0.5, 0.1]),
    dict(kv_lengths=[30, 7]), dict(softcap=2.0, causal=True), dict(similarity="cosine"),
], ids=str)
def test_split_matches_one_shot_kernel(rng, dtype, kwargs):
    q = rng.standard_normal((2, 2, 23, 8)).astype(dtype)
    k, v = (rng.standard_normal((2, 2, 41, 8)).astype(dtype) for _ in "kv")
    kwargs = {n: (np.asarray(a).reshape(2, 1) if n == "kv_lengths" else a)
              for n, a in kwargs.items()}
    want = fastattn.attention(q, k, v, return_lse=True, **kwargs)
    # An empty part first, one in the middle, parts of 1 and of 20 keys.
    got = split_attention(q, k, v, [0, 5, 5, 6, 26], **kwargs)
    assert_close_to_reference(got, q, k, v, return_lse=True, **kwargs)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype
        np.testing.assert_allclose(g, w, rtol=1e-5 if dtype == np.float32 else 1e-12,
                                   atol=1e-5 if dtype == np.float32 else 1e-12)


def test_parts_outside_the_band_change_nothing(rng):
    """Causal: keys 12.. lie past every query of the first 12 rows, so for those rows the part
    over them has lse -inf and merging it must leave the first part's result as it was."""
    q, k, v = (rng.standard_normal((1, 12, 4)) for _ in "qkv")
    k2, v2 = (rng.standard_normal((1, 9, 4)) for _ in "kv")
    first = fastattn.attention(q, k, v, causal=True, return_lse=True)
    plan = prepare(q, k2, v2, causal=True, return_lse=True, diagonal_offset=-12)
    out2, lse2 = run(plan)
    assert np.all(lse2 == -np.inf) and np.all(out2 == 0)
    out, lse = merge_attention([first[0], out2], [first[1], lse2])
    np.testing.assert_array_equal(out, first[0])
    np.testing.assert_array_equal(lse, first[1])


def test_rows_no_part_saw_are_zero(rng):
    outs = [rng.standard_normal((3, 4)), np.zeros((3, 4)), np.full((3, 4), np.nan)]
    lses = [np.array([-np.inf, 1.0, -np.inf]), np.full(3, -np.inf), np.full(3, -np.inf)]
    out, lse = merge_attention(outs, lses)
    np.testing.assert_array_equal(out[[0, 2]], 0)  # the NaN part had no mass: it adds nothing
    np.testing.assert_array_equal(out[1], outs[0][1])
    np.testing.assert_array_equal(lse, [-np.inf, 1.0, -np.inf])


def test_nan_lse_propagates():
    out, lse = merge_attention([np.ones((2, 3)), np.ones((2, 3))], [[0.0, np.nan], [1.0, 0.0]])
    assert np.isnan(lse[1]) and np.isnan(out[1]).all()
    assert np.isfinite(lse[0]) and np.isfinite(out[0]).all()


def test_huge_lses_do_not_overflow(rng):
    """Shifting every part's lse by c shifts the merged lse by c and leaves the output: the
    weights are taken relative to the largest lse, so exp never overflows."""
    outs = [rng.standard_normal((5, 2, 3)) for _ in range(3)]
    lses = [rng.standard_normal((5, 2)) for _ in range(3)]
    base_out, base_lse = merge_attention(outs, lses)
    for c in (1e4, -1e4, 700.0):
        out, lse = merge_attention(outs, [s + c for s in lses])
        np.testing.assert_allclose(out, base_out, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(lse - c, base_lse, rtol=0, atol=1e-9)


@given(n=st.integers(1, 7), split=st.integers(1, 6), seed=st.integers(0, 2**32 - 1))
@settings(max_examples=60)
def test_merges_compose_in_a_tree(n, split, seed):
    rng = np.random.default_rng(seed)
    outs = [rng.standard_normal((2, 3, 4)) for _ in range(n)]
    lses = [np.where(rng.random((2, 3)) < 0.2, -np.inf, rng.standard_normal((2, 3)) * 5)
            for _ in range(n)]
    flat = merge_attention(outs, lses)
    split = min(split, n)
    left, right = merge_attention(outs[:split], lses[:split]), (
        merge_attention(outs[split:], lses[split:]) if split < n else None)
    tree = left if right is None else merge_attention([left[0], right[0]], [left[1], right[1]])
    for t, f in zip(tree, flat):
        np.testing.assert_allclose(t, f, rtol=1e-12, atol=1e-12)


# The merge of the same values in a wider dtype is the truth; longdouble has none wider here, so
# it is held to float64's accuracy (it must not drop below it on the way).
@pytest.mark.parametrize("dtype, wider, eps_of", [
    (np.float16, np.float64, np.float16), (np.float32, np.float64, np.float32),
    (np.float64, np.longdouble, np.float64), (np.longdouble, np.float64, np.float64)])
def test_every_float_dtype(rng, dtype, wider, eps_of):
    """The result has the inputs' dtype and is the exact merge of the same values rounded about
    once: float16 parts are merged in float32, not in float16."""
    outs = [rng.standard_normal((4, 6, 5)).astype(dtype) for _ in range(3)]
    lses = [(rng.standard_normal((4, 6)) * 3).astype(dtype) for _ in range(3)]
    out, lse = merge_attention(outs, lses)
    assert out.dtype == dtype and lse.dtype == dtype
    exact_out, exact_lse = merge_attention([o.astype(wider) for o in outs],
                                           [s.astype(wider) for s in lses])
    eps = float(np.finfo(eps_of).eps)
    for got, exact in ((out, exact_out), (lse, exact_lse)):
        err = np.abs(got.astype(np.longdouble) - exact.astype(np.longdouble))
        assert np.all(err <= 4 * eps * np.maximum(np.abs(exact), 1)), (dtype, float(err.max()))


def test_mixed_dtypes_promote(rng):
    # outs promote among themselves, lses among themselves: float64 out, float32 lse
    out, lse = merge_attention([np.ones((2, 3), np.float32), np.ones((2, 3), np.float64)],
                               [np.zeros(2, np.float32), np.zeros(2, np.float16)])
    assert out.dtype == np.float64 and lse.dtype == np.float32
    np.testing.assert_array_equal(out, 1)
    np.testing.assert_allclose(lse, np.log(2), rtol=1e-7)
    # A float64 lse is merged in float64 even with float32 outputs, and stays float64.
    lses = [np.array([0.0, 1e-9]), np.array([0.0, 0.0])]
    out, lse = merge_attention([np.ones((2, 3), np.float32)] * 2, lses)
    assert out.dtype == np.float32 and lse.dtype == np.float64
    np.testing.assert_allclose(lse, np.logaddexp(*lses), rtol=1e-15)


def test_half_outputs_with_float32_lses(rng):
    """What attention returns for bfloat16 and float16 inputs (16-bit out, float32 lse) merges
    to the same dtypes: the lse stays float32, unrounded, and the output is rounded once."""
    ml_dtypes = pytest.importorskip("ml_dtypes", reason="bfloat16 needs ml_dtypes")
    for half in (np.dtype(ml_dtypes.bfloat16), np.dtype(np.float16)):
        outs = [rng.standard_normal((4, 6, 5)).astype(half) for _ in range(3)]
        lses = [(rng.standard_normal((4, 6)) * 3 + 8).astype(np.float32) for _ in range(3)]
        out, lse = merge_attention(outs, lses)
        assert out.dtype == half and lse.dtype == np.float32
        exact_out, exact_lse = merge_attention([o.astype(np.float64) for o in outs],
                                               [s.astype(np.float64) for s in lses])
        lse_err = np.abs(lse.astype(np.float64) - exact_lse).max()
        assert lse_err <= 4 * np.finfo(np.float32).eps * np.abs(exact_lse).max(), lse_err
        # lses near 8: far below what rounding them to 16 bits would do (bfloat16: ~0.03)
        rounding = np.abs(exact_lse.astype(half).astype(np.float64) - exact_lse).max()
        assert lse_err < rounding / 100, (lse_err, rounding)
        # out: the exact merge of the 16-bit parts, rounded once to the parts' dtype
        half_ulp_out = np.abs(exact_out.astype(half).astype(np.float64) - exact_out)
        err = np.abs(out.astype(np.float64) - exact_out)
        assert np.all(err <= half_ulp_out + 1e-6 * np.abs(exact_out)), float(err.max())
    # float16 with bfloat16: neither holds the other; float32, as attention computes them
    out, lse = merge_attention([np.ones((2, 3), ml_dtypes.bfloat16), np.ones((2, 3), np.float16)],
                               [np.zeros(2, np.float32), np.zeros(2, np.float32)])
    assert out.dtype == lse.dtype == np.float32
    np.testing.assert_array_equal(out, 1)


def test_split_half_attention_merges_exactly(rng):
    """bfloat16 attention run on key chunks with fastattn.attention itself (bfloat16 outs, float32
    lses) and merged: within the reference's tolerance of the one-shot call, lse in float32."""
    ml_dtypes = pytest.importorskip("ml_dtypes", reason="bfloat16 needs ml_dtypes")
    bf16 = np.dtype(ml_dtypes.bfloat16)
    q = (rng.standard_normal((2, 3, 9, 16)) * 3).astype(bf16)
    k, v = (rng.standard_normal((2, 3, 50, 16)).astype(bf16) for _ in "kv")
    parts = [fastattn.attention(q, k[..., a:b, :], v[..., a:b, :], return_lse=True)
             for a, b in ((0, 7), (7, 30), (30, 50))]
    assert all(o.dtype == bf16 and s.dtype == np.float32 for o, s in parts)
    out, lse = merge_attention([o for o, _ in parts], [s for _, s in parts])
    assert out.dtype == bf16 and lse.dtype == np.float32
    assert_close_to_reference((out, lse), q, k, v, return_lse=True)


def test_single_part_is_returned_as_is(rng):
    o, s = rng.standard_normal((3, 2)), np.array([0.5, -np.inf, 2.0])
    out, lse = merge_attention([o], [s])
    np.testing.assert_array_equal(out, np.where(np.isinf(s)[:, None], 0, o))
    np.testing.assert_array_equal(lse, s)
    out[...] = 7  # a new array: the caller's part is untouched
    assert not np.any(o == 7)


@pytest.mark.parametrize("outs, lses, match", [
    ([], [], "at least one"),
    ([np.zeros((2, 3))], [], "one lse per output"),
    ([np.zeros((2, 3))], [np.zeros(3)], r"\(2, 3\).*\(3,\)"),
    ([np.zeros((2, 3)), np.zeros((2, 4))], [np.zeros(2), np.zeros(2)], r"out\[1\] \(2, 4\)"),
    ([np.zeros((2, 3)), np.zeros((2, 3))], [np.zeros(2), np.zeros(1)], r"lse\[1\] \(1,\)"),
    ([np.zeros(())], [np.zeros(())], r"\(\)"),
])
def test_bad_shapes_raise_value_error(outs, lses, match):
    with pytest.raises(ValueError, match=match):
        merge_attention(outs, lses)


def test_non_float_raises_type_error():
    with pytest.raises(TypeError, match="int64"):
        merge_attention([np.zeros((2, 3), np.int64)], [np.zeros(2)])
    with pytest.raises(TypeError, match="bool"):
        merge_attention([np.zeros((2, 3))], [np.zeros(2, bool)])
