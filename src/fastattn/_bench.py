"""``python -m fastattn bench``: fastattn side by side with PyTorch and ONNX Runtime.

Every case is timed in rounds. In each round fastattn and every peer that has the case run
back to back (the best of a few calls each, the order rotating from round to round), so a
noisy neighbour slows all of them alike; the round's ratio is the fastest peer's time over
fastattn's, and the case reports the median ratio. Ceilings (NumPy sgemm and dgemm, memory
read bandwidth) are measured in the same run, because absolute numbers drift on a shared
machine while ratios taken together do not.

Peers:

* ``torch``: ``torch.nn.functional.scaled_dot_product_attention`` on tensors made with
  ``torch.from_numpy`` before timing.
* ``ort``: ONNX Runtime's ``com.microsoft.MultiHeadAttention`` in a one-node model built in
  memory; inputs laid out as ``(B, L, H*E)`` before timing.

A peer whose package is missing shows as ``absent``; one that lacks a case shows ``-``.
The exit status is 1 when an output disagrees with the reference or with fastattn beyond
tolerance, 0 otherwise (a missed speed target is reported, never an error: the machine is
shared and noisy).
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import math
import os
import platform
import statistics
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, NamedTuple

import numpy as np

from . import __version__, _core, reference
from ._api import attention
from ._cpuinfo import cpu_line

DEFAULT_THREADS = 2
DEFAULT_ROUNDS = 5
QUICK_ROUNDS = 2
PLOT_LENGTHS = (256, 512, 1024, 2048, 4096)

#: float64 elements the reference may hold for one case (scores dominate): 128 MiB.
REFERENCE_BUDGET = 1 << 24
#: Largest allowed max-abs error, against the float64 reference and between implementations.
TOLERANCE = {"float32": 1e-4, "float64": 1e-10,
             # 16-bit outputs: a few ulps at outputs of magnitude < 1 (bfloat16's ulp is 2^-8)
             "bfloat16": 3e-2, "float16": 3e-3}
#: Each timed sample lasts at least this long (tiny calls are looped and averaged).
MIN_SAMPLE_S = 0.005
#: Fast calls take the best of more samples per round, up to this much time each round.
ROUND_BUDGET_S = 0.03
MAX_SAMPLES = 20


# --------------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One benchmark shape ``(B, H, L, S, E)`` with its options and its speed target."""

    name: str
    B: int
    H: int
    L: int
    S: int
    E: int
    Hkv: int | None = None  # key/value heads when they differ from H (grouped-query attention)
    dtype: str = "float32"
    causal: bool = False
    padding: bool = False  # a bool key-padding mask of shape (B, 1, 1, S)
    target: float | None = None  # minimum median ratio (fastest peer time / fastattn time)
    gemm_target: float | None = None  # minimum fraction of the measured GEMM ceiling
    unit: str = "ms"
    memory_bound: bool = False  # report the K/V read bandwidth (decode)
    bw_target: float | None = None  # minimum fraction of the memory-read ceiling (decode)
    note: str = ""

    @property
    def kv_heads(self) -> int:
        return self.Hkv or self.H

    @property
    def gqa(self) -> bool:
        return self.kv_heads != self.H

    @property
    def shape(self) -> str:
        heads = f"{self.H}/{self.kv_heads}" if self.gqa else str(self.H)
        return f"({self.B},{heads},{self.L},{self.S},{self.E})"

    @property
    def flops(self) -> float:
        """4·B·H·L·S·E: two products of 2·L·S·E each; half of it when causal."""
        n = 4.0 * self.B * self.H * self.L * self.S * self.E
        return n / 2 if self.causal else n

    @property
    def kv_bytes(self) -> int:
        """Bytes of K and V, each read once by a kernel that streams them (decode)."""
        return 2 * self.B * self.kv_heads * self.S * self.E * numpy_dtype(self.dtype).itemsize


def numpy_dtype(name: str) -> np.dtype:
    """The NumPy dtype of a case ("bfloat16" is ml_dtypes')."""
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


