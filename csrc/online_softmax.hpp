// The online softmax (FlashAttention-2): one row of a score block at a time, a running maximum m
// and sum l per query row, the output accumulator rescaled only when m grows.
//
// Scores are in natural units, q . k * scale rounded once as the textbook formula rounds them, and
// the maximum is subtracted from them before anything else: exp(s - m) = exp2((s - m) * log2 e).
// Scores in base 2 (q pre-multiplied by scale * log2 e) saved that multiply, but rounded every
// score at the magnitude of the logits, in base 2: with logits of 1e3-1e5 and two near-equal top
// scores the error reached 3-30x PyTorch's (a fuzzer of such magnitudes, 1 call in ~40); with
// natural units and the difference taken first it stays within the textbook's in float32.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "problem.hpp"
#include "simd.hpp"

namespace fastattn {
namespace FASTATTN_ISA_NS {

constexpr double kLog2e = 1.4426950408889634;

// exp(x - m) for scores x and a maximum m in natural units: the subtraction (exact for close
// values) comes before the change of base, so no rounding at the logits' magnitude is added.
template <class T>
inline typename Simd<T>::V exp_minus(typename Simd<T>::V x, typename Simd<T>::V m) {
  return Exp2<T>::eval((x - m) * T(kLog2e));
}
template <class T>
inline T exp_minus(T x, T m) {
  return std::exp2((x - m) * T(kLog2e));
}

// The maximum a row subtracts from its scores: m, or 0 while m is -inf (the row has seen no key
// that takes part): exp(-inf - (-inf)) would be NaN, exp(-inf - 0) is the weight 0 it must be.
// The one statement of that rule, for a row (scalar) and for queries along the lanes (vector).
template <class T>
inline T subtracted_max(T m) {
  return m == -std::numeric_limits<T>::infinity() ? T(0) : m;
}
template <class T>
inline typename Simd<T>::V subtracted_max(typename Simd<T>::V m) {
  using S = Simd<T>;
  return m == S::splat(-std::numeric_limits<T>::infinity()) ? S::splat(T(0)) : m;
}

// Where the mask of one query row lives: element (i, j) of the block is at ptr[j * col_stride].
template <class T>
struct MaskRow {
  MaskKind kind = MaskKind::kNone;  // bool masks as bytes, additive ones in T
  const void* ptr = nullptr;
  int64_t col_stride = 0;
};

template <class T>
struct RowOps {
  using S = Simd<T>;
  using V = typename S::V;
  static constexpr int kLanes = S::kLanes;
  static constexpr T kNegInf = -std::numeric_limits<T>::infinity();

  static inline void fill(T* s, int64_t n, T value) {
    for (int64_t j = 0; j < n; ++j) s[j] = value;
  }

  // Applies the mask to s[0:n] (n keys of this block). Masked-out keys become -inf.
  static inline void apply_mask(T* s, int64_t n, const MaskRow<T>& mk) {
    if (mk.kind == MaskKind::kBool) {
      const uint8_t* m = static_cast<const uint8_t*>(mk.ptr);
      if (mk.col_stride == 0) {
        if (!m[0]) fill(s, n, kNegInf);
        return;
      }
      int64_t j = 0;
      if (mk.col_stride == 1) {
        typedef uint8_t B __attribute__((vector_size(kLanes)));
        const V ninf = S::splat(kNegInf);
        for (; j + kLanes <= n; j += kLanes) {
          B b;
          std::memcpy(&b, m + j, sizeof b);
          auto keep = __builtin_convertvector(b, typename S::I) != 0;
          S::store(s + j, keep ? S::load(s + j) : ninf);
        }
      }
      for (; j < n; ++j)
        if (!m[j * mk.col_stride]) s[j] = kNegInf;
    } else if (mk.kind == MaskKind::kAdditive) {
      const T* a = static_cast<const T*>(mk.ptr);
      if (mk.col_stride == 0) {
        const T add = a[0];
        for (int64_t j = 0; j < n; ++j) s[j] += add;
        return;
      }
      int64_t j = 0;
      if (mk.col_stride == 1)
        for (; j + kLanes <= n; j += kLanes) S::store(s + j, S::load(s + j) + S::load(a + j));
      for (; j < n; ++j) s[j] += a[j * mk.col_stride];
    }
  }

  // max over s[0:n], n a multiple of kLanes. A NaN score may or may not win the max; either way
  // exp2 turns it (or every weight of the row) into NaN, so the row is NaN, as in the reference.
  static inline T max(const T* s, int64_t n) {
    V m = S::splat(kNegInf);
    for (int64_t j = 0; j < n; j += kLanes) m = S::max(m, S::load(s + j));
    return S::hmax(m);
  }

  // s[j] = exp(s[j] - m) for j < n (n a multiple of kLanes); returns the lane-wise sums.
  static inline V exp_sum(T* s, int64_t n, T m) {
    const V mv = S::splat(m);
    V acc = S::splat(T(0));
    for (int64_t j = 0; j < n; j += kLanes) {
      const V p = exp_minus<T>(S::load(s + j), mv);
      S::store(s + j, p);
      acc += p;
    }
    return acc;
  }

  static inline void scale(T* o, int64_t n, T a) {
    const V av = S::splat(a);
    for (int64_t j = 0; j < n; j += kLanes) S::store(o + j, S::load(o + j) * av);
  }
};

// Running state of one query row. m is -inf until the row has seen a key that takes part; the
// sum l is kept lane by lane and reduced once at the end (no horizontal add per block).
template <class T>
struct RowState {
  T m;
  typename Simd<T>::V l;
  T sum() const { return Simd<T>::hsum(l); }
};

template <class T>
inline RowState<T> row_state_init() {
  return RowState<T>{RowOps<T>::kNegInf, Simd<T>::splat(T(0))};
}

// Folds a block of scores (already masked, n a multiple of kLanes, padding at -inf) with
// maximum block_max into the row's state: s becomes the block's unnormalized weights, and o is
// rescaled if the running max grew.
template <class T>
inline void online_softmax_update(T* s, int64_t n, T block_max, RowState<T>& st, T* o,
                                  int64_t n_o) {
  using R = RowOps<T>;
  const T m_new = block_max > st.m ? block_max : st.m;
  const T m_use = subtracted_max(m_new);
  if (m_use != st.m) {
    const T alpha = exp_minus(st.m, m_use);
    st.l *= alpha;
    R::scale(o, n_o, alpha);
  }
  st.l += R::exp_sum(s, n, m_use);
  st.m = m_new;
}

}  // namespace FASTATTN_ISA_NS
}  // namespace fastattn
