// pybind11 module dsjax._ffi_cuda: exposes every self-registered CUDA handler as a PyCapsule,
// plus a few device queries the Python side uses to decide whether the module can run.
#include <cuda_runtime_api.h>
#include <pybind11/pybind11.h>

#include "common/registry.h"

namespace py = pybind11;

PYBIND11_MODULE(_ffi_cuda, m) {
  m.doc() = "dsjax CUDA XLA FFI handlers (sm_90a)";
  m.def("registrations", [] {
    py::dict out;
    for (const auto& [name, fn] : dsjax::FfiRegistry()) out[py::str(name)] = py::capsule(fn);
    return out;
  }, "Returns {target name: PyCapsule of the XLA FFI handler}.");
  m.def("compiled_arch", [] { return std::string("sm_90a"); });
  m.def("device_capability", [](int device) {
    cudaDeviceProp prop;
    cudaError_t err = cudaGetDeviceProperties(&prop, device);
    if (err != cudaSuccess) throw std::runtime_error(cudaGetErrorString(err));
    return py::make_tuple(prop.major, prop.minor);
  }, py::arg("device") = 0, "Compute capability (major, minor) of a CUDA device.");
}
