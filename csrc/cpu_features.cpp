#include "cpu_features.hpp"

#include <atomic>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <iterator>
#include <mutex>
#include <stdexcept>

#include "kernel_table.hpp"

#if (defined(__x86_64__) || defined(_M_X64)) && defined(__linux__)
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace fastattn {

std::atomic<const KernelTable*> detail::g_selected_kernels{nullptr};

namespace {

bool amx_usable();

// cpu_supports(feature), in isa_table.def's CPU checks. __builtin_cpu_supports also checks that
// the OS saves the wider registers (XCR0). Off x86-64 only the baseline is built, and no x86
// feature is there.
#if defined(__x86_64__) || defined(_M_X64)
#define cpu_supports(feature) __builtin_cpu_supports(feature)
#else
#define cpu_supports(feature) false
#endif

// FASTATTN_KERNELS_OF(name): &name::kernels where CMake built the variant (FASTATTN_HAVE_<name>
// is 1), else nullptr. Chosen by the preprocessor, so that a variant not built is never named:
// its table does not exist to link against.
#define FASTATTN_KERNELS_OF(name) FASTATTN_KERNELS_IF(FASTATTN_HAVE_##name, name)
#define FASTATTN_KERNELS_IF(have, name) FASTATTN_KERNELS_IF_(have, name)  // expands `have`
#define FASTATTN_KERNELS_IF_(have, name) FASTATTN_KERNELS_IF_##have(name)
#define FASTATTN_KERNELS_IF_1(name) &name::kernels
#define FASTATTN_KERNELS_IF_0(name) nullptr

// A row of isa_table.def as the selection sees it; kRows[int(IsaId)].
struct IsaRow {
  const char* name;
  const KernelTable* kernels;  // null where the variant is not in this build
  bool (*cpu_check)();         // whether this CPU (and OS) runs it
};

constexpr IsaRow kRows[] = {
#define FASTATTN_ISA(name, id, vector_bytes, arch, flags, cpu_check) \
  {#name, FASTATTN_KERNELS_OF(name), [] { return bool(cpu_check); }},
#include "isa_table.def"
#undef FASTATTN_ISA
};

bool cpu_runs(IsaId id) {
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
#endif
  return kRows[int(id)].cpu_check();
}

struct AmxCheck {
  bool ok;
  std::string why;
};

// AMX needs the CPU (CPUID.(7,0):EDX bit 24 AMX-TILE, bit 22 AMX-BF16), the OS managing the
// tile state (XCR0 bits 17-18) and, on Linux, the process's permission to use it, asked once
// (arch_prctl ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA): the first tile instruction without
// it faults.
AmxCheck check_amx() {
#if !FASTATTN_HAVE_amx
  return {false, "not in this build"};
#elif defined(FASTATTN_AMX_EMULATE)
  if (!cpu_runs(IsaId::kAvx512Bf16))
    return {false, "emulated build, but this CPU lacks AVX512-BF16"};
  return {true, "emulated in software (test build FASTATTN_AMX_EMULATE: layouts, not speed)"};
#elif (defined(__x86_64__) || defined(_M_X64)) && defined(__linux__)
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(d & (1u << 24)) || !(d & (1u << 22)))
    return {false, "this CPU has no AMX-TILE and AMX-BF16"};
  if (!cpu_runs(IsaId::kAvx512Bf16)) return {false, "this CPU has AMX but no AVX512-BF16"};
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

bool amx_usable() { return amx_check().ok; }

// The variants built and run by this CPU, best first (found once: neither changes).
const std::vector<IsaId>& supported_ids() {
  static const std::vector<IsaId> ids = [] {
    std::vector<IsaId> out;
    for (size_t i = 0; i < std::size(kRows); ++i)
      if (kRows[i].kernels && cpu_runs(IsaId(i))) out.push_back(IsaId(i));
    return out;
  }();
  return ids;
}

std::mutex g_mutex;
bool g_forced = false;    // set by force_isa or FASTATTN_ISA: then g_forced_id is used
IsaId g_forced_id{};
bool g_env_read = false;  // FASTATTN_ISA is read on first use
std::atomic<bool> g_pairs_forced{false};  // g_forced && g_forced_id == kAvx512Bf16

void set_forced(bool forced, IsaId id) {  // under g_mutex
  g_forced = forced;
  g_forced_id = id;
  g_pairs_forced.store(forced && id == IsaId::kAvx512Bf16, std::memory_order_relaxed);
}

// The one place a variant is looked up by name: where a user names one (force_isa, FASTATTN_ISA).
IsaId check_available(const std::string& name, const char* origin) {
  for (IsaId id : supported_ids())
    if (name == kRows[int(id)].name) return id;
  std::string have;
  for (const auto& isa : supported_isas()) have += (have.empty() ? "" : ", ") + isa;
  throw std::invalid_argument(std::string(origin) + "='" + name +
                              "' is not available on this CPU and build (available: " + have +
                              ")");
}

// The variant calls use now, published for the per-call dispatch. Under g_mutex.
IsaId select_locked() {
  if (!g_env_read) {
    const char* env = std::getenv("FASTATTN_ISA");
    // An unavailable name throws here, so every call fails alike until it is fixed.
    if (env && *env) set_forced(true, check_available(env, "FASTATTN_ISA"));
    g_env_read = true;
  }
  // The automatic choice skips "amx" (see amx_state in cpu_features.hpp); the baseline is
  // always supported, so a second variant follows it.
  const std::vector<IsaId>& ids = supported_ids();
  const IsaId id = g_forced                     ? g_forced_id
                   : ids.front() == IsaId::kAmx ? ids[1]
                                                : ids.front();
  detail::g_selected_kernels.store(kRows[int(id)].kernels, std::memory_order_release);
  return id;
}

}  // namespace

const KernelTable& detail::select_kernels() {
  std::lock_guard<std::mutex> lock(g_mutex);
  return *kRows[int(select_locked())].kernels;
}

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
    for (IsaId id : supported_ids()) out.push_back(kRows[int(id)].name);
    return out;
  }();
  return isas;
}

std::string selected_isa() {
  std::lock_guard<std::mutex> lock(g_mutex);
  return kRows[int(select_locked())].name;
}

std::string amx_state() {
  const AmxCheck& c = amx_check();
  return (c.ok ? "available: " : "unavailable: ") + c.why;
}

// Per 16-bit call: an atomic load, no lock, where the pairs are not the automatic choice.
bool bf16_pairs_enabled() {
  static const bool faster = pairs_faster_here();
  return faster || g_pairs_forced.load(std::memory_order_relaxed);
}

void force_isa(const std::string& name) {
  const IsaId id = name.empty() ? IsaId() : check_available(name, "isa");
  std::lock_guard<std::mutex> lock(g_mutex);
  g_env_read = !name.empty();  // "" goes back to FASTATTN_ISA, then to the best variant
  set_forced(!name.empty(), id);
  // A named variant is selected now; "" selects anew on the next call (which reads
  // FASTATTN_ISA, and throws there if it names no available variant).
  detail::g_selected_kernels.store(name.empty() ? nullptr : kRows[int(id)].kernels,
                                   std::memory_order_release);
}

}  // namespace fastattn
