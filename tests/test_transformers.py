"""fastattn inside Hugging Face transformers models, against transformers' own attention.

Models are built from their config classes with random weights (no downloads), tiny, so the
file runs in seconds. Each decoder is checked three ways: logits equal to ``eager`` attention on
every unpadded position (float32), greedy ``generate`` on a left-padded batch giving eager's
tokens, and a bfloat16 model within bfloat16's error of float32.
"""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.torch
torch = pytest.importorskip("torch", reason="fastattn.transformers needs torch (fastattn[torch])")
transformers = pytest.importorskip(
    "transformers", reason="fastattn.transformers needs transformers (fastattn[transformers])")

import fastattn.transformers  # noqa: E402

NAME = fastattn.transformers.register()
VOCAB, PAD = 96, 0
# float32 logits of a tiny model: the two attentions round differently, ~1e-7 measured.
LOGITS_ATOL = 1e-4
NEW_TOKENS = 24


def _tiny(cls, **extra):
    base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                max_position_embeddings=128, pad_token_id=PAD)
    return cls(**{**base, **extra})


def _configs():
    t = transformers
    configs = {
        # grouped-query attention: 4 query heads over 2 kv heads
        "llama": lambda: _tiny(t.LlamaConfig),
        # a window of 8 keys under a 20-token prompt: the window cuts in prefill and decode
        "mistral": lambda: _tiny(t.MistralConfig, sliding_window=8),
        # softcapped logits, alternating sliding (8) and global layers, query_pre_attn_scalar
        "gemma2": lambda: _tiny(t.Gemma2Config, sliding_window=8, attn_logit_softcapping=5.0,
                                final_logit_softcapping=30.0, query_pre_attn_scalar=16),
        "qwen2": lambda: _tiny(t.Qwen2Config, num_key_value_heads=1),
    }
    if hasattr(t, "GptOssConfig"):  # attention sinks (s_aux), sliding layers, experts
        configs["gpt_oss"] = lambda: _tiny(t.GptOssConfig, sliding_window=8, num_local_experts=4,
                                           num_experts_per_tok=2, intermediate_size=32)
    return configs


CONFIGS = _configs()
# transformers' sdpa ignores s_aux and refuses softcap: for those models eager is the yardstick.
SDPA_OK = {"llama", "mistral", "qwen2"}


