"""A Hugging Face transformers model generating text with fastattn's attention.

A small Llama-shaped model (random weights, built from its config: nothing is downloaded)
greedily continues a left-padded batch of two prompts, once with transformers' own ``sdpa``
attention and once with fastattn, and the script prints both continuations, whether they agree,
how far the logits are apart, and the time of each.

Run: python examples/transformers_generate.py  (needs: pip install "fastattn[transformers]")
"""

from __future__ import annotations

import sys
import time

try:
    import torch
    import transformers
except ImportError as e:
    print(f"skipped: {e.name} is missing (pip install \"fastattn[transformers]\")")
    sys.exit(0)

import fastattn.transformers

NEW_TOKENS = 24


def main() -> None:
    name = fastattn.transformers.register()  # the attention function and its mask function
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256,
                                      num_hidden_layers=2, num_attention_heads=8,
                                      num_key_value_heads=2, pad_token_id=0)
    model = transformers.LlamaForCausalLM(config).eval()
    ids = torch.randint(1, 512, (2, 16), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    ids[0, :5], mask[0, :5] = 0, 0  # the first prompt is 5 tokens shorter: left padding

    results = {}
    for impl in ("sdpa", name):
        model.set_attn_implementation(impl)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits
            # warm-up: the first generate call of a process sets up much (not attention's time)
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, pad_token_id=0)
            start = time.perf_counter()
            tokens = model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                                    max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                    pad_token_id=0)
            seconds = time.perf_counter() - start
        results[impl] = (logits, tokens[:, ids.shape[1]:], seconds)
        print(f"{impl:>8}: {seconds * 1e3:6.1f} ms for {NEW_TOKENS} tokens; "
              f"continuation of prompt 0: {tokens[0, ids.shape[1]:].tolist()}")

    (ref_logits, ref_tokens, _), (logits, tokens, _) = results["sdpa"], results[name]
    diff = (logits - ref_logits)[mask.bool()].abs().max().item()
    same = torch.equal(tokens, ref_tokens)
    print(f"same greedy tokens as sdpa: {'yes' if same else 'NO'}; "
          f"max logit difference on unpadded positions: {diff:.1e}")
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()
