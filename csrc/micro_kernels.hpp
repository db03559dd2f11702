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
  // maximum comes out of the registers instead of another pass over the scores. Without
  // kAccumulate (the scores) the sums are multiplied by mul (the softmax's scale) before they
  // are stored: scaling the sum, not an operand, rounds each score once, as the textbook does.
  template <int R, bool kAccumulate>
  static inline void gemm(const T* __restrict a, int64_t ars, int64_t acs,
                          const T* __restrict b, int64_t ldb, int64_t n, T* __restrict c,
                          int64_t ldc, T* __restrict colmax, T mul) {
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
      if (!kAccumulate) {
        acc0[r] *= mul;
        acc1[r] *= mul;
      }
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
                               int64_t ldb, int64_t n, T* c, int64_t ldc, T* colmax,
                               T mul = T(1)) {
    if (rows == R) {
      gemm<R, kAccumulate>(a, ars, acs, b, ldb, n, c, ldc, colmax, mul);
    } else if constexpr (R > 1) {
      gemm_rows<kAccumulate, R - 1>(rows, a, ars, acs, b, ldb, n, c, ldc, colmax, mul);
    }
  }

  // A whole product by gemm_rows: C (+)= A B over `rows` rows of C, MR at a time, and `panels`
  // panels of 2 * kLanes columns; panel p reads B from b + p * b_panel and writes C (and
  // colmax, when given) at column p * 2 * kLanes. Every product of the tiles, forward and
  // backward, is one call.
  template <bool kAccumulate>
  static void gemm_panels(int64_t rows, int64_t panels, const T* a, int64_t ars, int64_t acs,
                          const T* b, int64_t b_panel, int64_t ldb, int64_t n, T* c, int64_t ldc,
                          T* colmax, T mul = T(1)) {
    constexpr int QP = 2 * kLanes;
    for (int64_t p = 0; p < panels; ++p)
      for (int64_t r = 0; r < rows; r += MR)
        gemm_rows<kAccumulate>(int(rows - r < MR ? rows - r : MR), a + r * ars, ars, acs,
                               b + p * b_panel, ldb, n, c + r * ldc + p * QP, ldc,
                               colmax ? colmax + p * QP : nullptr, mul);
  }
};

// A 16 x 16 block copied transposed, the packing of rows into the tiles' query-along-lanes
// layout and back: dst[f * ds + j] = src[j * ss + f] for j, f < 16, times row_scale[f] when
// given; source rows j >= rows read as 0 (src is not read at all when rows <= 0). Element by
// element here; float32 on AVX-512 in registers, below.
template <class T>
inline void transpose_block16(const T* src, int64_t ss, int64_t rows, T* dst, int64_t ds,
                              const T* row_scale = nullptr) {
  for (int64_t f = 0; f < 16; ++f)
    for (int64_t j = 0; j < 16; ++j) {
      const T x = j < rows ? src[j * ss + f] : T(0);
      dst[f * ds + j] = row_scale ? x * row_scale[f] : x;
    }
}

