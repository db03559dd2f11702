// Checks a Problem, flattens it into KernelArgs and runs the kernel variant for this CPU: the
// selected variant's table of entry points (selected_kernels(), cpu_features.hpp), one atomic
// load and an indirect call per call.
#include "attention.hpp"

#include <new>
#include <stdexcept>
#include <type_traits>

#include "cpu_features.hpp"
#include "kernel_args.hpp"
#include "kernel_table.hpp"
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

void copy_view(const Operand& op, size_t n_batch_dims, const char* name, StridedView& view,
               bool required) {
  if (required && op.data == nullptr)
    throw std::invalid_argument(std::string(name) + ": null data pointer");
  if (op.data != nullptr && op.batch_strides.size() != n_batch_dims)
    throw std::invalid_argument(std::string(name) + ": expected one batch stride per batch axis");
  view.data = op.data;
  for (size_t d = 0; d < op.batch_strides.size() && d < n_batch_dims; ++d)
    view.batch_strides[d] = op.batch_strides[d];
  view.row_stride = op.row_stride;
  view.col_stride = op.col_stride;
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

KernelArgs make_args(const Problem& p) {
  const size_t nd = p.batch_shape.size();
  require(nd <= size_t(kMaxBatchDims), "too many batch axes");
  require(p.L >= 0 && p.S >= 0 && p.E >= 0 && p.Ev >= 0, "negative size");
  require(p.kv_group >= 1, "kv_group must be >= 1");
  require(p.kv_group == 1 || nd >= 1, "grouped-query attention needs a head axis");
  require(p.kv_group == 1 || p.batch_shape[nd - 1] % p.kv_group == 0,
          "the number of query heads must be a multiple of kv_group");

  KernelArgs a;
  a.dtype = p.dtype == DType::kFloat64 ? 1 : 0;
  a.storage = int(p.storage);
  require(a.storage == 0 || a.dtype == 0, "16-bit storage computes in float32");
  a.n_batch_dims = int(nd);
  a.batch_count = 1;
  for (size_t d = 0; d < nd; ++d) {
    require(p.batch_shape[d] >= 0, "negative batch size");
    a.batch_shape[d] = p.batch_shape[d];
    a.batch_count *= p.batch_shape[d];
  }
  a.L = p.L;
  a.S = p.S;
  a.E = p.E;
  a.Ev = p.Ev;
  copy_view(p.q, nd, "q", a.q, true);
  copy_view(p.k, nd, "k", a.k, true);
  copy_view(p.v, nd, "v", a.v, true);
  copy_view(p.out, nd, "out", a.out, true);
  copy_view(p.weights, nd, "weights", a.weights, false);
  copy_view(p.lse, nd, "lse", a.lse, false);
  copy_view(p.alibi, nd, "alibi", a.alibi, false);
  copy_view(p.kv_lengths, nd, "kv_lengths", a.kv_lengths, false);
  copy_view(p.sinks, nd, "sinks", a.sinks, false);
  a.mask_kind = int(p.mask_kind);
  copy_view(p.mask, nd, "mask", a.mask, p.mask_kind != MaskKind::kNone);
  a.kv_group = p.kv_group;
  require(p.band_lo >= -kNoBound && p.band_hi <= kNoBound, "band out of range");
  a.band_lo = p.band_lo;
  a.band_hi = p.band_hi;
  a.has_band = p.band_lo > -kNoBound || p.band_hi < kNoBound;
  a.offset = p.offset;
  a.scale = p.scale;
  require(p.softcap >= 0, "softcap must be >= 0");
  a.softcap = p.softcap;
  require(p.num_threads >= 0, "num_threads must be >= 0");
  a.num_threads = p.num_threads > 0 ? p.num_threads : default_threads();
  if (a.num_threads > available_cores()) a.num_threads = available_cores();
  if (a.num_threads < 1) a.num_threads = 1;
  // Only 16-bit problems ask (it takes a lock when the pairs are not the automatic choice).
  a.bf16_pairs = a.storage == int(Storage::kBFloat16) ? bf16_pairs_enabled() : true;
  return a;
}

}  // namespace

int reads_storage(const Problem& p) {
  const KernelArgs a = make_args(p);
  return selected_kernels().reads_storage(a);
}

namespace {

// The call's stop flag when the caller gave an interrupt check (else none: nothing is polled).
struct Control {
  CallControl c;
  Control(const Problem& p, KernelArgs& a) {
    if (!p.interrupt_poll) return;
    c.poll = p.interrupt_poll;
    c.poll_ctx = p.interrupt_ctx;
    start_control(c);
    a.control = &c;
  }
  int flags() const { return c.stopped ? kInterrupted : 0; }
};

}  // namespace

int attention(const Problem& p) {
  KernelArgs a = make_args(p);
  const Control control(p, a);
  int nonfinite = 0;
  a.nonfinite = &nonfinite;
  const KernelStatus status = selected_kernels().run(a);
  if (status == KernelStatus::kOutOfMemory) throw std::bad_alloc();
  require(status != KernelStatus::kBadStorage,
          "16-bit storage is read only where reads_storage says so");
  return control.flags() | (nonfinite ? kOutputNonFinite : 0);
}

int backward_reads_storage(const Problem& p) {
  const KernelArgs a = make_args(p);
  return selected_kernels().backward_reads(a);
}

int attention_backward(const Problem& p) {
  KernelArgs a = make_args(p);
  const Control control(p, a);
  const size_t nd = p.batch_shape.size();
  require(p.storage == Storage::kSame || p.storage == Storage::kBFloat16,
          "the backward pass reads q, k and v in the compute dtype or as bfloat16");
  require(p.weights.data == nullptr, "the backward pass writes no weights");
  require(!p.grads_bf16 || p.storage == Storage::kBFloat16,
          "bfloat16 gradients come only from bfloat16 storage");
  a.grads_bf16 = p.grads_bf16;
  copy_view(p.lse, nd, "lse", a.lse, true);
  copy_view(p.dout, nd, "dout", a.dout, true);
  copy_view(p.dq, nd, "dq", a.dq, true);
  copy_view(p.dk, nd, "dk", a.dk, true);
  copy_view(p.dv, nd, "dv", a.dv, true);
  const KernelStatus status = selected_kernels().backward(a);
  if (status == KernelStatus::kOutOfMemory) throw std::bad_alloc();
  require(status != KernelStatus::kBadStorage,
          "the backward pass reads 16-bit storage only where backward_reads_storage says so");
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
