"""fastattn as an attention implementation of Hugging Face transformers (5.x).

>>> import fastattn.transformers
>>> name = fastattn.transformers.register()            # doctest: +SKIP
>>> model = AutoModelForCausalLM.from_pretrained(..., attn_implementation=name)  # doctest: +SKIP

transformers calls an attention function by the name in ``config._attn_implementation`` and
builds the model's mask with the mask function registered under the same name. Without a mask
function it passes ``attention_mask=None``, and padding is silently ignored; :func:`register`
therefore registers both. The mask is transformers' own SDPA mask (``masking_utils.sdpa_mask``):
a bool ``(batch, 1, L, S)`` mask where padding, a sliding window or a cache needs one, None where
``is_causal`` alone is exact, so :func:`attention_forward` mirrors
``transformers.integrations.sdpa_attention.sdpa_attention_forward`` decision for decision.

:class:`FastattnCache` is a KV cache that appends in place; :func:`continuous_batching` runs
transformers' continuous batching (``model.generate_batch``) on :func:`fastattn.attention_varlen`.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import numpy as np
import torch
from transformers import AttentionInterface
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from . import torch as _torch

__all__ = ["FastattnCache", "attention_forward", "continuous_batching", "register"]


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                      value: torch.Tensor, attention_mask: torch.Tensor | None,
                      dropout: float = 0.0, scaling: float | None = None,
                      sliding_window: int | None = None, softcap: float | None = None,
                      is_causal: bool | None = None, s_aux: torch.Tensor | None = None,
                      position_bias: torch.Tensor | None = None,
                      **kwargs) -> tuple[torch.Tensor, None]:
    """One attention layer of a transformers model on fastattn's kernel.

    ``query (B, Hq, L, D)``, ``key``/``value (B, Hkv, S, D)`` with ``Hq`` a multiple of ``Hkv``
    (read by grouped-query indexing, never repeated); returns ``(out (B, L, Hq, Dv), None)``.
    ``attention_mask`` is the mask that :func:`transformers.masking_utils.sdpa_mask` built (bool,
    True = attend) or a float mask added to the scores; ``sliding_window`` is already in it (the
    window's alignment depends on the cache, which only the mask knows). ``s_aux`` (gpt-oss) is
    a per-head attention sink (``sinks`` of :func:`fastattn.attention`).
    """
    if dropout:
        raise NotImplementedError(
            f"fastattn has no attention dropout (dropout={dropout}): call model.eval() for "
            "inference, or train with another attn_implementation")
    if kwargs.get("cu_seq_lens_q") is not None and kwargs.get("cu_seq_lens_k") is not None:
        return _packed_forward(module, query, key, value, scaling, sliding_window, softcap,
                               is_causal, s_aux, kwargs)
    q_length = query.shape[2]
    # As sdpa_attention_forward: the module's causality unless the caller says otherwise, and
    # the causal flag only for a prefill without a mask (a decode step sees the whole cache; a
    # mask, when there is one, carries the causal pattern, aligned to the cache).
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    is_causal = bool(q_length > 1 and attention_mask is None and is_causal)
    mask = attention_mask
    if position_bias is not None:  # T5-style learned bias: an additive mask, hidden keys -inf
        if attention_mask is None:
            mask = position_bias
        elif attention_mask.dtype == torch.bool:
            mask = position_bias.masked_fill(~attention_mask, float("-inf"))
        else:
            mask = position_bias + attention_mask
    out = _torch.attention(query, key, value, mask=mask, causal=is_causal, scale=scaling,
                           enable_gqa=query.shape[1] != key.shape[1], softcap=softcap,
                           sinks=s_aux)
    return out.transpose(1, 2).contiguous(), None


def _packed_forward(module, query, key, value, scaling, sliding_window, softcap, is_causal,
                    s_aux, kwargs) -> tuple[torch.Tensor, None]:
    """Continuous batching's call: sequences packed along L of a batch of one, sequence ``i``'s
    queries rows ``cu_seq_lens_q[i]:cu_seq_lens_q[i + 1]`` and its keys (cache and new tokens)
    rows ``cu_seq_lens_k[i]:cu_seq_lens_k[i + 1]``; rows past the last offset are padding.
    Runs :func:`fastattn.attention_varlen` on views of the tensors, causal and windows aligned
    bottom-right per sequence; padding rows of the output are zero."""
    if kwargs.get("block_table") is not None:
        raise NotImplementedError(
            "fastattn does not take transformers' block-table decode path (flash_attn_with_kvcache"
            "'s arguments); run continuous batching with max_blocks_per_request=0")
    if torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)):
        raise NotImplementedError(
            "packed (continuous batching) attention runs for inference only: call it under "
            "torch.no_grad(), as generate_batch does")
    if query.shape[0] != 1:
        raise ValueError(f"packed sequences come as a batch of one; got query {tuple(query.shape)}")
    from ._varlen import attention_varlen

    cu_q, cu_k = (kwargs[name].detach().cpu().numpy().astype(np.int64)
                  for name in ("cu_seq_lens_q", "cu_seq_lens_k"))
    n_q, n_k = int(cu_q[-1]), int(cu_k[-1])
    # (1, H, total, D) -> (total, H, D): views, read by strides
    q, k, v = (_torch._to_numpy(t[0, :, :n].transpose(0, 1))
               for t, n in ((query, n_q), (key, n_k), (value, n_k)))
    # The module's causality: with sdpa's name, transformers passes is_causal=False and a
    # block-diagonal mask that carries it, which the offsets make redundant.
    causal = getattr(module, "is_causal", True)
    # transformers' sliding_window w: a query sees itself and the w - 1 keys before it
    window = None if sliding_window is None else (sliding_window - 1, None)
    sinks = None if s_aux is None else s_aux.detach().float().cpu().numpy()
    out = attention_varlen(q, k, v, cu_q, cu_k, causal=bool(causal), scale=scaling,
                           window=window, softcap=softcap or None, sinks=sinks)
    result = query.new_zeros((1, query.shape[2], query.shape[1], value.shape[-1]))
    result[0, :n_q] = _torch._from_numpy(out)
    return result, None


def register(name: str = "fastattn") -> str:
    """Registers fastattn with transformers under ``name`` and returns ``name``.

    Both the attention function (``AttentionInterface``) and the mask function
    (``AttentionMaskInterface``) are registered class-wide, so every model sees them. Pass the
    name as ``attn_implementation=`` to ``from_pretrained`` / ``from_config``, or to
    ``model.set_attn_implementation``.

    Models run in inference and in training: gradients flow through fastattn's fused backward
    kernel (see :mod:`fastattn.torch`). fastattn has no attention dropout: a model that asks for
    it in training gets a NotImplementedError saying so.

    Examples
    --------
    >>> import fastattn.transformers
    >>> fastattn.transformers.register()
    'fastattn'
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be a non-empty string, got {name!r}")
    # transformers gives names containing these special meanings (paged attention, kernels from
    # the Hub, its own sdpa/flash code paths)
    if any(part in name for part in ("|", "/", "sdpa", "flash", "flex", "eager")):
        raise ValueError(f"name {name!r} would select one of transformers' special code paths; "
                         "choose a plain name such as 'fastattn'")
    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, sdpa_mask)
    return name