CASES: tuple[Case, ...] = (
    Case("prefill-4k", 1, 8, 4096, 4096, 64, target=1.0, gemm_target=0.90),
    Case("prefill-2k-d128", 1, 16, 2048, 2048, 128, target=1.0, gemm_target=0.90),
    Case("batch-1k", 4, 8, 1024, 1024, 64, target=1.0, gemm_target=0.90),
    Case("causal-4k", 1, 8, 4096, 4096, 64, causal=True, target=1.2),
    Case("small", 32, 8, 128, 128, 64, target=1.2),
    Case("mid", 1, 8, 512, 512, 64, target=1.2),
    # Decode reads K and V once: judged by the ratio and by its read rate against the memory
    # ceiling (torch.sum over 1 GiB where torch is installed, else NumPy's dot).
    Case("decode", 16, 32, 1, 8192, 128, target=1.2, memory_bound=True, bw_target=0.9),
    Case("padding-mask", 4, 8, 1024, 1024, 64, padding=True, target=1.1),
    Case("gqa", 4, 8, 1024, 1024, 64, Hkv=2, target=1.1),
    Case("float64", 4, 8, 1024, 1024, 64, dtype="float64", target=1.3),
    # 16-bit inputs against PyTorch in the same dtype (on Intel Xeons its bfloat16 runs on AMX).
    Case("bf16-prefill-4k", 1, 8, 4096, 4096, 64, dtype="bfloat16", target=1.3),
    Case("bf16-causal-4k", 1, 8, 4096, 4096, 64, dtype="bfloat16", causal=True, target=1.3),
    Case("bf16-batch-1k", 4, 8, 1024, 1024, 64, dtype="bfloat16", target=1.3),
    Case("fp16-decode", 16, 32, 1, 8192, 128, dtype="float16", target=1.5, memory_bound=True),
    Case("tiny", 1, 1, 1, 1, 8, unit="us", target=1.0, note="call overhead"),
    # Odd shapes must not fall off a cliff: no peer-relative target of their own beyond
    # staying within 20% of the fastest peer.
    Case("odd-E80", 1, 8, 1024, 1024, 80, target=1.0, note="no cliff"),
    Case("odd-E96", 1, 8, 1024, 1024, 96, target=1.0, note="no cliff"),
    Case("odd-E100", 1, 8, 1024, 1024, 100, target=1.0, note="no cliff"),
    Case("odd-L1000", 1, 8, 1000, 1000, 64, target=1.0, note="no cliff"),
)
CASES_BY_NAME = {c.name: c for c in CASES}
SHORT_CASES = ("small", "mid", "tiny")


@dataclass
class Inputs:
    """NumPy operands of a case, in fastattn's layout ``(B, H, L, E)``."""

    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    mask: np.ndarray | None = None  # bool (B, 1, 1, S), True = key takes part
    lengths: np.ndarray | None = None  # int32 (B,), valid keys per batch (the mask's run)


