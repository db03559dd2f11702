"""Bad inputs: every one raises the documented exception, naming the shapes or the dtype.

The reference goes through the same checks and must raise alike.
"""

from __future__ import annotations

import numpy as np
import pytest

from backends import BACKENDS
from fastattn import reference

pytestmark = pytest.mark.native  # the sanitizer build runs these (.ci/sanitize.sh)

F = np.float32


def z(*shape, dtype=F):
    return np.zeros(shape, dtype)


@pytest.fixture(params=[*BACKENDS, "reference"])
def fn(request):
    """Every backend, and the reference."""
    if request.param == "reference":
        yield reference.attention
        return
    with BACKENDS[request.param]() as attention:
        yield attention


def raises_naming(fn, exc, args, kwargs, *names):
    with pytest.raises(exc) as info:
        fn(*args, **kwargs)
    for name in names:
        assert name in str(info.value), f"{name!r} not in the message {str(info.value)!r}"


@pytest.mark.parametrize("q,k,v", [
    (z(4), z(3, 4), z(3, 2)),
    (z(2, 4), z(4), z(3, 2)),
    (z(2, 4), z(3, 4), z(2)),
    (np.float32(1), z(3, 4), z(3, 2)),
])
def test_fewer_than_two_dimensions(fn, q, k, v):
    raises_naming(fn, ValueError, (q, k, v), {}, str(q.shape), str(k.shape), str(v.shape))


@pytest.mark.parametrize("q,k,v,names", [
    (z(2, 3, 4), z(2, 5, 6), z(2, 5, 6), ["(2, 3, 4)", "(2, 5, 6)"]),  # E of q and k
    (z(3, 4), z(5, 4), z(6, 4), ["(5, 4)", "(6, 4)"]),  # S of k and v
    (z(2, 3, 4), z(3, 5, 4), z(3, 5, 4), ["(2, 3, 4)", "(3, 5, 4)"]),  # batch axes
    (z(2, 1, 3, 4), z(2, 5, 4), z(3, 5, 4), ["(2, 5, 4)", "(3, 5, 4)"]),
    (z(6, 3, 4), z(2, 5, 4), z(2, 5, 4), ["(6, 3, 4)", "(2, 5, 4)"]),  # heads without GQA
])
def test_shapes_that_do_not_fit(fn, q, k, v, names):
    raises_naming(fn, ValueError, (q, k, v), {}, *names)


@pytest.mark.parametrize("dtype", [np.complex64, np.complex128, object, "U3", "S3"])
@pytest.mark.parametrize("which", [0, 1, 2])
def test_unsupported_dtypes(fn, dtype, which):
    args = [z(3, 4), z(5, 4), z(5, 2)]
    args[which] = args[which].astype(dtype)
    raises_naming(fn, TypeError, args, {}, str(np.dtype(dtype)))


@pytest.mark.parametrize("mask_dtype", [np.int64, np.int8, np.uint8, np.complex64, object])
def test_mask_dtype(fn, mask_dtype):
    raises_naming(fn, TypeError, (z(3, 4), z(5, 4), z(5, 2)),
                  dict(mask=np.ones((3, 5), mask_dtype)), str(np.dtype(mask_dtype)))


@pytest.mark.parametrize("shape", [(4, 5), (3, 6), (6,), (2, 3, 5), (2, 1, 1, 5), (3, 5, 1)])
def test_mask_that_does_not_broadcast(fn, shape):
    raises_naming(fn, ValueError, (z(3, 4), z(5, 4), z(5, 2)), dict(mask=np.ones(shape, bool)),
                  str(shape), "(3, 5)")


def test_mask_beyond_the_batch_axes(fn):
    # (2, 3, 5) broadcasts with (4, 3, 5)'s batch? No: the mask may not add or change batch axes.
    raises_naming(fn, ValueError, (z(4, 3, 4), z(4, 5, 4), z(4, 5, 2)),
                  dict(mask=np.ones((2, 3, 5), bool)), "(2, 3, 5)", "(4, 3, 5)")


