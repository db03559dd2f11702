"""Threads: num_threads, the GIL released during the kernel, concurrent calls, all cores used."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

import fastattn
from layouts import qkv
from tolerances import check

# (batch, L, S): the tile kernel; a few queries with keys split across threads; a few queries
# over many batch entries (no split).
CASES = [((2, 2), 200, 300), ((1,), 2, 8192), ((1,), 1, 1500), ((16,), 3, 600)]


@pytest.mark.parametrize("batch,L,S", CASES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_thread_counts_agree(backend, rng, batch, L, S, dtype):
    q, k, v = qkv(rng, batch, L, S, 32, 16, dtype)
    mask = rng.random((L, S)) < 0.9
    results = {}
    for n in (1, 2, 3, None):
        results[n] = check(backend, q, k, v, mask=mask, causal=L > 2, num_threads=n)
        # The same thread count gives the same bits.
        np.testing.assert_array_equal(backend(q, k, v, mask=mask, causal=L > 2, num_threads=n),
                                      results[n])
    # Different thread counts: each within the tolerance of the reference (check above); the key
    # splits change the order of the sums, so bits may differ.


def _calibrated_problem(rng, seconds=0.3):
    """Inputs for which a one-thread call takes about ``seconds``."""
    batch = 1
    while True:
        q, k, v = (rng.standard_normal((batch, 256, 64), dtype=np.float32) for _ in range(3))
        t0 = time.perf_counter()
        fastattn.attention(q, k, v, num_threads=1)
        took = time.perf_counter() - t0
        if took >= seconds / 4 or batch >= 2**14:
            factor = max(1, int(round(seconds / took)))
            return (np.repeat(a, factor, axis=0) for a in (q, k, v))
        batch *= 4


def test_gil_is_released(rng):
    q, k, v = _calibrated_problem(rng)
    count = 0
    stop = threading.Event()

    def counter():
        nonlocal count
        while not stop.is_set():
            count += 1

    thread = threading.Thread(target=counter, daemon=True)
    thread.start()
    try:
        time.sleep(0.05)
        c0 = count
        t0 = time.perf_counter()
        time.sleep(0.2)  # the rate while this thread does not hold the GIL
        rate = (count - c0) / (time.perf_counter() - t0)
        c0 = count
        t0 = time.perf_counter()
        fastattn.attention(q, k, v, num_threads=1)  # one core for the kernel, one for the counter
        took = time.perf_counter() - t0
        during = count - c0
    finally:
        stop.set()
        thread.join()
    assert took > 0.1, f"the call took {took:.3f} s: too short to tell"
    # Held GIL: the counter stops for the whole call (a few switch intervals at most).
    assert during > 0.25 * rate * took, (during, rate * took, took)


def test_concurrent_calls_match_sequential(backend, rng):
    problems = []
    for i in range(6):
        q, k, v = qkv(rng, (2, 2), [3, 70, 150][i % 3], [2000, 100, 257][i % 3], 32, 16)
        kwargs = dict(causal=bool(i % 2), num_threads=1 + i % 2, return_weights=i == 4,
                      mask=rng.random((q.shape[-2], k.shape[-2])) < 0.8)
        problems.append((q, k, v, kwargs))
    want = [backend(q, k, v, **kw) for q, k, v, kw in problems]
    got = [[None] * len(problems) for _ in range(4)]
    errors = []

    def work(t):
        try:
            for rep in range(3):
                for i in np.random.default_rng(t * 10 + rep).permutation(len(problems)):
                    q, k, v, kw = problems[i]
                    got[t][i] = backend(q, k, v, **kw)
        except BaseException as e:  # noqa: B036 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    def as_tuple(r):
        return r if isinstance(r, tuple) else (r,)

    for results in got:
        for a, b in zip(results, want):
            for x, y in zip(as_tuple(a), as_tuple(b)):
                np.testing.assert_array_equal(x, y)


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs Linux /proc/self/task")
@pytest.mark.skipif(not fastattn._core.has_openmp(), reason="fastattn built without OpenMP")
def test_default_uses_all_cores():
    # With num_threads=None a call runs one thread per core (OpenMP keeps its pool afterwards);
    # num_threads=1 starts none.
    script = textwrap.dedent("""
        import os, numpy as np, fastattn
        tasks = lambda: len(os.listdir("/proc/self/task"))
        q = np.ones((64, 128, 16), np.float32)
        before = tasks()
        fastattn.attention(q, q, q, num_threads=1)
        one = tasks()
        fastattn.attention(q, q, q)
        print(before, one, tasks(), len(os.sched_getaffinity(0)))
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "FASTATTN_"))}
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    before, one, after, cores = map(int, res.stdout.split())
    assert one == before
    assert after - before >= cores - 1, (before, after, cores)