def make_inputs(case: Case, seed: int = 0) -> Inputs:
    """Unit-normal q, k, v for a case, plus the padding mask when the case has one."""
    rng = np.random.default_rng(seed)
    dt = numpy_dtype(case.dtype)
    draw_dt = np.float64 if case.dtype == "float64" else np.float32
    q, k, v = (rng.standard_normal(shape, dtype=draw_dt).astype(dt, copy=False) for shape in (
        (case.B, case.H, case.L, case.E), (case.B, case.kv_heads, case.S, case.E),
        (case.B, case.kv_heads, case.S, case.E)))
    mask = lengths = None
    if case.padding:
        lengths = rng.integers(case.S // 2, case.S + 1, size=case.B).astype(np.int32)
        mask = (np.arange(case.S) < lengths[:, None])[:, None, None, :]
    return Inputs(q, k, v, mask, lengths)


# --------------------------------------------------------------------------------------------
# Adapters: one per implementation. bench/test_bench.py reuses them.
# --------------------------------------------------------------------------------------------


class Runner(NamedTuple):
    """A prepared call (all conversions done) and how to turn its result into (B, H, L, Ev)."""

    call: Callable[[], Any]
    to_numpy: Callable[[Any], np.ndarray]


class Adapter:
    """How one implementation runs a case. Subclasses override :meth:`prepare`."""

    name = ""
    modules: tuple[str, ...] = ()  # the packages it needs, for "absent" and importorskip

    def missing(self) -> str | None:
        """None when usable, else why not (the ImportError's message)."""
        for module in self.modules:
            try:
                __import__(module)
            except (ImportError, OSError) as exc:  # OSError: a wheel whose libraries fail
                return str(exc)
        return None

    def version(self) -> str:
        return ""

    def supports(self, case: Case) -> bool:
        return True

    def prepare(self, inp: Inputs, case: Case, threads: int) -> Runner:
        raise NotImplementedError


class FastattnAdapter(Adapter):
    name = "fastattn"

    def version(self) -> str:
        return __version__

    def prepare(self, inp, case, threads):
        q, k, v, mask = inp.q, inp.k, inp.v, inp.mask

        def call():
            return attention(q, k, v, mask=mask, causal=case.causal, enable_gqa=case.gqa,
                             num_threads=threads)

        return Runner(call, np.asarray)


class ReferenceAdapter(Adapter):
    """fastattn's float64 NumPy oracle (builds the whole L x S score matrix)."""

    name = "reference"

    def prepare(self, inp, case, threads):
        q, k, v, mask = inp.q, inp.k, inp.v, inp.mask

        def call():
            return reference.attention(q, k, v, mask=mask, causal=case.causal,
                                       enable_gqa=case.gqa)

        return Runner(call, np.asarray)


class NumpyAdapter(Adapter):
    """The textbook formula in plain NumPy, in the inputs' dtype: what users write by hand."""

    name = "numpy"

    def prepare(self, inp, case, threads):
        q, k, v = inp.q, inp.k, inp.v
        if case.gqa:  # the usual hand-written GQA: repeat K and V (done before timing)
            k = np.repeat(k, case.H // case.kv_heads, axis=1)
            v = np.repeat(v, case.H // case.kv_heads, axis=1)
        keep = inp.mask
        if case.causal:
            keep = np.tril(np.ones((case.L, case.S), dtype=bool))
        scale = q.dtype.type(1.0 / math.sqrt(case.E))

        def call():
            scores = (q * scale) @ k.swapaxes(-1, -2)
            if keep is not None:
                scores = np.where(keep, scores, -np.inf)
            scores -= scores.max(axis=-1, keepdims=True)
            np.exp(scores, out=scores)
            scores /= scores.sum(axis=-1, keepdims=True)
            return scores @ v

        return Runner(call, np.asarray)


class TorchAdapter(Adapter):
    """PyTorch ``scaled_dot_product_attention`` on CPU tensors sharing the NumPy buffers."""

    name = "torch"
    modules = ("torch",)

    def version(self):
        import torch

        return torch.__version__

    def prepare(self, inp, case, threads):
        import torch
        from torch.nn.functional import scaled_dot_product_attention as sdpa

        torch.set_num_threads(threads)
        q, k, v = (self.tensor(a) for a in (inp.q, inp.k, inp.v))
        mask = None if inp.mask is None else torch.from_numpy(inp.mask)
        kwargs = {"enable_gqa": True} if case.gqa else {}

        def call():  # no autograd: tensors from NumPy never require grad
            return sdpa(q, k, v, attn_mask=mask, is_causal=case.causal, **kwargs)

        # NumPy has no bfloat16: such outputs are compared in float32, the others as they are
        return Runner(call, lambda out: (out.float() if out.dtype == torch.bfloat16
                                         else out).numpy())

    @staticmethod
    def tensor(a: np.ndarray):
        """A tensor sharing the array's memory (bfloat16 through its bits)."""
        import torch

        if a.dtype.name == "bfloat16":
            return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(a)


class OrtAdapter(Adapter):
    """ONNX Runtime's ``com.microsoft.MultiHeadAttention`` (its CPU kernel is MLAS's).

    Semantics checked against fastattn: ``unidirectional=1`` equals a top-left causal mask
    only when L == S (with L != S it matches neither alignment, so such cases are declined);
    ``key_padding_mask`` of shape (B,) int32 is the number of valid keys per batch
    (mask type "1D key sequence length"); masked scores get ``mask_filter_value`` (-10000)
    added rather than -inf, so a batch with no valid key averages V instead of giving 0.
    Causal and padded calls leave MLAS's flash kernel for the path that builds the scores.

    Inputs are ``(B, L, H*E)``, except K and V of memory-bound cases (decode), which are fed as
    ``(B, H, S, E)``, the layout of a KV cache: ORT then reads the NumPy arrays in place, where
    the packed layout costs a 4 GB copy before timing and a 4 GB transpose inside every call
    (2.6x slower, and 13 GB resident instead of 4).
    """

    name = "ort"
    modules = ("onnxruntime", "onnx")  # onnx builds the model

    def version(self):
        import onnxruntime

        return onnxruntime.__version__

    def supports(self, case):
        return (case.dtype == "float32" and not case.gqa
                and (not case.causal or case.L == case.S))

    @staticmethod
    def kv_packed(case: Case) -> bool:
        """Whether K and V go in as (B, S, H*E) (else as (B, H, S, E))."""
        return not case.memory_bound

    @classmethod
    def session(cls, case: Case, threads: int):
        """An InferenceSession of a single MultiHeadAttention node, built in memory."""
        import onnxruntime as ort
        from onnx import TensorProto, helper

        packed = ["B", "len", case.H * case.E]
        kv_shape = packed if cls.kv_packed(case) else ["B", case.H, "S", case.E]
        inputs = [helper.make_tensor_value_info("query", TensorProto.FLOAT, packed)]
        inputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, kv_shape)
                   for n in ("key", "value")]
        names = ["query", "key", "value"]
        if case.padding:  # input 3 (bias) is skipped with an empty name
            names += ["", "key_padding_mask"]
            inputs.append(helper.make_tensor_value_info("key_padding_mask", TensorProto.INT32,
                                                        ["B"]))
        attrs = {"num_heads": case.H}
        if case.causal:
            attrs["unidirectional"] = 1
        node = helper.make_node("MultiHeadAttention", names, ["output"],
                                domain="com.microsoft", **attrs)
        output = helper.make_tensor_value_info("output", TensorProto.FLOAT, None)
        graph = helper.make_graph([node], "mha", inputs, [output])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                        helper.make_opsetid("com.microsoft", 1)])
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # ORT's idle workers otherwise spin for a while after each run, taking a core from
        # whichever implementation runs next (2x slower on 2 cores); ORT's own time is the same.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return ort.InferenceSession(model.SerializeToString(), options,
                                    providers=["CPUExecutionProvider"])

    def prepare(self, inp, case, threads):
        sess = self.session(case, threads)

        def packed(a):  # (B, H, L, E) -> (B, L, H*E)
            return np.ascontiguousarray(a.transpose(0, 2, 1, 3).reshape(case.B, a.shape[2], -1))

        kv = packed if self.kv_packed(case) else np.ascontiguousarray
        feeds = {"query": packed(inp.q), "key": kv(inp.k), "value": kv(inp.v)}
        if case.padding:
            feeds["key_padding_mask"] = inp.lengths.astype(np.int32)

        def call():
            return sess.run(None, feeds)[0]

        def to_numpy(out):
            return out.reshape(case.B, case.L, case.H, case.E).transpose(0, 2, 1, 3)

        return Runner(call, to_numpy)


