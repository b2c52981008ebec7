// The extension module: wires up one register_* per concept, nothing else.
#include <pybind11/pybind11.h>

namespace py = pybind11;

void register_attention(py::module_& m);
void register_info(py::module_& m);

PYBIND11_MODULE(_core, m) {
  m.doc() = "cpuattn native core. Private: use the cpuattn package, which validates arguments.";
#ifdef CPUATTN_VERSION
  m.attr("__version__") = CPUATTN_VERSION;
#endif
  register_attention(m);
  register_info(m);
}
