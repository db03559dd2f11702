"""Memory bound: the kernel never builds the L x S score matrix."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import resource, sys, numpy as np, fastattn

    def peak():  # bytes; VmHWM can be reset, ru_maxrss (KiB on Linux) cannot
        try:
            with open("/proc/self/status") as f:
                return next(int(l.split()[1]) for l in f if l.startswith("VmHWM")) * 1024
        except OSError:
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 4, 16384, 64), dtype=np.float32) for _ in range(3))
    fastattn.attention(q[..., :64, :], k[..., :64, :], v[..., :64, :], num_threads=2)  # warm up
    backward = sys.argv[1] == "backward"
    if backward:  # the forward's results, then only the backward pass is measured
        out, lse = fastattn.attention(q, k, v, num_threads=2, return_lse=True)
        fastattn.attention_backward(q[..., :64, :], k[..., :64, :], v[..., :64, :],
                                    out[..., :64, :], lse[..., :64], out[..., :64, :])
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak to the current RSS
    except OSError:
        pass
    before = peak()
    if backward:
        grads = fastattn.attention_backward(q, k, v, out, lse, out, num_threads=2)
        print(peak() - before, sum(g.nbytes for g in grads))
    else:
        out = fastattn.attention(q, k, v, num_threads=2)
        print(peak() - before, out.nbytes)
""")


def _peak_growth(mode: str, timeout: int) -> tuple[int, int]:
    """(peak RSS growth, bytes of the results) of SCRIPT's `mode` run in a fresh process."""
    env = {k: v for k, v in os.environ.items() if k != "FASTATTN_ISA"}
    res = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True,
                         env=env, timeout=timeout)
    assert res.returncode == 0, res.stderr
    growth, result_bytes = map(int, res.stdout.split())
    return growth, result_bytes


@pytest.mark.slow
def test_peak_memory_growth():
    # One float32 score matrix of one head is 16384^2 * 4 B = 1 GiB; the output is 16 MiB.
    growth, out_bytes = _peak_growth("forward", 300)
    # "Well under 200 MB" over the inputs: the output plus per-thread packed K/V and tiles.
    assert growth < 100 * 2**20, f"peak RSS grew by {growth / 2**20:.1f} MiB"
    assert growth >= out_bytes * 0.9  # the measurement does see the output being written


@pytest.mark.slow
def test_backward_peak_memory_growth():
    # The backward pass recomputes the weights block by block: no 1 GiB score matrix of a head,
    # only dq, dk, dv (48 MiB) and per-thread packed queries and dQ (~5 L E floats, 20 MiB).
    growth, grad_bytes = _peak_growth("backward", 600)
    assert growth < 300 * 2**20, f"peak RSS grew by {growth / 2**20:.1f} MiB"
    assert growth >= grad_bytes * 0.9  # the measurement does see the gradients being written
