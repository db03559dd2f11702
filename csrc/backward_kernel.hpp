// The fused backward pass (FlashAttention-2's): the weights are recomputed block by block from
// the forward's log-sum-exp, never stored. Per key block of BN keys and query tile of BM queries:
//
//     P^T = exp(S^T - lse)                 dV += P^T dO           dP^T = V dO^T
//     dS^T = P^T (dP^T - D)  (* 1 - tanh^2 under softcap)          D = rowsum(dO * O)
//     dK += dS^T Q * scale                 dQ^T += K^T dS^T * scale
//
// The score block keeps the forward's layout (S^T: a row per key, the tile's queries along the
// SIMD lanes), so TileKernel's masking (mask_block, keys_in, needs_mask) serves both passes, and
// all five products are the forward's micro-GEMM (micro_kernels.hpp) with A read in place:
//   dP^T = V dO^T  and  S^T = K Q^T:  A = V or K (in place), B = dO^T or Q^T packed per tile
//   dV = P^T dO    and  dK = dS^T Q:  A = P^T or dS^T (the block), B = dO or Q rows, packed
//   dQ^T = K^T dS^T:                  A = K^T (K in place, transposed by its strides), B = dS^T
// Work item: one batch entry (or, when there are fewer entries than threads, a chunk of its key
// blocks), whose queries (Q^T, Q, dO^T, dO, D, lse) are packed once per item and whose dQ^T
// accumulates in the item's own buffer; the dK and dV of a key block are the item's alone. So no
// two threads write the same memory, and per thread the scratch is O((L + BN) * (E + Ev)).
#pragma once

#include <cstdint>
#include <cstring>

#include "kernel_common.hpp"
#include "micro_kernels.hpp"
#include "tile_kernel.hpp"

namespace fastattn {
namespace FASTATTN_ISA_NS {

template <class T>
struct BackwardKernel {
  using Tile = TileKernel<T>;
  using M = Micro<T>;
  using S = Simd<T>;
  using V = typename S::V;
  using R = RowOps<T>;
  static constexpr int kLanes = S::kLanes;
  static constexpr int MR = M::MR;
  static constexpr int QP = Tile::QP;  // the micro-GEMM's width: two vectors
  static constexpr int BM = Tile::BM;  // the forward's tile, so that its masking applies as is
  static constexpr int BN = Tile::BN;

  const KernelArgs& a;
  const Tile tile;
  const int64_t n_kblocks, n_qtiles, L_pad, E_pad, Ev_pad;
  int64_t n_chunks = 1;  // items per batch entry, each taking every n_chunks-th key block
  T* partial = nullptr;  // n_chunks > 1: dQ of every (entry, chunk), reduced after the items

  explicit BackwardKernel(const KernelArgs& args)
      : a(args),
        tile(args),
        n_kblocks((args.S + BN - 1) / BN),
        n_qtiles((args.L + BM - 1) / BM),
        L_pad(n_qtiles * BM),
        E_pad(round_up(args.E, QP)),
        Ev_pad(round_up(args.Ev, QP)) {}

  struct Workspace {
    typename Tile::Workspace tw;  // tw.st: S^T, then P^T, then dS^T of one block (BN x BM)
    Buffer<T> qt;                 // Q^T, per tile: E x BM (the scale is the product's)
    Buffer<T> qr;                 // Q * scale, a row per query: L_pad x E_pad
    Buffer<T> dot;                // dO^T, per tile: Ev x BM
    Buffer<T> dor;                // dO, a row per query: L_pad x Ev_pad
    Buffer<T> dlt;                // D = rowsum(dO * O), then lse: 2 x L_pad
    // dQ^T of the item, per query tile: E x BM (rows BM apart, not L_pad: rows a power of two
    // of kilobytes apart would share the L1 cache's sets)
    Buffer<T> dqt;
    Buffer<T> dpt;                // dP^T of one block: BN x BM
    Buffer<T> zt;                 // softcap: the block's scores before capping, BN x BM
    Buffer<T> dk, dv;             // the key block's gradients: BN x E_pad, BN x Ev_pad
  };

