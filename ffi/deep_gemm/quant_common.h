// Shape contract of the FP8 quantizers, shared by the CPU twin and the CUDA kernels.
//   per-token: x [..., k]    -> q [..., k] e4m3fn, scales [..., ceil(k/128)] f32   (1x128 groups)
//   per-block: x [..., m, n] -> q [..., m, n],     scales [..., ceil(m/128), ceil(n/128)] (128x128)
#pragma once

#include "common/ffi_common.h"

namespace dsjax::deep_gemm {

constexpr int64_t kGroup = 128;

struct QuantShape {
  int64_t batch = 1;  // product of the leading dims
  int64_t rows = 1;   // m (per-block) or 1 (per-token: rows are folded into batch)
  int64_t cols = 0;   // k (per-token) or n (per-block)
};

inline ffi::Error CheckInputDtype(ffi::DataType t, const char* op) {
  if (t != ffi::DataType::F32 && t != ffi::DataType::BF16 && t != ffi::DataType::F16) {
    return InvalidArgument(op, ": x must be float32, bfloat16 or float16, got ", DTypeName(t));
  }
  return ffi::Error::Success();
}

inline ffi::Error PerTokenShape(const ffi::AnyBuffer& x, const ffi::AnyBuffer& q,
                                const ffi::AnyBuffer& scales, QuantShape* s) {
  const char* op = "dsjax_deep_gemm_per_token_cast_to_fp8";
  DSJAX_RETURN_IF_ERROR(CheckInputDtype(x.element_type(), op));
  auto xd = x.dimensions();
  if (xd.size() < 1) return InvalidArgument(op, ": x must have rank >= 1, got rank 0");
  if (q.element_type() != ffi::DataType::F8E4M3FN)
    return InvalidArgument(op, ": output must be float8_e4m3fn, got ", DTypeName(q.element_type()));
  if (scales.element_type() != ffi::DataType::F32)
    return InvalidArgument(op, ": scales must be float32, got ", DTypeName(scales.element_type()));
  int64_t k = xd.back();
  auto qd = q.dimensions();
  auto sd = scales.dimensions();
  bool ok = qd.size() == xd.size() && sd.size() == xd.size();
  for (size_t i = 0; ok && i < xd.size(); ++i) {
    ok = qd[i] == xd[i] && sd[i] == (i + 1 == xd.size() ? CeilDiv(k, kGroup) : xd[i]);
  }
  if (!ok)
    return InvalidArgument(op, ": inconsistent shapes x=", DimsToString(xd), " q=", DimsToString(qd),
                           " scales=", DimsToString(sd), " (expected scales [..., ceil(k/128)])");
  s->batch = Product(xd, 0, xd.size() - 1);
  s->rows = 1;
  s->cols = k;
  return ffi::Error::Success();
}

inline ffi::Error PerBlockShape(const ffi::AnyBuffer& x, const ffi::AnyBuffer& q,
                                const ffi::AnyBuffer& scales, QuantShape* s) {
  const char* op = "dsjax_deep_gemm_per_block_cast_to_fp8";
  DSJAX_RETURN_IF_ERROR(CheckInputDtype(x.element_type(), op));
  auto xd = x.dimensions();
  if (xd.size() < 2) return InvalidArgument(op, ": x must have rank >= 2, got rank ", xd.size());
  if (q.element_type() != ffi::DataType::F8E4M3FN)
    return InvalidArgument(op, ": output must be float8_e4m3fn, got ", DTypeName(q.element_type()));
  if (scales.element_type() != ffi::DataType::F32)
    return InvalidArgument(op, ": scales must be float32, got ", DTypeName(scales.element_type()));
  size_t r = xd.size();
  int64_t m = xd[r - 2], n = xd[r - 1];
  auto qd = q.dimensions();
  auto sd = scales.dimensions();
  bool ok = qd.size() == r && sd.size() == r;
  for (size_t i = 0; ok && i < r; ++i) {
    int64_t want = i == r - 2 ? CeilDiv(m, kGroup) : i == r - 1 ? CeilDiv(n, kGroup) : xd[i];
    ok = qd[i] == xd[i] && sd[i] == want;
  }
  if (!ok)
    return InvalidArgument(op, ": inconsistent shapes x=", DimsToString(xd), " q=", DimsToString(qd),
                           " scales=", DimsToString(sd),
                           " (expected scales [..., ceil(m/128), ceil(n/128)])");
  s->batch = Product(xd, 0, r - 2);
  s->rows = m;
  s->cols = n;
  return ffi::Error::Success();
}

}  // namespace dsjax::deep_gemm
