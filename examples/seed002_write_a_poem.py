"""Seed 002's "Write a poem": self-attention of three tokens with 2-number encodings.

The seed gives each token's encoding (word embedding plus positional encoding) as two numbers
and shows its 2x2 query, key and value weights only in pictures. The weights below are the ones
of the StatQuest lesson the seed follows (its companion notebook, ``torch.manual_seed(42)`` and
three ``nn.Linear(2, 2, bias=False)``, printed transposed to 4 decimals, i.e. in the seed's
``x @ w`` convention). They reproduce the two numbers the seed prints in its text, which this
script checks: the unscaled similarity -0.09 of "Write"'s query with its own key, and "Write"
attending 36% to itself, 40% to "a" and 24% to "poem".

Run: ``python examples/seed002_write_a_poem.py [--out DIR]``.
"""

from __future__ import annotations

import numpy as np
from _shared import compare_with_seed, output_dir, save_heatmap, show

import fastattn

TOKENS = ["Write", "a", "poem"]
# Seed 002: "Write: 1.16, 0.23 / A: 0.57, 1.36 / Poem: 4.41, -2.16".
ENCODED = np.array([[1.16, 0.23], [0.57, 1.36], [4.41, -2.16]])
W_Q = np.array([[0.5406, -0.1657], [0.5869, 0.6496]])
W_K = np.array([[-0.1549, -0.3443], [0.1427, 0.4153]])
W_V = np.array([[0.6233, 0.6146], [-0.5188, 0.1323]])


def main() -> None:
    out_dir = output_dir(__doc__.splitlines()[0])
    print('Seed 002, "Write a poem": encodings (rows: Write, a, poem)')
    show("encoded words", ENCODED)

    print("\nThe queries, keys and values: the encodings times 2x2 weight matrices")
    q, k, v = ENCODED @ W_Q, ENCODED @ W_K, ENCODED @ W_V
    show("Q", q)
    show("K", k)
    show("V", v)

    print("\nStep 1: unscaled dot-product similarities Q K^T (row: query, column: key)")
    sims = q @ k.T
    show("Q K^T", sims)
    compare_with_seed("similarity of Write's query with Write's key", sims[0, 0], -0.09, 2)

    print("\nStep 2: scale. The seed's text divides by the dimension (2), but its percentages")
    print("come from dividing by sqrt(2), the rule of 'Attention Is All You Need'; both shown:")
    _, by_two = fastattn.self_attention(ENCODED, W_Q, W_K, W_V, scale=1 / 2, return_weights=True)
    out, weights = fastattn.self_attention(ENCODED, W_Q, W_K, W_V, return_weights=True)
    show("Step 3 softmax rows, scores / 2      ", by_two)
    show("Step 3 softmax rows, scores / sqrt(2)", weights)
    compare_with_seed("Write's weights (Write, a, poem), / sqrt(2)", weights[0],
                      [0.36, 0.40, 0.24], 2)
    print(f"  ('Write' is {weights[0, 0]:.0%} similar to itself, {weights[0, 1]:.0%} to 'a', "
          f"{weights[0, 2]:.0%} to 'poem')")
    if np.all(np.abs(by_two[0] - [0.36, 0.40, 0.24]) < 0.01):
        raise SystemExit("dividing by 2 also matches the seed's percentages; the note is wrong")
    print("  (dividing by 2 instead gives "
          + ", ".join(f"{p:.0%}" for p in by_two[0]) + ": not the seed's percentages)")

    print("\nStep 4: self-attention values = softmax rows times V")
    show("fastattn.self_attention", out)
    by_hand = weights @ v
    if not np.allclose(out, by_hand, rtol=1e-12, atol=1e-12):
        raise SystemExit("fastattn's output differs from the weights times V")
    print("  (equal to the softmax rows times V computed by hand)")

    save_heatmap(weights, TOKENS, TOKENS, out_dir / "seed002_write_a_poem.png",
                 'Seed 002: "Write a poem", softmax(QK^T/sqrt(2))')


if __name__ == "__main__":
    main()
