// Build and run-time facts: ISA in use, ISAs this CPU supports, OpenMP.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "kernels/kernel.h"
#include "threads.h"

namespace py = pybind11;

namespace {

// exp as the named ISA's softmax computes it, on a copy of x (float32 or float64).
template <typename T>
py::array_t<T> kernel_exp(const py::array_t<T, py::array::c_style | py::array::forcecast>& x,
                          const std::string& isa) {
  const cpuattn::KernelSet& kernels = cpuattn::kernels_named(isa);
  py::array_t<T> y(x.request().shape);
  if constexpr (sizeof(T) == 4) {
    kernels.exp_f32(x.data(), y.mutable_data(), x.size());
  } else {
    kernels.exp_f64(x.data(), y.mutable_data(), x.size());
  }
  return y;
}

}  // namespace

void register_info(py::module_& m) {
  m.def("kernel_exp", &kernel_exp<float>, py::arg("x"), py::arg("isa"));
  m.def("kernel_exp", &kernel_exp<double>, py::arg("x"), py::arg("isa"),
        "exp(x) as the softmax of the named ISA computes it (float32 or float64; a test hook).");
  m.def(
      "isa", [] { return std::string(cpuattn::active_kernels().name); },
      "Name of the kernel set in use: one of supported_isas() ('scalar', 'avx2', 'avx512', "
      "'avx512_bf16', 'avx512_amx' on x86-64; 'scalar' elsewhere).");
  m.def("supported_isas", &cpuattn::supported_isas,
        "Kernel sets compiled in and supported by this CPU, worst to best.");
  m.def("select_isa", &cpuattn::select_isa, py::arg("name"),
        "Force a kernel set for the whole process (tests and benchmarks). Raises ValueError if it "
        "is unknown or unsupported here.");
  m.def(
      "openmp",
      [] {
#ifdef _OPENMP
        return true;
#else
        return false;
#endif
      },
      "Whether the extension was built with OpenMP.");
  m.def("max_threads", &cpuattn::default_threads,
        "Threads a call uses when num_threads is None and no other call is in flight "
        "(OMP_NUM_THREADS, else all cores).");
  m.def("threads_for_call", &cpuattn::threads_for_call, py::arg("requested"),
        py::arg("calls_in_flight"),
        "Threads a call uses: `requested` if > 0, else max_threads() shared among the calls "
        "in flight (this one included).");
}
