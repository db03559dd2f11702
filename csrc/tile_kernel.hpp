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

#include "half.hpp"
#if defined(FASTATTN_AMX)
#include "amx_tiles.hpp"
#endif
#include "kernel_common.hpp"
#include "micro_kernels.hpp"
#include "online_softmax.hpp"

namespace fastattn {
namespace FASTATTN_ISA_NS {

// In: how q, k and v are stored. T itself, or (AVX512-BF16 only) BFloat16 with k padded to an
// even E, contiguous along it, and v packed as pairs of keys: v[j / 2][c] holds the bfloat16
// values of keys j and j + 1 (even j), so both products run as bfloat16 dot products.
// The amx variant (FASTATTN_AMX, defined by its flags in isa_table.def) runs bfloat16 tiles on
// AMX instead (amx_tiles.hpp): k padded to a multiple of 32 features, v packed transposed (V^T,
// keys along a row, Ev and S padded to multiples of 32 with zeros).
#if defined(FASTATTN_AMX)
constexpr bool kAmxBuild = true;
#else
constexpr bool kAmxBuild = false;
#endif

template <class T, class In = T>
struct TileKernel {
  static constexpr bool kPairs = !std::is_same_v<In, T>;
  static constexpr bool kAmx = kPairs && kAmxBuild;
  // v's element: a value, a key pair (vdpbf16ps), or a bfloat16 of V^T (AMX)
  using VIn = std::conditional_t<kAmx, In, std::conditional_t<kPairs, uint32_t, T>>;
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

  const KernelArgs& a;
  const int64_t n_kblocks, n_qtiles;

  explicit TileKernel(const KernelArgs& args)
      : a(args), n_kblocks((args.S + BN - 1) / BN), n_qtiles((args.L + BM - 1) / BM) {}

  struct Workspace {
    Buffer<T> qt;  // Q^T: BM / QP panels of E x QP
    Buffer<T> st;  // S^T of one key block, then its unnormalized weights P^T: BN x BM
    Buffer<T> ot;  // O^T: Ev x BM
    Buffer<uint32_t> qp;  // bfloat16 pairs: Q^T unscaled, E / 2 x QP per panel
    Buffer<uint32_t> pp;  // bfloat16 pairs: P^T of one block, BN / 2 x BM
    Buffer<uint16_t> ktail;  // AMX: the last K rows of S, zero-padded to 32 rows
#if defined(FASTATTN_AMX)
    std::conditional_t<kAmx, amx::Session, char> tiles;  // the tile configuration, per thread
#endif
    alignas(64) T m[BM];       // running maximum, -inf before any key
    alignas(64) T mu[BM];      // the maximum subtracted: m, or 0 while m is -inf
    alignas(64) T l[BM];       // running sum of weights
    alignas(64) T alpha[BM];   // rescaling factor of this block
    alignas(64) T colmax[BM];  // maximum score of this block
  };

  // Rows of O^T: Ev, or for AMX Ev rounded up to its 2 x 16-row blocks of C tiles.
  int64_t ot_rows() const { return kAmx ? round_up(a.Ev, 32) : a.Ev; }

  bool allocate(Workspace& ws) const {
    if (kAmx)
      return ws.qp.reserve(int64_t(BM) * (a.E / 2)) && ws.pp.reserve(int64_t(BM) * BN / 2) &&
             ws.st.reserve(int64_t(BM) * BN) && ws.ot.reserve(int64_t(BM) * ot_rows()) &&
             ws.ktail.reserve(32 * a.E);
    if (kPairs)
      return ws.qp.reserve(int64_t(BM) * (a.E / 2)) && ws.pp.reserve(int64_t(BM) * BN / 2) &&
             ws.st.reserve(int64_t(BM) * BN) && ws.ot.reserve(int64_t(BM) * a.Ev);
    return ws.qt.reserve(int64_t(BM) * a.E) && ws.st.reserve(int64_t(BM) * BN) &&
           ws.ot.reserve(int64_t(BM) * a.Ev);
  }

