// How many OpenMP threads one call uses. Calls run concurrently from Python threads (the GIL
// is released), and each OpenMP call site gets its own thread team: without a budget, 8 Python
// threads x all cores would oversubscribe the machine.
#pragma once

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

}  // namespace cpuattn
