"""fastattn: fast fused scaled dot-product attention for NumPy arrays.

>>> import numpy as np, fastattn
>>> q = k = v = np.ones((1, 4, 8), dtype=np.float32)
>>> fastattn.attention(q, k, v).shape
(1, 4, 8)
"""

import os

# libgomp's threads spin ~300,000 iterations at every barrier before they sleep. On a machine
# whose cores are shared with other work, a spinning thread takes the core its sibling needs:
# (1, 8, 512, 512, 64) measured 13.5 ms on 2 threads against 5.5 ms on 1 while another build
# ran; with 10,000 spins, 5.9 ms. Read by libgomp when the extension loads it, so set before
# importing _core, and only when the user has chosen no wait policy of their own.
if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
    os.environ["GOMP_SPINCOUNT"] = "10000"

from . import reference  # noqa: E402
from ._api import attention, attention_backward  # noqa: E402
from ._attention_layer import MultiHeadAttention  # noqa: E402
from ._core import active_isa, available_isas, set_isa  # noqa: E402
from ._layers import multi_head_attention, self_attention  # noqa: E402
from ._merge import merge_attention  # noqa: E402
from ._plot import plot_attention  # noqa: E402
from ._positional import positional_encoding  # noqa: E402

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
    "attention", "attention_backward", "reference", "active_isa", "available_isas", "set_isa",
    "__version__",
    "self_attention", "multi_head_attention", "MultiHeadAttention", "positional_encoding",
    "plot_attention", "merge_attention",
]
