"""The Numba CUDA kernels: FlashAttention-2 forward, and the attention weights when asked for.

Imported only by :mod:`fastattn.backends.cuda`, after it has checked that numba-cuda is installed.

Layout (FlashAttention-2, as Triton's fused-attention tutorial): one thread block per
(query tile, batch entry), one thread per query row. The block walks the key tiles its rows can
see; each key tile (and its value tile) goes through shared memory once and is read by every row
of the block. Each row keeps its running max ``m``, running sum ``l`` and output accumulator in
registers/local memory, in float32 for float16/float32 inputs (float64 for float64 inputs),
rescales them only by ``exp(m_old - m_new)``, and divides by ``l`` once at the end.

Operands arrive as flat 1-D device arrays with element strides and one row of element offsets
per batch entry (``table``), so broadcast batch axes (stride 0), transposed or negative-stride
layouts and grouped-query heads are read in place, never expanded.

Every constant is built in the accumulator dtype (``_Consts``) and every float scalar argument
is passed in it, so the float32 kernel's PTX has no float64 arithmetic
(``tests/cuda_ptx_check.py`` checks).
"""

from __future__ import annotations

import math

import numba
import numpy as np
from numba import cuda

_SIMULATOR = bool(cuda.config.ENABLE_CUDASIM)

# Columns of ``table``: element offsets of q, k, v and mask for a batch entry, and the number of
# keys it may see (``kv_lengths``, else S).
Q_OFF, K_OFF, V_OFF, M_OFF, KV_LEN = range(5)
# ``mask_kind``: no mask, bool (True = the key takes part), additive float.
NO_MASK, BOOL_MASK, FLOAT_MASK = 0, 1, 2
# ``lo``/``hi`` of an unbounded band side: far beyond any index, far from int64 overflow.
NO_BOUND = 1 << 62


class _Tiles:
    """Compile-time tile sizes of one accumulator dtype.

    float32: 64 rows (two warps) share each key tile; 32 keys x 128 columns of K and of V are
    2 x 16 KiB of shared memory, under the 48 KiB a block gets without opting in; the query row
    and the accumulator (128 each) stay in local memory, so head dims up to 128 need one pass.
    float64 halves the key tile and the head-dim chunks to stay within the same budget.
    """

    def __init__(self, dtype, block_m, block_n, dk, dv):
        self.dtype = np.dtype(dtype)
        self.nb_type = numba.from_dtype(self.dtype)
        self.block_m, self.block_n, self.dk, self.dv = block_m, block_n, dk, dv


TILES = {
    np.dtype(np.float32): _Tiles(np.float32, block_m=64, block_n=32, dk=128, dv=128),
    np.dtype(np.float64): _Tiles(np.float64, block_m=64, block_n=16, dk=64, dv=64),
}


def _constants(tiles: _Tiles):
    """The accumulator's type (a cast, also inside the kernel) and its 0, 1 and -inf: every
    constant of the kernel built in it, so the float32 PTX has no float64 arithmetic."""
    acc = tiles.dtype.type  # np.float32 or np.float64
    return acc, acc(0.0), acc(1.0), acc(-np.inf)


