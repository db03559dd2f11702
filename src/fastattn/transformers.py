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
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from . import torch as _torch

__all__ = ["attention_forward", "register"]


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
