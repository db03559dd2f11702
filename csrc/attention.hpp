// fastattn's C++ core: its entry points, on the problem of problem.hpp.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "problem.hpp"

namespace fastattn {

// What a call reports beside its outputs, as bit flags (0: nothing to report).
// kOutputNonFinite (the forward pass): an output value is inf or NaN before normalization. With
// finite inputs that is the accumulator of weights times values overflowing (|v| within a factor
// S of the dtype's largest value) where the normalized output may be finite: the caller may run
// again with v scaled down by a power of two, the output scaled back up.
constexpr int kOutputNonFinite = 1;
// kInterrupted: interrupt_poll asked the call to stop; it stopped early and its outputs are
// unspecified.
constexpr int kInterrupted = 2;

// Runs the fused kernel on p, whatever its storage (16-bit storage is read, packed or widened
// as the selected variant wants: no caller packs anything); throws std::invalid_argument for an
// inconsistent problem. p is taken by reference because the dispatcher fills the fields that
// problem.hpp marks as its own before the kernels read them. Returns flags.
int attention(Problem& p);

// The gradients dq, dk, dv of attention(p) for the upstream gradient p.dout, from the forward's
// p.out and p.lse (both required); no weights. Any storage, as attention(). Returns flags.
int attention_backward(Problem& p);

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
