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
# SciPy do): `import fastattn` never imports dask, torch or transformers. Each with the packages
# it needs.
_LAZY_SUBMODULES = {"dask": ("dask",), "torch": ("torch",),
                    "transformers": ("torch", "transformers")}


def _installed(package: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):
        return False


def __getattr__(name: str):
    if name in _LAZY_SUBMODULES:
        import importlib

        missing = [p for p in _LAZY_SUBMODULES[name] if not _installed(p)]
        if missing:
            raise ImportError(f"fastattn.{name} needs {' and '.join(missing)}, which is not "
                              f"installed: pip install {' '.join(missing)}")
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    # Only the submodules that can be imported here: help(fastattn) and other tools that look
    # up every name dir() lists must work without the optional dependencies.
    usable = {name for name, needs in _LAZY_SUBMODULES.items() if all(map(_installed, needs))}
    return sorted(set(globals()) | usable)


__all__ = [
    "attention", "attention_backward", "attention_with_kvcache", "attention_varlen",
    "attention_varlen_backward", "reference", "active_isa", "available_isas", "set_isa",
    "__version__",
    "self_attention", "multi_head_attention", "MultiHeadAttention", "positional_encoding",
    "plot_attention", "merge_attention",
]
