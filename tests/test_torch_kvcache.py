"""fastattn.torch.attention_with_kvcache (a custom operator that writes the cache) and
fastattn.transformers.FastattnCache (a transformers cache appended in place)."""

from __future__ import annotations

import pytest

from readme import run_example

pytestmark = pytest.mark.torch
torch = pytest.importorskip("torch", reason="fastattn.torch needs torch (fastattn[torch])")

import fastattn  # noqa: E402
import fastattn.torch  # noqa: E402


def _case(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    k_cache = torch.randn(2, 2, 64, 16, generator=g).to(dtype)
    v_cache = torch.randn(2, 2, 64, 16, generator=g).to(dtype)
    q = torch.randn(2, 4, 3, 16, generator=g).to(dtype)
    k, v = (torch.randn(2, 2, 3, 16, generator=g).to(dtype) for _ in range(2))
    return q, k_cache, v_cache, k, v


def _numpy(t):
    if t.dtype == torch.bfloat16:
        import ml_dtypes

        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_op_equals_the_numpy_call_and_writes_the_cache(dtype):
    q, k_cache, v_cache, k, v = _case(dtype)
    np_caches = [_numpy(c).copy() for c in (k_cache, v_cache)]
    lengths = torch.tensor([5, 40])
    out, lse = fastattn.torch.attention_with_kvcache(q, k_cache, v_cache, k, v,
                                                     cache_seqlens=lengths, causal=True,
                                                     return_lse=True)
    want, want_lse = fastattn.attention_with_kvcache(
        _numpy(q), *np_caches, _numpy(k), _numpy(v), cache_seqlens=lengths.numpy(), causal=True,
        return_lse=True)
    assert out.dtype == dtype and lse.dtype == (torch.float64 if dtype == torch.float64
                                                else torch.float32)
    assert _numpy(out).tobytes() == want.tobytes() and lse.numpy().tobytes() == want_lse.tobytes()
    for cache, np_cache in zip((k_cache, v_cache), np_caches):
        assert _numpy(cache).tobytes() == np_cache.tobytes()  # the append, in place
    assert (k_cache[1, :, 40:43] == k[1]).all()


def test_paged_and_options_through_the_op():
    q, _, _, k, v = _case()
    pages = torch.randn(10, 2, 16, 16), torch.randn(10, 2, 16, 16)
    table = torch.tensor([[3, 1, 7, 0], [2, 9, 4, 5]], dtype=torch.int32)
    kwargs = dict(cache_seqlens=[10, 30], block_table=table, window=(8, 0), softcap=20.0,
                  alibi_slopes=[0.1, 0.2, 0.3, 0.4], sinks=[0.0, 1.0, -1.0, 0.5], scale=0.3)
    np_pages = [p.numpy().copy() for p in pages]
    out = fastattn.torch.attention_with_kvcache(q, *pages, k, v, **kwargs)
    want = fastattn.attention_with_kvcache(q.numpy(), *np_pages, k.numpy(), v.numpy(),
                                           **{**kwargs, "block_table": table.numpy()})
    assert out.numpy().tobytes() == want.tobytes()
    assert all(p.numpy().tobytes() == n.tobytes() for p, n in zip(pages, np_pages))


def test_the_op_declares_its_writes_and_compiles():
    schema = torch.ops.fastattn.attention_with_kvcache.default._schema
    written = {a.name for a in schema.arguments if a.alias_info and a.alias_info.is_write}
    assert written == {"k_cache", "v_cache"}

    def step(q, k_cache, v_cache, k, v, lengths):
        return fastattn.torch.attention_with_kvcache(q, k_cache, v_cache, k, v,
                                                     cache_seqlens=lengths, causal=True)

    q, k_cache, v_cache, k, v = _case()
    caches = k_cache.clone(), v_cache.clone()
    lengths = torch.tensor([5, 40])
    eager = step(q, k_cache, v_cache, k, v, lengths)
    compiled = torch.compile(step, fullgraph=True)(q, *caches, k, v, lengths)
    assert torch.equal(eager, compiled)
    assert torch.equal(caches[0], k_cache) and torch.equal(caches[1], v_cache)


def test_refusals_of_the_op():
    q, k_cache, v_cache, k, v = _case()
    saved = k_cache.clone()
    with pytest.raises(ValueError, match="capacity"):
        fastattn.torch.attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=[62, 0])
    with pytest.raises(TypeError, match="causal"):
        fastattn.torch.attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=[0, 0],
                                              causal="yes")
    assert torch.equal(k_cache, saved)


transformers = pytest.importorskip(
    "transformers", reason="fastattn.transformers needs transformers (fastattn[transformers])")
from transformers.cache_utils import DynamicCache  # noqa: E402

import fastattn.transformers  # noqa: E402

NAME = fastattn.transformers.register()


def _model(kind):
    torch.manual_seed(0)
    base = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                max_position_embeddings=256, pad_token_id=0)
    config = {"llama": lambda: transformers.LlamaConfig(**base),
              "mistral": lambda: transformers.MistralConfig(**base, sliding_window=8)}[kind]()
    return transformers.AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("kind", ["llama", "mistral"])
@pytest.mark.parametrize("max_cache_len", [None, 128])
def test_generate_with_the_cache_gives_eagers_tokens(kind, max_cache_len):
    model = _model(kind)
    ids = torch.randint(1, 96, (2, 20), generator=torch.Generator().manual_seed(1))
    model.set_attn_implementation("eager")
    want = model.generate(ids, max_new_tokens=40, do_sample=False, cache=DynamicCache())
    model.set_attn_implementation(NAME)
    cache = fastattn.transformers.FastattnCache(max_cache_len=max_cache_len)
    got = model.generate(ids, max_new_tokens=40, do_sample=False, cache=cache)
    assert torch.equal(got, want)
    assert cache.get_seq_length() == 59  # the prompt and all but the last token
    layer = cache.layers[0]
    # attention read views of the buffers, never copies
    assert layer.keys.data_ptr() == layer._k.data_ptr() and layer.keys.shape[2] == 59


def test_the_cache_appends_in_place():
    cache = fastattn.transformers.FastattnCache(max_cache_len=64)
    k = torch.randn(1, 2, 10, 16)
    keys, _ = cache.update(k, k, 0)
    buffer = cache.layers[0]._k.data_ptr()
    for step in range(5):
        new = torch.randn(1, 2, 1, 16)
        keys, values = cache.update(new, new, 0)
        assert keys.data_ptr() == buffer and keys.shape[2] == 11 + step
        assert torch.equal(keys[:, :, -1:], new)
    assert torch.equal(keys[:, :, :10], k)
    with pytest.raises(ValueError, match="cannot hold"):
        cache.update(torch.randn(1, 2, 60, 16), torch.randn(1, 2, 60, 16), 0)
    with pytest.raises(ValueError, match="max_cache_len"):
        fastattn.transformers.FastattnCache(max_cache_len=0)


def test_readme_example_runs():
    # The README's example of this API, as written.
    scope = run_example("### KV caches in PyTorch and transformers")
    assert scope["out"].shape == (2, 8, 1, 64)
    assert torch.equal(scope["k_cache"][0, :, 17], scope["k"][0, :, 0])
    assert scope["cache"].get_seq_length() == 0
