// Self-registration of XLA FFI handlers, so a kernel is added by adding its source file.
// Each native module (_ffi_cpu, _ffi_cuda) has its own registry: the modules are built with
// hidden visibility, so the function-local static is not shared between them.
#pragma once

#include <map>
#include <string>

namespace dsjax {

inline std::map<std::string, void*>& FfiRegistry() {
  static std::map<std::string, void*> registry;
  return registry;
}

struct FfiRegistrar {
  FfiRegistrar(const char* name, void* handler) { FfiRegistry()[name] = handler; }
};

}  // namespace dsjax

#define DSJAX_FFI_CONCAT_(a, b) a##b
#define DSJAX_FFI_CONCAT(a, b) DSJAX_FFI_CONCAT_(a, b)
// DSJAX_REGISTER_FFI("dsjax_component_op", HandlerSymbol) at namespace scope in the .cc/.cu file.
#define DSJAX_REGISTER_FFI(NAME, SYMBOL)                                      \
  static ::dsjax::FfiRegistrar DSJAX_FFI_CONCAT(dsjax_ffi_registrar_, __LINE__)( \
      NAME, reinterpret_cast<void*>(SYMBOL))
