"""Ragged batches without padding: :func:`attention_varlen` and its backward pass.

Sequences lie back to back in packed ``(total, heads, features)`` arrays, delimited by
cumulative lengths, as FlashAttention's ``flash_attn_varlen_func`` and packed training batches
lay them out. Each sequence runs on the fused kernels through strided views of its own rows
(no padding, no copy of the inputs): the work of sequence ``i`` touches only its rows.
"""

from __future__ import annotations

import numbers

import numpy as np

from ._api import attention, attention_backward
from ._habits import explains_habits
from ._validate import compute_dtypes, native

BACKENDS = ("auto", "cpu", "reference")


def _cu(name: str, cu, total: int) -> np.ndarray:
    """Cumulative lengths checked: integers, starting at 0, non-decreasing, ending at total."""
    cu = np.asarray(cu)
    if cu.dtype.kind not in "iu":
        raise TypeError(f"{name} has dtype {cu.dtype}; it must be an integer array")
    if cu.ndim != 1 or cu.size < 1:
        raise ValueError(f"{name} must be 1-D (batch + 1,); got shape {cu.shape}")
    cu = cu.astype(np.int64)
    if cu[0] != 0 or (np.diff(cu) < 0).any() or cu[-1] != total:
        raise ValueError(f"{name} must start at 0, never decrease and end at the {total} "
                         f"packed tokens; got {cu.tolist() if cu.size <= 8 else cu}")
    return cu


def _max_seqlen(name: str, given, cu: np.ndarray) -> None:
    """FlashAttention sizes its grid by max_seqlen: one below a real length is an error."""
    if given is None:
        return
    if isinstance(given, bool) or not isinstance(given, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {given!r}")
    longest = int(np.diff(cu).max(initial=0))
    if given < longest:
        raise ValueError(f"{name}={given} is below the longest sequence, {longest}")


def _packed(q, k, v):
    q, k, v = (native(np.asarray(a)) for a in (q, k, v))
    for name, a in (("q", q), ("k", k), ("v", v)):
        if a.ndim != 3:
            raise ValueError(f"{name} must be packed (total, heads, features); got shape "
                             f"{a.shape}")
    if k.shape[:2] != v.shape[:2] or k.shape[2] != q.shape[2]:
        raise ValueError(f"q {q.shape}, k {k.shape} and v {v.shape} do not fit: k and v have "
                         "the same tokens and heads, k the features of q")
    return q, k, v


def _checked(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, backend):
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    q, k, v = _packed(q, k, v)
    cu_q, cu_k = _cu("cu_seqlens_q", cu_seqlens_q, q.shape[0]), _cu("cu_seqlens_k",
                                                                     cu_seqlens_k, k.shape[0])
    if cu_q.size != cu_k.size:
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k delimit {cu_q.size - 1} and "
                         f"{cu_k.size - 1} sequences")
    _max_seqlen("max_seqlen_q", max_seqlen_q, cu_q)
    _max_seqlen("max_seqlen_k", max_seqlen_k, cu_k)
    return q, k, v, cu_q, cu_k


def _per_sequence(options: dict, i: int, n: int) -> dict:
    """The options of sequence i: per-sequence alibi_slopes and sinks, (batch, H), picked."""
    picked = dict(options)
    for name in ("alibi_slopes", "sinks"):
        value = options.get(name)
        if value is not None and np.ndim(value) == 2:
            if np.shape(value)[0] != n:
                raise ValueError(f"{name} of shape {np.shape(value)} does not fit {n} "
                                 "sequences: (heads,) or (sequences, heads)")
            picked[name] = np.asarray(value)[i]
    return picked


