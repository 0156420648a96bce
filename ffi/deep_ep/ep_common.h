// Shape contracts of the DeepEP local kernels and the host-side helpers shared by the CPU twin and
// the CUDA kernels (dsjax/deep_ep/reference.py is the specification):
//   layout:        topk_idx [T, K] s32 -> per_rank [R], per_node [Nn], per_expert [E] s32, in_rank [T, R] pred
//   route:         topk_idx [T, K] s32, weights [T, K] f32 -> reduce_idx [T, D], send_src [D*C],
//                  send_idx [D*C, K] s32, send_w [D*C, K] f32, num_dropped [] s32
//   ll_layout:     recv_idx [M, K] s32 -> src_row [L*M], count [L], pos [M, K] s32
//   gather_rows:   x [M, ...] any dtype, idx [N] s32 -> [N, ...]          (zero rows for idx < 0)
//   gather_reduce: x [M, H] f32|bf16, idx [N, J] s32, w [N, J] f32 -> [N, H] f32|bf16 (f32 sums)
// Ids: negative = none; an id at or above the expert count, or a row index outside [-1, M), is an
// error (returned, never read).
#pragma once

#include <cstdint>
#include <cstring>

#include "common/ffi_common.h"
#include "common/fp8.h"

namespace dsjax::deep_ep {

inline ffi::Error ExpectType(const char* op, const char* what, ffi::DataType got, ffi::DataType want) {
  if (got == want) return ffi::Error::Success();
  return InvalidArgument(op, ": ", what, " must be ", DTypeName(want), ", got ", DTypeName(got));
}

inline ffi::Error ExpectDims(const char* op, const char* what, ffi::Span<const int64_t> got,
                             std::initializer_list<int64_t> want) {
  bool ok = got.size() == want.size();
  size_t i = 0;
  for (int64_t w : want) {
    if (!ok) break;
    ok = got[i++] == w;
  }
  if (ok) return ffi::Error::Success();
  std::ostringstream os;
  os << "[";
  i = 0;
  for (int64_t w : want) os << (i++ ? ", " : "") << w;
  os << "]";
  return InvalidArgument(op, ": ", what, " must have shape ", os.str(), ", got ", DimsToString(got));
}

// f32 -> bf16 bits, round to nearest even (XLA's convert); NaN stays a quiet NaN.
DSJAX_HD uint16_t FloatToBf16Bits(float f) {
  uint32_t b = FloatBits(f);
  if ((b & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((b >> 16) | 0x40u);
  b += 0x7FFFu + ((b >> 16) & 1u);
  return static_cast<uint16_t>(b >> 16);
}

struct RouteDims {
  int64_t tokens = 0, topk = 0;
};

inline ffi::Error CheckTopk(const char* op, const ffi::AnyBuffer& idx, RouteDims* d) {
  DSJAX_RETURN_IF_ERROR(ExpectType(op, "topk_idx", idx.element_type(), ffi::DataType::S32));
  auto dims = idx.dimensions();
  if (dims.size() != 2) return InvalidArgument(op, ": topk_idx must have rank 2 [T, K], got ", DimsToString(dims));
  d->tokens = dims[0];
  d->topk = dims[1];
  return ffi::Error::Success();
}

inline ffi::Error CheckGatherRows(const char* op, const ffi::AnyBuffer& x, const ffi::AnyBuffer& idx,
                                  const ffi::AnyBuffer& out, int64_t* m, int64_t* n, int64_t* row_bytes) {
  DSJAX_RETURN_IF_ERROR(ExpectType(op, "idx", idx.element_type(), ffi::DataType::S32));
  if (out.element_type() != x.element_type())
    return InvalidArgument(op, ": output dtype ", DTypeName(out.element_type()), " differs from x's ",
                           DTypeName(x.element_type()));
  auto xd = x.dimensions(), id = idx.dimensions(), od = out.dimensions();
  if (xd.size() < 1) return InvalidArgument(op, ": x must have rank >= 1, got rank 0");
  if (id.size() != 1) return InvalidArgument(op, ": idx must have rank 1 [N], got ", DimsToString(id));
  bool ok = od.size() == xd.size() && od[0] == id[0];
  for (size_t i = 1; ok && i < xd.size(); ++i) ok = od[i] == xd[i];
  if (!ok)
    return InvalidArgument(op, ": output must have shape [N, x.shape[1:]...] with N=", id[0], " and x ",
                           DimsToString(xd), ", got ", DimsToString(od));
  *m = xd[0];
  *n = id[0];
  *row_bytes = Product(xd, 1, xd.size()) * static_cast<int64_t>(ffi::ByteWidth(x.element_type()));
  return ffi::Error::Success();
}

inline bool IsReduceType(ffi::DataType t) { return t == ffi::DataType::F32 || t == ffi::DataType::BF16; }

inline ffi::Error CheckGatherReduce(const char* op, const ffi::AnyBuffer& x, const ffi::AnyBuffer& idx,
                                    const ffi::AnyBuffer& w, const ffi::AnyBuffer& out, int64_t* m,
                                    int64_t* n, int64_t* j, int64_t* h) {
  if (!IsReduceType(x.element_type()) || !IsReduceType(out.element_type()))
    return InvalidArgument(op, ": x and the output must be float32 or bfloat16, got ",
                           DTypeName(x.element_type()), " and ", DTypeName(out.element_type()));
  DSJAX_RETURN_IF_ERROR(ExpectType(op, "idx", idx.element_type(), ffi::DataType::S32));
  DSJAX_RETURN_IF_ERROR(ExpectType(op, "weights", w.element_type(), ffi::DataType::F32));
  auto xd = x.dimensions(), id = idx.dimensions();
  if (xd.size() != 2) return InvalidArgument(op, ": x must have rank 2 [M, H], got ", DimsToString(xd));
  if (id.size() != 2) return InvalidArgument(op, ": idx must have rank 2 [N, J], got ", DimsToString(id));
  DSJAX_RETURN_IF_ERROR(ExpectDims(op, "weights", w.dimensions(), {id[0], id[1]}));
  DSJAX_RETURN_IF_ERROR(ExpectDims(op, "output", out.dimensions(), {id[0], xd[1]}));
  *m = xd[0];
  *n = id[0];
  *j = id[1];
  *h = xd[1];
  return ffi::Error::Success();
}

}  // namespace dsjax::deep_ep
