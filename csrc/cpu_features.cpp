#include "cpu_features.hpp"

#include <atomic>
#include <cstdlib>
#include <mutex>
#include <stdexcept>

namespace fastattn {

namespace {

bool cpu_has(const std::string& isa) {
  if (isa == "baseline") return true;
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  // __builtin_cpu_supports also checks that the OS saves the wider registers (XCR0).
  if (isa == "avx2") return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (isa == "avx512")
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
  if (isa == "avx512bf16") return cpu_has("avx512") && __builtin_cpu_supports("avx512bf16");
#endif
  return false;
}

bool compiled_in(const std::string& isa) {
#ifdef FASTATTN_HAVE_AVX512
  if (isa == "avx512") return true;
#endif
#ifdef FASTATTN_HAVE_AVX512BF16
  if (isa == "avx512bf16") return true;
#endif
#ifdef FASTATTN_HAVE_AVX2
  if (isa == "avx2") return true;
#endif
  return isa == "baseline";
}

std::mutex g_mutex;
std::string g_forced;     // set by force_isa
bool g_env_read = false;  // FASTATTN_ISA is read on first use
std::atomic<int> g_selected_id{0};  // IsaId of selected_isa(), kUnknown until first asked

IsaId id_of(const std::string& isa) {
  if (isa == "avx512bf16") return IsaId::kAvx512Bf16;
  if (isa == "avx512") return IsaId::kAvx512;
  if (isa == "avx2") return IsaId::kAvx2;
  return IsaId::kBaseline;
}

void check_available(const std::string& name, const char* origin) {
  for (const auto& isa : supported_isas())
    if (isa == name) return;
  std::string have;
  for (const auto& isa : supported_isas()) have += (have.empty() ? "" : ", ") + isa;
  throw std::invalid_argument(std::string(origin) + "='" + name +
                              "' is not available on this CPU and build (available: " + have +
                              ")");
}

}  // namespace

// vdpbf16ps against float32 FMA tiles, bfloat16 prefill (1, 8, 4096, 4096, 64), 2 threads:
// AMD Zen 4 and Zen 5 run the pairs 1.6-1.7x faster than float32 (two bfloat16 products per
// lane per instruction at FMA throughput); on an Intel Xeon with AMX (Sapphire Rapids class)
// they were slower than float32 (249 ms against 178 ms): there vdpbf16ps issues at half the
// rate of an FMA. Intel's bfloat16 speed is in AMX tiles, not in vdpbf16ps.
bool pairs_faster_here() {
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  return !__builtin_cpu_is("intel");
#else
  return true;
#endif
}

std::vector<std::string> supported_isas() {
  static const std::vector<std::string> isas = [] {
    std::vector<std::string> out;
    for (const char* isa : {"avx512bf16", "avx512", "avx2", "baseline"})
      if (compiled_in(isa) && cpu_has(isa)) out.push_back(isa);
    return out;
  }();
  return isas;
}

std::string selected_isa() {
  std::lock_guard<std::mutex> lock(g_mutex);
  if (!g_env_read) {
    const char* env = std::getenv("FASTATTN_ISA");
    if (env && *env) {
      check_available(env, "FASTATTN_ISA");  // every call fails alike until it is fixed
      g_forced = env;
    }
    g_env_read = true;
  }
  const std::string isa = g_forced.empty() ? supported_isas().front() : g_forced;
  g_selected_id.store(int(id_of(isa)), std::memory_order_release);
  return isa;
}

bool bf16_pairs_enabled() {
  static const bool faster = pairs_faster_here();
  if (faster) return true;
  std::lock_guard<std::mutex> lock(g_mutex);
  return g_forced == "avx512bf16";
}

IsaId selected_isa_id() {
  const int id = g_selected_id.load(std::memory_order_acquire);
  if (id != int(IsaId::kUnknown)) return IsaId(id);
  return id_of(selected_isa());
}

void force_isa(const std::string& name) {
  if (!name.empty()) check_available(name, "isa");
  std::lock_guard<std::mutex> lock(g_mutex);
  g_env_read = !name.empty();  // "" goes back to FASTATTN_ISA, then to the best variant
  g_forced = name;
  g_selected_id.store(int(IsaId::kUnknown), std::memory_order_release);  // asked anew
}

}  // namespace fastattn
