// The fused attention kernel: tiles of BM queries against blocks of BN keys, online softmax, the
// output normalized once at the end. No L x S buffer exists; per thread the scratch is one
// BM x BN score block, one BM x Ev accumulator and the packed K and V of the head in use.
#pragma once

#include <cstdint>
#include <cstring>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "kernel_common.hpp"
#include "micro_kernels.hpp"
#include "online_softmax.hpp"

namespace fastattn {
namespace FASTATTN_ISA_NS {

template <class T>
struct TileKernel {
  using M = Micro<T>;
  using R = RowOps<T>;
  static constexpr int MR = M::MR;
  static constexpr int NR = M::NR;
  // BM = 8 micro-tiles of rows: the packed Q tile (BM x E) and the score block (BM x BN) together
  // stay within L1 for E <= 64 and leave L2 to the packed K/V of the head. BN = 4 panels: 128
  // float32 keys on AVX-512, large enough to amortize the per-row softmax bookkeeping.
  static constexpr int BM = MR * 8;
  static constexpr int BN = 4 * NR;

  const KernelArgs& a;
  const int64_t Sp, Evp, n_kblocks, n_qtiles;

  explicit TileKernel(const KernelArgs& args)
      : a(args),
        Sp(round_up(args.S, BN)),
        Evp(round_up(args.Ev, NR)),
        n_kblocks(round_up(args.S, BN) / BN),
        n_qtiles((args.L + BM - 1) / BM) {}

  struct Workspace {
    Buffer<T> qp, s, o, kp, vp;
    RowState<T> st[BM];
    typename M::V rowmax[BM];
    T lsum[BM];  // final sums, for write_weights
    int64_t k_off = -1, v_off = -1;  // which K and V are packed
    int64_t packed_blocks = 0;       // how many key blocks of them
    bool ok = true;
  };

  bool allocate(Workspace& ws) const {
    return ws.qp.reserve(int64_t(BM) * a.E) && ws.s.reserve(int64_t(BM) * BN) &&
           ws.o.reserve(int64_t(BM) * Evp) && ws.kp.reserve(Sp * a.E) && ws.vp.reserve(Sp * Evp);
  }

  template <class X>
  static const X* at(const StridedView& view, int64_t off) {
    return static_cast<const X*>(view.data) + off;
  }

  // Packs key blocks [ws.packed_blocks, blocks) of K (transposed, in panels) and V (in panels).
  void pack_kv(Workspace& ws, int64_t k_off, int64_t v_off, int64_t blocks) const {
    if (k_off != ws.k_off || v_off != ws.v_off) {
      ws.k_off = k_off;
      ws.v_off = v_off;
      ws.packed_blocks = 0;
    }
    if (blocks <= ws.packed_blocks) return;
    const T* K = at<T>(a.k, k_off);
    const T* Vs = at<T>(a.v, v_off);
    const int64_t E = a.E, Ev = a.Ev;
    const int64_t krs = a.k.row_stride, kcs = a.k.col_stride;
    const int64_t vrs = a.v.row_stride, vcs = a.v.col_stride;
    const int64_t n0 = ws.packed_blocks * BN, n1 = blocks * BN;
    for (int64_t n = n0; n < n1; ++n) {
      T* kpanel = ws.kp.ptr + (n / NR) * E * NR + n % NR;
      T* vrow = ws.vp.ptr + n * NR;
      if (n < a.S) {
        const T* krow = K + n * krs;
        for (int64_t e = 0; e < E; ++e) kpanel[e * NR] = krow[e * kcs];
        const T* vsrc = Vs + n * vrs;
        for (int64_t c = 0; c < Ev; ++c) vrow[(c / NR) * Sp * NR + c % NR] = vsrc[c * vcs];
        for (int64_t c = Ev; c < Evp; ++c) vrow[(c / NR) * Sp * NR + c % NR] = T(0);
      } else {
        for (int64_t e = 0; e < E; ++e) kpanel[e * NR] = T(0);
        for (int64_t c = 0; c < Evp; ++c) vrow[(c / NR) * Sp * NR + c % NR] = T(0);
      }
    }
    ws.packed_blocks = blocks;
  }

  // Scores of key block kb for all (padded) rows of the tile: s = qp kp^T, base 2, and each
  // row's maximum before masking in ws.rowmax.
  void block_scores(Workspace& ws, int64_t rows_p, int64_t kb) const {
    const int64_t E = a.E;
    for (int64_t r = 0; r < rows_p; ++r) ws.rowmax[r] = M::S::splat(R::kNegInf);
    for (int64_t r0 = 0; r0 < rows_p; r0 += MR)
      for (int p = 0; p < BN / NR; ++p)
        M::qk(ws.qp.ptr + r0 * E, E, E, ws.kp.ptr + (kb * (BN / NR) + p) * E * NR,
              ws.s.ptr + r0 * BN + p * NR, BN, ws.rowmax + r0);
  }