@pytest.mark.parametrize("qs,ks,vs,names", [
    ((6, 3, 4), (4, 5, 4), (4, 5, 4), ["(6, 3, 4)", "(4, 5, 4)"]),  # 6 % 4 != 0
    ((6, 3, 4), (5, 5, 4), (5, 5, 4), ["(6, 3, 4)", "(5, 5, 4)"]),
    ((2, 6, 3, 4), (2, 3, 5, 4), (2, 2, 5, 4), ["(2, 3, 5, 4)", "(2, 2, 5, 4)"]),  # k, v heads
    ((3, 4), (5, 4), (5, 2), ["(3, 4)", "(5, 4)"]),  # no head axis
])
def test_gqa_errors(fn, qs, ks, vs, names):
    raises_naming(fn, ValueError, (z(*qs), z(*ks), z(*vs)), dict(enable_gqa=True), *names)


@pytest.mark.parametrize("n", [0, -1, -8])
def test_num_threads_not_positive(fn, n):
    raises_naming(fn, ValueError, (z(3, 4), z(5, 4), z(5, 2)), dict(num_threads=n), str(n))


@pytest.mark.parametrize("n", [1.0, 2.5, "2", [2], np.float64(2)])
def test_num_threads_not_an_int(fn, n):
    with pytest.raises(TypeError):
        fn(z(3, 4), z(5, 4), z(5, 2), num_threads=n)


@pytest.mark.parametrize("n", [1, 2, 7, np.int64(2), np.int32(1)])
def test_num_threads_ints_accepted(backend, n):
    out = backend(z(3, 4), z(5, 4), z(5, 2), num_threads=n)
    assert out.shape == (3, 2) and np.all(out == 0)


@pytest.mark.parametrize("scale", ["1", [1.0], 1j, None])
def test_scale_type(backend, scale):
    if scale is None:  # the default is accepted
        assert backend(z(3, 4), z(5, 4), z(5, 2), scale=scale).shape == (3, 2)
        return
    with pytest.raises(TypeError):
        backend(z(3, 4), z(5, 4), z(5, 2), scale=scale)


@pytest.mark.parametrize("lengths, shown", [
    (np.uint64(2**64 - 1), "18446744073709551615"),  # was shown as its int64 wrap-around, -1
    (np.array([5, 2**64 - 1], np.uint64), "18446744073709551615"),
    (np.array([2**63], np.uint64), "9223372036854775808"),
    (np.array([3, 6], ">u8"), "6"),
    (np.int64(-3), "-3"),
])
def test_kv_lengths_out_of_range_show_the_values_given(fn, lengths, shown):
    with pytest.raises(ValueError) as info:
        fn(z(2, 3, 4), z(2, 5, 4), z(2, 5, 2), kv_lengths=lengths)
    message = str(info.value)
    assert "kv_lengths" in message and "S=5" in message and shown in message, message
    if shown != "-3":
        assert "-" not in message.split("got")[-1], message


# NumPy's np.broadcast_shapes stops at 32 axes (a RuntimeError) where arrays and the kernel take
# up to 64: batch shapes of more axes are still checked, and named, or run when they fit.
DEEP = (1,) * 32  # with one more batch axis in front: 33 batch axes


@pytest.mark.parametrize("qs, ks, vs, names", [
    ((2, *DEEP, 3, 4), (3, *DEEP, 5, 4), (3, *DEEP, 5, 2), ["q (2, 1,", "k (3, 1,"]),
    ((2, *DEEP, 3, 4), (2, *DEEP, 5, 4), (3, *DEEP, 5, 2), ["v (3, 1,"]),
    ((2, 2, *DEEP, 3, 4), (3, *DEEP, 5, 4), (3, *DEEP, 5, 2), ["q (2, 2, 1,", "k (3, 1,"]),
])
def test_batch_shapes_beyond_32_axes_that_do_not_broadcast(fn, qs, ks, vs, names):
    raises_naming(fn, ValueError, (z(*qs), z(*ks), z(*vs)), {}, "do not broadcast", *names)


