#include "cpu.h"

#include <cstdlib>
#include <fstream>
#include <set>
#include <stdexcept>
#include <thread>
#include <utility>

#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#endif
#if defined(__aarch64__) && defined(__linux__)
#include <sys/auxv.h>
#endif
#if defined(__linux__)
#include <sched.h>
#endif

#include "isas.h"

namespace pyrt {
namespace {

#if defined(__x86_64__) || defined(_M_X64)
CpuFeatures detect() {
  CpuFeatures f;
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
  const bool fma = c & (1u << 12), osxsave = c & (1u << 27), avx = c & (1u << 28);
  if (!(fma && osxsave && avx)) return f;
  // XCR0 bits 1 (SSE) and 2 (AVX): the OS saves xmm and ymm state across context switches.
  unsigned xcr0_lo, xcr0_hi;
  __asm__ volatile("xgetbv" : "=a"(xcr0_lo), "=d"(xcr0_hi) : "c"(0));
  if ((xcr0_lo & 0x6u) != 0x6u) return f;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return f;
  f.avx2 = b & (1u << 5);
  // AVX-512 F (b16), BW (b30), VL (b31) and VNNI (c11); XCR0 bits 5-7: opmask, the upper
  // halves of zmm0-15 and zmm16-31.
  const bool avx512 = (b & (1u << 16)) && (b & (1u << 30)) && (b & (1u << 31)) && (c & (1u << 11));
  f.avx512vnni = f.avx2 && avx512 && (xcr0_lo & 0xE0u) == 0xE0u;
  return f;
}
#elif defined(__aarch64__) && defined(__linux__)
CpuFeatures detect() {
  CpuFeatures f;
  const unsigned long hw = getauxval(AT_HWCAP), hw2 = getauxval(AT_HWCAP2);
  f.neon = hw & (1ul << 1);       // HWCAP_ASIMD
  f.dotprod = hw & (1ul << 20);   // HWCAP_ASIMDDP
  f.i8mm = hw2 & (1ul << 13);     // HWCAP2_I8MM
  return f;
}
#else
CpuFeatures detect() { return CpuFeatures{}; }
#endif

// The usable ISAs, worst first: built, and supported by this CPU -- asked in that order, and
// only then is the table fetched (isas.h).
std::vector<std::pair<std::string, const KernelTable*>> usable() {
  const CpuFeatures& f = cpu_features();
  std::vector<std::pair<std::string, const KernelTable*>> out;
  for (const IsaInfo& isa : kIsas)
    if (isa.built && isa.supported(f)) out.emplace_back(isa.name, isa.table());
  return out;
}

}  // namespace

const CpuFeatures& cpu_features() {
  static const CpuFeatures f = detect();
  return f;
}

std::vector<std::string> available_isas() {
  std::vector<std::string> names;
  for (const auto& u : usable()) names.push_back(u.first);
  return names;
}

std::string known_isas() {
  std::string names;
  for (const IsaInfo& isa : kIsas) names += (names.empty() ? "" : ", ") + std::string(isa.name);
  return names;
}

const KernelTable* kernels_for(const std::string& name) {
  for (const auto& u : usable())
    if (u.first == name) return u.second;
  bool known = false;
  for (const IsaInfo& isa : kIsas) known = known || name == isa.name;
  if (!known) throw std::invalid_argument("unknown ISA '" + name + "' (known: " + known_isas() + ")");
  std::string have;
  for (const auto& n : available_isas()) have += (have.empty() ? "" : ", ") + n;
  throw std::invalid_argument("ISA '" + name + "' is not available on this CPU/build (available: " +
                              have + ")");
}

const KernelTable* default_kernels() {
  static const KernelTable* chosen = [] {
    const char* env = std::getenv("PYRUNTIME_ISA");
    if (env && *env) return kernels_for(env);
    return usable().back().second;
  }();
  return chosen;
}

int physical_cores() {
  static const int n = [] {
    int logical = static_cast<int>(std::thread::hardware_concurrency());
#if defined(__linux__)
    cpu_set_t set;
    std::set<std::pair<std::string, std::string>> cores;
    if (sched_getaffinity(0, sizeof(set), &set) == 0) {
      logical = CPU_COUNT(&set);
      for (int cpu = 0; cpu < CPU_SETSIZE; ++cpu) {
        if (!CPU_ISSET(cpu, &set)) continue;
        const std::string base = "/sys/devices/system/cpu/cpu" + std::to_string(cpu) + "/topology/";
        std::ifstream pkg(base + "physical_package_id"), core(base + "core_id");
        std::string p, c;
        if (!(pkg >> p) || !(core >> c)) { cores.clear(); break; }
        cores.emplace(p, c);
      }
    }
    if (!cores.empty()) return static_cast<int>(cores.size());
#endif
    return logical > 0 ? logical : 1;
  }();
  return n;
}

}  // namespace pyrt
