"""plot_attention: what it draws, its errors, and matplotlib staying optional.

Tests that draw need matplotlib (the ``plot`` extra) and use the Agg backend; the ones about a
missing matplotlib and about ``import fastattn`` not loading it run without it.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import fastattn
from layouts import assert_unchanged, copies

TOKENS = ["The", "dog", "sat"]


@pytest.fixture
def axes():
    """A fresh Agg axes, not registered with pyplot (nothing to close, no display needed)."""
    pytest.importorskip("matplotlib", reason="plot_attention needs matplotlib (the plot extra)")
    from matplotlib.figure import Figure

    return Figure().subplots()


def weights_of(L, S, seed=0):
    x = np.random.default_rng(seed).standard_normal((max(L, S), 4))
    return fastattn.attention(x[:L], x[:S], x[:S], return_weights=True)[1]


def texts(labels):
    return [t.get_text() for t in labels]


def test_draws_labelled_heat_map(axes):
    w = weights_of(3, 3)
    saved = copies(w)
    ax = fastattn.plot_attention(w, TOKENS, ax=axes, title="one head")
    assert ax is axes
    assert_unchanged([w], saved)
    assert texts(ax.get_xticklabels()) == TOKENS and texts(ax.get_yticklabels()) == TOKENS
    assert ax.get_title() == "one head"
    (image,) = ax.get_images()
    np.testing.assert_array_equal(image.get_array(), w)  # row i of the picture is query i
    # 3x3 is small: every cell carries its weight, two decimals.
    assert sorted(t.get_text() for t in ax.texts) == sorted(f"{v:.2f}" for v in w.ravel())
    assert len(ax.figure.axes) == 2  # the heat map and its colour bar


def test_cross_attention_labels_and_annotate_switch(axes):
    w = weights_of(2, 4)
    keys = ["a", "b", "c", "d"]
    ax = fastattn.plot_attention(w, ["q0", "q1"], keys, ax=axes, annotate=False)
    assert texts(ax.get_xticklabels()) == keys
    assert texts(ax.get_yticklabels()) == ["q0", "q1"]
    assert len(ax.texts) == 0


def test_large_maps_are_not_annotated_by_default(axes):
    w = weights_of(20, 20)
    ax = fastattn.plot_attention(w, [f"t{i}" for i in range(20)], ax=axes)
    assert len(ax.texts) == 0
    ax = fastattn.plot_attention(w, [f"t{i}" for i in range(20)], ax=axes, annotate=True)
    assert len(ax.texts) == 400


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.int64])
def test_other_dtypes(axes, dtype):
    w = (weights_of(3, 3) * (10 if dtype == np.int64 else 1)).astype(dtype)
    ax = fastattn.plot_attention(w, TOKENS, ax=axes)
    np.testing.assert_array_equal(ax.get_images()[0].get_array(), w.astype(np.float64))


def test_bfloat16_weights(axes):
    ml_dtypes = pytest.importorskip("ml_dtypes", reason="bfloat16 comes from ml_dtypes")
    w = weights_of(3, 3).astype(ml_dtypes.bfloat16)
    ax = fastattn.plot_attention(w, TOKENS, ax=axes)
    np.testing.assert_array_equal(ax.get_images()[0].get_array(), w.astype(np.float64))


def test_new_figure_through_pyplot():
    pytest.importorskip("matplotlib", reason="plot_attention needs matplotlib (the plot extra)")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ax = fastattn.plot_attention(weights_of(3, 3), TOKENS)
    try:
        assert ax.figure in [plt.figure(n) for n in plt.get_fignums()]
    finally:
        plt.close(ax.figure)


@pytest.mark.parametrize("weights,queries,keys,match", [
    (np.zeros(3), TOKENS, None, r"2-D .* shape \(3,\)"),
    (np.zeros((1, 3, 3)), TOKENS, None, r"2-D .* shape \(1, 3, 3\)"),
    (np.zeros((3, 3)), TOKENS[:2], None, r"query_tokens has 2 labels .* \(3, 3\) have 3 rows"),
    (np.zeros((3, 2)), TOKENS, ["a", "b", "c"],
     r"key_tokens has 3 labels .* \(3, 2\) have 2 columns"),
    (np.zeros((3, 2)), TOKENS, None, r"key_tokens is needed .* \(3, 2\)"),
])
def test_bad_shapes(axes, weights, queries, keys, match):
    with pytest.raises(ValueError, match=match):
        fastattn.plot_attention(weights, queries, keys, ax=axes)


def test_bad_dtype(axes):
    with pytest.raises(TypeError, match="complex128"):
        fastattn.plot_attention(np.zeros((3, 3), complex), TOKENS, ax=axes)


def test_missing_matplotlib_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now fails
    with pytest.raises(ImportError, match=r"pip install 'fastattn\[plot\]'"):
        fastattn.plot_attention(np.eye(2), ["a", "b"])


def test_import_fastattn_does_not_import_matplotlib():
    code = ("import sys, fastattn; assert 'matplotlib' not in sys.modules, "
            "[m for m in sys.modules if m.startswith('matplotlib')]")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
