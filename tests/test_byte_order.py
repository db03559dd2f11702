"""Arrays in non-native byte order (``">f4"`` on a little-endian machine, byte-swapped bfloat16)
are read as the values they hold, on every backend, forward and backward: the result is that of
the same values in native order, bit for bit, in the native-order dtype, and the inputs are left
as they were. (The kernels read raw memory: a big-endian float32 read as native numbers gave
answers off by 0.68, float64 by 1e306, float16 and bfloat16 NaN.)
"""

from __future__ import annotations

import numpy as np
import pytest

import fastattn
from backends import BACKENDS
from fastattn import _core, reference
from layouts import values
from tolerances import assert_close_to_reference

ml_dtypes = pytest.importorskip("ml_dtypes", reason="bfloat16 cases need ml_dtypes")
BF16 = np.dtype(ml_dtypes.bfloat16)
DTYPES = {"f2": np.dtype(np.float16), "f4": np.dtype(np.float32), "f8": np.dtype(np.float64),
          "bf16": BF16, "i4": np.dtype(np.int32)}
CPU = [name for name in BACKENDS if name.startswith("cpu-")]


def swapped(a: np.ndarray) -> np.ndarray:
    """The values of ``a`` in the other byte order (a non-native dtype), checked bit by bit
    with integer views, which do not go through the conversions under test."""
    a = np.asarray(a)
    if a.dtype == BF16:  # bytes swapped by an integer view, then the swapped dtype
        out = a.view(np.uint16).byteswap().view(BF16.newbyteorder())
    else:
        out = a.astype(a.dtype.newbyteorder())
    assert not out.dtype.isnative and out.dtype.itemsize == a.dtype.itemsize > 1
    bits = np.dtype(f"u{a.dtype.itemsize}")
    assert np.array_equal(out.view(bits.newbyteorder()).astype(bits), a.view(bits))
    return out


def snapshot(arrays):
    return [(a.dtype, a.tobytes(), a.strides, a.flags.writeable) for a in arrays]


def assert_unchanged(arrays, saved):
    assert snapshot(arrays) == saved, "an input was modified (values, byte order or layout)"


def _list(result):
    return list(result) if isinstance(result, tuple) else [result]


def assert_same(got, want):
    """The same arrays, bit for bit, in the same native-order dtypes."""
    got, want = _list(got), _list(want)
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert type(g) is np.ndarray, f"result {i}: {type(g).__name__}"
        assert g.dtype == w.dtype and g.dtype.isnative, f"result {i}: {g.dtype!r}, want {w.dtype!r}"
        assert g.shape == w.shape, f"result {i}: shape {g.shape}, want {w.shape}"
        assert g.tobytes() == w.tobytes(), (
            f"result {i} differs from the native-order call by up to "
            f"{np.nanmax(np.abs(g.astype(np.float64) - w.astype(np.float64)))}")


def _is_array(a) -> bool:
    return isinstance(a, np.ndarray) and a.dtype.kind != "b"


def swap_options(options: dict) -> dict:
    return {n: swapped(a) if _is_array(a) else a for n, a in options.items()}


# q, k and v: (dtype, swapped?) each.
CASES = {
    "f2": [("f2", True)] * 3,
    "f4": [("f4", True)] * 3,
    "f4 native": [("f4", False)] * 3,
    "f8": [("f8", True)] * 3,
    "bf16": [("bf16", True)] * 3,
    "i4": [("i4", True)] * 3,
    "f4 mixed orders": [("f4", True), ("f4", False), ("f4", True)],
    "f8 only v swapped": [("f8", False), ("f8", False), ("f8", True)],
    "bf16 mixed orders": [("bf16", False), ("bf16", True), ("bf16", True)],
    "f2 f4 f8 mixed": [("f2", True), ("f4", False), ("f8", True)],
    "f2 bf16 mixed": [("f2", False), ("bf16", True), ("bf16", True)],
}


def _qkv(rng, case, batch=(2, 3), L=5, S=7, E=8, Ev=6):
    shapes = (batch + (L, E), batch + (S, E), batch + (S, Ev))
    natives = [values(rng, s, DTYPES[d]) for s, (d, _) in zip(shapes, case)]
    given = [swapped(a) if swap else a for a, (_, swap) in zip(natives, case)]
    return natives, given


@pytest.mark.parametrize("options", [{}, {"causal": True, "return_lse": True},
                                     {"return_weights": True, "return_lse": True}],
                         ids=["plain", "causal-lse", "weights-lse"])
