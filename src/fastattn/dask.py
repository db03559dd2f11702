"""Attention over Dask arrays: fastattn's kernel on every chunk, partial results merged exactly.

The graph has one kernel task per (batch block, query block, key block) that can see a key, and
a tree of :func:`~fastattn.merge_attention` tasks per (batch block, query block) that combines the
key blocks' partial outputs through their log-sum-exps. A key block wholly outside the causal or
window band of a query block (or past every ``kv_lengths`` of a batch block) gets no task at all.

This module needs the ``dask`` extra (``pip install "fastattn[dask]"``); ``import fastattn``
never imports it.
"""

from __future__ import annotations

import functools
import itertools
import math

import numpy as np

try:
    import dask.array as da
    from dask.base import tokenize
    from dask.highlevelgraph import HighLevelGraph
except ImportError as e:
    raise ImportError("fastattn.dask needs Dask: pip install 'fastattn[dask]'") from e

from ._api import run
from ._merge import add_sinks, merge_attention
from ._validate import (
    Plan,
    check_dtype,
    compute_dtypes,
    is_bfloat16,
    native_dtype,
    prepare,
    stand_in,
)

__all__ = ["attention"]


def attention(q, k, v, *, mask=None, causal=False, scale=None, enable_gqa=False,
              return_weights=False, num_threads=None, align="top_left", window=None,
              alibi_slopes=None, softcap=None, return_lse=False, kv_lengths=None,
              similarity="dot", sinks=None, backend="auto", split_every=8):
    """:func:`fastattn.attention` over Dask arrays, lazily, with the kernel run on each chunk.

    Takes the arguments of :func:`fastattn.attention`, with the same meaning, and returns Dask
    arrays; nothing is computed until the result is (``.compute()``, ``dask.compute``, or on a
    ``dask.distributed`` cluster once a ``Client`` is open). Chunks of the batch and head axes map
    one to one to chunks of the output; query chunks are independent; each key/value chunk gives a
    partial result that is merged exactly with the others by a tree of
    :func:`fastattn.merge_attention` tasks. Masks, causal (either alignment), windows, ALiBi,
    ``kv_lengths``, GQA and ``return_weights`` all work across chunks.

    Parameters
    ----------
    q, k, v : dask.array.Array or array_like
        As for :func:`fastattn.attention`, any chunking; NumPy inputs are wrapped with
        ``dask.array.asarray``. Chunk sizes must be known. The feature axes (E, Ev) are brought
        to one chunk; v's key axis and k's and v's batch axes are rechunked to match k's keys and
        q's batch chunks. Under GQA a q head chunk that straddles a group of ``Hq // Hkv`` heads
        without being aligned to it is split there, so that each chunk reads one block of kv heads.
    mask : dask.array.Array or array_like, optional
        Broadcastable to ``(..., L, S)``, as for :func:`fastattn.attention`; its axes are
        chunked along with the scores' (size-1 axes stay broadcast).
    alibi_slopes, kv_lengths, sinks : array_like, optional
        Small per-batch arrays, taken as NumPy (a Dask array is computed) and sliced per block.
        The partial results never see ``sinks``: the sink joins each row's merged result once.
    split_every : int, default 8
        Fan-in of the merge tree: how many partial results one merge task combines.
    causal, scale, enable_gqa, return_weights, num_threads, align, window, softcap, return_lse, \
    similarity
        As for :func:`fastattn.attention`. ``num_threads`` is per task: None lets each task use
        what its process allows. ``dask.distributed`` workers set ``OMP_NUM_THREADS=1``, which
        the kernel respects, so one worker thread runs one kernel thread; under dask's local
        threaded scheduler pass ``num_threads=1``, or each of its threads runs a kernel on every
        core.
    backend : {"auto", "cpu"}, default "auto"
        Chunks run on the CPU kernel; GPU chunks are not supported (NotImplementedError).

    Returns
    -------
    out : dask.array.Array, shape (..., L, Ev)
        Chunked as q along the query axis and the batch axes (as k or v where q broadcasts; under
        GQA head chunks maybe split, see above).
    weights : dask.array.Array, shape (..., L, S)
        Only with ``return_weights=True``, chunked as the scores; blocks outside the band are
        zeros made without running the kernel.
    lse : dask.array.Array, shape (..., L)
        Only with ``return_lse=True``. Outputs come as ``(out, weights?, lse?)``. In the compute
        dtype, as :func:`fastattn.attention` returns it: float32 for float16 and bfloat16
        inputs (the partial results are merged in it and never rounded to 16 bits).

    Raises
    ------
    ValueError, TypeError
        As :func:`fastattn.attention` (checked at once, from shapes and dtypes alone), and a
        ValueError for unknown chunk sizes or a bad ``split_every``.
    NotImplementedError
        ``backend="cuda"``, or dask's experimental array query planning turned on
        (``array.query-planning: True``; the graph is built with ``HighLevelGraph``).

    Examples
    --------
    >>> import dask.array as da
    >>> import numpy as np
    >>> import fastattn, fastattn.dask
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((2, 4, 64, 16)) for _ in range(3))
    >>> dq, dk, dv = (da.from_array(x, chunks=(1, 2, 32, 16)) for x in (q, k, v))
    >>> out = fastattn.dask.attention(dq, dk, dv, causal=True)
    >>> out.chunks[:3]
    ((1, 1), (2, 2), (32, 32))
    >>> bool(np.allclose(out.compute(), fastattn.attention(q, k, v, causal=True)))
    True
    """
    if backend == "cuda":
        raise NotImplementedError("fastattn.dask runs its chunks on the CPU kernel; backend='cuda'"
                                  " is not supported over Dask arrays")
    if backend not in ("auto", "cpu"):
        raise ValueError(f"backend must be 'auto' or 'cpu' for Dask arrays, got {backend!r}")
    if isinstance(split_every, bool) or not isinstance(split_every, int) or split_every < 2:
        raise ValueError(f"split_every must be an int >= 2, got {split_every!r}")
    q, k, v = (da.asarray(x) for x in (q, k, v))
    if not hasattr(q, "__dask_layers__"):
        raise NotImplementedError(
            "fastattn.dask builds its graph with HighLevelGraph, which dask's experimental array "
            "query planning does not take; turn it off with "
            "dask.config.set({'array.query-planning': False}) before importing dask.array")
    for name, x in (("q", q), ("k", k), ("v", v), ("mask", mask)):
        if isinstance(x, da.Array) and any(math.isnan(n) for n in x.shape):
            raise ValueError(f"{name} has unknown chunk sizes (shape {x.shape}); call "
                             "compute_chunk_sizes() first")
    opts = dict(causal=causal, scale=scale, enable_gqa=enable_gqa, return_weights=return_weights,
                num_threads=num_threads, align=align, window=window, alibi_slopes=alibi_slopes,
                softcap=softcap, kv_lengths=kv_lengths, similarity=similarity, sinks=sinks)
    plan, dtype, out_dtype = _check(q, k, v, mask, opts)
    blocks = _Blocks.align(q, k, v, mask, plan)
    name = tokenize(q.name, k.name, v.name, blocks.mask_token, dtype, split_every,
                    {key: val for key, val in opts.items() if key not in ("alibi_slopes",
                                                                         "kv_lengths", "sinks")},
                    plan.alibi, plan.kv_lengths, plan.sinks)
    task_opts = dict(causal=plan.causal, scale=plan.scale, enable_gqa=enable_gqa,
                     return_weights=plan.return_weights, num_threads=num_threads,
                     window=window, softcap=softcap, similarity=similarity)
    return _build(blocks, plan, dtype, out_dtype, task_opts, split_every, return_lse, name)


