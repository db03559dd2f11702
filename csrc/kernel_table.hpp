// The entry points of one kernel variant, as one table of function pointers.
//
// Every copy of kernel_isa.cpp (one per row of isa_table.def) defines its own table,
// fastattn::<name>::kernels, constant-initialized; cpu_features.cpp keeps a pointer to the
// selected one, so that a call costs one atomic load and an indirect call (selected_kernels in
// cpu_features.hpp), with no string compared and no switch over the variants.
#pragma once

#include <cstdint>

#include "problem.hpp"

namespace fastattn {

struct KernelTable {
  KernelStatus (*run)(const Problem& args);       // the forward pass
  KernelStatus (*backward)(const Problem& args);  // the backward pass
  void (*exp2_float)(const float* x, float* y, int64_t n);     // the softmax's exp2, for tests
  void (*exp2_double)(const double* x, double* y, int64_t n);  // of its error bound
};

// Declared for every row; defined only by the variants CMake built (FASTATTN_HAVE_<name> = 1):
// cpu_features.cpp refers to no other.
#define FASTATTN_ISA(name, ...)     \
  namespace name {                  \
  extern const KernelTable kernels; \
  }
#include "isa_table.def"
#undef FASTATTN_ISA

}  // namespace fastattn