  bool allocate(Workspace& ws) const {
    const int64_t blk = int64_t(BN) * BM;
    return ws.tw.st.reserve(blk) && ws.qt.reserve(L_pad * a.E) && ws.qr.reserve(L_pad * E_pad) &&
           ws.dot.reserve(L_pad * a.Ev) && ws.dor.reserve(L_pad * Ev_pad) &&
           ws.dlt.reserve(2 * L_pad) && ws.dqt.reserve(a.E * L_pad) && ws.dpt.reserve(blk) &&
           ws.zt.reserve(a.softcap > 0 ? blk : 0) && ws.dk.reserve(BN * E_pad) &&
           ws.dv.reserve(BN * Ev_pad);
  }

  // C (+)= A B over `rows` rows of C and `panels` panels of QP columns: A(r, t) = A[r * ars +
  // t * acs] in place, B rows of ldb, n terms. Every product of the backward pass is one call.
  // Without kAccumulate the products are multiplied by mul (the scores' scale).
  template <bool kAccumulate>
  static void product(int64_t rows, int64_t panels, const T* A, int64_t ars, int64_t acs,
                      const T* B, int64_t ldb, int64_t n, T* C, int64_t ldc, T mul = T(1)) {
    for (int64_t p = 0; p < panels; ++p)
      for (int64_t r = 0; r < rows; r += MR)
        M::template gemm_rows<kAccumulate>(int(min64(MR, rows - r)), A + r * ars, ars, acs,
                                           B + p * QP, ldb, n, C + r * ldc + p * QP, ldc,
                                           nullptr, mul);
  }

  // x (the entry's L rows of cols, at x[i * rs + c * cs]) into a transposed block per query
  // tile (cols x BM, times mul_t) and into rows (L_pad x pad, times mul_r), zero-padded.
  void pack(const T* x, int64_t rs, int64_t cs, int64_t cols, int64_t pad, T mul_t, T mul_r,
            T* xt, T* xr) const {
    std::memset(xr, 0, sizeof(T) * size_t(L_pad * pad));
    for (int64_t i = 0; i < L_pad; ++i) {
      T* dt = xt + (i / BM) * cols * BM + i % BM;
      for (int64_t c = 0; c < cols; ++c) {
        const T val = i < a.L ? x[i * rs + c * cs] : T(0);
        dt[c * BM] = val * mul_t;
        xr[i * pad + c] = val * mul_r;
      }
    }
  }

  // The item's queries, packed once: Q, dO, D and lse (+inf on padding, giving P = 0).
  void pack_queries(Workspace& ws, int64_t b) const {
    const T* Q = static_cast<const T*>(a.q.data) + batch_offset(a, a.q, b, 1);
    const T* dO = static_cast<const T*>(a.dout.data) + batch_offset(a, a.dout, b, 1);
    const T* O = static_cast<const T*>(a.out.data) + batch_offset(a, a.out, b, 1);
    const T* lse = static_cast<const T*>(a.lse.data) + batch_offset(a, a.lse, b, 1);
    // Q^T as given, the scores' scale applied in their product as the forward does (scores
    // rounded once, in natural units); Q rows times scale for dK = dS^T (Q scale).
    pack(Q, a.q.row_stride, a.q.col_stride, a.E, E_pad, T(1), T(a.scale), ws.qt.ptr, ws.qr.ptr);
    pack(dO, a.dout.row_stride, a.dout.col_stride, a.Ev, Ev_pad, T(1), T(1), ws.dot.ptr,
         ws.dor.ptr);
    T* D = ws.dlt.ptr;
    T* lse_use = ws.dlt.ptr + L_pad;
    for (int64_t i = 0; i < L_pad; ++i) {
      T d = T(0);
      if (i < a.L)
        for (int64_t c = 0; c < a.Ev; ++c)
          d += ws.dor.ptr[i * Ev_pad + c] * O[i * a.out.row_stride + c * a.out.col_stride];
      D[i] = d;
      // A row with no key (lse -inf) subtracts 0 from scores that are all -inf: P = 0, not NaN.
      const T l = i < a.L ? lse[i * a.lse.row_stride] : R::kNegInf;
      lse_use[i] = i >= a.L ? -R::kNegInf : l == R::kNegInf ? T(0) : l;
    }
  }

