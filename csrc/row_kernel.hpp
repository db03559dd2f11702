// The kernel for a few query rows against many keys (a decode step: L = 1 against a KV cache).
//
// There the work is reading K and V once, so nothing is packed: each key's K and V rows are read
// in place (or gathered into a small buffer when their stride or width does not allow vector
// loads), scored against all query rows of the group, and folded into the online softmax. When
// batch x heads alone cannot keep every thread busy, the keys are split across threads and the
// partial (max, sum, output) triples are merged exactly at the end.
#pragma once

// Prefetch locality: 2 (prefetcht1, into L2). Measured on the decode case (16,32,1,8192,128),
// against np.dot reading the same bytes in the same run (AMD Zen 4): 2.4x its time with
// prefetcht0 into L1 (whose few miss buffers then limit a core), 1.3x with prefetcht1, 1.6x
// with prefetcht2. On Zen 5 (measured before K and V were read in segments, SEG below) none
// of these, nor no prefetch, prefetching 2 or 4 chunks ahead, every other line, or chunks of
// 16 to 256 keys, moved one thread's rate (~19 GB/s, where a plain read of the same chunks
// streams 40).
#ifndef FASTATTN_PFL
#define FASTATTN_PFL 2
#endif

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "half.hpp"
#include "kernel_common.hpp"
#include "online_softmax.hpp"

namespace fastattn {
namespace FASTATTN_ISA_NS {

// In: how q, k and v are stored: T itself, or Half / BFloat16 (widened to T = float on load, so
// a decode step reads half the bytes).
template <class T, class In = T>
struct RowKernel {
  using S = Simd<T>;
  using V = typename S::V;
  using R = RowOps<T>;
  static constexpr int kLanes = S::kLanes;
  // Query rows scored together: each K/V row loaded serves all of them. L up to this uses this
  // kernel; beyond, the tile kernel's packing pays for itself.
  static constexpr int RMAX = 4;
  // Keys per chunk: the chunk's gathered rows stay in L1.
  static constexpr int CK = 64;
  // Keys per segment: the segment's K rows are all scored (one run through K), then its chunks
  // go through the online softmax and their V rows are summed (one run through V), so that K
  // and V are read in long runs rather than alternating every CK rows; the arithmetic, chunk
  // by chunk, is unchanged. Decode (E = 64, 4 query rows a group, one thread, AMD Zen 5) took
  // 31-32 ns a key with runs of 64 keys, 28-29 with 4096 (and with 1024: between); the
  // RMAX x SEG scores (64 KiB in float32) stay in L2.
  static constexpr int SEG = 4096;
  // A key split is worth a merge only with at least this many keys per part.
  static constexpr int64_t kMinKeysPerSplit = 512;
  static constexpr int64_t kMaxSplits = 64;

  const Problem& a;
  const int64_t Ep, Evp, n_groups;
  int64_t splits = 1, keys_per_split = 0;

  explicit RowKernel(const Problem& args)
      : a(args),
        Ep(round_up(args.E, kLanes)),
        Evp(round_up(args.Ev, kLanes)),
        n_groups((args.L + RMAX - 1) / RMAX) {
    const int64_t units = a.batch_count * n_groups;
    // Splits only occupy threads: one thread would pay their merge for nothing.
    if (a.num_threads > 1 && a.num_splits > 1) {
      splits = min64(a.num_splits, kMaxSplits);
    } else if (a.num_threads > 1 && a.num_splits == 0 && units > 0 &&
               units < 2 * int64_t(a.num_threads)) {
      const int64_t want = (2 * int64_t(a.num_threads) + units - 1) / units;
      splits = max64(1, min64(min64(want, kMaxSplits), a.S / kMinKeysPerSplit));
    }
    keys_per_split = round_up((a.S + splits - 1) / splits, CK);
    if (keys_per_split == 0) keys_per_split = CK;
  }

  // One group's result over one range of keys: unnormalized output and its (max, sum).
  struct Partial {
    T* o;  // RMAX x Evp
    T m[RMAX];
    T l[RMAX];
  };

