// The backward pass's bfloat16 products (AVX512-BF16): what BackwardKernel (backward_kernel.hpp)
// runs on bfloat16 pairs in place of its float products, kept out of the generic kernel as the
// forward's are (tile_products.hpp). BackwardPairsFor<T, In>::type is the struct for a kernel
// computing T from In; void where the build has no bfloat16 products (the kernel never reaches
// them there: kernel_isa.cpp widens bfloat16 first).
//
// Each function takes the kernel Kr (its arguments a, sizes and helpers) and its workspace W,
// packed by Kr::pack_queries and Kr::pack_keys.
#pragma once

#include <cstdint>

#include "half.hpp"
#include "kernel_common.hpp"
#include "micro_kernels.hpp"

namespace fastattn {
namespace FASTATTN_ISA_NS {

template <class T, class In>
struct BackwardPairsFor {
  using type = void;
};

#if defined(__AVX512BF16__)
struct Bf16PairBackward {
  // C (+)= A B on bfloat16 pairs over `rows` rows of C and `panels` panels of QP columns:
  // A(r, t) the pair at byte offset r * ars + t * acs, B rows of ldb pairs, n pairs; C in
  // float32 (times mul, then added when kAccumulate).
  template <class Kr, bool kAccumulate>
  static void product(int64_t rows, int64_t panels, const void* A, int64_t ars, int64_t acs,
                      const uint32_t* B, int64_t ldb, int64_t n, float* C, int64_t ldc,
                      float mul = 1.0f) {
    gemm_bf16_panels<kAccumulate>(rows, panels, static_cast<const char*>(A), ars, acs, B,
                                  Kr::QP, ldb, n, C, ldc, nullptr, mul);
  }

  // D = rowsum(dO * O), 16 rows along the lanes, each lane summing its row in column order:
  // dO from its feature pairs per tile, O widened as it is read.
  template <class Kr, class W>
  static void rowsum(const Kr& kr, const W& ws, const BFloat16* O, float* D) {
    constexpr int BM = Kr::BM, kLanes = Kr::kLanes;
    const Problem& a = kr.a;
    const int64_t rs = a.out.row_stride, cs = a.out.col_stride;
    for (int64_t i0 = 0; i0 < kr.L_pad; i0 += kLanes) {
      const uint32_t* dp = ws.dop.ptr + (i0 / BM) * kr.Ev2 * BM + i0 % BM;
      const int64_t n = min64(kLanes, a.L - i0);  // rows past L (n <= 0: all) keep o = 0
      alignas(64) float o[kLanes] = {};
      __m512 d = _mm512_setzero_ps();
      for (int64_t c = 0; c < a.Ev; ++c) {
        for (int64_t r = 0; r < n; ++r) o[r] = to_float<float>(O[(i0 + r) * rs + c * cs]);
        const __m512i u = _mm512_loadu_si512(dp + (c / 2) * BM);
        const __m512i h = c % 2 ? _mm512_and_si512(u, _mm512_set1_epi32(int(0xffff0000u)))
                                : _mm512_slli_epi32(u, 16);
        d = _mm512_fmadd_ps(_mm512_castsi512_ps(h), _mm512_load_ps(o), d);
      }
      _mm512_storeu_ps(D + i0, d);
    }
  }

  // One key block against one query tile on bfloat16 pairs (the operands packed by
  // pack_queries and pack_keys). Queries past L and keys past nb are zero pairs, so the sums
  // run over whole pairs.
  template <class Kr, class W>
  static void block(const Kr& kr, W& ws, const EntryParams<float>& ep, int64_t m_off,
                    int64_t i0, int64_t j0, int64_t nb, bool user_mask) {
    using S = typename Kr::S;
    using V = typename Kr::V;
    constexpr int BM = Kr::BM, QP = Kr::QP, kLanes = Kr::kLanes;
    const Problem& a = kr.a;
    const int64_t E2 = kr.E2, Ev2 = kr.Ev2, E_pad = kr.E_pad, Ev_pad = kr.Ev_pad;
    const int64_t rows = min64(BM, a.L - i0), qtile = i0 / BM, panels = BM / QP;
    const int64_t qpairs = (rows + 1) / 2, kpairs = (nb + 1) / 2;
    float* st = ws.tw.st.ptr;
    uint16_t* pb = ws.pb.ptr;
    product<Kr, false>(nb, panels, ws.kr.ptr, E2 * 4, 4, ws.qp.ptr + qtile * E2 * BM, BM, E2,
                       st, BM, float(a.scale));
    kr.logits(ws, ep, m_off, i0, rows, j0, nb, user_mask);
    const float* lse = ws.lse.ptr + i0;
    for (int64_t j = 0; j < nb; ++j)
      for (int v = 0; v < BM; v += kLanes) {
        const V p = exp_minus<float>(S::load(st + j * BM + v), S::load(lse + v));
        S::store(st + j * BM + v, p);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(pb + j * BM + v),
                            (__m256i)_mm512_cvtneps_pbh(__m512(p)));
      }
    // dV += P^T dO: P^T's bfloat16 rows read as pairs of queries.
    product<Kr, true>(nb, Ev_pad / QP, pb, BM * 2, 4, ws.doq.ptr + i0 / 2 * Ev_pad, Ev_pad,
                      qpairs, ws.dv.ptr, Ev_pad);
    product<Kr, false>(nb, panels, ws.vr.ptr, Ev2 * 4, 4, ws.dop.ptr + qtile * Ev2 * BM, BM,
                       Ev2, ws.dpt.ptr, BM);
    // dS^T, rounded once: bfloat16 rows for dK, key pairs for dQ^T.
    const float* D = ws.delta.ptr + i0;
    for (int64_t j = 0; j < nb; j += 2)
      for (int v = 0; v < BM; v += kLanes) {
        const V d0 = kr.ds_at(ws, D, j, v);
        const V d1 = j + 1 < nb ? kr.ds_at(ws, D, j + 1, v) : S::splat(0.0f);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(pb + j * BM + v),
                            (__m256i)_mm512_cvtneps_pbh(__m512(d0)));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(pb + (j + 1) * BM + v),
                            (__m256i)_mm512_cvtneps_pbh(__m512(d1)));
        _mm512_storeu_si512(ws.dsp.ptr + j / 2 * BM + v, pair_bf16(__m512(d0), __m512(d1)));
      }
    product<Kr, true>(nb, E_pad / QP, pb, BM * 2, 4, ws.qq.ptr + i0 / 2 * E_pad, E_pad, qpairs,
                      ws.dk.ptr, E_pad);
    product<Kr, true>(a.E, panels, ws.kp.ptr, 4, a.E * 4, ws.dsp.ptr, BM, kpairs,
                      ws.dqt.ptr + qtile * a.E * BM, BM);
  }
};

template <>
struct BackwardPairsFor<float, BFloat16> {
  using type = Bf16PairBackward;
};
#endif

}  // namespace FASTATTN_ISA_NS
}  // namespace fastattn