def _row_steps(tiles: _Tiles):
    """A row's own steps (its query, the online softmax, its output): device functions."""
    acc, ZERO, ONE, NEG_INF = _constants(tiles)

    @cuda.jit(device=True)
    def load_query(q, qr, qo, i, q_sl, q_se, E, q_resident, cosine, live):
        """This row's query in qr when it fits one chunk; its norm for cosine (else 1)."""
        if q_resident and live:
            for e in range(E):
                qr[e] = acc(q[qo + i * q_sl + e * q_se])
        q_norm = ONE
        if cosine and live:
            qq = ZERO
            for e in range(E):
                x = acc(q[qo + i * q_sl + e * q_se])
                qq += x * x
            q_norm = math.sqrt(qq)
        return q_norm

    @cuda.jit(device=True)
    def online_softmax(s, nk, o, nv, m_i, l_i, m_new):
        """Logits to weights against the new maximum, the sum and the accumulator rescaled by
        exp(m_old - m_new); returns the new (m, l)."""
        alpha = ZERO if m_i == NEG_INF else math.exp(m_i - m_new)
        tile_sum = ZERO
        for jj in range(nk):
            p = math.exp(s[jj] - m_new)
            s[jj] = p
            tile_sum += p
        for d in range(nv):
            o[d] *= alpha
        return m_new, l_i * alpha + tile_sum

    @cuda.jit(device=True)
    def add_values(o, s, sV, nk, nv):
        for d in range(nv):
            # The tile's sum is formed alone, then added: long rows of equal terms err like
            # sqrt(S) eps, not like S eps.
            part = ZERO
            for jj in range(nk):
                part += s[jj] * sV[jj, d]
            o[d] += part

    @cuda.jit(device=True)
    def finish_row(out, lse, o, row, Ev, dv0, nv, m_i, l_i, sink, write_lse):
        """The row's output (and lse) from its accumulator, the sink joining the sum once;
        returns the final (m, l), the sink folded in, which the weights sweep uses."""
        # l == 0: no key took part, the output is 0 (never NaN); a NaN l stays NaN.
        factor = ZERO if l_i == ZERO else ONE / l_i
        if sink != NEG_INF:  # joins the denominator once, after the last key
            m2 = sink if l_i == ZERO or sink > m_i else m_i
            alpha = ZERO if l_i == ZERO else math.exp(m_i - m2)
            l_i = l_i * alpha + math.exp(sink - m2)
            m_i = m2
            factor = alpha / l_i
        for d in range(nv):
            out[row * Ev + dv0 + d] = o[d] * factor
        if write_lse:
            lse[row] = NEG_INF if l_i == ZERO else m_i + math.log(l_i)
        return m_i, l_i

    return load_query, online_softmax, add_values, finish_row


def _tile_steps(tiles: _Tiles):
    """A key tile's steps through shared memory, by every thread of the block: the scores of
    its keys, its values."""
    acc, ZERO, ONE, NEG_INF = _constants(tiles)
    DK = tiles.dk

    @cuda.jit(device=True)
    def tile_scores(q, k, sK, qr, s, kk, qo, ko, i, q_sl, q_se, k_ss, k_se, n0, nk, E, t, rows,
                    live, q_resident, cosine):
        """s[jj] = q_i . k_(n0 + jj) over the tile's keys, K through shared memory by DK-wide
        chunks (q's chunks reloaded with them when it does not fit one); kk: the keys' squared
        norms (cosine only)."""
        for jj in range(nk):
            s[jj] = ZERO
            kk[jj] = ZERO
        for e0 in range(0, E, DK):
            ne = min(DK, E - e0)
            cuda.syncthreads()  # every row is done with the previous chunk of sK
            for idx in range(t, nk * ne, rows):
                jj = idx // ne
                e = idx - jj * ne
                sK[jj, e] = acc(k[ko + (n0 + jj) * k_ss + (e0 + e) * k_se])
            if not q_resident and live:
                for e in range(ne):
                    qr[e] = acc(q[qo + i * q_sl + (e0 + e) * q_se])
            cuda.syncthreads()
            if live:
                for jj in range(nk):
                    dot = s[jj]
                    for e in range(ne):
                        dot += qr[e] * sK[jj, e]
                    s[jj] = dot
                if cosine:  # each row sums the keys' squares itself: no extra barrier
                    for jj in range(nk):
                        sq = kk[jj]
                        for e in range(ne):
                            sq += sK[jj, e] * sK[jj, e]
                        kk[jj] = sq

    @cuda.jit(device=True)
    def load_values(v, sV, vo, n0, nk, nv, dv0, v_ss, v_se, t, rows):
        """The tile's value rows (nv columns from dv0) into shared memory, by every thread."""
        cuda.syncthreads()  # every row is done with the previous sV
        for idx in range(t, nk * nv, rows):
            jj = idx // nv
            d = idx - jj * nv
            sV[jj, d] = acc(v[vo + (n0 + jj) * v_ss + (dv0 + d) * v_se])
        cuda.syncthreads()

    return tile_scores, load_values


