"""The cases of the forward table (shapes, options, speed targets) and their inputs."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Largest allowed max-abs error, against the float64 reference and between implementations.
TOLERANCE = {"float32": 1e-4, "float64": 1e-10,
             # 16-bit outputs: a few ulps at outputs of magnitude < 1 (bfloat16's ulp is 2^-8)
             "bfloat16": 3e-2, "float16": 3e-3}


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