  struct Workspace {
    Buffer<T> qv, s, o, kbuf, vbuf;
    const void* krows[CK];  // In rows in place, or T rows gathered into kbuf (see rows_of)
    const void* vrows[CK];
    const In* kpf[CK];  // the next chunk's K and V rows, to prefetch
    const In* vpf[CK];
  };

  bool allocate(Workspace& ws) const {
    return ws.qv.reserve(RMAX * Ep) && ws.s.reserve(RMAX * SEG) && ws.o.reserve(RMAX * Evp) &&
           ws.kbuf.reserve(CK * Ep) && ws.vbuf.reserve(CK * Evp);
  }

  // Row pointers for keys j0 .. j0 + nb - 1 of a K or V view: in place when rows are contiguous
  // and a whole number of vectors wide, else gathered (zero-padded to `width_p`) into buf.
  // Returns true for rows in place (of In, 16-bit ones widened by the loops as they load), false
  // for rows gathered into buf (already T).
  static bool rows_of(const KeyRows<In>& src_rows, int64_t cs, int64_t width, int64_t width_p,
                      int64_t j0, int64_t nb, T* buf, const void** rows) {
    const In* in[CK];
    src_rows.fill(j0, nb, in);
    if (cs == 1 && width == width_p) {
      for (int64_t j = 0; j < nb; ++j) rows[j] = in[j];
      return true;
    }
    for (int64_t j = 0; j < nb; ++j) {
      const In* src = in[j];
      T* dst = buf + j * width_p;
      if (cs == 1) {
        widen(src, dst, width);
      } else {
        for (int64_t c = 0; c < width; ++c) dst[c] = to_float<T>(src[c * cs]);
      }
      for (int64_t c = width; c < width_p; ++c) dst[c] = T(0);
      rows[j] = dst;
    }
    return false;
  }

  // A vector of T from a row of RT: T itself, or 16-bit storage widened.
  template <class RT>
  static inline V ld(const RT* p) {
    if constexpr (std::is_same_v<RT, T>) {
      return S::load(p);
    } else {
      return load_widened(p);
    }
  }

  // The rows of the next chunk, prefetched while this one is computed: rows[0 : n] of `bytes`.
  struct Prefetch {
    const In* const* rows = nullptr;  // null: none
    int64_t n = 0, bytes = 0;
    void row(int64_t r) const {
      if (r < n) prefetch_row(reinterpret_cast<const char*>(rows[r]), bytes);
    }
  };

  // Every K and V vector loaded serves all rows of the group, and the accumulators (rows x
  // keys for the scores, rows x vectors for the output) are independent FMA chains that hide
  // the FMA's latency: kAcc of them, 16 with 32 vector registers (AVX-512), 8 with 16. The
  // scores take KJ(R) keys at a time, whose sums come out kLanes at a time (lane_sums: a third
  // of the instructions of one horizontal sum each); the output NVA vectors of every row.
  // Measured on the decode case (16, 32/8, 1, 8192, 128) on AMD Zen 5 against the row at a
  // time before: 1.6x faster with K and V in L3, 4-10% with them in memory.
  static constexpr int kAcc = FASTATTN_VBYTES >= 64 ? 16 : 8;
  static constexpr int KJ(int R) { return R == 3 ? kAcc / 4 : kAcc / R; }
  static constexpr int NVA = kAcc / RMAX;

