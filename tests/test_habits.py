"""Mistakes a user of other attention libraries makes, each refused with what to write instead:
their argument names, and switches given something other than True or False."""

from __future__ import annotations

import inspect

import numpy as np
import pytest

import fastattn

q = np.ones((1, 2, 4, 8), np.float32)
FUNCTIONS = {
    "attention": lambda **kw: fastattn.attention(q, q, q, **kw),
    "attention_backward": lambda **kw: fastattn.attention_backward(q, q, q, q, q[..., 0], q,
                                                                   **kw),
    "attention_with_kvcache": lambda **kw: fastattn.attention_with_kvcache(
        q[:, :, :1], q, q, cache_seqlens=[4], **kw),
    "attention_varlen": lambda **kw: fastattn.attention_varlen(q[0], q[0], q[0], [0, 2],
                                                                [0, 2], **kw),
}


@pytest.mark.parametrize("function", sorted(FUNCTIONS))
@pytest.mark.parametrize("habit, says", [
    ("is_causal", "causal=True"),
    ("attn_mask", "mask="),
    ("dropout_p", "no attention dropout"),
    ("softmax_scale", "scale="),
    ("window_size", "window=(left, right)"),
])
def test_other_libraries_names_say_fastattns(function, habit, says):
    with pytest.raises(TypeError, match=f"unexpected keyword argument '{habit}': .*"
                       f"{says.replace('(', '.').replace(')', '.')}"):
        FUNCTIONS[function](**{habit: True})


def test_a_misspelt_keyword_gets_the_close_names():
    with pytest.raises(TypeError, match="'casual'.*did you mean causal"):
        fastattn.attention(q, q, q, casual=True)


def test_the_signature_stays_visible():
    # help() and IDEs read the wrapped function's parameters.
    assert "causal" in inspect.signature(fastattn.attention).parameters
    assert fastattn.attention.__doc__.startswith("Scaled dot-product attention")


@pytest.mark.parametrize("flag", ["causal", "enable_gqa", "return_weights", "return_lse"])
@pytest.mark.parametrize("value", ["bottom_right", 0.5, 1, None, "True"])
def test_switches_take_only_true_or_false(flag, value):
    with pytest.raises(TypeError, match=f"{flag} must be True or False, got"):
        fastattn.attention(q, q, q, **{flag: value})


def test_causal_given_an_alignment_says_how_to_align():
    with pytest.raises(TypeError, match="causal=True, align='bottom_right'"):
        fastattn.attention(q, q, q, causal="bottom_right")


def test_numpy_bools_are_switches():
    out = fastattn.attention(q, q, q, causal=np.True_)
    np.testing.assert_array_equal(out, fastattn.attention(q, q, q, causal=True))


def test_torch_users_names_and_switches():
    torch = pytest.importorskip("torch", reason="fastattn.torch needs torch (fastattn[torch])")
    import fastattn.torch

    t = torch.ones(1, 2, 4, 8)
    with pytest.raises(TypeError, match="'is_causal': fastattn calls it causal=True"):
        fastattn.torch.attention(t, t, t, is_causal=True)
    with pytest.raises(TypeError, match="'attn_mask': fastattn calls it mask="):
        fastattn.torch.attention(t, t, t, attn_mask=None)
    for flag in ("causal", "enable_gqa", "return_weights", "return_lse"):
        with pytest.raises(TypeError, match=f"{flag} must be True or False"):
            fastattn.torch.attention(t, t, t, **{flag: "bottom_right"})
