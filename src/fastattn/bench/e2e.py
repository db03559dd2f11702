"""``python -m fastattn bench --e2e``: a whole model, fastattn against transformers' ``sdpa``.

A Llama-shaped model with random weights (2 layers, hidden 1024, 16 query heads over 4 KV heads
of 64, MLP 2816, vocabulary 4096: small enough that attention is a real share of a long
prompt's time) reads a 4096-token prompt (prefill) and then greedily decodes 64 tokens one at a
time against its KV cache. Both attention implementations run on the same model, interleaved
round by round (the machine is shared: ratios taken together hold where absolute times drift),
in float32 and bfloat16. Needs torch and transformers (``pip install "fastattn[transformers]"``).
"""

from __future__ import annotations

import statistics
import sys
import time

PROMPT = 4096
NEW_TOKENS = 64
SHAPE = dict(hidden_size=1024, num_attention_heads=16, num_key_value_heads=4, head_dim=64,
             intermediate_size=2816, num_hidden_layers=2, vocab_size=4096,
             max_position_embeddings=PROMPT + NEW_TOKENS)


def _model(torch, transformers, dtype):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**SHAPE)
    return transformers.LlamaForCausalLM(config).to(dtype).eval()


def _run(torch, model, ids, new_tokens, cache=None):
    """(prefill seconds, decode seconds per token, generated tokens), greedy; ``cache``: the
    KV cache to fill (None: the model's default, transformers' DynamicCache)."""
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1,
                    **({} if cache is None else {"cache": cache}))
        t1 = time.perf_counter()
        cache, tokens = out.cache, [out.logits[:, -1].argmax(-1)]
        for _ in range(new_tokens - 1):
            out = model(input_ids=tokens[-1][:, None], cache=cache, use_cache=True)
            tokens.append(out.logits[:, -1].argmax(-1))
        t2 = time.perf_counter()
    return t1 - t0, (t2 - t1) / max(new_tokens - 1, 1), torch.stack(tokens, 1)


def run(threads: int = 2, rounds: int = 2, prompt: int = PROMPT, new_tokens: int = NEW_TOKENS,
        file=sys.stdout) -> list[dict]:
    try:
        import torch
        import transformers
    except ImportError as e:
        print(f"end-to-end benchmark skipped: {e.name} is not installed "
              "(pip install \"fastattn[transformers]\")", file=file)
        return []
    from .. import transformers as fa_transformers
    from .cpuinfo import cpu_line

    torch.set_num_threads(threads)
    name = fa_transformers.register()
    print(f"end-to-end: Llama-shaped model, random weights, {SHAPE['num_hidden_layers']} layers, "
          f"hidden {SHAPE['hidden_size']}, {SHAPE['num_attention_heads']} heads / "
          f"{SHAPE['num_key_value_heads']} KV heads of {SHAPE['head_dim']}; batch 1, prompt "
          f"{prompt}, {new_tokens} greedy tokens; {threads} threads; {cpu_line()}; torch "
          f"{torch.__version__}, transformers {transformers.__version__}", file=file)
    ids = torch.randint(0, SHAPE["vocab_size"], (1, prompt),
                        generator=torch.Generator().manual_seed(0))
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        model = _model(torch, transformers, dtype)
        times: dict[str, list] = {"sdpa": [], name: []}
        tokens = {}
        for r in range(rounds):
            for impl in ((name, "sdpa") if r % 2 else ("sdpa", name)):
                model.set_attn_implementation(impl)
                prefill, decode, tokens[impl] = _run(torch, model, ids, new_tokens)
                times[impl].append((prefill, decode))
        same = int((tokens[name] == tokens["sdpa"]).sum())
        row = {"dtype": str(dtype).removeprefix("torch."), "same_tokens": same,
               "new_tokens": new_tokens}
        for impl, key in (("sdpa", "sdpa"), (name, "fastattn")):
            row[f"{key}_prefill_s"] = statistics.median(t[0] for t in times[impl])
            row[f"{key}_decode_s"] = statistics.median(t[1] for t in times[impl])
        rows.append(row)
        del model
    print(format_table(rows), file=file)
    return rows


def format_table(rows: list[dict]) -> str:
    lines = ["| dtype | prefill sdpa | prefill fastattn | ratio | decode/token sdpa | "
             "decode/token fastattn | ratio | same greedy tokens |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['dtype']} | {r['sdpa_prefill_s'] * 1e3:.0f} ms | "
            f"{r['fastattn_prefill_s'] * 1e3:.0f} ms | "
            f"{r['sdpa_prefill_s'] / r['fastattn_prefill_s']:.2f} | "
            f"{r['sdpa_decode_s'] * 1e3:.1f} ms | {r['fastattn_decode_s'] * 1e3:.1f} ms | "
            f"{r['sdpa_decode_s'] / r['fastattn_decode_s']:.2f} | "
            f"{r['same_tokens']}/{r['new_tokens']} |")
    return "\n".join(lines)


def decode_with_caches(threads: int = 2, context: int = 16384, new_tokens: int = 16,
                       rounds: int = 2) -> list[list[str]] | None:
    """Decode time per token at a long context, float32: sdpa with DynamicCache, fastattn with
    DynamicCache, fastattn with its own cache (appended in place, read as views); rows of the
    KV-cache table, or None without torch and transformers."""
    try:
        import torch
        import transformers
    except ImportError:
        return None
    from .. import transformers as fa_transformers

    torch.set_num_threads(threads)
    name = fa_transformers.register()
    model = _model(torch, transformers, torch.float32)
    model.config.max_position_embeddings = context + new_tokens
    ids = torch.randint(0, SHAPE["vocab_size"], (1, context),
                        generator=torch.Generator().manual_seed(0))
    configs = {"sdpa + DynamicCache": ("sdpa", None), "fastattn + DynamicCache": (name, None),
               "fastattn + FastattnCache": (name, lambda: fa_transformers.FastattnCache(
                   max_cache_len=context + new_tokens))}
    times: dict[str, list[float]] = {c: [] for c in configs}
    for r in range(rounds):
        order = list(configs)
        for c in order[r % 3:] + order[:r % 3]:
            impl, make_cache = configs[c]
            model.set_attn_implementation(impl)
            times[c].append(_run(torch, model, ids, new_tokens,
                                 None if make_cache is None else make_cache())[1])
    per_token = {c: statistics.median(t) for c, t in times.items()}
    best = per_token["fastattn + FastattnCache"]
    targets = {"sdpa + DynamicCache": 2.0, "fastattn + DynamicCache": 1.15}
    rows = []
    for c, t in per_token.items():
        goal = targets.get(c)
        rows.append([c, f"{t * 1e3:.1f} ms", "-" if goal is None else f"{t / best:.2f}",
                     "-" if goal is None else f">={goal:g} "
                     + ("PASS" if t / best >= goal else "FAIL")])
    return rows
