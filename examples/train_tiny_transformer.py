"""Trains a tiny character-level Transformer with fastattn's attention, forward and backward.

The text is one every Python has, the Zen of Python (``codecs.decode(this.s, "rot13")``). The
same model, from the same seed and on the same batches, is trained twice: once with
``fastattn.torch.attention`` (fastattn's fused forward, and its fused backward through
autograd), once with PyTorch's ``scaled_dot_product_attention``. The script prints both falling
losses side by side and a line of text sampled from the fastattn model.

    python examples/train_tiny_transformer.py [--steps 300]

Needs torch (``pip install "fastattn[torch]"``); about a minute on 2 cores.
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import io
import time

import torch
import torch.nn.functional as F
from torch import nn

import fastattn.torch as fattn

with contextlib.redirect_stdout(io.StringIO()):  # importing `this` prints the Zen
    import this

TEXT = codecs.decode(this.s, "rot13")
CONTEXT = 64  # characters a model sees
D_MODEL, HEADS, LAYERS = 64, 4, 2
BATCH, LR = 32, 3e-3


def sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def fastattn_attention(q, k, v):
    return fattn.attention(q, k, v, causal=True)


class Block(nn.Module):
    """Pre-norm Transformer block: causal multi-head self-attention, then an MLP."""

    def __init__(self, attend):
        super().__init__()
        self.attend = attend
        self.norm1, self.norm2 = nn.LayerNorm(D_MODEL), nn.LayerNorm(D_MODEL)
        self.qkv = nn.Linear(D_MODEL, 3 * D_MODEL)
        self.proj = nn.Linear(D_MODEL, D_MODEL)
        self.mlp = nn.Sequential(nn.Linear(D_MODEL, 4 * D_MODEL), nn.GELU(),
                                 nn.Linear(4 * D_MODEL, D_MODEL))

    def forward(self, x):
        B, L, _ = x.shape
        # (B, L, 3, H, Dh) -> three (B, H, L, Dh) views: no copies on the way to the kernel
        q, k, v = self.qkv(self.norm1(x)).view(B, L, 3, HEADS, -1).permute(2, 0, 3, 1, 4)
        y = self.attend(q, k, v).transpose(1, 2).reshape(B, L, D_MODEL)
        x = x + self.proj(y)
        return x + self.mlp(self.norm2(x))


class TinyTransformer(nn.Module):
    def __init__(self, vocab: int, attend):
        super().__init__()
        self.tokens = nn.Embedding(vocab, D_MODEL)
        self.positions = nn.Embedding(CONTEXT, D_MODEL)
        self.blocks = nn.Sequential(*(Block(attend) for _ in range(LAYERS)))
        self.norm = nn.LayerNorm(D_MODEL)
        self.head = nn.Linear(D_MODEL, vocab)

    def forward(self, idx):
        x = self.tokens(idx) + self.positions(torch.arange(idx.shape[1]))
        return self.head(self.norm(self.blocks(x)))


def batches(data: torch.Tensor, steps: int, seed: int):
    """The same random windows (inputs, next characters) for every model trained."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        start = torch.randint(len(data) - CONTEXT - 1, (BATCH,), generator=gen)
        window = torch.stack([data[s:s + CONTEXT + 1] for s in start.tolist()])
        yield window[:, :-1], window[:, 1:]


def train(attend, data, vocab, steps: int, seed: int = 0):
    torch.manual_seed(seed)
    model = TinyTransformer(vocab, attend)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    losses = []
    for x, y in batches(data, steps, seed):
        loss = F.cross_entropy(model(x).reshape(-1, vocab), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return model, losses


@torch.no_grad()
def sample(model, prompt: str, chars: list[str], n: int = 60, seed: int = 0) -> str:
    index = {c: i for i, c in enumerate(chars)}
    idx = torch.tensor([[index[c] for c in prompt]])
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n):
        logits = model(idx[:, -CONTEXT:])[0, -1]
        nxt = torch.multinomial(F.softmax(logits / 0.8, dim=-1), 1, generator=gen)
        idx = torch.cat([idx, nxt[None]], dim=1)
    return "".join(chars[i] for i in idx[0].tolist())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    steps = parser.parse_args().steps
    torch.set_num_threads(2)
    chars = sorted(set(TEXT))
    data = torch.tensor([chars.index(c) for c in TEXT])
    print(f"text: the Zen of Python, {len(TEXT)} characters, {len(chars)} distinct")
    results = {}
    for name, attend in (("fastattn", fastattn_attention), ("sdpa", sdpa)):
        t0 = time.perf_counter()
        results[name] = train(attend, data, len(chars), steps)
        print(f"trained with {name}: {steps} steps in {time.perf_counter() - t0:.1f} s")
    (model, ours), (_, theirs) = results["fastattn"], results["sdpa"]
    print("step   loss (fastattn)   loss (sdpa)")
    for step in sorted({0, *range(49, steps, 50), steps - 1}):
        print(f"{step + 1:4d}   {ours[step]:15.4f}   {theirs[step]:11.4f}")
    drop = ours[0] - ours[-1]
    print(f"loss fell by {drop:.2f} with fastattn ({ours[0]:.2f} -> {ours[-1]:.2f}); the two runs "
          f"differ by at most {max(abs(a - b) for a, b in zip(ours, theirs)):.1e}")
    print("sample:", repr(sample(model, "Beautiful is ", chars)))


if __name__ == "__main__":
    main()
