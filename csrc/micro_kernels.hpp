// The register-blocked micro-GEMM behind both products of attention.
//
// The tile kernel keeps queries along the SIMD lanes (see tile_kernel.hpp), so both products have
// the same shape: R rows of a result, each two vectors (2 * lanes queries) wide,
//
//     C[r][0 : 2 lanes] (+)= sum_t A(r, t) * B[t][0 : 2 lanes]      r < R, t < n,
//
// where A(r, t) = a[r * ars + t * acs] is read in place, one scalar broadcast at a time, and B is
// a packed, contiguous row of two vectors:
//   scores   S^T = K Q^T:  A = K (r: key, t: feature),   B = packed Q^T, C = S^T rows
//   output   O^T = V^T P^T: A = V (r: value column, t: key), B = P^T rows, C = O^T rows
// Reading K and V through strides means they are never packed or copied, whatever their layout.
//
// MR is the most rows whose 2 * MR accumulators, 2 B vectors and a broadcast fit in the register
// file: 8 on AVX-512 (19 of 32 zmm registers), 6 with 16 registers (15 of 16 ymm/xmm).
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
  static constexpr int MR = FASTATTN_VBYTES >= 64 ? 8 : 6;

  // With colmax, also colmax[0:2 lanes] = max(colmax, every row of C): the softmax's column
  // maximum comes out of the registers instead of another pass over the scores.
  template <int R, bool kAccumulate>
  static inline void gemm(const T* __restrict a, int64_t ars, int64_t acs,
                          const T* __restrict b, int64_t ldb, int64_t n, T* __restrict c,
                          int64_t ldc, T* __restrict colmax) {
    V acc0[R], acc1[R];
    const T* arow[R];
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      arow[r] = a + r * ars;
      acc0[r] = acc1[r] = S::splat(T(0));
    }
    int64_t at = 0;
    for (int64_t t = 0; t < n; ++t, at += acs) {
      const V b0 = S::load(b + t * ldb);
      const V b1 = S::load(b + t * ldb + kLanes);
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) {
        const V x = S::splat(arow[r][at]);
        acc0[r] += x * b0;
        acc1[r] += x * b1;
      }
    }
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      if (kAccumulate) {  // the block's sum is formed alone, then added: blocked summation
        acc0[r] += S::load(c + r * ldc);
        acc1[r] += S::load(c + r * ldc + kLanes);
      }
      S::store(c + r * ldc, acc0[r]);
      S::store(c + r * ldc + kLanes, acc1[r]);
    }
    if (colmax) {
      V m0 = S::load(colmax), m1 = S::load(colmax + kLanes);
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) {
        m0 = S::max(m0, acc0[r]);
        m1 = S::max(m1, acc1[r]);
      }
      S::store(colmax, m0);
      S::store(colmax + kLanes, m1);
    }
  }

  // gemm for rows = 1 .. MR, the count known only at run time (the last rows of a block).
  template <bool kAccumulate, int R = MR>
  static inline void gemm_rows(int rows, const T* a, int64_t ars, int64_t acs, const T* b,
                               int64_t ldb, int64_t n, T* c, int64_t ldc, T* colmax) {
    if (rows == R) {
      gemm<R, kAccumulate>(a, ars, acs, b, ldb, n, c, ldc, colmax);
    } else if constexpr (R > 1) {
      gemm_rows<kAccumulate, R - 1>(rows, a, ars, acs, b, ldb, n, c, ldc, colmax);
    }
  }
};

}  // namespace FASTATTN_ISA_NS
}  // namespace fastattn