@pytest.mark.parametrize("case", [c for c in CASES if c != "f4 native"])
def test_qkv(backend, rng, case, options):
    natives, given = _qkv(rng, CASES[case])
    saved = snapshot(given)
    got = backend(*given, **options)
    assert_unchanged(given, saved)
    assert_same(got, backend(*natives, **options))
    assert_close_to_reference(got, *given, **options)
    # The reference reads them as their values too.
    assert_same(reference.attention(*given, **options), reference.attention(*natives, **options))


def _operand(rng, name, dtype):
    """A value for the option ``name`` fitting (2, 3) batches of 5 queries and 7 keys."""
    dtype = DTYPES[dtype] if dtype in DTYPES else np.dtype(dtype)
    if name == "mask":
        return (rng.standard_normal((2, 1, 5, 7)) * 2).astype(dtype)
    if name == "kv_lengths":
        return np.array([4, 7], dtype)
    return (rng.random((3,)) + 0.25).astype(dtype)  # alibi_slopes, sinks: one per head


OPERANDS = [("mask", "f2"), ("mask", "f4"), ("mask", "f8"), ("mask", "bf16"),
            ("alibi_slopes", "f4"), ("alibi_slopes", "f8"), ("alibi_slopes", "f2"),
            ("sinks", "f4"), ("sinks", "f8"), ("sinks", "bf16"),
            ("kv_lengths", "i8"), ("kv_lengths", "i4"), ("kv_lengths", "u2")]


@pytest.mark.parametrize("qkv", ["f4", "f4 native", "f8 only v swapped", "bf16"])
@pytest.mark.parametrize("name, dtype", OPERANDS, ids=[f"{n}-{d}" for n, d in OPERANDS])
def test_options(backend, rng, name, dtype, qkv):
    natives, given = _qkv(rng, CASES[qkv])
    option = _operand(rng, name, dtype)
    options = {"return_lse": True, "causal": True, name: swapped(option)}
    saved = snapshot(given + [options[name]])
    got = backend(*given, **options)
    assert_unchanged(given + [options[name]], saved)
    native_options = {**options, name: option}
    assert_same(got, backend(*natives, **native_options))
    assert_close_to_reference(got, *given, **options)
    assert_same(reference.attention(*given, **options),
                reference.attention(*natives, **native_options))


def test_bool_mask_with_swapped_inputs(backend, rng):
    # bool has no byte order: it is read as given, with byte-swapped q, k and v.
    natives, given = _qkv(rng, CASES["f4"])
    mask = rng.random((5, 7)) < 0.7
    assert mask.dtype.byteorder == "|"
    got = backend(*given, mask=mask, return_weights=True)
    assert_same(got, backend(*natives, mask=mask, return_weights=True))
    assert_close_to_reference(got, *given, mask=mask, return_weights=True)


def test_plain_path_declines_swapped_arrays(rng):
    # The C-level path takes only the native float32 and float64 dtype objects: a swapped
    # array goes to the general path, which converts it.
    for d in ("f4", "f8"):
        natives, given = _qkv(rng, CASES[d])
        assert _core.attention_plain(*given, False, None, None) is None
        assert _core.attention_plain(*natives, False, None, None) is not None
        assert_same(fastattn.attention(*given), fastattn.attention(*natives))


# --- backward ---------------------------------------------------------------------------

# Loose bounds against the reference (its own tests hold the kernel to tight ones; bit-for-bit
# equality with the native-order call carries those over): what is checked here is that the
# values are read as they are, which a misread breaks by orders of magnitude.
BACKWARD_RTOL = {"f2": 2e-2, "bf16": 6e-2, "f4": 1e-4, "f8": 1e-10}


@pytest.mark.parametrize("with_options", [False, True], ids=["plain", "every-option"])
@pytest.mark.parametrize("dtype", ["f2", "f4", "f8", "bf16"])
@pytest.mark.parametrize("isa", CPU)
def test_backward(isa, rng, dtype, with_options):
    natives, _ = _qkv(rng, [(dtype, False)] * 3)
    options = {}
    if with_options:  # a float mask, ALiBi, kv_lengths and sinks, all byte-swapped too
        options = {"causal": True, "mask": _operand(rng, "mask", dtype),
                   "alibi_slopes": _operand(rng, "alibi_slopes", "f8"),
                   "kv_lengths": _operand(rng, "kv_lengths", "i8"),
                   "sinks": _operand(rng, "sinks", dtype)}
    with BACKENDS[isa]():
        out, lse = fastattn.attention(*natives, return_lse=True, **options)
        dout = values(rng, out.shape, out.dtype)
        args = [*natives, out, lse, dout]
        given = [swapped(a) for a in args]  # q, k, v, out, lse and dout all swapped
        given_options = swap_options(options)
        saved = snapshot(given + [a for a in given_options.values() if _is_array(a)])
        got = fastattn.attention_backward(*given, **given_options)
        assert_unchanged(given + [a for a in given_options.values() if _is_array(a)], saved)
        assert_same(got, fastattn.attention_backward(*args, **options))
    want = reference.attention_backward(*given, **given_options)
    assert_same(want, reference.attention_backward(*args, **options))
    for g, w in zip(got, want):
        w = w.astype(np.float64)
        tol = BACKWARD_RTOL[dtype] * max(np.abs(w).max(), 1.0)
        np.testing.assert_allclose(g.astype(np.float64), w, rtol=0, atol=tol)


