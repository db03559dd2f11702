"""fastattn.dask on a real dask.distributed cluster (two worker processes on loopback), against
the in-memory call and the reference, over varied chunkings."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fastattn
from test_properties import problems
from tolerances import assert_close_to_reference

try:
    import dask
    import dask.array as da
    from dask.distributed import Client, LocalCluster

    import fastattn.dask as fdask
except ImportError:  # the subprocess test below still runs
    da = None

needs_dask = pytest.mark.skipif(
    da is None, reason="dask[array,distributed] is not installed (pip install 'fastattn[dask]')")


def test_import_fastattn_does_not_import_dask():
    code = ("import sys, fastattn; fastattn.merge_attention; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('dask', 'distributed')); "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_without_dask_the_error_says_what_to_install():
    code = ("import sys; sys.modules['dask'] = None\n"
            "try:\n    import fastattn.dask\n"
            "except ImportError as e:\n    assert 'fastattn[dask]' in str(e), e\n"
            "else:\n    raise AssertionError('imported without dask')\n")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.fixture(scope="module")
def client():
    if da is None:
        pytest.skip("dask[array,distributed] is not installed (pip install 'fastattn[dask]')")
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None) as cluster, Client(cluster) as c:
        yield c


def _compute(client, result):
    """Computes on the cluster; a tuple of results in one go, sharing their tasks."""
    if isinstance(result, tuple):
        return tuple(client.compute(list(result), sync=True))
    return client.compute(result, sync=True)


def _partials(result) -> int:
    """The kernel tasks in a result's graph (one per query block x key block run)."""
    graph = (result[0] if isinstance(result, tuple) else result).dask
    return sum(len(layer) for name, layer in graph.layers.items()
               if name.startswith("fastattn-partial-"))


def _random_chunks(draw, shape, max_pieces=3):
    """Chunks for ``shape``: each axis cut in 1..max_pieces pieces (some may be empty)."""
    chunks = []
    for n in shape:
        pieces = draw(st.integers(1, max_pieces)) if n > 1 else 1
        cuts = sorted(draw(st.lists(st.integers(0, n), min_size=pieces - 1,
                                    max_size=pieces - 1)))
        chunks.append(tuple(b - a for a, b in zip([0, *cuts], [*cuts, n])))
    return tuple(chunks)


@st.composite
def chunked_problems(draw):
    p = draw(problems(max_len=100))
    chunks = [_random_chunks(draw, x.shape, max_pieces=4 if i else 3)
              for i, x in enumerate((p.q, p.k, p.v))]
    mask = p.kwargs.get("mask")
    if mask is not None and draw(st.booleans()):
        p.kwargs["mask"] = da.from_array(mask, chunks=_random_chunks(draw, np.shape(mask)))
    return p, chunks


@needs_dask
@settings(max_examples=30)
@given(pc=chunked_problems())
def test_any_chunking_matches_the_reference(client, pc):
    p, chunks = pc
    dq, dk, dv = (da.from_array(x, chunks=c) for x, c in zip((p.q, p.k, p.v), chunks))
    got = _compute(client, fdask.attention(dq, dk, dv, **p.kwargs))
    kwargs = dict(p.kwargs)
    if isinstance(kwargs.get("mask"), da.Array):
        kwargs["mask"] = kwargs["mask"].compute()
    assert_close_to_reference(got, p.q, p.k, p.v, **kwargs)


@needs_dask
@pytest.mark.parametrize("kwargs", [
    dict(), dict(causal=True), dict(causal=True, align="bottom_right"), dict(window=(9, 4)),
    dict(window=(20, None), causal=True, align="bottom_right"), dict(alibi_slopes=[0.3, 0.1, 1, 2]),
    dict(kv_lengths=[70, 13]), dict(softcap=3.0), dict(similarity="cosine", causal=True),
    dict(sinks=[0.5, -1.0, 3.0, 20.0], return_weights=True),
    dict(sinks=[[0.5], [2.0]], kv_lengths=[0, 13]),
], ids=str)
def test_matches_the_in_memory_call(client, rng, kwargs):
    q = rng.standard_normal((2, 4, 50, 16)).astype(np.float32)
    k, v = (rng.standard_normal((2, 4, 70, 16)).astype(np.float32) for _ in "kv")
    mask = rng.random((50, 70)) < 0.8
    args = dict(kwargs, mask=mask, return_lse=True)
    dq = da.from_array(q, chunks=(1, 3, 16, 16))
    dk = da.from_array(k, chunks=(2, 1, 25, 8))  # E in two chunks: brought to one
    dv = da.from_array(v, chunks=(1, 2, 11, 16))  # keys chunked unlike k's: rechunked to them
    got = _compute(client, fdask.attention(dq, dk, dv, **args))
    want = fastattn.attention(q, k, v, **args)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-6)
    assert_close_to_reference(got, q, k, v, **args)


