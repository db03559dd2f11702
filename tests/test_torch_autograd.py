"""Autograd through fastattn.torch.attention: fastattn's fused backward kernel as the operator
``fastattn::attention_backward``, checked by torch.autograd.gradcheck (float64), against
PyTorch's own SDPA autograd (float32), with torch.library.opcheck and torch.compile."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.torch
torch = pytest.importorskip("torch", reason="fastattn.torch needs torch (fastattn[torch])")
pytest.importorskip("ml_dtypes", reason="bfloat16 tensors are viewed as ml_dtypes' bfloat16")

from torch.nn.functional import scaled_dot_product_attention as sdpa  # noqa: E402

import fastattn.torch as ft  # noqa: E402

# Options whose gradients the backward kernel carries (masks and kv_lengths are constants).
GRAD_OPTIONS = [
    dict(),
    dict(causal=True),
    dict(causal=True, align="bottom_right", window=(2, 0)),
    dict(enable_gqa=True),
    dict(softcap=2.0, scale=0.7),
    dict(alibi_slopes=[0.3, 0.1]),
    dict(mask="bool", kv_lengths=[4, 6]),
    dict(similarity="cosine"),
    dict(sinks="grad"),
]


def _inputs(opts, dtype=torch.float64, L=5, S=7, E=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    hk = 1 if opts.get("enable_gqa") else 2
    q = torch.randn(2, 2, L, E, generator=g, dtype=dtype, requires_grad=True)
    k = torch.randn(2, hk, S, E, generator=g, dtype=dtype, requires_grad=True)
    v = torch.randn(2, hk, S, E + 1, generator=g, dtype=dtype, requires_grad=True)
    kwargs = dict(opts)
    tensors = [q, k, v]
    if kwargs.get("mask") == "bool":
        kwargs["mask"] = torch.rand(L, S, generator=g) < 0.8
    if kwargs.get("sinks") == "grad":
        kwargs["sinks"] = torch.randn(2, generator=g, dtype=dtype, requires_grad=True)
        tensors.append(kwargs["sinks"])
    return tensors, kwargs


@pytest.mark.parametrize("opts", GRAD_OPTIONS, ids=lambda o: ",".join(o) or "plain")
def test_gradcheck_float64(opts):
    tensors, kwargs = _inputs(opts)

    def f(q, k, v, *sinks):
        extra = {"sinks": sinks[0]} if sinks else {}
        return ft.attention(q, k, v, **{**kwargs, **extra})

    assert torch.autograd.gradcheck(f, tuple(tensors), eps=1e-6, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("gqa", [False, True])
def test_float32_gradients_match_pytorch(causal, gqa):
    opts = dict(causal=causal, enable_gqa=gqa)
    (q, k, v), _ = _inputs(opts, torch.float32, L=70, S=70, E=16, seed=1)
    dout = torch.randn(2, 2, 70, 17, generator=torch.Generator().manual_seed(2))
    ours = torch.autograd.grad(ft.attention(q, k, v, **opts), (q, k, v), dout)
    theirs = torch.autograd.grad(sdpa(q, k, v, is_causal=causal, enable_gqa=gqa), (q, k, v), dout)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_gradients(dtype):
    # Returned in the input dtype, within its rounding of the float32 gradients of the same
    # (rounded) inputs.
    (q, k, v), _ = _inputs({}, torch.float32, L=33, S=40, E=16)
    low = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    wide = [t.detach().float().requires_grad_() for t in low]
    grads = torch.autograd.grad(ft.attention(*low, causal=True).float().sum(), low)
    want = torch.autograd.grad(ft.attention(*wide, causal=True).sum(), wide)
    for g, w, t in zip(grads, want, low):
        assert g.dtype == dtype and g.shape == t.shape
        torch.testing.assert_close(g.float(), w, rtol=3e-2, atol=3e-2)


def test_gradients_through_lse_or_weights_are_refused():
    (q, k, v), _ = _inputs({})
    out, lse = ft.attention(q, k, v, return_lse=True)
    out.sum().backward()  # lse unused: fine
    assert q.grad is not None
    _, lse = ft.attention(q, k, v, return_lse=True)
    with pytest.raises(NotImplementedError, match="lse or weights"):
        lse.sum().backward()
    mask = torch.zeros(5, 7, dtype=torch.float64, requires_grad=True)
    with pytest.raises(NotImplementedError, match="mask or alibi_slopes"):
        ft.attention(q, k, v, mask=mask)


def test_backward_op_opcheck():
    (q, k, v), _ = _inputs({})
    out, lse, _ = torch.ops.fastattn.attention(q.detach(), k.detach(), v.detach(), None, True,
                                               None, False, None, "top_left", None, None, None,
                                               None, None, "dot", None, False)
    args = (q.detach(), k.detach(), v.detach(), out, lse, torch.randn_like(out), None, True, None,
            False, None, "top_left", None, None, None, None, None, "dot", None)
    torch.library.opcheck(torch.ops.fastattn.attention_backward.default, args)


def test_compiled_training_step_equals_eager():
    (q, k, v), _ = _inputs(dict(causal=True))

    def loss(q, k, v):
        return (ft.attention(q, k, v, causal=True) ** 2).sum()

    eager = torch.autograd.grad(loss(q, k, v), (q, k, v))
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(q, k, v), (q, k, v))
    for a, b in zip(got, eager):
        torch.testing.assert_close(a, b)


def test_a_small_model_trains():
    torch.manual_seed(0)
    layer = torch.nn.Linear(8, 24)
    x = torch.randn(4, 10, 8)
    target = torch.randn(4, 2, 10, 4)
    opt = torch.optim.Adam(layer.parameters(), lr=0.05)
    losses = []
    for _ in range(40):
        q, k, v = layer(x).view(4, 10, 3, 2, 4).permute(2, 0, 3, 1, 4)
        loss = ((ft.attention(q, k, v, causal=True) - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
