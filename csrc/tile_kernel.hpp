// The fused attention kernel: a tile of BM queries against blocks of BN keys, online softmax,
// the output normalized once at the end. No L x S buffer exists.
//
// Layout: queries run along the SIMD lanes. The scores of a block are kept transposed (S^T: a row
// per key, BM queries wide) and so is the output accumulator (O^T: a row per value column). Then
//  - the softmax's per-query maximum, sum and rescaling are plain vertical vector operations,
//    with no horizontal reduction anywhere;
//  - K and V are read in place through their strides, as the broadcast operand of the micro-GEMM
//    (micro_kernels.hpp): nothing but the tile's own queries is packed, so no per-head copy of K
//    and V exists, whatever their layout, and small problems pay no packing.
// Per thread the scratch is Q^T (E x BM), S^T (BN x BM) and O^T (Ev x BM).
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "kernel_common.hpp"
#include "micro_kernels.hpp"
#include "online_softmax.hpp"
#include "tile_products.hpp"

namespace fastattn {
namespace FASTATTN_ISA_NS {

// In: how q and k are stored: T itself, or bfloat16 where a variant has products for it
// (tile_products.hpp: vdpbf16ps pairs, AMX tiles). The products are the kernel's only
// storage-specific part.
template <class T, class In = T>
struct TileKernel {
  using P = typename ProductsFor<T, In>::type;
  using VIn = typename P::VIn;  // v's element: a value, a key pair, a bfloat16 of V^T
  using M = Micro<T>;
  using S = Simd<T>;
  using V = typename S::V;
  using R = RowOps<T>;
  static constexpr int kLanes = S::kLanes;
  static constexpr int MR = M::MR;
  static constexpr int QP = 2 * kLanes;  // queries per panel: the micro-GEMM's two vectors
  // BM: two panels, 64 float32 queries on AVX-512. More panels would let K and V be re-read from
  // L2 less often, but the S^T block (BN x BM) must stay in L1 beside Q^T and O^T.
  static constexpr int BM = 2 * QP;
  // BN: 16 micro-tiles of keys (128 on AVX-512): long enough that the per-block softmax work
  // (state update, rare rescaling) is a small share, short enough that S^T is 32 KB.
  static constexpr int BN = 16 * MR;
  static constexpr int NV = BM / kLanes;  // vectors in one S^T row
  // Whether a panel holds whole 16-query blocks, for transpose_block16 (AVX2 and AVX-512).
  static constexpr bool kBlocks16 = QP % 16 == 0;

  const Problem& a;
  const int64_t n_kblocks, n_qtiles;

  explicit TileKernel(const Problem& args)
      : a(args), n_kblocks((args.S + BN - 1) / BN), n_qtiles((args.L + BM - 1) / BM) {}

  struct Workspace {
    typename P::Scratch products;  // the products' own buffers: the packed queries, ...
    Buffer<T> st;  // S^T of one key block, then its unnormalized weights P^T: BN x BM
    Buffer<T> ot;  // O^T: ot_rows() x BM
    alignas(64) T m[BM];       // running maximum, -inf before any key
    alignas(64) T mu[BM];      // the maximum subtracted: m, or 0 while m is -inf
    alignas(64) T l[BM];       // running sum of weights
    alignas(64) T alpha[BM];   // rescaling factor of this block
    alignas(64) T colmax[BM];  // maximum score of this block
  };

  // Rows of O^T: Ev, or rounded up where the products write whole blocks.
  int64_t ot_rows() const { return P::ot_rows(a); }

  bool allocate(Workspace& ws) const {
    return P::allocate(*this, ws.products) && ws.st.reserve(int64_t(BM) * BN) &&
           ws.ot.reserve(int64_t(BM) * ot_rows());
  }

  // S^T rows 0 .. nb - 1 for keys j0 .. of this entry's K (q . k * scale), and their column
  // maximum. Keys j0 .. j0 + nb - 1 lie on one page (KeyRows::run_end).
  void scores(Workspace& ws, const KeyRows<In>& K, int64_t j0, int64_t nb) const {
    for (int i = 0; i < BM; ++i) ws.colmax[i] = R::kNegInf;
    P::scores(*this, ws, K, j0, nb);
  }

  // O^T += V^T P^T for keys j0 .. j0 + nb - 1 of this entry's V.
  void accumulate(Workspace& ws, const KeyRows<VIn>& Vs, int64_t j0, int64_t nb) const {
    P::accumulate(*this, ws, Vs, j0, nb);
  }

