#include "cpu_features.hpp"

#include <atomic>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <stdexcept>

#if (defined(__x86_64__) || defined(_M_X64)) && defined(__linux__)
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace fastattn {

namespace {

bool cpu_has(const std::string& isa);

struct AmxCheck {
  bool ok;
  std::string why;
};

// AMX needs the CPU (CPUID.(7,0):EDX bit 24 AMX-TILE, bit 22 AMX-BF16), the OS managing the
// tile state (XCR0 bits 17-18) and, on Linux, the process's permission to use it, asked once
// (arch_prctl ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA): the first tile instruction without
// it faults.
AmxCheck check_amx() {
#if !defined(FASTATTN_HAVE_AMX)
  return {false, "not in this build"};
#elif defined(FASTATTN_AMX_EMULATE)
  if (!cpu_has("avx512bf16")) return {false, "emulated build, but this CPU lacks AVX512-BF16"};
  return {true, "emulated in software (test build FASTATTN_AMX_EMULATE: layouts, not speed)"};
#elif (defined(__x86_64__) || defined(_M_X64)) && defined(__linux__)
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(d & (1u << 24)) || !(d & (1u << 22)))
    return {false, "this CPU has no AMX-TILE and AMX-BF16"};
  if (!cpu_has("avx512bf16")) return {false, "this CPU has AMX but no AVX512-BF16"};
  unsigned lo = 0, hi = 0;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));  // OSXSAVE holds with AVX-512
  if ((lo & (3u << 17)) != (3u << 17)) return {false, "the OS does not enable the tile state"};
  constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  if (syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) != 0)
    return {false, std::string("the kernel refused the tile state (arch_prctl: ") +
                       std::strerror(errno) + ")"};
  return {true, "AMX-TILE and AMX-BF16, tile state granted by the kernel"};
#else
  return {false, "AMX is used on x86-64 Linux only"};
#endif
}

const AmxCheck& amx_check() {
  static const AmxCheck check = check_amx();  // the permission is asked once per process
  return check;
}

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
  if (isa == "amx") return amx_check().ok;
  return false;
}

bool compiled_in(const std::string& isa) {
#ifdef FASTATTN_HAVE_AMX
  if (isa == "amx") return true;
#endif
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
  if (isa == "amx") return IsaId::kAmx;
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
    for (const char* isa : {"amx", "avx512bf16", "avx512", "avx2", "baseline"})
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
  // The automatic choice skips "amx" (see amx_state in cpu_features.hpp).
  const std::vector<std::string>& isas = supported_isas();
  const std::string isa = !g_forced.empty() ? g_forced
                          : isas.front() == "amx" ? isas[1]
                                                  : isas.front();
  g_selected_id.store(int(id_of(isa)), std::memory_order_release);
  return isa;
}

std::string amx_state() {
  const AmxCheck& c = amx_check();
  return (c.ok ? "available: " : "unavailable: ") + c.why;
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
