// One copy of the kernel, compiled once per instruction set by CMakeLists.txt with
// FASTATTN_ISA_NS (its namespace) and FASTATTN_VBYTES (its vector width) defined.
#include "kernel_args.hpp"
#include "tile_kernel.hpp"

namespace fastattn {
namespace FASTATTN_ISA_NS {

KernelStatus run_attention(const KernelArgs& args) {
  if (args.dtype == 0) return TileKernel<float>(args).run();
  return TileKernel<double>(args).run();
}

}  // namespace FASTATTN_ISA_NS
}  // namespace fastattn
