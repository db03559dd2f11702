// The problem, as the binding fills it and every kernel variant reads it: one struct, from the
// Python layer (fastattn._core.Problem, built by keyword from a plan) to the kernels.
//
// The core knows nothing of Python. NumPy semantics (broadcasting, dtype promotion, argument
// checks) are resolved by the Python layer; what arrives here is plain pointers, one broadcast
// batch shape, and element strides (possibly 0 or negative) for every operand. The struct holds
// no std:: containers so that no library template is instantiated inside an
// instruction-set-specific translation unit, where the linker could pick an AVX-512 copy of it
// for a CPU without AVX-512.
//
// A new option is a field here (with its default), its keyword in fastattn._core.Problem, its
// value in the CPU backend's plan conversion, and its use in the kernels: nothing else.
#pragma once

#include <cstdint>

namespace fastattn {

struct CallControl;  // thread_pool.hpp

// What the kernel computes in.
enum class DType : int { kFloat32 = 0, kFloat64 = 1 };

// How q, k and v (and, in the backward pass, out and dout) are stored: in the compute dtype, or
// as 16-bit floats (float16, bfloat16) of a float32 problem. The kernels read 16-bit storage as
// given, in the layout they want: a decode step's rows widen it as they read; the tiles of the
// avx512bf16 and amx variants pack bfloat16 for their products, the others widen it once
// (kernel_isa.cpp). Nothing of this reaches the caller.
enum class Storage : int { kSame = 0, kFloat16 = 1, kBFloat16 = 2 };

enum class MaskKind : int { kNone = 0, kBool = 1, kAdditive = 2 };

// A band side that bounds nothing; far from int64's limits so that i + bound cannot overflow.
constexpr int64_t kNoBound = int64_t(1) << 60;

constexpr int kMaxBatchDims = 64;  // NumPy's own limit on ndim

// A strided view: element strides for each batch axis (0 where broadcast), then for the two
// matrix axes.
struct StridedView {
  const void* data = nullptr;
  int64_t batch_strides[kMaxBatchDims] = {};
  int64_t row_stride = 0;  // along L (q, out, mask, weights, lse) or S (k, v)
  int64_t col_stride = 0;  // along E / Ev (q, k, v, out) or S (mask, weights)
};

struct Problem {
  // ---- given by the caller ----
  DType dtype = DType::kFloat32;
  Storage storage = Storage::kSame;
  int n_batch_dims = 0;
  int64_t batch_shape[kMaxBatchDims] = {};  // broadcast batch shape of the output
  int64_t L = 0, S = 0, E = 0, Ev = 0;

  StridedView q, k, v;
  // Grouped-query attention: along the last batch axis, k and v are read at index h / kv_group.
  int64_t kv_group = 1;

  MaskKind mask_kind = MaskKind::kNone;
  StridedView mask;  // bool masks as bytes (nonzero = key takes part); additive masks in `dtype`

  // The band of keys query i sees: i + band_lo <= j <= i + band_hi (causal attention is
  // band_hi = offset; a sliding window bounds both sides). kNoBound on a side: unbounded.
  int64_t band_lo = -kNoBound, band_hi = kNoBound;
  int64_t offset = 0;  // query i's diagonal is key i + offset (ALiBi distances are from it)
  double scale = 1.0;
  double softcap = 0.0;    // > 0: scores become softcap * tanh(scores / softcap)
  StridedView alibi;       // when data != nullptr: one slope per batch entry, in `dtype`
  StridedView kv_lengths;  // when data != nullptr: int64, keys j >= kv_lengths[b] take no part
  StridedView sinks;       // when data != nullptr: one logit per batch entry, in `dtype`, that
                           // joins the softmax's denominator only (gpt-oss's attention sinks)
  // When data != nullptr: int64, one per batch entry, moving entry b's diagonal (and its band
  // with it) by shift[b] keys: query i's diagonal is key i + offset + shift[b]. A KV cache's
  // queries are the rows of its last keys (bottom-right, per entry: shift = its keys - L); a
  // ragged batch's sequences each have their own lengths.
  StridedView diag_shift;

  // Paged k and v (block_table != nullptr; two batch axes, sequences and heads): the first axis
  // of k and v is their pages (k.batch_strides[0] elements apart), of page_size keys each. Key j
  // of sequence s (the index along the first batch axis) is row j % page_size of page
  // block_table[s * block_table_stride + j / page_size]. The caller checked every page id that
  // is read: those of the keys below each entry's kv_lengths, which paged problems must give.
  // A contiguous cache whose sequences are picked by an index is paged with one page each.
  const int32_t* block_table = nullptr;
  int64_t block_table_stride = 0;
  int64_t page_size = 0;

  // Key splits per query group of the row kernel (a decode step): 0 chooses (enough parts to
  // occupy every thread when batch entries alone do not), 1 none, n > 1 that many (at most 64,
  // and only with more than one thread). The parts' results are merged exactly.
  int num_splits = 0;

  StridedView out;      // written: (batch..., L, Ev), in `dtype`
  StridedView weights;  // written when data != nullptr: (batch..., L, S)
  StridedView lse;      // written when data != nullptr: (batch..., L), natural log, -inf if no key

  // Threads; 0: OpenMP's default (OMP_NUM_THREADS, threadpoolctl). Never more than the cores
  // this process may run on (available_cores()): more would only add switching.
  int num_threads = 0;

  // A check for an interrupt, run on the calling thread about every kPollMillis (20 ms) of a
  // long call; nonzero stops the call early, which then reports kInterrupted. Null: none.
  int (*interrupt_poll)(void* ctx) = nullptr;
  void* interrupt_ctx = nullptr;

  // The backward pass only: out and lse (given, as the forward wrote them) and dout are read;
  // dq (batch..., L, E), dk (batch..., S, E) and dv (batch..., S, Ev) are written per batch entry
  // of the broadcast batch shape (the caller sums broadcast and grouped entries), and must be
  // zero on entry (rows of keys and queries that take no part are not written). out and dout are
  // stored as q is; lse in `dtype`.
  StridedView dout, dq, dk, dv;
  // The gradients are written as bfloat16 (else in `dtype`); only with bfloat16 storage.
  bool grads_bf16 = false;

  // ---- set by the dispatcher (attention.cpp) when the call starts, for the kernels ----
  int64_t batch_count = 1;
  bool has_band = false;   // whether either side of the band bounds anything
  bool bf16_pairs = true;  // whether bfloat16 tiles may run as pairs (cpu_features.hpp)
  CallControl* control = nullptr;  // the call's stop flag (Ctrl-C), or none
  // Set (to 1, by any thread) when an output row holds an inf or a NaN; the dispatcher reports
  // it as kOutputNonFinite. Null: not asked.
  int* nonfinite = nullptr;
};

// Status of a kernel run; the dispatcher turns failures into exceptions.
enum class KernelStatus : int { kOk = 0, kOutOfMemory = 1, kBadStorage = 2 };

}  // namespace fastattn