def _heads_first(x: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Rows lo .. hi - 1 of a packed (total, heads, width) array as (heads, rows, width): a
    view."""
    return x[lo:hi].transpose(1, 0, 2)


@explains_habits
def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, *, max_seqlen_q=None,
                     max_seqlen_k=None, causal=False, scale=None, window=None, alibi_slopes=None,
                     softcap=None, sinks=None, return_lse=False, num_threads=None,
                     backend="auto"):
    """Attention over a ragged batch of sequences packed back to back, without padding.

    The semantics are FlashAttention's ``flash_attn_varlen_func``: sequence ``i``'s queries are
    rows ``cu_seqlens_q[i]`` to ``cu_seqlens_q[i + 1]`` of ``q``, its keys and values the rows
    ``cu_seqlens_k[i]`` to ``cu_seqlens_k[i + 1]`` of ``k`` and ``v``, and each sequence attends
    only to itself; ``causal`` and ``window`` are aligned bottom-right per sequence (its last
    query sees its last key).

    Parameters
    ----------
    q : array_like, shape (total_q, H, E)
    k, v : array_like, shapes (total_k, H_kv, E) and (total_k, H_kv, Ev)
        ``H`` a multiple of ``H_kv`` (grouped-query attention, no copies).
    cu_seqlens_q, cu_seqlens_k : array_like of int, shape (batch + 1,)
        Cumulative lengths: 0, then the end of each sequence; the last is the total.
    max_seqlen_q, max_seqlen_k : int, optional
        Accepted as FlashAttention takes them; when given, checked to be at least the longest
        sequence.
    causal, scale, window, softcap, num_threads
        As for :func:`fastattn.attention`.
    alibi_slopes, sinks : array_like, shape (H,) or (batch, H), optional
        Per head, or per sequence and head.
    return_lse : bool, default False
        Also return the log-sum-exp, shape ``(H, total_q)`` as FlashAttention's
        ``softmax_lse``, in the compute dtype.
    backend : {"auto", "cpu", "reference"}, default "auto"

    Returns
    -------
    out : ndarray, shape (total_q, H, Ev)
    lse : ndarray, shape (H, total_q)
        Only with ``return_lse=True``.

    Examples
    --------
    >>> import numpy as np
    >>> import fastattn
    >>> rng = np.random.default_rng(0)
    >>> lengths = [5, 2, 9]  # three sequences, 16 tokens
    >>> cu = np.concatenate([[0], np.cumsum(lengths)])
    >>> q, k, v = (rng.standard_normal((16, 4, 8), dtype=np.float32) for _ in range(3))
    >>> out = fastattn.attention_varlen(q, k, v, cu, cu, causal=True)
    >>> first = fastattn.attention(*(x[:5].transpose(1, 0, 2) for x in (q, k, v)), causal=True)
    >>> bool(np.allclose(out[:5], first.transpose(1, 0, 2)))
    True
    """
    q, k, v, cu_q, cu_k = _checked(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                   max_seqlen_k, backend)
    options = dict(causal=causal, scale=scale, window=window, alibi_slopes=alibi_slopes,
                   softcap=softcap, sinks=sinks, num_threads=num_threads)
    n = cu_q.size - 1
    dtype, out_dtype = compute_dtypes(q.dtype, k.dtype, v.dtype)  # what attention returns
    out = np.empty((q.shape[0], q.shape[1], v.shape[2]), out_dtype)
    lse = np.empty((q.shape[1], q.shape[0]), dtype) if return_lse else None
    for i in range(n):
        got = attention(_heads_first(q, cu_q[i], cu_q[i + 1]),
                        _heads_first(k, cu_k[i], cu_k[i + 1]),
                        _heads_first(v, cu_k[i], cu_k[i + 1]), enable_gqa=True,
                        align="bottom_right", return_lse=return_lse, backend=backend,
                        **_per_sequence(options, i, n))
        if lse is not None:
            got, lse[:, cu_q[i]:cu_q[i + 1]] = got
        out[cu_q[i]:cu_q[i + 1]] = got.transpose(1, 0, 2)
    return (out, lse) if return_lse else out


@explains_habits
def attention_varlen_backward(q, k, v, out, lse, dout, cu_seqlens_q, cu_seqlens_k, *,
                              max_seqlen_q=None, max_seqlen_k=None, causal=False, scale=None,
                              window=None, alibi_slopes=None, softcap=None, sinks=None,
                              num_threads=None, backend="auto"):
    """Gradients of :func:`attention_varlen` with respect to q, k and v (and sinks).

    ``out`` and ``lse`` are what ``attention_varlen(..., return_lse=True)`` returned for the same
    arguments and options; ``dout`` is the gradient of the loss with respect to ``out``. Each
    sequence runs the fused backward kernel of :func:`fastattn.attention_backward` on its own
    rows.

    Returns
    -------
    dq, dk, dv : ndarray
        Shapes and dtypes of q, k and v (packed).
    dsinks : ndarray
        Only with ``sinks``: their gradient, of their shape, summed over the sequences each
        sink serves.
    """
    q, k, v, cu_q, cu_k = _checked(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                   max_seqlen_k, backend)
    out, dout, lse = (native(np.asarray(a)) for a in (out, dout, lse))
    want = (q.shape[0], q.shape[1], v.shape[2])
    if out.shape != want or dout.shape != want or lse.shape != (q.shape[1], q.shape[0]):
        raise ValueError(f"out {out.shape}, dout {dout.shape} and lse {lse.shape} must be "
                         f"{want}, {want} and {(q.shape[1], q.shape[0])}, as attention_varlen "
                         "returns them")
    options = dict(causal=causal, scale=scale, window=window, alibi_slopes=alibi_slopes,
                   softcap=softcap, sinks=sinks, num_threads=num_threads)
    n = cu_q.size - 1
    grads = None
    for i in range(n):
        qs, ks = slice(cu_q[i], cu_q[i + 1]), slice(cu_k[i], cu_k[i + 1])
        got = attention_backward(
            _heads_first(q, qs.start, qs.stop), _heads_first(k, ks.start, ks.stop),
            _heads_first(v, ks.start, ks.stop), _heads_first(out, qs.start, qs.stop),
            lse[:, qs], _heads_first(dout, qs.start, qs.stop), enable_gqa=True,
            align="bottom_right", backend=backend, **_per_sequence(options, i, n))
        if grads is None:
            grads = [np.zeros(x.shape, g.dtype) for x, g in zip((q, k, v), got[:3])]
            if sinks is not None:
                grads.append(np.zeros(np.shape(sinks), got[3].dtype))
        grads[0][qs] = got[0].transpose(1, 0, 2)
        grads[1][ks] = got[1].transpose(1, 0, 2)
        grads[2][ks] = got[2].transpose(1, 0, 2)
        if sinks is not None:
            if np.ndim(sinks) == 2:
                grads[3][i] += got[3]
            else:
                grads[3] += got[3]
    if grads is None:
        grads = [np.zeros(x.shape, x.dtype) for x in (q, k, v)]
        if sinks is not None:
            grads.append(np.zeros(np.shape(sinks), np.asarray(sinks).dtype))
    return tuple(grads)
