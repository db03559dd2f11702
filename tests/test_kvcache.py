"""fastattn.attention_with_kvcache: attention over a KV cache, contiguous or paged, with new
tokens appended in place.

Each sequence's result is held to the tolerance rule of every other test (tolerances.py):
against fastattn.reference.attention on that sequence's keys gathered into contiguous arrays,
aligned bottom-right. The append is checked byte for byte, paged caches against contiguous ones
for any permutation of their blocks, key splits against no split, and every refusal leaves the
cache as it was.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import fastattn
from layouts import values
from readme import run_example
from tolerances import assert_close_to_reference

pytestmark = pytest.mark.native  # the sanitizer build runs these (.ci/sanitize.sh)
DTYPES = (np.float32, np.float64, np.float16, ml_dtypes.bfloat16)


@pytest.fixture(params=fastattn.available_isas())
def isa(request):
    fastattn.set_isa(request.param)
    yield request.param
    fastattn.set_isa("")


def make_cache(rng, *, B, H_kv, capacity, E, Ev, dtype, layout="contiguous", block_size=16,
               spare=2):
    """(k_cache, v_cache, extra keywords, gather) filled with random values: contiguous,
    contiguous picked by cache_batch_idx, FlashAttention's (B, S, H, E) as a transposed view, or
    paged with a random permutation of blocks (and spare blocks no sequence uses). gather(cache,
    b) is sequence b's (H_kv, capacity, width) keys or values."""
    if layout == "paged":
        per_seq = -(-capacity // block_size)
        n_blocks = B * per_seq + spare
        k_cache = values(rng, (n_blocks, H_kv, block_size, E), dtype)
        v_cache = values(rng, (n_blocks, H_kv, block_size, Ev), dtype)
        table = rng.permutation(n_blocks)[:B * per_seq].reshape(B, per_seq).astype(np.int32)

        def gather(cache, b):
            pos = np.arange(per_seq * block_size)
            return cache[table[b, pos // block_size], :, pos % block_size].transpose(1, 0, 2)
        return k_cache, v_cache, {"block_table": table}, gather
    rows = B + spare if layout == "indexed" else B
    if layout == "BSHE":  # FlashAttention's layout, as a view
        k_cache = values(rng, (rows, capacity, H_kv, E), dtype).transpose(0, 2, 1, 3)
        v_cache = values(rng, (rows, capacity, H_kv, Ev), dtype).transpose(0, 2, 1, 3)
    else:
        k_cache = values(rng, (rows, H_kv, capacity, E), dtype)
        v_cache = values(rng, (rows, H_kv, capacity, Ev), dtype)
    idx = rng.permutation(rows)[:B] if layout == "indexed" else np.arange(B)
    extra = {"cache_batch_idx": idx} if layout == "indexed" else {}
    return k_cache, v_cache, extra, lambda cache, b: cache[idx[b]]


def check_against_reference(out, q, k_cache, v_cache, gather, lengths, **options):
    """Each sequence's rows against the reference on its keys, gathered (tolerances.py)."""
    return_lse = options.get("return_lse", False)
    B, H = q.shape[:2]
    for b in range(B):
        n = int(lengths[b])
        per_seq = {}
        for name in ("alibi_slopes", "sinks"):
            if options.get(name) is not None:
                per_seq[name] = np.broadcast_to(options[name], (B, H))[b]
        if options.get("mask") is not None:
            per_seq["mask"] = np.broadcast_to(options["mask"], (B, H) + options["mask"].shape[-2:])[
                b, ..., :n]
        kwargs = {**options, **per_seq}
        got = (out[0][b], out[1][b]) if return_lse else out[b]
        assert_close_to_reference(got, q[b], gather(k_cache, b)[:, :n], gather(v_cache, b)[:, :n],
                                  enable_gqa=True, align="bottom_right", **kwargs)


@st.composite
def problems(draw):
    dtype = draw(st.sampled_from(DTYPES))
    B, H_kv, group = draw(st.integers(1, 3)), draw(st.integers(1, 2)), draw(st.integers(1, 3))
    Lq = draw(st.sampled_from([1, 2, 4, 5, 17, 70]))
    new = draw(st.sampled_from(sorted({0, 1, Lq})))
    E, Ev = draw(st.sampled_from([8, 16, 20])), draw(st.sampled_from([8, 12]))
    layout = draw(st.sampled_from(["contiguous", "indexed", "BSHE", "paged"]))
    block_size = draw(st.sampled_from([1, 3, 16, 32, 40]))
    capacity = new + draw(st.integers(0, 300))
    seqlens = draw(st.lists(st.integers(0, capacity - new), min_size=B, max_size=B))
    options = {"causal": draw(st.booleans()), "return_lse": draw(st.booleans()),
               "num_splits": draw(st.sampled_from([0, 1, 3])),
               "num_threads": draw(st.sampled_from([1, 2]))}
    if draw(st.booleans()):
        options["window"] = (draw(st.integers(0, 40)), draw(st.sampled_from([None, 0, 5])))
    if draw(st.booleans()):
        options["softcap"] = draw(st.sampled_from([2.0, 30.0]))
    if draw(st.booleans()):
        options["alibi_slopes"] = np.linspace(0.05, 0.5, H_kv * group)
    if draw(st.booleans()):
        options["sinks"] = np.linspace(-1.0, 1.0, H_kv * group)
    return dict(dtype=dtype, B=B, H_kv=H_kv, H=H_kv * group, Lq=Lq, new=new, E=E, Ev=Ev,
                layout=layout, block_size=block_size, capacity=capacity,
                seqlens=np.array(seqlens), options=options, seed=draw(st.integers(0, 2**32 - 1)))


@given(problems())
def test_matches_reference_and_appends(isa, p):
    rng = np.random.default_rng(p["seed"])
    dtype, B, H_kv, new = p["dtype"], p["B"], p["H_kv"], p["new"]
    k_cache, v_cache, extra, gather = make_cache(
        rng, B=B, H_kv=H_kv, capacity=p["capacity"], E=p["E"], Ev=p["Ev"], dtype=dtype,
        layout=p["layout"], block_size=p["block_size"])
    q = values(rng, (B, p["H"], p["Lq"], p["E"]), dtype)
    k = values(rng, (B, H_kv, new, p["E"]), dtype) if new else None
    v = values(rng, (B, H_kv, new, p["Ev"]), dtype) if new else None
    before = [gather(c, b).copy() for c in (k_cache, v_cache) for b in range(B)]
    options = p["options"]
    out = fastattn.attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=p["seqlens"],
                                          **extra, **options)
    # The append, byte for byte: the new tokens at each sequence's length, nothing else moved.
    for c, (cache, x) in enumerate(((k_cache, k), (v_cache, v))):
        for b in range(B):
            want = before[c * B + b]
            if new:
                s = p["seqlens"][b]
                want[:, s:s + new] = x[b]
            assert gather(cache, b).tobytes() == want.tobytes()
    options = {key: val for key, val in options.items() if key != "num_splits"}
    check_against_reference(out, q, k_cache, v_cache, gather, p["seqlens"] + new, **options)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("Lq", [1, 3, 70])
def test_paged_equals_contiguous_for_any_block_order(isa, dtype, Lq, rng):
    # The same keys laid out contiguously and in pages of 16, in two random block orders: the
    # two paged calls agree bit for bit, and both agree with the contiguous call.
    B, H, H_kv, S, E = 3, 4, 2, 208, 32
    pages, n_blocks = S // 16, 2 * B * (S // 16)  # half of the blocks unused
    lengths = np.array([S - Lq, 37, 120])
    q = values(rng, (B, H, Lq, E), dtype)
    k_flat, v_flat = (values(rng, (B, H_kv, S, E), dtype) for _ in range(2))
    contiguous = fastattn.attention_with_kvcache(q, k_flat, v_flat, cache_seqlens=lengths + Lq,
                                                 causal=True)
    outs = []
    for _ in range(2):
        order = rng.permutation(n_blocks)[:B * pages].reshape(B, pages)
        k_pages = np.zeros((n_blocks, H_kv, 16, E), dtype)
        v_pages = np.zeros_like(k_pages)
        for b in range(B):
            for j in range(pages):
                k_pages[order[b, j]] = k_flat[b, :, 16 * j:16 * (j + 1)]
                v_pages[order[b, j]] = v_flat[b, :, 16 * j:16 * (j + 1)]
        outs.append(fastattn.attention_with_kvcache(q, k_pages, v_pages, block_table=order,
                                                    cache_seqlens=lengths + Lq, causal=True))
    assert outs[0].tobytes() == outs[1].tobytes()
    tol = 1e-12 if dtype == np.float64 else 1e-5 if dtype == np.float32 else 1e-2
    np.testing.assert_allclose(outs[0].astype(np.float64), contiguous.astype(np.float64),
                               rtol=tol, atol=tol)


@pytest.mark.parametrize("splits", [1, 2, 5, 64])
def test_key_splits_agree(isa, splits, rng):
    # One long sequence (batch x heads cannot fill the cores): the keys split across threads,
    # merged exactly, whatever the number of parts (some of them without a key).
    q = values(rng, (1, 2, 1, 64), np.float32)
    k_cache, v_cache = (values(rng, (1, 2, 5000, 64), np.float32) for _ in range(2))
    lengths = np.array([3001])
    base = fastattn.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=lengths,
                                           num_splits=1, num_threads=2, return_lse=True)
    got = fastattn.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=lengths,
                                          num_splits=splits, num_threads=2, return_lse=True)
    for a, b in zip(got, base):
        np.testing.assert_allclose(a, b, rtol=2e-6, atol=2e-6)
    check_against_reference(got, q, k_cache, v_cache, lambda c, b: c[b], lengths,
                            return_lse=True)


