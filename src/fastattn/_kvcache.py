"""Attention over a KV cache: :func:`attention_with_kvcache`.

The cache is the caller's own array, contiguous ``(B_cache, H_kv, S_max, E)`` (any strides) or
paged ``(num_blocks, H_kv, block_size, E)`` with a block table, as FlashAttention's
``flash_attn_with_kvcache`` takes it. New keys and values are written into it in place (an
append costs O(new tokens), whatever the cache holds), then the kernels read the cache where it
lies: through the block table, a page at a time, never through a contiguous copy (16-bit tiles
of a prefill chunk make the packed copy their products need, as for any call).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import numpy as np

from . import _core
from ._habits import explains_habits
from ._validate import (
    band,
    band_within,
    check_dtype,
    checked_mask,
    checked_num_threads,
    checked_scale,
    checked_softcap,
    compute_dtypes,
    native,
    per_batch,
    shapes_of,
    window_bounds,
)

_CACHE_DTYPES = ("float32", "float64", "float16", "bfloat16")
BACKENDS = ("auto", "cpu", "reference")


@dataclass(eq=False)
class _Cache:
    """A checked call: the cache's geometry, and what each sequence sees."""

    k_cache: np.ndarray
    v_cache: np.ndarray
    B: int
    H: int
    H_kv: int
    Lq: int
    E: int
    Ev: int
    capacity: int  # keys a sequence can hold: S_max, or max_blocks * block_size
    seqlens: np.ndarray  # int64 (B,): the cache's lengths before the append
    lengths: np.ndarray  # int64 (B,): keys each sequence's queries see (seqlens + Lnew)
    pages: np.ndarray | None  # int32 (B, max_blocks): the block table; one page each for
    page_size: int  # cache_batch_idx (its pages are whole sequences); None: row b is b


def _cache_array(name: str, cache, writable: bool) -> np.ndarray:
    """The caller's cache array itself: read and written in place, never converted."""
    if not isinstance(cache, np.ndarray):
        raise TypeError(f"{name} must be a NumPy array (written in place), got "
                        f"{type(cache).__name__}")
    if cache.dtype.name not in _CACHE_DTYPES:
        raise TypeError(f"{name} has dtype {cache.dtype}; a cache holds float32, float64, "
                        "float16 or bfloat16")
    if not cache.dtype.isnative:
        raise TypeError(f"{name} has non-native byte order ({cache.dtype.str}): the kernel "
                        "reads the cache in place")
    if cache.ndim != 4:
        raise ValueError(f"{name} must be 4-D (B_cache, H_kv, S_max, E) or, paged, "
                         f"(num_blocks, H_kv, block_size, E); got shape {cache.shape}")
    if not cache.flags.aligned or any(s % cache.itemsize for s in cache.strides):
        raise ValueError(f"{name} is not aligned to its items: the kernel reads it in place")
    if writable and not cache.flags.writeable:
        raise ValueError(f"{name} is read-only, and new k and v are written into it")
    return cache


def _int_array(name: str, a, ndim: int, shape: tuple | None = None) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype.kind not in "iu":
        raise TypeError(f"{name} has dtype {a.dtype}; it must be an integer array")
    if a.ndim != ndim or (shape is not None and a.shape != shape):
        want = f"shape {shape}" if shape is not None else f"{ndim} axes"
        raise ValueError(f"{name} must have {want}; got shape {a.shape}")
    return a


def _seqlens(cache_seqlens, B: int, new: int, capacity: int) -> tuple[np.ndarray, np.ndarray]:
    """(cache_seqlens, the keys each sequence sees) as int64 (B,), checked against capacity."""
    if isinstance(cache_seqlens, (int, np.integer)) and not isinstance(cache_seqlens, bool):
        cache_seqlens = np.full(B, int(cache_seqlens))
    seqlens = _int_array("cache_seqlens", cache_seqlens, 1, (B,))
    if seqlens.size and seqlens.min() < 0:
        raise ValueError(f"cache_seqlens must be >= 0; got {seqlens.min()}")
    seqlens = seqlens.astype(np.int64)
    lengths = seqlens + new
    if lengths.size and lengths.max() > capacity:
        b = int(np.argmax(lengths))
        raise ValueError(f"sequence {b} holds {seqlens[b]} keys and appends {new}: "
                         f"{lengths[b]} exceed the cache's capacity of {capacity}")
    return seqlens, lengths


