"""fastattn.attention_varlen and attention_varlen_backward: ragged batches packed back to back.

Each sequence is held to the reference on its own rows with the suite's tolerance rule, the
gradients to the float64 reference gradients, and a sequence's results never depend on another
sequence's values.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import fastattn
from readme import run_example
from tolerances import assert_close_to_reference

pytestmark = pytest.mark.native  # the sanitizer build runs these (.ci/sanitize.sh)
DTYPES = (np.float32, np.float64, np.float16, ml_dtypes.bfloat16)


def _cu(lengths) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)


def _heads_first(x, lo, hi):
    return x[lo:hi].transpose(1, 0, 2)


@st.composite
def problems(draw):
    n = draw(st.integers(0, 4))
    lengths_q = draw(st.lists(st.integers(0, 80), min_size=n, max_size=n))
    same = draw(st.booleans())  # self-attention: the same lengths for keys
    lengths_k = lengths_q if same else draw(st.lists(st.integers(0, 80), min_size=n,
                                                     max_size=n))
    H_kv, group = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    options = {"causal": draw(st.booleans())}
    if draw(st.booleans()):
        options["window"] = (draw(st.integers(0, 20)), draw(st.sampled_from([None, 0, 3])))
    if draw(st.booleans()):
        options["softcap"] = 5.0
    if draw(st.booleans()):
        slopes = np.linspace(0.1, 0.4, H_kv * group)
        options["alibi_slopes"] = (np.tile(slopes, (n, 1)) * np.arange(1, n + 1)[:, None]
                                   if draw(st.booleans()) else slopes)
    if draw(st.booleans()):
        options["sinks"] = np.linspace(-1.0, 1.0, H_kv * group)
    return dict(dtype=draw(st.sampled_from(DTYPES)), lengths_q=lengths_q, lengths_k=lengths_k,
                H=H_kv * group, H_kv=H_kv, E=draw(st.sampled_from([8, 16])),
                Ev=draw(st.sampled_from([8, 12])), options=options,
                seed=draw(st.integers(0, 2**32 - 1)))


@given(problems())
def test_each_sequence_matches_the_reference(p):
    rng = np.random.default_rng(p["seed"])
    cu_q, cu_k = _cu(p["lengths_q"]), _cu(p["lengths_k"])
    dt = p["dtype"]
    q = rng.standard_normal((cu_q[-1], p["H"], p["E"])).astype(dt)
    k = rng.standard_normal((cu_k[-1], p["H_kv"], p["E"])).astype(dt)
    v = rng.standard_normal((cu_k[-1], p["H_kv"], p["Ev"])).astype(dt)
    saved = [a.copy() for a in (q, k, v)]
    out, lse = fastattn.attention_varlen(q, k, v, cu_q, cu_k, return_lse=True, **p["options"])
    assert all(a.tobytes() == b.tobytes() for a, b in zip((q, k, v), saved))
    assert out.shape == (cu_q[-1], p["H"], p["Ev"]) and lse.shape == (p["H"], cu_q[-1])
    for i in range(len(p["lengths_q"])):
        options = dict(p["options"])
        if np.ndim(options.get("alibi_slopes")) == 2:
            options["alibi_slopes"] = options["alibi_slopes"][i]
        qs, ks = (cu_q[i], cu_q[i + 1]), (cu_k[i], cu_k[i + 1])
        got = (_heads_first(out, *qs), lse[:, qs[0]:qs[1]])
        assert_close_to_reference(got, _heads_first(q, *qs), _heads_first(k, *ks),
                                  _heads_first(v, *ks), enable_gqa=True, align="bottom_right",
                                  return_lse=True, **options)


@pytest.mark.parametrize("causal", [False, True])
def test_gradients_match_the_reference(causal, rng):
    lengths = [7, 0, 30, 12]
    cu = _cu(lengths)
    q = rng.standard_normal((cu[-1], 4, 16))
    k, v = (rng.standard_normal((cu[-1], 2, 16)) for _ in range(2))
    sinks = np.array([0.5, -0.5, 0.0, 1.0])
    out, lse = fastattn.attention_varlen(q, k, v, cu, cu, causal=causal, sinks=sinks,
                                         return_lse=True)
    dout = rng.standard_normal(out.shape)
    dq, dk, dv, dsinks = fastattn.attention_varlen_backward(q, k, v, out, lse, dout, cu, cu,
                                                            causal=causal, sinks=sinks)
    want_dsinks = np.zeros_like(sinks)
    for i in range(len(lengths)):
        s = (cu[i], cu[i + 1])
        args = [_heads_first(x, *s) for x in (q, k, v)]
        o, lse_i = fastattn.reference.attention(*args, causal=causal, enable_gqa=True,
                                                align="bottom_right", sinks=sinks,
                                                return_lse=True)
        ref = fastattn.reference.attention_backward(
            *args, o, lse_i, _heads_first(dout, *s), causal=causal, enable_gqa=True,
            align="bottom_right", sinks=sinks)
        for got, want in zip((dq, dk, dv), ref[:3]):
            np.testing.assert_allclose(_heads_first(got, *s), want, rtol=1e-9, atol=1e-11)
        want_dsinks += ref[3]
    np.testing.assert_allclose(dsinks, want_dsinks, rtol=1e-9, atol=1e-11)


def test_float32_gradients_per_sequence_are_attention_backwards(rng):
    # The same kernel on the same rows: bit for bit what attention_backward gives a sequence.
    lengths = [40, 3, 70]
    cu = _cu(lengths)
    q, k, v = (rng.standard_normal((cu[-1], 2, 32), dtype=np.float32) for _ in range(3))
    out, lse = fastattn.attention_varlen(q, k, v, cu, cu, causal=True, return_lse=True)
    dout = np.ones_like(out)
    grads = fastattn.attention_varlen_backward(q, k, v, out, lse, dout, cu, cu, causal=True)
    for i in range(3):
        s = (cu[i], cu[i + 1])
        o, lse_i = fastattn.attention(*(_heads_first(x, *s) for x in (q, k, v)), causal=True,
                                      align="bottom_right", return_lse=True)
        want = fastattn.attention_backward(*(_heads_first(x, *s) for x in (q, k, v)), o, lse_i,
                                           _heads_first(dout, *s), causal=True,
                                           align="bottom_right")
        for got, w in zip(grads, want):
            assert _heads_first(got, *s).tobytes() == np.ascontiguousarray(w).tobytes()


def test_a_sequence_sees_only_its_own_rows(rng):
    lengths = [20, 50, 9]
    cu = _cu(lengths)
    q, k, v = (rng.standard_normal((cu[-1], 2, 16), dtype=np.float32) for _ in range(3))
    base = fastattn.attention_varlen(q, k, v, cu, cu)
    k2, v2 = k.copy(), v.copy()
    k2[cu[1]:cu[2]] = 1e3  # another sequence's keys and values, however large
    v2[cu[1]:cu[2]] = np.nan
    other = fastattn.attention_varlen(q, k2, v2, cu, cu)
    for i in (0, 2):
        assert other[cu[i]:cu[i + 1]].tobytes() == base[cu[i]:cu[i + 1]].tobytes()
    assert np.isnan(other[cu[1]:cu[2]]).all()


def test_matches_the_padded_call(rng):
    # The same batch padded to its longest sequence, keys cut by kv_lengths.
    lengths = [13, 64, 30]
    cu = _cu(lengths)
    q, k, v = (rng.standard_normal((cu[-1], 4, 16), dtype=np.float32) for _ in range(3))
    out = fastattn.attention_varlen(q, k, v, cu, cu)
    padded = [np.zeros((3, 64, 4, 16), np.float32) for _ in range(3)]
    for i, n in enumerate(lengths):
        for dst, src in zip(padded, (q, k, v)):
            dst[i, :n] = src[cu[i]:cu[i + 1]]
    want = fastattn.attention(*(x.transpose(0, 2, 1, 3) for x in padded),
                              kv_lengths=np.array(lengths))
    for i, n in enumerate(lengths):
        np.testing.assert_allclose(out[cu[i]:cu[i + 1]], want[i, :, :n].transpose(1, 0, 2),
                                   rtol=1e-5, atol=1e-6)


def test_reference_backend(rng):
    cu = _cu([4, 9])
    q, k, v = (rng.standard_normal((13, 2, 8)) for _ in range(3))
    got = fastattn.attention_varlen(q, k, v, cu, cu, causal=True, backend="reference")
    want = fastattn.attention_varlen(q, k, v, cu, cu, causal=True)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)


def test_empty_batch():
    q = np.zeros((0, 2, 8), np.float32)
    out, lse = fastattn.attention_varlen(q, q, q, [0], [0], return_lse=True)
    assert out.shape == (0, 2, 8) and out.dtype == np.float32 and lse.shape == (2, 0)


REFUSALS = {
    "cu not from 0": (ValueError, "start at 0", dict(cu_seqlens_q=[1, 5, 10])),
    "cu decreasing": (ValueError, "never decrease", dict(cu_seqlens_q=[0, 6, 5, 10])),
    "cu short of the total": (ValueError, "end at the 10", dict(cu_seqlens_k=[0, 5, 9])),
    "cu of floats": (TypeError, "cu_seqlens_q has dtype float64", dict(cu_seqlens_q=[0.0, 10.0])),
    "different counts": (ValueError, "delimit", dict(cu_seqlens_k=[0, 10])),
    "max_seqlen too small": (ValueError, "max_seqlen_q=4", dict(max_seqlen_q=4)),
    "not packed": (ValueError, "packed", dict(q=np.zeros((10, 8)))),
    "heads": (ValueError, "multiple of the number of key/value heads",
              dict(q=np.zeros((10, 3, 8)))),
    "alibi per sequence": (ValueError, "does not fit 2 sequences",
                           dict(alibi_slopes=np.ones((3, 2)))),
    "backend": (ValueError, "backend", dict(backend="tpu")),
}


@pytest.mark.parametrize("name", list(REFUSALS))
def test_refusals(name):
    error, message, change = REFUSALS[name]
    args = dict(q=np.zeros((10, 2, 8)), k=np.zeros((10, 2, 8)), v=np.zeros((10, 2, 8)),
                cu_seqlens_q=[0, 5, 10], cu_seqlens_k=[0, 5, 10])
    args.update(change)
    with pytest.raises(error, match=message):
        fastattn.attention_varlen(**args)


def test_backward_refuses_outputs_of_other_shapes():
    x = np.zeros((10, 2, 8))
    with pytest.raises(ValueError, match="as attention_varlen returns them"):
        fastattn.attention_varlen_backward(x, x, x, x, np.zeros((10, 2)), x, [0, 10], [0, 10])


def test_readme_example_runs():
    # The README's example of this API, as written.
    scope = run_example("### Ragged batches without padding")
    assert scope["out"].shape == (1517, 8, 64) and scope["dk"].shape == (1517, 2, 64)
    assert np.isfinite(scope["dq"]).all()