@pytest.mark.parametrize("name, value, shown", [
    ("mask", np.ones((3, *DEEP, 3, 5), bool), "mask of shape (3, 1,"),
    ("mask", np.ones((2, 2, *DEEP, 3, 5), bool), "mask of shape (2, 2, 1,"),
    ("alibi_slopes", np.ones((3, *DEEP)), "alibi_slopes of shape (3, 1,"),
    ("sinks", np.ones((3, *DEEP)), "sinks of shape (3, 1,"),
    ("kv_lengths", np.ones((3, *DEEP), np.int64), "kv_lengths of shape (3, 1,"),
])
def test_batch_operands_beyond_32_axes_that_do_not_fit(fn, name, value, shown):
    raises_naming(fn, ValueError, (z(2, *DEEP, 3, 4), z(2, *DEEP, 5, 4), z(2, *DEEP, 5, 2)),
                  {name: value}, shown, "(2, 1, 1")


def test_batch_shapes_beyond_32_axes_that_broadcast(fn, rng):
    # 33 batch axes, broadcast among q, k, v and every batch operand: runs as the reference does.
    q = rng.standard_normal((2, *DEEP[1:], 3, 3, 4))
    k, v = rng.standard_normal((1, *DEEP[1:], 1, 5, 4)), rng.standard_normal((*DEEP, 5, 2))
    options = dict(mask=rng.standard_normal((*DEEP, 3, 5)), alibi_slopes=np.ones((2, *DEEP[1:], 1)),
                   kv_lengths=np.array([3, 5]), sinks=np.zeros(3), return_lse=True)
    out, lse = fn(q, k, v, **options)
    assert out.shape == (2, *DEEP[1:], 3, 3, 2) and lse.shape == (2, *DEEP[1:], 3, 3)
    want = reference.attention(q.reshape(2, 3, 3, 4), k.reshape(1, 1, 5, 4),
                               v.reshape(5, 2), mask=options["mask"].reshape(3, 5),
                               alibi_slopes=np.ones((2, 1)), kv_lengths=np.array([3, 5]),
                               sinks=np.zeros(3), return_lse=True)
    np.testing.assert_allclose(out.reshape(want[0].shape), want[0], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(lse.reshape(want[1].shape), want[1], rtol=1e-12, atol=1e-12)


def test_backward_beyond_32_axes(rng):
    import fastattn

    q = rng.standard_normal((2, *DEEP, 3, 4))
    k, v = rng.standard_normal((*DEEP, 5, 4)), rng.standard_normal((*DEEP, 5, 2))
    out, lse = fastattn.attention(q, k, v, return_lse=True)
    dout = rng.standard_normal(out.shape)
    got = fastattn.attention_backward(q, k, v, out, lse, dout)
    want = reference.attention_backward(q, k, v, out, lse, dout)
    for g, w, x in zip(got, want, (q, k, v)):
        assert g.shape == x.shape
        np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match=r"do not broadcast; got q \(2, 1,"):
        fastattn.attention_backward(q, k[None].repeat(3, 0), v, out, lse, dout)


def test_layer_batch_shapes_beyond_32_axes():
    import fastattn

    x, ctx, w = z(2, *DEEP, 3, 4), z(3, *DEEP, 5, 4), z(4, 4)
    with pytest.raises(ValueError, match=r"x and context do not broadcast; got x \(2, 1,"):
        fastattn.multi_head_attention(x, w, w, w, w, num_heads=2, context=ctx)
    out = fastattn.multi_head_attention(x, w, w, w, w, num_heads=2, context=z(*DEEP, 5, 4))
    assert out.shape == x.shape


@pytest.mark.parametrize("shapes", [
    [(), ()], [(3,), ()], [(2, 1), (1, 4)], [(0,), (1,)], [(1, 0), (5, 1)],
    [(2, 3), (3,), (1, 1, 3)], [(2,), (3,)], [(0,), (2,)], [(2, 1), (3, 1, 5)], [(1, 2), (2, 3)],
])
def test_broadcast_shapes_agrees_with_numpy(shapes):
    from fastattn._validate import broadcast_shapes

    try:
        want = np.broadcast_shapes(*shapes)
    except ValueError:
        with pytest.raises(ValueError):
            broadcast_shapes(*shapes)
    else:
        assert broadcast_shapes(*shapes) == want
