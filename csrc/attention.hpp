// fastattn's C++ core: the problem description shared by every kernel variant.
//
// The core knows nothing of Python. NumPy semantics (broadcasting, dtype promotion, argument
// checks) are resolved by the Python layer; what arrives here is plain pointers, one broadcast
// batch shape, and element strides (possibly 0 or negative) for every operand.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace fastattn {

enum class DType : int { kFloat32 = 0, kFloat64 = 1 };

// How q, k and v are stored when the kernel computes in float32: as float32, as 16-bit floats it
// widens on load, or as bfloat16 with k padded to an even E (contiguous along it) and v packed in
// pairs of keys (v[j / 2][c] = keys j, j + 1 of column c), which its AVX512-BF16 tiles multiply
// as pairs. Only where reads_storage says so.
// kBFloat16Amx (the amx variant): k padded to a multiple of 32 features, contiguous along them;
// v as V^T (keys along a row: row_stride 1; value columns col_stride apart) with S and Ev padded
// to multiples of 32 with zeros.
enum class Storage : int {
  kSame = 0,
  kFloat16 = 1,
  kBFloat16 = 2,
  kBFloat16Pairs = 3,
  kBFloat16Amx = 4
};

enum class MaskKind : int { kNone = 0, kBool = 1, kAdditive = 2 };

// A band side that bounds nothing; far from int64's limits so that i + bound cannot overflow.
constexpr int64_t kNoBound = int64_t(1) << 60;

// A strided view: element strides for each batch axis, then for the two matrix axes.
struct Operand {
  const void* data = nullptr;
  std::vector<int64_t> batch_strides;  // one per batch axis, 0 where broadcast
  int64_t row_stride = 0;              // along L (q, out, mask, weights) or S (k, v)
  int64_t col_stride = 0;              // along E / Ev (q, k, v, out) or S (mask, weights)
};

struct Problem {
  DType dtype = DType::kFloat32;
  Storage storage = Storage::kSame;
  std::vector<int64_t> batch_shape;  // broadcast batch shape of the output
  int64_t L = 0, S = 0, E = 0, Ev = 0;

  Operand q, k, v;
  // Grouped-query attention: along the last batch axis, k and v are read at index h / kv_group.
  int64_t kv_group = 1;

  MaskKind mask_kind = MaskKind::kNone;
  Operand mask;  // bool masks as bytes (nonzero = key takes part); additive masks in `dtype`

  // The band of keys query i sees: i + band_lo <= j <= i + band_hi (causal attention is
  // band_hi = offset; a sliding window bounds both sides). kNoBound on a side: unbounded.
  int64_t band_lo = -kNoBound, band_hi = kNoBound;
  int64_t offset = 0;  // query i's diagonal is key i + offset (ALiBi distances are from it)
  double scale = 1.0;
  double softcap = 0.0;  // > 0: scores become softcap * tanh(scores / softcap)
  Operand alibi;         // when data != nullptr: one slope per batch entry, in `dtype`
  Operand kv_lengths;    // when data != nullptr: int64, keys j >= kv_lengths[b] take no part
  Operand sinks;         // when data != nullptr: one logit per batch entry, in `dtype`, that joins
                         // the softmax's denominator only (gpt-oss's attention sinks)

  Operand out;      // written: (batch..., L, Ev)
  Operand weights;  // written when data != nullptr: (batch..., L, S)
  Operand lse;      // written when data != nullptr: (batch..., L), natural log, -inf if no key

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
  // zero on entry (rows of keys and queries that take no part are not written).
  Operand dout, dq, dk, dv;
  // The backward pass of bfloat16 storage (kBFloat16, where backward_reads_storage says so):
  // q, k, v, out and dout are bfloat16 (lse in float32), and dq, dk, dv are written as bfloat16
  // when grads_bf16, else in float32.
  bool grads_bf16 = false;
};

// What a call reports beside its outputs, as bit flags (0: nothing to report).
// kOutputNonFinite (the forward pass): an output value is inf or NaN before normalization. With
// finite inputs that is the accumulator of weights times values overflowing (|v| within a factor
// S of the dtype's largest value) where the normalized output may be finite: the caller may run
// again with v scaled down by a power of two, the output scaled back up.
constexpr int kOutputNonFinite = 1;
// kInterrupted: interrupt_poll asked the call to stop; it stopped early and its outputs are
// unspecified.
constexpr int kInterrupted = 2;

// Runs the fused kernel; throws std::invalid_argument for an inconsistent problem. Returns flags.
int attention(const Problem& p);

// The gradients dq, dk, dv of attention(p) for the upstream gradient p.dout, from the forward's
// p.out and p.lse (both required). q, k, v, out and dout in p.dtype (storage kSame), or in
// bfloat16 (kBFloat16) where backward_reads_storage(p) is 1; no weights. Returns flags.
int attention_backward(const Problem& p);

// 1 when the backward pass reads p's 16-bit storage as given (bfloat16 pairs on AVX512-BF16),
// 0 when the caller widens q, k, v, out and dout to float32 first.
int backward_reads_storage(const Problem& p);

// How the kernel reads this problem's q, k and v given in 16-bit storage p.storage: 0 it does
// not (the caller widens them to float32 first), 1 as given, 3 as kBFloat16Pairs, 4 as
// kBFloat16Amx (the caller packs them so).
int reads_storage(const Problem& p);

// y = 2^x with the kernel's vectorized exp2 (for tests of its error bound).
template <class T>
void exp2(const T* x, T* y, int64_t n);

// The instruction set the dispatcher uses now ("amx", "avx512bf16", "avx512", "avx2" or
// "baseline": the rows of isa_table.def).
std::string active_isa();
// Every instruction set this build has a kernel for and this CPU can run, best first.
std::vector<std::string> available_isas();
// Why the amx variant is or is not available here, in words (for python -m fastattn).
std::string amx_status();
// How bfloat16 tiles run on the selected instruction set: "pairs" (vdpbf16ps dot products of
// bfloat16 pairs) or "float32" (widened once, float32 tiles). Decode reads 16-bit K/V either way.
std::string bfloat16_tiles();
// Forces an instruction set ("" restores automatic choice); throws if unavailable.
void set_isa(const std::string& name);
// Whether the build has OpenMP (whose settings give the default thread count; the threads are
// fastattn's own, thread_pool.hpp), and the thread count a call with num_threads = 0 would use.
bool has_openmp();
int default_threads();

}  // namespace fastattn
