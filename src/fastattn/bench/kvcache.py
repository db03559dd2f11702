"""The KV-cache table of ``python -m fastattn bench --kvcache``: attention over a cache.

Rows, each timed in interleaved rounds (as the forward table) and judged by ratios measured in
the same run:

* decode (16, 32/8, 1, 8192, 128) float32 through :func:`fastattn.attention_with_kvcache` on a
  contiguous cache and on a paged one (blocks of 16 in a random order), against
  :func:`fastattn.attention` and PyTorch SDPA on the same contiguous arrays; the K/V read rate
  against the machine's read ceiling (``torch.sum`` of 1 GiB on the threads);
* one long sequence (1, 32/8, 1, 131072, 128) bfloat16: both cores on one sequence (split keys);
* the append: a step's write of one token into the cache, at 1k and 32k tokens, against the
  concatenation a growing cache of new arrays pays (transformers' DynamicCache does that);
* a ragged batch (8 sequences of 100 to 2,000 tokens, 8 heads of 64) through
  :func:`fastattn.attention_varlen`, against the same batch padded (kv_lengths) and against
  PyTorch SDPA on the packed tokens with a block-diagonal mask;
* end to end, the Llama-shaped model of ``--e2e`` decoding at a 16k-token context: with
  fastattn's transformers cache against sdpa and fastattn over transformers' DynamicCache.
"""

from __future__ import annotations

import statistics
from typing import Any, Callable

import numpy as np

from .._api import attention
from .._kvcache import attention_with_kvcache
from .._varlen import attention_varlen
from .cases import numpy_dtype
from .ceilings import measure_ceilings
from .timing import aligned, best_of, calibrate

PAGE = 16


def _interleaved(calls: dict[str, Callable[[], Any]], rounds: int, n: int) -> dict[str, float]:
    """Median over rounds of each call's best time, the calls back to back in rotating order."""
    sampling = {name: calibrate(fn, n)[1] for name, fn in calls.items()}
    times: dict[str, list[float]] = {name: [] for name in calls}
    names = list(calls)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            times[name].append(best_of(calls[name], *sampling[name]))
    return {name: statistics.median(t) for name, t in times.items()}


def _paged(k: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(pages, block table): a (B, H, S, E) cache in blocks of PAGE keys, in a random order."""
    B, H, S, E = k.shape
    per_seq = S // PAGE
    table = rng.permutation(B * per_seq).reshape(B, per_seq).astype(np.int32)
    pages = np.empty((B * per_seq, H, PAGE, E), k.dtype)
    pages[table.ravel()] = k.reshape(B, H, per_seq, PAGE, E).transpose(0, 2, 1, 3, 4).reshape(
        B * per_seq, H, PAGE, E)
    return pages, table


def _torch_sdpa(q, k, v, threads: int) -> Callable[[], Any] | None:
    """PyTorch SDPA on tensors sharing the arrays' memory; None without torch."""
    try:
        import torch
        from torch.nn.functional import scaled_dot_product_attention as sdpa
    except ImportError:
        return None
    from .peers import TorchAdapter

    torch.set_num_threads(threads)
    tq, tk, tv = (TorchAdapter.tensor(a) for a in (q, k, v))
    return lambda: sdpa(tq, tk, tv, enable_gqa=True)


def decode_rows(shape, dtype: str, threads: int, rounds: int, n: int, paged: bool) -> dict:
    """Times of one decode shape's calls, and the bytes of K and V each reads."""
    B, H, Hkv, S, E = shape
    rng = np.random.default_rng(0)
    dt = numpy_dtype(dtype)
    q = rng.standard_normal((B, H, 1, E), dtype=np.float32).astype(dt)
    k, v = (rng.standard_normal((B, Hkv, S, E), dtype=np.float32).astype(dt) for _ in range(2))
    lengths = np.full(B, S)
    calls: dict[str, Callable[[], Any]] = {
        "cache": lambda: attention_with_kvcache(q, k, v, cache_seqlens=lengths,
                                                num_threads=threads)}
    if paged:
        (kp, table), (vp, _) = (_paged(x, np.random.default_rng(1)) for x in (k, v))
        calls["paged"] = lambda: attention_with_kvcache(q, kp, vp, cache_seqlens=lengths,
                                                        block_table=table, num_threads=threads)
        calls["attention"] = lambda: attention(q, k, v, enable_gqa=True, num_threads=threads)
    sdpa = _torch_sdpa(q, k, v, threads)
    if sdpa is not None:
        calls["torch"] = sdpa
    return dict(times=_interleaved(calls, rounds, n), kv_bytes=k.nbytes + v.nbytes)


def _append_costs(S: int, threads: int, steps: int) -> tuple[float, float]:
    """(seconds per step of a `steps`-step loop of one-token appends at S tokens, seconds of
    one concatenation of a token to arrays of S tokens) for B=1, 8 kv heads of 128, float32."""
    rng = np.random.default_rng(0)
    H, E = 8, 128
    tok = rng.standard_normal((1, H, 1, E), dtype=np.float32)
    q = np.empty((1, H, 0, E), np.float32)  # no query: the append alone
    k_cache, v_cache = (np.zeros((1, H, S + steps, E), np.float32) for _ in range(2))

    def loop():
        for t in range(steps):
            attention_with_kvcache(q, k_cache, v_cache, tok, tok, cache_seqlens=S + t,
                                   num_threads=threads)

    grown = [rng.standard_normal((1, H, S, E), dtype=np.float32) for _ in range(2)]

    def concat():
        for x in grown:
            np.concatenate([x, tok], axis=2)

    return best_of(loop, 3) / steps, best_of(concat, 5)


def append_rows(threads: int, steps: int = 1024) -> list[list[str]]:
    """The append rows: per step at 1k and 32k tokens, fastattn's in-place write through
    attention_with_kvcache against the concatenation a cache of new arrays pays (each copies
    the whole cache), and the ratio 32k / 1k of fastattn's."""
    costs = {S: _append_costs(S, threads, steps) for S in (1024, 32768)}
    rows = [[f"append at S={S // 1024}k", f"{a * 1e6:.1f} us", f"{c * 1e6:.0f} us"]
            for S, (a, c) in costs.items()]
    growth = costs[32768][0] / costs[1024][0]
    rows.append(["32k / 1k", f"{growth:.2f}",
                 "target <= 1.2: " + ("PASS" if growth <= 1.2 else "FAIL")])
    return rows


RAGGED = (100, 371, 642, 913, 1185, 1456, 1727, 2000)


def ragged_rows(threads: int, rounds: int, n: int) -> list[list[str]]:
    """The ragged batch's times: varlen, padded, and PyTorch with a block-diagonal mask."""
    H, E, B, longest = 8, 64, len(RAGGED), max(RAGGED)
    cu = np.concatenate([[0], np.cumsum(RAGGED)])
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((int(cu[-1]), H, E), dtype=np.float32) for _ in range(3))
    padded = [np.zeros((B, H, longest, E), np.float32) for _ in range(3)]
    for i, length in enumerate(RAGGED):
        for dst, src in zip(padded, (q, k, v)):
            dst[i, :, :length] = src[cu[i]:cu[i + 1]].transpose(1, 0, 2)
    lengths = np.array(RAGGED)
    calls: dict[str, Callable[[], Any]] = {
        "varlen": lambda: attention_varlen(q, k, v, cu, cu, num_threads=threads),
        "padded": lambda: attention(*padded, kv_lengths=lengths, num_threads=threads)}
    try:
        import torch
        from torch.nn.functional import scaled_dot_product_attention as sdpa
    except ImportError:
        torch = None
    if torch is not None:
        torch.set_num_threads(threads)
        seq = np.repeat(np.arange(B), RAGGED)
        mask = torch.from_numpy(seq[:, None] == seq[None, :])
        tq, tk, tv = (torch.from_numpy(x.transpose(1, 0, 2)[None]) for x in (q, k, v))
        calls["torch"] = lambda: sdpa(tq, tk, tv, attn_mask=mask)
    times = _interleaved(calls, rounds, n)
    rows = []
    for name, t in times.items():
        ratio = "-" if name == "varlen" else f"{t / times['varlen']:.2f}"
        goal = {"padded": 1.5, "torch": 2.0}.get(name)
        verdict = "-" if goal is None else (f">={goal:g} "
                                            + ("PASS" if t / times["varlen"] >= goal else "FAIL"))
        rows.append([name, f"{t * 1e3:.1f} ms", ratio, verdict])
    return rows