def _expected_partials(L, S, q_chunks, k_chunks, **kwargs) -> int:
    """Query x key block pairs in which the reference's scores have any key visible."""
    plan = fastattn._validate.prepare(np.zeros((L, 1)), np.zeros((S, 1)), np.zeros((S, 1)),
                                      **kwargs)
    visible = np.isfinite(fastattn.reference.logits_in(np.float64, plan))
    qs, ks = np.cumsum((0,) + q_chunks), np.cumsum((0,) + k_chunks)
    return sum(bool(visible[a:b, c:d].any()) for a, b in zip(qs, qs[1:])
               for c, d in zip(ks, ks[1:]))


@needs_dask
@pytest.mark.parametrize("kwargs", [
    dict(causal=True), dict(causal=True, align="bottom_right"), dict(window=(10, 0)),
    dict(window=(3, 20), align="bottom_right"), dict(window=(0, 0)), dict(),
], ids=str)
def test_key_blocks_outside_the_band_get_no_task(client, rng, kwargs):
    L, S, q_chunks, k_chunks = 64, 96, (16, 16, 32), (8, 24, 16, 16, 32)
    q = rng.standard_normal((2, L, 8))
    k, v = (rng.standard_normal((2, S, 8)) for _ in "kv")
    out = fdask.attention(da.from_array(q, chunks=(1, q_chunks, 8)),
                          da.from_array(k, chunks=(2, k_chunks, 8)), v, **kwargs)
    expected = _expected_partials(L, S, q_chunks, k_chunks, **kwargs)
    assert _partials(out) == 2 * expected  # two batch blocks
    if kwargs:
        assert expected < len(q_chunks) * len(k_chunks)  # each case skips something
    np.testing.assert_allclose(_compute(client, out), fastattn.attention(q, k, v, **kwargs),
                               rtol=1e-12, atol=1e-13)


@needs_dask
def test_key_blocks_past_every_length_get_no_task(client, rng):
    q, k, v = (rng.standard_normal((3, 2, 20, 4)) for _ in "qkv")
    lengths = np.array([3, 12, 0])
    out = fdask.attention(da.from_array(q, chunks=(1, 2, 20, 4)),
                          da.from_array(k, chunks=(1, 2, 5, 4)), v, kv_lengths=lengths)
    # Batch 0 needs key block 0, batch 1 blocks 0..2, batch 2 none.
    assert _partials(out) == 1 + 3
    want = fastattn.attention(q, k, v, kv_lengths=lengths)
    np.testing.assert_allclose(_compute(client, out), want, rtol=1e-12, atol=1e-13)
    assert np.all(want[2] == 0)


@needs_dask
@pytest.mark.parametrize("q_head_chunks, out_head_chunks", [
    ((2, 2, 2, 2), (2, 2, 2, 2)),  # inside one group each: one kv head per block
    ((4, 4), (4, 4)),  # aligned with the groups
    ((8,), (8,)),
    ((3, 5), (3, 1, 4)),  # 3..8 straddles the boundary at 4: split there
    ((1, 6, 1), (1, 3, 3, 1)),
])
def test_gqa_across_head_chunks(client, rng, q_head_chunks, out_head_chunks):
    q = rng.standard_normal((2, 8, 12, 4))
    k, v = (rng.standard_normal((2, 2, 17, 4)) for _ in "kv")
    alibi = rng.random(8)
    out, lse = fdask.attention(da.from_array(q, chunks=(1, q_head_chunks, 6, 4)),
                               da.from_array(k, chunks=(2, 1, 9, 4)), v, enable_gqa=True,
                               causal=True, alibi_slopes=alibi, return_lse=True)
    assert out.chunks[1] == out_head_chunks
    got = _compute(client, (out, lse))
    want = fastattn.attention(q, k, v, enable_gqa=True, causal=True, alibi_slopes=alibi,
                              return_lse=True)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-13)


@needs_dask
def test_weights_across_key_chunks(client, rng):
    q, k, v = (rng.standard_normal((1, 2, 30, 4)).astype(np.float16) for _ in "qkv")
    args = dict(causal=True, window=(7, 0), return_weights=True, return_lse=True)
    got = _compute(client, fdask.attention(da.from_array(q, chunks=(1, 1, 10, 4)),
                                           da.from_array(k, chunks=(1, 2, 6, 4)), v, **args))
    assert [g.dtype for g in got] == [np.float16, np.float16, np.float32]  # lse: compute dtype
    assert_close_to_reference(got, q, k, v, **args)


