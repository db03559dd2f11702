"""Seed 004's "How are you doing?": the whole flow, tokens to contextual vectors.

Input tokens -> embeddings -> Q, K, V -> dot-product(Q, K) -> softmax -> weights x V. The seed
gives no numbers for the embeddings or the weight matrices, so this script makes them: seeded
random embeddings of 8 numbers per token plus the sinusoidal positional encoding, and the
Glorot-initialized weights of a seeded ``fastattn.MultiHeadAttention``. Its one number, "How"
attending ``[0.1, 0.2, 0.3, 0.3, 0.1]`` to the five tokens, is then reproduced exactly.

Run: ``python examples/seed004_how_are_you_doing.py [--out DIR]``.
"""

from __future__ import annotations

import numpy as np
from _shared import compare_with_seed, output_dir, save_heatmap, show

import fastattn

TOKENS = ["How", "are", "you", "doing", "?"]
D_MODEL = 8
SEED = 4
# Seed 004, Step 4: '[0.1, 0.2, 0.3, 0.3, 0.1] -> "How" pays 30% attention to "you" and "doing"'.
SEED_HOW_WEIGHTS = np.array([0.1, 0.2, 0.3, 0.3, 0.1])


def softmax(scores: np.ndarray) -> np.ndarray:
    e = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def main() -> None:
    out_dir = output_dir(__doc__.splitlines()[0])
    rng = np.random.default_rng(SEED)
    print('Seed 004, "How are you doing?": 5 tokens, ' + ", ".join(f"[{t}]" for t in TOKENS))

    print(f"\nStep 1: token embeddings ({D_MODEL} numbers each, seeded random) plus the")
    print("sinusoidal positional encoding (fastattn.positional_encoding), so order counts")
    embeddings = rng.standard_normal((len(TOKENS), D_MODEL))
    x = embeddings + fastattn.positional_encoding(len(TOKENS), D_MODEL)
    show("x = embeddings + positional encoding", x)

    print("\nStep 2: three separate linear layers (Wq, Wk, Wv) give Q, K, V, all of size 8")
    layer = fastattn.MultiHeadAttention(D_MODEL, num_heads=1, bias=False, dtype=np.float64,
                                        seed=SEED)
    q, k, v = x @ layer.w_q, x @ layer.w_k, x @ layer.w_v
    show("Q of 'How'", q[0])
    show("K of 'How'", k[0])
    show("V of 'How'", v[0])

    print("\nStep 3: scores of 'How', Q_how . K_w for every word w (scaled by 1/sqrt(8))")
    scores = q[0] @ k.T / np.sqrt(D_MODEL)
    show("scores of 'How' (How, are, you, doing, ?)", scores)

    print("\nStep 4: softmax turns the scores into weights that sum to 1")
    z, weights = fastattn.self_attention(x, layer.w_q, layer.w_k, layer.w_v, return_weights=True)
    show("weights of 'How', fastattn.self_attention", weights[0])
    show("weights of 'How', softmax of step 3     ", softmax(scores))
    if not np.allclose(weights[0], softmax(scores), rtol=1e-12, atol=1e-14):
        raise SystemExit("fastattn's weights differ from the softmax of the scores")
    top = TOKENS[int(np.argmax(weights[0]))]
    print(f"  (sum {weights[0].sum():.4f}; 'How' pays the most attention, "
          f"{weights[0].max():.0%}, to {top!r})")

    print("\nStep 5: Z_how = sum(attention_weights * Value_vectors)")
    show("Z_how, fastattn.self_attention", z[0])
    show("Z_how, by hand                ", weights[0] @ v)
    if not np.allclose(z[0], weights[0] @ v, rtol=1e-12, atol=1e-14):
        raise SystemExit("fastattn's output differs from the weighted sum of the values")
    show("Z for every word (the contextual output)", z)

    print("\nThe seed's own weights for 'How': a float mask of log(weights) added to scores of")
    print("zero (scale=0) makes softmax return exactly those weights, so fastattn.attention")
    print("computes the seed's Z_how from them:")
    z_seed, w_seed = fastattn.attention(q[:1], k, v, mask=np.log(SEED_HOW_WEIGHTS), scale=0.0,
                                        return_weights=True)
    compare_with_seed("weights of 'How' (How, are, you, doing, ?)", w_seed[0], SEED_HOW_WEIGHTS, 1)
    if not np.allclose(w_seed[0], SEED_HOW_WEIGHTS, rtol=1e-12, atol=0):
        raise SystemExit("softmax(log w) is not w: the mask did not pass through exactly")
    print("  (and equal to them within 1e-12 relative)")
    show("Z_how with the seed's weights, fastattn.attention", z_seed[0])
    show("Z_how with the seed's weights, by hand           ", SEED_HOW_WEIGHTS @ v)
    if not np.allclose(z_seed[0], SEED_HOW_WEIGHTS @ v, rtol=1e-12, atol=1e-14):
        raise SystemExit("fastattn's output differs from the seed's weights times V")

    print("\nThe same sentence through 2 heads (fastattn.MultiHeadAttention, 4 numbers per head):")
    two_heads = fastattn.MultiHeadAttention(D_MODEL, num_heads=2, dtype=np.float64, seed=SEED)
    out, head_weights = two_heads(x, return_weights=True)
    for h in range(two_heads.num_heads):
        show(f"  head {h} weights of 'How'", head_weights[h, 0])
    show("  output of 'How' (heads concatenated, times w_o)", out[0])

    save_heatmap(weights, TOKENS, TOKENS, out_dir / "seed004_how_are_you_doing.png",
                 'Seed 004: "How are you doing?", one head')


if __name__ == "__main__":
    main()