def _block_table(block_table, B: int, num_blocks: int, block_size: int,
                 lengths: np.ndarray) -> np.ndarray:
    """The block table as C-contiguous int32, every page id a sequence reads checked."""
    table = _int_array("block_table", block_table, 2)
    if table.shape[0] != B:
        raise ValueError(f"block_table has {table.shape[0]} rows for a batch of {B}")
    used = np.arange(table.shape[1]) < -(-lengths[:, None] // block_size)
    bad = used & ((table < 0) | (table >= num_blocks))
    if bad.any():
        b, j = np.argwhere(bad)[0]
        raise ValueError(f"block_table[{b}, {j}] = {table[b, j]} is not a block of the cache "
                         f"(0 .. {num_blocks - 1})")
    return np.ascontiguousarray(np.where(used, table, 0), dtype=np.int32)


def _layout(q, k_cache, v_cache, new: int, cache_seqlens, block_table,
            cache_batch_idx) -> _Cache:
    """The cache's geometry checked against q's: shapes, capacity, pages and indices."""
    B, H, Lq, E = q.shape
    n_cache, H_kv, rows, Ek = k_cache.shape
    shapes = shapes_of(q=q, k_cache=k_cache, v_cache=v_cache)
    if v_cache.shape[:3] != k_cache.shape[:3] or Ek != E:
        raise ValueError(f"q, k_cache and v_cache do not fit: {shapes} (k_cache's last axis is "
                         "q's, v_cache's first three are k_cache's)")
    if H_kv == 0 or H % H_kv:
        raise ValueError(f"the query heads must be a multiple of the cache's heads; {shapes}")
    if block_table is not None:
        if cache_batch_idx is not None:
            raise ValueError("cache_batch_idx is for a contiguous cache; a paged cache's "
                             "sequences are their block_table rows")
        capacity = int(np.shape(block_table)[-1]) * rows if np.ndim(block_table) == 2 else 0
        seqlens, lengths = _seqlens(cache_seqlens, B, new, capacity)
        pages = _block_table(block_table, B, n_cache, rows, lengths)
        page_size = max(rows, 1)  # (0 rows: no key to read, none written)
    else:
        capacity = rows
        seqlens, lengths = _seqlens(cache_seqlens, B, new, capacity)
        pages, page_size = None, 0
        if cache_batch_idx is not None:
            idx = _int_array("cache_batch_idx", cache_batch_idx, 1, (B,))
            if idx.size and (idx.min() < 0 or idx.max() >= n_cache):
                raise ValueError(f"cache_batch_idx must lie in [0, {n_cache}); got values from "
                                 f"{idx.min()} to {idx.max()}")
            pages, page_size = idx.astype(np.int32).reshape(B, 1), max(rows, 1)
        elif n_cache < B:
            raise ValueError(f"the cache holds {n_cache} sequences for a batch of {B}: {shapes}")
    return _Cache(k_cache, v_cache, B, H, H_kv, Lq, E, v_cache.shape[-1], capacity, seqlens,
                  lengths, pages, page_size)


def _slots(cache: _Cache, new: int) -> tuple[np.ndarray, np.ndarray]:
    """(page or cache row, row within it) of every new token, sequence by sequence."""
    pos = cache.seqlens[:, None] + np.arange(new)  # (B, new)
    if cache.pages is None:
        return np.broadcast_to(np.arange(cache.B)[:, None], pos.shape), pos
    size = cache.page_size
    return np.take_along_axis(cache.pages, pos // size, axis=1), pos % size


def _check_slots_distinct(cache: _Cache, slots: tuple[np.ndarray, np.ndarray]) -> None:
    """Two sequences that would write the same cache row (a repeated cache_batch_idx, pages
    shared where they append) are refused: which write wins would be unspecified."""
    page, row = slots
    flat = page.astype(np.int64).ravel() * (cache.page_size or cache.capacity) + row.ravel()
    if np.unique(flat).size != flat.size:
        raise ValueError("two sequences would write the same cache row: cache_batch_idx or "
                         "block_table repeats a place that new k and v are written to")


def _new_tokens(name: str, x, cache: _Cache, width: int, new: int,
                dtype: np.dtype) -> np.ndarray:
    x = native(np.asarray(x))
    check_dtype(name, x)
    if x.shape != (cache.B, cache.H_kv, new, width):
        raise ValueError(f"{name} of shape {x.shape} must be (B, H_kv, L_new, {width}) = "
                         f"({cache.B}, {cache.H_kv}, {new}, {width}), as the cache's and k's")
    return x.astype(dtype, copy=False)


def _append(cache: _Cache, slots: tuple[np.ndarray, np.ndarray], k: np.ndarray,
            v: np.ndarray) -> None:
    """Writes k and v into the cache at their slots (each sequence's length): O(new tokens)."""
    page, row = (x.ravel() for x in slots)
    if page.size == 0:  # no token, or no sequence
        return
    # Advanced indices on axes 0 and 2 put the tokens first: (B * new, H_kv, E).
    cache.k_cache[page, :, row, :] = k.transpose(0, 2, 1, 3).reshape(-1, cache.H_kv, cache.E)
    cache.v_cache[page, :, row, :] = v.transpose(0, 2, 1, 3).reshape(-1, cache.H_kv, cache.Ev)


@dataclass(eq=False)
class _Options:
    """attention's options, checked, per (B, H) entry."""

    causal: bool
    scale: float
    window: tuple[int | None, int | None]
    alibi: np.ndarray | None
    softcap: float | None
    sinks: np.ndarray | None
    mask: np.ndarray | None
    num_threads: int | None
    num_splits: int
    return_lse: bool


def _options(cache: _Cache, dtype: np.dtype, *, causal, scale, window, alibi_slopes, softcap,
             sinks, mask, num_threads, num_splits, return_lse) -> _Options:
    if causal is not True and causal is not False:
        raise TypeError(f"causal must be True or False, got {causal!r}")
    if isinstance(num_splits, bool) or not isinstance(num_splits, numbers.Integral):
        raise TypeError(f"num_splits must be an int >= 0, got {num_splits!r}")
    if num_splits < 0:
        raise ValueError(f"num_splits must be >= 0, got {num_splits}")
    batch = (cache.B, cache.H)
    shapes = f"q {(cache.B, cache.H, cache.Lq, cache.E)}"
    per_entry = {name: None if a is None else per_batch(name, a, batch, "fiub", dtype, shapes)
                 for name, a in (("alibi_slopes", alibi_slopes), ("sinks", sinks))}
    if mask is not None:  # its key axis is the cache's positions
        mask = checked_mask(mask, batch + (cache.Lq, cache.capacity), dtype,
                            f"{shapes} over a cache of {cache.capacity} keys")
    return _Options(bool(causal), checked_scale(scale, cache.E), window_bounds(window),
                    per_entry["alibi_slopes"],
                    None if softcap is None else checked_softcap(softcap), per_entry["sinks"],
                    mask, checked_num_threads(num_threads), int(num_splits), bool(return_lse))


def _run_cpu(cache: _Cache, q: np.ndarray, opt: _Options, dtype: np.dtype):
    """(out, lse or None) from the kernel, reading the cache in place."""
    B, H, Lq, g = cache.B, cache.H, cache.Lq, cache.H // cache.H_kv
    # A decode step's query heads that share a kv head become rows of one entry (the cache's
    # rows are then read once for all of them), where nothing tells the rows apart.
    grouped = (Lq == 1 and g > 1 and opt.window == (None, None) and opt.alibi is None
               and opt.sinks is None and opt.mask is None)
    if grouped:
        q = q.reshape(B, cache.H_kv, g, cache.E)
    batch, L = q.shape[:2], q.shape[2]
    out = np.empty(batch + (L, cache.Ev), dtype)
    lse = np.empty(batch + (L,), dtype) if opt.return_lse else None
    k, v = cache.k_cache, cache.v_cache
    if cache.pages is None:
        k, v = k[:B], v[:B]
    # The band around each query's diagonal, which the entry's shift moves bottom-right.
    # (Grouped, the single query sees every key: causal hides none, and there is no window.)
    lo, hi = band_within((None, None) if grouped else band(opt.window, opt.causal, 0),
                         _core.NO_BOUND)
    problem = _core.Problem(
        q=q, k=k, v=v, out=out, lse=lse, mask=opt.mask, alibi=opt.alibi, sinks=opt.sinks,
        kv_lengths=cache.lengths[:, None], diag_shift=(cache.lengths - L)[:, None],
        block_table=cache.pages, page_size=cache.page_size, band_lo=lo, band_hi=hi,
        scale=opt.scale, softcap=opt.softcap or 0.0, kv_group=1 if grouped else g,
        num_threads=opt.num_threads or 0, num_splits=opt.num_splits)
    _core.attention(problem)
    if grouped:
        out = out.reshape(B, H, Lq, cache.Ev)
        lse = None if lse is None else lse.reshape(B, H, Lq)
    return out, lse


def _gathered(cache_array: np.ndarray, cache: _Cache, b: int) -> np.ndarray:
    """Sequence b's keys (or values) as a contiguous (H_kv, n, width) copy: the reference's."""
    n = int(cache.lengths[b])
    if cache.pages is None:
        return cache_array[b, :, :n]
    pos = np.arange(n)
    return cache_array[cache.pages[b, pos // cache.page_size], :, pos % cache.page_size]\
        .transpose(1, 0, 2)


def _run_reference(cache: _Cache, q: np.ndarray, opt: _Options, dtype: np.dtype):
    """(out, lse or None) by fastattn.reference, one sequence at a time on gathered copies."""
    from . import reference

    out = np.zeros((cache.B, cache.H, cache.Lq, cache.Ev), dtype)
    lse = np.full((cache.B, cache.H, cache.Lq), -np.inf, dtype) if opt.return_lse else None
    every = (cache.B, cache.H)
    alibi, sinks = (None if a is None else np.broadcast_to(a, every) for a in (opt.alibi,
                                                                               opt.sinks))
    for b in range(cache.B):
        n = int(cache.lengths[b])
        got = reference.attention(
            q[b], _gathered(cache.k_cache, cache, b), _gathered(cache.v_cache, cache, b),
            mask=None if opt.mask is None else np.broadcast_to(
                opt.mask, (cache.B, cache.H, cache.Lq, cache.capacity))[b, ..., :n],
            causal=opt.causal, scale=opt.scale, enable_gqa=True, align="bottom_right",
            window=opt.window, alibi_slopes=None if alibi is None else alibi[b],
            softcap=opt.softcap, sinks=None if sinks is None else sinks[b],
            return_lse=opt.return_lse)
        if lse is not None:
            out[b], lse[b] = got
        else:
            out[b] = got
    return out, lse


@explains_habits
def attention_with_kvcache(q, k_cache, v_cache, k=None, v=None, *, cache_seqlens,
                           block_table=None, cache_batch_idx=None, num_splits=0, causal=False,
                           scale=None, window=None, alibi_slopes=None, softcap=None, sinks=None,
                           mask=None, return_lse=False, num_threads=None, backend="auto"):
    """Attention of new queries over a KV cache, appending new keys and values to it in place.

    The semantics are FlashAttention's ``flash_attn_with_kvcache``, with NumPy's axis order
    ``(batch, heads, tokens, features)``. Sequence ``b`` holds ``cache_seqlens[b]`` keys; ``k``
    and ``v`` (if given) are written into the cache after them, and the queries attend to the
    first ``cache_seqlens[b] + L_new`` keys, causal and windows aligned bottom-right (the last
    query's diagonal is the last key). The caller advances ``cache_seqlens`` afterwards.

    Parameters
    ----------
    q : array_like, shape (B, H, L, E)
        Queries; same dtype as the cache.
    k_cache, v_cache : ndarray, shapes (B_cache, H_kv, S_max, E) and (B_cache, H_kv, S_max, Ev)
        The cache, any strides (FlashAttention's ``(B, S, H, E)`` is ``.transpose(0, 2, 1,
        3)`` of it, no copy), float32, float64, float16 or bfloat16, read and written in place.
        With ``block_table``, paged: ``(num_blocks, H_kv, block_size, E)``, any block size.
        ``H`` must be a multiple of ``H_kv`` (grouped-query attention, no copies).
    k, v : array_like, shapes (B, H_kv, L_new, E) and (B, H_kv, L_new, Ev), optional
        New tokens, written into the cache at ``cache_seqlens[b]`` (converted to its dtype).
    cache_seqlens : int or array_like of int, shape (B,)
        Keys in the cache before the append; ``cache_seqlens + L_new`` must fit its capacity.
    block_table : array_like of int, shape (B, max_blocks), optional
        Paged cache: key ``j`` of sequence ``b`` is row ``j % block_size`` of block
        ``block_table[b, j // block_size]``. Every block a sequence uses is checked.
    cache_batch_idx : array_like of int, shape (B,), optional
        Contiguous cache only: sequence ``b`` lives in cache row ``cache_batch_idx[b]``
        (default ``b``). Rows written by the append must be distinct.
    num_splits : int, default 0
        For calls with a few queries (decode): parts each sequence's keys are split into, run
        on different threads and merged exactly. 0 chooses (splits when batch x heads alone
        cannot keep every thread busy); 1 never splits.
    causal, scale, window, alibi_slopes, softcap, sinks, num_threads
        As for :func:`fastattn.attention`, aligned bottom-right per sequence.
    mask : array_like of bool or float, optional
        Broadcastable to ``(B, H, L, capacity)``: its key axis is the cache's positions.
    return_lse : bool, default False
        Also return the log-sum-exp, shape ``(B, H, L)``; ``-inf`` for a row with no key.
    backend : {"auto", "cpu", "reference"}, default "auto"
        ``"reference"`` computes the textbook formula in float64 on gathered copies (for
        checking); it appends as the kernel does.

    Returns
    -------
    out : ndarray, shape (B, H, L, Ev)
        In the cache's dtype (float16 and bfloat16 compute in float32). A query row with no
        key gives zeros.
    lse : ndarray, shape (B, H, L)
        Only with ``return_lse=True``, in the compute dtype.

    Raises
    ------
    ValueError
        Shapes that do not fit (named), lengths past the capacity, negative lengths, block ids
        outside the cache, two sequences writing the same row, a read-only cache. The cache is
        left untouched when the call refuses.
    TypeError
        A cache that is not a NumPy array of a float dtype, or q of another dtype than it.

    Examples
    --------
    >>> import numpy as np
    >>> import fastattn
    >>> rng = np.random.default_rng(0)
    >>> k_cache = np.zeros((2, 2, 64, 16), np.float32)  # 2 sequences, 2 kv heads, 64 tokens
    >>> v_cache = np.zeros_like(k_cache)
    >>> lengths = np.array([10, 3])
    >>> q = rng.standard_normal((2, 4, 1, 16), dtype=np.float32)  # one new token, 4 heads
    >>> k, v = (rng.standard_normal((2, 2, 1, 16), dtype=np.float32) for _ in range(2))
    >>> out = fastattn.attention_with_kvcache(q, k_cache, v_cache, k, v,
    ...                                       cache_seqlens=lengths, causal=True)
    >>> out.shape, bool((k_cache[1, :, 3] == k[1, :, 0]).all())
    ((2, 4, 1, 16), True)
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if (k is None) != (v is None):
        raise ValueError("give both k and v (new tokens to append), or neither")
    writing = k is not None
    k_cache = _cache_array("k_cache", k_cache, writing)
    v_cache = _cache_array("v_cache", v_cache, writing)
    if v_cache.dtype != k_cache.dtype:
        raise TypeError(f"k_cache and v_cache must have one dtype; got {k_cache.dtype} and "
                        f"{v_cache.dtype}")
    q = native(np.asarray(q))
    if q.dtype != k_cache.dtype:
        raise TypeError(f"q has dtype {q.dtype}; it must have the cache's, {k_cache.dtype}")
    if q.ndim != 4:
        raise ValueError(f"q must be (B, H, L, E); got shape {q.shape}")
    new = int(np.shape(k)[2]) if writing and np.ndim(k) == 4 else 0
    cache = _layout(q, k_cache, v_cache, new, cache_seqlens, block_table, cache_batch_idx)
    dtype, out_dtype = compute_dtypes(q.dtype, q.dtype, q.dtype)
    opt = _options(cache, dtype, causal=causal, scale=scale, window=window,
                   alibi_slopes=alibi_slopes, softcap=softcap, sinks=sinks, mask=mask,
                   num_threads=num_threads, num_splits=num_splits, return_lse=return_lse)
    if writing:
        k = _new_tokens("k", k, cache, cache.E, new, k_cache.dtype)
        v = _new_tokens("v", v, cache, cache.Ev, new, k_cache.dtype)
        slots = _slots(cache, new)
        _check_slots_distinct(cache, slots)
        _append(cache, slots, k, v)  # every check passed: only now is the cache written
    run = _run_reference if backend == "reference" else _run_cpu
    out, lse = run(cache, q if q.flags.aligned else q.copy(), opt, dtype)
    if out.dtype != out_dtype:
        out = out.astype(out_dtype)
    return (out, lse) if opt.return_lse else out