def test_row_without_keys_gives_zeros_and_minus_inf_lse(isa):
    q = np.ones((2, 2, 3, 8), np.float32)
    k_cache = np.ones((2, 2, 10, 8), np.float32)
    out, lse = fastattn.attention_with_kvcache(q, k_cache, k_cache.copy(),
                                               cache_seqlens=np.array([0, 2]), causal=True,
                                               return_lse=True)
    assert (out[0] == 0).all() and np.isneginf(lse[0]).all()
    # Causal bottom-right: of 3 queries over 2 keys, the first sees none.
    assert (out[1, :, 0] == 0).all() and np.isneginf(lse[1, :, 0]).all()
    assert np.isfinite(lse[1, :, 1:]).all()


def test_a_window_past_any_key_bounds_nothing(rng):
    # A window side larger than the kernel's "no bound" is no bound, as fastattn.attention
    # takes it.
    q = values(rng, (2, 4, 3, 16), np.float32)
    k_cache, v_cache = (values(rng, (2, 2, 40, 16), np.float32) for _ in range(2))
    got, unbounded = (fastattn.attention_with_kvcache(q, k_cache, v_cache, causal=True,
                                                      cache_seqlens=np.array([30, 7]),
                                                      window=(left, 0))
                      for left in (2**62, None))
    assert got.tobytes() == unbounded.tobytes()


