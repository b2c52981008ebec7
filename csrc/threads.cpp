#include "threads.h"

#include <algorithm>
#include <atomic>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace cpuattn {
namespace {
std::atomic<int> g_calls_in_flight{0};
}  // namespace

int default_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

int threads_for_call(int requested, int calls_in_flight) {
#ifdef _OPENMP
  // An explicit count is honoured up to 4x the CPUs: past that, threads only add scratch
  // memory and context switches. The CPUs counted once (a system call each time).
  static const int procs = std::max(1, omp_get_num_procs());
  if (requested > 0) return std::min(requested, 4 * procs);
  return std::max(1, default_threads() / std::max(1, calls_in_flight));
#else
  (void)requested;
  (void)calls_in_flight;
  return 1;  // no thread team to size
#endif
}

CallInFlight::CallInFlight() : count_(g_calls_in_flight.fetch_add(1) + 1) {}
CallInFlight::~CallInFlight() { g_calls_in_flight.fetch_sub(1); }

}  // namespace cpuattn