def _model(kind, dtype=torch.float32):
    torch.manual_seed(0)
    config = CONFIGS[kind]()
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def _batch(seed=1, length=20):
    """Two prompts, the first left-padded by 6 (as generate wants for decoder-only models)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (2, length), generator=g)
    mask = torch.ones_like(ids)
    ids[0, :6], mask[0, :6] = PAD, 0
    return ids, mask


def _run(model, impl, ids, mask):
    model.set_attn_implementation(impl)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits.float()


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_logits_equal_eager(kind):
    model = _model(kind)
    ids, mask = _batch()
    want, got = _run(model, "eager", ids, mask), _run(model, NAME, ids, mask)
    keep = mask.bool()
    torch.testing.assert_close(got[keep], want[keep], atol=LOGITS_ATOL, rtol=0)


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_greedy_generate_equals_eager(kind):
    # Left padding, a prefill, then NEW_TOKENS decode steps against the KV cache (bottom-right
    # aligned queries, the window sliding past the prompt for mistral, gemma2 and gpt_oss).
    model = _model(kind)
    ids, mask = _batch(seed=2)
    tokens = {}
    for impl in ("eager", NAME):
        model.set_attn_implementation(impl)
        with torch.no_grad():
            tokens[impl] = model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                                          max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                          pad_token_id=PAD)
    assert tokens[NAME].shape == (2, ids.shape[1] + NEW_TOKENS)
    torch.testing.assert_close(tokens[NAME], tokens["eager"], atol=0, rtol=0)


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_bfloat16_within_bfloat16_error(kind):
    # The bfloat16 model's distance to the float32 model, against the yardstick's distance:
    # fastattn computes in float32 inside, so it errs no more than the yardstick's bfloat16 path.
    ids, mask = _batch(seed=3)
    keep = mask.bool()
    exact = _run(_model(kind), "eager", ids, mask)[keep]
    model = _model(kind, torch.bfloat16)
    yardstick = "sdpa" if kind in SDPA_OK else "eager"
    peer_err = (_run(model, yardstick, ids, mask)[keep] - exact).abs().max().item()
    our_err = (_run(model, NAME, ids, mask)[keep] - exact).abs().max().item()
    assert peer_err > 0
    assert our_err <= 2 * peer_err, f"fastattn {our_err:.3g} against {yardstick} {peer_err:.3g}"


def test_bert_padded_batch_equals_eager():
    # Bidirectional attention, right padding: the case that silently went wrong without the
    # mask function.
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=96,
                                     max_position_embeddings=64, pad_token_id=PAD)
    model = transformers.BertModel(config).eval()
    ids, mask = _batch(seed=4)
    ids, mask = ids.flip(1), mask.flip(1)  # padding on the right
    out = {}
    for impl in ("eager", NAME):
        model.set_attn_implementation(impl)
        with torch.no_grad():
            out[impl] = model(input_ids=ids, attention_mask=mask).last_hidden_state
    keep = mask.bool()
    torch.testing.assert_close(out[NAME][keep], out["eager"][keep], atol=LOGITS_ATOL, rtol=0)


def test_dropout_in_training_is_refused():
    model = _model("llama")
    model.config.attention_dropout = 0.1
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.1
    model.train()
    model.set_attn_implementation(NAME)
    ids, mask = _batch()
    with torch.no_grad(), pytest.raises(NotImplementedError, match="dropout"):
        model(input_ids=ids, attention_mask=mask)


def test_register_returns_the_name_and_refuses_special_names():
    assert fastattn.transformers.register("fastattn_test") == "fastattn_test"
    assert "fastattn_test" in transformers.AttentionInterface._global_mapping
    assert "fastattn_test" in transformers.masking_utils.AttentionMaskInterface._global_mapping
    for bad in ("my_sdpa", "paged|fastattn", "org/kernel"):
        with pytest.raises(ValueError, match="special"):
            fastattn.transformers.register(bad)


def test_gradients_equal_eager():
    # Training through fastattn's backward kernel: every parameter's gradient as eager's.
    grads = {}
    for impl in ("eager", NAME):
        model = _model("llama")
        model.set_attn_implementation(impl)
        ids, mask = _batch()
        out = model(input_ids=ids, attention_mask=mask).logits
        (out * mask[..., None]).square().mean().backward()
        grads[impl] = {n: p.grad.clone() for n, p in model.named_parameters()}
    for name, g in grads["eager"].items():
        torch.testing.assert_close(grads[NAME][name], g, rtol=1e-4, atol=1e-5, msg=name)


def test_model_compiles_with_fullgraph():
    # The attention function and its op trace into one graph with the model (padding mask in).
    model = _model("llama")
    model.set_attn_implementation(NAME)
    ids, mask = _batch()
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        got = compiled(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, want, atol=0, rtol=0)


@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_chunked_prefill_against_the_cache_equals_eager(kind):
    # A prompt fed in two chunks: the second chunk's 9 queries attend to the cache plus
    # themselves (bottom-right aligned through the mask; mistral's window of 8 cuts both).
    model = _model(kind)
    ids, mask = _batch(seed=5)
    logits = {}
    for impl in ("eager", NAME):
        model.set_attn_implementation(impl)
        with torch.no_grad():
            first = model(input_ids=ids[:, :11], attention_mask=mask[:, :11], use_cache=True)
            logits[impl] = model(input_ids=ids[:, 11:], attention_mask=mask,
                                 cache=first.cache, use_cache=True).logits
    torch.testing.assert_close(logits[NAME], logits["eager"], atol=LOGITS_ATOL, rtol=0)


def test_end_to_end_bench_runs():
    # python -m fastattn bench --e2e, on a short prompt: both implementations, both dtypes.
    import io

    from fastattn.bench import e2e

    report = io.StringIO()
    rows = e2e.run(rounds=1, prompt=32, new_tokens=2, file=report)
    assert [r["dtype"] for r in rows] == ["float32", "bfloat16"]
    assert all(r["fastattn_prefill_s"] > 0 and r["sdpa_decode_s"] > 0 for r in rows)
    assert "| float32 |" in report.getvalue()


def _generate_batch(model, prompts):
    config = transformers.GenerationConfig(max_new_tokens=NEW_TOKENS, do_sample=False,
                                           eos_token_id=-1, pad_token_id=PAD)
    # A cache of 8 pages of 16 tokens: sized from free memory, its static tensors take ~20 s
    # to fill on the test machine.
    cb = transformers.ContinuousBatchingConfig(page_size=16, num_blocks=8, max_batch_tokens=64)
    with torch.no_grad():
        out = model.generate_batch(prompts, generation_config=config,
                                   continuous_batching_config=cb, warmup=False)
    return [out[key].generated_tokens for key in sorted(out)]


@pytest.mark.parametrize("kind", sorted(SDPA_OK))
def test_continuous_batching_equals_sdpa(kind, monkeypatch):
    # generate_batch packs three prompts of different lengths back to back (prefill, then
    # decode steps against its paged cache); inside the block every call runs as
    # attention_varlen, and the tokens are sdpa's (mistral's window of 8 cuts the prompts).
    import fastattn._varlen

    model = _model(kind)
    g = torch.Generator().manual_seed(6)
    prompts = [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in (5, 20, 13)]
    model.set_attn_implementation("sdpa")
    want = _generate_batch(model, prompts)
    packed_calls = []
    varlen = fastattn._varlen.attention_varlen

    def counted(*args, **kwargs):
        packed_calls.append(len(args[3]) - 1)  # sequences in the call
        return varlen(*args, **kwargs)

    monkeypatch.setattr(fastattn._varlen, "attention_varlen", counted)
    with fastattn.transformers.continuous_batching() as name:
        model.set_attn_implementation(name)
        got = _generate_batch(model, prompts)
    assert got == want
    assert max(packed_calls) == 3 and len(packed_calls) >= NEW_TOKENS * 2  # 2 layers a step


def test_continuous_batching_restores_sdpa():
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    before = ALL_ATTENTION_FUNCTIONS["sdpa"]
    with pytest.raises(RuntimeError, match="inside"):
        with fastattn.transformers.continuous_batching() as name:
            assert name == "sdpa"
            assert ALL_ATTENTION_FUNCTIONS["sdpa"] is fastattn.transformers.attention_forward
            raise RuntimeError("inside")
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is before


def _packed_reference(q, k, v, cu_q, cu_k, window, scale):
    """fastattn's NumPy reference, sequence by sequence, causal aligned bottom-right."""
    from fastattn import reference

    out = np.zeros((q.shape[2], q.shape[1], v.shape[-1]))
    for i in range(len(cu_q) - 1):
        qs, ks = slice(cu_q[i], cu_q[i + 1]), slice(cu_k[i], cu_k[i + 1])
        got = reference.attention(q[0, :, qs].double().numpy(), k[0, :, ks].double().numpy(),
                                  v[0, :, ks].double().numpy(), causal=True,
                                  align="bottom_right", window=(window - 1, None),
                                  scale=scale, enable_gqa=True)
        out[qs] = got.transpose(1, 0, 2)
    return torch.from_numpy(out)


