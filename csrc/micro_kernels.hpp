// Register-blocked micro-GEMMs for the two products of attention, on packed panels.
//
// Both are outer-product kernels: a row value of the left operand is broadcast and multiplied
// into two SIMD vectors of a panel, so an MR x NR block of the result stays in registers for the
// whole reduction. A panel is NR = 2 vectors wide:
//   K panel p:  kp[e * NR + j]  = K[p * NR + j, e]   (keys side by side, for S = Q K^T)
//   V panel c:  vp[n * NR + j]  = V[n, c * NR + j]   (value columns side by side, for O += P V)
// MR is the number of rows that fit beside the 2 * MR accumulators, 2 panel vectors and one
// broadcast in the register file: 8 on AVX-512 (19 of 32 zmm; 12 measured no faster, since the
// tiles are short in E), 6 with 16 registers (15 of 16 ymm/xmm).
#pragma once

#include <cstdint>

#include "simd.hpp"

namespace fastattn {
namespace FASTATTN_ISA_NS {

template <class T>
struct Micro {
  using S = Simd<T>;
  using V = typename S::V;
  static constexpr int kLanes = S::kLanes;
  static constexpr int NR = 2 * kLanes;
  static constexpr int MR = FASTATTN_VBYTES >= 64 ? 8 : 6;

  // s[r * lds + j] = sum_e qp[r * ldq + e] * kpanel[e * NR + j]   for r < MR, j < NR;
  // rowmax[r] = max(rowmax[r], lanes of row r), so the softmax needs no extra pass for the max.
  static inline void qk(const T* __restrict qp, int64_t ldq, int64_t E, const T* __restrict kpanel,
                        T* __restrict s, int64_t lds, V* __restrict rowmax) {
    V acc0[MR], acc1[MR];
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) acc0[r] = acc1[r] = S::splat(T(0));
    for (int64_t e = 0; e < E; ++e) {
      const V b0 = S::load(kpanel + e * NR);
      const V b1 = S::load(kpanel + e * NR + kLanes);
#pragma GCC unroll 16
      for (int r = 0; r < MR; ++r) {
        const V a = S::splat(qp[r * ldq + e]);
        acc0[r] += a * b0;
        acc1[r] += a * b1;
      }
    }
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      S::store(s + r * lds, acc0[r]);
      S::store(s + r * lds + kLanes, acc1[r]);
      rowmax[r] = S::max(rowmax[r], S::max(acc0[r], acc1[r]));
    }
  }

  // o[r * ldo + j] += sum_n p[r * ldp + n] * vpanel[n * NR + j]   for r < MR, j < NR, n < count.
  static inline void pv(const T* __restrict p, int64_t ldp, int64_t count,
                        const T* __restrict vpanel, T* __restrict o, int64_t ldo) {
    V acc0[MR], acc1[MR];
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      acc0[r] = S::load(o + r * ldo);
      acc1[r] = S::load(o + r * ldo + kLanes);
    }
    for (int64_t n = 0; n < count; ++n) {
      const V b0 = S::load(vpanel + n * NR);
      const V b1 = S::load(vpanel + n * NR + kLanes);
#pragma GCC unroll 16
      for (int r = 0; r < MR; ++r) {
        const V a = S::splat(p[r * ldp + n]);
        acc0[r] += a * b0;
        acc1[r] += a * b1;
      }
    }
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      S::store(o + r * ldo, acc0[r]);
      S::store(o + r * ldo + kLanes, acc1[r]);
    }
  }
};

}  // namespace FASTATTN_ISA_NS
}  // namespace fastattn
