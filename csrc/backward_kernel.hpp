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
//
// bfloat16 (AVX512-BF16, In = BFloat16; in backward_pairs.hpp): the five products as vdpbf16ps
// dot products of bfloat16 pairs (gemm_bf16), accumulated in float32, as the forward's pairs
// tiles run. Every operand comes as pairs along its product's sum: Q^T and dO^T as feature
// pairs per tile, Q and dO as query pairs, K and V rows as feature pairs, K^T as key pairs (the
// last three per key block); P^T and dS^T are rounded to bfloat16 rows (pairs of queries) for
// dV and dK, and dS^T to key pairs for dQ^T, as FlashAttention rounds P and dS to the inputs'
// type for its products. The softmax, dS and D stay in float32. The scale is applied to dK and
// dQ once, at the end.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "backward_pairs.hpp"
#include "kernel_common.hpp"
#include "micro_kernels.hpp"
#include "tile_kernel.hpp"

namespace fastattn {
namespace FASTATTN_ISA_NS {

template <class T, class In = T>
struct BackwardKernel {
  static constexpr bool kPairs = !std::is_same_v<In, T>;  // bfloat16 pairs (see above)
  using Pairs = typename BackwardPairsFor<T, In>::type;  // their products (backward_pairs.hpp)
  using Tile = TileKernel<T>;
  using M = Micro<T>;
  using S = Simd<T>;
  using V = typename S::V;
  using R = RowOps<T>;
  static constexpr int kLanes = S::kLanes;
  static constexpr int QP = Tile::QP;  // the micro-GEMM's width: two vectors
  static constexpr int BM = Tile::BM;  // the forward's tile, so that its masking applies as is
  static constexpr int BN = Tile::BN;

  const Problem& a;
  const Tile tile;
  const int64_t n_kblocks, n_qtiles, L_pad, E_pad, Ev_pad;
  int64_t n_chunks = 1;  // items per batch entry, each taking every n_chunks-th key block
  T* partial = nullptr;  // n_chunks > 1: dQ of every (entry, chunk), reduced after the items

  explicit BackwardKernel(const Problem& args)
      : a(args),
        tile(args),
        n_kblocks((args.S + BN - 1) / BN),
        n_qtiles((args.L + BM - 1) / BM),
        L_pad(n_qtiles * BM),
        E_pad(round_up(args.E, QP)),
        Ev_pad(round_up(args.Ev, QP)),
        E2((args.E + 1) / 2),
        Ev2((args.Ev + 1) / 2) {}
  const int64_t E2, Ev2;  // pairs of features (pairs mode): an odd last one pairs with zero

  struct Workspace {
    typename Tile::Workspace tw;  // tw.st: S^T, then P^T, then dS^T of one block (BN x BM)
    Buffer<T> qt;                 // Q^T, per tile: E x BM (the scale is the product's)
    Buffer<T> qr;                 // Q * scale, a row per query: L_pad x E_pad
    Buffer<T> dout_t;             // dO^T, per tile: Ev x BM
    Buffer<T> dout_rows;          // dO, a row per query: L_pad x Ev_pad
    Buffer<T> delta;              // D = rowsum(dO * O), per query: L_pad
    Buffer<T> lse;                // the forward's lse, as the products use it: L_pad
    // dQ^T of the item, per query tile: E x BM (rows BM apart, not L_pad: rows a power of two
    // of kilobytes apart would share the L1 cache's sets)
    Buffer<T> dqt;
    Buffer<T> dpt;                // dP^T of one block: BN x BM
    Buffer<T> zt;                 // softcap: the block's scores before capping, BN x BM
    Buffer<T> dk, dv;             // the key block's gradients: BN x E_pad, BN x Ev_pad
    // Pairs mode, in place of qt, qr, dout_t and dout_rows (as bfloat16 pairs, low half first):
    Buffer<uint32_t> qp;   // Q^T, feature pairs per tile: E2 x BM
    Buffer<uint32_t> qq;   // Q, query pairs: L_pad / 2 x E_pad
    Buffer<uint32_t> dop;  // dO^T, feature pairs per tile: Ev2 x BM
    Buffer<uint32_t> doq;  // dO, query pairs: L_pad / 2 x Ev_pad
    Buffer<uint32_t> kr;   // the key block's K rows, feature pairs: BN x E2
    Buffer<uint32_t> kp;   // its K^T, key pairs: BN / 2 x E
    Buffer<uint32_t> vr;   // its V rows, feature pairs: BN x Ev2
    Buffer<uint16_t> pb;   // P^T, then dS^T, rounded to bfloat16: BN x BM
    Buffer<uint32_t> dsp;  // dS^T, key pairs: BN / 2 x BM
  };

