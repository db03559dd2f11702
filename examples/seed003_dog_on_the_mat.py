"""Seed 003's "The dog is sitting on the mat": attention from given queries, keys and values.

The seed gives a query, key and value vector (3 numbers each) for six tokens, "The" to "the"
("mat" has none, so it takes no part here), and works through the query of "sitting" against the
keys of "The" and "dog". This script redoes that arithmetic and shows where the seed's numbers
depart from its own vectors and formula:

* the seed writes 0.3x0.1+0.4x0.3+0.1x0.6 = 0.13 and 0.3x0.2+0.4x0.4+0.1x0.7 = 0.26, but those
  products sum to 0.21 and 0.29;
* its formula divides by sqrt(d_k) = sqrt(3), but its arithmetic divides by 3;
* its weights "~0.4" and "~0.6" come from neither: both scales give about 0.49 and 0.51 over the
  two keys, and about 1/6 each over all six.

Run: ``python examples/seed003_dog_on_the_mat.py [--out DIR]``.
"""

from __future__ import annotations

import math

import numpy as np
from _shared import output_dir, save_heatmap, show

import fastattn

TOKENS = ["The", "dog", "is", "sitting", "on", "the"]
QUERIES = np.array([[0.2, 0.5, 0.1], [0.4, 0.6, 0.2], [0.1, 0.3, 0.2], [0.3, 0.4, 0.1],
                    [0.5, 0.2, 0.3], [0.3, 0.1, 0.5]])
KEYS = np.array([[0.1, 0.3, 0.6], [0.2, 0.4, 0.7], [0.3, 0.5, 0.4], [0.4, 0.3, 0.5],
                 [0.6, 0.4, 0.2], [0.4, 0.2, 0.6]])
VALUES = np.array([[0.3, 0.2, 0.8], [0.5, 0.3, 0.9], [0.2, 0.1, 0.7], [0.6, 0.4, 0.9],
                   [0.7, 0.5, 0.8], [0.8, 0.6, 0.9]])
SITTING, THE, DOG = 3, 0, 1
# What the seed writes for the two dot products and the two weights.
SEED_DOTS = {"The": 0.13, "dog": 0.26}
SEED_WEIGHTS = {"The": 0.4, "dog": 0.6}


def dot_product_line(word: str, key: int) -> float:
    q, k = QUERIES[SITTING], KEYS[key]
    terms = "+".join(f"{a:.1f}x{b:.1f}" for a, b in zip(q, k))
    products = " + ".join(f"{a * b:.2f}" for a, b in zip(q, k))
    value = float(q @ k)
    print(f"  Dot Product (sitting, {word}) = {terms}")
    print(f"    the seed writes = {SEED_DOTS[word]:.2f}")
    print(f"    the products    = {products} = {value:.2f}"
          + ("" if abs(value - SEED_DOTS[word]) < 0.005 else "  <- not the seed's number"))
    return value


def main() -> None:
    out_dir = output_dir(__doc__.splitlines()[0])
    d_k = KEYS.shape[1]
    print('Seed 003, "The dog is sitting on the mat" (vectors for its first six tokens)')
    print("\nSimilarity: the query of 'sitting' against the keys of 'The' and 'dog'")
    dots = {"The": dot_product_line("The", THE), "dog": dot_product_line("dog", DOG)}
    all_dots = QUERIES[SITTING] @ KEYS.T
    show("  all six dot products of 'sitting' (The, dog, is, sitting, on, the)", all_dots, 2)
    for seed in SEED_DOTS.values():
        hits = [f"'{TOKENS[j]}' (token {j + 1})"
                for j in np.flatnonzero(np.abs(all_dots - seed) < 0.005)]
        print(f"  the seed's {seed:.2f}: " + (f"the dot product with {', '.join(hits)}"
                                             if hits else "the dot product with no key"))

    print(f"\nScaling: the formula divides by sqrt(d_k) = sqrt({d_k}) = {math.sqrt(d_k):.4f};")
    print(f"the seed's arithmetic, softmax(0.13/3) and softmax(0.26/3), divides by d_k = {d_k}:")
    for word in ("The", "dog"):
        print(f"  {word}: seed {SEED_DOTS[word]:.2f}/3 = {SEED_DOTS[word] / 3:.4f}; "
              f"computed {dots[word]:.2f}/3 = {dots[word] / 3:.4f}, "
              f"{dots[word]:.2f}/sqrt(3) = {dots[word] / math.sqrt(3):.4f}")

    # Scores given directly: a 1-D query [1] against 1-D keys [score] makes q.k the score.
    seed_scores = np.array([[SEED_DOTS["The"]], [SEED_DOTS["dog"]]])
    _, w_seed = fastattn.attention(np.ones((1, 1)), seed_scores, np.eye(2), scale=1 / d_k,
                                   return_weights=True)
    show("  softmax(0.13/3, 0.26/3) over The, dog, with the seed's own dot products", w_seed[0])

    scales = {"/ 3 (the seed's arithmetic)": 1 / d_k, "/ sqrt(3) (the seed's formula)": None}
    two_key_weights = [w_seed[0]]
    sitting = QUERIES[SITTING : SITTING + 1]
    for name, scale in scales.items():
        print(f"\nScores {name}:")
        two, w_two = fastattn.attention(sitting, KEYS[:2], VALUES[:2], scale=scale,
                                        return_weights=True)
        show("  weights of 'sitting' over The, dog only", w_two[0])
        two_key_weights.append(w_two[0])
        show("  weights of 'sitting' over all six keys ", fastattn.attention(
            sitting, KEYS, VALUES, scale=scale, return_weights=True)[1][0])
        for word, key in (("The", THE), ("dog", DOG)):
            show(f"  Weighted Sum (sitting, {word}) = {w_two[0, key]:.4f} x Value({word})",
                 w_two[0, key] * VALUES[key])
        show("  output of 'sitting' over The, dog", two[0])
    seed_pair = [SEED_WEIGHTS["The"], SEED_WEIGHTS["dog"]]
    if any(np.all(np.abs(w - seed_pair) < 0.05) for w in two_key_weights):
        raise SystemExit("a scale reproduces the seed's 0.4 / 0.6 after all; fix this script")
    print(f"\nThe seed's weights, ~{seed_pair[0]} for The and ~{seed_pair[1]} for dog, come from "
          "none of the above:")
    for word, key in (("The", THE), ("dog", DOG)):
        show(f"  the seed's Weighted Sum (sitting, {word}) = {SEED_WEIGHTS[word]} x Value({word})",
             SEED_WEIGHTS[word] * VALUES[key], 2)

    out, weights = fastattn.attention(QUERIES, KEYS, VALUES, return_weights=True)
    print("\nThe whole sentence, softmax(Q K^T / sqrt(3)) V, by fastattn.attention:")
    show("attention weights (row: query, column: key)", weights)
    show("outputs", out)
    save_heatmap(weights, TOKENS, TOKENS, out_dir / "seed003_dog_on_the_mat.png",
                 'Seed 003: "The dog is sitting on the ...", /sqrt(3)')


if __name__ == "__main__":
    main()
