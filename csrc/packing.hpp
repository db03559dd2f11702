// The kernels' own copies of 16-bit operands: the layouts the tiles of a variant read (bfloat16
// key pairs, AMX's V^T), or float32 where a variant's tiles have no 16-bit products. Made by the
// entry points of kernel_isa.cpp behind the call, so that no caller knows these layouts.
//
// A copy holds each batch entry an operand really has (a broadcast axis stays broadcast: one
// entry, stride 0), compact, and is made on the call's threads, one entry at a time.
#pragma once

#include <cstdint>
#include <type_traits>

#include "half.hpp"
#include "kernel_common.hpp"
#include "problem.hpp"

namespace fastattn {
namespace FASTATTN_ISA_NS {

// The entries of an operand: its extent along each batch axis (1 where it broadcasts; k and v
// hold batch_shape / kv_group heads along the last axis). `paged`: k or v of a paged problem,
// whose first axis is its pages: one entry per sequence then.
struct Entries {
  int64_t count = 1;
  int64_t extent[kMaxBatchDims] = {};
  bool paged = false;
};

inline Entries entries_of(const Problem& a, const StridedView& view, int64_t group,
                          bool paged = false) {
  Entries n;
  n.paged = paged;
  for (int d = 0; d < a.n_batch_dims; ++d) {
    const int64_t size = d == a.n_batch_dims - 1 ? a.batch_shape[d] / group : a.batch_shape[d];
    n.extent[d] = view.batch_strides[d] == 0 && !(paged && d == 0) ? 1 : size;
    n.count *= n.extent[d];
  }
  return n;
}

// Offset (in elements) of entry e (row-major over the extents) in the view.
inline int64_t entry_offset(const Problem& a, const Entries& n, const StridedView& view,
                            int64_t e) {
  int64_t off = 0;
  for (int d = a.n_batch_dims - 1; d >= 0; --d) {
    off += (e % n.extent[d]) * view.batch_strides[d];
    e /= n.extent[d];
  }
  return off;
}

// The rows of entry e of an operand (row-major over the extents), as From: through the pages
// of a paged k or v (KeyRows, kernel_common.hpp), else by the view's strides.
template <class From>
inline KeyRows<From> entry_rows(const Problem& a, const Entries& n, const StridedView& view,
                                int64_t e) {
  if (n.paged) {  // the batch entry of sequence e / heads and (the first query head of) its head
    const int64_t heads = n.extent[1];
    return key_rows<From>(a, view, (e / heads) * a.batch_shape[1] + (e % heads) * a.kv_group);
  }
  KeyRows<From> rows;
  rows.base = static_cast<const From*>(view.data) + entry_offset(a, n, view, e);
  rows.rs = view.row_stride;
  return rows;
}

// The view of a compact copy: `per_entry` elements per entry, rows `ld` apart.
inline StridedView compact_view(const Problem& a, const Entries& n, const void* data,
                                int64_t per_entry, int64_t row_stride, int64_t col_stride) {
  StridedView view;
  view.data = data;
  int64_t stride = per_entry;
  for (int d = a.n_batch_dims - 1; d >= 0; --d) {
    view.batch_strides[d] = n.extent[d] == 1 ? 0 : stride;
    stride *= n.extent[d];
  }
  view.row_stride = row_stride;
  view.col_stride = col_stride;
  return view;
}

template <class To, class From>
inline To convert(From x) {
  if constexpr (std::is_same_v<To, From>)
    return x;
  else
    return to_float<To>(x);
}

// dst[r * ld + c] = src.row(r)[c * cs] as To, for r < rows and c < cols; zeros for
// cols <= c < ld (a zero feature changes no score).
template <class To, class From>
inline void copy_matrix(const KeyRows<From>& src, int64_t cs, int64_t rows, int64_t cols,
                        To* dst, int64_t ld) {
  for (int64_t r = 0; r < rows; ++r) {
    To* d = dst + r * ld;
    if (r >= src.readable) {  // past a paged entry's keys: never read
      for (int64_t c = 0; c < ld; ++c) d[c] = To{};
      continue;
    }
    const From* s = src.row(r);
    if (cs == 1) {
      widen(s, d, cols);
    } else {
      for (int64_t c = 0; c < cols; ++c) d[c] = convert<To>(s[c * cs]);
    }
    for (int64_t c = cols; c < ld; ++c) d[c] = To{};
  }
}

// One copy: its buffer, its entries and its view.
template <class To>
struct Copy {
  Buffer<To> buf;
  Entries n;
  int64_t per_entry = 0;
};

// Runs fill(dst, source_rows) for every entry of `view` on the call's threads, into a buffer of
// `per_entry` elements per entry. `keys`: view is k or v (read through the pages of a paged
// problem: the copy is not paged). False when the buffer could not be allocated.
template <class From, class To, class Fill>
bool copy_entries(const Problem& a, const StridedView& view, int64_t group, bool keys,
                  int64_t per_entry, Copy<To>& copy, Fill fill) {
  copy.n = entries_of(a, view, group, keys && a.block_table);
  copy.per_entry = per_entry;
  if (!copy.buf.reserve(copy.n.count * per_entry)) return false;
  struct None {};
  return for_each_item<None>(
      a, a.num_threads, copy.n.count, [](None&) { return true; }, [&](None&, int64_t e) {
        fill(copy.buf.ptr + e * per_entry, entry_rows<From>(a, copy.n, view, e));
      });
}

// A matrix operand (rows x cols of view) as To, rows ld apart (ld >= cols: zero padding). The
// view of the copy replaces `view`.
template <class To, class From>
bool copy_operand(const Problem& a, StridedView& view, int64_t group, bool keys, int64_t rows,
                  int64_t cols, int64_t ld, Copy<To>& copy) {
  const int64_t cs = view.col_stride;
  if (!copy_entries<From>(a, view, group, keys, rows * ld, copy,
                          [&](To* dst, const KeyRows<From>& src) {
                            copy_matrix(src, cs, rows, cols, dst, ld);
                          }))
    return false;
  view = compact_view(a, copy.n, copy.buf.ptr, rows * ld, ld, 1);
  return true;
}

// 16-bit q, k and v (and, given, out and dout) widened to float32 copies: for the tiles of a
// variant without 16-bit products. The problem then reads them as float32 (storage kSame).
template <class From>
struct Widened {
  Problem p;
  Copy<float> q, k, v, out, dout;

