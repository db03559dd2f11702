"""A decoder generating text token by token against a KV cache, in NumPy alone.

A two-layer decoder with random weights (the point is the cache, not the text): the prompt is
written into preallocated caches and attended to, then each new token's keys and values are
appended in place by fastattn.attention_with_kvcache. The same loop with a cache that grows by
concatenation (as a list of new arrays, what transformers' DynamicCache does) gives the same
tokens, slower the longer the context.

    python examples/generate_with_kvcache.py [--prompt 4096] [--tokens 64]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import fastattn

# Llama-like proportions where the cache, not the weights, dominates a step's memory traffic.
VOCAB, HEADS, KV_HEADS, E, LAYERS = 512, 16, 8, 64, 2
D = HEADS * E


def weights(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)

    def w(*shape):
        return (rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32)

    return {"embed": w(VOCAB, D) * float(np.sqrt(VOCAB / D)),
            "layers": [{"q": w(D, HEADS * E), "k": w(D, KV_HEADS * E), "v": w(D, KV_HEADS * E),
                        "o": w(HEADS * E, D), "up": w(D, D), "down": w(D, D)}
                       for _ in range(LAYERS)]}


def norm(x):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-6)


def heads(x, n):  # (B, T, n * E) -> (B, n, T, E)
    return x.reshape(x.shape[0], x.shape[1], n, E).transpose(0, 2, 1, 3)


class InPlace:
    """Preallocated caches, one per layer, written in place by fastattn."""

    def __init__(self, batch: int, capacity: int):
        self.k = [np.zeros((batch, KV_HEADS, capacity, E), np.float32) for _ in range(LAYERS)]
        self.v = [np.zeros_like(c) for c in self.k]
        self.lengths = np.zeros(batch, np.int64)

    def attend(self, layer, q, k, v):
        return fastattn.attention_with_kvcache(q, self.k[layer], self.v[layer], k, v,
                                               cache_seqlens=self.lengths, causal=True)

    def advance(self, n):
        self.lengths += n


class Concatenating:
    """Caches that grow by concatenating each step's keys and values to new arrays."""

    def __init__(self, batch: int, capacity: int):
        self.k = [np.zeros((batch, KV_HEADS, 0, E), np.float32) for _ in range(LAYERS)]
        self.v = [np.zeros_like(c) for c in self.k]

    def attend(self, layer, q, k, v):
        self.k[layer] = np.concatenate([self.k[layer], k], axis=2)
        self.v[layer] = np.concatenate([self.v[layer], v], axis=2)
        return fastattn.attention(q, self.k[layer], self.v[layer], causal=True,
                                  align="bottom_right", enable_gqa=True)

    def advance(self, n):
        pass


def forward(w, tokens, cache):
    """Logits of the last position after running `tokens` (B, T) through the decoder."""
    x = w["embed"][tokens]
    for i, layer in enumerate(w["layers"]):
        h = norm(x)
        q, k, v = (heads(h @ layer[n], c) for n, c in (("q", HEADS), ("k", KV_HEADS),
                                                       ("v", KV_HEADS)))
        a = cache.attend(i, q, k, v)
        x = x + a.transpose(0, 2, 1, 3).reshape(x.shape[0], x.shape[1], HEADS * E) @ layer["o"]
        x = x + np.maximum(norm(x) @ layer["up"], 0) @ layer["down"]
    cache.advance(tokens.shape[1])
    return norm(x[:, -1]) @ w["embed"].T  # tied embeddings


def generate(w, prompt, new_tokens, cache):
    """Greedy tokens, and the seconds per token of the decode steps."""
    logits = forward(w, prompt, cache)
    out = []
    start = time.perf_counter()
    for _ in range(new_tokens):
        token = logits.argmax(-1)
        out.append(token)
        logits = forward(w, token[:, None], cache)
    return np.stack(out, 1), (time.perf_counter() - start) / new_tokens


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompt", type=int, default=4096, help="prompt tokens (default 4096)")
    p.add_argument("--tokens", type=int, default=64, help="tokens to generate (default 64)")
    args = p.parse_args()
    w = weights()
    prompt = np.random.default_rng(1).integers(0, VOCAB, (2, args.prompt))
    capacity = args.prompt + args.tokens
    cache = InPlace(2, capacity)
    buffer = cache.k[0].__array_interface__["data"][0]
    tokens, t_in_place = generate(w, prompt, args.tokens, cache)
    same_buffer = cache.k[0].__array_interface__["data"][0] == buffer
    print(f"prompt {args.prompt} tokens, {args.tokens} generated, batch 2, {LAYERS} layers, "
          f"{HEADS}/{KV_HEADS} heads of {E}")
    print(f"cache: {cache.lengths.tolist()} tokens held of {capacity}, written in place "
          f"(same buffer throughout: {'yes' if same_buffer else 'no'})")
    other, t_concat = generate(w, prompt, args.tokens, Concatenating(2, capacity))
    print(f"in place:      {1 / t_in_place:8.1f} tokens/s per sequence")
    print(f"concatenating: {1 / t_concat:8.1f} tokens/s per sequence")
    print(f"same tokens: {'yes' if np.array_equal(tokens, other) else 'no'}")
    print("first tokens:", tokens[0, :8].tolist())


if __name__ == "__main__":
    main()