def test_mask_over_cache_positions(rng):
    B, H, Lq, S, E = 2, 2, 3, 40, 8
    q = values(rng, (B, H, Lq, E), np.float32)
    k_cache, v_cache = (values(rng, (B, H, S, E), np.float32) for _ in range(2))
    mask = rng.random((B, 1, Lq, S)) < 0.7
    lengths = np.array([30, 12])
    out = fastattn.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=lengths, mask=mask)
    check_against_reference(out, q, k_cache, v_cache, lambda c, b: c[b], lengths, mask=mask)


def test_reference_backend_agrees(rng):
    B, H, H_kv, S, E = 2, 4, 2, 50, 16
    q = values(rng, (B, H, 1, E), np.float32)
    caches = [values(rng, (B, H_kv, S, E), np.float32) for _ in range(2)]
    k, v = (values(rng, (B, H_kv, 1, E), np.float32) for _ in range(2))
    got = fastattn.attention_with_kvcache(q, *[c.copy() for c in caches], k, v,
                                          cache_seqlens=np.array([10, 40]), causal=True)
    want = fastattn.attention_with_kvcache(q, *caches, k, v, cache_seqlens=np.array([10, 40]),
                                           causal=True, backend="reference")
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert want.dtype == np.float32


def _refusal_case(rng):
    q = values(rng, (2, 4, 1, 8), np.float32)
    k_cache, v_cache = (values(rng, (6, 2, 16, 8), np.float32) for _ in range(2))
    k, v = (values(rng, (2, 2, 1, 8), np.float32) for _ in range(2))
    return q, k_cache, v_cache, k, v