  void tile(Workspace& ws, int64_t b, int64_t qt) const {
    const int64_t E = a.E, Ev = a.Ev;
    const int64_t i0 = qt * BM;
    const int64_t rows = min64(BM, a.L - i0);
    const int64_t rows_p = round_up(rows, MR);
    const int64_t q_off = batch_offset(a, a.q, b, 1);
    const int64_t k_off = batch_offset(a, a.k, b, a.kv_group);
    const int64_t v_off = batch_offset(a, a.v, b, a.kv_group);
    const int64_t m_off = a.mask_kind ? batch_offset(a, a.mask, b, 1) : 0;

    // Key blocks this tile needs: under the causal band, only those left of the last row's limit.
    int64_t blocks = n_kblocks;
    if (a.causal) {
      const int64_t last = i0 + rows - 1 + a.causal_offset;
      blocks = last < 0 ? 0 : min64(n_kblocks, last / BN + 1);
    }
    pack_kv(ws, k_off, v_off, blocks);

    // Q tile, times scale * log2(e) so that scores come out in base 2; padding rows are zero.
    const T c = T(a.scale * kLog2e);
    const T* Q = at<T>(a.q, q_off);
    for (int64_t r = 0; r < rows_p; ++r) {
      T* dst = ws.qp.ptr + r * E;
      if (r < rows) {
        const T* src = Q + (i0 + r) * a.q.row_stride;
        for (int64_t e = 0; e < E; ++e) dst[e] = src[e * a.q.col_stride] * c;
      } else {
        for (int64_t e = 0; e < E; ++e) dst[e] = T(0);
      }
    }
    for (int64_t r = 0; r < rows; ++r) ws.st[r] = row_state_init<T>();
    std::memset(ws.o.ptr, 0, sizeof(T) * size_t(rows_p * Evp));

    for (int64_t kb = 0; kb < blocks; ++kb) {
      const int64_t j0 = kb * BN, nb = min64(BN, a.S - j0);
      block_scores(ws, rows_p, kb);
      const bool masked = block_is_masked(a, i0, j0, nb, BN);
      for (int64_t r = 0; r < rows; ++r) {
        T* srow = ws.s.ptr + r * BN;
        T block_max;
        if (masked) {
          mask_scores(a, srow, BN, i0 + r, j0, nb, m_off);
          block_max = R::max(srow, BN);
        } else {
          block_max = M::S::hmax(ws.rowmax[r]);
        }
        online_softmax_update(srow, BN, block_max, ws.st[r], ws.o.ptr + r * Evp, Evp);
      }
      // Padding rows hold raw scores of zero queries (0): they only feed padding output rows.
      for (int64_t r0 = 0; r0 < rows_p; r0 += MR)
        for (int64_t cp = 0; cp < Evp / NR; ++cp)
          M::pv(ws.s.ptr + r0 * BN, BN, nb, ws.vp.ptr + cp * Sp * NR + j0 * NR,
                ws.o.ptr + r0 * Evp + cp * NR, Evp);
    }

    // Normalize once. A row with no key (l == 0) gives zeros; a NaN sum stays NaN.
    T* out = static_cast<T*>(const_cast<void*>(a.out.data)) + batch_offset(a, a.out, b, 1);
    for (int64_t r = 0; r < rows; ++r) {
      const T l = ws.st[r].sum();
      ws.lsum[r] = l;
      const T inv = l == T(0) ? T(0) : T(1) / l;
      const T* o = ws.o.ptr + r * Evp;
      T* dst = out + (i0 + r) * a.out.row_stride;
      for (int64_t cc = 0; cc < Ev; ++cc) dst[cc * a.out.col_stride] = o[cc] * inv;
    }
    if (a.weights.data) write_weights(ws, b, i0, rows, rows_p, blocks, m_off);
  }

  // The normalized weights, for return_weights: scores are recomputed block by block against the
  // final row maximum and sum (as FlashAttention does), so the forward pass stays single-pass.
  void write_weights(Workspace& ws, int64_t b, int64_t i0, int64_t rows, int64_t rows_p,
                     int64_t blocks, int64_t m_off) const {
    T* W = static_cast<T*>(const_cast<void*>(a.weights.data)) + batch_offset(a, a.weights, b, 1);
    const int64_t wrs = a.weights.row_stride, wcs = a.weights.col_stride;
    for (int64_t kb = 0; kb < n_kblocks; ++kb) {
      const int64_t j0 = kb * BN, nb = min64(BN, a.S - j0);
      if (kb < blocks) block_scores(ws, rows_p, kb);
      for (int64_t r = 0; r < rows; ++r) {
        T* dst = W + (i0 + r) * wrs + j0 * wcs;
        const T m = ws.st[r].m, l = ws.lsum[r];
        if (kb >= blocks || l == T(0)) {
          for (int64_t j = 0; j < nb; ++j) dst[j * wcs] = T(0);
          continue;
        }
        T* srow = ws.s.ptr + r * BN;
        mask_scores(a, srow, BN, i0 + r, j0, nb, m_off);
        R::exp2_sum(srow, BN, m == R::kNegInf ? T(0) : m);
        const T inv = T(1) / l;
        for (int64_t j = 0; j < nb; ++j) dst[j * wcs] = srow[j] * inv;
      }
    }
  }

  KernelStatus run() const {
    const int64_t items = a.batch_count * n_qtiles;
    if (items == 0) return KernelStatus::kOk;
    const int threads = int(min64(a.num_threads, items));
    bool failed = false;
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
      Workspace ws;
      const bool ok = allocate(ws);
      if (!ok) {
#pragma omp atomic write
        failed = true;
      }
      // Dynamic scheduling: tiles of a causal problem differ in cost. Within a batch entry the
      // tiles run from the last (most keys) to the first, so the cheap ones fill the gaps at the
      // end; consecutive tiles of one head land on the same thread and reuse its packed K/V.
#pragma omp for schedule(dynamic, 1)
      for (int64_t it = 0; it < items; ++it) {
        if (!ok) continue;
        const int64_t b = it / n_qtiles, t = it % n_qtiles;
        tile(ws, b, a.causal ? n_qtiles - 1 - t : t);
      }
    }
    return failed ? KernelStatus::kOutOfMemory : KernelStatus::kOk;
  }
};

}  // namespace FASTATTN_ISA_NS
}  // namespace fastattn
