// Helpers shared by every handler: error construction and shape bookkeeping.
// Handlers never abort: inconsistent sizes come back as ffi::Error with a message that names the
// operand, the expected and the given value (Python validates first; this is the second line).
#pragma once

#include <cstdint>
#include <sstream>
#include <string>

#include "xla/ffi/api/ffi.h"

namespace dsjax {

namespace ffi = xla::ffi;

template <typename... Ts>
std::string StrCat(const Ts&... parts) {
  std::ostringstream os;
  (os << ... << parts);
  return os.str();
}

template <typename... Ts>
ffi::Error InvalidArgument(const Ts&... parts) {
  return ffi::Error(ffi::ErrorCode::kInvalidArgument, StrCat(parts...));
}

inline std::string DimsToString(ffi::Span<const int64_t> dims) {
  std::ostringstream os;
  os << "[";
  for (size_t i = 0; i < dims.size(); ++i) os << (i ? ", " : "") << dims[i];
  os << "]";
  return os.str();
}

inline int64_t Product(ffi::Span<const int64_t> dims, size_t begin, size_t end) {
  int64_t p = 1;
  for (size_t i = begin; i < end; ++i) p *= dims[i];
  return p;
}

inline int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline const char* DTypeName(ffi::DataType t) {
  switch (t) {
    case ffi::DataType::F32: return "float32";
    case ffi::DataType::F16: return "float16";
    case ffi::DataType::BF16: return "bfloat16";
    case ffi::DataType::F64: return "float64";
    case ffi::DataType::F8E4M3FN: return "float8_e4m3fn";
    case ffi::DataType::S32: return "int32";
    case ffi::DataType::S64: return "int64";
    case ffi::DataType::U8: return "uint8";
    case ffi::DataType::PRED: return "bool";
    default: return "other";
  }
}

}  // namespace dsjax

#define DSJAX_RETURN_IF_ERROR(expr)              \
  do {                                           \
    ::xla::ffi::Error dsjax_err_ = (expr);       \
    if (dsjax_err_.failure()) return dsjax_err_; \
  } while (0)