ADAPTERS: dict[str, Adapter] = {a.name: a for a in (
    FastattnAdapter(), ReferenceAdapter(), NumpyAdapter(), TorchAdapter(), OrtAdapter())}
PEERS = ("torch", "ort")


# --------------------------------------------------------------------------------------------
# Machine and ceilings
# --------------------------------------------------------------------------------------------


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
    for name in PEERS:
        adapter = ADAPTERS[name]
        info[name] = "absent" if adapter.missing() else adapter.version()
    return info


def machine_line(info: dict) -> str:
    return (f"machine: {info['cpu']}, {info['cores']} cores; fastattn {info['fastattn']} "
            f"ISA {info['isa']} (bfloat16 tiles: {info['bfloat16_tiles']}; "
            f"OpenMP {'yes' if info['openmp'] else 'no'}), "
            f"{info['threads']} threads; numpy {info['numpy']}, torch {info['torch']}, "
            f"onnxruntime {info['ort']}")


def blas_threads(n: int):
    """A context limiting NumPy's BLAS to n threads (threadpoolctl when installed)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return nullcontext()
    return threadpool_limits(n, user_api="blas")


def best_of(fn: Callable[[], Any], calls: int, inner: int = 1) -> float:
    """Seconds per call: the best of `calls` samples, each the mean of `inner` calls."""
    best = math.inf
    for _ in range(calls):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        best = min(best, (time.perf_counter() - t0) / inner)
    return best


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


# --------------------------------------------------------------------------------------------
# Running a case
# --------------------------------------------------------------------------------------------


@dataclass
class Row:
    """The result of one case; `times` are medians over rounds of each round's best, seconds."""

    case: str
    shape: str
    dtype: str
    unit: str
    status: dict = field(default_factory=dict)  # impl -> "ok" | "absent" | "-" | "error: ..."
    times: dict = field(default_factory=dict)
    round_times: dict = field(default_factory=dict)
    ratio: float | None = None
    round_ratios: list = field(default_factory=list)
    fastest_peer: str | None = None
    target: float | None = None
    gemm_target: float | None = None
    bw_target: float | None = None
    passed: bool | None = None
    gflops: float | None = None
    gemm_fraction: float | None = None
    kv_gbs: float | None = None
    bw_fraction: float | None = None
    max_error: float | None = None  # fastattn vs the float64 reference
    reference_slice: str = ""
    peer_diff: dict = field(default_factory=dict)  # peer -> max |peer - fastattn|
    correct: bool = True
    note: str = ""