  bool make(const Problem& a, bool backward) {
    p = a;
    p.storage = Storage::kSame;
    p.block_table = nullptr;  // the copies of k and v are not paged
    const int64_t g = a.kv_group;
    return copy_operand<float, From>(a, p.q, 1, false, a.L, a.E, a.E, q) &&
           copy_operand<float, From>(a, p.k, g, true, a.S, a.E, a.E, k) &&
           copy_operand<float, From>(a, p.v, g, true, a.S, a.Ev, a.Ev, v) &&
           (!backward ||
            (copy_operand<float, From>(a, p.out, 1, false, a.L, a.Ev, a.Ev, out) &&
             copy_operand<float, From>(a, p.dout, 1, false, a.L, a.Ev, a.Ev, dout)));
  }
};

// q and k (of problem a, into its copy p) as bfloat16 with E padded with zero features to a
// multiple of `multiple`, k contiguous along it: copies where they are not so already, else read
// in place. E becomes the padded E. k is copied from a paged problem too: its packed v is not
// paged, and the problem's k and v are paged alike.
inline bool pad_features(const Problem& a, Problem& p, int64_t multiple, Copy<BFloat16>& q,
                         Copy<BFloat16>& k) {
  const int64_t E = a.E, E_pad = round_up(E, multiple);
  if (E_pad != E && !copy_operand<BFloat16, BFloat16>(a, p.q, 1, false, a.L, E, E_pad, q))
    return false;
  if ((E_pad != E || a.k.col_stride != 1 || a.block_table) &&
      !copy_operand<BFloat16, BFloat16>(a, p.k, a.kv_group, true, a.S, E, E_pad, k))
    return false;
  p.E = E_pad;
  p.block_table = nullptr;
  return true;
}

// bfloat16 for vdpbf16ps pairs (avx512bf16's tiles, tile_products.hpp): q and k with an even E,
// k contiguous along it, and v packed in pairs of keys: vp[j / 2][c] holds keys j and j + 1
// (even j; an odd S pairs the last with zero) of column c, low half first, rows Ev apart.
struct KeyPairs {
  Problem p;
  Copy<BFloat16> q, k;
  Copy<uint32_t> v;

  bool make(const Problem& a) {
    p = a;
    if (!pad_features(a, p, 2, q, k)) return false;
    const int64_t cs = a.v.col_stride, S = a.S, Ev = a.Ev;
    if (!copy_entries<BFloat16>(
            a, a.v, a.kv_group, true, (S + 1) / 2 * Ev, v,
            [&](uint32_t* dst, const KeyRows<BFloat16>& src) {
              const int64_t n = min64(S, src.readable);  // the rest: zeros
              for (int64_t t = 0; 2 * t < S; ++t) {
                const BFloat16* lo = 2 * t < n ? src.row(2 * t) : nullptr;
                const BFloat16* hi = 2 * t + 1 < n ? src.row(2 * t + 1) : nullptr;
                for (int64_t c = 0; c < Ev; ++c)
                  dst[t * Ev + c] = (lo ? uint32_t(lo[c * cs].bits) : 0u) |
                                    (hi ? uint32_t(hi[c * cs].bits) << 16 : 0u);
              }
            }))
      return false;
    p.v = compact_view(p, v.n, v.buf.ptr, (S + 1) / 2 * Ev, Ev, 1);
    return true;
  }
};

// bfloat16 for AMX tiles (the amx variant, tile_products.hpp): q and k with E padded to a
// multiple of 32 features (a tile row), k contiguous along it, and v transposed: V^T, a row per
// value column holding its keys contiguously, Ev and S zero-padded to multiples of 32.
struct AmxPacked {
  Problem p;
  Copy<BFloat16> q, k, v;

  bool make(const Problem& a) {
    p = a;
    if (!pad_features(a, p, 32, q, k)) return false;
    const int64_t cs = a.v.col_stride, S = a.S, Ev = a.Ev;
    const int64_t S32 = round_up(S, 32), Ev32 = round_up(Ev, 32);
    if (!copy_entries<BFloat16>(a, a.v, a.kv_group, true, Ev32 * S32, v,
                                [&](BFloat16* dst, const KeyRows<BFloat16>& src) {
                                  const int64_t n = min64(S, src.readable);
                                  for (int64_t c = 0; c < Ev32; ++c)
                                    for (int64_t s = 0; s < S32; ++s)
                                      dst[c * S32 + s] = c < Ev && s < n ? src.row(s)[c * cs]
                                                                         : BFloat16{};
                                }))
      return false;
    p.v = compact_view(p, v.n, v.buf.ptr, Ev32 * S32, 1, S32);
    return true;
  }
};

}  // namespace FASTATTN_ISA_NS
}  // namespace fastattn
