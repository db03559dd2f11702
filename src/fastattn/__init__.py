"""fastattn: fast fused scaled dot-product attention for NumPy arrays.

>>> import numpy as np, fastattn
>>> q = k = v = np.ones((1, 4, 8), dtype=np.float32)
>>> fastattn.attention(q, k, v).shape
(1, 4, 8)
"""

from . import reference
from ._api import attention
from ._core import active_isa, available_isas, set_isa

__version__ = "0.1.0"

__all__ = ["attention", "reference", "active_isa", "available_isas", "set_isa", "__version__"]
