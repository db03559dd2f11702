"""Compiles the CUDA kernel to PTX for every dtype signature, with no GPU needed.

The simulator runs the kernel as Python and so checks no types; this compiles it for real with
``numba.cuda.compile_ptx`` (Numba's typing, then NVVM from the CUDA toolkit wheels that
``fastattn[cuda]`` installs), and checks that the kernels that accumulate in float32 have no
float64 instruction or register in their PTX: every constant and scalar reaches them as float32.

Usage: ``python tests/cuda_ptx_check.py [--cc 8.0] [--dump DIR]``. It runs in its own process
(NUMBA_ENABLE_CUDASIM is removed before numba is imported). Exit status 0: all compiled and
clean; 1: a compile error or float64 in a float32 kernel; 3: numba-cuda or the CUDA toolkit
(NVVM) is missing.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

# Any float64 instruction (add.f64, fma.rn.f64, cvt.f64.f32, ld.global.f64, setp.lt.f64...) or
# register declaration (.reg .f64) in the PTX.
F64 = re.compile(r"\.f64\b")
MISSING = 3


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cc", default="8.0", help="compute capability to compile for")
    parser.add_argument("--dump", type=Path, help="write each signature's PTX into this folder")
    args = parser.parse_args(argv)
    cc = tuple(int(x) for x in args.cc.split("."))

    os.environ.pop("NUMBA_ENABLE_CUDASIM", None)  # before numba is imported
    try:
        from numba import cuda
        from numba.cuda.cudadrv import nvvm

        from fastattn.backends import cuda_kernel
    except ImportError as e:
        print(f'numba-cuda is not installed ({e}); pip install "fastattn[cuda]"')
        return MISSING
    if cuda.config.ENABLE_CUDASIM:
        print("numba was imported with NUMBA_ENABLE_CUDASIM=1: run this in a fresh process")
        return 1
    try:
        nvvm.NVVM()
    except Exception as e:  # noqa: BLE001 - numba-cuda's error names what it looked for
        print(
            f"the CUDA toolkit's NVVM was not found ({' '.join(str(e).split())}); "
            'pip install "fastattn[cuda]" installs it (numba-cuda[cu12])'
        )
        return MISSING

    _compile_device_functions_for(cc)
    failures = 0
    for name, kernel, sig, acc in cuda_kernel.signatures():
        t0 = time.perf_counter()
        try:
            ptx, _ = cuda.compile_ptx(kernel.py_func, sig, cc=cc)
        except Exception as e:  # noqa: BLE001 - reported, and the check fails
            failures += 1
            print(f"FAIL  {name}: {type(e).__name__}: {e}")
            continue
        took = time.perf_counter() - t0
        if args.dump:
            args.dump.mkdir(parents=True, exist_ok=True)
            (args.dump / (re.sub(r"\W+", "_", name) + ".ptx")).write_text(ptx)
        f64 = [line.strip() for line in ptx.splitlines() if F64.search(line)]
        if str(acc) == "float32" and f64:
            failures += 1
            print(f"FAIL  {name}: {len(f64)} float64 lines in a float32 kernel, e.g.")
            for line in f64[:8]:
                print(f"        {line}")
            continue
        if re.search(r"^\s*call", ptx, re.MULTILINE):
            failures += 1
            print(f"FAIL  {name}: a device function was not inlined (a call in the PTX)")
            continue
        print(
            f"ok    {name}: {len(ptx.splitlines())} PTX lines, {len(f64)} with .f64, "
            f"compiled in {took:.1f} s for sm_{cc[0]}{cc[1]}"
        )
    if failures:
        print(f"{failures} signature(s) failed")
    return 1 if failures else 0


def _compile_device_functions_for(cc: tuple[int, int]) -> None:
    """The kernel's steps are device functions, which numba-cuda compiles for the current
    device's compute capability (``compile_device`` asks the driver for it), where the kernel
    itself takes ``cc`` from ``compile_ptx``: without a GPU there is no current device. Here,
    a stand-in that answers ``cc``, so the whole kernel compiles for that capability."""
    import types

    import numba.cuda.dispatcher as dispatcher

    dispatcher.get_current_device = lambda: types.SimpleNamespace(compute_capability=cc)


if __name__ == "__main__":
    sys.exit(main())
