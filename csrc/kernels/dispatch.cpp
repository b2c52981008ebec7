// Run-time ISA choice. Compiled with baseline flags only: the CPU checks must not themselves
// contain the instructions they guard against.
#include <atomic>
#include <cstdlib>
#include <stdexcept>

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

// Worst to best.
const Candidate kCandidates[] = {
    {&kScalarKernels, &always},
#if CPUATTN_HAVE_X86_KERNELS
    {&kAvx2Kernels, &has_avx2},
    {&kAvx512Kernels, &has_avx512},
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
