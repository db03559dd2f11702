"""What the numbers depend on: the CPU, its cores, the kernel's instruction set, the threads
and the versions of fastattn, NumPy and every peer."""

from __future__ import annotations

import os
import platform

import numpy as np

from .. import __version__, _core
from .cpuinfo import cpu_line
from .peers import ADAPTERS, peers


def machine_info(threads: int) -> dict:
    """What the numbers depend on: CPU, cores, kernel ISA, threads, versions."""
    info = {
        "cpu": cpu_line(),
        "cores": os.cpu_count(),
        "fastattn": __version__,
        "isa": _core.active_isa(),
        "bfloat16_tiles": _core.bfloat16_tiles(),
        "openmp": bool(_core.has_openmp()),
        "threads": threads,
        "python": platform.python_version(),
        "numpy": np.__version__,
    }
    for name in peers():
        adapter = ADAPTERS[name]
        info[name] = "absent" if adapter.missing() else adapter.version()
    return info


def machine_line(info: dict) -> str:
    return (f"machine: {info['cpu']}, {info['cores']} cores; fastattn {info['fastattn']} "
            f"ISA {info['isa']} (bfloat16 tiles: {info['bfloat16_tiles']}; "
            f"OpenMP {'yes' if info['openmp'] else 'no'}), "
            f"{info['threads']} threads; numpy {info['numpy']}"
            + "".join(f", {ADAPTERS[name].package} {info[name]}" for name in peers()))
