"""The textbook toolkit on top of :func:`fastattn.attention`: the attention layers
(:func:`self_attention`, :func:`multi_head_attention` and the :class:`MultiHeadAttention` layer
object), the sinusoidal :func:`positional_encoding` and :func:`plot_attention` (matplotlib,
imported only when a plot is drawn). Each is also a top-level name of :mod:`fastattn`.
"""

from .attention_layer import MultiHeadAttention
from .layers import multi_head_attention, self_attention
from .plot import plot_attention
from .positional import positional_encoding

__all__ = ["self_attention", "multi_head_attention", "MultiHeadAttention", "positional_encoding",
           "plot_attention"]
