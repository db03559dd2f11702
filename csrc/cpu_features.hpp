// Which kernel variants this CPU can run, and which one calls use.
#pragma once

#include <atomic>
#include <string>
#include <vector>

namespace fastattn {

struct KernelTable;  // kernel_table.hpp

// The variants are the rows of isa_table.def, best first; IsaId numbers them in that order.
enum class IsaId : int {
#define FASTATTN_ISA(name, id, ...) k##id,
#include "isa_table.def"
#undef FASTATTN_ISA
};

// Variants compiled into this build and supported by this CPU (and its OS), best first.
std::vector<std::string> supported_isas();

// The amx variant's state in words: available (and how), or why not (not built, CPU without
// AMX, the OS refused the tile state). The automatic choice never takes "amx": it has not run
// on an AMX CPU yet (FASTATTN_ISA=amx or set_isa("amx") ask for it).
std::string amx_state();

// The variant calls use: the environment variable FASTATTN_ISA when set (read once), else the
// best supported one. An unknown or unsupported FASTATTN_ISA throws std::invalid_argument, so a
// forced path is never silently replaced by another.
std::string selected_isa();
void force_isa(const std::string& name);  // "" goes back to FASTATTN_ISA or the best variant

// The entry points of selected_isa(), for the per-call dispatch: one atomic load of the pointer
// that selection (the first call, which reads FASTATTN_ISA and throws as selected_isa does,
// selected_isa itself, force_isa) stores.
namespace detail {
extern std::atomic<const KernelTable*> g_selected_kernels;  // null: select anew
const KernelTable& select_kernels();
}  // namespace detail
inline const KernelTable& selected_kernels() {
  const KernelTable* kernels = detail::g_selected_kernels.load(std::memory_order_acquire);
  return kernels ? *kernels : detail::select_kernels();
}

// Whether the avx512bf16 variant runs bfloat16 tiles as vdpbf16ps pairs (else it widens them to
// float32 once and runs its float32 tiles). Always when that variant was forced (set_isa or
// FASTATTN_ISA); under automatic choice only on CPUs where the pairs are the faster of the two.
bool bf16_pairs_enabled();

}  // namespace fastattn
