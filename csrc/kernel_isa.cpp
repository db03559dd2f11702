// One copy of the kernel, compiled once per instruction set by CMakeLists.txt with
// FASTATTN_ISA_NS (its namespace) and FASTATTN_VBYTES (its vector width) defined.
#include "kernel_args.hpp"
#include "row_kernel.hpp"
#include "tile_kernel.hpp"

namespace fastattn {
namespace FASTATTN_ISA_NS {

template <class T>
KernelStatus run_typed(const KernelArgs& args) {
  // A few query rows (decode) stream K and V in place; the weights always come from the tiles.
  if (args.L <= RowKernel<T>::RMAX && !args.weights.data) return RowKernel<T>(args).run();
  return TileKernel<T>(args).run();
}

KernelStatus run_attention(const KernelArgs& args) {
  return args.dtype == 0 ? run_typed<float>(args) : run_typed<double>(args);
}

}  // namespace FASTATTN_ISA_NS
}  // namespace fastattn
