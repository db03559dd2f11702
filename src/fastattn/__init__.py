"""fastattn: fast fused scaled dot-product attention for NumPy arrays.

>>> import numpy as np, fastattn
>>> q = k = v = np.ones((1, 4, 8), dtype=np.float32)
>>> fastattn.attention(q, k, v).shape
(1, 4, 8)
"""

from . import reference
from ._api import attention, attention_backward
from ._core import active_isa, available_isas, set_isa
from ._kvcache import attention_with_kvcache
from ._merge import merge_attention
from ._varlen import attention_varlen, attention_varlen_backward
from .nn import (
    MultiHeadAttention,
    multi_head_attention,
    plot_attention,
    positional_encoding,
    self_attention,
)

__version__ = "0.1.0"

# Submodules with heavy optional dependencies, imported on first attribute access (as NumPy and
# SciPy do): `import fastattn` never imports dask, torch or transformers.
_LAZY_SUBMODULES = frozenset(("dask", "torch", "transformers"))


def __getattr__(name: str):
    if name in _LAZY_SUBMODULES:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _LAZY_SUBMODULES)


__all__ = [
    "attention", "attention_backward", "attention_with_kvcache", "attention_varlen",
    "attention_varlen_backward", "reference", "active_isa", "available_isas", "set_isa",
    "__version__",
    "self_attention", "multi_head_attention", "MultiHeadAttention", "positional_encoding",
    "plot_attention", "merge_attention",
]
