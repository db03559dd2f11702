"""``plot_attention``: attention weights as a labelled heat map (matplotlib, an optional extra).

matplotlib is imported when a plot is drawn, never when fastattn is imported.
"""

from __future__ import annotations

import numpy as np

# Values are written into the cells up to this many rows and columns; beyond it they would not
# be legible at a normal figure size.
_ANNOTATE_UP_TO = 12


def _matplotlib():
    try:
        import matplotlib  # noqa: F401
    except ImportError as err:
        raise ImportError(
            "fastattn.plot_attention needs matplotlib, an optional dependency; install it with "
            "pip install 'fastattn[plot]' (or pip install matplotlib)"
        ) from err


def _labels(name: str, tokens, count: int, axis: str, shape) -> list[str]:
    labels = [str(t) for t in tokens]
    if len(labels) != count:
        raise ValueError(
            f"{name} has {len(labels)} labels but weights of shape {tuple(shape)} have {count} "
            f"{axis}"
        )
    return labels


def plot_attention(weights, query_tokens, key_tokens=None, ax=None, *, title=None, annotate=None):
    """Draw attention weights as a heat map, a row per query token and a column per key token.

    Parameters
    ----------
    weights : array_like, shape (L, S)
        One head's weights, e.g. ``fastattn.attention(..., return_weights=True)[1][b, h]``.
    query_tokens : sequence of str, length L
        Labels of the rows (the tokens that attend).
    key_tokens : sequence of str, length S, optional
        Labels of the columns (the tokens attended to); defaults to ``query_tokens``, as in
        self-attention.
    ax : matplotlib.axes.Axes, optional
        Where to draw. By default a new figure is made with ``matplotlib.pyplot.subplots``.
    title : str, optional
        Title of the axes.
    annotate : bool, optional
        Write each weight (two decimals) in its cell. By default only when both sides have at most
        12 tokens.

    Returns
    -------
    ax : matplotlib.axes.Axes
        The axes drawn on; a colour bar is added beside it. Row ``i`` of the image is query ``i``.

    Raises
    ------
    ImportError
        matplotlib is not installed (``pip install 'fastattn[plot]'``).
    ValueError
        ``weights`` not 2-D, or a number of labels that does not match its shape.
    TypeError
        ``weights`` that are not real numbers.

    Examples
    --------
    >>> import numpy as np
    >>> import fastattn
    >>> from matplotlib.figure import Figure
    >>> tokens = ["Write", "a", "poem"]
    >>> x = np.array([[1.16, 0.23], [0.57, 1.36], [4.41, -2.16]])
    >>> _, weights = fastattn.attention(x, x, x, return_weights=True)
    >>> ax = fastattn.plot_attention(weights, tokens, ax=Figure().subplots(), title="self")
    >>> [t.get_text() for t in ax.get_xticklabels()]
    ['Write', 'a', 'poem']
    >>> ax.figure.savefig("attention.png")  # doctest: +SKIP
    """
    _matplotlib()
    w = _checked_weights(weights)
    L, S = w.shape
    rows = _labels("query_tokens", query_tokens, L, "rows", w.shape)
    cols = rows if key_tokens is None else _labels("key_tokens", key_tokens, S, "columns", w.shape)
    if key_tokens is None and L != S:
        raise ValueError(
            f"key_tokens is needed when weights are not square; got shape {tuple(w.shape)}"
        )

    if ax is None:
        import matplotlib.pyplot as plt

        _, ax = plt.subplots(figsize=(1.0 + 0.6 * max(S, 4), 0.6 + 0.5 * max(L, 4)))
    finite = w[np.isfinite(w)]
    low = 0.0 if finite.size == 0 or finite.min() >= 0 else float(finite.min())
    image = ax.imshow(w, cmap="viridis", vmin=low, aspect="auto", interpolation="nearest")
    ax.figure.colorbar(image, ax=ax, label="attention weight")
    long_keys = max((len(c) for c in cols), default=0) > 3
    ax.set_xticks(np.arange(S), labels=cols, rotation=45 if long_keys else 0,
                  ha="right" if long_keys else "center")
    ax.set_yticks(np.arange(L), labels=rows)
    ax.set_xlabel("key (attended to)")
    ax.set_ylabel("query (attending)")
    if title is not None:
        ax.set_title(title)
    if annotate is None:
        annotate = L <= _ANNOTATE_UP_TO and S <= _ANNOTATE_UP_TO
    if annotate:
        _annotate(ax, image.norm, w)
    return ax


def _checked_weights(weights) -> np.ndarray:
    """One head's weights as a float64 matrix; TypeError or ValueError naming what is wrong."""
    w = np.asarray(weights)
    if w.dtype.kind not in "fiub" and not (w.dtype.kind == "V" and w.dtype.name == "bfloat16"):
        raise TypeError(f"weights have dtype {w.dtype}; they must be real numbers")
    if w.ndim != 2:
        raise ValueError(
            f"weights must be 2-D (queries, keys), one head's weights; got shape {tuple(w.shape)}"
        )
    return w.astype(np.float64)  # bfloat16/float16 are not colour-mapped by matplotlib


def _annotate(ax, norm, w: np.ndarray) -> None:
    """Writes each weight into its cell."""
    L, S = w.shape
    for i in range(L):
        for j in range(S):
            # Light text on the dark (low) end of viridis, dark text on the bright end.
            dark = not np.isfinite(w[i, j]) or norm(w[i, j]) < 0.6
            ax.text(j, i, f"{w[i, j]:.2f}", ha="center", va="center", fontsize=9,
                    color="white" if dark else "black")
