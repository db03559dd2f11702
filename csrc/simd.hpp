// Portable SIMD vectors (GCC/Clang vector extensions) sized for the instruction set this copy of
// the kernel is compiled for, and a vectorized exp2.
//
// Included only from kernel_isa.cpp, inside the namespace of one instruction set, so nothing here
// can be merged by the linker with a copy compiled for another instruction set. For the same
// reason nothing in the kernel calls std:: templates that may not inline.
#pragma once

#include <cstdint>
#include <cstring>
#include <utility>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#ifndef FASTATTN_VBYTES
#error "FASTATTN_VBYTES (vector width in bytes) must be defined by the build (isa_table.def)"
#endif

namespace fastattn {
namespace FASTATTN_ISA_NS {

template <class T>
struct IntOf;
template <>
struct IntOf<float> {
  using type = int32_t;
};
template <>
struct IntOf<double> {
  using type = int64_t;
};

#if defined(__x86_64__) && FASTATTN_VBYTES == 64
inline __m512 broadcast(float x) { return _mm512_set1_ps(x); }
inline __m512d broadcast(double x) { return _mm512_set1_pd(x); }
#elif defined(__x86_64__) && FASTATTN_VBYTES == 32
inline __m256 broadcast(float x) { return _mm256_set1_ps(x); }
inline __m256d broadcast(double x) { return _mm256_set1_pd(x); }
#elif defined(__x86_64__) && FASTATTN_VBYTES == 16
inline __m128 broadcast(float x) { return _mm_set1_ps(x); }
inline __m128d broadcast(double x) { return _mm_set1_pd(x); }
#endif

// Horizontal reductions by halving: log2(lanes) vector steps (extract + op) instead of one scalar
// step per lane. The halves come from __builtin_shufflevector, not memcpy: taking the vector's
// address made GCC keep the row kernel's dot-product accumulators in memory (a store and a
// reload per FMA, measured at 2.5x the decode time).
template <class T, int Bytes>
struct Halving {
  static constexpr int N = Bytes / int(sizeof(T));
  typedef T W __attribute__((vector_size(Bytes)));
  typedef T H __attribute__((vector_size(Bytes / 2)));
  template <size_t... I>
  static inline H half(W v, std::index_sequence<I...>, size_t from) {
    return H{v[from + I]...};
  }
  static inline H lo(W v) {
    if constexpr (N == 16) return __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7);
    else if constexpr (N == 8) return __builtin_shufflevector(v, v, 0, 1, 2, 3);
    else if constexpr (N == 4) return __builtin_shufflevector(v, v, 0, 1);
    else return half(v, std::make_index_sequence<N / 2>{}, 0);
  }
  static inline H hi(W v) {
    if constexpr (N == 16) return __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
    else if constexpr (N == 8) return __builtin_shufflevector(v, v, 4, 5, 6, 7);
    else if constexpr (N == 4) return __builtin_shufflevector(v, v, 2, 3);
    else return half(v, std::make_index_sequence<N / 2>{}, N / 2);
  }
  static inline T max(W v) {
    const H a = lo(v), b = hi(v);
    return Halving<T, Bytes / 2>::max(a > b ? a : b);
  }
  static inline T sum(W v) { return Halving<T, Bytes / 2>::sum(lo(v) + hi(v)); }
};
template <class T>
struct Halving<T, int(2 * sizeof(T))> {
  typedef T W __attribute__((vector_size(2 * sizeof(T))));
  static inline T max(W v) { return v[0] > v[1] ? v[0] : v[1]; }
  static inline T sum(W v) { return v[0] + v[1]; }
};

// The sums of kLanes vectors at once: lane l of the result is the sum of the lanes of x[l].
// log2(lanes) levels of pairwise combining (two shuffles and an add merge two vectors' halves):
// lanes - 1 combines in all, 3 (lanes - 1) instructions, where one horizontal sum per vector
// takes 2 log2(lanes) each (45 against 128 for 16 float lanes). Combining x[2i] and x[2i + 1]
// level after level leaves the sums in bit-reversed order, so the inputs are taken in it.
constexpr int bit_reversed(int i, int n) {
  int r = 0;
  for (int b = 1; b < n; b <<= 1) r = (r << 1) | ((i & b) ? 1 : 0);
  return r;
}
// Lane i of comb(a, b) at granularity g: in each block of 2g lanes, a's first g lanes of the
// block then b's (lo), or their second g lanes (hi); b's lanes are numbered from n.
constexpr int comb_index(int i, int g, int n, bool hi) {
  const int p = i / (2 * g), r = i % (2 * g), off = hi ? g : 0;
  return r < g ? p * 2 * g + r + off : n + p * 2 * g + (r - g) + off;
}
// (Templated on the element and the width: a vector typedef passed as a template argument
// loses its vector attribute.)
template <class T, int Bytes>
struct LaneSums {
  static constexpr int N = Bytes / int(sizeof(T));
  typedef T V __attribute__((vector_size(Bytes)));
  template <int G, size_t... I>
  static inline V comb(V a, V b, std::index_sequence<I...>) {
    return __builtin_shufflevector(a, b, comb_index(int(I), G, N, false)...) +
           __builtin_shufflevector(a, b, comb_index(int(I), G, N, true)...);
  }
  // One level: G pairs combined at granularity G (G vectors left, G lanes per input).
  template <int G>
  static inline void level(V* x) {
#pragma GCC unroll 16
    for (int i = 0; i < G; ++i)
      x[i] = comb<G>(x[2 * i], x[2 * i + 1], std::make_index_sequence<N>{});
    if constexpr (G > 1) level<G / 2>(x);
  }
  static inline V sums(const V* in) {
    V x[N];
#pragma GCC unroll 16
    for (int i = 0; i < N; ++i) x[i] = in[bit_reversed(i, N)];
    if constexpr (N > 1) level<N / 2>(x);
    return x[0];
  }
};

template <class T>
struct Simd {
  static constexpr int kBytes = FASTATTN_VBYTES;
  static constexpr int kLanes = kBytes / int(sizeof(T));
  typedef T V __attribute__((vector_size(kBytes)));
  typedef typename IntOf<T>::type I __attribute__((vector_size(kBytes)));