REFUSALS = {
    "past capacity": (ValueError, "capacity", lambda q, kc, vc, k, v: dict(
        cache_seqlens=np.array([3, 16]))),
    "negative length": (ValueError, ">= 0", lambda q, kc, vc, k, v: dict(
        cache_seqlens=np.array([-1, 2]))),
    "block id out of range": (ValueError, "block_table\\[1, 0\\] = 6", lambda q, kc, vc, k, v: dict(
        cache_seqlens=np.array([3, 2]), block_table=np.array([[0], [6]]))),
    "negative block id": (ValueError, "block_table\\[0, 0\\] = -1", lambda q, kc, vc, k, v: dict(
        cache_seqlens=np.array([3, 2]), block_table=np.array([[-1], [2]]))),
    "shared page written twice": (ValueError, "same cache row", lambda q, kc, vc, k, v: dict(
        cache_seqlens=np.array([3, 3]), block_table=np.array([[1], [1]]))),
    "repeated cache_batch_idx": (ValueError, "same cache row", lambda q, kc, vc, k, v: dict(
        cache_seqlens=np.array([3, 3]), cache_batch_idx=np.array([4, 4]))),
    "cache_batch_idx out of range": (ValueError, "cache_batch_idx", lambda q, kc, vc, k, v: dict(
        cache_seqlens=np.array([3, 3]), cache_batch_idx=np.array([0, 6]))),
    "float lengths": (TypeError, "cache_seqlens has dtype float64", lambda q, kc, vc, k, v: dict(
        cache_seqlens=np.array([3.0, 2.0]))),
    "wrong k shape": (ValueError, r"k of shape \(2, 2, 1, 4\)", lambda q, kc, vc, k, v: dict(
        cache_seqlens=np.array([3, 2]), k=k[..., :4])),
    "v of another length than k": (ValueError, r"v of shape \(2, 2, 2, 8\)",
                                   lambda q, kc, vc, k, v: dict(cache_seqlens=np.array([3, 2]),
                                                                v=np.concatenate([v, v], 2))),
    "q dtype": (TypeError, "q has dtype float64", lambda q, kc, vc, k, v: dict(
        cache_seqlens=np.array([3, 2]), q=q.astype(np.float64))),
    "q heads": (ValueError, "multiple of the cache's heads", lambda q, kc, vc, k, v: dict(
        cache_seqlens=np.array([3, 2]), q=q[:, :3])),
    "q features": (ValueError, "do not fit", lambda q, kc, vc, k, v: dict(
        cache_seqlens=np.array([3, 2]), q=q[..., :4])),
    "v_cache dtype": (TypeError, "one dtype", lambda q, kc, vc, k, v: dict(
        cache_seqlens=np.array([3, 2]), v_cache=vc.astype(np.float64))),
    "cache of ints": (TypeError, "k_cache has dtype int64", lambda q, kc, vc, k, v: dict(
        cache_seqlens=np.array([3, 2]), k_cache=kc.astype(np.int64))),
    "cache as a list": (TypeError, "must be a NumPy array", lambda q, kc, vc, k, v: dict(
        cache_seqlens=np.array([3, 2]), k_cache=kc.tolist())),
    "3-D cache": (ValueError, "must be 4-D", lambda q, kc, vc, k, v: dict(
        cache_seqlens=np.array([3, 2]), k_cache=kc[0])),
    "byte-swapped cache": (TypeError, "byte order", lambda q, kc, vc, k, v: dict(
        cache_seqlens=np.array([3, 2]), k_cache=kc.astype(">f4"))),
    "only k": (ValueError, "both k and v", lambda q, kc, vc, k, v: dict(
        cache_seqlens=np.array([3, 2]), v=None)),
    "bad num_splits": (ValueError, "num_splits", lambda q, kc, vc, k, v: dict(
        cache_seqlens=np.array([3, 2]), num_splits=-1)),
    "bad causal": (TypeError, "causal", lambda q, kc, vc, k, v: dict(
        cache_seqlens=np.array([3, 2]), causal="yes")),
    "bad backend": (ValueError, "backend", lambda q, kc, vc, k, v: dict(
        cache_seqlens=np.array([3, 2]), backend="gpu")),
}


