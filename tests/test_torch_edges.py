"""fastattn.torch at its edges: tensors with the negative or conjugate bit, tensors on
different devices, NumPy options in either byte order, and torch.func transforms (vmap,
grad, vjp, jacrev)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="fastattn.torch needs torch (fastattn[torch])")
pytest.importorskip("ml_dtypes", reason="bfloat16 tensors are viewed as ml_dtypes' bfloat16")

from torch.nn.functional import scaled_dot_product_attention as sdpa  # noqa: E402

import fastattn.torch as ft  # noqa: E402

# vmap runs the op once per batch entry (torch's fallback, with its performance warning)
pytestmark = [pytest.mark.torch,
              pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")]

OP = torch.ops.fastattn.attention.default
BACKWARD_OP = torch.ops.fastattn.attention_backward.default


def _qkv(n=3, L=5, S=6, E=4, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(n, 2, m, E, generator=g, dtype=dtype) for m in (L, S, S))


def _op_args(q, k, v, **kw):
    """The op's positional arguments, defaults but for ``kw``."""
    args = dict(
        mask=None,
        causal=False,
        scale=None,
        enable_gqa=False,
        num_threads=None,
        align="top_left",
        window_left=None,
        window_right=None,
        alibi_slopes=None,
        softcap=None,
        kv_lengths=None,
        similarity="dot",
        sinks=None,
        return_weights=False,
    )
    args.update(kw)
    return (q, k, v, *args.values())


# --- the negative and conjugate bits ------------------------------------------------------------


def _neg_view(t):
    """A lazily negated view holding the values of ``t``: ``(-t)._neg_view()`` reads as ``t``."""
    view = (-t)._neg_view()
    assert view.is_neg()
    return view


def _imag_of_conj(t):
    """``x.conj().imag`` for an x whose imaginary part is -t: a negated view reading as ``t``."""
    view = torch.complex(torch.zeros_like(t), -t).conj().imag
    assert view.is_neg()
    return view


