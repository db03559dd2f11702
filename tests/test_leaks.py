"""No leaks, no growth: 20,000 calls of mixed shapes leave the resident memory flat.

The calls run in a fresh interpreter, so that nothing else the test session allocates moves its
resident set size (RSS, read from /proc/self/statm). After a warm-up (NumPy's and the allocator's
caches, OpenMP's thread pool, every kernel path once), 20,000 calls of small mixed problems on
every dispatch path, errors included, may move RSS by page-level noise only: a leak of even
100 bytes a call would add 2 MB. The C++ core on its own is checked by .ci/leaks.sh (valgrind and
LeakSanitizer on csrc/tests/driver.cpp).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

CALLS = 20_000
ALLOWED_GROWTH = 2 * 2**20  # bytes over all the calls after warm-up

SCRIPT = textwrap.dedent("""
    import itertools, os, sys
    import numpy as np
    import fastattn

    PAGE = os.sysconf("SC_PAGE_SIZE")

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * PAGE

    rng = np.random.default_rng(0)
    isas = fastattn.available_isas()
    dtypes = [np.float32, np.float64, np.float16]
    problems = []  # (q, k, v, kwargs): every kernel path, small enough to run thousands fast
    for i, (L, S, E, dtype) in enumerate(itertools.product(
            (1, 3, 17, 70), (0, 1, 5, 40, 300), (1, 8, 33), dtypes)):
        q = rng.standard_normal((2, 2, L, E)).astype(dtype)
        k = rng.standard_normal((2, 1 + i % 2, S, E)).astype(dtype)
        v = rng.standard_normal((2, 1 + i % 2, S, 5)).astype(dtype)
        kwargs = dict(
            causal=i % 3 == 0, return_weights=i % 4 == 0, return_lse=i % 5 == 0,
            enable_gqa=True, num_threads=2 if i % 10 == 7 else 1,  # 2: wake-ups are slow
            mask=(rng.random((L, S)) < 0.7) if i % 6 == 1 else None,
            window=(3, 1) if i % 7 == 2 else None,
            alibi_slopes=np.array([0.5, 0.25]) if i % 8 == 3 else None,
            softcap=5.0 if i % 9 == 4 else None,
            kv_lengths=np.array([S, S // 2]) if i % 10 == 5 else None,
        )
        problems.append((q, k, v, kwargs))
    bad = [  # each raises ValueError or TypeError; the error paths must not leak either
        (np.ones((3, 4)), np.ones((5, 3)), np.ones((5, 2)), {}),
        (np.ones((3, 4)), np.ones((5, 4)), np.ones((5, 2)), dict(mask=np.ones((3, 5), np.int8))),
        (np.ones((3, 4)), np.ones((5, 4)), np.ones((5, 2)), dict(num_threads=0)),
    ]

    def run(n):
        for j in range(n):
            fastattn.set_isa(isas[j % len(isas)])
            if j % 50 == 49:
                q, k, v, kwargs = bad[j // 50 % len(bad)]
                try:
                    fastattn.attention(q, k, v, **kwargs)
                except (ValueError, TypeError):
                    pass
                else:
                    sys.exit("a bad call did not raise")
                try:
                    fastattn.set_isa("no-such-isa")  # a C++ exception through Cython
                except ValueError:
                    pass
                continue
            q, k, v, kwargs = problems[j % len(problems)]
            fastattn.attention(q, k, v, **kwargs)
        fastattn.set_isa("")

    run(3 * len(problems))  # warm-up: every problem on every path
    before = rss()
    checkpoints = []
    for _ in range(4):
        run(CALLS // 4)
        checkpoints.append(rss() - before)
    print(len(problems), *checkpoints)
""").replace("CALLS", str(CALLS))


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux /proc/self/statm")
def test_many_calls_keep_memory_flat():
    env = {k: v for k, v in os.environ.items() if k not in ("FASTATTN_ISA", "OMP_NUM_THREADS")}
    res = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env,
                         timeout=600)
    assert res.returncode == 0, res.stderr
    n_problems, *growth = map(int, res.stdout.split())
    assert n_problems >= 100
    mib = [f"{g / 2**20:+.2f}" for g in growth]
    # Growth after each quarter of the calls: a leak grows steadily, noise does not.
    assert max(growth) < ALLOWED_GROWTH, f"RSS grew by {mib} MiB after each 5,000 calls"