  static inline V load(const T* p) {
    V v;
    std::memcpy(&v, p, sizeof(V));
    return v;
  }
  static inline void store(T* p, V v) { std::memcpy(p, &v, sizeof(V)); }
  // The broadcast intrinsic folds into the FMA's memory operand ({1to16}); `V{} + x` would
  // cost an extra scalar add, since 0 + x is not x for x = -0.
  static inline V splat(T x) {
#if defined(__x86_64__)
    return V(broadcast(x));
#else
    return V{} + x;
#endif
  }
  static inline V max(V a, V b) { return a > b ? a : b; }
  static inline T hmax(V v) { return Halving<T, kBytes>::max(v); }
  static inline T hsum(V v) { return Halving<T, kBytes>::sum(v); }
  // Lane l: the sum of the lanes of x[l], for kLanes vectors x (LaneSums).
  static inline V lane_sums(const V* x) { return LaneSums<T, kBytes>::sums(x); }
};

// exp2 for the online softmax, whose arguments are s - max <= 0 (and NaN, which must propagate).
// 2^x = 2^n * 2^f with n = round(x), f in [-0.5, 0.5]; 2^n is built in the exponent bits.
// float: Cephes' exp2f minimax polynomial; double: Taylor series of degree 13 (truncation error
// below 1e-17). Relative error against exact 2^x on [-126, 0] (float) and [-1022, 0] (double),
// measured over 2e6 points on every path: below 1 ulp (0.84 * eps at most); tests/test_exp2.py
// holds every path to 1 eps. Arguments below -126 (float) / -1022 (double), -inf included, give
// exactly 0: such a weight is below the smallest normal number beside the row's maximum
// (weight 1), and returning 0 keeps denormals, and their slow arithmetic, out of the products.
template <class T>
struct Exp2;

// Cephes' coefficients: 2^f = 1 + f * P(f) on [-0.5, 0.5].
template <class V>
inline V exp2_poly_f32(V f) {
  V p = f * 1.535336188319500e-4f + 1.339887440266574e-3f;
  p = p * f + 9.618437357674640e-3f;
  p = p * f + 5.550332471162809e-2f;
  p = p * f + 2.402264791363012e-1f;
  p = p * f + 6.931472028550421e-1f;
  return p * f + 1.0f;
}

template <>
struct Exp2<float> {
  using S = Simd<float>;
  static inline S::V eval(S::V x) {
#if defined(__AVX512F__) && FASTATTN_VBYTES == 64
    // AVX-512: round and scale by 2^n in one instruction each, and zero the underflowing lanes
    // in the same scalef (the "not less than" compare is true for NaN, which then propagates).
    const __m512 xv = __m512(x);
    const __mmask16 keep = _mm512_cmp_ps_mask(xv, _mm512_set1_ps(-126.0f), _CMP_NLT_UQ);
    const __m512 n = _mm512_roundscale_ps(xv, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const S::V p = exp2_poly_f32(x - S::V(n));
    return S::V(_mm512_maskz_scalef_ps(keep, __m512(p), n));
#else
    const S::V lo = S::splat(-126.0f), hi = S::splat(127.0f);
    S::V xc = x < lo ? lo : x;  // NaN compares false: it stays NaN
    xc = xc > hi ? hi : xc;
    // Round to nearest with the 1.5 * 2^23 trick; the low mantissa bits then hold n.
    const S::V magic = S::splat(12582912.0f);
    S::V t = xc + magic;
    S::V n = t - magic;
    S::V p = exp2_poly_f32(xc - n);
    S::I ti, mi;
    std::memcpy(&ti, &t, sizeof ti);
    S::V m = magic;
    std::memcpy(&mi, &m, sizeof mi);
    S::I bits = ((ti - mi) + 127) << 23;
    S::V two_n;
    std::memcpy(&two_n, &bits, sizeof two_n);
    S::V r = p * two_n;
    return x < lo ? S::splat(0.0f) : r;
#endif
  }
};

template <>
struct Exp2<double> {
  using S = Simd<double>;
  static inline S::V eval(S::V x) {
    const S::V lo = S::splat(-1022.0), hi = S::splat(1023.0);
    S::V xc = x < lo ? lo : x;
    xc = xc > hi ? hi : xc;
    const S::V magic = S::splat(6755399441055744.0);  // 1.5 * 2^52
    S::V t = xc + magic;
    S::V n = t - magic;
    S::V f = (xc - n) * 0.6931471805599453;  // 2^f = e^(f ln 2)
    // e^g for |g| <= 0.347, Horner form of the Taylor series to degree 13.
    S::V p = S::splat(1.0 / 6227020800.0);
    p = p * f + 1.0 / 479001600.0;
    p = p * f + 1.0 / 39916800.0;
    p = p * f + 1.0 / 3628800.0;
    p = p * f + 1.0 / 362880.0;
    p = p * f + 1.0 / 40320.0;
    p = p * f + 1.0 / 5040.0;
    p = p * f + 1.0 / 720.0;
    p = p * f + 1.0 / 120.0;
    p = p * f + 1.0 / 24.0;
    p = p * f + 1.0 / 6.0;
    p = p * f + 0.5;
    p = p * f + 1.0;
    p = p * f + 1.0;
    S::I ti, mi;
    std::memcpy(&ti, &t, sizeof ti);
    S::V m = magic;
    std::memcpy(&mi, &m, sizeof mi);
    S::I bits = ((ti - mi) + 1023) << 52;
    S::V two_n;
    std::memcpy(&two_n, &bits, sizeof two_n);
    S::V r = p * two_n;
    return x < lo ? S::splat(0.0) : r;
  }
};

// tanh for softcapping (c * tanh(s / c)), from Cephes: on |x| < 0.625 an odd polynomial (float)
// or rational function (double) accurate to about 1 ulp; above, (1 - t) / (1 + t) with
// t = 2^(-2 |x| log2 e) in (0, 0.29], where neither cancellation nor overflow can occur (t
// underflows to 0 for large |x|, giving exactly 1). NaN propagates, +-inf gives +-1.
template <class T>
struct Tanh {
  using S = Simd<T>;
  using V = typename S::V;
  static inline V eval(V x) {
    const V ax = x < S::splat(T(0)) ? -x : x;
    const V z = x * x;
    V small;
    if constexpr (sizeof(T) == 4) {
      V p = z * T(-5.70498872745e-3) + T(2.06390887954e-2);
      p = p * z + T(-5.37397155531e-2);
      p = p * z + T(1.33314422036e-1);
      p = p * z + T(-3.33332819422e-1);
      small = p * z * x + x;
    } else {
      V p = z * T(-9.64399179425052238628e-1) + T(-9.92877231001918586564e1);
      p = p * z + T(-1.61468768441708447952e3);
      V q = z + T(1.12811678491632931402e2);
      q = q * z + T(2.23548839060100448583e3);
      q = q * z + T(4.84406305325125486048e3);
      small = x + x * z * (p / q);
    }
    const V t = Exp2<T>::eval(ax * T(-2.8853900817779268));  // 2^(-2 |x| log2 e) = e^(-2|x|)
    V big = (T(1) - t) / (T(1) + t);
    big = x < S::splat(T(0)) ? -big : big;
    return ax < S::splat(T(0.625)) ? small : big;
  }
};

}  // namespace FASTATTN_ISA_NS
}  // namespace fastattn
