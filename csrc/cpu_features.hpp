// Which kernel variants this CPU can run, and which one calls use.
#pragma once

#include <string>
#include <vector>

namespace fastattn {

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

// selected_isa() as a number, for the per-call dispatch: after the first call (which reads
// FASTATTN_ISA, and throws as selected_isa does) one atomic load.
enum class IsaId : int { kUnknown = 0, kBaseline, kAvx2, kAvx512, kAvx512Bf16, kAmx };
IsaId selected_isa_id();

// Whether the avx512bf16 variant runs bfloat16 tiles as vdpbf16ps pairs (else it widens them to
// float32 once and runs its float32 tiles). Always when that variant was forced (set_isa or
// FASTATTN_ISA); under automatic choice only on CPUs where the pairs are the faster of the two.
bool bf16_pairs_enabled();

}  // namespace fastattn
