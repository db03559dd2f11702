# Type stubs for the compiled module fastattn._core (src/fastattn/_core.pyx); the docstrings are
# there. Array arguments are read through the buffer protocol; fastattn.backends.cpu passes
# ndarrays.
from typing import Final

import numpy as np
import numpy.typing as npt

NO_BOUND: Final[int]  # a band side that bounds nothing
RAN: Final[int]  # attention() ran the kernel
WIDEN: Final[int]  # it ran nothing: widen q, k, v to the compute dtype and call again
PAIRS: Final[int]  # it ran nothing: pack bfloat16 in key pairs and call again
AMX: Final[int]  # it ran nothing: pack bfloat16 for AMX tiles and call again
NONFINITE: Final[int]  # it ran, and an output is inf or NaN before normalization

def attention(
    double: bool,
    storage: int,
    batch_shape: tuple[int, ...],
    L: int,
    S: int,
    E: int,
    Ev: int,
    q: npt.NDArray[np.generic],
    k: npt.NDArray[np.generic],
    v: npt.NDArray[np.generic],
    mask_kind: int,
    mask: npt.NDArray[np.generic] | None,
    band_lo: int,
    band_hi: int,
    offset: int,
    scale: float,
    softcap: float,
    alibi: npt.NDArray[np.floating] | None,
    kv_lengths: npt.NDArray[np.int64] | None,
    kv_group: int,
    out: npt.NDArray[np.floating],
    weights: npt.NDArray[np.floating] | None,
    lse: npt.NDArray[np.floating] | None,
    num_threads: int,
    sinks: npt.NDArray[np.floating] | None = None,
) -> int: ...
def attention_backward(
    double: bool,
    storage: int,
    batch_shape: tuple[int, ...],
    L: int,
    S: int,
    E: int,
    Ev: int,
    q: npt.NDArray[np.floating],
    k: npt.NDArray[np.floating],
    v: npt.NDArray[np.floating],
    mask_kind: int,
    mask: npt.NDArray[np.generic] | None,
    band_lo: int,
    band_hi: int,
    offset: int,
    scale: float,
    softcap: float,
    alibi: npt.NDArray[np.floating] | None,
    kv_lengths: npt.NDArray[np.int64] | None,
    kv_group: int,
    out: npt.NDArray[np.floating],
    lse: npt.NDArray[np.floating],
    num_threads: int,
    dout: npt.NDArray[np.floating],
    dq: npt.NDArray[np.floating],
    dk: npt.NDArray[np.floating],
    dv: npt.NDArray[np.floating],
    grads_bf16: bool = False,
) -> int: ...
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
