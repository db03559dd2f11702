// Portable SIMD vectors (GCC/Clang vector extensions) sized for the instruction set this copy of
// the kernel is compiled for, and a vectorized exp2.
//
// Included only from kernel_isa.cpp, inside the namespace of one instruction set, so nothing here
// can be merged by the linker with a copy compiled for another instruction set. For the same
// reason nothing in the kernel calls std:: templates that may not inline.
#pragma once

#include <cstdint>
#include <cstring>

#ifndef FASTATTN_VBYTES
#error "FASTATTN_VBYTES (vector width in bytes) must be defined by the build"
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
  static inline V splat(T x) { return V{} + x; }
  static inline V max(V a, V b) { return a > b ? a : b; }
  static inline T hmax(V v) {
    T m = v[0];
    for (int i = 1; i < kLanes; ++i) m = v[i] > m ? v[i] : m;
    return m;
  }
  static inline T hsum(V v) {
    T s = 0;
    for (int i = 0; i < kLanes; ++i) s += v[i];
    return s;
  }
};

// exp2 for the online softmax, whose arguments are s - max <= 0 (and NaN, which must propagate).
// 2^x = 2^n * 2^f with n = round(x), f in [-0.5, 0.5]; 2^n is built in the exponent bits.
// float: Cephes' exp2f minimax polynomial, relative error <= 2e-7 (about 2 ulp) on the range;
// double: Taylor series of degree 13, truncation error < 1e-17, so rounding (a few ulp) dominates.
// Arguments below -126 (float) / -1022 (double), -inf included, return exactly 0: such a weight is
// below the smallest normal number and beside the row's maximum (weight 1) it cannot count.
template <class T>
struct Exp2;

template <>
struct Exp2<float> {
  using S = Simd<float>;
  static inline S::V eval(S::V x) {
    const S::V lo = S::splat(-126.0f), hi = S::splat(127.0f);
    S::V xc = x < lo ? lo : x;  // NaN compares false: it stays NaN
    xc = xc > hi ? hi : xc;
    // Round to nearest with the 1.5 * 2^23 trick; the low mantissa bits then hold n.
    const S::V magic = S::splat(12582912.0f);
    S::V t = xc + magic;
    S::V n = t - magic;
    S::V f = xc - n;
    S::V p = S::splat(1.535336188319500e-4f);
    p = p * f + 1.339887440266574e-3f;
    p = p * f + 9.618437357674640e-3f;
    p = p * f + 5.550332471162809e-2f;
    p = p * f + 2.402264791363012e-1f;
    p = p * f + 6.931472028550421e-1f;
    p = p * f + 1.0f;
    S::I ti, mi;
    std::memcpy(&ti, &t, sizeof ti);
    S::V m = magic;
    std::memcpy(&mi, &m, sizeof mi);
    S::I bits = ((ti - mi) + 127) << 23;
    S::V two_n;
    std::memcpy(&two_n, &bits, sizeof two_n);
    S::V r = p * two_n;
    return x < lo ? S::splat(0.0f) : r;
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

}  // namespace FASTATTN_ISA_NS
}  // namespace fastattn
