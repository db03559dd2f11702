"""self_attention, multi_head_attention and MultiHeadAttention against plain NumPy.

The reference computations below project with ``@``, slice the heads one by one with a Python
loop and call ``fastattn.reference.attention`` per head: nothing of the layers' own reshaping is
reused. float64 results must match them to rounding; float32 results must equal the kernel run on
the same float32 projections (the layers add no error of their own beyond the projections).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fastattn
from fastattn import reference
from layouts import assert_unchanged, copies, in_layout
from tolerances import assert_close_to_reference

pytestmark = pytest.mark.native  # the sanitizer build runs these (.ci/sanitize.sh)

F32, F64 = np.float32, np.float64
# float64 end to end: projections, attention and the output projection each round a few times.
RTOL64 = 1e-12


def normal(rng, *shape, dtype=F64):
    return rng.standard_normal(shape).astype(dtype)


def plain_self_attention(x, w_q, w_k, w_v, b_q=None, b_k=None, b_v=None, **kwargs):
    x, w_q, w_k, w_v = (np.asarray(a, F64) for a in (x, w_q, w_k, w_v))
    q, k, v = x @ w_q, x @ w_k, x @ w_v
    q, k, v = (a if b is None else a + b for a, b in ((q, b_q), (k, b_k), (v, b_v)))
    return reference.attention(q, k, v, **kwargs)


def plain_mha(x, w_q, w_k, w_v, w_o, num_heads, context=None, num_kv_heads=None, b_q=None,
              b_k=None, b_v=None, b_o=None, **kwargs):
    """One head at a time: column slices of the projections, reference.attention, concatenate."""
    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    ctx = x if context is None else context
    q, k, v = x @ w_q, ctx @ w_k, ctx @ w_v
    q, k, v = (a if b is None else a + b for a, b in ((q, b_q), (k, b_k), (v, b_v)))
    d, d_v = q.shape[-1] // num_heads, v.shape[-1] // num_kv_heads
    mask = kwargs.pop("mask", None)
    mask = None if mask is None else np.asarray(mask)
    outs, weights = [], []
    for h in range(num_heads):
        g = h // (num_heads // num_kv_heads)  # the kv head query head h reads
        # A mask's axis -3 is the head axis (size 1 or num_heads); the heads here are separate.
        mask_h = mask if mask is None or mask.ndim < 3 else mask[..., min(h, mask.shape[-3] - 1),
                                                                 :, :]
        res = reference.attention(q[..., h * d:(h + 1) * d], k[..., g * d:(g + 1) * d],
                                  v[..., g * d_v:(g + 1) * d_v], mask=mask_h,
                                  return_weights=True, **kwargs)
        outs.append(res[0])
        weights.append(res[1])
    out = np.concatenate(outs, axis=-1) @ w_o
    out = out if b_o is None else out + b_o
    return out, np.stack(weights, axis=-3)


def mha_weights(rng, d_model, num_heads, num_kv_heads, d_head, d_v=None, d_context=None,
                d_out=None, bias=True, dtype=F64):
    d_v = d_head if d_v is None else d_v
    d_context = d_model if d_context is None else d_context
    d_out = d_model if d_out is None else d_out
    scale = 1 / math.sqrt(d_model)  # keeps the logits O(1), so weights are not all one-hot
    w = dict(w_q=normal(rng, d_model, num_heads * d_head, dtype=dtype) * scale,
             w_k=normal(rng, d_context, num_kv_heads * d_head, dtype=dtype) * scale,
             w_v=normal(rng, d_context, num_kv_heads * d_v, dtype=dtype),
             w_o=normal(rng, num_heads * d_v, d_out, dtype=dtype))
    if bias:
        w.update(b_q=normal(rng, num_heads * d_head, dtype=dtype),
                 b_k=normal(rng, num_kv_heads * d_head, dtype=dtype),
                 b_v=normal(rng, num_kv_heads * d_v, dtype=dtype),
                 b_o=normal(rng, d_out, dtype=dtype))
    return w


# ---------------------------------------------------------------------------- self_attention


@pytest.mark.parametrize("batch", [(), (3,), (2, 3)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("causal", [False, True])
def test_self_attention_matches_numpy_float64(rng, batch, bias, causal):
    L, d_model, d_k, d_v = 7, 6, 4, 5
    x = normal(rng, *batch, L, d_model)
    w = dict(w_q=normal(rng, d_model, d_k), w_k=normal(rng, d_model, d_k),
             w_v=normal(rng, d_model, d_v))
    b = dict(b_q=normal(rng, d_k), b_k=normal(rng, d_k), b_v=normal(rng, d_v)) if bias else {}
    got = fastattn.self_attention(x, *w.values(), causal=causal, **b)
    want = plain_self_attention(x, *w.values(), causal=causal, **b)
    assert got.shape == batch + (L, d_v) and got.dtype == F64
    np.testing.assert_allclose(got, want, rtol=RTOL64, atol=RTOL64 * np.abs(want).max())


def test_self_attention_float32_is_the_kernel_on_its_projections(rng):
    x = normal(rng, 2, 9, 8, dtype=F32)
    w_q, w_k, w_v = (normal(rng, 8, 4, dtype=F32) for _ in range(3))
    b_v = normal(rng, 4, dtype=F32)
    got = fastattn.self_attention(x, w_q, w_k, w_v, b_v=b_v, causal=True)
    q, k, v = x @ w_q, x @ w_k, x @ w_v + b_v
    assert got.dtype == F32
    np.testing.assert_array_equal(got, fastattn.attention(q, k, v, causal=True))
    assert_close_to_reference(got, q, k, v, causal=True)


def test_self_attention_passes_return_weights_and_other_arguments(rng):
    x = normal(rng, 2, 5, 3)
    w_q, w_k, w_v = (normal(rng, 3, 3) for _ in range(3))
    mask = rng.random((5, 5)) < 0.7
    got = fastattn.self_attention(x, w_q, w_k, w_v, mask=mask, scale=0.3, return_weights=True)
    want = plain_self_attention(x, w_q, w_k, w_v, mask=mask, scale=0.3, return_weights=True)
    assert isinstance(got, tuple) and len(got) == 2
    assert got[1].shape == (2, 5, 5)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=RTOL64, atol=1e-13)


def test_self_attention_cosine_similarity(rng):
    """similarity="cosine" reaches the kernel: unit query and key rows, then the usual scale."""
    x = normal(rng, 6, 4)
    w_q, w_k, w_v = (normal(rng, 4, 3) for _ in range(3))
    got = fastattn.self_attention(x, w_q, w_k, w_v, similarity="cosine")
    q, k = x @ w_q, x @ w_k
    unit_q = q / np.linalg.norm(q, axis=-1, keepdims=True)
    unit_k = k / np.linalg.norm(k, axis=-1, keepdims=True)
    want = reference.attention(unit_q, unit_k, x @ w_v)
    np.testing.assert_allclose(got, want, rtol=RTOL64, atol=1e-13)


@pytest.mark.parametrize("layout", ["F", "T", "step", "neg", "bcast_batch"])
def test_self_attention_any_layout_inputs_unchanged(rng, layout):
    x = in_layout(normal(rng, 2, 5, 4, dtype=F32), layout)
    w_q, w_k, w_v = (in_layout(normal(rng, 4, 3, dtype=F32), layout) for _ in range(3))
    b_q = normal(rng, 3, dtype=F32)
    saved = copies(x, w_q, w_k, w_v, b_q)
    got = fastattn.self_attention(x, w_q, w_k, w_v, b_q=b_q)
    assert_unchanged([x, w_q, w_k, w_v, b_q], saved)
    want = fastattn.self_attention(*(np.ascontiguousarray(a) for a in (x, w_q, w_k, w_v)), b_q=b_q)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("dtypes,compute", [
    ((F32, F32), F32),
    ((F64, F64), F64),
    ((F32, F64), F64),  # promotes, as NumPy and fastattn.attention do
    ((np.int64, np.int32), F64),  # integers compute in float64
    ((np.int8, F32), F32),
    ((np.bool_, F32), F32),
])
def test_self_attention_dtypes_follow_attention(rng, dtypes, compute):
    x_dtype, w_dtype = dtypes
    x = (rng.integers(-2, 3, (5, 4)) if np.dtype(x_dtype).kind in "iub" else
         normal(rng, 5, 4)).astype(x_dtype)
    w_q, w_k, w_v = ((rng.integers(-2, 3, (4, 3)) if np.dtype(w_dtype).kind in "iub" else
                      normal(rng, 4, 3)).astype(w_dtype) for _ in range(3))
    got = fastattn.self_attention(x, w_q, w_k, w_v)
    assert got.dtype == compute
    q, k, v = (x.astype(compute) @ w.astype(compute) for w in (w_q, w_k, w_v))
    assert got.dtype == fastattn.attention(q, k, v).dtype
    np.testing.assert_array_equal(got, fastattn.attention(q, k, v))


def test_self_attention_float16_projects_in_float32_and_returns_float16(rng):
    x = normal(rng, 6, 8, dtype=np.float16)
    w_q, w_k, w_v = (normal(rng, 8, 4, dtype=np.float16) for _ in range(3))
    got = fastattn.self_attention(x, w_q, w_k, w_v)
    assert got.dtype == np.float16
    # The projections are float32 products rounded once to float16, as the docstring says.
    q, k, v = ((x.astype(F32) @ w.astype(F32)).astype(np.float16) for w in (w_q, w_k, w_v))
    np.testing.assert_array_equal(got, fastattn.attention(q, k, v))


def test_self_attention_bfloat16(rng):
    ml_dtypes = pytest.importorskip("ml_dtypes", reason="bfloat16 comes from ml_dtypes")
    bf16 = ml_dtypes.bfloat16
    x = normal(rng, 6, 8).astype(bf16)
    w_q, w_k, w_v = (normal(rng, 8, 4).astype(bf16) for _ in range(3))
    got = fastattn.self_attention(x, w_q, w_k, w_v)
    assert got.dtype == bf16
    q, k, v = ((x.astype(F32) @ w.astype(F32)).astype(bf16) for w in (w_q, w_k, w_v))
    np.testing.assert_array_equal(got.astype(F32), fastattn.attention(q, k, v).astype(F32))


@pytest.mark.parametrize("bad", [
    np.zeros((3, 4), np.complex64), np.zeros((3, 4), object), np.array([["a"] * 4] * 3)])
def test_self_attention_bad_dtype_names_it(bad):
    w = np.zeros((4, 2))
    with pytest.raises(TypeError, match=str(bad.dtype)):
        fastattn.self_attention(bad, w, w, w)
    with pytest.raises(TypeError, match="w_k"):
        fastattn.self_attention(np.zeros((3, 4)), w, bad.T[:, :2], w)


@pytest.mark.parametrize("shapes,names", [
    (dict(x=(4,)), ["x (4,)"]),
    (dict(w_q=(5, 3)), ["x (2, 4)", "w_q (5, 3)"]),
    (dict(w_v=(4,)), ["w_v (4,)"]),
    (dict(w_k=(4, 2)), ["w_q (4, 3)", "w_k (4, 2)"]),
    (dict(w_q=(1, 4, 3)), ["w_q (1, 4, 3)"]),
    (dict(b_q=(2,)), ["b_q (2,)", "w_q (4, 3)"]),
    (dict(b_v=(1, 5)), ["b_v (1, 5)", "w_v (4, 5)"]),
])
def test_self_attention_bad_shapes_name_them(shapes, names):
    args = dict(x=(2, 4), w_q=(4, 3), w_k=(4, 3), w_v=(4, 5)) | shapes
    arrays = {name: np.zeros(shape) for name, shape in args.items()}
    x, w_q, w_k, w_v = (arrays.pop(n) for n in ("x", "w_q", "w_k", "w_v"))
    with pytest.raises(ValueError) as info:
        fastattn.self_attention(x, w_q, w_k, w_v, **arrays)
    for name in names:
        assert name in str(info.value)


# ---------------------------------------------------------------------- multi_head_attention


@pytest.mark.parametrize("batch", [(), (2,), (2, 3)])
@pytest.mark.parametrize("heads", [(1, 1), (4, 4), (4, 2), (6, 1)])
@pytest.mark.parametrize("bias", [False, True])
def test_mha_matches_per_head_numpy(rng, batch, heads, bias):
    num_heads, num_kv_heads = heads
    d_model, d_head, L = 8, 3, 6
    x = normal(rng, *batch, L, d_model)
    w = mha_weights(rng, d_model, num_heads, num_kv_heads, d_head, bias=bias)
    got, got_w = fastattn.multi_head_attention(
        x, num_heads=num_heads, num_kv_heads=num_kv_heads, causal=True, return_weights=True, **w)
    want, want_w = plain_mha(x, num_heads=num_heads, num_kv_heads=num_kv_heads, causal=True, **w)
    assert got.shape == batch + (L, d_model) and got.dtype == F64
    assert got_w.shape == batch + (num_heads, L, L)  # per head, not averaged
    np.testing.assert_allclose(got, want, rtol=RTOL64, atol=RTOL64 * np.abs(want).max())
    np.testing.assert_allclose(got_w, want_w, rtol=RTOL64, atol=1e-14)


@settings(max_examples=60)
@given(batch=st.lists(st.integers(1, 3), max_size=2).map(tuple), kv_heads=st.integers(1, 3),
       group=st.integers(1, 3), d_head=st.integers(1, 4), d_v=st.integers(1, 4),
       L=st.integers(0, 6), S=st.integers(0, 6), cross=st.booleans(), causal=st.booleans(),
       seed=st.integers(0, 2**32 - 1))
def test_mha_property(batch, kv_heads, group, d_head, d_v, L, S, cross, causal, seed):
    """Any head counts, lengths (empty included), self or cross attention: as the NumPy loop."""
    rng = np.random.default_rng(seed)
    num_heads, d_model, d_context = kv_heads * group, 5, 3 if cross else 5
    S = S if cross else L
    x = normal(rng, *batch, L, d_model)
    context = normal(rng, S, d_context) if cross else None
    w = mha_weights(rng, d_model, num_heads, kv_heads, d_head, d_v=d_v, d_context=d_context)
    got, got_w = fastattn.multi_head_attention(x, context=context, num_heads=num_heads,
                                               num_kv_heads=kv_heads, causal=causal,
                                               return_weights=True, **w)
    want, want_w = plain_mha(x, context=context, num_heads=num_heads, num_kv_heads=kv_heads,
                             causal=causal, **w)
    assert got.shape == batch + (L, d_model) and got_w.shape == batch + (num_heads, L, S)
    np.testing.assert_allclose(got, want, rtol=RTOL64, atol=RTOL64 * np.abs(want).max(initial=1))
    np.testing.assert_allclose(got_w, want_w, rtol=RTOL64, atol=1e-14)


def test_mha_cross_attention(rng):
    """Queries from x, keys and values from a context of another length, width and batch."""
    d_model, d_context, L, S = 8, 5, 4, 7
    x = normal(rng, 3, L, d_model)
    context = normal(rng, S, d_context)  # one context, broadcast to the 3 batch entries
    w = mha_weights(rng, d_model, 4, 2, 3, d_v=2, d_context=d_context, d_out=6)
    got, got_w = fastattn.multi_head_attention(x, context=context, num_heads=4, num_kv_heads=2,
                                               return_weights=True, **w)
    want, want_w = plain_mha(x, context=context, num_heads=4, num_kv_heads=2, **w)
    assert got.shape == (3, L, 6) and got_w.shape == (3, 4, L, S)
    np.testing.assert_allclose(got, want, rtol=RTOL64, atol=RTOL64 * np.abs(want).max())
    np.testing.assert_allclose(got_w, want_w, rtol=RTOL64, atol=1e-14)


def test_mha_gqa_query_head_reads_kv_head_h_over_group(rng):
    """With 6 query heads and 2 kv heads, heads 0-2 read kv head 0 and heads 3-5 kv head 1."""
    d_model, d_head, L = 4, 2, 5
    x = normal(rng, L, d_model)
    w = mha_weights(rng, d_model, 6, 2, d_head, bias=False)
    w["w_q"] = np.tile(w["w_q"][:, :d_head], 6)  # every query head asks the same question
    _, weights = fastattn.multi_head_attention(x, num_heads=6, num_kv_heads=2,
                                               return_weights=True, **w)
    for g in range(2):
        _, alone = reference.attention(x @ w["w_q"][:, :d_head],
                                       x @ w["w_k"][:, g * d_head:(g + 1) * d_head],
                                       x @ w["w_v"][:, g * d_head:(g + 1) * d_head],
                                       return_weights=True)
        for h in range(3 * g, 3 * g + 3):
            np.testing.assert_allclose(weights[h], alone, rtol=RTOL64, atol=1e-14)
    assert not np.allclose(weights[0], weights[3])  # the two kv heads differ


def test_mha_heads_are_views_not_copies(rng, monkeypatch):
    """The kernel gets the projections split into heads by strides, with enable_gqa for GQA."""
    seen = {}

    def spy(q, k, v, **kwargs):
        seen.update(q=q, k=k, v=v, **kwargs)
        return fastattn.attention(q, k, v, **kwargs)

    monkeypatch.setattr("fastattn.nn.layers.attention", spy)
    x = normal(rng, 2, 5, 8, dtype=F32)
    w = mha_weights(rng, 8, 4, 2, 2, bias=False, dtype=F32)
    fastattn.multi_head_attention(x, num_heads=4, num_kv_heads=2, **w)
    assert seen["q"].shape == (2, 4, 5, 2) and seen["k"].shape == (2, 2, 5, 2)
    assert seen["enable_gqa"] is True
    for name in ("q", "k", "v"):
        a = seen[name]
        assert a.base is not None and not a.flags.c_contiguous, f"{name} was copied"


def test_mha_passes_attention_arguments(rng):
    """A (B, 1, 1, S) key padding mask, kv_lengths and return_lse all reach the kernel."""
    B, L, d_model = 2, 4, 6
    x = normal(rng, B, L, d_model)
    w = mha_weights(rng, d_model, 3, 3, 2)
    keep = np.ones((B, L), bool)
    keep[0, 3:] = False
    keep[1, 2:] = False
    masked = fastattn.multi_head_attention(x, num_heads=3, mask=keep[:, None, None, :], **w)
    want, _ = plain_mha(x, num_heads=3, mask=keep[:, None, None, :], **w)
    np.testing.assert_allclose(masked, want, rtol=RTOL64, atol=RTOL64 * np.abs(want).max())
    by_lengths = fastattn.multi_head_attention(x, num_heads=3, kv_lengths=np.array([3, 2]), **w)
    np.testing.assert_allclose(by_lengths, masked, rtol=RTOL64, atol=1e-13)
    out, weights, lse = fastattn.multi_head_attention(x, num_heads=3, return_weights=True,
                                                      return_lse=True, **w)
    assert out.shape == (B, L, d_model) and weights.shape == (B, 3, L, L)
    assert lse.shape == (B, 3, L)
    _, w_ref = plain_mha(x, num_heads=3, **w)
    np.testing.assert_allclose(weights, w_ref, rtol=RTOL64, atol=1e-14)


def test_mha_float32_is_the_kernel_per_head(rng):
    x = normal(rng, 2, 6, 8, dtype=F32)
    w = mha_weights(rng, 8, 4, 2, 2, dtype=F32)
    got = fastattn.multi_head_attention(x, num_heads=4, num_kv_heads=2, **w)
    assert got.dtype == F32
    q, k, v = x @ w["w_q"] + w["b_q"], x @ w["w_k"] + w["b_k"], x @ w["w_v"] + w["b_v"]
    heads = [fastattn.attention(np.ascontiguousarray(q[..., 2 * h:2 * h + 2]),
                                np.ascontiguousarray(k[..., 2 * (h // 2):2 * (h // 2) + 2]),
                                np.ascontiguousarray(v[..., 2 * (h // 2):2 * (h // 2) + 2]))
             for h in range(4)]
    want = np.concatenate(heads, axis=-1) @ w["w_o"] + w["b_o"]
    # Same kernel on the same values: only the strides of the head views differ.
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * np.abs(want).max())


def test_mha_int_and_float16_dtypes(rng):
    x = rng.integers(-2, 3, (5, 4))
    w = {n: a.round() for n, a in mha_weights(rng, 4, 2, 2, 2, bias=False).items()}
    w_int = {n: a.astype(np.int32) for n, a in w.items()}
    got = fastattn.multi_head_attention(x, num_heads=2, **w_int)
    assert got.dtype == F64
    np.testing.assert_allclose(got, plain_mha(x.astype(F64), num_heads=2, **w)[0], rtol=RTOL64,
                               atol=1e-12)
    half = fastattn.multi_head_attention(x.astype(np.float16), num_heads=2,
                                         **{n: a.astype(np.float16) for n, a in w.items()})
    assert half.dtype == np.float16


def test_mha_inputs_unchanged(rng):
    x = in_layout(normal(rng, 2, 5, 8, dtype=F32), "F")
    context = in_layout(normal(rng, 2, 3, 8, dtype=F32), "step")
    w = {n: in_layout(a, "T") if a.ndim == 2 else a
         for n, a in mha_weights(rng, 8, 4, 2, 2, dtype=F32).items()}
    saved = copies(x, context, *w.values())
    fastattn.multi_head_attention(x, context=context, num_heads=4, num_kv_heads=2, **w)
    assert_unchanged([x, context, *w.values()], saved)


def _mha_args(**changes):
    args = dict(x=(2, 5, 8), w_q=(8, 8), w_k=(8, 4), w_v=(8, 4), w_o=(8, 8)) | changes
    return {n: np.zeros(s) if isinstance(s, tuple) else s for n, s in args.items()}


@pytest.mark.parametrize("changes,heads,names", [
    (dict(w_q=(8, 6)), (4, 2), ["w_q (8, 6)", "num_heads=4"]),
    (dict(w_k=(8, 6)), (4, 2), ["w_k (8, 6)", "w_q (8, 8)"]),
    (dict(w_v=(8, 3)), (4, 2), ["w_v (8, 3)", "num_kv_heads=2"]),
    (dict(w_o=(6, 8)), (4, 2), ["w_o (6, 8)", "w_v (8, 4)"]),
    (dict(w_q=(7, 8)), (4, 2), ["x (2, 5, 8)", "w_q (7, 8)"]),
    (dict(context=(3, 5, 8)), (4, 2), ["x (2, 5, 8)", "context (3, 5, 8)"]),
    (dict(context=(5, 6)), (4, 2), ["context (5, 6)", "w_k (8, 4)"]),
    (dict(context=(8,)), (4, 2), ["context (8,)"]),
    (dict(b_o=(7,)), (4, 2), ["b_o (7,)", "w_o (8, 8)"]),
    (dict(b_k=(8,)), (4, 2), ["b_k (8,)", "w_k (8, 4)"]),
    ({}, (4, 3), ["num_heads (4)", "num_kv_heads (3)"]),
    ({}, (0, None), ["num_heads must be >= 1"]),
])
def test_mha_bad_shapes_and_heads(changes, heads, names):
    args = _mha_args(**changes)
    num_heads, num_kv_heads = heads
    with pytest.raises(ValueError) as info:
        fastattn.multi_head_attention(**args, num_heads=num_heads, num_kv_heads=num_kv_heads)
    for name in names:
        assert name in str(info.value)


@pytest.mark.parametrize("kwargs", [
    dict(num_heads=2.0), dict(num_heads=True), dict(num_heads=4, num_kv_heads="2"),
    dict(num_heads=4, enable_gqa=True)])
def test_mha_type_errors(kwargs):
    with pytest.raises(TypeError):
        fastattn.multi_head_attention(**_mha_args(), **kwargs)


def test_mha_bad_dtype_names_it():
    args = _mha_args()
    args["w_o"] = args["w_o"].astype(np.complex128)
    with pytest.raises(TypeError, match="w_o has dtype complex128"):
        fastattn.multi_head_attention(**args, num_heads=4, num_kv_heads=2)


# ------------------------------------------------------------------------- MultiHeadAttention


def test_layer_shapes_and_biases():
    layer = fastattn.MultiHeadAttention(12, 6, num_kv_heads=3, d_head=5, seed=0)
    assert (layer.w_q.shape, layer.w_k.shape, layer.w_v.shape, layer.w_o.shape) == (
        (12, 30), (12, 15), (12, 15), (30, 12))
    assert all(w.dtype == F32 for w in (layer.w_q, layer.w_k, layer.w_v, layer.w_o))
    assert [b.shape for b in (layer.b_q, layer.b_k, layer.b_v, layer.b_o)] == [
        (30,), (15,), (15,), (12,)]
    assert not any(b.any() for b in (layer.b_q, layer.b_k, layer.b_v, layer.b_o))
    plain = fastattn.MultiHeadAttention(8, 2, bias=False, seed=0)
    assert plain.d_head == 4 and plain.num_kv_heads == 2
    assert (plain.b_q, plain.b_k, plain.b_v, plain.b_o) == (None, None, None, None)


def test_layer_seed_reproducible_and_glorot_uniform():
    a = fastattn.MultiHeadAttention(64, 4, seed=7, dtype=F64)
    b = fastattn.MultiHeadAttention(64, 4, seed=7, dtype=F64)
    c = fastattn.MultiHeadAttention(64, 4, seed=8, dtype=F64)
    for name in ("w_q", "w_k", "w_v", "w_o"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert not np.array_equal(a.w_q, a.w_k)  # drawn one after the other, not one draw reused
    assert not np.array_equal(a.w_q, c.w_q)
    # The documented draw: default_rng(seed).uniform(-limit, limit), w_q first.
    limit = math.sqrt(6 / (64 + 64))
    np.testing.assert_array_equal(
        a.w_q, np.random.default_rng(7).uniform(-limit, limit, (64, 64)))
    assert np.abs(a.w_q).max() <= limit
    # Variance of U(-a, a) is a^2 / 3; 4096 draws put the sample variance within ~5% of it.
    assert abs(a.w_q.var() / (limit**2 / 3) - 1) < 0.1
    same_in_f32 = fastattn.MultiHeadAttention(64, 4, seed=7)
    np.testing.assert_array_equal(same_in_f32.w_q, a.w_q.astype(F32))


def test_layer_call_is_multi_head_attention(rng):
    layer = fastattn.MultiHeadAttention(8, 4, num_kv_heads=2, seed=1, dtype=F64)
    layer.b_v = normal(rng, 4)  # weights are plain attributes a user may replace
    x, context = normal(rng, 2, 5, 8), normal(rng, 2, 3, 8)
    got, weights = layer(x, context=context, causal=True, return_weights=True)
    want, want_w = plain_mha(x, layer.w_q, layer.w_k, layer.w_v, layer.w_o, 4, context=context,
                             num_kv_heads=2, b_q=layer.b_q, b_k=layer.b_k, b_v=layer.b_v,
                             b_o=layer.b_o, causal=True)
    np.testing.assert_allclose(got, want, rtol=RTOL64, atol=RTOL64 * np.abs(want).max())
    np.testing.assert_allclose(weights, want_w, rtol=RTOL64, atol=1e-14)
    assert "num_kv_heads=2" in repr(layer)


@pytest.mark.parametrize("args,kwargs,exc", [
    ((10, 4), {}, ValueError),  # 10 is not a multiple of 4 and no d_head
    ((8, 4), dict(num_kv_heads=3), ValueError),
    ((8, 0), {}, ValueError),
    ((0, 1), {}, ValueError),
    ((8, 2), dict(d_head=0), ValueError),
    ((8.0, 2), {}, TypeError),
    ((8, 2), dict(dtype=np.int32), TypeError),
])
def test_layer_bad_arguments(args, kwargs, exc):
    with pytest.raises(exc):
        fastattn.MultiHeadAttention(*args, **kwargs)
