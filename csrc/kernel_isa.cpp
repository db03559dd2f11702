// One copy of the kernel, compiled once per row of isa_table.def by CMakeLists.txt with
// FASTATTN_ISA_NS (its namespace: the row's name), FASTATTN_VBYTES (its vector width) and the
// row's flags. It exports one symbol the core uses, its table of entry points (kernels, below).
#include "backward_kernel.hpp"
#include "kernel_args.hpp"
#include "kernel_table.hpp"
#include "row_kernel.hpp"
#include "tile_kernel.hpp"

namespace fastattn {
namespace FASTATTN_ISA_NS {

// A few query rows (decode) stream K and V in place; the weights always come from the tiles.
bool uses_row_kernel(const KernelArgs& args) {
  return args.L <= RowKernel<float>::RMAX && !args.weights.data;
}

template <class T>
KernelStatus run_typed(const KernelArgs& args) {
  if (uses_row_kernel(args)) return RowKernel<T>(args).run();
  return TileKernel<T>(args).run();
}

// Whether this problem's q, k and v may come in 16-bit storage: only the row kernel widens them
// as it reads (a decode step is bound by memory; the tiles are bound by arithmetic, for which the
// caller widens the inputs once).
// With AVX512-BF16 the tiles read bfloat16 too, as bfloat16 pairs (storage 3: k padded to an
// even E, v packed in pairs of keys; see tile_kernel.hpp), for twice the multiply-adds per
// instruction.
int reads_storage(const KernelArgs& args) {
  if (uses_row_kernel(args)) return args.storage == 1 || args.storage == 2;
#if defined(FASTATTN_AMX)
  if (args.storage == 2) return 4;  // AMX tiles (see tile_kernel.hpp)
#elif defined(__AVX512BF16__)
  if (args.storage == 2 && args.bf16_pairs) return 3;
#endif
  return 0;
}

KernelStatus run_attention(const KernelArgs& args) {
  if (uses_row_kernel(args)) {
    if (args.storage == 1) return RowKernel<float, Half>(args).run();
    if (args.storage == 2) return RowKernel<float, BFloat16>(args).run();
  }
#if defined(FASTATTN_AMX)
  if (args.storage == 4 && !uses_row_kernel(args)) return TileKernel<float, BFloat16>(args).run();
#elif defined(__AVX512BF16__)
  if (args.storage == 3 && !uses_row_kernel(args))
    return TileKernel<float, BFloat16>(args).run();
#endif
  if (args.storage != 0) return KernelStatus::kBadStorage;  // not one reads_storage offers
  return args.dtype == 0 ? run_typed<float>(args) : run_typed<double>(args);
}

// Whether the backward pass reads this problem's 16-bit q, k, v, out and dout as stored (1), or
// the caller widens them to float32 first (0): bfloat16, as pairs, where the forward's tiles
// use pairs (AVX512-BF16, bf16_pairs).
int backward_reads_storage([[maybe_unused]] const KernelArgs& args) {
#if defined(__AVX512BF16__)
  if (args.storage == 2 && args.bf16_pairs) return 1;
#endif
  return 0;
}

KernelStatus run_backward(const KernelArgs& args) {
#if defined(__AVX512BF16__)
  if (backward_reads_storage(args)) return BackwardKernel<float, BFloat16>(args).run();
#endif
  if (args.storage != 0 || args.grads_bf16) return KernelStatus::kBadStorage;
  return args.dtype == 0 ? BackwardKernel<float>(args).run() : BackwardKernel<double>(args).run();
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
const KernelTable kernels = {&run_attention,          &run_backward,      &reads_storage,
                             &backward_reads_storage, &exp2_array<float>, &exp2_array<double>};

}  // namespace FASTATTN_ISA_NS
}  // namespace fastattn
