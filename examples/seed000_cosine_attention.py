"""Seed 000's numbers: its softmax examples, its salary lookup, and cosine-similarity attention.

Seed 000 builds self-attention from cosine similarity: W_ij = cos(X_i, X_j) / sqrt(d),
W_i = softmax(W_i), Y_i = sum_j W_ij X_j. Its concrete numbers are three softmax examples and a
"soft" database lookup (salary = 0*200 + 0.5*2000 + 0.5*20000 + 0*200); both are reproduced with
``fastattn.attention``. For the cosine attention itself the seed has pictures but no vectors, so
the four word vectors X1..X4 below are made up (X4 points the same way as X2, twice as long).

Run: ``python examples/seed000_cosine_attention.py [--out DIR]``.
"""

from __future__ import annotations

import numpy as np
from _shared import compare_with_seed, output_dir, save_heatmap, show

import fastattn

# Seed 000: "Softmax (1,2,3,4) = 0.03, 0.08, 0.23, 0.64", "Softmax (5,10,15,20) = 0, 0, 0.0067,
# 0.99", "Softmax (10,20,30,40) = 0, 0, 0, 1".
SEED_SOFTMAX = [
    ([1, 2, 3, 4], [0.03, 0.08, 0.23, 0.64], 2),
    ([5, 10, 15, 20], [0, 0, 0.0067, 0.99], 2),
    ([10, 20, 30, 40], [0, 0, 0, 1], 2),
]
SALARIES = np.array([[200.0], [2000.0], [20000.0], [200.0]])
SEED_SALARY_WEIGHTS = [0.0, 0.5, 0.5, 0.0]
WORDS = ["X1", "X2", "X3", "X4"]
X = np.array([[1.0, 0.0, 1.0], [1.0, 1.0, 0.0], [0.0, 1.0, 1.0], [2.0, 2.0, 0.0]])


def softmax_by_attention(scores) -> np.ndarray:
    """softmax(scores), by ``fastattn.attention``: a query [1] against keys [s_j] (scale 1) has
    logits s_j, and values that are the identity return the weights themselves."""
    scores = np.asarray(scores, dtype=np.float64)[:, None]
    return fastattn.attention(np.ones((1, 1)), scores, np.eye(len(scores)), scale=1.0)[0]


def main() -> None:
    out_dir = output_dir(__doc__.splitlines()[0])
    print("Seed 000: softmax makes similarity scores sum to one (and large scores winner-take-all)")
    for scores, seed, decimals in SEED_SOFTMAX:
        compare_with_seed(f"softmax{tuple(scores)}", softmax_by_attention(scores), seed, decimals)

    print("\nSeed 000's soft lookup: no row has Age = 35, so take a weighted sum of the salaries")
    print("of the rows it is similar to (the seed picks rows 2 and 3, half each). A bool mask")
    print("keeps those two keys; scale=0 makes their scores equal, so each gets half:")
    keep = np.array([[w > 0 for w in SEED_SALARY_WEIGHTS]])
    salary, weights = fastattn.attention(np.zeros((1, 1)), np.zeros((4, 1)), SALARIES, mask=keep,
                                         scale=0.0, return_weights=True)
    compare_with_seed("weights of the four rows", weights[0], SEED_SALARY_WEIGHTS, 2)
    terms = " + ".join(f"{w:g}*{s:g}" for w, s in zip(weights[0], SALARIES[:, 0]))
    print(f"  Salary = {terms} = {salary[0, 0]:g}")
    if salary[0, 0] != 0.5 * 2000 + 0.5 * 20000:
        raise SystemExit(f"the lookup gives {salary[0, 0]}, not the seed's 0.5*2000 + 0.5*20000")

    d = X.shape[1]
    print(f"\nCosine-similarity self-attention of four words X1..X4 (made up, d = {d}):")
    show("X", X)
    unit = X / np.linalg.norm(X, axis=1, keepdims=True)
    cos = unit @ unit.T
    show("cos Sim(Xi, Xj)", cos)
    print(f"  (W22 = {cos[1, 1]:.4f} = W24 = {cos[1, 3]:.4f}: X4 points the way X2 does; cosine "
          "ignores its length)")
    e = np.exp(cos / np.sqrt(d))
    by_hand = e / e.sum(axis=1, keepdims=True)
    show("block 2 by hand: softmax(cos Sim(X2, Xj) / sqrt(d))", by_hand[1])
    show("Y2 by hand: sum_j W2j Xj", by_hand[1] @ X)

    y, w = fastattn.attention(X, X, X, similarity="cosine", return_weights=True)
    show("W, fastattn.attention(X, X, X, similarity='cosine')", w)
    show("Y, the new embeddings", y)
    if not (np.allclose(w, by_hand, rtol=1e-12, atol=1e-15)
            and np.allclose(y, by_hand @ X, rtol=1e-12, atol=1e-15)):
        raise SystemExit("fastattn's cosine attention differs from the seed's formula by hand")
    print("  (equal to the seed's formula computed by hand)")
    _, w_dot = fastattn.attention(X, X, X, return_weights=True)
    show("for contrast, the dot-product weights of X2", w_dot[1])
    if int(np.argmax(w_dot[1])) != 3:
        raise SystemExit("with dot products X2 should attend most to the longer X4")
    print("  (with dot products X4, twice as long as X2, outweighs X2 itself)")

    save_heatmap(w, WORDS, WORDS, out_dir / "seed000_cosine_attention.png",
                 "Seed 000: softmax(cos Sim / sqrt(d))")


if __name__ == "__main__":
    main()