  bool allocate(Workspace& ws) const {
    const int64_t blk = int64_t(BN) * BM;
    const bool common = ws.tw.st.reserve(blk) && ws.delta.reserve(L_pad) &&
                        ws.lse.reserve(L_pad) && ws.dqt.reserve(a.E * L_pad) &&
                        ws.dpt.reserve(blk) &&
                        ws.zt.reserve(a.softcap > 0 ? blk : 0) && ws.dk.reserve(BN * E_pad) &&
                        ws.dv.reserve(BN * Ev_pad);
    if (kPairs)
      return common && ws.qp.reserve(L_pad * E2) && ws.qq.reserve(L_pad / 2 * E_pad) &&
             ws.dop.reserve(L_pad * Ev2) && ws.doq.reserve(L_pad / 2 * Ev_pad) &&
             ws.kr.reserve(BN * E2) && ws.kp.reserve(BN / 2 * a.E) && ws.vr.reserve(BN * Ev2) &&
             ws.pb.reserve(blk) && ws.dsp.reserve(blk / 2);
    return common && ws.qt.reserve(L_pad * a.E) && ws.qr.reserve(L_pad * E_pad) &&
           ws.dout_t.reserve(L_pad * a.Ev) && ws.dout_rows.reserve(L_pad * Ev_pad);
  }

  // C (+)= A B over `rows` rows of C and `panels` panels of QP columns: A(r, t) = A[r * ars +
  // t * acs] in place, B rows of ldb, n terms. Every product of the backward pass is one call.
  // Without kAccumulate the products are multiplied by mul (the scores' scale).
  template <bool kAccumulate>
  static void product(int64_t rows, int64_t panels, const T* A, int64_t ars, int64_t acs,
                      const T* B, int64_t ldb, int64_t n, T* C, int64_t ldc, T mul = T(1)) {
    M::template gemm_panels<kAccumulate>(rows, panels, A, ars, acs, B, QP, ldb, n, C, ldc,
                                         nullptr, mul);
  }

  // x (the entry's L rows of cols, at x[i * rs + c * cs]) into a transposed block per query
  // tile (cols x BM) and into rows (L_pad x pad, times mul_r), zero-padded.
  void pack(const T* x, int64_t rs, int64_t cs, int64_t cols, int64_t pad, T mul_r, T* xt,
            T* xr) const {
    std::memset(xr, 0, sizeof(T) * size_t(L_pad * pad));
    // The transposed block by 16 x 16 blocks (transpose_block16, as the forward packs Q^T)
    // where they fit (kBlocks16) and x is contiguous along cols; the rest element by element.
    int64_t c16 = 0;
    if (Tile::kBlocks16 && cs == 1) {
      c16 = cols / 16 * 16;
      for (int64_t i0 = 0; i0 < L_pad; i0 += 16) {  // L_pad: a multiple of BM, so of 16
        const T* src = i0 < a.L ? x + i0 * rs : x;  // rows past L: zeros
        T* dt = xt + (i0 / BM) * cols * BM + i0 % BM;
        for (int64_t c0 = 0; c0 < c16; c0 += 16)
          transpose_block16(src + c0, rs, a.L - i0, dt + c0 * BM, int64_t(BM));
      }
    }
    for (int64_t i = 0; i < a.L; ++i)
      for (int64_t c = 0; c < cols; ++c) xr[i * pad + c] = x[i * rs + c * cs] * mul_r;
    for (int64_t i = 0; i < L_pad; ++i) {
      T* dt = xt + (i / BM) * cols * BM + i % BM;
      for (int64_t c = c16; c < cols; ++c) dt[c * BM] = i < a.L ? x[i * rs + c * cs] : T(0);
    }
  }