def reference_slice(case: Case, budget: int = REFERENCE_BUDGET) -> tuple[int, int]:
    """(batches, query heads) on which the float64 reference fits `budget` elements.

    Heads are kept in whole kv groups so that grouped-query slices stay consistent.
    """
    per_head = case.L * case.S + case.S * 2 * case.E + case.L * case.E
    fits = max(1, budget // per_head)
    if fits >= case.B * case.H:
        return case.B, case.H
    if fits >= case.H:
        return fits // case.H, case.H
    group = case.H // case.kv_heads
    return 1, max(group, fits // group * group)


def check_outputs(case: Case, inp: Inputs, outputs: dict, row: Row) -> None:
    """Fills the error columns: fastattn vs the reference (on a slice), peers vs fastattn."""
    tol = TOLERANCE[case.dtype]
    fa = outputs.get("fastattn")
    if fa is None:
        return
    nb, nh = reference_slice(case)
    nkv = nh * case.kv_heads // case.H
    mask = None if inp.mask is None else inp.mask[:nb]
    want = reference.attention(inp.q[:nb, :nh].astype(np.float64),
                               inp.k[:nb, :nkv].astype(np.float64),
                               inp.v[:nb, :nkv].astype(np.float64),
                               mask=mask, causal=case.causal, enable_gqa=case.gqa)
    row.max_error = float(np.abs(fa[:nb, :nh] - want).max())
    if (nb, nh) != (case.B, case.H):
        row.reference_slice = f"[:{nb}, :{nh}]"
    row.correct = row.max_error <= tol
    for name, out in outputs.items():
        if name != "fastattn":
            row.peer_diff[name] = float(np.abs(out - fa).max())
            row.correct &= row.peer_diff[name] <= tol


class Sampling(NamedTuple):
    """How one implementation is timed in a round: the best of `samples` means of `inner`."""

    samples: int
    inner: int


def calibrate(call: Callable[[], Any], calls: int) -> tuple[Any, Sampling]:
    """Runs a call twice (warm-up, then timed) -> (first result, its sampling).

    Calls shorter than MIN_SAMPLE_S are looped within a sample; fast ones take the best of
    more samples (a noisy neighbour's burst then misses some of them), within ROUND_BUDGET_S.
    """
    result = call()
    t = max(best_of(call, 1), 1e-9)
    inner = max(1, int(MIN_SAMPLE_S / t))
    samples = max(calls, min(MAX_SAMPLES, int(ROUND_BUDGET_S / (t * inner))))
    return result, Sampling(samples, inner)


def run_case(case: Case, rounds: int, calls: int, threads: int,
             ceilings: dict | None) -> Row:
    """Times fastattn and the peers on one case, interleaved round by round, and checks them."""
    row = Row(case.name, case.shape, case.dtype, case.unit, target=case.target,
              gemm_target=case.gemm_target, bw_target=case.bw_target, note=case.note)
    inp = make_inputs(case)
    runners, sampling, outputs = {}, {}, {}
    for name in ("fastattn",) + PEERS:
        adapter = ADAPTERS[name]
        if adapter.missing():
            row.status[name] = "absent"
        elif not adapter.supports(case):
            row.status[name] = "-"
        else:
            try:
                runner = adapter.prepare(inp, case, threads)
                result, sampling[name] = calibrate(runner.call, calls)
                out = np.array(runner.to_numpy(result), copy=True)
                outputs[name] = out.astype(np.float32) if out.dtype.itemsize == 2 else out
                runners[name] = runner
                row.status[name] = "ok"
            except Exception as exc:  # a peer that breaks on a case must not end the run
                row.status[name] = f"error: {type(exc).__name__}: {exc}"

    names = list(runners)
    row.round_times = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)] if names else []
        for name in order:
            row.round_times[name].append(best_of(runners[name].call, *sampling[name]))
    row.times = {name: statistics.median(t) for name, t in row.round_times.items()}
    # Checked after the timing: the reference's BLAS threads busy-wait a while after each
    # call, which would slow whichever implementation ran next.
    check_outputs(case, inp, outputs, row)
    summarize(case, row, ceilings)
    return row


def summarize(case: Case, row: Row, ceilings: dict | None) -> None:
    """Ratio, throughput and the pass/fail verdict from the measured times."""
    peers = [p for p in PEERS if p in row.round_times]
    fa = row.round_times.get("fastattn")
    if fa and peers:
        row.round_ratios = [min(row.round_times[p][r] for p in peers) / fa[r]
                            for r in range(len(fa))]
        row.ratio = statistics.median(row.round_ratios)
        row.fastest_peer = min(peers, key=lambda p: row.times[p])
    if fa:
        t = row.times["fastattn"]
        row.gflops = case.flops / t / 1e9
        if ceilings and not case.memory_bound:  # decode is judged by bandwidth instead
            peak = ceilings["dgemm_gflops" if case.dtype == "float64" else "sgemm_gflops"]
            row.gemm_fraction = row.gflops / peak
        if case.memory_bound:
            row.kv_gbs = case.kv_bytes / t / 1e9
            if ceilings:
                row.bw_fraction = row.kv_gbs / ceilings["read_gbs"]
    if case.target is not None and row.ratio is not None:
        row.passed = row.ratio >= case.target
        # Without the ceilings (skipped) only the ratio can be judged.
        if case.gemm_target is not None:
            row.passed &= row.gemm_fraction is None or row.gemm_fraction >= case.gemm_target
        if case.bw_target is not None:
            row.passed &= row.bw_fraction is None or row.bw_fraction >= case.bw_target


# --------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------

COLUMNS = ("case", "shape", "fastattn", "torch", "ort", "ratio", "target", "pass",
           "GFLOP/s", "%gemm", "K/V GB/s", "max err", "peer diff")


def fmt_time(row: Row, name: str) -> str:
    status = row.status.get(name, "-")
    if status != "ok":
        return "error" if status.startswith("error") else status
    t = row.times[name]
    return f"{t * 1e6:.1f} us" if row.unit == "us" else f"{t * 1e3:.1f} ms"