def test_packed_call_matches_per_sequence_softmax():
    # The call continuous batching makes: a batch of one, 2 query rows of padding past the
    # offsets (left zero), is_causal=False with the module causal, a window of 4.
    g = torch.Generator().manual_seed(7)
    cu_q, cu_k = torch.tensor([0, 3, 4, 9]), torch.tensor([0, 7, 12, 21])
    q = torch.randn(1, 4, 11, 8, generator=g)
    k, v = (torch.randn(1, 2, 21, 8, generator=g) for _ in range(2))
    module = torch.nn.Module()
    module.is_causal = True
    out, weights = fastattn.transformers.attention_forward(
        module, q, k, v, None, scaling=0.5, sliding_window=4, is_causal=False,
        cu_seq_lens_q=cu_q, cu_seq_lens_k=cu_k)
    assert weights is None and out.shape == (1, 11, 4, 8)
    want = _packed_reference(q, k, v, cu_q, cu_k, window=4, scale=0.5)
    torch.testing.assert_close(out[0, :9].double(), want[:9], atol=1e-5, rtol=1e-5)
    assert not out[0, 9:].any()


def test_packed_call_refuses_gradients_and_block_tables():
    cu = torch.tensor([0, 2])
    q, k, v = (torch.randn(1, 2, 2, 8, requires_grad=True) for _ in range(3))
    module = torch.nn.Module()
    with pytest.raises(NotImplementedError, match="inference"):
        fastattn.transformers.attention_forward(module, q, k, v, None, cu_seq_lens_q=cu,
                                                cu_seq_lens_k=cu)
    with torch.no_grad(), pytest.raises(NotImplementedError, match="max_blocks_per_request"):
        fastattn.transformers.attention_forward(module, q, k, v, None, cu_seq_lens_q=cu,
                                                cu_seq_lens_k=cu, block_table=torch.zeros(1, 1))


def test_readme_continuous_batching_example():
    from readme import run_example

    scope = run_example("### Continuous batching: `generate_batch`")
    assert [len(t) for t in scope["tokens"]] == [8, 8, 8]
    model = scope["model"]
    model.set_attn_implementation("sdpa")  # transformers' own, restored on leaving the block
    outputs = model.generate_batch(scope["prompts"], generation_config=scope["generation"],
                                   continuous_batching_config=scope["paging"])
    assert scope["tokens"] == [outputs[r].generated_tokens for r in sorted(outputs)]
