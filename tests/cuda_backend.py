"""The CUDA entry of ``backends.BACKENDS``: which CUDA backend the contract tests run on, if any.

``FASTATTN_TEST_CUDA`` chooses:

- ``sim``: Numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``, set here before numba is
  imported), entry ``cuda-sim``. It runs every CUDA thread as a Python thread, ~1e5 times slower
  than a GPU, so a problem whose estimated run time exceeds ``SIM_BUDGET_S`` is skipped with a
  reason saying so, and so are the Hypothesis tests (their draws are mostly too large);
  ``tests/test_cuda.py`` covers the kernel's paths on small shapes, with its own bounded
  property test.
- ``gpu``: a real GPU, which must be there; entry ``cuda``.
- ``off``: no CUDA entry.
- unset: ``cuda`` when numba-cuda is installed and finds a GPU; ``cuda-sim`` when
  ``NUMBA_ENABLE_CUDASIM=1`` is already set; else none.

Asking for ``sim`` or ``gpu`` without numba-cuda (or ``gpu`` without a GPU) is an error, not
a silent absence: CI asks for it to have the CUDA backend tested.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import math
import os
import sys
import threading
import warnings

import hypothesis
import numpy as np
import pytest

import fastattn

# Seconds a simulated call may take (estimated by ``_sim_seconds``) before it is skipped.
SIM_BUDGET_S = 1.0
# The simulator's cost is its barriers: its block manager busy-waits until every thread of the
# block has reached each ``syncthreads``, ~0.65 ms per thread and barrier on the 2-core CI
# machine (with ``fast_switching``), the thread's share of the arithmetic included.
_SIM_THREAD_BARRIER_S = 0.7e-3
# The GIL switch interval while simulated kernels run: the block manager's busy wait hands the
# GIL to the threads it waits for only at switch intervals (5 ms by default, 5x slower).
_SWITCH_INTERVAL_S = 1e-4
_switching = {"depth": 0, "saved": None}
_switching_lock = threading.Lock()


@contextlib.contextmanager
def fast_switching():
    """Lowers the GIL switch interval while simulated kernels run (nesting and threads share
    one lowering; the last to leave restores it), and silences the kernel's RuntimeWarnings.

    The simulator runs the kernel on NumPy scalars, which warn where a GPU silently follows
    IEEE (inf - inf is NaN, 0 * inf is NaN): the results are checked, the warnings are noise.
    (Added per call, inside the test: pytest restores the warning filters after each test.)
    """
    warnings.filterwarnings("ignore", category=RuntimeWarning,
                            module=r"fastattn\.backends\.cuda_kernel")
    with _switching_lock:
        if _switching["depth"] == 0:
            _switching["saved"] = sys.getswitchinterval()
            sys.setswitchinterval(_SWITCH_INTERVAL_S)
        _switching["depth"] += 1
    try:
        yield
    finally:
        with _switching_lock:
            _switching["depth"] -= 1
            if _switching["depth"] == 0:
                sys.setswitchinterval(_switching["saved"])


def _sim_seconds(q, k, v, kwargs) -> float | None:
    """Estimated run time of a call on the simulator; None if the shapes do not even fit
    (the backend's own errors must then be seen)."""
    from fastattn.backends.cuda_kernel import TILES

    try:
        qs, ks, vs = (np.shape(a) for a in (q, k, v))
        batch_ndim = max(len(s) for s in (qs, ks, vs)) - 2
        batch = [
            max((s[:-2][::-1][a] if a < len(s) - 2 else 1) for s in (qs, ks, vs))
            for a in range(batch_ndim)
        ]
        L, E, S, Ev = qs[-2], qs[-1], ks[-2], vs[-1]
    except (TypeError, ValueError, IndexError):
        return None
    tiles = TILES[np.dtype(np.float32)]  # the float64 tiles have more barriers, a bit less work
    rows = min(L, tiles.block_m)
    key_tiles = -(-S // tiles.block_n)
    barriers = (2 * -(-E // tiles.dk) + 2) * (-(-Ev // tiles.dv) or 1)
    if kwargs.get("return_weights"):
        barriers += 2 * -(-E // tiles.dk)
    thread_barriers = math.prod(batch) * -(-L // max(rows, 1)) * rows * key_tiles * barriers
    return thread_barriers * _SIM_THREAD_BARRIER_S


def _simulated(q, k, v, **kwargs):
    if hypothesis.currently_in_test_context():
        # Their draws are mostly too large for the simulator: skipping the test at once keeps
        # it deterministic (not "skipped after a random number of examples").
        pytest.skip(
            "property and fuzz tests draw problems too large for the CUDA simulator; "
            "tests/test_cuda.py runs a bounded property test of the CUDA backend, a GPU runs these"
        )
    seconds = _sim_seconds(q, k, v, kwargs)
    if seconds is not None and seconds > SIM_BUDGET_S:
        pytest.skip(
            f"too large for the CUDA simulator: q {np.shape(q)}, k {np.shape(k)}, "
            f"v {np.shape(v)} would take ~{seconds:.0f} s (budget {SIM_BUDGET_S} s); "
            "tests/test_cuda.py covers these paths on small shapes, a GPU runs it all"
        )
    with fast_switching():
        return fastattn.attention(q, k, v, backend="cuda", **kwargs)


def _missing(what: str) -> RuntimeError:
    return RuntimeError(
        f"FASTATTN_TEST_CUDA={os.environ.get('FASTATTN_TEST_CUDA')!r} asks for "
        f"the CUDA backend, but {what}; install it with: "
        'pip install "fastattn[cuda]"'
    )


def cuda_backends() -> dict:
    """{name: factory of a context manager yielding the attention callable}, as BACKENDS."""
    mode = os.environ.get("FASTATTN_TEST_CUDA", "").lower()
    if mode in ("off", "0", "no"):
        return {}
    if mode not in ("", "sim", "gpu"):
        raise ValueError(f"FASTATTN_TEST_CUDA must be sim, gpu or off; got {mode!r}")
    have_numba_cuda = importlib.util.find_spec("numba_cuda") is not None
    if mode == "sim":
        if not have_numba_cuda:
            raise _missing("numba-cuda is not installed")
        os.environ["NUMBA_ENABLE_CUDASIM"] = "1"
    elif not have_numba_cuda:
        if mode == "gpu":
            raise _missing("numba-cuda is not installed")
        return {}
    from numba import cuda

    if mode == "sim" and not cuda.config.ENABLE_CUDASIM:
        raise RuntimeError(
            "FASTATTN_TEST_CUDA=sim, but numba was imported before "
            "NUMBA_ENABLE_CUDASIM=1 could be set; set it in the environment"
        )
    if cuda.config.ENABLE_CUDASIM:
        if mode == "gpu":
            raise _missing("NUMBA_ENABLE_CUDASIM=1 is set (the simulator, not a GPU)")
        fn = _simulated
        name = "cuda-sim"
    else:
        if not cuda.is_available():
            if mode == "gpu":
                raise _missing("numba-cuda finds no GPU")
            return {}
        fn = functools.partial(fastattn.attention, backend="cuda")
        name = "cuda"
    return {name: lambda: contextlib.nullcontext(fn)}
