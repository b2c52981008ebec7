// Build and run-time facts: ISA in use, ISAs this CPU supports, OpenMP.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "kernels/kernel.h"
#include "threads.h"

namespace py = pybind11;

void register_info(py::module_& m) {
  m.def("isa", [] { return std::string(cpuattn::active_kernels().name); },
        "Name of the kernel set in use ('scalar', 'avx2', 'avx512').");
  m.def("supported_isas", &cpuattn::supported_isas,
        "Kernel sets compiled in and supported by this CPU, worst to best.");
  m.def("select_isa", &cpuattn::select_isa, py::arg("name"),
        "Force a kernel set for the whole process (tests and benchmarks). Raises ValueError if it "
        "is unknown or unsupported here.");
  m.def("openmp", [] {
#ifdef _OPENMP
    return true;
#else
    return false;
#endif
  }, "Whether the extension was built with OpenMP.");
  m.def("max_threads", &cpuattn::default_threads,
        "Threads a call uses when num_threads is None and no other call is in flight "
        "(OMP_NUM_THREADS, else all cores).");
  m.def("threads_for_call", &cpuattn::threads_for_call, py::arg("requested"),
        py::arg("calls_in_flight"),
        "Threads a call uses: `requested` if > 0, else max_threads() shared among the calls "
        "in flight (this one included).");
}
