// The tile kernel's two products, S^T = K Q^T * scale and O^T += V^T P^T, one struct per way q,
// k and v are stored. TileKernel (tile_kernel.hpp) holds the policy (key blocks, masking, the
// online softmax, finishing) and reaches the products only through the struct TileProducts
// picks; what an instruction set adds lives in its own struct here, each compiled only where
// its instructions exist, never as #if blocks in the generic kernel.
//
// Each struct has: In (q and k's element), VIn (v's element), Scratch (its per-thread
// buffers), and, for the kernel Kr and its workspace W,
//   allocate(kr, scratch)                  its buffers for one thread;
//   ot_rows(a)                             rows of O^T it writes (Ev, or rounded up);
//   pack_queries(kr, ws, Q, i0, rows)      the tile's queries as its scores product reads them;
//   scores(kr, ws, K, j0, nb)              S^T rows 0 .. nb - 1 for keys j0 .. and the column
//                                          maximum (ws.colmax);
//   accumulate(kr, ws, Vs, j0, nb)         O^T += V^T P^T for keys j0 .. j0 + nb - 1.
// K and Vs are the entry's KeyRows (kernel_common.hpp); keys j0 .. j0 + nb - 1 lie on one page,
// rows rs apart, so a product reads them from K.row(j0) through the strides.
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

namespace fastattn {
namespace FASTATTN_ISA_NS {

// q, k and v stored as T: the micro-GEMM (micro_kernels.hpp) on Q^T packed in panels, K and V
// read in place through their strides as its broadcast operand.
template <class T>
struct PlainProducts {
  using In = T;
  using VIn = T;
  struct Scratch {
    Buffer<T> qt;  // Q^T: BM / QP panels of E x QP
  };

  template <class Kr>
  static bool allocate(const Kr& kr, Scratch& sc) {
    return sc.qt.reserve(int64_t(Kr::BM) * kr.a.E);
  }
  static int64_t ot_rows(const Problem& a) { return a.Ev; }

  // Features by 16 x 16 blocks (transpose_block16) where q is contiguous along them and the
  // panels hold whole blocks; the rest, and other layouts, element by element. Padding is zero.
  template <class Kr, class W>
  static void pack_queries(const Kr& kr, W& ws, const T* Q, int64_t i0, int64_t rows) {
    constexpr int BM = Kr::BM, QP = Kr::QP;
    const Problem& a = kr.a;
    const int64_t E = a.E;
    T* qt = ws.products.qt.ptr;
    int64_t e16 = 0;
    if (Kr::kBlocks16 && a.q.col_stride == 1) {
      e16 = E / 16 * 16;
      for (int64_t ib = 0; ib < BM; ib += 16) {
        const T* src = ib < rows ? Q + (i0 + ib) * a.q.row_stride : Q;  // rows past L: zeros
        T* dst = qt + (ib / QP) * E * QP + ib % QP;
        for (int64_t e0 = 0; e0 < e16; e0 += 16)
          transpose_block16(src + e0, a.q.row_stride, rows - ib, dst + e0 * QP, int64_t(QP));
      }
    }
    for (int64_t i = 0; i < BM; ++i) {
      T* dst = qt + (i / QP) * E * QP + i % QP;
      if (i < rows) {
        const T* src = Q + (i0 + i) * a.q.row_stride;
        for (int64_t e = e16; e < E; ++e) dst[e * QP] = src[e * a.q.col_stride];
      } else {
        for (int64_t e = e16; e < E; ++e) dst[e * QP] = T(0);
      }
    }
  }

  template <class Kr, class W>
  static void scores(const Kr& kr, W& ws, const KeyRows<T>& K, int64_t j0, int64_t nb) {
    constexpr int BM = Kr::BM, QP = Kr::QP;
    const Problem& a = kr.a;
    Micro<T>::template gemm_panels<false>(nb, BM / QP, K.row(j0), a.k.row_stride,
                                          a.k.col_stride, ws.products.qt.ptr, a.E * QP, QP, a.E,
                                          ws.st.ptr, BM, ws.colmax, T(a.scale));
  }

  template <class Kr, class W>
  static void accumulate(const Kr& kr, W& ws, const KeyRows<T>& Vs, int64_t j0, int64_t nb) {
    constexpr int BM = Kr::BM, QP = Kr::QP;
    const Problem& a = kr.a;
    Micro<T>::template gemm_panels<true>(a.Ev, BM / QP, Vs.row(j0), a.v.col_stride,
                                         a.v.row_stride, ws.st.ptr, QP, BM, nb, ws.ot.ptr, BM,
                                         nullptr);
  }
};

#if defined(__AVX512BF16__)
// bfloat16 q, k and v as vdpbf16ps pairs (AVX512-BF16): k padded to an even E and contiguous
// along it, v packed as pairs of keys (v[j / 2][c] holds the bfloat16 values of keys j and
// j + 1, even j), so both products run as bfloat16 dot products into float32.
struct Bf16PairProducts {
  using In = BFloat16;
  using VIn = uint32_t;
  struct Scratch {
    Buffer<uint32_t> qp;  // Q^T unscaled as feature pairs: E / 2 x QP per panel
    Buffer<uint32_t> pp;  // P^T of one block as key pairs: BN / 2 x BM
  };