@pytest.mark.parametrize("make", [_neg_view, _imag_of_conj], ids=["neg_view", "conj_imag"])
@pytest.mark.parametrize(
    "kwargs",
    [dict(), dict(causal=True, return_lse=True), dict(mask="neg", return_weights=True)],
    ids=str,
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_negated_views_read_as_their_values(make, kwargs, dtype):
    q, k, v = _qkv(dtype=dtype)
    kwargs = dict(kwargs)
    if kwargs.get("mask") == "neg":
        kwargs["mask"] = torch.randn(5, 6, dtype=dtype, generator=torch.Generator().manual_seed(3))
    want = ft.attention(q, k, v, **kwargs)
    views = [make(t) for t in (q, k, v)]
    bases = [t._base.clone() for t in views if t._base is not None]
    masked = dict(kwargs, mask=make(kwargs["mask"])) if "mask" in kwargs else kwargs
    got = ft.attention(*views, **masked)
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    torch.testing.assert_close(sdpa(*views), sdpa(q, k, v))
    assert all(t.is_neg() for t in views)  # not modified: still the same lazy views
    for t, b in zip([t for t in views if t._base is not None], bases):
        assert torch.equal(t._base, b)


def test_negated_views_in_the_op_and_its_backward():
    q, k, v = _qkv()
    dout = torch.randn(q.shape, dtype=q.dtype, generator=torch.Generator().manual_seed(4))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ft.attention(*leaves, causal=True).backward(dout)
    want = [t.grad for t in leaves]

    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    views = [_neg_view(t) for t in leaves[:2]] + [leaves[2]]  # q and k negated, v plain
    out = ft.attention(*views, causal=True)
    torch.testing.assert_close(out, ft.attention(q, k, v, causal=True), atol=0, rtol=0)
    out.backward(_neg_view(dout))  # an incoming gradient with the bit too
    for t, w in zip(leaves, want):  # _neg_view(-x) reads as x: x's gradients, unchanged
        torch.testing.assert_close(t.grad, w)

    # the backward op directly, every tensor argument negated
    out, lse, _ = OP(*_op_args(q, k, v))
    plain = BACKWARD_OP(q, k, v, out, lse, dout, *_op_args(q, k, v)[3:-1])
    negated = BACKWARD_OP(
        *(_neg_view(t) for t in (q, k, v, out, lse, dout)), *_op_args(q, k, v)[3:-1]
    )
    for g, w in zip(negated[:3], plain[:3]):
        torch.testing.assert_close(g, w, atol=0, rtol=0)


def test_bfloat16_negated_view():
    q, k, v = _qkv(dtype=torch.bfloat16)
    got = ft.attention(_neg_view(q), k, _neg_view(v), return_lse=True)
    torch.testing.assert_close(got, ft.attention(q, k, v, return_lse=True), atol=0, rtol=0)


def test_conjugated_complex_tensors_get_the_dtype_error():
    c = torch.randn(2, 5, 4, dtype=torch.complex64).conj()
    assert c.is_conj()
    with pytest.raises(TypeError, match="complex64"):
        ft.attention(c, c, c)


# --- devices ------------------------------------------------------------------------------------


def test_meta_query_with_cpu_keys_is_refused_as_sdpa_refuses_it():
    q, k, v = _qkv()
    with pytest.raises(RuntimeError, match="same device"):
        sdpa(q.to("meta"), k, v)
    with pytest.raises(ValueError, match=r"device \(meta\).*k on cpu, v on cpu"):
        ft.attention(q.to("meta"), k, v)
    with pytest.raises(ValueError, match=r"device \(meta\).*k on cpu, v on cpu"):
        OP(*_op_args(q.to("meta"), k, v))
    # all on meta: shapes only, as before
    out = ft.attention(q.to("meta"), k.to("meta"), v.to("meta"), return_lse=True)
    assert [t.device.type for t in out] == ["meta", "meta"]
    assert out[0].shape == q.shape and out[1].shape == q.shape[:-1]


@pytest.mark.parametrize("name", ["k", "v", "mask", "alibi_slopes", "kv_lengths", "sinks"])
def test_every_tensor_argument_is_on_qs_device(name):
    q, k, v = _qkv()
    tensors = dict(
        k=k,
        v=v,
        mask=torch.zeros(5, 6, dtype=torch.float64),
        alibi_slopes=torch.tensor([0.1, 0.2]),
        kv_lengths=torch.tensor([3, 4, 6]),
        sinks=torch.tensor([0.0, 1.0]),
    )
    tensors[name] = tensors[name].to("meta")
    k, v = tensors.pop("k"), tensors.pop("v")
    pattern = rf"q's device \(cpu\); got {name} on meta"
    with pytest.raises(ValueError, match=pattern):
        ft.attention(q, k, v, **tensors)
    with pytest.raises(ValueError, match=pattern):  # the op (no eager shortcut)
        OP(*_op_args(q, k, v, **tensors))
    with pytest.raises(ValueError, match=pattern):  # with autograd
        ft.attention(q.clone().requires_grad_(), k, v, **tensors)


def test_fake_tensors_on_different_devices_are_refused():
    from torch._subclasses.fake_tensor import FakeTensorMode

    q, k, v = _qkv()
    with FakeTensorMode() as mode:
        fq, fk, fv = (mode.from_tensor(t) for t in (q, k, v))
        fk_meta = torch.empty(k.shape, dtype=k.dtype, device="meta")
        assert OP(*_op_args(fq, fk, fv))[0].shape == q.shape
        with pytest.raises(ValueError, match="got k on meta"):
            OP(*_op_args(fq, fk_meta, fv))
        out, lse, _ = OP(*_op_args(fq, fk, fv))
        with pytest.raises(ValueError, match="got dout on meta"):
            BACKWARD_OP(fq, fk, fv, out, lse, out.to("meta"), *_op_args(q, k, v)[3:-1])


def test_array_like_options_follow_q_to_its_device():
    q, k, v = (t.to("meta") for t in _qkv())
    out = ft.attention(q, k, v, mask=np.ones((5, 6), bool), sinks=[0.0, 1.0], kv_lengths=[3, 4, 6])
    assert out.device.type == "meta" and out.shape == q.shape


# --- NumPy options in either byte order ---------------------------------------------------------


@pytest.mark.parametrize("name", ["mask", "alibi_slopes", "kv_lengths", "sinks"])
def test_numpy_options_in_either_byte_order(name):
    q, k, v = _qkv()
    values = dict(
        mask=np.linspace(-1, 1, 30).reshape(5, 6),
        alibi_slopes=np.array([0.1, 0.2]),
        kv_lengths=np.array([3, 4, 6]),
        sinks=np.array([0.5, -1.0]),
    )[name]
    swapped = values.astype(values.dtype.newbyteorder("S"))
    before = swapped.copy()
    want = ft.attention(q, k, v, **{name: torch.from_numpy(values)})
    got = ft.attention(q, k, v, **{name: swapped})
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert swapped.dtype == before.dtype and np.array_equal(swapped, before)


def test_bfloat16_numpy_mask():
    import ml_dtypes

    q, k, v = _qkv(dtype=torch.float32)
    mask = np.linspace(-1, 1, 30, dtype=np.float32).reshape(5, 6)
    got = ft.attention(q, k, v, mask=mask.astype(ml_dtypes.bfloat16))
    want = ft.attention(q, k, v, mask=torch.from_numpy(mask).to(torch.bfloat16))
    torch.testing.assert_close(got, want, atol=0, rtol=0)


# --- torch.func transforms ----------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("in_dims", [(0, 0, 0), (1, 1, 1), (0, None, None), (None, 0, 0)], ids=str)
def test_vmap_equals_a_loop_and_sdpa(causal, in_dims):
    q, k, v = _qkv()
    args = [t if d is None else t.movedim(0, d) for t, d in zip((q, k, v), in_dims)]
    args = [t[0] if d is None else t for t, d in zip(args, in_dims)]  # unbatched: one entry
    got = torch.vmap(lambda a, b, c: ft.attention(a, b, c, causal=causal), in_dims=in_dims)(*args)
    per = [[t if d is None else t.select(d, i) for t, d in zip(args, in_dims)] for i in range(3)]
    loop = torch.stack([ft.attention(*p, causal=causal) for p in per])
    torch.testing.assert_close(got, loop, atol=0, rtol=0)
    torch.testing.assert_close(got, torch.stack([sdpa(*p, is_causal=causal) for p in per]))


def test_vmap_with_options_and_every_output():
    q, k, v = _qkv(L=6, S=6)
    mask = torch.rand(6, 6, generator=torch.Generator().manual_seed(1)) < 0.7
    mask[:, 0] = True
    kw = dict(
        mask=mask,
        sinks=[0.5, -1.0],
        kv_lengths=[4, 6],
        scale=0.4,
        return_lse=True,
        return_weights=True,
    )

    def f(a, b, c):
        return ft.attention(a, b, c, **kw)

    got = torch.vmap(f)(q, k, v)
    loop = [f(q[i], k[i], v[i]) for i in range(3)]
    assert len(got) == 3
    for g, want in zip(got, zip(*loop)):
        torch.testing.assert_close(g, torch.stack(want), atol=0, rtol=0)


def test_vmap_of_the_op_itself():
    q, k, v = _qkv()
    out, lse, weights = torch.vmap(lambda a, b, c: OP(*_op_args(a, b, c, causal=True)))(q, k, v)
    torch.testing.assert_close(out, sdpa(q, k, v, is_causal=True))
    assert lse.shape == (3, 2, 5)


def test_func_grad_and_vjp_equal_sdpa():
    q, k, v = _qkv()
    grads = torch.func.grad(
        lambda a, b, c: ft.attention(a, b, c).square().sum(), argnums=(0, 1, 2)
    )(q, k, v)
    want = torch.func.grad(lambda a, b, c: sdpa(a, b, c).square().sum(), argnums=(0, 1, 2))(q, k, v)
    for g, w in zip(grads, want):
        torch.testing.assert_close(g, w)

    out, vjp = torch.func.vjp(lambda a, b, c: ft.attention(a, b, c, causal=True), q, k, v)
    out_want, vjp_want = torch.func.vjp(lambda a, b, c: sdpa(a, b, c, is_causal=True), q, k, v)
    torch.testing.assert_close(out, out_want)
    cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=out.dtype)
    for g, w in zip(vjp(cotangent), vjp_want(cotangent)):
        torch.testing.assert_close(g, w)


