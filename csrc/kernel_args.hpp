// The problem as the kernel variants see it: plain arrays only, built once by attention.cpp.
//
// Every kernel variant (one per instruction set) reads this struct. It holds no std:: containers
// so that no library template is instantiated inside an instruction-set-specific translation unit,
// where the linker could pick an AVX-512 copy of it for a CPU without AVX-512.
#pragma once

#include <cstdint>

namespace fastattn {

struct CallControl;  // thread_pool.hpp

constexpr int kMaxBatchDims = 64;  // NumPy's own limit on ndim

struct StridedView {
  const void* data = nullptr;
  int64_t batch_strides[kMaxBatchDims] = {};
  int64_t row_stride = 0;
  int64_t col_stride = 0;
};

struct KernelArgs {
  int dtype = 0;    // 0 float32, 1 float64: what the kernel computes in
  int storage = 0;  // q, k, v stored as: 0 dtype itself, 1 float16, 2 bfloat16
  int n_batch_dims = 0;
  int64_t batch_shape[kMaxBatchDims] = {};
  int64_t batch_count = 1;
  int64_t L = 0, S = 0, E = 0, Ev = 0;
  StridedView q, k, v, mask, out, weights, lse, alibi, kv_lengths, sinks;
  StridedView dout, dq, dk, dv;  // the backward pass: dout read (with out, lse), the rest written
  int64_t kv_group = 1;
  int mask_kind = 0;  // 0 none, 1 bool bytes, 2 additive in dtype
  int64_t band_lo = 0, band_hi = 0;  // query i sees keys i + band_lo .. i + band_hi
  bool has_band = false;             // whether either side of the band bounds anything
  int64_t offset = 0;                // ALiBi: distance |i + offset - j|
  double scale = 1.0;
  double softcap = 0.0;  // 0: none
  int num_threads = 1;  // resolved by the dispatcher: >= 1
  bool bf16_pairs = true;  // whether bfloat16 tiles may run as pairs (cpu_features.hpp)
  bool grads_bf16 = false;  // the backward pass writes dq, dk, dv as bfloat16 (else dtype)
  CallControl* control = nullptr;  // the call's stop flag (Ctrl-C), or none
  // Set (to 1, by any thread) when an output row holds an inf or a NaN; the dispatcher reports
  // it as kOutputNonFinite. Null: not asked.
  int* nonfinite = nullptr;
};

// Status of a kernel run; the dispatcher turns failures into exceptions.
enum class KernelStatus : int { kOk = 0, kOutOfMemory = 1, kBadStorage = 2 };

}  // namespace fastattn