def _check(q, k, v, mask, opts) -> tuple[Plan, np.dtype, np.dtype]:
    """The plan of the whole problem, from stand-ins of the right shapes and dtypes.

    The stand-ins are zero-stride views of one element, already in the compute dtype, so
    ``prepare`` checks everything without computing a chunk or allocating the problem's size.
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_dtype(name, np.empty(0, x.dtype))
    dtype, out_dtype = compute_dtypes(q.dtype, k.dtype, v.dtype)  # native byte order
    mask_stand_in = None
    if mask is not None:
        mdtype = np.asarray(mask).dtype if not hasattr(mask, "dtype") else np.dtype(mask.dtype)
        if (mdtype.kind == "f" and mdtype.itemsize <= 8) or is_bfloat16(mdtype):
            mdtype = dtype  # prepare would cast a float mask to the compute dtype
        # Native order: prepare would convert a byte-swapped stand-in, a copy of the mask's size.
        mdtype = native_dtype(mdtype)
        mask_stand_in = stand_in(np.shape(mask), mdtype)
    plan = prepare(*(stand_in(x.shape, dtype) for x in (q, k, v)), mask=mask_stand_in,
                   return_lse=True, **opts)
    return plan, dtype, out_dtype


def _starts(chunks) -> list[int]:
    return [0, *itertools.accumulate(chunks)]


def _left_pad(x, ndim: int):
    """``x`` with leading size-1 axes up to ``ndim`` (broadcasting's implicit axes, made real)."""
    return x[(None,) * (ndim - x.ndim) + (Ellipsis,)]


def _gqa_head_chunks(chunks, group: int) -> tuple[int, ...]:
    """q's head chunks, each split where it crosses a group boundary without being aligned.

    A chunk inside one group reads one kv head; a chunk whose ends are multiples of ``group``
    reads a whole block of kv heads with the kernel's own GQA indexing. Anything else would need
    kv heads copied, so it is cut into (within a group, aligned, within a group).
    """
    out, start = [], 0
    for n in chunks:
        end = start + n
        if n == 0 or start // group == (end - 1) // group or (start % group == end % group == 0):
            out.append(n)
        else:
            first, last = -(-start // group) * group, end // group * group
            out += [b - a for a, b in zip((start, first, last), (first, last, end)) if b > a]
        start = end
    return tuple(out)


class _Blocks:
    """The operands rechunked so that their blocks line up, and the output's chunks."""

    def __init__(self, q, k, v, mask, batch_chunks, kv_block_of_head, mask_token):
        self.q, self.k, self.v, self.mask = q, k, v, mask
        self.batch_chunks = batch_chunks  # the output's, per batch axis
        self.kv_block_of_head = kv_block_of_head  # GQA: q head block -> kv head block, or None
        self.mask_token = mask_token

    @classmethod
    def align(cls, q, k, v, mask, plan: Plan) -> _Blocks:
        batch = plan.batch
        nb = len(batch)
        q, k, v = (_left_pad(x, nb + 2) for x in (q, k, v))
        if mask is not None and not isinstance(mask, da.Array):
            mask = np.asarray(mask)
        mask = None if mask is None else _left_pad(mask, nb + 2)
        batch_chunks, kv_head_chunks, kv_block_of_head = [], None, None
        for axis, n in enumerate(batch):
            full = [x for x in (q, k, v) if x.shape[axis] == n and n != 1]
            chunks = full[0].chunks[axis] if full else (n,)
            if axis == nb - 1 and plan.kv_group > 1:
                chunks = _gqa_head_chunks(q.chunks[axis], plan.kv_group)
                kv_head_chunks, kv_block_of_head = _kv_heads(chunks, plan.kv_group)
            batch_chunks.append(tuple(chunks))

        def batch_of(x, kv=False):
            return tuple(
                kv_head_chunks if kv and kv_head_chunks is not None and axis == nb - 1
                else (batch_chunks[axis] if x.shape[axis] == n else (x.shape[axis],))
                for axis, n in enumerate(batch))

        keys = k.chunks[-2]
        q = q.rechunk(batch_of(q) + (q.chunks[-2], (plan.E,)))
        k = k.rechunk(batch_of(k, kv=True) + (keys, (plan.E,)))
        v = v.rechunk(batch_of(v, kv=True) + (keys, (plan.Ev,)))
        mask_token = None
        if mask is not None:
            chunks = batch_of(mask) + tuple(
                c if mask.shape[axis] == n else (mask.shape[axis],)
                for axis, n, c in ((-2, plan.L, q.chunks[-2]), (-1, plan.S, keys)))
            if isinstance(mask, da.Array):
                mask = mask.rechunk(chunks)
            else:
                mask = da.from_array(mask, chunks=chunks)
            mask_token = mask.name
        return cls(q, k, v, mask, batch_chunks, kv_block_of_head, mask_token)

    def key(self, x, b: tuple[int, ...], row: int, kv: bool = False) -> tuple:
        """The key of q's, k's or v's block for output batch block ``b`` and block ``row`` of its
        row axis (queries for q, keys for k and v): index 0 along the axes ``x`` broadcasts."""
        index = [0 if x.numblocks[axis] == 1
                 else self.kv_block_of_head[bi] if kv and axis == len(b) - 1
                 and self.kv_block_of_head is not None
                 else bi for axis, bi in enumerate(b)]
        return (x.name, *index, row, 0)

    def mask_key(self, b: tuple[int, ...], i: int, j: int) -> tuple | None:
        m = self.mask
        if m is None:
            return None
        index = [0 if m.numblocks[axis] == 1 else bi for axis, bi in enumerate(b)]
        return (m.name, *index, i if m.numblocks[-2] > 1 else 0, j if m.numblocks[-1] > 1 else 0)


def _kv_heads(q_chunks, group):
    """(kv head chunks, kv head block of each q head block) for q head chunks from
    :func:`_gqa_head_chunks`: the distinct kv ranges they read partition the kv heads."""
    ranges: list[tuple[int, int]] = []
    block_of: list[int] = []
    start = 0
    for n in q_chunks:
        end = start + n
        if n:
            r = (start // group, (end - 1) // group + 1)
            if not ranges or ranges[-1] != r:
                ranges.append(r)
        block_of.append(max(len(ranges) - 1, 0))
        start = end
    return tuple(b - a for a, b in ranges) or (0,), block_of


def _per_block(a: np.ndarray | None, b_ranges) -> np.ndarray | None:
    """The slice of a per-batch array (alibi slopes, kv lengths) for one batch block."""
    if a is None:
        return None
    a = a.reshape((1,) * (len(b_ranges) - a.ndim) + a.shape)
    return a[tuple(slice(None) if a.shape[axis] == 1 else slice(*r)
                   for axis, r in enumerate(b_ranges))]


def _key_blocks_in_band(plan: Plan, l0: int, l1: int, key_starts) -> list[int]:
    """Key blocks that some query in ``[l0, l1)`` may see under the causal/window band.

    Query i sees keys ``i + lo .. i + hi``; over the block that is ``l0 + lo .. l1 - 1 + hi``.
    """
    lo, hi = plan.band()
    first = -math.inf if lo is None else l0 + lo
    last = math.inf if hi is None else l1 - 1 + hi
    return [j for j, (s0, s1) in enumerate(zip(key_starts, key_starts[1:]))
            if s1 > s0 and s1 - 1 >= first and s0 <= last]


def _build(blocks: _Blocks, plan, dtype, out_dtype, task_opts, split_every, return_lse, token):
    names = {part: f"fastattn-{part}-{token}" for part in ("partial", "merge", "sink", "out",
                                                           "weights", "lse")}
    layers: dict[str, dict[tuple, tuple]] = {part: {} for part in names}
    q_starts, k_starts = _starts(blocks.q.chunks[-2]), _starts(blocks.k.chunks[-2])
    b_starts = [_starts(c) for c in blocks.batch_chunks]
    operands = [blocks.q, blocks.k, blocks.v] + ([blocks.mask] if blocks.mask is not None else [])
    partial_fn = functools.partial(_partial, dtype=dtype, opts=task_opts)
    for b in itertools.product(*(range(len(c)) for c in blocks.batch_chunks)):
        b_ranges = [(st[bi], st[bi + 1]) for st, bi in zip(b_starts, b)]
        b_shape = tuple(e - s for s, e in b_ranges)
        alibi = _per_block(plan.alibi, b_ranges)
        lengths = _per_block(plan.kv_lengths, b_ranges)
        sinks = _per_block(plan.sinks, b_ranges)
        longest = None if lengths is None else int(lengths.max(initial=0))
        for i, (l0, l1) in enumerate(zip(q_starts, q_starts[1:])):
            parts = {}
            if math.prod(b_shape) and l1 > l0:
                for j in _key_blocks_in_band(plan, l0, l1, k_starts):
                    s0 = k_starts[j]
                    if longest is not None and longest <= s0:
                        continue  # every key of the block lies past every batch entry's length
                    key = (names["partial"], *b, i, j)
                    layers["partial"][key] = (
                        partial_fn, blocks.key(blocks.q, b, i), blocks.key(blocks.k, b, j, kv=True),
                        blocks.key(blocks.v, b, j, kv=True), blocks.mask_key(b, i, j),
                        alibi, lengths, s0, l0 + plan.offset - s0)
                    parts[j] = key
            root = _merge_tree(layers["merge"], names["merge"], (*b, i), list(parts.values()),
                               split_every, b_shape + (l1 - l0, plan.Ev), dtype)
            if sinks is not None:  # once per row, after the merge: partials must not count it
                sink_key = (names["sink"], *b, i)
                layers["sink"][sink_key] = (_add_sink, root, sinks)
                root = sink_key
            # keys bound to names first: mypy reads x[(a, *b)] as 3.11's x[a, *b]
            out_key = (names["out"], *b, i, 0)
            layers["out"][out_key] = (_first, root, out_dtype)
            if return_lse:
                lse_key = (names["lse"], *b, i)
                layers["lse"][lse_key] = (_last, root, dtype)  # the compute dtype, unrounded
            if plan.return_weights:
                for j, (s0, s1) in enumerate(zip(k_starts, k_starts[1:])):
                    shape = b_shape + (l1 - l0, s1 - s0)
                    weights_key = (names["weights"], *b, i, j)
                    layers["weights"][weights_key] = (
                        (_rescaled_weights, parts[j], root, out_dtype) if j in parts
                        else (functools.partial(np.zeros, shape, out_dtype),))

    graph = _graph(operands, names, layers)
    batch_chunks = tuple(blocks.batch_chunks)
    rows = blocks.q.chunks[-2]

    def array(part, chunks, dtype=out_dtype):
        return da.Array(graph, names[part], chunks, meta=np.empty((0,) * len(chunks), dtype))

    results = [array("out", batch_chunks + (rows, (plan.Ev,)))]
    if plan.return_weights:
        results.append(array("weights", batch_chunks + (rows, blocks.k.chunks[-2])))
    if return_lse:
        results.append(array("lse", batch_chunks + (rows,), dtype))
    return results[0] if len(results) == 1 else tuple(results)


def _merge_tree(layer, name, block, parts, split_every, out_shape, dtype):
    """Adds merge tasks combining ``parts`` (keys of partial results) to ``layer``; returns the
    key of the root. No parts (no key visible): a task making zeros and -inf."""
    if not parts:
        key = (name, *block)
        layer[key] = (functools.partial(_no_keys, out_shape, dtype),)
        return key
    level = 0
    while len(parts) > 1:
        merged = []
        for n, g in enumerate(range(0, len(parts), split_every)):
            group = parts[g:g + split_every]
            if len(group) == 1:
                merged.append(group[0])
                continue
            key = (name, *block, level, n)
            layer[key] = (_merge_parts, *group)
            merged.append(key)
        parts, level = merged, level + 1
    return parts[0]


def _graph(operands, names, layers) -> HighLevelGraph:
    graph = HighLevelGraph.merge(*(x.dask for x in operands))
    all_layers, deps = dict(graph.layers), dict(graph.dependencies)
    inputs = set().union(*(x.__dask_layers__() for x in operands))
    merged = {names["partial"], names["merge"]} | ({names["sink"]} if layers["sink"] else set())
    needs = {"partial": inputs, "merge": {names["partial"]},
             "sink": {names["partial"], names["merge"]},
             "out": merged, "lse": merged, "weights": merged}
    for part, layer in layers.items():
        if not layer and part in ("weights", "lse", "sink"):
            continue  # not asked for
        all_layers[names[part]] = layer
        deps[names[part]] = set(needs[part])
    return HighLevelGraph(all_layers, deps)


# What the tasks run, on the workers.

def _partial(q, k, v, mask, alibi, lengths, s0, offset, *, dtype, opts):
    """(out, weights?, lse) of one query block against one key block, in the compute dtype.

    The inputs are cast first, so float16 partials are kept and merged in float32 and rounded
    once, at the end. ``offset`` is the block's diagonal: the whole problem's, shifted by the
    block's first query and key.
    """
    q, k, v = (np.asarray(x).astype(dtype, copy=False) for x in (q, k, v))
    if lengths is not None:
        lengths = np.clip(lengths - s0, 0, k.shape[-2])
    plan = prepare(q, k, v, mask=mask, alibi_slopes=alibi, kv_lengths=lengths, return_lse=True,
                   diagonal_offset=offset, **opts)
    return run(plan)


def _merge_parts(*parts):
    return merge_attention([p[0] for p in parts], [p[-1] for p in parts])


def _add_sink(result, sinks):
    return add_sinks(result[0], result[-1], sinks)


def _no_keys(out_shape, dtype):
    return np.zeros(out_shape, dtype), np.full(out_shape[:-1], -np.inf, dtype)


def _first(result, dtype):
    return result[0].astype(dtype, copy=False)


def _last(result, dtype):
    return result[-1].astype(dtype, copy=False)


def _rescaled_weights(part, root, dtype):
    """A key block's weights normalised over all keys: its own, times its share of the mass."""
    lse_part, lse = part[-1], root[-1]
    with np.errstate(invalid="ignore"):
        share = np.where(lse_part == -np.inf, 0, np.exp(lse_part - lse))
    return (part[1] * share[..., None]).astype(dtype, copy=False)
