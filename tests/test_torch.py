"""fastattn.torch: the custom op on PyTorch tensors, against the NumPy entry point and the
reference, and through torch.library.opcheck, torch.compile and torch.export."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.torch
torch = pytest.importorskip("torch", reason="fastattn.torch needs torch (fastattn[torch])")
pytest.importorskip("ml_dtypes", reason="bfloat16 tensors are viewed as ml_dtypes' bfloat16")

import fastattn  # noqa: E402
import fastattn.torch as ft  # noqa: E402
from tolerances import assert_close_to_reference  # noqa: E402

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def _numpy(t):
    return ft._to_numpy(t)


def _qkv(shape_q, shape_kv, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape_q, generator=g).to(dtype),
            torch.randn(shape_kv, generator=g).to(dtype),
            torch.randn(shape_kv, generator=g).to(dtype))


# Every argument of fastattn.attention at least once.
OPTIONS = [
    dict(),
    dict(causal=True, align="bottom_right"),
    dict(window=(3, 1), scale=0.3),
    dict(enable_gqa=True, softcap=5.0, return_lse=True),
    dict(mask="bool", return_weights=True, num_threads=1),
    dict(mask="float", alibi_slopes=[0.1, 0.2, 0.3, 0.4]),
    dict(kv_lengths=[3, 11], sinks=[0.5, -1.0, 2.0, 0.0], return_lse=True, return_weights=True),
    dict(similarity="cosine", causal=True),
]


def _options(kwargs, L, S, tensors):
    kwargs = dict(kwargs)
    rng = np.random.default_rng(0)
    if kwargs.get("mask") == "bool":
        kwargs["mask"] = rng.random((2, 1, L, S)) < 0.8
    elif kwargs.get("mask") == "float":
        kwargs["mask"] = rng.standard_normal((L, S)).astype(np.float32)
    if tensors:
        kwargs = {n: torch.as_tensor(np.asarray(a)) if isinstance(a, (list, np.ndarray)) else a
                  for n, a in kwargs.items()}
    return kwargs


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kwargs", OPTIONS, ids=str)
def test_equals_the_numpy_entry_point(dtype, kwargs):
    L, S = 7, 11
    kv_heads = 2 if kwargs.get("enable_gqa") else 4
    q, k, v = _qkv((2, 4, L, 8), (2, kv_heads, S, 8), dtype)
    q = q.transpose(-1, -2).contiguous().transpose(-1, -2)  # any strides: column-major q
    got = ft.attention(q, k, v, **_options(kwargs, L, S, tensors=True))
    want = fastattn.attention(_numpy(q), _numpy(k), _numpy(v), **_options(kwargs, L, S, False))
    got = got if isinstance(got, tuple) else (got,)
    want = want if isinstance(want, tuple) else (want,)
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert isinstance(g, torch.Tensor)
        is_lse = kwargs.get("return_lse") and i == len(got) - 1
        # lse stays in the compute dtype (float32 for 16-bit inputs), for a backward pass
        assert g.dtype == (torch.float32 if is_lse and dtype.itemsize == 2 else dtype)
        # the same kernel: equal once rounded alike
        np.testing.assert_array_equal(_numpy(g).astype(w.dtype).astype(np.float64),
                                      w.astype(np.float64))
    assert_close_to_reference(tuple(_numpy(g).astype(w.dtype) for g, w in zip(got, want))
                              if len(got) > 1 else _numpy(got[0]),
                              _numpy(q), _numpy(k), _numpy(v), **_options(kwargs, L, S, False))


def test_inputs_are_not_modified_and_output_is_fresh():
    q, k, v = _qkv((2, 3, 5, 8), (2, 3, 9, 8))
    saved = [t.clone() for t in (q, k, v)]
    out = ft.attention(q, k, v)
    for t, s in zip((q, k, v), saved):
        assert torch.equal(t, s)
    assert all(out.data_ptr() != t.data_ptr() for t in (q, k, v))
    out += 1  # writable, owned by the result


def test_bfloat16_is_read_without_widening():
    # The kernel reads the bfloat16 bits in place: the NumPy view shares the tensor's memory.
    q = torch.randn(2, 3, 4, 8).to(torch.bfloat16)
    view = _numpy(q)
    assert view.dtype.name == "bfloat16" and view.__array_interface__["data"][0] == q.data_ptr()


def test_errors_name_shapes_and_dtypes():
    q, k, v = _qkv((2, 3, 5, 8), (2, 3, 9, 8))
    with pytest.raises(ValueError, match=r"\(2, 3, 5, 8\).*\(2, 3, 9, 7\)"):
        ft.attention(q, k[..., :7], v)
    with pytest.raises(TypeError, match="complex"):
        ft.attention(q.to(torch.complex64), k, v)
    with pytest.raises(TypeError, match="scale"):
        ft.attention(q, k, v, scale="big")
    with pytest.raises(ValueError, match="sinks"):
        ft.attention(q, k, v, sinks=torch.zeros(4))


def _op_args(q, k, v, **overrides):
    args = dict(mask=None, causal=False, scale=None, enable_gqa=False, num_threads=None,
                align="top_left", window_left=None, window_right=None, alibi_slopes=None,
                softcap=None, kv_lengths=None, similarity="dot", sinks=None,
                return_weights=False)
    args.update(overrides)
    return (q, k, v, *args.values())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_opcheck(dtype):
    q, k, v = _qkv((2, 4, 6, 8), (2, 2, 9, 8), dtype)
    cases = [
        _op_args(q, k, v, enable_gqa=True, causal=True, align="bottom_right"),
        _op_args(q, k, v, enable_gqa=True, mask=torch.rand(6, 9) < 0.7, return_weights=True,
                 sinks=torch.randn(4), kv_lengths=torch.tensor([4, 9]), window_left=2),
    ]
    for args in cases:
        torch.library.opcheck(torch.ops.fastattn.attention.default, args)


class _Block(torch.nn.Module):
    """A module with the op inside, between ordinary torch operations."""

    def forward(self, x, sinks):
        q, k, v = x * 2, x + 1, x.flip(-2)
        out = ft.attention(q, k[:, :2], v[:, :2], causal=True, enable_gqa=True, sinks=sinks,
                           window=(5, None))
        return out.relu() * 3


def test_torch_compile_fullgraph():
    x, sinks = torch.randn(2, 4, 16, 8), torch.randn(4)
    block = _Block()
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, sinks), block(x, sinks), atol=0, rtol=0)


def test_torch_export():
    x, sinks = torch.randn(2, 4, 16, 8), torch.randn(4)
    block = _Block()
    exported = torch.export.export(block, (x, sinks))
    assert "fastattn.attention" in str(exported.graph)
    torch.testing.assert_close(exported.module()(x, sinks), block(x, sinks), atol=0, rtol=0)


def _decode(q, k, v):
    return ft.attention(q, k, v, causal=True, align="bottom_right", enable_gqa=True)


def test_torch_compile_dynamic_keys_compiles_once():
    # A KV cache grows by one key per decode step: the fake implementation keeps the sizes
    # symbolic, so the graph is not recompiled for each length.
    from torch._dynamo.testing import CompileCounter

    counter = CompileCounter()
    compiled = torch.compile(_decode, fullgraph=True, dynamic=True, backend=counter)
    for S in (5, 9, 13):
        q, k, v = _qkv((1, 4, 1, 8), (1, 2, S, 8), seed=S)
        torch.testing.assert_close(compiled(q, k, v), _decode(q, k, v), atol=0, rtol=0)
    assert counter.frame_count == 1


def test_torch_export_dynamic_keys():
    class Decode(torch.nn.Module):
        def forward(self, q, k, v):
            return _decode(q, k, v)

    keys = torch.export.Dim("keys", min=2, max=4096)
    q, k, v = _qkv((1, 4, 1, 8), (1, 2, 9, 8))
    exported = torch.export.export(Decode(), (q, k, v),
                                   dynamic_shapes=({}, {2: keys}, {2: keys}))
    q, k, v = _qkv((1, 4, 1, 8), (1, 2, 30, 8), seed=1)
    torch.testing.assert_close(exported.module()(q, k, v), _decode(q, k, v), atol=0, rtol=0)


@pytest.mark.cuda
def test_cuda_tensors_need_the_cuda_backend():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device for CUDA tensors")
    q = torch.randn(1, 2, 4, 8, device="cuda")
    try:
        out = ft.attention(q, q, q)
    except ImportError as e:  # without numba-cuda: says what to install
        assert "numba-cuda" in str(e)
    else:
        assert out.device == q.device
        torch.testing.assert_close(out.cpu(), ft.attention(q.cpu(), q.cpu(), q.cpu()))