@pytest.mark.parametrize("name", list(REFUSALS))
def test_refusals_leave_the_cache_untouched(name, rng):
    q, k_cache, v_cache, k, v = _refusal_case(rng)
    error, message, change = REFUSALS[name]
    args = dict(q=q, k_cache=k_cache, v_cache=v_cache, k=k, v=v)
    args.update(change(q, k_cache, v_cache, k, v))
    saved = [a.copy() for a in (k_cache, v_cache)]
    with pytest.raises(error, match=message):
        fastattn.attention_with_kvcache(**args)
    assert all((a == b).all() for a, b in zip((k_cache, v_cache), saved))


def test_read_only_cache_is_refused_when_appending(rng):
    q, k_cache, v_cache, k, v = _refusal_case(rng)
    k_cache.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        fastattn.attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=np.array([1, 1]))
    # Reading it is fine.
    out = fastattn.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=np.array([1, 1]))
    assert out.shape == (2, 4, 1, 8)


def test_generation_loop_grows_the_cache_in_place(rng):
    # A decode loop: one token appended per step, the lengths advanced by the caller; the
    # cache's buffer never moves and each step's output matches the reference.
    B, H, H_kv, E, steps = 2, 4, 2, 16, 20
    k_cache, v_cache = (np.zeros((B, H_kv, 64, E), np.float32) for _ in range(2))
    address = k_cache.__array_interface__["data"][0]
    lengths = np.array([5, 0])
    k_cache[0, :, :5] = values(rng, (H_kv, 5, E), np.float32)
    v_cache[0, :, :5] = values(rng, (H_kv, 5, E), np.float32)
    for _ in range(steps):
        q = values(rng, (B, H, 1, E), np.float32)
        k, v = (values(rng, (B, H_kv, 1, E), np.float32) for _ in range(2))
        out = fastattn.attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=lengths,
                                              causal=True)
        check_against_reference(out, q, k_cache, v_cache, lambda c, b: c[b], lengths + 1,
                                causal=True)
        lengths = lengths + 1
    assert k_cache.__array_interface__["data"][0] == address


def test_readme_example_runs():
    # The README's example of this API, as written.
    scope = run_example("### Attention over a KV cache")
    assert scope["out"].shape == (2, 8, 1, 64) and (scope["lengths"] == 12).all()
    assert np.isfinite(scope["out"]).all()