  template <class Kr>
  static bool allocate(const Kr& kr, Scratch& sc) {
    return sc.qp.reserve(int64_t(Kr::BM) * (kr.a.E / 2)) &&
           sc.pp.reserve(int64_t(Kr::BM) * Kr::BN / 2);
  }
  static int64_t ot_rows(const Problem& a) { return a.Ev; }

  // The scale is applied to the products (see online_softmax.hpp). Padding is zero.
  template <class Kr, class W>
  static void pack_queries(const Kr& kr, W& ws, const In* Q, int64_t i0, int64_t rows) {
    constexpr int BM = Kr::BM, QP = Kr::QP;
    const Problem& a = kr.a;
    const int64_t E2 = a.E / 2;
    for (int64_t i = 0; i < BM; ++i) {
      uint32_t* dst = ws.products.qp.ptr + (i / QP) * E2 * QP + i % QP;
      const In* src = Q + (i0 + i) * a.q.row_stride;
      for (int64_t t = 0; t < E2; ++t)
        dst[t * QP] = i < rows ? uint32_t(src[2 * t * a.q.col_stride].bits) |
                                     uint32_t(src[(2 * t + 1) * a.q.col_stride].bits) << 16
                               : 0u;
    }
  }

  template <class Kr, class W>
  static void scores(const Kr& kr, W& ws, const KeyRows<In>& K, int64_t j0, int64_t nb) {
    constexpr int BM = Kr::BM, QP = Kr::QP;
    const Problem& a = kr.a;
    gemm_bf16_panels<false>(nb, BM / QP, reinterpret_cast<const char*>(K.row(j0)),
                            a.k.row_stride * 2, 4, ws.products.qp.ptr, (a.E / 2) * QP, QP,
                            a.E / 2, ws.st.ptr, BM, ws.colmax, float(a.scale));
  }

  // P^T to bfloat16 pairs of keys (an odd last key pairs with 0); returns the pairs' count.
  template <class Kr, class W>
  static int64_t pair_weights(W& ws, int64_t nb) {
    constexpr int BM = Kr::BM, NV = Kr::NV, kLanes = Kr::kLanes;
    const int64_t np = (nb + 1) / 2;
    for (int64_t t = 0; t < np; ++t)
      for (int v = 0; v < NV; ++v) {
        const __m512 x = _mm512_loadu_ps(ws.st.ptr + 2 * t * BM + v * kLanes);
        const __m512 y = 2 * t + 1 < nb ? _mm512_loadu_ps(ws.st.ptr + (2 * t + 1) * BM + v * kLanes)
                                        : _mm512_setzero_ps();
        _mm512_storeu_si512(ws.products.pp.ptr + t * BM + v * kLanes, pair_bf16(x, y));
      }
    return np;
  }

  // v is the kernel's own packed copy (packing.hpp): never paged, j0 even.
  template <class Kr, class W>
  static void accumulate(const Kr& kr, W& ws, const KeyRows<VIn>& Vs, int64_t j0, int64_t nb) {
    constexpr int BM = Kr::BM, QP = Kr::QP;
    const Problem& a = kr.a;
    const int64_t np = pair_weights<Kr>(ws, nb);
    gemm_bf16_panels<true>(a.Ev, BM / QP, reinterpret_cast<const char*>(Vs.row(j0 / 2)),
                           a.v.col_stride * 4, a.v.row_stride * 4, ws.products.pp.ptr, QP, BM, np,
                           ws.ot.ptr, BM, nullptr, 1.0f);
  }
};
#endif

#if defined(FASTATTN_AMX)
// bfloat16 on AMX tiles (amx_tiles.hpp), in the amx variant (FASTATTN_AMX, defined by its flags
// in isa_table.def): the queries and P^T packed as for vdpbf16ps, k padded
// to a multiple of 32 features, v packed transposed (V^T, keys along a row, Ev and S padded to
// multiples of 32 with zeros).
struct AmxProducts : Bf16PairProducts {
  using VIn = BFloat16;
  struct Scratch : Bf16PairProducts::Scratch {
    Buffer<uint16_t> ktail;  // the last K rows of S, zero-padded to 32 rows
    amx::Session tiles;      // the tile configuration, per thread
  };

  template <class Kr>
  static bool allocate(const Kr& kr, Scratch& sc) {
    return Bf16PairProducts::allocate(kr, sc) && sc.ktail.reserve(32 * kr.a.E);
  }
  // Ev rounded up to its 2 x 16-row blocks of C tiles.
  static int64_t ot_rows(const Problem& a) { return round_up(a.Ev, 32); }