@contextlib.contextmanager
def continuous_batching() -> Iterator[str]:
    """Within the block, transformers' continuous batching runs its attention on fastattn.

    ``model.generate_batch`` (and ``model.init_continuous_batching``'s serving manager) packs
    the batch's sequences back to back, reads their keys and values out of its paged cache and
    calls attention with their offsets (``cu_seq_lens_q``, ``cu_seq_lens_k``); fastattn runs that
    call as :func:`fastattn.attention_varlen`: each sequence attends only to itself, without
    padding and without the block-diagonal mask. transformers runs continuous batching only with
    its ``"sdpa"``, ``"paged|eager"`` or flash attention kernels, so inside the block fastattn's
    :func:`attention_forward` is registered under ``"sdpa"`` (in this process, for every model
    that uses ``"sdpa"``; it follows transformers' sdpa decision for decision), and on leaving
    it transformers' own function is restored. Yields the name to give the model, ``"sdpa"``.

    Examples
    --------
    >>> import fastattn.transformers
    >>> with fastattn.transformers.continuous_batching() as name:  # doctest: +SKIP
    ...     model.set_attn_implementation(name)
    ...     outputs = model.generate_batch(prompts, generation_config=config)
    """
    previous = ALL_ATTENTION_FUNCTIONS["sdpa"]
    AttentionInterface.register("sdpa", attention_forward)
    try:
        yield "sdpa"
    finally:
        AttentionInterface.register("sdpa", previous)