  // The end of the key block that starts at j0: blocks of BN keys, aligned to BN, cut short at
  // the entry's last key and at the end of a page (a paged problem's blocks are its pages' runs).
  int64_t block_end(const KeyRows<In>& K, int64_t j0, int64_t keys) const {
    return min64(min64((j0 / BN + 1) * BN, keys), K.run_end(j0));
  }

  // For a bool mask that is the same for every query (a key padding mask, (..., 1, S)): whether
  // keys j0 .. j0 + nb - 1 are all out (kNone), all in (kAll), or some of each (kSome). A block
  // with no key in is skipped, one with every key in needs no masking.
  enum class KeysIn { kNone, kAll, kSome };
  KeysIn keys_in(int64_t m_off, int64_t j0, int64_t nb) const {
    if (a.mask_kind != MaskKind::kBool || a.mask.row_stride != 0) return KeysIn::kSome;
    const uint8_t* m = static_cast<const uint8_t*>(a.mask.data) + m_off + j0 * a.mask.col_stride;
    int64_t in = 0;
    for (int64_t j = 0; j < nb; ++j) in += m[j * a.mask.col_stride] != 0;
    return in == 0 ? KeysIn::kNone : in == nb ? KeysIn::kAll : KeysIn::kSome;
  }

  // The transposed view (line_to_logits): the S^T rows of keys j0 .. j0 + nb - 1, queries
  // i0 .. i0 + rows - 1 along each, into logits; softcap first, with user_mask the mask (along
  // a row of S^T it advances by its query stride). Query i0 + t lies i0 + t + offset - key
  // from the key's diagonal and sees it when key - band_hi <= i0 + t <= key - band_lo. Then
  // the column maximum anew.
  void mask_block(Workspace& ws, const EntryParams<T>& ep, int64_t i0, int64_t rows, int64_t j0,
                  int64_t nb, int64_t m_off, bool user_mask) const {
    if (a.softcap > 0) softcap_scores(a, ws.st.ptr, nb * BM);
    for (int64_t j = 0; j < nb; ++j) {
      const int64_t key = j0 + j;
      ScoreLine<T> line;
      line.n = rows;
      line.dist0 = i0 + ep.offset - key;
      if (user_mask) line.mask = mask_at<T>(a, m_off, i0, key, a.mask.row_stride);
      line.seen_lo = min64(max64(key - ep.band_hi - i0, 0), rows);
      line.seen_hi = min64(max64(key - ep.band_lo + 1 - i0, line.seen_lo), rows);
      line_to_logits(a, ep, ws.st.ptr + j * BM, line);
    }
    for (int v = 0; v < NV; ++v) {
      V cm = S::splat(R::kNegInf);
      for (int64_t j = 0; j < nb; ++j) cm = S::max(cm, S::load(ws.st.ptr + j * BM + v * kLanes));
      S::store(ws.colmax + v * kLanes, cm);
    }
  }

  // Whether a block needs mask_block: anything that changes scores, or a band edge in it.
  bool needs_mask(const EntryParams<T>& ep, int64_t i0, int64_t rows, int64_t j0, int64_t nb,
                  bool user_mask) const {
    return user_mask || a.softcap > 0 || a.alibi.data ||
           (a.has_band && band_cuts(ep, i0, i0 + rows - 1, j0, nb));
  }

  // Online softmax over one block: new maximum, rescaled sum and output, then S^T -> P^T.
  void softmax_block(Workspace& ws, int64_t nb, bool first) const {
    bool rescale = false;
    for (int v = 0; v < NV; ++v) {
      const V m_old = S::load(ws.m + v * kLanes);
      const V cm = S::load(ws.colmax + v * kLanes);
      const V m_new = m_old > cm ? m_old : cm;
      const V m_use = subtracted_max<T>(m_new);
      const V alpha = exp_minus<T>(m_old, m_use);
      S::store(ws.m + v * kLanes, m_new);
      S::store(ws.mu + v * kLanes, m_use);
      S::store(ws.alpha + v * kLanes, alpha);
      S::store(ws.l + v * kLanes, S::load(ws.l + v * kLanes) * alpha);
    }
    if (!first)  // O^T is still zero after no block
      for (int i = 0; i < BM && !rescale; ++i) rescale = !(ws.alpha[i] == T(1));
    if (rescale)
      for (int64_t c = 0; c < a.Ev; ++c)
        for (int v = 0; v < NV; ++v) {
          T* o = ws.ot.ptr + c * BM + v * kLanes;
          S::store(o, S::load(o) * S::load(ws.alpha + v * kLanes));
        }
    // A key row at a time across the NV vectors of queries: NV independent sums, so the adds
    // do not wait on each other (one vector's sum over the keys took an add's latency per key).
    // Each lane still sums its keys in order.
    V mu[NV], sum[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      mu[v] = S::load(ws.mu + v * kLanes);
      sum[v] = S::splat(T(0));
    }
    for (int64_t j = 0; j < nb; ++j) {
      T* s = ws.st.ptr + j * BM;
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) {
        const V p = exp_minus<T>(S::load(s + v * kLanes), mu[v]);
        S::store(s + v * kLanes, p);
        sum[v] += p;
      }
    }
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v)
      S::store(ws.l + v * kLanes, S::load(ws.l + v * kLanes) + sum[v]);
  }