@pytest.mark.parametrize("isa", CPU)
def test_backward_mixed_orders(isa, rng):
    # Only some of the six arrays swapped, float16 q, k and v: out and dout stay in float16
    # storage (read by the kernel as such) whichever their byte order.
    natives, given = _qkv(rng, [("f2", True), ("f2", False), ("f2", True)])
    with BACKENDS[isa]():
        out, lse = fastattn.attention(*natives, return_lse=True)
        dout = values(rng, out.shape, out.dtype)
        got = fastattn.attention_backward(*given, out, swapped(lse), swapped(dout))
        assert_same(got, fastattn.attention_backward(*natives, out, lse, dout))


# --- merge_attention, the layers, Dask --------------------------------------------------


@pytest.mark.parametrize("dtype", ["f2", "f4", "f8", "bf16"])
def test_merge_attention(rng, dtype):
    natives, _ = _qkv(rng, [(dtype, False)] * 3, S=12)
    q, k, v = natives
    parts = [fastattn.attention(q, k[..., s, :], v[..., s, :], return_lse=True)
             for s in (slice(0, 5), slice(5, 12))]
    outs, lses = [p[0] for p in parts], [p[1] for p in parts]
    given_outs, given_lses = [swapped(o) for o in outs], [swapped(s) for s in lses]
    saved = snapshot(given_outs + given_lses)
    got = fastattn.merge_attention(given_outs, given_lses)
    assert_unchanged(given_outs + given_lses, saved)
    assert_same(got, fastattn.merge_attention(outs, lses))
    # and mixed: one part swapped, the other not
    assert_same(fastattn.merge_attention([given_outs[0], outs[1]], [lses[0], given_lses[1]]),
                fastattn.merge_attention(outs, lses))
    whole = fastattn.attention(q, k, v, return_lse=True)
    rtol = {"f2": 2e-3, "bf16": 1.6e-2, "f4": 1e-5, "f8": 1e-12}[dtype]
    for g, w in zip(got, whole):
        np.testing.assert_allclose(g.astype(np.float64), w.astype(np.float64), rtol=rtol,
                                   atol=rtol)


@pytest.mark.parametrize("dtype", ["f2", "f4", "f8", "bf16"])
def test_layers(rng, dtype):
    d = DTYPES[dtype]
    x = values(rng, (2, 5, 8), d)
    w_q, w_k, w_v, w_o = (values(rng, (8, 8), d) for _ in range(4))
    b_q = values(rng, (8,), d)
    w_kv = values(rng, (8, 4), d)  # two kv heads of 2 features for four query heads
    natives = [x, w_q, w_k, w_v, w_o, b_q, w_kv]
    given = [swapped(a) for a in natives]
    saved = snapshot(given)
    got = fastattn.self_attention(*given[:4], b_q=given[5], causal=True, return_lse=True)
    assert_same(got, fastattn.self_attention(*natives[:4], b_q=b_q, causal=True,
                                             return_lse=True))
    x_, w_q_, _, _, w_o_, b_q_, w_kv_ = given
    got = fastattn.multi_head_attention(x_, w_q_, w_kv_, w_kv_, w_o_, num_heads=4,
                                        num_kv_heads=2, b_q=b_q_, return_weights=True)
    assert_same(got, fastattn.multi_head_attention(x, w_q, w_kv, w_kv, w_o, num_heads=4,
                                                   num_kv_heads=2, b_q=b_q, return_weights=True))
    assert_unchanged(given, saved)
    layer = fastattn.MultiHeadAttention(8, num_heads=2, dtype=d, seed=0)
    assert_same(layer(given[0], causal=True), layer(x, causal=True))


