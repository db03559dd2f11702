# Type stubs for the compiled module fastattn._core (src/fastattn/_core.pyx); the docstrings are
# there. Array arguments are read through the buffer protocol; fastattn.backends.cpu passes
# ndarrays.
from typing import Any, Final

import numpy as np
import numpy.typing as npt

NO_BOUND: Final[int]  # a band side that bounds nothing
OUTPUT_NONFINITE: Final[int]  # attention()'s flag: an output is inf or NaN before normalization

_Array = npt.NDArray[Any]

class Problem:
    def __init__(
        self,
        *,
        q: _Array,
        k: _Array,
        v: _Array,
        out: _Array,
        mask: _Array | None = None,
        weights: _Array | None = None,
        lse: _Array | None = None,
        alibi: _Array | None = None,
        kv_lengths: _Array | None = None,
        sinks: _Array | None = None,
        diag_shift: _Array | None = None,
        block_table: _Array | None = None,
        page_size: int = 0,
        dout: _Array | None = None,
        dq: _Array | None = None,
        dk: _Array | None = None,
        dv: _Array | None = None,
        band_lo: int = ...,
        band_hi: int = ...,
        offset: int = 0,
        scale: float = 1.0,
        softcap: float = 0.0,
        kv_group: int = 1,
        num_threads: int = 0,
        num_splits: int = 0,
    ) -> None: ...

def attention(problem: Problem) -> int: ...
def attention_backward(problem: Problem) -> None: ...
def attention_plain(
    q: object, k: object, v: object, causal: object, scale: object, num_threads: object
) -> npt.NDArray[np.floating] | None: ...
def attention_plain_tensors(
    q: object, k: object, v: object, causal: object, scale: object, num_threads: object,
    f32: object, f64: object
) -> npt.NDArray[np.floating] | None: ...
def exp2(x: npt.ArrayLike) -> npt.NDArray[np.floating]: ...
def active_isa() -> str: ...
def bfloat16_tiles() -> str: ...
def amx_status() -> str: ...
def available_isas() -> list[str]: ...
def set_isa(name: str | None) -> None: ...
def has_openmp() -> bool: ...
def default_threads() -> int: ...
def available_cores() -> int: ...
