// One copy of the kernel, compiled once per row of isa_table.def by CMakeLists.txt with
// FASTATTN_ISA_NS (its namespace: the row's name), FASTATTN_VBYTES (its vector width) and the
// row's flags. It exports one symbol the core uses, its table of entry points (kernels, below).
#include <cstring>

#include "backward_kernel.hpp"
#include "kernel_table.hpp"
#include "packing.hpp"
#include "problem.hpp"
#include "row_kernel.hpp"
#include "tile_kernel.hpp"

namespace fastattn {
namespace FASTATTN_ISA_NS {

// A few query rows (decode) stream K and V in place; the weights always come from the tiles.
bool uses_row_kernel(const Problem& args) {
  return args.L <= RowKernel<float>::RMAX && !args.weights.data;
}

template <class T>
KernelStatus run_typed(const Problem& args) {
  if (uses_row_kernel(args)) return RowKernel<T>(args).run();
  return TileKernel<T>(args).run();
}

// 16-bit q, k and v on the tiles (which are bound by arithmetic): bfloat16 by the products this
// variant has for it, packed as they read it (packing.hpp), else widened to float32 once. A
// decode step's rows read 16-bit storage in place (a decode step is bound by memory).
#if defined(FASTATTN_AMX) || defined(__AVX512BF16__)
template <class Packed>
KernelStatus run_packed(const Problem& args) {
  Packed packed;
  if (!packed.make(args)) return KernelStatus::kOutOfMemory;
  return TileKernel<float, BFloat16>(packed.p).run();
}
#endif

template <class From>
KernelStatus run_widened(const Problem& args) {
  Widened<From> wide;
  if (!wide.make(args, false)) return KernelStatus::kOutOfMemory;
  return run_typed<float>(wide.p);
}

KernelStatus run_attention(const Problem& args) {
  switch (args.storage) {
    case Storage::kSame:
      return args.dtype == DType::kFloat32 ? run_typed<float>(args) : run_typed<double>(args);
    case Storage::kFloat16:
      if (uses_row_kernel(args)) return RowKernel<float, Half>(args).run();
      return run_widened<Half>(args);
    case Storage::kBFloat16:
      if (uses_row_kernel(args)) return RowKernel<float, BFloat16>(args).run();
#if defined(FASTATTN_AMX)
      return run_packed<AmxPacked>(args);
#elif defined(__AVX512BF16__)
      if (args.bf16_pairs) return run_packed<KeyPairs>(args);
#endif
      return run_widened<BFloat16>(args);
  }
  return KernelStatus::kBadStorage;
}

// The gradients of 16-bit inputs on a variant without bfloat16 pair products (or of float16):
// q, k, v, out and dout widened to float32 copies, and the gradients, when asked as bfloat16,
// computed in float32 and rounded once (to nearest, ties to even) into the caller's arrays.
template <class From>
KernelStatus backward_widened(const Problem& args) {
  Widened<From> wide;
  if (!wide.make(args, true)) return KernelStatus::kOutOfMemory;
  Problem& p = wide.p;
  if (!args.grads_bf16) return BackwardKernel<float>(p).run();
  p.grads_bf16 = false;
  const int64_t sizes[3][2] = {{args.L, args.E}, {args.S, args.E}, {args.S, args.Ev}};
  StridedView* grads[3] = {&p.dq, &p.dk, &p.dv};
  const Entries all = entries_of(args, args.out, 1);  // every batch entry: out is never broadcast
  Buffer<float> buf[3];
  for (int g = 0; g < 3; ++g) {
    const int64_t n = args.batch_count * sizes[g][0] * sizes[g][1];
    if (!buf[g].reserve(n)) return KernelStatus::kOutOfMemory;
    std::memset(buf[g].ptr, 0, size_t(n) * sizeof(float));
    *grads[g] = compact_view(args, all, buf[g].ptr, sizes[g][0] * sizes[g][1], sizes[g][1], 1);
  }
  const KernelStatus status = BackwardKernel<float>(p).run();
  const StridedView* outs[3] = {&args.dq, &args.dk, &args.dv};
  for (int g = 0; g < 3 && status == KernelStatus::kOk; ++g) {
    const int64_t rows = sizes[g][0], cols = sizes[g][1];
    for (int64_t b = 0; b < args.batch_count; ++b) {
      const float* src = buf[g].ptr + b * rows * cols;
      uint16_t* dst = static_cast<uint16_t*>(const_cast<void*>(outs[g]->data)) +
                      batch_offset(args, *outs[g], b, 1);
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < cols; ++c)
          dst[r * outs[g]->row_stride + c * outs[g]->col_stride] =
              bfloat16_bits(src[r * cols + c]);
    }
  }
  return status;
}

KernelStatus run_backward(const Problem& args) {
  if (args.grads_bf16 && args.storage != Storage::kBFloat16) return KernelStatus::kBadStorage;
  switch (args.storage) {
    case Storage::kSame:
      return args.dtype == DType::kFloat32 ? BackwardKernel<float>(args).run()
                                           : BackwardKernel<double>(args).run();
    case Storage::kFloat16:
      return backward_widened<Half>(args);
    case Storage::kBFloat16:
#if defined(__AVX512BF16__)
      // bfloat16 pairs, where the forward's tiles use pairs (the amx variant too)
      if (args.bf16_pairs) return BackwardKernel<float, BFloat16>(args).run();
#endif
      return backward_widened<BFloat16>(args);
  }
  return KernelStatus::kBadStorage;
}

// The softmax's exp2 on an array, so tests can hold it to its error bound on every path.
template <class T>
void exp2_array(const T* x, T* y, int64_t n) {
  using S = Simd<T>;
  int64_t i = 0;
  for (; i + S::kLanes <= n; i += S::kLanes) S::store(y + i, Exp2<T>::eval(S::load(x + i)));
  if (i < n) {
    T buf[S::kLanes] = {};
    for (int64_t j = i; j < n; ++j) buf[j - i] = x[j];
    S::store(buf, Exp2<T>::eval(S::load(buf)));
    for (int64_t j = i; j < n; ++j) y[j] = buf[j - i];
  }
}

// Constant-initialized (addresses only), so it is valid before any constructor runs.
const KernelTable kernels = {&run_attention, &run_backward, &exp2_array<float>,
                             &exp2_array<double>};

}  // namespace FASTATTN_ISA_NS
}  // namespace fastattn
