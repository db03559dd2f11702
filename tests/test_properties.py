"""Property tests: random problems of every kind against the reference, on every backend."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from layouts import LAYOUTS, in_layout, values
from tolerances import check

pytestmark = pytest.mark.native  # the sanitizer build runs these (.ci/sanitize.sh)

DTYPES = (np.float32, np.float64, np.float16, np.int64, np.int8, np.uint8, np.bool_)
MASK_FORMS = ("0d", "S", "LS", "1S", "L1", "11", "batch", "full")
# Work (batch x L x S x (E + Ev)) per example, so that the suite fits the CI budget.
BUDGET = 1_500_000


@dataclass
class Problem:
    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    kwargs: dict
    desc: str

    def __repr__(self) -> str:
        return self.desc


def _operand_batch(draw, full, gqa, kv_heads=None):
    """A batch shape that broadcasts to ``full``: some axes 1, some leading axes dropped.

    Under grouped-query attention the head axis (-1 here) is q's full count or ``kv_heads``.
    """
    shape = [1 if draw(st.integers(0, 3)) == 0 else n for n in full]
    if gqa:
        shape[-1] = full[-1] if kv_heads is None else kv_heads
    drop = draw(st.integers(0, len(shape) - (1 if gqa else 0)))
    return tuple(shape[drop:])


def _shrink(batch, L, S, E, Ev):
    """Halves the largest of L, S, E, Ev until the example's work is within BUDGET."""
    dims = {"L": L, "S": S, "E": E, "Ev": Ev}
    while math.prod(batch) * dims["L"] * dims["S"] * (dims["E"] + dims["Ev"]) > BUDGET:
        name = max(dims, key=dims.get)
        dims[name] = max(1, dims[name] // 2)
    return dims["L"], dims["S"], dims["E"], dims["Ev"]


def _mask(draw, rng, batch, L, S):
    form = draw(st.sampled_from(MASK_FORMS))
    shape = {"0d": (), "S": (S,), "LS": (L, S), "1S": (1, S), "L1": (L, 1), "11": (1, 1),
             "full": tuple(batch) + (L, S)}.get(form)
    if form == "batch":
        shape = _operand_batch(draw, batch, False) + (draw(st.sampled_from([1, L])),
                                                      draw(st.sampled_from([1, S])))
    if draw(st.booleans()):
        keep = draw(st.sampled_from([0.1, 0.5, 0.9, 1.0]))
        m = rng.random(shape) < keep
    else:
        dtype = draw(st.sampled_from([np.float16, np.float32, np.float64]))
        m = np.asarray(rng.standard_normal(shape) * 2)
        m[rng.random(shape) < draw(st.sampled_from([0.0, 0.3, 0.9]))] = -np.inf
        m = m.astype(dtype)
    layout = draw(st.sampled_from(LAYOUTS))
    return in_layout(m, layout), f"mask {form} {m.dtype} {shape} {layout}"


@st.composite
def problems(draw, max_len=300, decode=False):
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if decode:  # the row kernel: L <= 4 queries without weights, keys split across threads
        L, S = draw(st.integers(1, 5)), draw(st.integers(0, 3000))
    else:
        size = st.one_of(st.integers(0, 6), st.integers(0, 70), st.integers(0, max_len))
        L, S = draw(size), draw(size)
    dim = st.one_of(st.integers(1, 20), st.integers(1, 256))
    E, Ev = draw(dim), draw(dim)

    gqa = draw(st.booleans())
    batch = draw(st.lists(st.integers(1, 3), min_size=1 if gqa else 0, max_size=2 if decode else 3))
    kv_heads = None
    if gqa:
        kv_heads = draw(st.integers(1, 2))
        batch[-1] = kv_heads * draw(st.integers(1, 3))
    if len(batch) > gqa and draw(st.integers(0, 19)) == 0:
        batch[0] = 0  # an empty batch (zero heads under GQA: test_contract.py)
    L, S, E, Ev = _shrink(batch, L, S, E, Ev)

    dtype = draw(st.sampled_from(DTYPES))
    dtypes = [dtype] * 3 if draw(st.booleans()) else [draw(st.sampled_from(DTYPES)) for _ in "qkv"]
    magnitude = draw(st.sampled_from([0.1, 1.0, 3.0]))
    shapes = [_operand_batch(draw, batch, gqa) + (L, E),
              _operand_batch(draw, batch, gqa, kv_heads) + (S, E),
              _operand_batch(draw, batch, gqa, kv_heads) + (S, Ev)]
    layouts = [draw(st.sampled_from(LAYOUTS)) for _ in "qkv"]
    q, k, v = (in_layout(values(rng, s, d, magnitude), lay)
               for s, d, lay in zip(shapes, dtypes, layouts))

    kwargs = dict(enable_gqa=gqa)
    desc = ""
    heads = (lambda b: b[:-1] + tuple(batch[-1:])) if gqa else (lambda b: b)
    real = np.broadcast_shapes(shapes[0][:-2], heads(shapes[1][:-2]), heads(shapes[2][:-2]))
    if draw(st.booleans()):
        kwargs["mask"], desc = _mask(draw, rng, list(real), L, S)
    kwargs["causal"] = draw(st.booleans())
    kwargs["scale"] = draw(st.sampled_from([None, None, 0.0, -0.7, 0.05, 1.0, 2.5]))
    kwargs["return_weights"] = False if decode else draw(st.booleans())
    kwargs["num_threads"] = 2 if decode else draw(st.sampled_from([None, 1, 2, 3]))
    _variants(draw, rng, kwargs, list(real), S)
    names = [np.dtype(d).name for d in dtypes]
    desc = (f"Problem(q {q.shape} {names[0]} {layouts[0]}, k {k.shape} {names[1]} {layouts[1]}, "
            f"v {v.shape} {names[2]} {layouts[2]}, x{magnitude}, {desc}, "
            f"{ {n: a for n, a in kwargs.items() if n != 'mask'} })")
    return Problem(q, k, v, kwargs, desc)


def _variants(draw, rng, kwargs, batch, S):
    """The peers' arguments (test_variants.py tests each alone), drawn together, often default."""
    if draw(st.booleans()):
        kwargs["align"] = draw(st.sampled_from(["top_left", "bottom_right"]))
    if draw(st.integers(0, 2)) == 0:
        side = st.one_of(st.none(), st.integers(0, 5), st.integers(0, 300))
        kwargs["window"] = (draw(side), draw(side))
    if batch and draw(st.integers(0, 3)) == 0:
        shape = draw(st.sampled_from([(batch[-1],), (1,), tuple(batch[-2:])]))
        kwargs["alibi_slopes"] = rng.random(shape) * draw(st.sampled_from([0.01, 0.3, 2.0]))
    if draw(st.integers(0, 3)) == 0:
        kwargs["softcap"] = draw(st.sampled_from([0.3, 5.0, 50.0]))
    if batch and draw(st.integers(0, 3)) == 0:
        shape = draw(st.sampled_from([(batch[-1],), (1,), tuple(batch[-2:])]))
        # from far below the scores (no effect) to far above (every weight near 0)
        kwargs["sinks"] = rng.standard_normal(shape) * draw(st.sampled_from([0.5, 3.0, 30.0]))
    kwargs["return_lse"] = draw(st.booleans())
    if batch and draw(st.integers(0, 3)) == 0:
        n = draw(st.integers(0, len(batch)))
        kwargs["kv_lengths"] = rng.integers(0, S + 1, size=tuple(batch[:n]))
    if draw(st.integers(0, 3)) == 0:
        kwargs["similarity"] = "cosine"


def _check(backend, p: Problem) -> None:
    check(backend, p.q, p.k, p.v, **p.kwargs)


@given(p=problems())
def test_matches_reference(backend, p):
    _check(backend, p)


@given(p=problems(decode=True))
def test_few_queries_many_keys_match_reference(backend, p):
    _check(backend, p)