#if defined(__AVX512F__) && FASTATTN_VBYTES == 64
// r[i][j] <- r[j][i]: a 16 x 16 float32 transpose in registers (interleave pairs, then quads,
// then the 128-bit lanes as a 4 x 4 transpose of their own).
inline void transpose16x16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {  // s[i + k], lane L: column 4L + k of rows i .. i + 3
    const __m512d a = _mm512_castps_pd(t[i]), b = _mm512_castps_pd(t[i + 1]);
    const __m512d c = _mm512_castps_pd(t[i + 2]), d = _mm512_castps_pd(t[i + 3]);
    r[i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    r[i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    r[i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
    r[i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
  }
  for (int k = 0; k < 4; ++k) {  // lane g of row 4L + k is lane L of s[4g + k]
    const __m512 u0 = _mm512_shuffle_f32x4(r[k], r[4 + k], 0x44);
    const __m512 u1 = _mm512_shuffle_f32x4(r[k], r[4 + k], 0xee);
    const __m512 u2 = _mm512_shuffle_f32x4(r[8 + k], r[12 + k], 0x44);
    const __m512 u3 = _mm512_shuffle_f32x4(r[8 + k], r[12 + k], 0xee);
    t[k] = _mm512_shuffle_f32x4(u0, u2, 0x88);
    t[4 + k] = _mm512_shuffle_f32x4(u0, u2, 0xdd);
    t[8 + k] = _mm512_shuffle_f32x4(u1, u3, 0x88);
    t[12 + k] = _mm512_shuffle_f32x4(u1, u3, 0xdd);
  }
  for (int i = 0; i < 16; ++i) r[i] = t[i];
}

// 64 shuffles for 256 values, where the copy element by element costs a load and a store each
// with one side strided (measured: ~2.5% of a (1, 8, 512, 512, 64) forward, each way).
template <>
inline void transpose_block16<float>(const float* src, int64_t ss, int64_t rows, float* dst,
                                     int64_t ds, const float* row_scale) {
  __m512 r[16];
  for (int64_t j = 0; j < 16; ++j)
    r[j] = j < rows ? _mm512_loadu_ps(src + j * ss) : _mm512_setzero_ps();
  transpose16x16(r);
  for (int64_t f = 0; f < 16; ++f)
    _mm512_storeu_ps(dst + f * ds,
                     row_scale ? _mm512_mul_ps(r[f], _mm512_set1_ps(row_scale[f])) : r[f]);
}
#endif

#if defined(__AVX512BF16__)
// The same micro-GEMM on bfloat16 pairs (AVX512-BF16): every 32-bit lane of A and B holds two
// bfloat16 values along t, and vdpbf16ps adds both products to a float32 accumulator, so one
// instruction does twice the multiply-adds of an FMA. A(r, t) is the pair at byte offset
// r * ars + t * acs of a, broadcast; B rows are packed pairs, 2 x 16 lanes wide. With mul != 1
// the results are scaled (the softmax's scale, kept out of the rounded bfloat16 inputs).
template <int R, bool kAccumulate>
inline void gemm_bf16(const char* __restrict a, int64_t ars, int64_t acs,
                      const uint32_t* __restrict b, int64_t ldb, int64_t n, float* __restrict c,
                      int64_t ldc, float* __restrict colmax, float mul) {
  __m512 acc0[R], acc1[R];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) acc0[r] = acc1[r] = _mm512_setzero_ps();
  for (int64_t t = 0; t < n; ++t) {
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(b + t * ldb);
    const __m512bh b1 = (__m512bh)_mm512_loadu_si512(b + t * ldb + 16);
    const char* at = a + t * acs;
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      int32_t pair;
      std::memcpy(&pair, at + r * ars, sizeof pair);
      const __m512bh x = (__m512bh)_mm512_set1_epi32(pair);
      acc0[r] = _mm512_dpbf16_ps(acc0[r], x, b0);
      acc1[r] = _mm512_dpbf16_ps(acc1[r], x, b1);
    }
  }
  const __m512 mv = _mm512_set1_ps(mul);
  __m512 m0 = colmax ? _mm512_loadu_ps(colmax) : mv, m1 = colmax ? _mm512_loadu_ps(colmax + 16) : mv;
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    if (mul != 1.0f) {
      acc0[r] = _mm512_mul_ps(acc0[r], mv);
      acc1[r] = _mm512_mul_ps(acc1[r], mv);
    }
    if (kAccumulate) {
      acc0[r] = _mm512_add_ps(acc0[r], _mm512_loadu_ps(c + r * ldc));
      acc1[r] = _mm512_add_ps(acc1[r], _mm512_loadu_ps(c + r * ldc + 16));
    }
    _mm512_storeu_ps(c + r * ldc, acc0[r]);
    _mm512_storeu_ps(c + r * ldc + 16, acc1[r]);
    m0 = _mm512_max_ps(m0, acc0[r]);
    m1 = _mm512_max_ps(m1, acc1[r]);
  }
  if (colmax) {
    _mm512_storeu_ps(colmax, m0);
    _mm512_storeu_ps(colmax + 16, m1);
  }
}

constexpr int kBf16MR = 8;  // rows of a gemm_bf16 call: MR on AVX-512 (19 of 32 registers)

template <bool kAccumulate, int R = kBf16MR>
inline void gemm_bf16_rows(int rows, const char* a, int64_t ars, int64_t acs, const uint32_t* b,
                           int64_t ldb, int64_t n, float* c, int64_t ldc, float* colmax,
                           float mul) {
  if (rows == R) {
    gemm_bf16<R, kAccumulate>(a, ars, acs, b, ldb, n, c, ldc, colmax, mul);
  } else if constexpr (R > 1) {
    gemm_bf16_rows<kAccumulate, R - 1>(rows, a, ars, acs, b, ldb, n, c, ldc, colmax, mul);
  }
}

// gemm_panels on bfloat16 pairs: C (+)= A B over `rows` rows of C, kBf16MR at a time, and `panels`
// panels of 32 columns; panel p reads B from b + p * b_panel and writes C (and colmax, when
// given) at column 32 p.
template <bool kAccumulate>
inline void gemm_bf16_panels(int64_t rows, int64_t panels, const char* a, int64_t ars,
                             int64_t acs, const uint32_t* b, int64_t b_panel, int64_t ldb,
                             int64_t n, float* c, int64_t ldc, float* colmax, float mul) {
  constexpr int MR = kBf16MR, QP = 32;
  for (int64_t p = 0; p < panels; ++p)
    for (int64_t r = 0; r < rows; r += MR)
      gemm_bf16_rows<kAccumulate>(int(rows - r < MR ? rows - r : MR), a + r * ars, ars, acs,
                                  b + p * b_panel, ldb, n, c + r * ldc + p * QP, ldc,
                                  colmax ? colmax + p * QP : nullptr, mul);
}

// Rows x and y of float32 (16 lanes each) as bfloat16 pairs (x_i, y_i), rounded to nearest even.
inline __m512i pair_bf16(__m512 x, __m512 y) {
  const __m512i both = (__m512i)_mm512_cvtne2ps_pbh(y, x);  // x in the low 16 halves, y high
  const __m512i idx = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24,
                                       8, 23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  return _mm512_permutexvar_epi16(idx, both);
}
#endif

}  // namespace FASTATTN_ISA_NS
}  // namespace fastattn
