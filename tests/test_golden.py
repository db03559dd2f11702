"""Golden outputs: the kernels' results, bit for bit, as recorded in tests/golden_outputs.json.

A change that must not move any output (a refactor, a new option's plumbing) is proven by this
test: every case below runs forward and backward on every instruction set this CPU has, and the
SHA-256 of each result's bytes must equal the recorded one. Record again only for a change that
is meant to move results, and say why in its commit:

    python tests/test_golden.py --record   # with fastattn built from the tree being recorded

An instruction set the record has no entry for (recorded on a CPU without it) is skipped, saying
so. The cases use no NumPy floating-point arithmetic outside the kernels (whose rounding could
depend on NumPy's own CPU dispatch): inputs are drawn as float64 and cast, masks are exact.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest

import fastattn

RECORD = Path(__file__).with_name("golden_outputs.json")

# name: (batch, L, S, E, Ev, dtype, options). Row kernel (L <= 4) and tiles, both sides of the
# tile sizes, GQA, every option of the forward; 16-bit storage on the rows and the tiles (which
# pack or widen it).
CASES = {
    "plain": ((2, 3), 70, 150, 24, 20, "float32", {}),
    "decode": ((2, 4), 1, 300, 64, 64, "float32", {}),
    "decode-gqa": ((2, 8), 2, 260, 32, 32, "float32", {"kv_heads": 2}),
    "causal": ((1, 2), 130, 130, 16, 16, "float32", {"causal": True}),
    "window-br": ((2,), 40, 200, 8, 12, "float32",
                  {"window": (17, 5), "align": "bottom_right"}),
    "bool-mask": ((2, 2), 33, 90, 16, 8, "float32", {"mask": "bool"}),
    "add-mask": ((2, 2), 33, 90, 16, 8, "float32", {"mask": "additive"}),
    "alibi-softcap": ((1, 3), 50, 80, 16, 16, "float32",
                      {"alibi_slopes": [0.5, 0.25, 0.125], "softcap": 5.0, "causal": True}),
    "decode-alibi-softcap": ((1, 3), 3, 150, 16, 16, "float32",
                             {"alibi_slopes": [0.5, 0.25, 0.125], "softcap": 5.0,
                              "causal": True, "align": "bottom_right"}),
    "decode-masks-window": ((2, 2), 2, 90, 16, 8, "float32",
                            {"mask": "additive", "window": (40, 0), "align": "bottom_right"}),
    "decode-bool-mask": ((2, 2), 4, 90, 16, 8, "float32", {"mask": "bool"}),
    "kv-lengths-sinks": ((3,), 20, 64, 16, 16, "float32",
                         {"kv_lengths": [64, 10, 0], "sinks": [0.5, -1.0, 2.0]}),
    "weights-lse": ((1, 2), 70, 140, 16, 16, "float32",
                    {"return_weights": True, "return_lse": True}),
    "float64": ((2, 2), 70, 150, 24, 20, "float64", {"causal": True}),
    "float64-decode": ((2, 2), 1, 150, 24, 20, "float64", {}),
    "bfloat16": ((2, 2), 70, 150, 32, 32, "bfloat16", {"causal": True}),
    "bfloat16-odd-E": ((1, 2), 70, 99, 33, 16, "bfloat16", {}),
    "bfloat16-decode": ((2, 4), 1, 300, 64, 64, "bfloat16", {}),
    "float16-decode": ((2, 4), 1, 300, 64, 64, "float16", {}),
    "float16": ((2, 2), 70, 150, 24, 20, "float16", {"causal": True}),
    "bfloat16-gqa": ((2, 4), 70, 130, 40, 24, "bfloat16", {"kv_heads": 2, "mask": "bool"}),
    "bfloat16-shared-kv": ((2, 3), 40, 97, 16, 8, "bfloat16", {"kv_heads": 1}),
}
THREADS = (1, 2)


def _dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        ml_dtypes = pytest.importorskip("ml_dtypes", reason="bfloat16 arrays need ml_dtypes")
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _inputs(name: str):
    batch, L, S, E, Ev, dtype, options = CASES[name]
    rng = np.random.default_rng(sum(map(ord, name)))
    options = dict(options)
    kv_batch = batch[:-1] + (options.pop("kv_heads", batch[-1]),)
    if kv_batch != batch:
        options["enable_gqa"] = True
    dt = _dtype(dtype)
    q = rng.standard_normal(batch + (L, E)).astype(dt)
    k = rng.standard_normal(kv_batch + (S, E)).astype(dt)
    v = rng.standard_normal(kv_batch + (S, Ev)).astype(dt)
    dout = rng.standard_normal(batch + (L, Ev)).astype(dt)
    mask = options.pop("mask", None)
    if mask == "bool":
        options["mask"] = rng.random((L, S)) < 0.7
    elif mask == "additive":  # multiples of 1/4: exact in every dtype
        options["mask"] = (rng.integers(-8, 8, (L, S)) / 4).astype(np.float64 if dtype ==
                                                                  "float64" else np.float32)
    for key in ("alibi_slopes", "sinks"):
        if key in options:
            options[key] = np.asarray(options[key], np.float64 if dtype == "float64"
                                      else np.float32)
    if "kv_lengths" in options:
        options["kv_lengths"] = np.asarray(options["kv_lengths"], np.int64)
    return q, k, v, dout, options


def _digest(arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(str((a.dtype.str, a.shape)).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _results(name: str, isa: str, threads: int) -> dict[str, str]:
    """{"forward": digest, "backward": digest} of one case on one instruction set."""
    q, k, v, dout, options = _inputs(name)
    fastattn.set_isa(isa)
    try:
        forward = fastattn.attention(q, k, v, num_threads=threads, return_lse=True,
                                     **{k_: o for k_, o in options.items()
                                        if k_ != "return_lse"})
        forward = forward if isinstance(forward, tuple) else (forward,)
        out, lse = forward[0], forward[-1]
        grads = fastattn.attention_backward(
            q, k, v, out, lse, dout, num_threads=threads,
            **{k_: o for k_, o in options.items() if k_ not in ("return_weights", "return_lse")})
    finally:
        fastattn.set_isa("")
    return {"forward": _digest(forward), "backward": _digest(grads)}


def _recorded() -> dict:
    return json.loads(RECORD.read_text()) if RECORD.exists() else {}


@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("isa", fastattn.available_isas())
@pytest.mark.parametrize("name", list(CASES))
def test_outputs_bitwise_as_recorded(name, isa, threads):
    recorded = _recorded().get(isa)
    if recorded is None:
        pytest.skip(f"no golden record for the {isa} path (recorded on a CPU without it)")
    got = _results(name, isa, threads)
    want = recorded[f"{name}/{threads}"]
    assert got == want, f"{name} on {isa}, {threads} threads: outputs moved"


def record() -> None:
    data = _recorded()
    for isa in fastattn.available_isas():
        data[isa] = {f"{name}/{t}": _results(name, isa, t) for name in CASES for t in THREADS}
    RECORD.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    print(f"recorded {len(CASES) * len(THREADS)} cases on {', '.join(fastattn.available_isas())}")


if __name__ == "__main__":
    if sys.argv[1:] != ["--record"]:
        sys.exit("usage: python tests/test_golden.py --record")
    record()