  // s[r * SEG + j] = q_r . k_j * scale for rows r < R and keys j < nb (the scale applied to the
  // sum, as the textbook does: see online_softmax.hpp). While key j is scored, the K row of key
  // j + CK (next chunk's) is prefetched (pf.rows == nullptr: none): spread over the loop, the
  // prefetches never fill the miss queues in one burst.
  template <int R, class RT>
  void scores(const T* qv, const void* const* kr, int64_t nb, T* s, const Prefetch& pf) const {
    constexpr int J = KJ(R);
    const RT* const* krows = reinterpret_cast<const RT* const*>(kr);
    const T sc = T(a.scale);
    int64_t j = 0;
    for (; j + J <= nb; j += J) {
      if (pf.rows)
        for (int64_t t = j; t < j + J; ++t) pf.row(t);
      V acc[R * J];
#pragma GCC unroll 16
      for (int i = 0; i < R * J; ++i) acc[i] = S::splat(T(0));
      // Key by key, each K row read from its start to its end: reading the J rows a vector of
      // each at a time, one thread streamed K from memory at 0.6x the rate (AMD Zen 5, E = 64,
      // measured by the cycles of the scores' pass alone). Each accumulator still sums its
      // features in order.
#pragma GCC unroll 16
      for (int t = 0; t < J; ++t) {
        const RT* kt = krows[j + t];
        for (int64_t e = 0; e < Ep; e += kLanes) {
          const V kv = ld(kt + e);
#pragma GCC unroll 4
          for (int r = 0; r < R; ++r) acc[r * J + t] += S::load(qv + r * Ep + e) * kv;
        }
      }
      store_sums<R, J>(acc, s + j, sc);
    }
    for (; j < nb; ++j) {
      if (pf.rows) pf.row(j);
      V acc[R];
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) acc[r] = S::splat(T(0));
      for (int64_t e = 0; e < Ep; e += kLanes) {
        const V kv = ld(krows[j] + e);
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r) acc[r] += S::load(qv + r * Ep + e) * kv;
      }
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) s[r * SEG + j] = S::hsum(acc[r]) * sc;
    }
  }

  // s[r * SEG + t] = sum of the lanes of acc[r * J + t], times sc: kLanes sums at a time where
  // the accumulators fill whole vectors of sums, else one horizontal sum each. Both add the
  // lanes in the same order (halves, then quarters, ...): the scores are the same bits.
  template <int R, int J>
  static inline void store_sums(const V* acc, T* s, T sc) {
    if constexpr (R * J % kLanes == 0) {
      alignas(64) T sums[R * J];
#pragma GCC unroll 4
      for (int g = 0; g < R * J; g += kLanes) S::store(sums + g, S::lane_sums(acc + g) * sc);
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) std::memcpy(s + r * SEG, sums + r * J, sizeof(T) * J);
    } else {
#pragma GCC unroll 16
      for (int i = 0; i < R * J; ++i) s[i / J * SEG + i % J] = S::hsum(acc[i]) * sc;
    }
  }

  // o[r * ldo + cc : ... + NV vectors] += sum_j p[r * SEG + j] v_j[cc : ...] for rows r < R,
  // the R x NV accumulators in registers. With pf, as scores: the V row of key j + CK is
  // prefetched while key j is summed.
  template <int R, int NV, class RT>
  static void accumulate(const T* p, const void* const* vr, int64_t nb, int64_t cc, T* o,
                         int64_t ldo, const Prefetch& pf) {
    const RT* const* vrows = reinterpret_cast<const RT* const*>(vr);
    V acc[R][NV];
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
      for (int i = 0; i < NV; ++i) acc[r][i] = S::splat(T(0));
    for (int64_t j = 0; j < nb; ++j) {
      if (pf.rows) pf.row(j);
      const RT* row = vrows[j] + cc;
      V vv[NV];
#pragma GCC unroll 8
      for (int i = 0; i < NV; ++i) vv[i] = ld(row + i * kLanes);
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        const V pj = S::splat(p[r * SEG + j]);
#pragma GCC unroll 8
        for (int i = 0; i < NV; ++i) acc[r][i] += pj * vv[i];
      }
    }
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
      for (int i = 0; i < NV; ++i) {
        T* dst = o + r * ldo + cc + i * kLanes;
        S::store(dst, S::load(dst) + acc[r][i]);
      }
  }

  // o[r * Evp : ...] += sum_j p[r * SEG + j] v_j for the R rows: column blocks of NVA vectors,
  // then 2 and 1; the first block's pass prefetches the next chunk's V rows (or, with fewer
  // vectors than a block, one burst does).
  template <int R, class RT>
  void accumulate_rows(const T* p, const void* const* vrows, int64_t nb, T* o,
                       const Prefetch& pf) const {
    int64_t cc = 0;
    if (pf.rows && Evp < NVA * kLanes)
      for (int64_t j = 0; j < pf.n; ++j) pf.row(j);
    for (; cc + NVA * kLanes <= Evp; cc += NVA * kLanes)
      accumulate<R, NVA, RT>(p, vrows, nb, cc, o, Evp, cc == 0 ? pf : Prefetch());
    if (NVA > 2 && cc + 2 * kLanes <= Evp)
      accumulate<R, 2, RT>(p, vrows, nb, cc, o, Evp, Prefetch()), cc += 2 * kLanes;
    if (cc < Evp) accumulate<R, 1, RT>(p, vrows, nb, cc, o, Evp, Prefetch());
  }

  // f(std::integral_constant<int, rows>) for rows in 1 .. RMAX: the row count as a template
  // argument, so that the accumulators of every row stay in registers.
  template <class F>
  static void for_rows(int64_t rows, F f) {
    static_assert(RMAX == 4, "for_rows dispatches 1 .. 4 rows");
    switch (rows) {
      case 1: return f(std::integral_constant<int, 1>());
      case 2: return f(std::integral_constant<int, 2>());
      case 3: return f(std::integral_constant<int, 3>());
      default: return f(std::integral_constant<int, 4>());
    }
  }

  static inline void prefetch_row(const char* row, int64_t bytes) {
    for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(row + off, 0, FASTATTN_PFL);
  }

  // The group's query rows, widened to T and zero-padded to Ep, into ws.qv.
  void load_queries(Workspace& ws, int64_t b, int64_t i0, int64_t rows) const {
    const In* Q = static_cast<const In*>(a.q.data) + batch_offset(a, a.q, b, 1);
    for (int64_t r = 0; r < rows; ++r) {
      const In* src = Q + (i0 + r) * a.q.row_stride;
      T* dst = ws.qv.ptr + r * Ep;
      for (int64_t e = 0; e < a.E; ++e) dst[e] = to_float<T>(src[e * a.q.col_stride]);
      for (int64_t e = a.E; e < Ep; ++e) dst[e] = T(0);
    }
  }

  // One group's pass over its keys: where they lie, its parameters and its softmax's state.
  struct Pass {
    KeyRows<In> K, Vs;
    EntryParams<T> ep;
    int64_t i0, rows, m_off, k_end;
    RowState<T> st[RMAX];
    Partial* part;
    bool pf_ok;
    int64_t k_bytes, v_bytes;
  };

  // Scores of keys [g0, g1) (a segment) into ws.s, chunk by chunk: a run through K. Decode is
  // bound by memory: while a chunk is computed, the next chunk's K rows are prefetched, one row
  // per key processed (a burst of prefetches would stall on full miss queues).
  void score_segment(Workspace& ws, const Pass& ps, int64_t g0, int64_t g1) const {
    for (int64_t j0 = g0; j0 < g1; j0 += CK) {
      const int64_t nb = min64(CK, g1 - j0);
      const int64_t next = max64(0, min64(CK, ps.k_end - j0 - CK));
      const bool in_place = rows_of(ps.K, a.k.col_stride, a.E, Ep, j0, nb, ws.kbuf.ptr, ws.krows);
      Prefetch pf;
      if (ps.pf_ok && next) ps.K.fill(j0 + CK, next, ws.kpf), pf = {ws.kpf, next, ps.k_bytes};
      T* s_at = ws.s.ptr + (j0 - g0);
      for_rows(ps.rows, [&](auto n) {
        if (in_place)
          this->template scores<decltype(n)::value, In>(ws.qv.ptr, ws.krows, nb, s_at, pf);
        else
          this->template scores<decltype(n)::value, T>(ws.qv.ptr, ws.krows, nb, s_at, pf);
      });
    }
  }

  // The segment's chunks in order: logits and the online softmax, then the weighted V rows (a
  // run through V, the next chunk's rows prefetched as K's are).
  void sum_segment(Workspace& ws, Pass& ps, int64_t g0, int64_t g1) const {
    for (int64_t j0 = g0; j0 < g1; j0 += CK) {
      const int64_t nb = min64(CK, g1 - j0), nb_p = round_up(nb, kLanes);
      const int64_t next = max64(0, min64(CK, ps.k_end - j0 - CK));
      T* s_at = ws.s.ptr + (j0 - g0);
      T* o = ps.part->o;
      for (int64_t r = 0; r < ps.rows; ++r) {
        T* srow = s_at + r * SEG;
        mask_scores(a, ps.ep, srow, nb_p, ps.i0 + r, j0, nb, ps.m_off);
        online_softmax_update(srow, nb_p, R::max(srow, nb_p), ps.st[r], o + r * Evp, Evp);
      }
      const bool in_place = rows_of(ps.Vs, a.v.col_stride, a.Ev, Evp, j0, nb, ws.vbuf.ptr,
                                    ws.vrows);
      Prefetch pf;
      if (ps.pf_ok && next) ps.Vs.fill(j0 + CK, next, ws.vpf), pf = {ws.vpf, next, ps.v_bytes};
      for_rows(ps.rows, [&](auto n) {
        if (in_place)
          this->template accumulate_rows<decltype(n)::value, In>(s_at, ws.vrows, nb, o, pf);
        else
          this->template accumulate_rows<decltype(n)::value, T>(s_at, ws.vrows, nb, o, pf);
      });
    }
  }

  // Attends query rows i0 .. i0 + rows - 1 of batch entry b to keys [k_begin, k_end): only
  // keys inside the band of some row of the group, and within kv_lengths, are read, segment
  // by segment (SEG); the first chunk's rows are prefetched up front.
  void group(Workspace& ws, int64_t b, int64_t i0, int64_t k_begin, int64_t k_end,
             Partial& part) const {
    Pass ps;
    ps.K = key_rows<In>(a, a.k, b);
    ps.Vs = key_rows<In>(a, a.v, b);
    ps.ep = entry_params<T>(a, b);
    ps.i0 = i0;
    ps.rows = min64(RMAX, a.L - i0);
    ps.m_off = a.mask_kind != MaskKind::kNone ? batch_offset(a, a.mask, b, 1) : 0;
    ps.part = &part;
    ps.pf_ok = a.k.col_stride == 1 && a.v.col_stride == 1;
    ps.k_bytes = a.E * int64_t(sizeof(In));
    ps.v_bytes = a.Ev * int64_t(sizeof(In));
    load_queries(ws, b, i0, ps.rows);
    for (int64_t r = 0; r < ps.rows; ++r) ps.st[r] = row_state_init<T>();
    std::memset(part.o, 0, sizeof(T) * size_t(RMAX * Evp));
    int64_t first, last;
    key_range(ps.ep, i0, i0 + ps.rows - 1, first, last);
    k_begin = max64(k_begin, first);
    ps.k_end = k_end = max64(k_begin, min64(k_end, last));
    if (k_begin < k_end && ps.pf_ok) {
      const int64_t nb = min64(CK, k_end - k_begin);
      ps.K.fill(k_begin, nb, ws.kpf);
      ps.Vs.fill(k_begin, nb, ws.vpf);
      const Prefetch first_k{ws.kpf, nb, ps.k_bytes}, first_v{ws.vpf, nb, ps.v_bytes};
      for (int64_t j = 0; j < nb; ++j) first_k.row(j), first_v.row(j);
    }
    // (A paged cache's pages lie in random order: there one segment per chunk measured best.)
    const int64_t seg = a.block_table ? CK : SEG;
    for (int64_t g0 = k_begin; g0 < k_end; g0 += seg) {
      if (stop_requested(a)) return;  // the call raises: what is written does not matter
      const int64_t g1 = min64(g0 + seg, k_end);
      score_segment(ws, ps, g0, g1);
      sum_segment(ws, ps, g0, g1);
    }
    for (int64_t r = 0; r < ps.rows; ++r) {
      part.m[r] = ps.st[r].m;
      part.l[r] = ps.st[r].sum();
    }
  }

  // Writes rows of a group from its partials over all splits (one partial: a plain division).
  void finish(int64_t b, int64_t i0, const Partial* parts) const {
    const int64_t rows = min64(RMAX, a.L - i0);
    T* out = static_cast<T*>(const_cast<void*>(a.out.data)) + batch_offset(a, a.out, b, 1);
    const T sink = a.sinks.data ? entry_params<T>(a, b).sink : R::kNegInf;
    for (int64_t r = 0; r < rows; ++r) {
      T m = R::kNegInf;
      for (int64_t sp = 0; sp < splits; ++sp) m = parts[sp].m[r] > m ? parts[sp].m[r] : m;
      T m_use = subtracted_max(m);
      T l = 0;
      T w[kMaxSplits];
      for (int64_t sp = 0; sp < splits; ++sp) {
        w[sp] = splits == 1 ? T(1) : exp_minus(parts[sp].m[r], m_use);
        l += parts[sp].l[r] * w[sp];
      }
      const T inv = fold_sink(sink, m_use, l);
      if (a.lse.data) write_lse(a, b, i0 + r, m_use, l);
      T* dst = out + (i0 + r) * a.out.row_stride;
      T probe = 0;  // x * 0 is NaN for an inf or a NaN x, 0 otherwise
      for (int64_t cc = 0; cc < a.Ev; ++cc) {
        T acc = 0;
        for (int64_t sp = 0; sp < splits; ++sp) acc += parts[sp].o[r * Evp + cc] * w[sp];
        dst[cc * a.out.col_stride] = acc * inv;
        probe += acc * T(0);
      }
      // An output the accumulator could not hold: reported, for the caller to run again with v
      // scaled down (see the tile kernel's finish).
      if (!(probe == T(0))) report_nonfinite(a);
    }
  }

  KernelStatus run() {
    const int64_t units = a.batch_count * n_groups;
    if (units == 0) return KernelStatus::kOk;
    const int64_t items = units * splits;
    // Partial outputs of every item: only as many as there are items (splits > 1 means few).
    const int64_t per_item = splits > 1 ? RMAX * Evp : 0;
    Buffer<T> partial_o;
    Buffer<Partial> parts;
    if (!partial_o.reserve(items * per_item) || !parts.reserve(splits > 1 ? items : 1))
      return KernelStatus::kOutOfMemory;
    const int threads = int(min64(a.num_threads, items));
    const bool ok = for_each_item<Workspace>(
        a, threads, items, [&](Workspace& ws) { return allocate(ws); },
        [&](Workspace& ws, int64_t it) {
          const int64_t unit = it / splits, sp = it % splits;
          const int64_t b = unit / n_groups, i0 = (unit % n_groups) * RMAX;
          const int64_t k0 = min64(a.S, sp * keys_per_split);
          const int64_t k1 = min64(a.S, k0 + keys_per_split);
          if (splits == 1) {
            Partial part;
            part.o = ws.o.ptr;
            group(ws, b, i0, k0, k1, part);
            finish(b, i0, &part);
          } else {
            Partial& part = parts.ptr[it];
            part.o = partial_o.ptr + it * per_item;
            group(ws, b, i0, k0, k1, part);
          }
        });
    if (!ok) return KernelStatus::kOutOfMemory;
    if (splits > 1) {  // only with more than one thread (see the constructor)
      for_each_item<int>(
          a, threads, units, [](int&) { return true; },
          [&](int&, int64_t unit) {
            finish(unit / n_groups, (unit % n_groups) * RMAX, parts.ptr + unit * splits);
          });
    }
    return KernelStatus::kOk;
  }
};

}  // namespace FASTATTN_ISA_NS
}  // namespace fastattn
