// 16-bit float storage (IEEE float16 and bfloat16) widened to float32 on load.
//
// The kernels compute in float32 whatever the storage; reading K and V as 16-bit halves the
// bytes a decode step moves. Included from kernel_isa.cpp inside one instruction set's namespace.
#pragma once

#include <cstdint>
#include <cstring>

#include "simd.hpp"

namespace fastattn {
namespace FASTATTN_ISA_NS {

struct Half {
  uint16_t bits;
};
struct BFloat16 {
  uint16_t bits;
};

template <class T>
inline T to_float(T x) {
  return x;
}

template <class T>
inline T to_float(BFloat16 x) {
  const uint32_t u = uint32_t(x.bits) << 16;  // bfloat16 is the top half of a float32
  float f;
  std::memcpy(&f, &u, sizeof f);
  return T(f);
}

template <class T>
inline T to_float(Half x) {
#if defined(__F16C__)
  return T(_cvtsh_ss(x.bits));
#else
  // IEEE binary16 -> binary32 by hand: subnormals scaled exactly, inf and NaN kept.
  const uint32_t sign = uint32_t(x.bits & 0x8000u) << 16;
  const uint32_t exp = (x.bits >> 10) & 0x1fu, mant = x.bits & 0x3ffu;
  uint32_t u;
  if (exp == 0) {
    float f = float(mant) * 5.9604644775390625e-8f;  // mant * 2^-24
    std::memcpy(&u, &f, sizeof u);
    u |= sign;
  } else if (exp == 31) {
    u = sign | 0x7f800000u | (mant << 13);
  } else {
    u = sign | ((exp + 112) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &u, sizeof f);
  return T(f);
#endif
}

// The bfloat16 nearest to x (ties to even), as bits; NaN stays a (quiet) NaN.
inline uint16_t bfloat16_bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40u);
  return uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// One vector of floats from kLanes 16-bit values at p (widened on load, as the decode loops read
// K and V rows in place).
inline Simd<float>::V load_widened(const BFloat16* p) {
  using S = Simd<float>;
  typedef uint16_t H __attribute__((vector_size(S::kLanes * 2)));
  typedef uint32_t U __attribute__((vector_size(S::kLanes * 4)));
  H h;
  std::memcpy(&h, p, sizeof h);
  const U u = __builtin_convertvector(h, U) << 16;
  S::V v;
  std::memcpy(&v, &u, sizeof v);
  return v;
}

inline Simd<float>::V load_widened(const Half* p) {
  using S = Simd<float>;
#if defined(__AVX512F__) && FASTATTN_VBYTES == 64
  return S::V(_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))));
#elif defined(__F16C__) && FASTATTN_VBYTES == 32
  return S::V(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#else
  alignas(64) float f[S::kLanes];
  for (int i = 0; i < S::kLanes; ++i) f[i] = to_float<float>(p[i]);
  return S::load(f);
#endif
}

// dst[0:n] = src[0:n] as T.
template <class T>
inline void widen(const T* src, T* dst, int64_t n) {
  std::memcpy(dst, src, sizeof(T) * size_t(n));
}

inline void widen(const BFloat16* src, float* dst, int64_t n) {
  typedef uint16_t H8 __attribute__((vector_size(16)));
  typedef uint32_t U8 __attribute__((vector_size(32)));
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    H8 h;
    std::memcpy(&h, src + i, sizeof h);
    const U8 u = __builtin_convertvector(h, U8) << 16;
    std::memcpy(dst + i, &u, sizeof u);
  }
  for (; i < n; ++i) dst[i] = to_float<float>(src[i]);
}

inline void widen(const Half* src, float* dst, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512F__) && FASTATTN_VBYTES == 64
  for (; i + 16 <= n; i += 16)
    _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256(
                                  reinterpret_cast<const __m256i*>(src + i))));
#elif defined(__F16C__)
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i,
                     _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
#endif
  for (; i < n; ++i) dst[i] = to_float<float>(src[i]);
}

}  // namespace FASTATTN_ISA_NS
}  // namespace fastattn
