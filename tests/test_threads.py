"""Threads: num_threads, the GIL released during the kernel, concurrent calls, all cores used."""

from __future__ import annotations

import ast
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

pytestmark = pytest.mark.native  # the sanitizer build runs these (.ci/sanitize.sh)

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
def test_default_uses_all_cores():
    # With num_threads=None a call runs one thread per core (the pool keeps its threads
    # afterwards); num_threads=1 starts none.
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


# --- threads actually used ------------------------------------------------------------------

# Counts the threads that run during one call: each thread's CPU time from /proc/self/task (in
# clock ticks) before and after. The pool keeps its threads between calls, so counting the threads
# that exist (as above) would not show a call that asks for fewer.
USED_SCRIPT = textwrap.dedent("""
    import os, sys, time, numpy as np, fastattn

    def ticks():
        out = {}
        for tid in os.listdir("/proc/self/task"):
            try:
                with open(f"/proc/self/task/{tid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:  # the thread ended
                continue
            out[tid] = int(fields[11]) + int(fields[12])  # utime + stime
        return out

    def used(**kwargs):
        before, t0 = ticks(), time.perf_counter()
        fastattn.attention(q, q, q, **kwargs)
        wall = time.perf_counter() - t0
        after = ticks()
        # A thread took part if it ran for a tenth of the call; an idle pool thread spins for
        # well under a millisecond before it sleeps.
        least = max(2, 0.1 * wall * os.sysconf("SC_CLK_TCK"))
        return sum(after[t] - before.get(t, 0) >= least for t in after)

    rng = np.random.default_rng(0)
    q = rng.standard_normal((4, 256, 64), dtype=np.float32)  # 16 tiles of queries at least
    while True:  # as many batch entries as make a one-thread call last ~0.4 s
        t0 = time.perf_counter()
        fastattn.attention(q, q, q, num_threads=1)
        if time.perf_counter() - t0 > 0.1 or len(q) >= 4096:
            q = np.concatenate([q] * 4)
            break
        q = np.concatenate([q, q])
    fastattn.attention(q[:8], q[:8], q[:8], num_threads=3)  # the pool's threads exist from here
    counts = {"1": used(num_threads=1), "2": used(num_threads=2), "3": used(num_threads=3),
              "None": used()}
    if sys.argv[1:] == ["threadpoolctl"]:
        from threadpoolctl import threadpool_limits
        with threadpool_limits(limits=1):
            counts["None, threadpool_limits(1)"] = used()
            counts["2, threadpool_limits(1)"] = used(num_threads=2)
    print(repr(counts))
""")


def _used_threads(*args, **env):
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith(("OMP_", "GOMP_", "FASTATTN_"))}
    res = subprocess.run([sys.executable, "-c", USED_SCRIPT, *args], env={**clean, **env},
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    return ast.literal_eval(res.stdout)


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs Linux /proc/self/task")
@pytest.mark.skipif(not fastattn._core.has_openmp(), reason="fastattn built without OpenMP")
def test_threads_used_follow_num_threads_and_threadpoolctl():
    pytest.importorskip("threadpoolctl", reason="threadpoolctl limits need threadpoolctl")
    cores = len(os.sched_getaffinity(0))
    counts = _used_threads("threadpoolctl")
    # num_threads=3 on fewer cores runs one thread per core: no call runs more threads than the
    # process may use (see fastattn.attention's num_threads).
    assert counts == {"1": 1, "2": min(2, cores), "3": min(3, cores), "None": cores,
                      "None, threadpool_limits(1)": 1, "2, threadpool_limits(1)": min(2, cores)}, \
        counts


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs Linux /proc/self/task")
@pytest.mark.skipif(not fastattn._core.has_openmp(), reason="fastattn built without OpenMP")
def test_threads_used_follow_omp_num_threads():
    cores = len(os.sched_getaffinity(0))
    counts = _used_threads(OMP_NUM_THREADS="1")
    assert counts == {"1": 1, "2": min(2, cores), "3": min(3, cores), "None": 1}, counts


def test_import_leaves_the_environment_alone():
    # fastattn's idle threads give their core back by themselves (csrc/thread_pool.hpp): import
    # sets no OpenMP variable (it used to set GOMP_SPINCOUNT, a process-wide side effect that
    # did nothing when torch had loaded OpenMP first).
    code = ("import os; before = dict(os.environ); import fastattn; "
            "print(dict(os.environ) == before)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True).stdout.strip()
    assert out == "True"