  void tile(Workspace& ws, int64_t b, int64_t qtile) const {
    const int64_t i0 = qtile * BM;
    const int64_t rows = min64(BM, a.L - i0);
    const KeyRows<In> K = key_rows<In>(a, a.k, b);
    const KeyRows<VIn> Vs = key_rows<VIn>(a, a.v, b);
    const int64_t m_off = a.mask_kind != MaskKind::kNone ? batch_offset(a, a.mask, b, 1) : 0;

    // Key blocks this tile needs: those with a key inside some row's band and kv_lengths.
    const EntryParams<T> ep = entry_params<T>(a, b);
    int64_t k_first, k_last;
    key_range(ep, i0, i0 + rows - 1, k_first, k_last);
    const int64_t kb_begin = k_first / BN;
    const int64_t kb_end = k_last > k_first ? (k_last - 1) / BN + 1 : kb_begin;

    pack_queries(ws, b, i0, rows);
    for (int i = 0; i < BM; ++i) {
      ws.m[i] = R::kNegInf;
      ws.mu[i] = T(0);
      ws.l[i] = T(0);
    }
    std::memset(ws.ot.ptr, 0, sizeof(T) * size_t(BM * ot_rows()));

    bool first = true;
    for (int64_t j0 = kb_begin * BN, j1; j0 < kb_end * BN && j0 < ep.keys; j0 = j1) {
      if (stop_requested(a)) return;  // the call raises: what is written does not matter
      j1 = block_end(K, j0, ep.keys);
      const int64_t nb = j1 - j0;
      const KeysIn in = keys_in(m_off, j0, nb);
      if (in == KeysIn::kNone) continue;
      scores(ws, K, j0, nb);
      const bool user_mask = a.mask_kind != MaskKind::kNone && in == KeysIn::kSome;
      if (needs_mask(ep, i0, rows, j0, nb, user_mask))
        mask_block(ws, ep, i0, rows, j0, nb, m_off, user_mask);
      softmax_block(ws, nb, first);
      accumulate(ws, Vs, j0, nb);
      first = false;
    }
    finish(ws, ep, b, i0, rows, kb_begin, kb_end, K, m_off);
  }

  // The tile's queries, packed as the scores product reads them (the scale is applied to the
  // products: see online_softmax.hpp). Padding is zero.
  void pack_queries(Workspace& ws, int64_t b, int64_t i0, int64_t rows) const {
    const In* Q = static_cast<const In*>(a.q.data) + batch_offset(a, a.q, b, 1);
    P::pack_queries(*this, ws, Q, i0, rows);
  }

  void finish(Workspace& ws, const EntryParams<T>& ep, int64_t b, int64_t i0, int64_t rows,
              int64_t kb_begin, int64_t kb_end, const KeyRows<In>& K, int64_t m_off) const {
    const int64_t Ev = a.Ev;
    // Normalize once. A query with no key (l == 0) gives zeros; a NaN sum stays NaN.
    T* out = static_cast<T*>(const_cast<void*>(a.out.data)) + batch_offset(a, a.out, b, 1);
    alignas(64) T inv[BM];
    for (int64_t i = 0; i < rows; ++i) {
      // The sink updates the row's final (mu, l) in place, so write_weights sees it too.
      inv[i] = fold_sink(ep.sink, ws.mu[i], ws.l[i]);
      if (a.lse.data) write_lse(a, b, i0 + i, ws.mu[i], ws.l[i]);
    }
    // An output the accumulator could not hold (|v| near the dtype's largest finite value, times
    // the sum of the weights before normalization) is reported, for the caller to run again
    // with v scaled down (_cpu.py). Checked on O^T before normalization (1 / l <= 1 cannot make
    // a finite sum infinite): Ev x BM values in L1, a few hundred cycles against the tile's
    // BM x S x (E + Ev) multiply-adds. Padded query rows hold sums of the same v.
    if (any_nonfinite(ws.ot.ptr, a.Ev * BM)) report_nonfinite(a);
    // O^T back to rows by 16 x 16 blocks (transpose_block16) where they fit (kBlocks16) and
    // out is contiguous along Ev; the rest element by element.
    int64_t rows16 = 0, cols16 = 0;
    if (kBlocks16 && a.out.col_stride == 1) {
      rows16 = rows / 16 * 16;
      cols16 = Ev / 16 * 16;
      for (int64_t ib = 0; ib < rows16; ib += 16)
        for (int64_t cb = 0; cb < cols16; cb += 16)
          transpose_block16(ws.ot.ptr + cb * BM + ib, int64_t(BM), 16,
                            out + (i0 + ib) * a.out.row_stride + cb, a.out.row_stride, inv + ib);
    }
    for (int64_t i = 0; i < rows; ++i) {
      T* dst = out + (i0 + i) * a.out.row_stride;
      for (int64_t cc = i < rows16 ? cols16 : 0; cc < Ev; ++cc)
        dst[cc * a.out.col_stride] = ws.ot.ptr[cc * BM + i] * inv[i];
    }
    if (a.weights.data) write_weights(ws, ep, b, i0, rows, kb_begin, kb_end, K, m_off);
  }