  // One key block against one query tile: P, dP, dS, and the four accumulations.
  void block(Workspace& ws, const EntryParams<T>& ep, const T* K, const T* Vs, int64_t m_off,
             int64_t i0, int64_t j0, int64_t nb, bool user_mask) const {
    const int64_t rows = min64(BM, a.L - i0), qtile = i0 / BM, panels = BM / QP;
    T* st = ws.tw.st.ptr;
    product<false>(nb, panels, K, a.k.row_stride, a.k.col_stride, ws.qt.ptr + qtile * BM * a.E,
                   BM, a.E, st, BM, T(a.scale));
    if (a.softcap > 0) std::memcpy(ws.zt.ptr, st, sizeof(T) * size_t(nb * BM));
    if (tile.needs_mask(i0, rows, j0, nb, user_mask))
      tile.mask_block(ws.tw, ep, i0, rows, j0, nb, m_off, user_mask);
    const T* lse = ws.dlt.ptr + L_pad + i0;
    for (int64_t j = 0; j < nb; ++j)
      for (int v = 0; v < BM; v += kLanes)
        S::store(st + j * BM + v, exp_minus<T>(S::load(st + j * BM + v), S::load(lse + v)));
    product<true>(nb, Ev_pad / QP, st, BM, 1, ws.dor.ptr + i0 * Ev_pad, Ev_pad, rows, ws.dv.ptr,
                  Ev_pad);
    product<false>(nb, panels, Vs, a.v.row_stride, a.v.col_stride, ws.dot.ptr + qtile * BM * a.Ev,
                   BM, a.Ev, ws.dpt.ptr, BM);
    const T* D = ws.dlt.ptr + i0;
    const T cap = T(a.softcap);
    for (int64_t j = 0; j < nb; ++j)
      for (int v = 0; v < BM; v += kLanes) {
        const V p = S::load(st + j * BM + v);
        // A key of weight 0 contributes nothing, even where dP is infinite (0 * inf is NaN).
        V ds = p != S::splat(T(0)) ? p * (S::load(ws.dpt.ptr + j * BM + v) - S::load(D + v))
                                   : S::splat(T(0));
        if (a.softcap > 0) {
          const V t = Tanh<T>::eval(S::load(ws.zt.ptr + j * BM + v) / cap);
          ds *= T(1) - t * t;
        }
        S::store(st + j * BM + v, ds);
      }
    product<true>(nb, E_pad / QP, st, BM, 1, ws.qr.ptr + i0 * E_pad, E_pad, rows, ws.dk.ptr,
                  E_pad);
    product<true>(a.E, panels, K, a.k.col_stride, a.k.row_stride, st, BM, nb,
                  ws.dqt.ptr + qtile * a.E * BM, BM);
  }

  // Query tiles [first, last) that see some key of [j0, j0 + nb): the band read from the keys'
  // side (query i sees key j when j - band_hi <= i <= j - band_lo).
  void query_tiles(int64_t j0, int64_t nb, int64_t& first, int64_t& last) const {
    const int64_t lo = max64(0, j0 - a.band_hi), hi = min64(a.L, j0 + nb - a.band_lo);
    first = lo / BM;
    last = hi > lo ? (hi - 1) / BM + 1 : first;
  }

