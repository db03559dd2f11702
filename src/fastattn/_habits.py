"""What fastattn calls the arguments other attention libraries name differently.

A keyword from PyTorch, FlashAttention or xformers passed to a fastattn function raises the
TypeError Python would, with the fastattn name (or why there is none) added; any other unknown
keyword gets the closest parameter names. Nothing is checked when the call binds: the wrapper
only reads the failed call's keywords.
"""

from __future__ import annotations

import difflib
import functools
import inspect
from typing import Any, Callable, TypeVar, cast

F = TypeVar("F", bound=Callable[..., Any])

HABITS = {
    "is_causal": "fastattn calls it causal=True (PyTorch's is_causal)",
    "attn_mask": ("fastattn calls it mask=: bool (True where a query may attend) or float "
                  "(added to the scores), as PyTorch's attn_mask"),
    "attn_bias": "fastattn calls it mask= (a float mask is added to the scores)",
    "key_padding_mask": ("fastattn takes kv_lengths= (the number of valid keys of each batch "
                         "entry) or a mask of shape (B, 1, 1, S)"),
    "dropout_p": ("fastattn has no attention dropout: it computes attention exactly (dropout "
                  "needs the L x S weights the fused kernel never builds); drop it, or apply "
                  "dropout to the output"),
    "softmax_scale": "fastattn calls it scale= (FlashAttention's softmax_scale)",
    "window_size": ("fastattn calls it window=(left, right), with None for an unbounded side "
                    "where FlashAttention takes -1 (window_size=(-1, -1) is window=None)"),
    "need_weights": "fastattn calls it return_weights=True",
    "output_attentions": "fastattn calls it return_weights=True",
    "return_softmax_lse": "fastattn calls it return_lse=True",
    "return_attn_probs": "fastattn calls it return_weights=True",
}
HABITS["dropout"] = HABITS["dropout_p"]


def explains_habits(fn: F) -> F:
    """``fn`` with unknown keywords explained (see the module's docstring)."""
    params = tuple(inspect.signature(fn).parameters)

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except TypeError:
            unknown = [name for name in kwargs if name not in params]
            if not unknown:
                raise
            name = unknown[0]
            hint = HABITS.get(name)
            if hint is None:
                close = difflib.get_close_matches(name, params, n=3)
                hint = f"did you mean {' or '.join(close)}?" if close else (
                    f"it takes {', '.join(params)}")
            raise TypeError(f"{fn.__name__}() got an unexpected keyword argument {name!r}: "
                            f"{hint}") from None

    return cast(F, wrapper)