  // Pairs of bfloat16 bits, low half first. Two rows, elementwise: out[c] = x0[c] | x1[c] << 16
  // (x1 null: high halves zero); contiguous rows (cs == 1) in a loop the compiler vectorizes.
  static void pair_rows(const In* x0, const In* x1, int64_t cs, int64_t cols, uint32_t* out) {
    if constexpr (kPairs) {
      if (!x1) {
        for (int64_t c = 0; c < cols; ++c) out[c] = x0[c * cs].bits;
      } else if (cs == 1) {
        for (int64_t c = 0; c < cols; ++c)
          out[c] = uint32_t(x0[c].bits) | uint32_t(x1[c].bits) << 16;
      } else {
        for (int64_t c = 0; c < cols; ++c)
          out[c] = uint32_t(x0[c * cs].bits) | uint32_t(x1[c * cs].bits) << 16;
      }
    }
  }

  // One row's neighbours: out[t * os] = x[2t] | x[2t + 1] << 16 for t < (cols + 1) / 2 (an odd
  // last one with zero).
  static void pair_features(const In* x, int64_t cs, int64_t cols, uint32_t* out, int64_t os) {
    if constexpr (kPairs) {
      const int64_t n = cols / 2;
      for (int64_t t = 0; t < n; ++t)
        out[t * os] = uint32_t(x[2 * t * cs].bits) | uint32_t(x[(2 * t + 1) * cs].bits) << 16;
      if (cols % 2) out[n * os] = x[(cols - 1) * cs].bits;
    }
  }

  // pack for pairs: x as feature pairs per query tile ((cols + 1) / 2 x BM) and as query pairs
  // (L_pad / 2 x pad), zero-padded.
  void pack_pairs(const In* x, int64_t rs, int64_t cs, int64_t cols, int64_t pad, uint32_t* xt,
                  uint32_t* xq) const {
    const int64_t c2 = (cols + 1) / 2;
    std::memset(xt, 0, sizeof(uint32_t) * size_t(L_pad * c2));
    std::memset(xq, 0, sizeof(uint32_t) * size_t(L_pad / 2 * pad));
    for (int64_t i = 0; i < a.L; ++i)
      pair_features(x + i * rs, cs, cols, xt + (i / BM) * c2 * BM + i % BM, BM);
    for (int64_t i = 0; i < a.L; i += 2)
      pair_rows(x + i * rs, i + 1 < a.L ? x + (i + 1) * rs : nullptr, cs, cols, xq + i / 2 * pad);
  }

  // The item's queries, packed once: Q, dO, D and lse (+inf on padding, giving P = 0).
  void pack_queries(Workspace& ws, int64_t b) const {
    const In* Q = static_cast<const In*>(a.q.data) + batch_offset(a, a.q, b, 1);
    const In* dO = static_cast<const In*>(a.dout.data) + batch_offset(a, a.dout, b, 1);
    const In* O = static_cast<const In*>(a.out.data) + batch_offset(a, a.out, b, 1);
    const T* lse = static_cast<const T*>(a.lse.data) + batch_offset(a, a.lse, b, 1);
    if constexpr (kPairs) {
      pack_pairs(Q, a.q.row_stride, a.q.col_stride, a.E, E_pad, ws.qp.ptr, ws.qq.ptr);
      pack_pairs(dO, a.dout.row_stride, a.dout.col_stride, a.Ev, Ev_pad, ws.dop.ptr, ws.doq.ptr);
    } else {
      // Q^T as given, the scores' scale applied in their product as the forward does (scores
      // rounded once, in natural units); Q rows times scale for dK = dS^T (Q scale).
      pack(Q, a.q.row_stride, a.q.col_stride, a.E, E_pad, T(a.scale), ws.qt.ptr, ws.qr.ptr);
      pack(dO, a.dout.row_stride, a.dout.col_stride, a.Ev, Ev_pad, T(1), ws.dout_t.ptr,
           ws.dout_rows.ptr);
    }
    T* D = ws.delta.ptr;
    T* lse_use = ws.lse.ptr;
    if constexpr (kPairs) Pairs::template rowsum<BackwardKernel>(*this, ws, O, D);
    for (int64_t i = 0; i < L_pad; ++i) {
      if constexpr (!kPairs) {
        // dO as packed (contiguous), not through its strides: so read, D's last bit came out
        // different for a Fortran-ordered dO (test_strided_out_lse_and_dout).
        T d = T(0);
        if (i < a.L)
          for (int64_t c = 0; c < a.Ev; ++c)
            d += ws.dout_rows.ptr[i * Ev_pad + c] * O[i * a.out.row_stride + c * a.out.col_stride];
        D[i] = d;
      }
      // A row with no key (lse -inf) subtracts 0 from scores that are all -inf: P = 0, not NaN;
      // padding rows subtract +inf (P = 0 there too).
      lse_use[i] = i >= a.L ? -R::kNegInf : subtracted_max(lse[i * a.lse.row_stride]);
    }
  }

