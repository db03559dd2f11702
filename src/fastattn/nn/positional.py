"""The sinusoidal positional encoding of "Attention Is All You Need" (Vaswani et al., 2017)."""

from __future__ import annotations

import math
import numbers

import numpy as np


def positional_encoding(length, dim, base=10000.0, dtype=np.float64):
    """The sinusoidal position table: ``PE[pos, 2i] = sin(pos / base**(2i/dim))``,
    ``PE[pos, 2i+1] = cos(pos / base**(2i/dim))``.

    Attention by itself ignores word order ("Aditya eats pizza" and "Pizza eats Aditya" give the
    same set of outputs, seed 002); adding row ``pos`` of this table to the embedding of the token
    at position ``pos`` tells the model where each token stands. Column pair ``(2i, 2i+1)`` is a
    sine and a cosine of the same frequency, the wavelengths growing geometrically from ``2 pi``
    to ``2 pi * base``, so that a fixed offset between positions is a rotation of each pair.

    Parameters
    ----------
    length : int
        Number of positions (rows), ``>= 0``.
    dim : int
        Features per position (columns), ``>= 1``. An odd ``dim`` ends with a sine column.
    base : float, default 10000.0
        Sets the longest wavelength; must be positive and finite.
    dtype : dtype, default np.float64
        Float dtype of the table. The values are computed in float64 and rounded once.

    Returns
    -------
    table : ndarray, shape (length, dim)

    Raises
    ------
    ValueError
        A negative ``length``, ``dim < 1``, or ``base`` not positive and finite.
    TypeError
        A ``length`` or ``dim`` that is not an integer, a ``base`` that is not a real number, or a
        ``dtype`` that is not a float dtype.

    Examples
    --------
    >>> import numpy as np
    >>> import fastattn
    >>> pe = fastattn.positional_encoding(3, 4)
    >>> pe.round(4)
    array([[ 0.    ,  1.    ,  0.    ,  1.    ],
           [ 0.8415,  0.5403,  0.01  ,  1.    ],
           [ 0.9093, -0.4161,  0.02  ,  0.9998]])
    >>> embeddings = np.zeros((3, 4))
    >>> encoded = embeddings + pe  # what a Transformer feeds its first attention layer
    """
    for name, n, low in (("length", length, 0), ("dim", dim, 1)):
        if isinstance(n, bool) or not isinstance(n, numbers.Integral):
            raise TypeError(f"{name} must be an int, got {n!r}")
        if n < low:
            raise ValueError(f"{name} must be >= {low}, got {n}")
    if isinstance(base, bool) or not isinstance(base, numbers.Real):
        raise TypeError(f"base must be a real number, got {base!r}")
    base = float(base)
    if not (math.isfinite(base) and base > 0):
        raise ValueError(f"base must be positive and finite, got {base}")
    dtype = np.dtype(dtype)
    if dtype.kind != "f" and not (dtype.kind == "V" and dtype.name == "bfloat16"):
        raise TypeError(f"dtype must be a float dtype, got {dtype}")

    pos = np.arange(length, dtype=np.float64)[:, None]
    even = np.arange(0, dim, 2, dtype=np.float64)  # the 2i of each column pair
    angle = pos / np.power(base, even / dim)  # (length, ceil(dim / 2))
    table = np.empty((length, dim), dtype=np.float64)
    table[:, 0::2] = np.sin(angle)
    table[:, 1::2] = np.cos(angle[:, : dim // 2])  # odd dim: the last sine has no cosine
    return table.astype(dtype, copy=False)