  // 32 keys (two C tile rows) at a time; K rows are read in place, but for the last 32 keys of
  // S when S is not a multiple of 32 (copied, zero-padded, into ktail: a tile load reads 16
  // whole rows). Then the scale and the column maximum, rows < nb only. K is never paged here
  // (AmxPacked copies a paged k: a tile load would read past a page).
  template <class Kr, class W>
  static void scores(const Kr& kr, W& ws, const KeyRows<In>& rows_k, int64_t j0, int64_t nb) {
    const In* K = rows_k.base;
    using S = typename Kr::S;
    using V = typename Kr::V;
    constexpr int BM = Kr::BM, QP = Kr::QP, NV = Kr::NV, kLanes = Kr::kLanes;
    const Problem& a = kr.a;
    const int64_t E = a.E, krs = a.k.row_stride;
    uint16_t* ktail = ws.products.ktail.ptr;
    for (int64_t g = 0; g < nb; g += 32) {
      const char* rows = reinterpret_cast<const char*>(K + (j0 + g) * krs);
      int64_t lda = krs * 2;
      if (j0 + g + 32 > a.S) {
        const int64_t have = a.S - j0 - g;
        std::memset(ktail, 0, sizeof(uint16_t) * size_t(32 * E));
        for (int64_t r = 0; r < have; ++r)
          std::memcpy(ktail + r * E, K + (j0 + g + r) * krs, sizeof(uint16_t) * size_t(E));
        rows = reinterpret_cast<const char*>(ktail);
        lda = E * 2;
      }
      for (int p = 0; p < BM / QP; ++p)
        amx::block_2x2<false>(reinterpret_cast<char*>(ws.st.ptr + g * BM + p * QP), BM * 4,
                              16 * BM * 4, rows, lda, 16 * lda, amx::kBytes,
                              reinterpret_cast<const char*>(ws.products.qp.ptr + p * (E / 2) * QP),
                              QP * 4, 16 * QP * 4, E / 32);
    }
    const V sc = S::splat(float(a.scale));
    for (int v = 0; v < NV; ++v) {
      V cm = S::splat(RowOps<float>::kNegInf);
      for (int64_t j = 0; j < nb; ++j) {
        float* s = ws.st.ptr + j * BM + v * kLanes;
        const V x = S::load(s) * sc;
        S::store(s, x);
        cm = S::max(cm, x);
      }
      S::store(ws.colmax + v * kLanes, cm);
    }
  }

  // P^T in pairs as for vdpbf16ps, zero pairs up to the 32-key chunks, then V^T (keys along a
  // row, value columns col_stride apart) times P^T by tiles.
  template <class Kr, class W>
  static void accumulate(const Kr& kr, W& ws, const KeyRows<VIn>& V, int64_t j0, int64_t nb) {
    constexpr int BM = Kr::BM, QP = Kr::QP;
    const Problem& a = kr.a;
    const VIn* Vs = V.base;
    const int64_t np = pair_weights<Kr>(ws, nb);
    const int64_t chunks = (nb + 31) / 32;
    uint32_t* pp = ws.products.pp.ptr;
    std::memset(pp + np * BM, 0, sizeof(uint32_t) * size_t((chunks * 16 - np) * BM));
    const int64_t ldv = a.v.col_stride * 2;
    const char* v0 = reinterpret_cast<const char*>(Vs + j0);
    for (int64_t c = 0; c < ot_rows(a); c += 32)
      for (int p = 0; p < BM / QP; ++p)
        amx::block_2x2<true>(reinterpret_cast<char*>(ws.ot.ptr + c * BM + p * QP), BM * 4,
                             16 * BM * 4, v0 + c * ldv, ldv, 16 * ldv, amx::kBytes,
                             reinterpret_cast<const char*>(pp + p * QP), BM * 4, 16 * BM * 4,
                             chunks);
  }
};
#endif

// The products for T computed from In: T itself, else (bfloat16) AMX tiles in the amx variant
// and vdpbf16ps pairs in the AVX512-BF16 one. Other builds never instantiate 16-bit tiles
// (kernel_isa.cpp widens their inputs first), so they have no such entry.
template <class T, class In>
struct ProductsFor {
  static_assert(std::is_same_v<T, In>, "16-bit tiles need AVX512-BF16 (kernel_isa.cpp)");
  using type = PlainProducts<T>;
};
#if defined(FASTATTN_AMX)
template <>
struct ProductsFor<float, BFloat16> {
  using type = AmxProducts;
};
#elif defined(__AVX512BF16__)
template <>
struct ProductsFor<float, BFloat16> {
  using type = Bf16PairProducts;
};
#endif

}  // namespace FASTATTN_ISA_NS
}  // namespace fastattn
