"""The two registries: the backends ``fastattn.attention`` dispatches to (``backend=``) and the
peers the benchmark table measures fastattn against."""

from __future__ import annotations

import io

import numpy as np
import pytest

import fastattn
from fastattn import backends, reference


@pytest.fixture
def qkv():
    rng = np.random.default_rng(0)
    return tuple(rng.standard_normal((2, 3, n, 8)) for n in (5, 7, 7))


def test_backend_names():
    assert backends.names() == ("auto", "cpu", "cuda", "reference")
    q = np.ones((3, 4), np.float32)
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'cpu', 'cuda', "
                                         r"'reference'\), got 'gpu'"):
        fastattn.attention(q, q, q, backend="gpu")
    with pytest.raises(ValueError, match="backend must be one of"):
        fastattn.attention_backward(q, q, q, q, np.zeros(3), q, backend="gpu")


def test_auto_picks_the_cpu_for_numpy_arrays(qkv):
    assert backends.select("auto", qkv).name == "cpu"
    assert backends.select("auto", ()).name == "cpu"


def test_reference_backend_is_the_reference(qkv):
    q, k, v = qkv
    mask = np.arange(7) < 5
    kwargs = dict(mask=mask, causal=True, return_weights=True, return_lse=True,
                  sinks=np.array([0.5, -1.0, 0.0]))
    got = fastattn.attention(q, k, v, backend="reference", **kwargs)
    want = reference.attention(q, k, v, **kwargs)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)
    out, _, lse = got
    dout = np.ones_like(out)
    grads = fastattn.attention_backward(q, k, v, out, lse, dout, backend="reference", mask=mask,
                                        causal=True, sinks=kwargs["sinks"])
    for g, w in zip(grads, reference.attention_backward(q, k, v, out, lse, dout, mask=mask,
                                                        causal=True, sinks=kwargs["sinks"])):
        np.testing.assert_array_equal(g, w)
    # and the CPU kernel agrees with it
    np.testing.assert_allclose(fastattn.attention(q, k, v, backend="cpu", **kwargs)[0], out,
                               rtol=1e-12, atol=1e-12)


def test_reference_backend_keeps_dtypes():
    q = np.ones((4, 8), np.float16)
    out, lse = fastattn.attention(q, q, q, backend="reference", return_lse=True)
    assert out.dtype == np.float16 and lse.dtype == np.float32


def test_cuda_backend_has_no_backward(qkv):
    q, k, v = qkv
    out, lse = fastattn.attention(q, k, v, return_lse=True)
    with pytest.raises(NotImplementedError, match="backward"):
        fastattn.attention_backward(q, k, v, out, lse, out, backend="cuda")


class _Doubling:
    """A backend made up for the test: the CPU's output times two, refusing causal plans."""

    name = "doubling"

    def claims(self, arrays):
        return False

    def plan(self, q, k, v, **options):
        return backends.select("cpu", ()).plan(q, k, v, **options)

    def supports(self, plan):
        return "the doubling backend does not do causal" if plan.causal else None

    def forward(self, plan):
        out, weights, lse = backends.select("cpu", ()).forward(plan)
        return 2 * out, weights, lse

    def backward(self, plan, out, lse, dout, dtypes, recompute_lse):
        raise NotImplementedError("no backward")


def test_a_new_backend_is_one_registration(qkv, monkeypatch):
    monkeypatch.setattr(backends, "REGISTRY", dict(backends.REGISTRY))
    backends.register(_Doubling())
    q, k, v = qkv
    np.testing.assert_array_equal(fastattn.attention(q, k, v, backend="doubling"),
                                  2 * fastattn.attention(q, k, v))
    with pytest.raises(NotImplementedError, match="does not do causal"):
        fastattn.attention(q, k, v, backend="doubling", causal=True)
    assert "doubling" in backends.names()


def test_a_new_peer_is_one_registration():
    from fastattn.bench import forward, machine, peers
    from fastattn.bench.cases import Case
    from fastattn.bench.cli import peer_titles

    class Missing(peers.Adapter):
        name = "missing-peer"
        modules = ("fastattn_no_such_module",)
        package = "nosuchpkg"
        title = "No Such Runtime"

    before = peers.peers()
    peers.register(Missing())
    try:
        assert peers.peers() == before + ("missing-peer",)
        assert "missing-peer" in forward.columns()
        info = machine.machine_info(1)
        assert info["missing-peer"] == "absent"
        assert machine.machine_line(info).endswith(", nosuchpkg absent")
        assert peer_titles().endswith(" and No Such Runtime")
        report = io.StringIO()
        rows = forward.run_table([Case("t", 1, 1, 4, 4, 8)], rounds=1, calls=1, file=report,
                                 threads=1, ceilings=False)
        assert rows[0].status["missing-peer"] == "absent"
        assert "missing-peer is absent" in report.getvalue()
    finally:
        peers.ADAPTERS.pop("missing-peer")
        peers.PEERS.remove("missing-peer")
    assert peers.peers() == before
