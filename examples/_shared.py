"""What every example script shares: its ``--out DIR`` option, printing, seed checks, heat maps.

Not an example itself (the leading underscore keeps it out of the examples' test).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

import fastattn


def output_dir(description: str) -> Path:
    """Parses ``--out DIR`` (default: the current directory) and creates that directory."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", type=Path, default=Path("."),
                        help="directory for the heat map PNG (default: the current directory)")
    out = parser.parse_args().out
    out.mkdir(parents=True, exist_ok=True)
    return out


def show(label: str, value, decimals: int | None = 4) -> None:
    """Prints a labelled number or vector on one line, a matrix below its label, indented.

    ``decimals=None`` prints each number as short as it is (``0.0067``, ``0``), as a seed does.
    """
    value = np.asarray(value)
    fixed = dict(precision=decimals, floatmode="fixed")
    short = dict(formatter={"float_kind": "{:g}".format})
    with np.printoptions(suppress=True, linewidth=100, **(short if decimals is None else fixed)):
        text = np.array2string(value, prefix="  " if value.ndim > 1 else "")
    print(f"{label}:\n  {text}" if value.ndim > 1 else f"{label}: {text}")


def compare_with_seed(label: str, computed, seed, decimals: int) -> None:
    """Prints the seed's printed numbers beside ours and stops the script if they disagree.

    The seed prints ``decimals`` decimals, sometimes rounded and sometimes cut off, so ours must
    be within one unit of its last decimal.
    """
    computed, seed = np.asarray(computed, np.float64), np.asarray(seed, np.float64)
    agree = bool(np.all(np.abs(computed - seed) < 10.0**-decimals))
    print(f"{label}:")
    show("  the seed prints", seed, None)
    show("  computed       ", computed)
    print(f"  -> {'agrees with the seed' if agree else 'DISAGREES with the seed'} "
          f"(to within 1 in its last decimal, {10.0**-decimals:g})")
    if not agree:
        raise SystemExit(f"{label}: computed {computed} but the seed prints {seed}")


def save_heatmap(weights, query_tokens, key_tokens, path: Path, title: str) -> None:
    """Saves ``fastattn.plot_attention``'s heat map as a PNG, or says why it could not."""
    try:
        from matplotlib.figure import Figure  # no pyplot: no GUI backend needed
    except ImportError:
        print(f"heat map {path.name} skipped: matplotlib is missing "
              "(pip install 'fastattn[plot]')")
        return
    fig = Figure(figsize=(1.5 + 0.8 * len(key_tokens), 1.0 + 0.6 * len(query_tokens)))
    ax = fig.subplots()
    fastattn.plot_attention(weights, query_tokens, key_tokens, ax=ax, title=title)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    print(f"heat map saved to {path}")