def fmt_cells(row: Row) -> list[str]:
    """One table line as strings, in COLUMNS order."""
    target = "-" if row.target is None else f">={row.target:g}"
    if row.gemm_target is not None:
        target += f", {row.gemm_target:.0%} gemm"
    if row.bw_target is not None:
        target += f", {row.bw_target:.0%} read"
    verdict = {True: "PASS", False: "FAIL", None: "-"}[row.passed]
    bw = "-"
    if row.kv_gbs is not None:
        bw = f"{row.kv_gbs:.1f}"
        if row.bw_fraction is not None:
            bw += f" ({row.bw_fraction:.0%})"
    err = "-" if row.max_error is None else f"{row.max_error:.1e}{row.reference_slice}"
    diff = ", ".join(f"{p} {d:.1e}" for p, d in row.peer_diff.items()) or "-"
    if not row.correct:
        diff += " WRONG"
    return [
        row.case, row.shape + ("" if row.dtype == "float32" else f" {row.dtype}"),
        fmt_time(row, "fastattn"), fmt_time(row, "torch"), fmt_time(row, "ort"),
        "-" if row.ratio is None else f"{row.ratio:.2f}",
        target, verdict,
        "-" if row.gflops is None else f"{row.gflops:.3g}",
        "-" if row.gemm_fraction is None else f"{row.gemm_fraction:.0%}",
        bw, err, diff,
    ]