def test_func_grad_of_sinks_equals_autograd():
    q, k, v = _qkv()
    sinks = torch.tensor([0.3, -0.7], dtype=torch.float64)
    got = torch.func.grad(lambda s: ft.attention(q, k, v, sinks=s).sum())(sinks)
    s = sinks.clone().requires_grad_()
    ft.attention(q, k, v, sinks=s).sum().backward()
    torch.testing.assert_close(got, s.grad)


def test_per_example_gradients_and_jacobian():
    q, k, v = _qkv()
    per_example = torch.vmap(
        torch.func.grad(lambda a, b, c: ft.attention(a, b, c).sum(), argnums=(0, 1))
    )(q, k, v)
    for i in range(3):
        a, b = q[i].clone().requires_grad_(), k[i].clone().requires_grad_()
        want = torch.autograd.grad(sdpa(a, b, v[i]).sum(), (a, b))
        for g, w in zip(per_example, want):
            torch.testing.assert_close(g[i], w)
    jac = torch.func.jacrev(lambda a: ft.attention(a, k[0, 0], v[0, 0]))(q[0, 0])
    torch.testing.assert_close(jac, torch.func.jacrev(lambda a: sdpa(a, k[0, 0], v[0, 0]))(q[0, 0]))


def test_second_derivatives_are_refused_with_a_clear_error():
    q, k, v = _qkv()

    def inner(a):
        return torch.func.grad(lambda b: ft.attention(b, k, v).sum())(a).sum()

    with pytest.raises(NotImplementedError, match="first derivatives only"):
        torch.func.grad(inner)(q)
