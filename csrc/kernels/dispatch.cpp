// Run-time ISA choice. Compiled with baseline flags only: the CPU checks must not themselves
// contain the instructions they guard against.
#include <atomic>
#include <cstdlib>
#include <stdexcept>

#if CPUATTN_HAVE_X86_KERNELS && defined(__linux__)
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "kernels/kernel.h"

namespace cpuattn {
namespace {

struct Candidate {
  const KernelSet* kernels;
  bool (*cpu_has)();
};

bool always() { return true; }
#if CPUATTN_HAVE_X86_KERNELS
bool has_avx2() {
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
}
bool has_avx512() {
  return has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
         __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq");
}
#endif
#if CPUATTN_HAVE_BF16_KERNELS
bool has_avx512_bf16() { return has_avx512() && __builtin_cpu_supports("avx512bf16"); }
#endif
#if CPUATTN_HAVE_AMX_KERNELS
// AMX-TILE and AMX-BF16 (CPUID.7.0:EDX bits 24, 22), and Linux's permission to use the tile
// data state (arch_prctl ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA; Linux 5.16+): without it
// the first tile instruction would fault. Asked once; the answer holds for the process.
bool has_avx512_amx() {
#if defined(__linux__)
  static const bool ok = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!has_avx512_bf16() || !__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    if (!(d & (1u << 24)) || !(d & (1u << 22))) return false;
    constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ok;
#else
  return false;
#endif
}
#endif

// Worst to best.
const Candidate kCandidates[] = {
    {&kScalarKernels, &always},
#if CPUATTN_HAVE_X86_KERNELS
    {&kAvx2Kernels, &has_avx2},
    {&kAvx512Kernels, &has_avx512},
#endif
#if CPUATTN_HAVE_BF16_KERNELS
    {&kAvx512Bf16Kernels, &has_avx512_bf16},
#endif
#if CPUATTN_HAVE_AMX_KERNELS
    {&kAvx512AmxKernels, &has_avx512_amx},
#endif
};

const KernelSet* find_supported(const std::string& name) {
  for (const Candidate& c : kCandidates) {
    if (name == c.kernels->name) {
      if (!c.cpu_has()) {
        throw std::invalid_argument("CPUATTN_ISA: '" + name + "' is not supported by this CPU");
      }
      return c.kernels;
    }
  }
  std::string known;
  for (const Candidate& c : kCandidates) known += std::string(known.empty() ? "" : ", ") + c.kernels->name;
  throw std::invalid_argument("CPUATTN_ISA: unknown ISA '" + name + "', expected one of " + known);
}

const KernelSet* best_supported() {
  const KernelSet* best = &kScalarKernels;
  for (const Candidate& c : kCandidates) {
    if (c.cpu_has()) best = c.kernels;
  }
  return best;
}

const KernelSet* initial_choice() {
  const char* env = std::getenv("CPUATTN_ISA");
  if (env != nullptr && *env != '\0') return find_supported(env);
  return best_supported();
}

std::atomic<const KernelSet*> g_active{nullptr};

}  // namespace

const KernelSet& active_kernels() {
  const KernelSet* k = g_active.load(std::memory_order_acquire);
  if (k == nullptr) {
    k = initial_choice();
    g_active.store(k, std::memory_order_release);
  }
  return *k;
}

std::vector<std::string> supported_isas() {
  std::vector<std::string> names;
  for (const Candidate& c : kCandidates) {
    if (c.cpu_has()) names.emplace_back(c.kernels->name);
  }
  return names;
}

const KernelSet& kernels_named(const std::string& name) { return *find_supported(name); }

void select_isa(const std::string& name) { g_active.store(find_supported(name), std::memory_order_release); }

}  // namespace cpuattn