def kvcache_table(rounds: int, calls: int, threads: int) -> str:
    """The whole table, as text."""
    ceilings = measure_ceilings(threads)
    read = ceilings["read_gbs"]
    cells = [["case", "shape", "call", "time", "K/V GB/s", "of read ceiling", "ratio", "target"]]
    cases = (("decode", (16, 32, 8, 8192, 128), "float32", True),
             ("long-context", (1, 32, 8, 131072, 128), "bfloat16", False))
    for name, shape, dtype, paged in cases:
        got = decode_rows(shape, dtype, threads, rounds, calls, paged)
        times, nbytes = got["times"], got["kv_bytes"]
        B, H, Hkv, S, E = shape
        label = f"({B},{H}/{Hkv},1,{S},{E}) {dtype}"
        targets = {"cache": ("attention", 0.97), "paged": ("cache", 0.95)}
        for call, t in times.items():
            ratio, target = "-", "-"
            base = targets.get(call)
            if base and base[0] in times:
                r = times[base[0]] / t
                ratio = f"{r:.2f} vs {base[0]}"
                target = f">={base[1]:g} " + ("PASS" if r >= base[1] else "FAIL")
            elif call == "cache" and "torch" in times:
                ratio = f"{times['torch'] / t:.2f} vs torch"
            gbs = nbytes / t / 1e9
            fraction = gbs / read
            goal = 0.9 if name == "decode" else 0.85
            frac = f"{fraction:.0%}" + (f" (>={goal:.0%} " + ("PASS" if fraction >= goal
                                                               else "FAIL") + ")"
                                        if call in ("cache", "paged") else "")
            cells.append([name, label, call, f"{t * 1e3:.2f} ms", f"{gbs:.1f}", frac, ratio,
                          target])
    text = aligned(cells)
    append = aligned([["append (1 token, 8x128 float32)", "fastattn, per step",
                       "np.concatenate, per step"]] + append_rows(threads))
    ragged = aligned([["ragged batch (8 x 100..2000 tokens, 8 x 64)", "time",
                       "varlen's speedup", "target"]] + ragged_rows(threads, rounds, calls))
    from .e2e import SHAPE, decode_with_caches

    e2e = decode_with_caches(threads)
    end_to_end = ("end to end: skipped (needs torch and transformers)" if e2e is None else
                  aligned([[f"Llama-shaped ({SHAPE['num_hidden_layers']} layers, hidden "
                            f"{SHAPE['hidden_size']}, {SHAPE['num_attention_heads']}/"
                            f"{SHAPE['num_key_value_heads']} heads of {SHAPE['head_dim']}), "
                            "decode at 16k tokens", "per token", "fastattn cache's speedup",
                            "target"]] + e2e))
    return (f"memory read ceiling: {read:.1f} GB/s (torch.sum of 1 GiB on {threads} threads "
            f"where torch is installed)\n\n{text}\n\n{append}\n\n{ragged}\n\n{end_to_end}")
