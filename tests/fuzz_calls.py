"""What the differential fuzzer (test_fuzz.py) draws: whole calls of ``fastattn.attention``.

A call is drawn in two stages. First the operands: sizes (0 and 1 included), batch axes that
broadcast, grouped-query heads, dtypes, values from 1e-30 to 1e30 with NaN and inf sprinkled in,
and a memory layout each (tests/layouts.py). Then each keyword argument of ``attention`` from its
own strategy in ``ARGUMENTS``, one entry per argument: a function of the operands' ``Shapes``
returning a strategy of the argument's value, or of ``OMIT`` to leave it at its default. A new
argument of ``attention`` needs one entry there (test_fuzz.py fails until it has one).

Some draws are invalid on purpose (shapes that do not fit, unsupported dtypes, out-of-range
values); the fuzzer then checks that the backend raises what the reference raises.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from hypothesis import strategies as st

from layouts import LAYOUTS, in_layout

OMIT = object()  # an argument left out of the call: its default applies


# --- operands -----------------------------------------------------------------------------

try:  # bfloat16 is ml_dtypes' (test_fuzz.py says so in a skip when it is missing)
    import ml_dtypes
except ImportError:
    ml_dtypes = None
HALF = ("float16",) + ("bfloat16",) * (ml_dtypes is not None)
DTYPES = ("float32", "float64", *HALF, "int64", "int8", "uint8", "bool")
# Drawn twice as often: the kernel's own dtypes (16-bit ones have their own storage paths).
_DRAWN_DTYPES = ("float32", "float32", "float64", *HALF, *HALF, "int64", "int8", "uint8", "bool")
BAD_DTYPES = ("complex64", "object", "U3")  # TypeError naming the dtype
# Entry magnitudes: mostly ordinary, then tiny (products underflow), large logits, huge (scores
# overflow float32; float16 inputs become inf).
MAGNITUDES = (1.0, 1.0, 1.0, 0.1, 30.0, 1e-30, 1e-3, 1e4, 1e30)
# Special entries: what replaces a random subset (one entry, a few, or all) of an operand.
SPECIALS = ("none", "none", "none", "none", "nan", "inf", "-inf", "inf-mix", "extreme")
# Work (batch x L x S x (E + Ev)) per call: the reference's cost, in float64 and longdouble.
BUDGET = 150_000


@dataclass(frozen=True)
class Shapes:
    """The sizes of a drawn call; the argument strategies read them."""

    batch: tuple[int, ...]  # the output's batch shape (query heads last under GQA)
    L: int
    S: int
    E: int
    Ev: int
    gqa: bool  # whether k and v have their own head count (``enable_gqa`` fits the shapes)
    operand_batches: tuple[tuple[int, ...], ...]  # batch shapes of q, k, v (they broadcast)


@dataclass
class Call:
    """One drawn call: ``attention(q, k, v, **kwargs)``, with what is needed to redo it."""

    q: object
    k: object
    v: object
    kwargs: dict
    v_layout: str  # to rebuild v with other values in the same memory layout
    desc: str = field(default="")

    def __repr__(self) -> str:
        return self.desc


def _operand_batch(draw, full, gqa, heads=None):
    """A batch shape that broadcasts to ``full``: some axes 1, some leading axes dropped."""
    shape = [1 if draw(st.integers(0, 3)) == 0 else n for n in full]
    if gqa:
        shape[-1] = full[-1] if heads is None else heads
    drop = draw(st.integers(0, len(shape) - (1 if gqa else 0)))
    return tuple(shape[drop:])


def _shrink(batch, sizes: dict) -> dict:
    """Halves the largest size until the call's work is within BUDGET (0s stay 0)."""
    while math.prod(batch) * sizes["L"] * sizes["S"] * (sizes["E"] + sizes["Ev"]) > BUDGET:
        name = max(sizes, key=sizes.get)
        sizes[name] = max(1, sizes[name] // 2)
    return sizes


@st.composite
def shapes(draw) -> Shapes:
    if draw(st.integers(0, 4)) == 0:  # a few queries, many keys: the row kernel, split keys
        L, S = draw(st.integers(1, 5)), draw(st.integers(0, 3000))
    else:
        size = st.one_of(st.integers(0, 5), st.integers(0, 40), st.integers(0, 300))
        L, S = draw(size), draw(size)
    dim = st.one_of(st.integers(0, 4), st.integers(1, 40), st.integers(1, 260))
    E, Ev = draw(dim), draw(dim)
    gqa = draw(st.integers(0, 2)) == 0
    batch = draw(st.lists(st.integers(1, 3), min_size=1 if gqa else 0, max_size=3))
    kv_heads = None
    if gqa:
        kv_heads = draw(st.integers(1, 2))
        batch[-1] = kv_heads * draw(st.integers(1, 3))
    if batch and _rarely(draw, 15):
        batch[draw(st.integers(0, len(batch) - 1))] = 0  # an empty batch (zero heads: GQA too)
    sizes = _shrink(batch, dict(L=L, S=S, E=E, Ev=Ev))
    qb, kb, vb = (_operand_batch(draw, batch, gqa), _operand_batch(draw, batch, gqa, kv_heads),
                  _operand_batch(draw, batch, gqa, kv_heads))
    # The output's batch shape: the operands' broadcast, k and v counted with q's heads.
    heads = (lambda b: b[:-1] + qb[-1:]) if gqa else (lambda b: b)
    full = np.broadcast_shapes(qb, heads(kb), heads(vb))
    return Shapes(tuple(full), gqa=gqa, operand_batches=(qb, kb, vb), **sizes)


def _broken(draw, shapes_: list[tuple[int, ...]]) -> str:
    """Makes the operand shapes invalid in one way (ValueError naming them); returns how."""
    how = draw(st.sampled_from(["E", "S", "1-D", "batch"]))
    q, k, v = shapes_
    if how == "E":
        shapes_[1] = k[:-1] + (k[-1] + 1,)
    elif how == "S":
        shapes_[2] = v[:-2] + (v[-2] + 1, v[-1])
    elif how == "1-D":
        i = draw(st.integers(0, 2))
        shapes_[i] = shapes_[i][-1:]
    else:
        shapes_[0] = (2,) + q if not q[:-2] else (q[0] + 2,) + q[1:]
        shapes_[1] = (3,) + k if not k[:-2] else (k[0] + 3,) + k[1:]
    return how


def values(rng: np.random.Generator, shape, dtype: str, magnitude: float, special: str):
    """Random entries of ``dtype``, with special entries replacing a random subset."""
    if dtype == "bool":
        return rng.random(shape) < 0.5
    if dtype in ("int64", "int8", "uint8"):
        info = np.iinfo(dtype)
        a = rng.integers(max(info.min, -3), 4, size=shape).astype(dtype)
        if special == "extreme":
            a[rng.random(shape) < 0.3] = info.max
            a[rng.random(shape) < 0.3] = info.min
        return a
    if dtype in BAD_DTYPES:
        return np.zeros(shape, dtype)
    a = rng.standard_normal(shape) * magnitude
    if special != "none" and a.size:
        pick = {0: lambda: np.arange(a.size) == rng.integers(a.size),
                1: lambda: rng.random(a.size) < 0.1,
                2: lambda: np.ones(a.size, bool)}[int(rng.integers(3))]().reshape(shape)
        fill = {"nan": np.nan, "inf": np.inf, "-inf": -np.inf, "extreme": 1e30,
                "inf-mix": np.where(rng.random(shape) < 0.5, np.inf, -np.inf)}[special]
        a = np.where(pick, fill, a)
    with np.errstate(over="ignore"):  # float16: large entries become inf, as a user's would
        return a.astype(_dtype(dtype))


def _dtype(name: str) -> np.dtype:
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


# --- keyword arguments: one strategy each -------------------------------------------------


def _rarely(draw, n: int) -> bool:
    """True about once in ``n`` draws; shrinks to False (a middle value: Hypothesis favours and
    shrinks towards the ends of a range)."""
    return draw(st.integers(0, n - 1)) == n // 2


def _maybe(valid: st.SearchStrategy, invalid: st.SearchStrategy | None = None,
           omit: bool = True) -> st.SearchStrategy:
    """Mostly valid values, sometimes the default (left out), rarely (1 in 60) an invalid one."""
    usual = st.one_of(valid, valid, valid, *[st.just(OMIT)] * omit)
    if invalid is None:
        return usual

    @st.composite
    def draw_one(draw):
        return draw(invalid if _rarely(draw, 60) else usual)

    return draw_one()


@st.composite
def masks(draw, s: Shapes):
    """None, or a bool or additive mask in any form that broadcasts to the scores (or not)."""
    if draw(st.integers(0, 2)) == 0:
        return draw(st.sampled_from([OMIT, None]))
    L, S, batch = s.L, s.S, list(s.batch)
    form = draw(st.sampled_from(["0d", "S", "LS", "1S", "L1", "11", "batch", "full"]))
    form = "bad" if _rarely(draw, 25) else form
    shape = {"0d": (), "S": (S,), "LS": (L, S), "1S": (1, S), "L1": (L, 1), "11": (1, 1),
             "full": tuple(batch) + (L, S)}.get(form)
    if form == "batch":
        shape = _operand_batch(draw, batch, False) + (draw(st.sampled_from([1, L])),
                                                      draw(st.sampled_from([1, S])))
    elif form == "bad":  # does not broadcast to the scores (ValueError)
        shape = draw(st.sampled_from([(L + 1, S), (S + 1,), (4,) + tuple(batch) + (L, S)]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    kind = draw(st.sampled_from(["bool", "bool", *HALF, "float32", "float64"]))
    kind = "int8" if _rarely(draw, 25) else kind
    if kind == "bool":
        m = rng.random(shape) < draw(st.sampled_from([0.0, 0.1, 0.5, 0.9, 1.0]))
    else:
        m = np.asarray(rng.standard_normal(shape) * draw(st.sampled_from([2.0, 2.0, 1e4, 1e30])))
        m[rng.random(shape) < draw(st.sampled_from([0.0, 0.3, 0.9, 1.0]))] = -np.inf
        special = draw(st.sampled_from([None, None, None, np.nan, np.inf, -1e30]))
        if special is not None and m.size:
            m.flat[rng.integers(m.size)] = special
        with np.errstate(over="ignore", invalid="ignore"):
            m = m.astype(_dtype(kind))  # int8: TypeError (a mask is bool or float)
    return in_layout(m, draw(st.sampled_from(LAYOUTS)))


def _per_batch(draw, s: Shapes) -> tuple[int, ...]:
    """A shape for a per-batch-entry argument: the batch axes, some 1, leading ones dropped."""
    if _rarely(draw, 25):
        return draw(st.sampled_from([(2,), (5, 1)]))  # misfits, unless the batch is so
    return _operand_batch(draw, list(s.batch), False) if s.batch else ()


@st.composite
def alibi_slopes(draw, s: Shapes):
    if draw(st.booleans()):
        return draw(st.sampled_from([OMIT, None]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    shape = _per_batch(draw, s)
    slopes = rng.random(shape) * draw(st.sampled_from([0.0, 0.1, 1.0, 30.0]))
    if _rarely(draw, 10):
        slopes = -slopes  # negative slopes reward distance; still a valid float
    dtype = draw(st.sampled_from(["float32", "float64", "float16", "int64"]))
    if ml_dtypes is not None and _rarely(draw, 25):
        dtype = "bfloat16"  # refused today (TypeError), though q, k, v and masks take it
    return slopes.astype(_dtype(dtype))


@st.composite
def sinks(draw, s: Shapes):
    if draw(st.booleans()):
        return draw(st.sampled_from([OMIT, None]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    # from far below the scores (no effect) to far above (every weight near 0)
    values = rng.standard_normal(_per_batch(draw, s)) * draw(st.sampled_from([0.5, 3.0, 30.0]))
    dtype = draw(st.sampled_from(["float32", "float64", "float16", "int64"]))
    return values.astype(_dtype(dtype))


@st.composite
def kv_lengths(draw, s: Shapes):
    if draw(st.booleans()):
        return draw(st.sampled_from([OMIT, None]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    n = len(s.batch)
    shape = s.batch[: draw(st.integers(0, n))] if n else ()
    if _rarely(draw, 25):
        shape = draw(st.sampled_from([(7,), (1, 1, 1, 1, 1)]))  # misfits
    lo, hi = draw(st.sampled_from([(0, s.S), (s.S, s.S), (0, 0), (0, min(s.S, 2))]))
    if _rarely(draw, 25):
        lo, hi = draw(st.sampled_from([(-1, s.S), (0, s.S + 1)]))  # out of range
    lengths = rng.integers(lo, hi + 1, size=shape)
    dtype = "float64" if _rarely(draw, 25) else draw(st.sampled_from(["int64", "int32", "uint16"]))
    return lengths.astype(dtype)


def _window(s: Shapes):
    side = st.one_of(st.none(), st.integers(0, 3), st.integers(0, max(s.L, s.S) + 2))
    return _maybe(st.one_of(st.none(), st.tuples(side, side)),
                  st.sampled_from([(-1, 0), (1.5, None), 3, (1, 2, 3), (True, 1)]))


_SCALES = st.sampled_from([None, 0.0, -0.0, 1e-30, 0.05, -0.7, 1.0, 2.5, 1e4, 1e30, np.nan,
                           np.inf, -np.inf, np.float32(0.25), 2, np.int64(3)])

# The table: one strategy per keyword argument of fastattn.attention, given the call's shapes.
# (``backend`` is not here: the ``backend`` fixture chooses the backend.)
ARGUMENTS: dict[str, Callable[[Shapes], st.SearchStrategy]] = {
    "mask": masks,
    "causal": lambda s: _maybe(st.sampled_from([False, True, np.True_, 0, 1])),
    "scale": lambda s: _maybe(_SCALES, st.sampled_from(["1", 1j, [1.0]])),
    "enable_gqa": lambda s: _maybe(st.sampled_from([s.gqa] * 7 + [not s.gqa]), omit=not s.gqa),
    "return_weights": lambda s: _maybe(st.booleans()),
    "num_threads": lambda s: _maybe(st.sampled_from([None, 1, 2, 3, np.int64(2)]),
                                    st.sampled_from([0, -1, 1.5, "2", True])),
    "align": lambda s: _maybe(st.sampled_from(["top_left", "bottom_right"]),
                              st.sampled_from(["center", None, "TOP_LEFT"])),
    "window": _window,
    "alibi_slopes": alibi_slopes,
    "softcap": lambda s: _maybe(st.sampled_from([None, 0.5, 5.0, 30.0, 1e4]),
                                st.sampled_from([0.0, -1.0, np.inf, np.nan, "1"])),
    "return_lse": lambda s: _maybe(st.booleans()),
    "kv_lengths": kv_lengths,
    "similarity": lambda s: _maybe(st.sampled_from(["dot", "cosine"]),
                                   st.sampled_from(["dott", None])),
    "sinks": sinks,
}


# --- whole calls --------------------------------------------------------------------------


def _describe(a) -> str:
    if isinstance(a, np.ndarray):
        return f"array{a.shape} {a.dtype} strides {a.strides}"
    return repr(a)


@st.composite
def calls(draw) -> Call:
    s = draw(shapes())
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    shapes_ = [s.operand_batches[0] + (s.L, s.E), s.operand_batches[1] + (s.S, s.E),
               s.operand_batches[2] + (s.S, s.Ev)]
    broken = _broken(draw, shapes_) if _rarely(draw, 30) else ""
    dtypes = [draw(st.sampled_from(_DRAWN_DTYPES))] * 3
    if draw(st.integers(0, 3)) == 0:  # mixed dtypes promote; equal ones keep 16-bit storage
        dtypes = [draw(st.sampled_from(_DRAWN_DTYPES)) for _ in "qkv"]
    if _rarely(draw, 25):
        dtypes[draw(st.integers(0, 2))] = draw(st.sampled_from(BAD_DTYPES))
    magnitudes = [draw(st.sampled_from(MAGNITUDES)) for _ in "qkv"]
    specials = [draw(st.sampled_from(SPECIALS)) for _ in "qkv"]
    layouts = [draw(st.sampled_from(LAYOUTS)) if d not in BAD_DTYPES else "C" for d in dtypes]
    q, k, v = (in_layout(values(rng, sh, d, m, sp), lay)
               for sh, d, m, sp, lay in zip(shapes_, dtypes, magnitudes, specials, layouts))
    as_lists = q.size + k.size + v.size <= 200 and _rarely(draw, 20)
    if as_lists:  # array-likes: nested lists are converted as np.asarray does
        q, k, v = q.tolist(), k.tolist(), v.tolist()
    # One call in four is plain: each argument left at its default three times in four, so that
    # the kernels' paths without masks, bands or biases are not drowned by combinations.
    plain = draw(st.integers(0, 3)) == 0
    kwargs = {}
    for name, strategy in ARGUMENTS.items():
        if plain and draw(st.integers(0, 3)) != 0:
            continue
        value = draw(strategy(s))
        if value is not OMIT:
            kwargs[name] = value
    desc = (f"Call(q {shapes_[0]} {dtypes[0]} x{magnitudes[0]:g} {specials[0]} {layouts[0]}, "
            f"k {shapes_[1]} {dtypes[1]} x{magnitudes[1]:g} {specials[1]} {layouts[1]}, "
            f"v {shapes_[2]} {dtypes[2]} x{magnitudes[2]:g} {specials[2]} {layouts[2]}"
            f"{', as lists' if as_lists else ''}{', broken ' + broken if broken else ''}, "
            + ", ".join(f"{n}={_describe(a)}" for n, a in kwargs.items()) + ")")
    return Call(q, k, v, kwargs, v_layout=layouts[2], desc=desc)