  // S^T rows 0 .. nb - 1 for keys j0 .. of this entry's K (q . k * scale), and their column
  // maximum.
  void scores(Workspace& ws, const In* K, int64_t j0, int64_t nb) const {
    for (int i = 0; i < BM; ++i) ws.colmax[i] = R::kNegInf;
#if defined(FASTATTN_AMX)
    if constexpr (kAmx) {
      scores_amx(ws, K, j0, nb);
      return;
    }
#endif
#if defined(__AVX512BF16__)
    if constexpr (kPairs) {
      const char* k0 = reinterpret_cast<const char*>(K + j0 * a.k.row_stride);
      for (int p = 0; p < BM / QP; ++p)
        for (int64_t j = 0; j < nb; j += MR)
          gemm_bf16_rows<false>(int(min64(MR, nb - j)), k0 + j * a.k.row_stride * 2,
                                a.k.row_stride * 2, 4, ws.qp.ptr + p * (a.E / 2) * QP, QP,
                                a.E / 2, ws.st.ptr + j * BM + p * QP, BM, ws.colmax + p * QP,
                                float(a.scale));
      return;
    }
#endif
    if constexpr (!kPairs) scores_plain(ws, K + j0 * a.k.row_stride, nb);
  }

#if defined(FASTATTN_AMX)
  // S^T by AMX tiles, 32 keys (two C tile rows) at a time; K rows are read in place, but for
  // the last 32 keys of S when S is not a multiple of 32 (copied, zero-padded, into ktail:
  // a tile load reads 16 whole rows). Then the scale and the column maximum, rows < nb only.
  void scores_amx(Workspace& ws, const In* K, int64_t j0, int64_t nb) const {
    const int64_t E = a.E, krs = a.k.row_stride;
    for (int64_t g = 0; g < nb; g += 32) {
      const char* rows = reinterpret_cast<const char*>(K + (j0 + g) * krs);
      int64_t lda = krs * 2;
      if (j0 + g + 32 > a.S) {
        const int64_t have = a.S - j0 - g;
        std::memset(ws.ktail.ptr, 0, sizeof(uint16_t) * size_t(32 * E));
        for (int64_t r = 0; r < have; ++r)
          std::memcpy(ws.ktail.ptr + r * E, K + (j0 + g + r) * krs, sizeof(uint16_t) * size_t(E));
        rows = reinterpret_cast<const char*>(ws.ktail.ptr);
        lda = E * 2;
      }
      for (int p = 0; p < BM / QP; ++p)
        amx::block_2x2<false>(reinterpret_cast<char*>(ws.st.ptr + g * BM + p * QP), BM * 4,
                              16 * BM * 4, rows, lda, 16 * lda, amx::kBytes,
                              reinterpret_cast<const char*>(ws.qp.ptr + p * (E / 2) * QP), QP * 4,
                              16 * QP * 4, E / 32);
    }
    const V sc = S::splat(T(a.scale));
    for (int v = 0; v < NV; ++v) {
      V cm = S::splat(R::kNegInf);
      for (int64_t j = 0; j < nb; ++j) {
        T* s = ws.st.ptr + j * BM + v * kLanes;
        const V x = S::load(s) * sc;
        S::store(s, x);
        cm = S::max(cm, x);
      }
      S::store(ws.colmax + v * kLanes, cm);
    }
  }
#endif

  void scores_plain(Workspace& ws, const T* K, int64_t nb) const {
    for (int p = 0; p < BM / QP; ++p)
      for (int64_t j = 0; j < nb; j += MR)
        M::template gemm_rows<false>(int(min64(MR, nb - j)), K + j * a.k.row_stride,
                                     a.k.row_stride, a.k.col_stride, ws.qt.ptr + p * a.E * QP,
                                     QP, a.E, ws.st.ptr + j * BM + p * QP, BM,
                                     ws.colmax + p * QP, T(a.scale));
  }