@pytest.mark.parametrize("chunked", [False, True], ids=["numpy-in", "dask-in"])
@pytest.mark.parametrize("dtype", ["f2", "f4", "f8", "bf16"])
def test_dask(rng, dtype, chunked):
    da = pytest.importorskip("dask.array", reason="fastattn.dask needs dask (fastattn[dask])")
    import dask

    import fastattn.dask

    natives, _ = _qkv(rng, [(dtype, False)] * 3, L=6, S=10)
    mask = (rng.standard_normal((2, 1, 6, 10)) * 2).astype(DTYPES[dtype])
    options = {"causal": True, "mask": mask,
               "alibi_slopes": _operand(rng, "alibi_slopes", dtype),
               "kv_lengths": np.array([9, 10], np.int64), "sinks": _operand(rng, "sinks", "f4"),
               "return_weights": True, "return_lse": True, "num_threads": 1}
    given = [swapped(a) for a in natives]
    given_options = swap_options(options)
    saved = snapshot(given + [a for a in given_options.values() if _is_array(a)])

    def run(q, k, v, mask, **kw):
        if chunked:
            q, k, v = (da.from_array(a, chunks=(1, 2, 4, 8)) for a in (q, k, v))
            mask = da.from_array(mask, chunks=(1, 1, 4, 4))
        result = fastattn.dask.attention(q, k, v, mask=mask, **kw)
        return dask.compute(*result, scheduler="sync")

    got = run(*given, **given_options)
    assert_unchanged(given + [a for a in given_options.values() if _is_array(a)], saved)
    assert_same(got, run(*natives, **options))
    assert_close_to_reference(got, *given, **given_options)


# --- the conversion itself, and device arrays -------------------------------------------


def test_native_conversion_is_exact():
    # Every bfloat16 bit pattern (NaNs with their payloads included), and the other dtypes,
    # come back with the same bits in the native dtype; native arrays are returned as given.
    from fastattn._validate import native

    bits = np.arange(1 << 16, dtype=np.uint16)
    x = bits.view(BF16)
    s = swapped(x)
    assert s.dtype.name == "bfloat16" and not s.dtype.isnative  # ml_dtypes keeps the name
    back = native(s)
    assert back.dtype == BF16 and back.dtype.isnative
    np.testing.assert_array_equal(back.view(np.uint16), bits)
    assert np.array_equal(native(s[::-3]).view(np.uint16), bits[::-3])  # any layout
    for d in ("f2", "f4", "f8", "i4", "u2"):
        a = values(np.random.default_rng(0), (3, 4), np.dtype(d))
        assert native(a) is a
        back = native(swapped(a).T)
        assert back.dtype == a.dtype and back.tobytes() == a.T.tobytes()
    for a in (np.zeros(3, bool), np.zeros(3, np.int8)):  # one byte: no order
        assert native(a) is a


def _fake_device(shape, dtype):
    """An object that claims to be a device array (no memory behind it)."""
    cai = {"shape": shape, "typestr": np.dtype(dtype).str, "data": (0, False), "version": 3,
           "strides": None}
    return type("FakeDevice", (), {"__cuda_array_interface__": cai})()


@pytest.mark.parametrize("name", ["q", "k", "v", "mask"])
def test_swapped_device_arrays_are_refused(name):
    # The CUDA backend reads device arrays in place; one in non-native order is a TypeError
    # naming the byte order (checked from its dtype alone: no GPU needed).
    from fastattn.backends.cuda import _prepare_device

    shapes = {"q": (2, 3, 4), "k": (2, 5, 4), "v": (2, 5, 6), "mask": (3, 5)}
    arrays = {n: _fake_device(s, ">f4" if n == name else "<f4") for n, s in shapes.items()}
    with pytest.raises(TypeError, match="byte order") as info:
        _prepare_device(arrays, dict.fromkeys(arrays, True), {})
    assert name in str(info.value) and "big-endian" in str(info.value)


@pytest.mark.cuda
def test_swapped_device_array_through_the_cuda_backend(rng):
    # The public call on a CUDA backend (a GPU, or Numba's simulator): the same TypeError.
    if not any(n.startswith("cuda") for n in BACKENDS):
        pytest.skip("no CUDA backend here (no GPU, FASTATTN_TEST_CUDA not 'sim'); "
                    "test_swapped_device_arrays_are_refused checks the same without one")
    q = values(rng, (2, 3, 4), np.float32)
    with pytest.raises(TypeError, match="byte order"):
        fastattn.attention(_fake_device((2, 3, 4), ">f4"), q, q, backend="cuda")