def _logit_steps(tiles: _Tiles):
    """A tile's scores as logits (the one masking policy), and as weights for return_weights."""
    acc, ZERO, ONE, NEG_INF = _constants(tiles)

    @cuda.jit(device=True)
    def tile_logits(s, kk, bmask, fmask, i, n0, nk, q_norm, cosine, scale, softcap, lo, hi,
                    kv_len, mask_kind, mo, m_sl, m_ss, slope, offset, m_i):
        """The tile's scores as logits, in the reference's order (cosine, scale, softcap,
        masks, ALiBi; -inf for a key the row does not see); returns the row's new maximum."""
        m_new = m_i
        for jj in range(nk):
            j = n0 + jj
            x = s[jj]
            if cosine:  # a zero row has cosine 0 with anything, as the reference
                norms = q_norm * math.sqrt(kk[jj])
                x = ZERO if norms == ZERO else x / norms
            x = x * scale
            if softcap > ZERO:
                x = softcap * math.tanh(x / softcap)
            seen = j >= i + lo and j <= i + hi and j < kv_len
            if mask_kind == BOOL_MASK:
                seen = seen and bmask[mo + i * m_sl + j * m_ss]
            elif mask_kind == FLOAT_MASK:
                x = x + acc(fmask[mo + i * m_sl + j * m_ss])
            if slope != ZERO:
                x = x - slope * acc(abs(j - (i + offset)))
            if not seen:
                x = NEG_INF
            s[jj] = x
            # A NaN score makes the row NaN, as in the reference: it takes the max.
            if m_new == m_new and (x > m_new or x != x):
                m_new = x
        return m_new

    @cuda.jit(device=True)
    def weights_outside_band(w, row, S, j_begin, j_end, m_i, l_i):
        """The weights sweep, before its tiles: keys outside the tile's band, exp(-inf - m) / l."""
        w_out = ZERO if l_i == ZERO else math.exp(NEG_INF - m_i) / l_i
        for j in range(j_begin):
            w[row * S + j] = w_out
        for j in range(j_end, S):
            w[row * S + j] = w_out

    @cuda.jit(device=True)
    def tile_weights(w, row, S, n0, nk, s, m_i, l_i):
        """The weights sweep: the tile's logits as weights with the row's final (m, l)."""
        for jj in range(nk):
            w[row * S + n0 + jj] = ZERO if l_i == ZERO else math.exp(s[jj] - m_i) / l_i

    return tile_logits, weights_outside_band, tile_weights