  // O^T += V^T P^T for keys j0 .. j0 + nb - 1 of this entry's V.
  void accumulate(Workspace& ws, const VIn* Vs, int64_t j0, int64_t nb) const {
#if defined(__AVX512BF16__)
    if constexpr (kPairs) {
      // P^T to bfloat16 pairs of keys (an odd last key pairs with 0), then the pair products;
      // for AMX zero pairs up to its 32-key chunks.
      const int64_t np = (nb + 1) / 2;
      for (int64_t t = 0; t < np; ++t)
        for (int v = 0; v < NV; ++v) {
          const __m512 x = _mm512_loadu_ps(ws.st.ptr + 2 * t * BM + v * kLanes);
          const __m512 y = 2 * t + 1 < nb ? _mm512_loadu_ps(ws.st.ptr + (2 * t + 1) * BM + v * kLanes)
                                          : _mm512_setzero_ps();
          _mm512_storeu_si512(ws.pp.ptr + t * BM + v * kLanes, pair_bf16(x, y));
        }
#if defined(FASTATTN_AMX)
      if constexpr (kAmx) {
        const int64_t chunks = (nb + 31) / 32;
        std::memset(ws.pp.ptr + np * BM, 0, sizeof(uint32_t) * size_t((chunks * 16 - np) * BM));
        // V^T: keys along a row (row_stride 1), value columns col_stride apart.
        const int64_t ldv = a.v.col_stride * 2;
        const char* v0 = reinterpret_cast<const char*>(Vs + j0);
        for (int64_t c = 0; c < ot_rows(); c += 32)
          for (int p = 0; p < BM / QP; ++p)
            amx::block_2x2<true>(reinterpret_cast<char*>(ws.ot.ptr + c * BM + p * QP), BM * 4,
                                 16 * BM * 4, v0 + c * ldv, ldv, 16 * ldv, amx::kBytes,
                                 reinterpret_cast<const char*>(ws.pp.ptr + p * QP), BM * 4,
                                 16 * BM * 4, chunks);
        return;
      }
#endif
      const char* v0 = reinterpret_cast<const char*>(Vs + (j0 / 2) * a.v.row_stride);
      for (int p = 0; p < BM / QP; ++p)
        for (int64_t c = 0; c < a.Ev; c += MR)
          gemm_bf16_rows<true>(int(min64(MR, a.Ev - c)), v0 + c * a.v.col_stride * 4,
                               a.v.col_stride * 4, a.v.row_stride * 4,
                               ws.pp.ptr + p * QP, BM, np, ws.ot.ptr + c * BM + p * QP, BM,
                               nullptr, 1.0f);
      return;
    }
#endif
    if constexpr (!kPairs) accumulate_plain(ws, Vs + j0 * a.v.row_stride, nb);
  }

  void accumulate_plain(Workspace& ws, const T* Vs, int64_t nb) const {
    for (int p = 0; p < BM / QP; ++p)
      for (int64_t c = 0; c < a.Ev; c += MR)
        M::template gemm_rows<true>(int(min64(MR, a.Ev - c)), Vs + c * a.v.col_stride,
                                    a.v.col_stride, a.v.row_stride, ws.st.ptr + p * QP, BM, nb,
                                    ws.ot.ptr + c * BM + p * QP, BM, nullptr);
  }

  // For a bool mask that is the same for every query (a key padding mask, (..., 1, S)): whether
  // keys j0 .. j0 + nb - 1 are all out (kNone), all in (kAll), or some of each (kSome). A block
  // with no key in is skipped, one with every key in needs no masking.
  enum class KeysIn { kNone, kAll, kSome };
  KeysIn keys_in(int64_t m_off, int64_t j0, int64_t nb) const {
    if (a.mask_kind != 1 || a.mask.row_stride != 0) return KeysIn::kSome;
    const uint8_t* m = static_cast<const uint8_t*>(a.mask.data) + m_off + j0 * a.mask.col_stride;
    int64_t in = 0;
    for (int64_t j = 0; j < nb; ++j) in += m[j * a.mask.col_stride] != 0;
    return in == 0 ? KeysIn::kNone : in == nb ? KeysIn::kAll : KeysIn::kSome;
  }

