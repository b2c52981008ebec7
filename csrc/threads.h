// How many OpenMP threads one call uses. Calls run concurrently from Python threads (the GIL
// is released), and each OpenMP call site gets its own thread team: without a budget, 8 Python
// threads x all cores would oversubscribe the machine.
#pragma once
#include <algorithm>
#include <atomic>
#include <cstdint>

namespace cpuattn {

// Threads a call uses by default: OMP_NUM_THREADS, else all cores (1 without OpenMP).
int default_threads();

// `requested` when > 0 (an explicit num_threads is honoured, up to 4x the CPU count);
// otherwise the default shared
// evenly among the `calls_in_flight` calls running now, this one included, at least 1.
// Always 1 in a build without OpenMP.
int threads_for_call(int requested, int calls_in_flight);

// Counts the calls in flight for as long as it lives.
class CallInFlight {
 public:
  CallInFlight();
  ~CallInFlight();
  CallInFlight(const CallInFlight&) = delete;
  CallInFlight& operator=(const CallInFlight&) = delete;
  int count() const { return count_; }  // calls in flight when this one started, itself included

 private:
  int count_;
};

// Hands out tasks [0, tasks) in runs of consecutive ones, each 1 / (kRunsPerThread x threads)
// of what is left and at least one: long runs first (a thread's next task is mostly the one
// after its current one, worth prefetching), single tasks at the end (the threads finish
// together). Any thread may call next(); each task goes out once.
class TaskRuns {
 public:
  static constexpr int64_t kRunsPerThread = 4;
  TaskRuns(int64_t tasks, int threads) : tasks_(tasks), divisor_(kRunsPerThread * threads) {}
  // The next run [begin, end); false once every task is out.
  bool next(int64_t& begin, int64_t& end) {
    int64_t start = next_.load(std::memory_order_relaxed);
    int64_t length;
    do {
      if (start >= tasks_) return false;
      length = std::max<int64_t>(1, (tasks_ - start) / divisor_);
    } while (!next_.compare_exchange_weak(start, start + length, std::memory_order_relaxed));
    begin = start;
    end = start + length;
    return true;
  }

 private:
  std::atomic<int64_t> next_{0};
  int64_t tasks_, divisor_;
};

}  // namespace cpuattn
