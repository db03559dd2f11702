// Checks a Problem, fills the fields the dispatcher owns and runs the kernel variant for this
// CPU: the selected variant's table of entry points (selected_kernels(), cpu_features.hpp), one
// atomic load and an indirect call per call.
#include "attention.hpp"

#include <new>
#include <stdexcept>
#include <type_traits>

#include "cpu_features.hpp"
#include "kernel_table.hpp"
#include "problem.hpp"
#include "thread_pool.hpp"

#ifdef FASTATTN_OPENMP
#include <omp.h>
#endif

namespace fastattn {

namespace {

// Messages are string literals: a check that passes costs a branch, not a std::string (a tiny
// call made ~16 of them, a quarter of its time in the core).
void require(bool ok, const char* what) {
  if (!ok) throw std::invalid_argument(what);
}

void require_data(const StridedView& view, const char* what) {
  require(view.data != nullptr, what);
}

}  // namespace

bool has_openmp() {
#ifdef FASTATTN_OPENMP
  return true;
#else
  return false;
#endif
}

int default_threads() {
#ifdef FASTATTN_OPENMP
  // OMP_NUM_THREADS and threadpoolctl's limits (omp_set_num_threads) as OpenMP reads them; the
  // call starts no OpenMP thread.
  const int n = omp_get_max_threads();
#else
  const int n = available_cores();
#endif
  const int cores = available_cores();
  return n < 1 ? 1 : n < cores ? n : cores;
}

std::string active_isa() { return selected_isa(); }
std::string bfloat16_tiles() {
  const std::string isa = selected_isa();
  if (isa == "amx") return "amx";
  return isa == "avx512bf16" && bf16_pairs_enabled() ? "pairs" : "float32";
}
std::string amx_status() { return amx_state(); }
std::vector<std::string> available_isas() { return supported_isas(); }
void set_isa(const std::string& name) { force_isa(name); }

namespace {

// Checks p and fills the fields the dispatcher owns (problem.hpp).
void start(Problem& p) {
  const int nd = p.n_batch_dims;
  require(nd >= 0 && nd <= kMaxBatchDims, "too many batch axes");
  require(p.L >= 0 && p.S >= 0 && p.E >= 0 && p.Ev >= 0, "negative size");
  require(p.kv_group >= 1, "kv_group must be >= 1");
  require(p.kv_group == 1 || nd >= 1, "grouped-query attention needs a head axis");
  require(p.kv_group == 1 || p.batch_shape[nd - 1] % p.kv_group == 0,
          "the number of query heads must be a multiple of kv_group");
  require(p.storage == Storage::kSame || p.dtype == DType::kFloat32,
          "16-bit storage computes in float32");
  p.batch_count = 1;
  for (int d = 0; d < nd; ++d) {
    require(p.batch_shape[d] >= 0, "negative batch size");
    p.batch_count *= p.batch_shape[d];
  }
  require_data(p.q, "q: null data pointer");
  require_data(p.k, "k: null data pointer");
  require_data(p.v, "v: null data pointer");
  require_data(p.out, "out: null data pointer");
  require(p.mask_kind == MaskKind::kNone || p.mask.data != nullptr, "mask: null data pointer");
  require(p.band_lo >= -kNoBound && p.band_hi <= kNoBound, "band out of range");
  p.has_band = p.band_lo > -kNoBound || p.band_hi < kNoBound;
  require(p.softcap >= 0, "softcap must be >= 0");
  require(!p.block_table || (nd == 2 && p.page_size >= 1 && p.kv_lengths.data != nullptr),
          "paged k and v need two batch axes, page_size >= 1 and kv_lengths");
  require(!p.block_table || !p.weights.data, "paged k and v return no weights");
  require(p.num_splits >= 0, "num_splits must be >= 0");
  require(p.num_threads >= 0, "num_threads must be >= 0");
  if (p.num_threads == 0) p.num_threads = default_threads();
  if (p.num_threads > available_cores()) p.num_threads = available_cores();
  if (p.num_threads < 1) p.num_threads = 1;
  // Only 16-bit problems ask (it takes a lock when the pairs are not the automatic choice).
  p.bf16_pairs = p.storage == Storage::kBFloat16 ? bf16_pairs_enabled() : true;
  p.control = nullptr;
  p.nonfinite = nullptr;
}

}  // namespace

namespace {

// The call's stop flag when the caller gave an interrupt check (else none: nothing is polled).
struct Control {
  CallControl c;
  explicit Control(Problem& p) {
    if (!p.interrupt_poll) return;
    c.poll = p.interrupt_poll;
    c.poll_ctx = p.interrupt_ctx;
    start_control(c);
    p.control = &c;
  }
  int flags() const { return c.stopped ? kInterrupted : 0; }
};

}  // namespace

int attention(Problem& p) {
  start(p);
  const Control control(p);
  int nonfinite = 0;
  p.nonfinite = &nonfinite;
  const KernelStatus status = selected_kernels().run(p);
  p.control = nullptr;
  p.nonfinite = nullptr;
  if (status == KernelStatus::kOutOfMemory) throw std::bad_alloc();
  require(status != KernelStatus::kBadStorage, "this storage has no kernel");
  return control.flags() | (nonfinite ? kOutputNonFinite : 0);
}

int attention_backward(Problem& p) {
  start(p);
  require(p.weights.data == nullptr, "the backward pass writes no weights");
  require(p.block_table == nullptr, "the backward pass reads no paged k and v");
  require(!p.grads_bf16 || p.storage == Storage::kBFloat16,
          "bfloat16 gradients come only from bfloat16 storage");
  require_data(p.lse, "lse: null data pointer");
  require_data(p.dout, "dout: null data pointer");
  require_data(p.dq, "dq: null data pointer");
  require_data(p.dk, "dk: null data pointer");
  require_data(p.dv, "dv: null data pointer");
  const Control control(p);
  const KernelStatus status = selected_kernels().backward(p);
  p.control = nullptr;
  if (status == KernelStatus::kOutOfMemory) throw std::bad_alloc();
  require(status != KernelStatus::kBadStorage, "this storage has no backward kernel");
  return control.flags();
}

template <class T>
void exp2(const T* x, T* y, int64_t n) {
  if constexpr (std::is_same_v<T, float>)
    selected_kernels().exp2_float(x, y, n);
  else
    selected_kernels().exp2_double(x, y, n);
}
template void exp2<float>(const float*, float*, int64_t);
template void exp2<double>(const double*, double*, int64_t);

}  // namespace fastattn