  // Turns the S^T rows of keys j0 .. j0 + nb - 1 (queries i0 .. i0 + rows - 1 along each row)
  // into logits as mask_scores does for one row: softcap, then ALiBi and (with user_mask) the
  // mask; keys removed by a bool mask and, last, keys outside the band become -inf. Then
  // recomputes the column maximum.
  void mask_block(Workspace& ws, const EntryParams<T>& ep, int64_t i0, int64_t rows, int64_t j0,
                  int64_t nb, int64_t m_off, bool user_mask) const {
    if (a.softcap > 0) softcap_scores(a, ws.st.ptr, nb * BM);
    for (int64_t j = 0; j < nb; ++j) {
      T* srow = ws.st.ptr + j * BM;
      const int64_t key = j0 + j;
      if (a.alibi.data) {  // bias slope * |i + offset - key| along the queries of this row
        const V dist0 = iota() + T(i0 + a.offset - key);
        for (int v = 0; v < NV; ++v) {
          const V d = dist0 + T(v * kLanes);
          S::store(srow + v * kLanes, S::load(srow + v * kLanes) + (d < T(0) ? -d : d) *
                                                                      ep.neg_slope);
        }
      }
      if (user_mask) {
        MaskRow<T> mk;  // along a S^T row the mask advances by its row (query) stride
        mk.kind = a.mask_kind;
        mk.col_stride = a.mask.row_stride;
        const int64_t elem = a.mask_kind == 1 ? 1 : int64_t(sizeof(T));
        mk.ptr = static_cast<const char*>(a.mask.data) +
                 (m_off + i0 * a.mask.row_stride + key * a.mask.col_stride) * elem;
        R::apply_mask(srow, rows, mk);
      }
      // Last: hidden is -inf whatever the additive mask holds (+inf would make NaN).
      if (a.has_band) {  // query i sees the key only if key - band_hi <= i <= key - band_lo
        const int64_t lo = min64(max64(key - a.band_hi - i0, 0), rows);
        const int64_t hi = min64(max64(key - a.band_lo + 1 - i0, lo), rows);
        R::fill(srow, lo, R::kNegInf);
        R::fill(srow + hi, rows - hi, R::kNegInf);
      }
    }
    for (int v = 0; v < NV; ++v) {
      V cm = S::splat(R::kNegInf);
      for (int64_t j = 0; j < nb; ++j) cm = S::max(cm, S::load(ws.st.ptr + j * BM + v * kLanes));
      S::store(ws.colmax + v * kLanes, cm);
    }
  }

  // 0, 1, .., kLanes - 1 as a vector (an integer-valued T is exact up to 2^24 and beyond).
  static V iota() {
    alignas(64) T lanes[kLanes];
    for (int i = 0; i < kLanes; ++i) lanes[i] = T(i);
    return S::load(lanes);
  }

  // Whether a block needs mask_block: anything that changes scores, or a band edge in it.
  bool needs_mask(int64_t i0, int64_t rows, int64_t j0, int64_t nb, bool user_mask) const {
    return user_mask || a.softcap > 0 || a.alibi.data ||
           (a.has_band && band_cuts(a, i0, i0 + rows - 1, j0, nb));
  }