  // Pairs mode, per key block: K rows and V rows as feature pairs, K^T as key pairs.
  void pack_keys(Workspace& ws, const In* K, const In* Vs, int64_t nb) const {
    const int64_t krs = a.k.row_stride, kcs = a.k.col_stride;
    for (int64_t j = 0; j < nb; ++j) {
      pair_features(K + j * krs, kcs, a.E, ws.kr.ptr + j * E2, 1);
      pair_features(Vs + j * a.v.row_stride, a.v.col_stride, a.Ev, ws.vr.ptr + j * Ev2, 1);
    }
    for (int64_t j = 0; j < nb; j += 2)
      pair_rows(K + j * krs, j + 1 < nb ? K + (j + 1) * krs : nullptr, kcs, a.E,
                ws.kp.ptr + j / 2 * a.E);
  }

  // S^T of one block (in ws.tw.st, times the scale) to its logits: the pre-cap scores kept for
  // dS's softcap factor, then the forward's masking.
  void logits(Workspace& ws, const EntryParams<T>& ep, int64_t m_off, int64_t i0, int64_t rows,
              int64_t j0, int64_t nb, bool user_mask) const {
    if (a.softcap > 0) std::memcpy(ws.zt.ptr, ws.tw.st.ptr, sizeof(T) * size_t(nb * BM));
    if (tile.needs_mask(ep, i0, rows, j0, nb, user_mask))
      tile.mask_block(ws.tw, ep, i0, rows, j0, nb, m_off, user_mask);
  }

  // dS^T's vector v of key row j: P (dP - D), times the softcap's 1 - tanh^2.
  V ds_at(const Workspace& ws, const T* D, int64_t j, int v) const {
    const V p = S::load(ws.tw.st.ptr + j * BM + v);
    // A key of weight 0 contributes nothing, even where dP is infinite (0 * inf is NaN).
    V ds = p != S::splat(T(0)) ? p * (S::load(ws.dpt.ptr + j * BM + v) - S::load(D + v))
                               : S::splat(T(0));
    if (a.softcap > 0) {
      const V t = Tanh<T>::eval(S::load(ws.zt.ptr + j * BM + v) / T(a.softcap));
      ds *= T(1) - t * t;
    }
    return ds;
  }

  // One key block against one query tile: P, dP, dS, and the four accumulations.
  void block(Workspace& ws, const EntryParams<T>& ep, const In* K, const In* Vs, int64_t m_off,
             int64_t i0, int64_t j0, int64_t nb, bool user_mask) const {
    if constexpr (kPairs) {
      Pairs::template block<BackwardKernel>(*this, ws, ep, m_off, i0, j0, nb, user_mask);
      return;
    }
    if constexpr (!kPairs) {
      const int64_t rows = min64(BM, a.L - i0), qtile = i0 / BM, panels = BM / QP;
      T* st = ws.tw.st.ptr;
      product<false>(nb, panels, K, a.k.row_stride, a.k.col_stride,
                     ws.qt.ptr + qtile * BM * a.E, BM, a.E, st, BM, T(a.scale));
      logits(ws, ep, m_off, i0, rows, j0, nb, user_mask);
      const T* lse = ws.lse.ptr + i0;
      for (int64_t j = 0; j < nb; ++j)
        for (int v = 0; v < BM; v += kLanes)
          S::store(st + j * BM + v, exp_minus<T>(S::load(st + j * BM + v), S::load(lse + v)));
      product<true>(nb, Ev_pad / QP, st, BM, 1, ws.dout_rows.ptr + i0 * Ev_pad, Ev_pad, rows,
                    ws.dv.ptr, Ev_pad);
      product<false>(nb, panels, Vs, a.v.row_stride, a.v.col_stride,
                     ws.dout_t.ptr + qtile * BM * a.Ev, BM, a.Ev, ws.dpt.ptr, BM);
      const T* D = ws.delta.ptr + i0;
      for (int64_t j = 0; j < nb; ++j)
        for (int v = 0; v < BM; v += kLanes) S::store(st + j * BM + v, ds_at(ws, D, j, v));
      product<true>(nb, E_pad / QP, st, BM, 1, ws.qr.ptr + i0 * E_pad, E_pad, rows, ws.dk.ptr,
                    E_pad);
      product<true>(a.E, panels, K, a.k.col_stride, a.k.row_stride, st, BM, nb,
                    ws.dqt.ptr + qtile * a.E * BM, BM);
    }
  }

