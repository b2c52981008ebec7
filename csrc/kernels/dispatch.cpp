// Run-time ISA choice. Compiled with baseline flags only: the CPU checks must not themselves
// contain the instructions they guard against.
#include <atomic>
#include <cstdlib>
#include <stdexcept>

#if CPUATTN_HAVE_X86_KERNELS
#if defined(_MSC_VER)
#include <intrin.h>  // __cpuidex (clang-cl)
#else
#include <cpuid.h>
#endif
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif
#if defined(__APPLE__)
#include <sys/sysctl.h>
#endif
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
// CPUID and XGETBV read directly, the same way on every OS and compiler (clang-cl links no
// runtime for __builtin_cpu_supports). A feature counts only when the OS also saves its
// registers (XCR0), or its first instruction would fault.
struct X86Features {
  bool avx2_fma_f16c = false;
  bool avx512 = false;  // F, VL, BW, DQ
  bool avx512_bf16 = false;
  bool amx_bf16 = false;  // AMX-TILE and AMX-BF16
};

void cpuid(unsigned leaf, unsigned subleaf, unsigned r[4]) {
#if defined(_MSC_VER)
  int v[4];
  __cpuidex(v, static_cast<int>(leaf), static_cast<int>(subleaf));
  for (int i = 0; i < 4; ++i) r[i] = static_cast<unsigned>(v[i]);
#else
  __cpuid_count(leaf, subleaf, r[0], r[1], r[2], r[3]);
#endif
}

unsigned long long xcr0() {
  unsigned lo = 0, hi = 0;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (static_cast<unsigned long long>(hi) << 32) | lo;
}

bool bit(unsigned word, int b) { return (word >> b) & 1u; }

// macOS turns the AVX-512 register state on at first use, so XCR0 does not show it yet.
bool os_saves_zmm(unsigned long long xcr) {
#if defined(__APPLE__)
  int v = 0;
  size_t n = sizeof(v);
  if (sysctlbyname("hw.optional.avx512f", &v, &n, nullptr, 0) == 0) return v != 0;
#endif
  return (xcr & 0xE6) == 0xE6;  // SSE, AVX, opmask, ZMM_Hi256, Hi16_ZMM
}

X86Features read_x86_features() {
  X86Features f;
  unsigned r[4];
  cpuid(0, 0, r);
  if (r[0] < 7) return f;
  cpuid(1, 0, r);
  const bool avx = bit(r[2], 28), osxsave = bit(r[2], 27), fma = bit(r[2], 12);
  const bool f16c = bit(r[2], 29);
  if (!avx || !osxsave) return f;
  const unsigned long long xcr = xcr0();
  if ((xcr & 0x6) != 0x6) return f;  // SSE and AVX state
  unsigned l7[4], l7s1[4];
  cpuid(7, 0, l7);
  cpuid(7, 1, l7s1);
  f.avx2_fma_f16c = bit(l7[1], 5) && fma && f16c;
  f.avx512 = f.avx2_fma_f16c && os_saves_zmm(xcr) && bit(l7[1], 16) && bit(l7[1], 17) &&
             bit(l7[1], 30) && bit(l7[1], 31);
  f.avx512_bf16 = f.avx512 && bit(l7s1[0], 5);
  constexpr unsigned long long kTileState = (1ull << 17) | (1ull << 18);  // XTILECFG, XTILEDATA
  f.amx_bf16 =
      f.avx512_bf16 && bit(l7[3], 24) && bit(l7[3], 22) && (xcr & kTileState) == kTileState;
  return f;
}

const X86Features& x86() {
  static const X86Features f = read_x86_features();
  return f;
}

bool has_avx2() { return x86().avx2_fma_f16c; }
bool has_avx512() { return x86().avx512; }
#endif
#if CPUATTN_HAVE_BF16_KERNELS
bool has_avx512_bf16() { return x86().avx512_bf16; }
#endif
#if CPUATTN_HAVE_AMX_KERNELS
// AMX also needs Linux's permission to use the tile data state (arch_prctl
// ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA; Linux 5.16+): without it the first tile
// instruction would fault. Asked once; the answer holds for the process.
bool has_avx512_amx() {
#if defined(__linux__)
  static const bool ok = [] {
    if (!x86().amx_bf16) return false;
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
  for (const Candidate& c : kCandidates)
    known += std::string(known.empty() ? "" : ", ") + c.kernels->name;
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

void select_isa(const std::string& name) {
  g_active.store(find_supported(name), std::memory_order_release);
}

}  // namespace cpuattn