  void item(Workspace& ws, int64_t b, int64_t chunk) const {
    const T* K = static_cast<const T*>(a.k.data) + batch_offset(a, a.k, b, a.kv_group);
    const T* Vs = static_cast<const T*>(a.v.data) + batch_offset(a, a.v, b, a.kv_group);
    const int64_t m_off = a.mask_kind ? batch_offset(a, a.mask, b, 1) : 0;
    const EntryParams<T> ep = entry_params<T>(a, b);
    const int64_t kb_live = (ep.keys + BN - 1) / BN;  // keys >= kv_lengths[b] keep dK = dV = 0
    if (kb_live == 0 && n_chunks == 1) return;  // dq stays zero
    pack_queries(ws, b);
    std::memset(ws.dqt.ptr, 0, sizeof(T) * size_t(a.E * L_pad));
    T* dK = static_cast<T*>(const_cast<void*>(a.dk.data)) + batch_offset(a, a.dk, b, 1);
    T* dV = static_cast<T*>(const_cast<void*>(a.dv.data)) + batch_offset(a, a.dv, b, 1);
    // Chunk c takes key blocks c, c + n_chunks, ...: under a causal band later blocks see fewer
    // queries, so interleaving gives the chunks equal work.
    for (int64_t kb = chunk; kb < kb_live; kb += n_chunks) {
      const int64_t j0 = kb * BN, nb = min64(BN, ep.keys - j0);
      const typename Tile::KeysIn in = tile.keys_in(m_off, j0, nb);
      if (in == Tile::KeysIn::kNone) continue;
      const bool user_mask = a.mask_kind != 0 && in == Tile::KeysIn::kSome;
      std::memset(ws.dk.ptr, 0, sizeof(T) * size_t(nb * E_pad));
      std::memset(ws.dv.ptr, 0, sizeof(T) * size_t(nb * Ev_pad));
      int64_t qt_first, qt_last;
      query_tiles(j0, nb, qt_first, qt_last);
      for (int64_t qt = qt_first; qt < qt_last; ++qt)
        block(ws, ep, K + j0 * a.k.row_stride, Vs + j0 * a.v.row_stride, m_off, qt * BM, j0, nb,
              user_mask);
      for (int64_t j = 0; j < nb; ++j) {
        for (int64_t e = 0; e < a.E; ++e)
          dK[(j0 + j) * a.dk.row_stride + e * a.dk.col_stride] = ws.dk.ptr[j * E_pad + e];
        for (int64_t c = 0; c < a.Ev; ++c)
          dV[(j0 + j) * a.dv.row_stride + c * a.dv.col_stride] = ws.dv.ptr[j * Ev_pad + c];
      }
    }
    // dQ = scale * (dS K): the scale is applied once here rather than to every block.
    T* dQ;
    int64_t rs, cs;
    if (n_chunks == 1) {
      dQ = static_cast<T*>(const_cast<void*>(a.dq.data)) + batch_offset(a, a.dq, b, 1);
      rs = a.dq.row_stride;
      cs = a.dq.col_stride;
    } else {
      dQ = partial + (b * n_chunks + chunk) * a.L * a.E;
      rs = a.E;
      cs = 1;
    }
    const T sc = T(a.scale);
    for (int64_t i = 0; i < a.L; ++i)
      for (int64_t e = 0; e < a.E; ++e)
        dQ[i * rs + e * cs] = ws.dqt.ptr[(i / BM) * a.E * BM + e * BM + i % BM] * sc;
  }

  // Sums the chunks' dQ of each entry into dq, a row of queries per item.
  void reduce(int threads) const {
    for_each_item<int>(
        threads, a.batch_count * a.L, [](int&) { return true; },
        [&](int&, int64_t it) {
          const int64_t b = it / a.L, i = it % a.L;
          T* dQ = static_cast<T*>(const_cast<void*>(a.dq.data)) + batch_offset(a, a.dq, b, 1) +
                  i * a.dq.row_stride;
          for (int64_t e = 0; e < a.E; ++e) {
            T s = T(0);
            for (int64_t c = 0; c < n_chunks; ++c)
              s += partial[((b * n_chunks + c) * a.L + i) * a.E + e];
            dQ[e * a.dq.col_stride] = s;
          }
        });
  }

  KernelStatus run() {
    if (a.batch_count == 0 || a.L == 0) return KernelStatus::kOk;  // dq, dk, dv stay zero
    // Fewer entries than threads (one long sequence): split each entry's key blocks, so every
    // thread works, at the price of a partial dQ per chunk (O(threads * L * E) in all).
    if (a.batch_count < a.num_threads && n_kblocks > 1)
      n_chunks = min64(n_kblocks, (2 * a.num_threads + a.batch_count - 1) / a.batch_count);
    Buffer<T> partials;
    if (n_chunks > 1) {
      if (!partials.reserve(a.batch_count * n_chunks * a.L * a.E))
        return KernelStatus::kOutOfMemory;
      partial = partials.ptr;
    }
    const int64_t items = a.batch_count * n_chunks;
    const int threads = int(min64(a.num_threads, items));
    const bool ok = for_each_item<Workspace>(
        threads, items, [&](Workspace& ws) { return allocate(ws); },
        [&](Workspace& ws, int64_t it) { item(ws, it / n_chunks, it % n_chunks); });
    if (!ok) return KernelStatus::kOutOfMemory;
    if (n_chunks > 1) reduce(a.num_threads);
    return KernelStatus::kOk;
  }
};

}  // namespace FASTATTN_ISA_NS
}  // namespace fastattn