class FastattnCacheLayer(CacheLayerMixin):
    """One layer of :class:`FastattnCache`: keys and values in buffers ``(batch, kv_heads,
    capacity, head_dim)`` written in place; ``update`` returns views of the filled part."""

    is_sliding = False
    is_compileable = False
    is_croppable = True

    def __init__(self, max_cache_len: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.max_cache_len = max_cache_len
        self.length = 0
        # The buffers (empty until the first update).
        self._k: torch.Tensor = torch.empty(0)
        self._v: torch.Tensor = torch.empty(0)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self._allocate(key_states, value_states, self.max_cache_len or 256)
        self.is_initialized = True

    def _allocate(self, key_states, value_states, capacity: int) -> None:
        B, H, _, D = key_states.shape
        self._k = key_states.new_empty((B, H, capacity, D))
        self._v = value_states.new_empty((B, H, capacity, value_states.shape[-1]))

    def _grow(self, needed: int) -> None:
        # Without max_cache_len the capacity doubles: each token is copied O(1) times in all,
        # where concatenating every step copies the whole cache each time.
        if self.max_cache_len is not None:
            raise ValueError(f"FastattnCache(max_cache_len={self.max_cache_len}) cannot hold "
                             f"{needed} tokens")
        old_k, old_v = self._k, self._v
        capacity = max(needed, 2 * old_k.shape[2])
        self._allocate(old_k, old_v, capacity)
        self._k[:, :, :self.length] = old_k[:, :, :self.length]
        self._v[:, :, :self.length] = old_v[:, :, :self.length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Writes the new tokens after the cached ones, in place; returns views (no copies) of
        every cached key and value, which fastattn's attention reads by strides."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[-2]
        end = self.length + n
        if end > self._k.shape[2]:
            self._grow(end)
        self._k[:, :, self.length:end] = key_states
        self._v[:, :, self.length:end] = value_states
        self.length = end
        self._expose()
        return self.keys, self.values

    def _expose(self) -> None:
        """keys and values, as transformers reads them: views of the buffers' filled part."""
        self.keys, self.values = self._k[:, :, :self.length], self._v[:, :, :self.length]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1 if self.max_cache_len is None else self.max_cache_len

    def reset(self) -> None:
        self.length = 0
        self.keys = self.values = None
        if self.is_initialized:
            self._expose()

    def crop(self, tokens_to_remove: int) -> None:
        """Keeps the first ``length + tokens_to_remove`` tokens (a negative count), as
        transformers' layers do."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative number of tokens, got {tokens_to_remove}")
        if self.is_initialized and tokens_to_remove:
            self.length = max(0, self.length + tokens_to_remove)
            self._expose()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized:
            self._k = self._k.index_select(0, beam_idx.to(self._k.device))
            self._v = self._v.index_select(0, beam_idx.to(self._v.device))
            self._expose()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self._k, self._v = self._k[indices], self._v[indices]
            self._expose()

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self._k = self._k.repeat_interleave(repeats, dim=0)
            self._v = self._v.repeat_interleave(repeats, dim=0)
            self._expose()


class FastattnCache(Cache):
    """A KV cache for transformers models that preallocates and appends in place.

    transformers' ``DynamicCache`` concatenates each step's keys and values to a new tensor, so
    generating T tokens copies O(T^2) bytes; this cache writes them into buffers (of
    ``max_cache_len`` tokens, or doubling as needed) and hands attention views of the filled
    part, which fastattn's attention reads by strides without a copy. Use it as
    ``model.generate(..., past_key_values=FastattnCache())`` with a model whose
    ``attn_implementation`` is fastattn's (:func:`register`); any attention works with it.

    Examples
    --------
    >>> from fastattn.transformers import FastattnCache
    >>> cache = FastattnCache(max_cache_len=4096)
    >>> cache.get_seq_length()
    0
    """

    def __init__(self, max_cache_len: int | None = None, **kwargs):
        if max_cache_len is not None and (isinstance(max_cache_len, bool)
                                          or not isinstance(max_cache_len, int)
                                          or max_cache_len < 1):
            raise ValueError(f"max_cache_len must be a positive int or None, got "
                             f"{max_cache_len!r}")
        super().__init__(layer_class_to_replicate=functools.partial(
            FastattnCacheLayer, max_cache_len=max_cache_len), **kwargs)