  // Query tiles [first, last) that see some key of [j0, j0 + nb): the band read from the keys'
  // side (query i sees key j when j - band_hi <= i <= j - band_lo).
  void query_tiles(const EntryParams<T>& ep, int64_t j0, int64_t nb, int64_t& first,
                   int64_t& last) const {
    const int64_t lo = max64(0, j0 - ep.band_hi), hi = min64(a.L, j0 + nb - ep.band_lo);
    first = lo / BM;
    last = hi > lo ? (hi - 1) / BM + 1 : first;
  }

  // Writes rows x cols of a gradient, element (r, c) = src(r, c), at g's element off: as T,
  // or (grads_bf16) as bfloat16 rounded to nearest even.
  template <class Src>
  void write(const StridedView& g, int64_t off, int64_t rows, int64_t cols, Src src) const {
    const int64_t rs = g.row_stride, cs = g.col_stride;
    if constexpr (kPairs) {
      if (a.grads_bf16) {
        uint16_t* d = static_cast<uint16_t*>(const_cast<void*>(g.data)) + off;
        for (int64_t r = 0; r < rows; ++r) {
          if (cs == 1)  // a loop the compiler vectorizes
            for (int64_t c = 0; c < cols; ++c) d[r * rs + c] = bfloat16_bits(src(r, c));
          else
            for (int64_t c = 0; c < cols; ++c) d[r * rs + c * cs] = bfloat16_bits(src(r, c));
        }
        return;
      }
    }
    T* d = static_cast<T*>(const_cast<void*>(g.data)) + off;
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) d[r * rs + c * cs] = src(r, c);
  }