  // The normalized weights, for return_weights: scores are recomputed block by block against the
  // final maximum and sum (as FlashAttention does), so the forward pass stays single-pass.
  // (Paged problems return no weights: their blocks are BN keys here.)
  void write_weights(Workspace& ws, const EntryParams<T>& ep, int64_t b, int64_t i0, int64_t rows,
                     int64_t kb_begin, int64_t kb_end, const KeyRows<In>& K,
                     int64_t m_off) const {
    T* W = static_cast<T*>(const_cast<void*>(a.weights.data)) + batch_offset(a, a.weights, b, 1);
    const int64_t wrs = a.weights.row_stride, wcs = a.weights.col_stride;
    for (int i = 0; i < BM; ++i) ws.alpha[i] = ws.l[i] == T(0) ? T(0) : T(1) / ws.l[i];
    for (int64_t kb = 0; kb < n_kblocks; ++kb) {
      const int64_t j0 = kb * BN, nb = min64(BN, a.S - j0);
      // Keys nk .. nb - 1 of the block take no part (kv_lengths): their weights are 0.
      const int64_t nk = kb < kb_begin || kb >= kb_end ? 0 : max64(0, min64(nb, ep.keys - j0));
      // (0 times the row's 1 / l: NaN in a NaN row, as the reference's 0 / NaN.)
      for (int64_t i = 0; i < rows; ++i)
        for (int64_t j = nk; j < nb; ++j) W[(i0 + i) * wrs + (j0 + j) * wcs] = T(0) * ws.alpha[i];
      if (nk == 0) continue;
      scores(ws, K, j0, nk);
      if (needs_mask(ep, i0, rows, j0, nk, a.mask_kind != MaskKind::kNone))
        mask_block(ws, ep, i0, rows, j0, nk, m_off, a.mask_kind != MaskKind::kNone);
      for (int64_t j = 0; j < nk; ++j)
        for (int v = 0; v < NV; ++v) {
          T* s = ws.st.ptr + j * BM + v * kLanes;
          const V p = exp_minus<T>(S::load(s), S::load(ws.mu + v * kLanes));
          S::store(s, p * S::load(ws.alpha + v * kLanes));
        }
      for (int64_t i = 0; i < rows; ++i)
        for (int64_t j = 0; j < nk; ++j)
          W[(i0 + i) * wrs + (j0 + j) * wcs] = ws.st.ptr[j * BM + i];
    }
  }

  KernelStatus run() const {
    const int64_t items = a.batch_count * n_qtiles;
    if (items == 0) return KernelStatus::kOk;
    const int threads = int(min64(a.num_threads, items));
    // Dynamic scheduling: tiles of a causal (banded) problem differ in cost. Within a batch entry
    // the tiles run from the last (most keys) to the first, so the cheap ones fill the gaps at
    // the end.
    const bool ok = for_each_item<Workspace>(
        a, threads, items, [&](Workspace& ws) { return allocate(ws); },
        [&](Workspace& ws, int64_t it) {
          const int64_t b = it / n_qtiles, t = it % n_qtiles;
          tile(ws, b, a.has_band ? n_qtiles - 1 - t : t);
        });
    return ok ? KernelStatus::kOk : KernelStatus::kOutOfMemory;
  }
};

}  // namespace FASTATTN_ISA_NS
}  // namespace fastattn
