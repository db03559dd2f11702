"""``python -m fastattn``: the build's configuration, a check against the reference, a short
benchmark.

``python -m fastattn bench [options]`` runs the full side-by-side benchmark (see ``--help``).
"""

from __future__ import annotations

import platform
import sys
from typing import Any

import numpy as np

from . import __version__, _core, attention, reference
from .bench.cpuinfo import cpu_line


def describe_build(file=sys.stdout) -> None:
    print(f"fastattn {__version__} on Python {platform.python_version()}, NumPy {np.__version__}",
          file=file)
    print(f"  CPU: {cpu_line()}", file=file)
    print(f"  kernel: {_core.active_isa()} (this CPU and build run: "
          f"{', '.join(_core.available_isas())}; FASTATTN_ISA forces one); bfloat16 tiles: "
          f"{_core.bfloat16_tiles()}", file=file)
    print(f"  AMX: {_core.amx_status()} (never chosen automatically: FASTATTN_ISA=amx)",
          file=file)
    print(f"  OpenMP: {'yes' if _core.has_openmp() else 'no'}, "
          f"threads by default: {_core.default_threads()}", file=file)


def check_against_reference(file=sys.stdout) -> bool:
    """Runs a few calls on every kernel path and compares them with the reference."""
    rng = np.random.default_rng(0)
    cases: list[tuple[tuple[int, ...], dict[str, Any]]] = [  # (B, H, L, S, E, Ev), kwargs
        ((2, 4, 77, 130, 40, 24), {}),
        ((1, 2, 64, 64, 64, 64), dict(causal=True)),
        ((3, 1, 33, 200, 16, 16), dict(mask="padding")),
    ]
    try:  # bfloat16 (ml_dtypes, a test extra): the tiles of the avx512bf16 and amx paths
        import ml_dtypes

        bf16: Any = ml_dtypes.bfloat16
    except ImportError:
        bf16 = None
    ok = True
    for isa in _core.available_isas():
        _core.set_isa(isa)
        try:
            worst = {np.float32: 0.0, np.float64: 0.0}
            if bf16 is not None:
                worst[bf16] = 0.0
            for shape, case_kwargs in cases:
                B, H, L, S, E, Ev = shape
                kwargs = dict(case_kwargs)
                if kwargs.get("mask") == "padding":
                    lengths = rng.integers(1, S + 1, size=B)
                    kwargs["mask"] = (np.arange(S) < lengths[:, None])[:, None, None, :]
                for dtype in worst:
                    q = rng.standard_normal((B, H, L, E)).astype(dtype)
                    k = rng.standard_normal((B, H, S, E)).astype(dtype)
                    v = rng.standard_normal((B, H, S, Ev)).astype(dtype)
                    want = reference.attention(q.astype(np.float64), k, v, **kwargs)
                    err = float(np.abs(attention(q, k, v, **kwargs) - want).max())
                    worst[dtype] = max(worst[dtype], err)
        finally:
            _core.set_isa("")
        # float32 sums of ~200 products of unit normals: a few 1e-7; float64 a few 1e-16;
        # bfloat16 outputs (< 1 here) a few of its ulps, 2^-8.
        passed = worst[np.float32] < 1e-5 and worst[np.float64] < 1e-12
        half = ""
        if bf16 is not None:
            passed &= worst[bf16] < 3e-2
            half = f", bfloat16 {worst[bf16]:.1e}"
        ok &= passed
        print(f"  check vs reference [{isa:>10}]: max error float32 {worst[np.float32]:.1e}, "
              f"float64 {worst[np.float64]:.1e}{half}  {'ok' if passed else 'FAILED'}",
              file=file)
    return ok


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "bench":
        from .bench import cli

        return cli.main(argv[1:]) or 0
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0
    if argv:
        print(f"unknown command {argv[0]!r}; try 'python -m fastattn --help'", file=sys.stderr)
        return 2
    describe_build()
    ok = check_against_reference()
    print()
    from .bench.forward import short_table

    short_table()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