def _make_kernel(tiles: _Tiles):
    """The flash kernel accumulating in ``tiles.dtype``, over its steps (device functions, which
    the compiler inlines): one thread per query row, sweeping the key tiles its block sees."""
    acc_t = tiles.nb_type
    BLOCK_N, DK, DV = tiles.block_n, tiles.dk, tiles.dv
    _, ZERO, _, NEG_INF = _constants(tiles)
    load_query, online_softmax, add_values, finish_row = _row_steps(tiles)
    tile_scores, load_values = _tile_steps(tiles)
    tile_logits, weights_outside_band, tile_weights = _logit_steps(tiles)

    @cuda.jit
    def flash(q, k, v, bmask, fmask, out, w, lse, table, alibi, sinks, L, S, E, Ev, q_sl, q_se,
              k_ss, k_se, v_ss, v_se, m_sl, m_ss, mask_kind, lo, hi, offset, scale, softcap,
              cosine, want_w, want_lse):
        sK = cuda.shared.array((BLOCK_N, DK), acc_t)
        sV = cuda.shared.array((BLOCK_N, DV), acc_t)
        qr = cuda.local.array(DK, acc_t)  # this thread's query row (one DK chunk of it)
        o = cuda.local.array(DV, acc_t)  # this thread's output accumulator (one DV chunk)
        s = cuda.local.array(BLOCK_N, acc_t)  # scores, then weights, of the current key tile
        kk = cuda.local.array(BLOCK_N, acc_t)  # squared norms of the tile's keys (cosine only)

        rows = cuda.blockDim.x  # the tile height: a launch may use fewer threads than BLOCK_M
        tiles = (L + rows - 1) // rows
        bh = cuda.blockIdx.x // tiles
        r0 = (cuda.blockIdx.x % tiles) * rows
        t = cuda.threadIdx.x
        i = r0 + t
        live = i < L  # every thread takes part in loads and barriers; only live ones compute
        row = bh * L + i
        qo, ko, vo, mo = table[bh, Q_OFF], table[bh, K_OFF], table[bh, V_OFF], table[bh, M_OFF]
        kv_len = table[bh, KV_LEN]
        # Keys some row of this tile can see: the band of its first and last rows.
        last = min(L, r0 + rows) - 1
        j_begin = max(0, r0 + lo)
        j_end = max(j_begin, min(min(S, kv_len), last + hi + 1))
        q_resident = E <= DK  # else q's chunks are reloaded with K's

        # Sweeps over the keys: one per DV columns of the output (scores recomputed), then,
        # for return_weights, one more that writes the weights with the row's final max and sum.
        passes = max(1, (Ev + DV - 1) // DV)
        m_i = NEG_INF
        l_i = ZERO
        for sweep in range(passes + want_w):
            to_w = sweep == passes
            dv0 = sweep * DV
            nv = 0 if to_w else min(DV, Ev - dv0)
            if not to_w:
                m_i = NEG_INF
                l_i = ZERO
            for d in range(nv):
                o[d] = ZERO
            q_norm = load_query(q, qr, qo, i, q_sl, q_se, E, q_resident, cosine, live)
            if to_w and live:
                weights_outside_band(w, row, S, j_begin, j_end, m_i, l_i)
            for n0 in range(j_begin, j_end, BLOCK_N):
                nk = min(BLOCK_N, j_end - n0)
                tile_scores(q, k, sK, qr, s, kk, qo, ko, i, q_sl, q_se, k_ss, k_se, n0, nk, E, t,
                            rows, live, q_resident, cosine)
                active = False  # this row has a key with a finite or NaN score so far
                if live:
                    m_new = tile_logits(s, kk, bmask, fmask, i, n0, nk, q_norm, cosine, scale,
                                        softcap, lo, hi, kv_len, mask_kind, mo, m_sl, m_ss,
                                        alibi[bh], offset, m_i)
                    if to_w:
                        tile_weights(w, row, S, n0, nk, s, m_i, l_i)
                    # exp(-inf - (-inf)) is NaN: a row that has seen no key yet adds nothing.
                    active = not to_w and m_new != NEG_INF
                    if active:
                        m_i, l_i = online_softmax(s, nk, o, nv, m_i, l_i, m_new)
                if nv > 0:
                    load_values(v, sV, vo, n0, nk, nv, dv0, v_ss, v_se, t, rows)
                if active:
                    add_values(o, s, sV, nk, nv)
            if live and not to_w:
                m_i, l_i = finish_row(out, lse, o, row, Ev, dv0, nv, m_i, l_i, sinks[bh],
                                      want_lse and sweep == passes - 1)

    return flash




KERNELS = {dtype: _make_kernel(tiles) for dtype, tiles in TILES.items()}


def signatures():
    """(name, kernel, numba signature, accumulator type) for each dtype the kernel serves.

    q, k and v of float16, float32 or float64 (float16 accumulates in float32). A bool mask and
    an additive mask are two arguments (the one not in use a dummy), so neither is ever read as
    the other's type; the additive one in the accumulator dtype, as ``prepare`` gives, and for
    float16 inputs also in float16, as a device caller may pass it. ``out`` and the weights are
    written in the inputs' dtype, ``lse`` in the accumulator's (float32 for float16 inputs: a
    16-bit lse is too coarse to rebuild the weights from). ``tests/cuda_ptx_check.py`` compiles
    every one.
    """
    from numba import types

    def arr(t, ndim=1):
        return types.Array(t, ndim, "C")

    i64 = types.int64
    sigs = []
    for dt, acc in (
        (types.float16, types.float32),
        (types.float32, types.float32),
        (types.float64, types.float64),
    ):
        kernel = KERNELS[np.dtype(str(acc))]
        for mt in [acc] + ([types.float16] if dt is types.float16 else []):
            sig = (
                arr(dt),
                arr(dt),
                arr(dt),
                arr(types.boolean),
                arr(mt),
                arr(dt),  # out
                arr(dt),  # weights
                arr(acc),  # lse: in the accumulator dtype (float32 for float16 inputs)
                arr(i64, 2),
                arr(acc),
                arr(acc),
                *[i64] * 16,
                acc,
                acc,
                i64,
                i64,
                i64,
            )
            sigs.append((f"{dt} inputs, {mt} float mask", kernel, sig, acc))
    return sigs