  // Online softmax over one block: new maximum, rescaled sum and output, then S^T -> P^T.
  void softmax_block(Workspace& ws, int64_t nb, bool first) const {
    bool rescale = false;
    for (int v = 0; v < NV; ++v) {
      const V m_old = S::load(ws.m + v * kLanes);
      const V cm = S::load(ws.colmax + v * kLanes);
      const V m_new = m_old > cm ? m_old : cm;
      // exp(-inf - (-inf)) is NaN: a query with no key yet subtracts 0, giving weights of 0.
      const V m_use = m_new == S::splat(R::kNegInf) ? S::splat(T(0)) : m_new;
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
    const In* K = static_cast<const In*>(a.k.data) + batch_offset(a, a.k, b, a.kv_group);
    const VIn* Vs = static_cast<const VIn*>(a.v.data) + batch_offset(a, a.v, b, a.kv_group);
    const int64_t m_off = a.mask_kind ? batch_offset(a, a.mask, b, 1) : 0;

    // Key blocks this tile needs: those with a key inside some row's band and kv_lengths.
    const EntryParams<T> ep = entry_params<T>(a, b);
    int64_t k_first, k_last;
    key_range(a, i0, i0 + rows - 1, ep.keys, k_first, k_last);
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
    for (int64_t kb = kb_begin; kb < kb_end; ++kb) {
      if (stop_requested(a)) return;  // the call raises: what is written does not matter
      const int64_t j0 = kb * BN, nb = min64(BN, ep.keys - j0);
      const KeysIn in = keys_in(m_off, j0, nb);
      if (in == KeysIn::kNone) continue;
      scores(ws, K, j0, nb);
      const bool user_mask = a.mask_kind != 0 && in == KeysIn::kSome;
      if (needs_mask(i0, rows, j0, nb, user_mask))
        mask_block(ws, ep, i0, rows, j0, nb, m_off, user_mask);
      softmax_block(ws, nb, first);
      accumulate(ws, Vs, j0, nb);
      first = false;
    }
    finish(ws, ep, b, i0, rows, kb_begin, kb_end, K, m_off);
  }

  // The tile's queries in panels: Q^T, or (bfloat16) pairs of features; the scale is applied to
  // the products (see online_softmax.hpp). Padding is zero.
  void pack_queries(Workspace& ws, int64_t b, int64_t i0, int64_t rows) const {
    const int64_t E = a.E;
    const In* Q = static_cast<const In*>(a.q.data) + batch_offset(a, a.q, b, 1);
    if constexpr (kPairs) {
      const int64_t E2 = E / 2;
      for (int64_t i = 0; i < BM; ++i) {
        uint32_t* dst = ws.qp.ptr + (i / QP) * E2 * QP + i % QP;
        const In* src = Q + (i0 + i) * a.q.row_stride;
        for (int64_t t = 0; t < E2; ++t)
          dst[t * QP] = i < rows ? uint32_t(src[2 * t * a.q.col_stride].bits) |
                                       uint32_t(src[(2 * t + 1) * a.q.col_stride].bits) << 16
                                 : 0u;
      }
    } else {
      pack_queries_plain(ws, Q, i0, rows);
    }
  }

  void pack_queries_plain(Workspace& ws, const T* Q, int64_t i0, int64_t rows) const {
    const int64_t E = a.E;
    // Features by 16 x 16 blocks (transpose_block16) where q is contiguous along them and the
    // panels hold whole blocks; the rest, and other layouts, element by element.
    int64_t e16 = 0;
    if (kBlocks16 && a.q.col_stride == 1) {
      e16 = E / 16 * 16;
      for (int64_t ib = 0; ib < BM; ib += 16) {
        const T* src = ib < rows ? Q + (i0 + ib) * a.q.row_stride : Q;  // rows past L: zeros
        T* dst = ws.qt.ptr + (ib / QP) * E * QP + ib % QP;
        for (int64_t e0 = 0; e0 < e16; e0 += 16)
          transpose_block16(src + e0, a.q.row_stride, rows - ib, dst + e0 * QP, int64_t(QP));
      }
    }
    for (int64_t i = 0; i < BM; ++i) {
      T* dst = ws.qt.ptr + (i / QP) * E * QP + i % QP;
      if (i < rows) {
        const T* src = Q + (i0 + i) * a.q.row_stride;
        for (int64_t e = e16; e < E; ++e) dst[e * QP] = src[e * a.q.col_stride];
      } else {
        for (int64_t e = e16; e < E; ++e) dst[e * QP] = T(0);
      }
    }
  }

  void finish(Workspace& ws, const EntryParams<T>& ep, int64_t b, int64_t i0, int64_t rows,
              int64_t kb_begin, int64_t kb_end, const In* K, int64_t m_off) const {
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
  void write_weights(Workspace& ws, const EntryParams<T>& ep, int64_t b, int64_t i0, int64_t rows,
                     int64_t kb_begin, int64_t kb_end, const In* K, int64_t m_off) const {
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
      if (needs_mask(i0, rows, j0, nk, a.mask_kind != 0))
        mask_block(ws, ep, i0, rows, j0, nk, m_off, a.mask_kind != 0);
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
