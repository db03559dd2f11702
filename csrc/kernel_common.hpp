// Pieces shared by the kernels: scratch buffers, batch offsets, masking one row of scores.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <limits>

#include "problem.hpp"
#include "online_softmax.hpp"
#include "thread_pool.hpp"

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
  // Never leaves ptr null, even for count 0 (Ev = 0): memset and pointer arithmetic on a null
  // pointer are undefined, even with size 0 (UBSan flags them).
  bool reserve(int64_t count) {
    if (ptr && count <= size) return true;
    std::free(ptr);
    const size_t bytes = size_t(round_up(max64(count, 1) * int64_t(sizeof(T)), 64));
    ptr = static_cast<T*>(std::aligned_alloc(64, bytes));
    size = ptr ? count : 0;
    return ptr != nullptr;
  }
};

// Offset (in elements) of one batch entry of a strided view. For k and v under grouped-query
// attention, the last batch axis (heads) is divided by the group size.
inline int64_t batch_offset(const Problem& a, const StridedView& view, int64_t b,
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

// Per-batch-entry scalars of the problem: the ALiBi slope (negated), the number of keys that
// take part, the sink, and the entry's diagonal and band (the problem's, moved by diag_shift).
template <class T>
struct EntryParams {
  T neg_slope = T(0);  // -slope: ALiBi's bias per unit of distance
  int64_t keys = 0;     // min(S, kv_lengths[b])
  T sink = -std::numeric_limits<T>::infinity();  // the sink logit; -inf: none
  int64_t band_lo = 0, band_hi = 0;  // query i sees keys i + band_lo .. i + band_hi
  int64_t offset = 0;                // query i's diagonal is key i + offset
};

// The keys of batch entry b that take part: min(S, kv_lengths[b]).
inline int64_t entry_keys(const Problem& a, int64_t b) {
  if (!a.kv_lengths.data) return a.S;
  const int64_t n =
      static_cast<const int64_t*>(a.kv_lengths.data)[batch_offset(a, a.kv_lengths, b, 1)];
  return min64(a.S, max64(n, 0));
}

template <class T>
inline EntryParams<T> entry_params(const Problem& a, int64_t b) {
  EntryParams<T> e;
  e.keys = entry_keys(a, b);
  if (a.alibi.data)
    e.neg_slope = -static_cast<const T*>(a.alibi.data)[batch_offset(a, a.alibi, b, 1)];
  if (a.sinks.data) e.sink = static_cast<const T*>(a.sinks.data)[batch_offset(a, a.sinks, b, 1)];
  e.band_lo = a.band_lo;
  e.band_hi = a.band_hi;
  e.offset = a.offset;
  if (a.diag_shift.data) {  // an unbounded side stays unbounded
    const int64_t s =
        static_cast<const int64_t*>(a.diag_shift.data)[batch_offset(a, a.diag_shift, b, 1)];
    e.offset += s;
    if (e.band_lo > -kNoBound) e.band_lo = max64(e.band_lo + s, -kNoBound);
    if (e.band_hi < kNoBound) e.band_hi = min64(e.band_hi + s, kNoBound);
  }
  return e;
}

// Keys [first, last) that some query of rows i0 .. i_last can see: the band and kv_lengths.
template <class T>
inline void key_range(const EntryParams<T>& e, int64_t i0, int64_t i_last, int64_t& first,
                      int64_t& last) {
  first = max64(0, i0 + e.band_lo);
  last = min64(e.keys, i_last + e.band_hi + 1);
  if (last < first) last = first;
}

// Where one batch entry's key rows lie in k or v (elements of E, as stored): row j at
// base + j * rs, or, in a paged problem (problem.hpp), through the sequence's row of the block
// table. Rows j .. run_end(j) - 1 are rs apart (one page), which the tiles' products need.
template <class E>
struct KeyRows {
  const E* base = nullptr;  // unpaged: row 0; paged: the entry's head in page 0
  int64_t rs = 0;
  const int32_t* pages = nullptr;  // the sequence's page ids; null: unpaged
  int64_t page_size = 0, page_stride = 0;
  // Rows that may be read: paged, the entry's keys (the pages past them are not checked).
  int64_t readable = std::numeric_limits<int64_t>::max();

  const E* row(int64_t j) const {
    if (!pages) return base + j * rs;
    return base + int64_t(pages[j / page_size]) * page_stride + (j % page_size) * rs;
  }
  // out[t] = row(j0 + t) for t < n, walking the pages (one division, not one per row).
  void fill(int64_t j0, int64_t n, const E** out) const {
    if (!pages) {
      for (int64_t t = 0; t < n; ++t) out[t] = base + (j0 + t) * rs;
      return;
    }
    int64_t p = j0 / page_size, r = j0 % page_size;
    const E* page = base + int64_t(pages[p]) * page_stride;
    for (int64_t t = 0; t < n; ++t) {
      out[t] = page + r * rs;
      if (++r == page_size && t + 1 < n) {  // the next page's id only when it is read
        r = 0;
        page = base + int64_t(pages[++p]) * page_stride;
      }
    }
  }
  int64_t run_end(int64_t j) const {
    return pages ? (j / page_size + 1) * page_size : std::numeric_limits<int64_t>::max();
  }
};

// The key rows of batch entry b in `view` (k or v, or a copy of either), read as E. In a paged
// problem the first batch axis indexes pages, not entries.
template <class E>
inline KeyRows<E> key_rows(const Problem& a, const StridedView& view, int64_t b) {
  KeyRows<E> r;
  r.rs = view.row_stride;
  if (!a.block_table) {
    r.base = static_cast<const E*>(view.data) + batch_offset(a, view, b, a.kv_group);
    return r;
  }
  const int64_t heads = a.batch_shape[1], s = b / heads;
  r.base = static_cast<const E*>(view.data) + (b % heads) / a.kv_group * view.batch_strides[1];
  r.pages = a.block_table + s * a.block_table_stride;
  r.page_size = a.page_size;
  r.page_stride = view.batch_strides[0];
  r.readable = entry_keys(a, b);
  return r;
}

// softcap * tanh(s / softcap) on n scores (n a multiple of the vector width).
template <class T>
inline void softcap_scores(const Problem& a, T* s, int64_t n) {
  using S = Simd<T>;
  const T c = T(a.softcap), inv = T(1) / c;
  for (int64_t j = 0; j < n; j += S::kLanes)
    S::store(s + j, Tanh<T>::eval(S::load(s + j) * inv) * c);
}

// 0, 1, .., kLanes - 1 as a vector (an integer-valued T is exact up to 2^24 and beyond).
template <class T>
inline typename Simd<T>::V iota() {
  alignas(64) T lanes[Simd<T>::kLanes];
  for (int i = 0; i < Simd<T>::kLanes; ++i) lanes[i] = T(i);
  return Simd<T>::load(lanes);
}

// One line of scores on its way to logits. The row kernel's lines are the keys of one query,
// the tile kernel's the queries of one key (a row of S^T); each view only says where the line
// lies, and line_to_logits applies the one policy to both.
template <class T>
struct ScoreLine {
  int64_t n = 0;      // scores on the line (its vectors' lanes past n are padding)
  int64_t dist0 = 0;  // ALiBi: element t lies |dist0 + t| from its query's diagonal
  MaskRow<T> mask;    // the user's mask along the line (kind kNone: none, or not needed)
  int64_t seen_lo = 0, seen_hi = 0;  // with a band: elements [seen_lo, seen_hi) lie inside it
};

// The user's mask at (query i, key j), advancing by `stride` elements along a line.
template <class T>
inline MaskRow<T> mask_at(const Problem& a, int64_t m_off, int64_t i, int64_t j,
                          int64_t stride) {
  MaskRow<T> mk;
  mk.kind = a.mask_kind;
  mk.col_stride = stride;
  const int64_t elem = a.mask_kind == MaskKind::kBool ? 1 : int64_t(sizeof(T));
  mk.ptr = static_cast<const char*>(a.mask.data) +
           (m_off + i * a.mask.row_stride + j * a.mask.col_stride) * elem;
  return mk;
}

// Turns one line of scores into logits, in the reference's order after softcap (which the
// callers apply to whole blocks first): the ALiBi bias, the user's mask (keys a bool mask
// removes become -inf) and, last, -inf outside the band whatever the additive mask held (+inf
// would make NaN). Its vectors' padding lanes may be touched; they hold -inf or are ignored.
template <class T>
inline void line_to_logits(const Problem& a, const EntryParams<T>& e, T* s,
                           const ScoreLine<T>& line) {
  using S = Simd<T>;
  using V = typename S::V;
  using R = RowOps<T>;
  if (a.alibi.data) {  // distances in T: exact up to 2^24 for float32
    const V d0 = iota<T>() + T(line.dist0);
    for (int64_t t = 0; t < line.n; t += S::kLanes) {
      const V d = d0 + T(t);
      S::store(s + t, S::load(s + t) + (d < T(0) ? -d : d) * e.neg_slope);
    }
  }
  if (line.mask.kind != MaskKind::kNone) R::apply_mask(s, line.n, line.mask);
  if (a.has_band) {
    R::fill(s, line.seen_lo, R::kNegInf);
    R::fill(s + line.seen_hi, line.n - line.seen_hi, R::kNegInf);
  }
}

// The row view: one row of scores s[0:n_pad] of query i against keys j0 .. j0 + nb - 1 into
// logits; softcap first, padding keys (nb .. n_pad) -inf. Key j0 + t lies j0 + t - i - offset
// right of the diagonal; query i sees keys [i + band_lo, i + band_hi] (the entry's).
template <class T>
inline void mask_scores(const Problem& a, const EntryParams<T>& e, T* srow, int64_t n_pad,
                        int64_t i, int64_t j0, int64_t nb, int64_t m_off) {
  using R = RowOps<T>;
  if (a.softcap > 0) softcap_scores(a, srow, n_pad);
  if (nb < n_pad) R::fill(srow + nb, n_pad - nb, R::kNegInf);
  ScoreLine<T> line;
  line.n = nb;
  line.dist0 = j0 - i - e.offset;
  if (a.mask_kind != MaskKind::kNone) line.mask = mask_at<T>(a, m_off, i, j0, a.mask.col_stride);
  line.seen_lo = min64(max64(i + e.band_lo - j0, 0), nb);
  line.seen_hi = min64(max64(i + e.band_hi + 1 - j0, line.seen_lo), nb);
  line_to_logits(a, e, srow, line);
}

// lse[i] of batch entry b: the natural log-sum-exp of the row's logits, from the maximum m that
// was subtracted and the sum l of the weights; -inf for a row with no key (l == 0).
template <class T>
inline void write_lse(const Problem& a, int64_t b, int64_t i, T m, T l) {
  T* lse = static_cast<T*>(const_cast<void*>(a.lse.data)) + batch_offset(a, a.lse, b, 1);
  lse[i * a.lse.row_stride] = l == T(0) ? RowOps<T>::kNegInf : m + std::log(l);
}

// Folds the attention sink (a logit, -inf for none) into a row's final maximum m and sum l,
// once, after its last key: the sink only adds to the denominator, so folding it at the end
// leaves the hot loops as they are. Returns the factor that normalizes the row's output,
// accumulated against the old m: 0 for a row with no key (its lse is then the sink itself).
template <class T>
inline T fold_sink(T sink, T& m, T& l) {
  if (sink == RowOps<T>::kNegInf) return l == T(0) ? T(0) : T(1) / l;
  // The larger of the two is subtracted, so exp never overflows for a sink far above the scores.
  const T m2 = l == T(0) || sink > m ? sink : m;
  const T alpha = l == T(0) ? T(0) : exp_minus(m, m2);
  l = l * alpha + exp_minus(sink, m2);
  m = m2;
  return alpha / l;
}

// Whether the band hides some key of block [j0, j0 + nb) from some query of rows i0 .. i_last.
template <class T>
inline bool band_cuts(const EntryParams<T>& e, int64_t i0, int64_t i_last, int64_t j0,
                      int64_t nb) {
  return j0 < i_last + e.band_lo || j0 + nb - 1 > i0 + e.band_hi;
}

// Whether the call was asked to stop (Ctrl-C; see thread_pool.hpp): checked between items and
// between blocks of a long item, so a stop is noticed within one block of work. A call without
// an interrupt check (the C++ driver, calls from threads other than Python's main thread) pays
// one compare.
inline bool stop_requested(const Problem& a) {
  return a.control && ::fastattn::stop_requested(a.control);
}

// Whether x[0:n] (n a multiple of the vector width) holds an inf or a NaN: x * 0 is NaN exactly
// for those, and a NaN in a sum of such products stays NaN. A pass over data in L1.
template <class T>
inline bool any_nonfinite(const T* x, int64_t n) {
  using S = Simd<T>;
  typename S::V acc = S::splat(T(0));
  for (int64_t j = 0; j < n; j += S::kLanes) acc += S::load(x + j) * T(0);
  return !(S::hsum(acc) == T(0));
}

// Records that an output of the call is not finite (see Problem::nonfinite).
inline void report_nonfinite(const Problem& a) {
  if (a.nonfinite) __atomic_store_n(a.nonfinite, 1, __ATOMIC_RELAXED);
}

// Runs body(ws, item) for every item in [0, items) on up to `threads` threads of fastattn's
// pool (thread_pool.hpp), handed out one at a time (items differ in cost under a band), each
// thread with its own Workspace made ready by allocate(ws). The caller's thread takes part; with
// one thread nothing else is touched. Every thread count completes the work, so a thread the OS
// would not start only slows the call. False when an allocation failed (the call then fails).
// Items left when the call is asked to stop are skipped.
template <class Workspace, class Allocate, class Body>
bool for_each_item(const Problem& a, int threads, int64_t items, Allocate allocate, Body body) {
  struct Run {
    Allocate& allocate;
    Body& body;
    CallControl* control;
    int64_t items;
    int64_t next;  // the next item to hand out (atomic builtins: no std::atomic in this file)
    int failed;
    void operator()() {
      Workspace ws;
      if (!allocate(ws)) {
        __atomic_store_n(&failed, 1, __ATOMIC_RELAXED);
        return;
      }
      for (;;) {
        const int64_t it = __atomic_fetch_add(&next, 1, __ATOMIC_RELAXED);
        if (it >= items || (control && ::fastattn::stop_requested(control))) return;
        body(ws, it);
      }
    }
  } run{allocate, body, a.control, items, 0, 0};
  if (items > 0)
    parallel_run(threads, [](void* ctx, int) { (*static_cast<Run*>(ctx))(); }, &run);
  return !run.failed;
}

}  // namespace FASTATTN_ISA_NS
}  // namespace fastattn