@needs_dask
@pytest.mark.parametrize("half", ["float16", "bfloat16"])
def test_half_inputs_give_a_float32_lse(client, rng, half):
    """The lse of 16-bit inputs is float32, declared so before anything is computed, merged
    across key chunks in float32 and never rounded to 16 bits; out keeps the inputs' dtype."""
    dtype = np.dtype(pytest.importorskip("ml_dtypes").bfloat16 if half == "bfloat16" else half)
    q = (rng.standard_normal((2, 3, 20, 8)) * 3).astype(dtype)  # logits of a few units
    k, v = (rng.standard_normal((2, 3, 45, 8)).astype(dtype) for _ in "kv")
    args = dict(causal=True, align="bottom_right", return_lse=True)
    out, lse = fdask.attention(da.from_array(q, chunks=(1, 3, 10, 8)),
                               da.from_array(k, chunks=(2, 3, 15, 8)), v, **args)
    assert out.dtype == dtype and lse.dtype == np.float32  # the lazy arrays' declared dtypes
    assert lse._meta.dtype == np.float32
    got = _compute(client, (out, lse))
    assert got[0].dtype == dtype and got[1].dtype == np.float32
    assert_close_to_reference(got, q, k, v, **args)
    want = fastattn.attention(q, k, v, **args)[1]
    np.testing.assert_allclose(got[1], want, rtol=1e-6, atol=1e-6)
    exact = fastattn.reference.attention_in(np.float64, fastattn._validate.prepare(
        q, k, v, **args))[2]
    err = np.abs(got[1].astype(np.float64) - exact).max()
    assert err < np.abs(exact.astype(dtype).astype(np.float64) - exact).max() / 100


@needs_dask
def test_numpy_inputs_and_a_deep_merge_tree(client, rng):
    q, k, v = (rng.standard_normal((2, 9, 5)) for _ in "qkv")
    dk = da.from_array(k, chunks=(1, 1, 5))  # nine key blocks, merged two by two: four levels
    out = fdask.attention(q, dk, v, split_every=2)
    assert isinstance(out, da.Array)
    merges = sum(len(layer) for name, layer in out.dask.layers.items()
                 if name.startswith("fastattn-merge-"))
    assert out.chunks[0] == (2,)  # the batch chunks are q's: a NumPy q is one chunk
    assert merges == 8  # nine parts take eight merges of two
    np.testing.assert_allclose(_compute(client, out), fastattn.attention(q, k, v),
                               rtol=1e-12, atol=1e-13)


@needs_dask
def test_no_keys_gives_zeros(client):
    q = da.ones((2, 5, 3), chunks=(1, 2, 3))
    kv = da.ones((2, 0, 3), chunks=(1, 0, 3))
    out, lse = fdask.attention(q, kv, kv, return_lse=True)
    assert _partials(out) == 0
    out, lse = _compute(client, (out, lse))
    np.testing.assert_array_equal(out, 0)
    np.testing.assert_array_equal(lse, -np.inf)


@needs_dask
def test_lazy_nothing_computed_until_asked(client):
    def boom(block):
        raise RuntimeError("a chunk was computed")

    q = da.ones((2, 8, 4), chunks=(1, 4, 4)).map_blocks(boom, meta=np.empty((0, 0, 0)))
    out = fdask.attention(q, q, q, causal=True)  # checks arguments from shapes and dtypes only
    assert out.shape == (2, 8, 4) and out.dtype == np.float64
    with pytest.raises(RuntimeError, match="computed"):
        _compute(client, out)


@needs_dask
def test_bad_input_raises_at_once():
    q = da.ones((2, 8, 4), chunks=2)
    with pytest.raises(ValueError, match=r"q \(2, 8, 4\), k \(2, 8, 5\)"):
        fdask.attention(q, da.ones((2, 8, 5)), q)
    with pytest.raises(TypeError, match="complex"):
        fdask.attention(q.astype(complex), q, q)
    with pytest.raises(ValueError, match=r"mask of shape \(3, 8\)"):
        fdask.attention(q, q, q, mask=da.ones((3, 8), dtype=bool))
    with pytest.raises(TypeError, match="int32"):
        fdask.attention(q, q, q, mask=np.ones((8, 8), np.int32))
    with pytest.raises(NotImplementedError, match="cuda"):
        fdask.attention(q, q, q, backend="cuda")
    with pytest.raises(ValueError, match="split_every"):
        fdask.attention(q, q, q, split_every=1)
    unknown = q[q[:, 0, 0] > 0]
    assert math.isnan(unknown.shape[0])
    with pytest.raises(ValueError, match="unknown chunk sizes"):
        fdask.attention(unknown, unknown, unknown)


@needs_dask
def test_array_query_planning_is_refused_clearly():
    """dask's experimental expression-based arrays take no HighLevelGraph: a clear error, where
    this dask has that mode (older ones ignore the setting and just work)."""
    code = ("import dask.array as da, fastattn.dask as f\n"
            "q = da.ones((1, 4, 2), chunks=2)\n"
            "try:\n    f.attention(q, q, q).compute()\n"
            "except NotImplementedError as e:\n"
            "    assert hasattr(q, 'expr') and 'query-planning' in str(e), e\n"
            "else:\n    assert not hasattr(q, 'expr')\n")
    env = dict(os.environ, DASK_ARRAY__QUERY_PLANNING="True")
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


@needs_dask
def test_graph_is_deterministic():
    q = da.ones((2, 8, 4), chunks=(1, 4, 4))
    a, b = (fdask.attention(q, q, q, causal=True) for _ in range(2))
    assert a.name == b.name
    assert fdask.attention(q, q, q).name != a.name
    assert dask.base.tokenize(a) == dask.base.tokenize(b)