def aligned(cells: list[list[str]]) -> str:
    """Rows of cells as left-aligned columns, a rule under the first (header) row."""
    widths = [max(len(line[i]) for line in cells) for i in range(len(cells[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_table(rows: list[Row], markdown: bool = False) -> str:
    """The rows as an aligned text table, or as a Markdown table."""
    cells = [list(COLUMNS)] + [fmt_cells(r) for r in rows]
    if markdown:
        lines = ["| " + " | ".join(c) + " |" for c in cells]
        lines.insert(1, "|" + "|".join("---" for _ in COLUMNS) + "|")
        return "\n".join(lines)
    return aligned(cells)


LEGEND = ("ratio: median over rounds of (fastest peer time / fastattn time); > 1 means fastattn "
          "is faster. GFLOP/s counts 4*B*H*L*S*E (half when causal); %gemm is against NumPy's "
          "sgemm (dgemm for float64). max err: fastattn vs the float64 reference (on [batches, "
          "heads] when sliced); peer diff: max |peer - fastattn|.")


# --------------------------------------------------------------------------------------------
# fastattn against itself: the speed its variants owe their arguments (no peer has them all)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SelfCase:
    """A fastattn call timed against a baseline fastattn call, interleaved; target is the
    minimum median ratio baseline time / variant time."""

    name: str
    shape: tuple  # (B, H, L, S, E)
    variant: str  # what is measured
    baseline: str  # what it is compared with
    target: float
    memory_bound: bool = False
    causal: bool = False  # both calls

    def calls(self, threads: int) -> tuple[Callable[[], Any], Callable[[], Any], int, int]:
        """(variant call, baseline call, bytes of K/V each reads) with inputs made up front.

        The variant is a window (name "window-...") or the float32 inputs in the 16-bit dtype
        named by `variant`."""
        B, H, L, S, E = self.shape
        rng = np.random.default_rng(0)
        q, k, v = (rng.standard_normal((B, H, n, E), dtype=np.float32) for n in (L, S, S))
        plain = (q, k, v)
        kw = dict(num_threads=threads, causal=self.causal)
        if self.name.startswith("window"):
            return (lambda: attention(*plain, window=(255, 0), **kw),
                    lambda: attention(*plain, **kw), 0, 0)
        lowp = tuple(a.astype(numpy_dtype(self.variant)) for a in plain)
        return (lambda: attention(*lowp, **kw), lambda: attention(*plain, **kw),
                k.nbytes, k.nbytes // 2)


SELF_CASES: tuple[SelfCase, ...] = (
    SelfCase("window-8k", (1, 8, 8192, 8192, 64), "window=(255, 0)", "full attention", 10.0),
    # Without AMX, bfloat16 owes 1.3x float32 (its pairs do twice the multiply-adds per
    # instruction); on Intel its tiles widen to float32 (csrc/cpu_features.cpp): no target.
    SelfCase("bfloat16-4k", (1, 8, 4096, 4096, 64), "bfloat16", "float32", 1.3),
    SelfCase("bfloat16-causal-4k", (1, 8, 4096, 4096, 64), "bfloat16", "float32", 1.3,
             causal=True),
    SelfCase("bfloat16-batch-1k", (4, 8, 1024, 1024, 64), "bfloat16", "float32", 1.3),
    SelfCase("float16-decode", (16, 32, 1, 8192, 128), "float16", "float32", 1.0,
             memory_bound=True),
)
SELF_CASES_BY_NAME = {c.name: c for c in SELF_CASES}


def run_self_case(case: SelfCase, rounds: int, calls: int, threads: int) -> dict:
    """Times a SelfCase; returns its row as a dict (times, ratio, pass, K/V GB/s)."""
    row: dict[str, Any] = dict(case=case.name, shape=str(case.shape), variant=case.variant,
                               baseline=case.baseline, target=case.target)
    try:
        variant, baseline, kv32, kv16 = case.calls(threads)
    except ImportError as exc:
        row["status"] = f"absent: {exc}"
        return row
    samplings = [calibrate(f, calls)[1] for f in (variant, baseline)]
    tv: list[float] = []
    tb: list[float] = []
    for r in range(rounds):
        pair = [(variant, samplings[0], tv), (baseline, samplings[1], tb)]
        for fn, sampling, out in (pair if r % 2 == 0 else pair[::-1]):
            out.append(best_of(fn, *sampling))
    ratios = [b / v for v, b in zip(tv, tb)]
    row.update(status="ok", variant_s=statistics.median(tv), baseline_s=statistics.median(tb),
               ratio=statistics.median(ratios))
    row["passed"] = row["ratio"] >= case.target
    if case.memory_bound:
        row["variant_kv_gbs"] = 2 * kv16 / row["variant_s"] / 1e9
        row["baseline_kv_gbs"] = 2 * kv32 / row["baseline_s"] / 1e9
    return row


def format_self_table(rows: list[dict]) -> str:
    head = ["case", "shape", "variant", "time", "baseline", "time", "ratio", "target", "pass",
            "K/V GB/s"]
    cells = [head]
    for r in rows:
        if r.get("status") != "ok":
            cells.append([r["case"], r["shape"], r["variant"], r.get("status", "-"),
                          r["baseline"], "-", "-", f">={r['target']:g}", "-", "-"])
            continue
        bw = "-"
        if "variant_kv_gbs" in r:
            bw = f"{r['variant_kv_gbs']:.1f} vs {r['baseline_kv_gbs']:.1f}"
        cells.append([r["case"], r["shape"], r["variant"], f"{r['variant_s'] * 1e3:.1f} ms",
                      r["baseline"], f"{r['baseline_s'] * 1e3:.1f} ms", f"{r['ratio']:.2f}",
                      f">={r['target']:g}", "PASS" if r["passed"] else "FAIL", bw])
    return aligned(cells)


def resolve_cases(cases) -> list[Case]:
    """Case objects from names (or Case objects); None means all."""
    if cases is None:
        return list(CASES)
    out = []
    for c in cases:
        if isinstance(c, Case):
            out.append(c)
        elif c in CASES_BY_NAME:
            out.append(CASES_BY_NAME[c])
        else:
            raise ValueError(f"unknown case {c!r}; cases: {', '.join(CASES_BY_NAME)}")
    return out


@dataclass
class Report:
    """Everything one run measured: the machine, the ceilings (or None) and the rows."""

    machine: dict
    ceilings: dict | None
    rounds: int
    calls: int
    rows: list[Row]
    self_rows: list = field(default_factory=list)

    def to_json(self) -> dict:
        return dict(asdict(self), tolerance=TOLERANCE)


def benchmark(cases=None, rounds: int | None = None, quick: bool = False, file=sys.stdout,
              threads: int = DEFAULT_THREADS, markdown: bool = False, ceilings: bool = True,
              calls: int | None = None) -> Report:
    """Runs the cases, prints the machine line, the ceilings and the table.

    `cases`: names or :class:`Case` objects (None: all). `rounds` defaults to 5 (2 with
    `quick`); `calls` (best of, per round) to 3 (2 with `quick`). `ceilings=False` skips the
    ceiling measurements (a few seconds and a 1 GiB array) and their columns.
    """
    names = None if cases is None else [c if isinstance(c, str) else c.name for c in cases]
    self_selected = [c for c in SELF_CASES if names is None or c.name in names]
    if names is not None:
        cases = [c for c in cases if (c if isinstance(c, str) else c.name) not in
                 SELF_CASES_BY_NAME]
    selected = resolve_cases(cases) if cases is None or cases else []
    rounds = rounds or (QUICK_ROUNDS if quick else DEFAULT_ROUNDS)
    calls = calls or (2 if quick else 3)
    info = machine_info(threads)
    print(machine_line(info), file=file, flush=True)
    for name in PEERS:
        why = ADAPTERS[name].missing()
        if why:
            print(f"  {name} is absent: {why}", file=file)
    ceil = measure_ceilings(threads) if ceilings else None
    if ceil:
        print(ceilings_line(ceil), file=file, flush=True)
    rows = []
    with blas_threads(threads):  # the reference's and the NumPy peer's matmuls
        for case in selected:
            rows.append(run_case(case, rounds, calls, threads, ceil))
            gc.collect()  # the big cases hold a few GB between them otherwise
    if rows:
        print(format_table(rows, markdown), file=file)
        print(textwrap.fill(LEGEND, 100), file=file, flush=True)
    self_rows = []
    if self_selected:
        with blas_threads(threads):
            for sc in self_selected:
                self_rows.append(run_self_case(sc, rounds, calls, threads))
                gc.collect()
        print("\nfastattn against itself (ratio: median of baseline time / variant time):",
              file=file)
        print(format_self_table(self_rows), file=file, flush=True)
    return Report(info, ceil, rounds, calls, rows, self_rows)


def run_table(cases=None, rounds: int | None = None, quick: bool = False, file=sys.stdout,
              **options) -> list[Row]:
    """:func:`benchmark` (same arguments), returning only the table's rows."""
    return benchmark(cases, rounds, quick, file, **options).rows


def short_table(file=sys.stdout, threads: int = DEFAULT_THREADS) -> list[Row]:
    """A few small cases in a few seconds, for ``python -m fastattn``; no ceilings."""
    return run_table(SHORT_CASES, rounds=3, quick=True, file=file, threads=threads,
                     ceilings=False)


# --------------------------------------------------------------------------------------------
# The plot
# --------------------------------------------------------------------------------------------


def sweep(lengths=PLOT_LENGTHS, rounds: int = 3, calls: int = 2,
          threads: int = DEFAULT_THREADS) -> dict[str, list[float]]:
    """Seconds per call of (1, 8, L, L, 64) for each L, per implementation present."""
    names = ["fastattn"] + [p for p in PEERS if not ADAPTERS[p].missing()]
    times: dict[str, list[float]] = {n: [] for n in names}
    for n in lengths:
        case = Case(f"L{n}", 1, 8, n, n, 64)
        row = run_case(case, rounds, calls, threads, None)
        for name in names:
            times[name].append(row.times.get(name, math.nan))
    return times


def plot(path: str, lengths=PLOT_LENGTHS, threads: int = DEFAULT_THREADS,
         rounds: int = 3) -> None:
    """Log-log plot of time against L = S for (1, 8, L, L, 64), saved to `path`."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    times = sweep(lengths, rounds=rounds, threads=threads)
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for name, ts in times.items():
        ax.loglog(lengths, [t * 1e3 for t in ts], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [str(n) for n in lengths])
    ax.set_xlabel("sequence length L = S")
    ax.set_ylabel("time per call (ms)")
    ax.set_title(f"attention (1, 8, L, L, 64) float32, {threads} threads")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m fastattn bench",
        description="Benchmark fastattn against PyTorch SDPA and ONNX Runtime "
                    "MultiHeadAttention, interleaved round by round.")
    p.add_argument("--quick", action="store_true", help="fewer rounds and calls")
    p.add_argument("--cases", help="comma-separated case names; all by default: "
                   + ", ".join(list(CASES_BY_NAME) + list(SELF_CASES_BY_NAME)))
    p.add_argument("--rounds", type=int, help=f"rounds per case (default {DEFAULT_ROUNDS}, "
                   f"{QUICK_ROUNDS} with --quick)")
    p.add_argument("--threads", type=int, default=DEFAULT_THREADS,
                   help=f"threads for every implementation (default {DEFAULT_THREADS})")
    p.add_argument("--json", metavar="FILE", help="write the results as JSON")
    p.add_argument("--plot", metavar="FILE.png",
                   help="also plot time against L=S (256..4096) for (1,8,L,L,64), log-log")
    p.add_argument("--markdown", action="store_true", help="print the table in Markdown")
    p.add_argument("--backward", action="store_true",
                   help="instead: the training table, forward + backward against PyTorch's "
                        "SDPA + autograd.grad, and our backward against our forward")
    p.add_argument("--e2e", action="store_true",
                   help="instead, a whole Llama-shaped model (random weights, 4096-token "
                        "prompt, 64 decoded tokens), fastattn against transformers' sdpa, "
                        "float32 and bfloat16; needs fastattn[transformers]")
    args = p.parse_args(argv)
    if args.rounds is not None and args.rounds < 1:
        p.error("--rounds must be at least 1")
    if args.threads < 1:
        p.error("--threads must be at least 1")
    if args.cases is not None:
        args.cases = [c.strip() for c in args.cases.split(",") if c.strip()]
        known = list(CASES_BY_NAME) + list(SELF_CASES_BY_NAME)
        unknown = [c for c in args.cases if c not in known]
        if unknown:
            p.error(f"unknown case(s) {', '.join(unknown)}; cases: {', '.join(known)}")
    return args


def write_json(path: str, report: Report) -> None:
    with open(path, "w") as f:
        json.dump(report.to_json(), f, indent=1)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m fastattn bench``; returns the exit status."""
    args = parse_args(sys.argv[1:] if argv is None else list(argv))
    if args.e2e:
        from . import _bench_e2e

        _bench_e2e.run(threads=args.threads, rounds=args.rounds or (1 if args.quick else 2))
        return 0
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:  # checked first, so a long run does not end in this error
            print("error: --plot needs matplotlib, which is not installed "
                  "(pip install matplotlib, or pip install 'fastattn[bench]')", file=sys.stderr)
            return 2
    if args.backward:
        from ._bench_backward import train_table

        rows = train_table(args.rounds or (QUICK_ROUNDS if args.quick else DEFAULT_ROUNDS),
                           2 if args.quick else 3, args.threads)
        return 0 if all(r.get("correct", True) for r in rows) else 1
    report = benchmark(args.cases, rounds=args.rounds, quick=args.quick, threads=args.threads,
                       markdown=args.markdown)
    if args.json:
        write_json(args.json, report)
        print(f"results written to {args.json}")
    if args.plot:
        plot(args.plot, threads=args.threads, rounds=QUICK_ROUNDS if args.quick else 3)
        print(f"plot written to {args.plot}")
    return 0 if all(r.correct for r in report.rows) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
