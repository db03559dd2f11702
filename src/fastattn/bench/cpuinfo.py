"""What CPU this is, in the words a benchmark table needs: model, micro-architecture hints and
the instruction-set flags the kernels care about (Linux /proc/cpuinfo; platform's guess
elsewhere)."""

from __future__ import annotations

import platform
from functools import cache
from typing import Any

#: The flags that decide the kernel's paths and its peers' (PyTorch's bfloat16 runs on AMX).
FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16")


@cache
def cpu_info() -> dict[str, Any]:
    """{"model", "vendor", "family", "model_number", "flags"} of the first CPU."""
    info: dict[str, Any] = {"model": platform.processor() or platform.machine(), "vendor": "",
                            "family": None, "model_number": None, "flags": ()}
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read().split("\n\n", 1)[0]
    except OSError:
        return info
    fields = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    info["model"] = fields.get("model name", info["model"])
    info["vendor"] = fields.get("vendor_id", "")
    for key, name in (("cpu family", "family"), ("model", "model_number")):
        if fields.get(key, "").isdigit():
            info[name] = int(fields[key])
    have = set(fields.get("flags", "").split())
    info["flags"] = tuple(f for f in FLAGS if f in have)
    return info


def cpu_line() -> str:
    """e.g. "AMD EPYC (AuthenticAMD family 26 model 2; avx2 fma avx512f avx512_bf16)"."""
    c = cpu_info()
    ident = c["vendor"]
    if c["family"] is not None:
        ident += f" family {c['family']} model {c['model_number']}"
    flags = " ".join(c["flags"]) or "none of " + " ".join(FLAGS)
    return f"{c['model']} ({ident.strip()}; {flags})"
