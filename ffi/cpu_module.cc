// pybind11 module dsjax._ffi_cpu: exposes every self-registered CPU handler as a PyCapsule.
#include <pybind11/pybind11.h>

#include "common/registry.h"

namespace py = pybind11;

PYBIND11_MODULE(_ffi_cpu, m) {
  m.doc() = "dsjax CPU XLA FFI handlers (the CPU twins of the CUDA kernels)";
  m.def("registrations", [] {
    py::dict out;
    for (const auto& [name, fn] : dsjax::FfiRegistry()) out[py::str(name)] = py::capsule(fn);
    return out;
  }, "Returns {target name: PyCapsule of the XLA FFI handler}.");
}
