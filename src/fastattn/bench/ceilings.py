"""The machine's ceilings, measured in the same run as the table: NumPy's sgemm and dgemm
GFLOP/s and the memory read bandwidth (absolute numbers drift on a shared machine; ratios taken
together do not)."""

from __future__ import annotations

import functools
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .timing import best_of, blas_threads

#: Variables that pin OpenBLAS to an older kernel (set on some machines for old OpenBLAS builds
#: that misdetect new CPUs); a GEMM ceiling measured under them understates the CPU.
OPENBLAS_PINS = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")

_GEMM_SCRIPT = """
import json, sys, time
import numpy as np
from threadpoolctl import threadpool_info, threadpool_limits
threads, calls, n = (int(a) for a in sys.argv[1:4])
out = {}
with threadpool_limits(threads, user_api="blas"):
    for name, dt in (("sgemm_gflops", np.float32), ("dgemm_gflops", np.float64)):
        a = np.ones((n, n), dt)
        np.dot(a, a)
        best = float("inf")
        for _ in range(calls):
            t0 = time.perf_counter()
            np.dot(a, a)
            best = min(best, time.perf_counter() - t0)
        out[name] = 2.0 * n**3 / best / 1e9
out["blas"] = "/".join(sorted({f"{i['internal_api']} {i.get('architecture', '')}".strip()
                               for i in threadpool_info() if i["user_api"] == "blas"}))
print(json.dumps(out))
"""


def measure_gemm(threads: int, calls: int, n: int = 2048) -> dict:
    """NumPy's sgemm and dgemm GFLOP/s on n x n, and which BLAS kernel ran them.

    Where OpenBLAS is pinned to an older kernel (OPENBLAS_PINS), they are measured in a child
    process without the pin, so that the ceiling is what this CPU's best kernel reaches.
    """
    import subprocess

    env = {k: v for k, v in os.environ.items() if k not in OPENBLAS_PINS}
    if env != dict(os.environ):
        try:
            done = subprocess.run([sys.executable, "-c", _GEMM_SCRIPT, str(threads), str(calls),
                                   str(n)], env=env, capture_output=True, text=True,
                                  timeout=300, check=True)
            out = json.loads(done.stdout)
            out["blas"] += " (without " + ", ".join(k for k in OPENBLAS_PINS
                                                  if k in os.environ) + ")"
            return out
        except (subprocess.SubprocessError, ValueError, OSError):
            pass  # measured here instead, under the pin
    out = {}
    with blas_threads(threads):
        for name, dt in (("sgemm_gflops", np.float32), ("dgemm_gflops", np.float64)):
            a = np.ones((n, n), dt)
            np.dot(a, a)
            out[name] = 2.0 * n**3 / best_of(functools.partial(np.dot, a, a), calls) / 1e9
    try:
        from threadpoolctl import threadpool_info

        out["blas"] = "/".join(sorted({f"{i['internal_api']} {i.get('architecture', '')}"
                                       for i in threadpool_info() if i["user_api"] == "blas"}))
    except ImportError:
        out["blas"] = "unknown"
    return out


def torch_read_gbs(x: np.ndarray, threads: int, calls: int) -> float | None:
    """GB/s of ``torch.sum`` over x on `threads` threads (None without torch)."""
    try:
        import torch
    except ImportError:
        return None
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        t = torch.from_numpy(x)
        t.sum()
        return x.nbytes / best_of(t.sum, calls) / 1e9
    finally:
        torch.set_num_threads(before)


def measure_ceilings(threads: int, calls: int = 3) -> dict:
    """NumPy's sgemm and dgemm GFLOP/s (2048x2048) and memory read bandwidth in GB/s.

    The bandwidth is ``torch.sum`` over a 1 GiB float32 vector on `threads` threads where
    torch is installed (the rate decode's target refers to), else the faster of ``np.dot(x, x)``
    and the vector split into `threads` parts dotted by as many Python threads at once (OpenBLAS
    does not thread a dot product in every build; NumPy releases the GIL in BLAS calls).
    """
    out = measure_gemm(threads, calls)
    with blas_threads(threads):
        x = np.ones(1 << 28, np.float32)  # np.ones writes every page, so none is lazily mapped
        np.dot(x, x)
        one = best_of(lambda: np.dot(x, x), calls)
    parts = np.array_split(x, threads)
    with blas_threads(1), ThreadPoolExecutor(threads) as pool:
        def split_dot():
            list(pool.map(lambda p: np.dot(p, p), parts))

        split = best_of(split_dot, calls)
    out["read_gbs_dot"] = x.nbytes / one / 1e9
    out["read_gbs_split"] = x.nbytes / split / 1e9
    out["read_gbs_torch"] = torch_read_gbs(x, threads, calls)
    out["read_gbs"] = out["read_gbs_torch"] or max(out["read_gbs_dot"], out["read_gbs_split"])
    return out


def ceilings_line(c: dict) -> str:
    torch_part = ("" if c.get("read_gbs_torch") is None else
                  f"torch.sum of 1 GiB on the threads: {c['read_gbs_torch']:.1f} GB/s; ")
    return (f"ceilings: sgemm {c['sgemm_gflops']:.0f} GFLOP/s, dgemm {c['dgemm_gflops']:.0f} "
            f"GFLOP/s (NumPy 2048x2048, {c.get('blas', 'BLAS')}); memory read "
            f"{c['read_gbs']:.1f} GB/s ({torch_part}np.dot of 1 GiB: {c['read_gbs_dot']:.1f} GB/s "
            f"in one call, {c['read_gbs_split']:.1f} split over the threads)")