  void item(Workspace& ws, int64_t b, int64_t chunk) const {
    const In* K = static_cast<const In*>(a.k.data) + batch_offset(a, a.k, b, a.kv_group);
    const In* Vs = static_cast<const In*>(a.v.data) + batch_offset(a, a.v, b, a.kv_group);
    const int64_t m_off = a.mask_kind != MaskKind::kNone ? batch_offset(a, a.mask, b, 1) : 0;
    const EntryParams<T> ep = entry_params<T>(a, b);
    const int64_t kb_live = (ep.keys + BN - 1) / BN;  // keys >= kv_lengths[b] keep dK = dV = 0
    if (kb_live == 0 && n_chunks == 1) return;  // dq stays zero
    pack_queries(ws, b);
    std::memset(ws.dqt.ptr, 0, sizeof(T) * size_t(a.E * L_pad));
    const int64_t dk_off = batch_offset(a, a.dk, b, 1), dv_off = batch_offset(a, a.dv, b, 1);
    // dK = dS^T (Q scale): pairs mode applies the scale here, once per key.
    const T dk_mul = kPairs ? T(a.scale) : T(1);
    // Chunk c takes key blocks c, c + n_chunks, ...: under a causal band later blocks see fewer
    // queries, so interleaving gives the chunks equal work.
    for (int64_t kb = chunk; kb < kb_live; kb += n_chunks) {
      const int64_t j0 = kb * BN, nb = min64(BN, ep.keys - j0);
      const typename Tile::KeysIn in = tile.keys_in(m_off, j0, nb);
      if (in == Tile::KeysIn::kNone) continue;
      const bool user_mask = a.mask_kind != MaskKind::kNone && in == Tile::KeysIn::kSome;
      std::memset(ws.dk.ptr, 0, sizeof(T) * size_t(nb * E_pad));
      std::memset(ws.dv.ptr, 0, sizeof(T) * size_t(nb * Ev_pad));
      int64_t qt_first, qt_last;
      query_tiles(ep, j0, nb, qt_first, qt_last);
      const In* Kb = K + j0 * a.k.row_stride;
      const In* Vb = Vs + j0 * a.v.row_stride;
      if constexpr (kPairs)
        if (qt_last > qt_first) pack_keys(ws, Kb, Vb, nb);
      for (int64_t qt = qt_first; qt < qt_last; ++qt) {
        if (stop_requested(a)) return;  // the call raises: what is written does not matter
        block(ws, ep, Kb, Vb, m_off, qt * BM, j0, nb, user_mask);
      }
      const T* dk = ws.dk.ptr;
      const T* dv = ws.dv.ptr;
      write(a.dk, dk_off + j0 * a.dk.row_stride, nb, a.E,
            [&](int64_t j, int64_t e) { return dk[j * E_pad + e] * dk_mul; });
      write(a.dv, dv_off + j0 * a.dv.row_stride, nb, a.Ev,
            [&](int64_t j, int64_t c) { return dv[j * Ev_pad + c]; });
    }
    // dQ = scale * (dS K): the scale is applied once here rather than to every block.
    const T sc = T(a.scale);
    const T* dqt = ws.dqt.ptr;
    const auto dq = [&](int64_t i, int64_t e) {
      return dqt[(i / BM) * a.E * BM + e * BM + i % BM] * sc;
    };
    if (n_chunks == 1) {
      const int64_t off = batch_offset(a, a.dq, b, 1), rs = a.dq.row_stride;
      // dQ^T back to rows by 16 x 16 blocks (transpose_block16, as the forward writes O) where
      // they fit; the rest, and bfloat16 gradients, element by element.
      int64_t rows16 = 0, cols16 = 0;
      if (Tile::kBlocks16 && !a.grads_bf16 && a.dq.col_stride == 1) {
        rows16 = a.L / 16 * 16;
        cols16 = a.E / 16 * 16;
        T* d = static_cast<T*>(const_cast<void*>(a.dq.data)) + off;
        T scale[16];
        for (T& x : scale) x = sc;
        for (int64_t ib = 0; ib < rows16; ib += 16)
          for (int64_t cb = 0; cb < cols16; cb += 16)
            transpose_block16(dqt + (ib / BM) * a.E * BM + cb * BM + ib % BM, int64_t(BM), 16,
                              d + ib * rs + cb, rs, scale);
      }
      write(a.dq, off + cols16 * a.dq.col_stride, rows16, a.E - cols16,
            [&](int64_t i, int64_t e) { return dq(i, e + cols16); });
      write(a.dq, off + rows16 * rs, a.L - rows16, a.E,
            [&](int64_t i, int64_t e) { return dq(i + rows16, e); });
    } else {
      T* part = partial + (b * n_chunks + chunk) * a.L * a.E;
      for (int64_t i = 0; i < a.L; ++i)
        for (int64_t e = 0; e < a.E; ++e) part[i * a.E + e] = dq(i, e);
    }
  }

  // Sums the chunks' dQ of each entry into dq, a row of queries per item.
  void reduce(int threads) const {
    for_each_item<int>(
        a, threads, a.batch_count * a.L, [](int&) { return true; },
        [&](int&, int64_t it) {
          const int64_t b = it / a.L, i = it % a.L;
          write(a.dq, batch_offset(a, a.dq, b, 1) + i * a.dq.row_stride, 1, a.E,
                [&](int64_t, int64_t e) {
                  T s = T(0);
                  for (int64_t c = 0; c < n_chunks; ++c)
                    s += partial[((b * n_chunks + c) * a.L + i) * a.E + e];
                  return s;
                });
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
        a, threads, items, [&](Workspace& ws) { return allocate(ws); },
        [&](Workspace& ws, int64_t it) { item(ws, it / n_chunks, it % n_chunks); });
    if (!ok) return KernelStatus::kOutOfMemory;
    if (n_chunks > 1) reduce(a.num_threads);
    return KernelStatus::kOk;
  }
};

}  // namespace FASTATTN_ISA_NS
}  // namespace fastattn
