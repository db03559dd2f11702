// Pieces shared by the kernels: scratch buffers, batch offsets, masking one row of scores.
#pragma once

#include <cstdint>
#include <cstdlib>

#include "kernel_args.hpp"
#include "online_softmax.hpp"

namespace fastattn {
namespace FASTATTN_ISA_NS {

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }
inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

// A 64-byte aligned, growable scratch array owned by one thread.
template <class T>
struct Buffer {
  T* ptr = nullptr;
  int64_t size = 0;
  Buffer() = default;
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  ~Buffer() { std::free(ptr); }
  bool reserve(int64_t count) {
    if (count <= size) return true;
    std::free(ptr);
    const size_t bytes = size_t(round_up(max64(count, 1) * int64_t(sizeof(T)), 64));
    ptr = static_cast<T*>(std::aligned_alloc(64, bytes));
    size = ptr ? count : 0;
    return ptr != nullptr;
  }
};

// Offset (in elements) of one batch entry of a strided view. For k and v under grouped-query
// attention, the last batch axis (heads) is divided by the group size.
inline int64_t batch_offset(const KernelArgs& a, const StridedView& view, int64_t b,
                            int64_t group) {
  int64_t off = 0;
  for (int d = a.n_batch_dims - 1; d >= 0; --d) {
    const int64_t n = a.batch_shape[d];
    int64_t i = b % n;
    b /= n;
    if (d == a.n_batch_dims - 1) i /= group;
    off += i * view.batch_strides[d];
  }
  return off;
}

// Masks one row of base-2 scores s[0:n_pad] of query i against keys j0 .. j0 + nb - 1: padding
// keys (nb .. n_pad), keys past the causal limit and keys the user's mask removes become -inf;
// an additive mask is added (times log2(e)).
template <class T>
inline void mask_scores(const KernelArgs& a, T* srow, int64_t n_pad, int64_t i, int64_t j0,
                        int64_t nb, int64_t m_off) {
  using R = RowOps<T>;
  if (nb < n_pad) R::fill(srow + nb, n_pad - nb, R::kNegInf);
  if (a.causal) {
    const int64_t first_hidden = i + a.causal_offset + 1 - j0;  // keys j >= i + off + 1 hidden
    if (first_hidden < nb) {
      const int64_t from = max64(first_hidden, 0);
      R::fill(srow + from, nb - from, R::kNegInf);
    }
  }
  if (a.mask_kind != 0) {
    MaskRow<T> mk;
    mk.kind = a.mask_kind;
    mk.col_stride = a.mask.col_stride;
    const int64_t elem = a.mask_kind == 1 ? 1 : int64_t(sizeof(T));
    mk.ptr = static_cast<const char*>(a.mask.data) +
             (m_off + i * a.mask.row_stride + j0 * a.mask.col_stride) * elem;
    R::apply_mask(srow, nb, mk);
  }
}

// Whether mask_scores changes anything for rows i0 .. i_last of key block [j0, j0 + nb) padded
// to n_pad keys.
inline bool block_is_masked(const KernelArgs& a, int64_t i0, int64_t j0, int64_t nb,
                            int64_t n_pad) {
  return nb < n_pad || a.mask_kind != 0 || (a.causal && j0 + nb - 1 > i0 + a.causal_offset);
}

}  // namespace FASTATTN_ISA_NS
}  // namespace fastattn
