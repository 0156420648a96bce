// CPU twins of DeepEP's data movement around the collectives: packing rows into per-destination
// send buffers / unpacking received rows (gather_rows: a byte copy per row, any dtype, FP8 codes
// and scales included) and the combine reduction (gather_reduce: weighted f32 sum of the gathered
// copies of each token, in index order, rounded once). Same values as dsjax/deep_ep/reference.py.
#include <algorithm>
#include <cstring>
#include <vector>

#include "common/dtypes.h"
#include "common/ffi_common.h"
#include "common/parallel.h"
#include "common/registry.h"
#include "deep_ep/ep_common.h"

namespace dsjax::deep_ep {
namespace {

// First index outside [-1, limit), or -1 when all are in range.
int64_t FirstBadIndex(const int32_t* idx, int64_t n, int64_t limit) {
  for (int64_t i = 0; i < n; ++i)
    if (idx[i] < -1 || idx[i] >= limit) return i;
  return -1;
}

ffi::Error GatherRowsImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer idx,
                          ffi::Result<ffi::AnyBuffer> out) {
  const char* op = "dsjax_deep_ep_gather_rows";
  int64_t m = 0, n = 0, row_bytes = 0;
  DSJAX_RETURN_IF_ERROR(CheckGatherRows(op, x, idx, *out, &m, &n, &row_bytes));
  const int32_t* ix = static_cast<const int32_t*>(idx.untyped_data());
  int64_t bad = FirstBadIndex(ix, n, m);
  if (bad >= 0) return InvalidArgument(op, ": idx[", bad, "]=", ix[bad], " is outside [-1, ", m, ")");
  if (n == 0 || row_bytes == 0) return ffi::Error::Success();
  const char* src = static_cast<const char*>(x.untyped_data());
  char* dst = static_cast<char*>(out->untyped_data());
  // >= 256 KiB per chunk: a copy this small is cheaper than waking a pool thread, and under
  // shard_map every device's program competes for the same pool.
  int64_t min_rows = std::max<int64_t>(1, (256 << 10) / row_bytes);
  ParallelFor(pool, n, min_rows, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      int32_t s = ix[r];
      if (s >= 0) {
        std::memcpy(dst + r * row_bytes, src + s * row_bytes, static_cast<size_t>(row_bytes));
      } else {
        std::memset(dst + r * row_bytes, 0, static_cast<size_t>(row_bytes));
      }
    }
  });
  return ffi::Error::Success();
}

template <typename Load>
void ReduceRows(Load load, ffi::DataType out_type, void* out, const int32_t* ix, const float* w,
                int64_t b, int64_t e, int64_t j_count, int64_t h) {
  std::vector<float> acc(static_cast<size_t>(h));
  for (int64_t r = b; r < e; ++r) {
    std::fill(acc.begin(), acc.end(), 0.0f);
    for (int64_t j = 0; j < j_count; ++j) {
      int32_t s = ix[r * j_count + j];
      if (s < 0) continue;
      const float wt = w[r * j_count + j];
      const int64_t base = static_cast<int64_t>(s) * h;
      for (int64_t c = 0; c < h; ++c) acc[c] += load(base + c) * wt;
    }
    if (out_type == ffi::DataType::F32) {
      std::memcpy(static_cast<float*>(out) + r * h, acc.data(), sizeof(float) * h);
    } else {
      uint16_t* o = static_cast<uint16_t*>(out) + r * h;
      for (int64_t c = 0; c < h; ++c) o[c] = FloatToBf16Bits(acc[c]);
    }
  }
}

ffi::Error GatherReduceImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer idx, ffi::AnyBuffer w,
                            ffi::Result<ffi::AnyBuffer> out) {
  const char* op = "dsjax_deep_ep_gather_reduce";
  int64_t m = 0, n = 0, j = 0, h = 0;
  DSJAX_RETURN_IF_ERROR(CheckGatherReduce(op, x, idx, w, *out, &m, &n, &j, &h));
  const int32_t* ix = static_cast<const int32_t*>(idx.untyped_data());
  int64_t bad = FirstBadIndex(ix, n * j, m);
  if (bad >= 0) return InvalidArgument(op, ": idx[", bad / std::max<int64_t>(j, 1), ", ", bad % std::max<int64_t>(j, 1), "]=",
                                       ix[bad], " is outside [-1, ", m, ")");
  if (n == 0 || h == 0) return ffi::Error::Success();
  const float* wt = static_cast<const float*>(w.untyped_data());
  void* o = out->untyped_data();
  const ffi::DataType ot = out->element_type();
  // >= 128K multiply-adds per chunk (same reasoning as gather_rows).
  int64_t min_rows = std::max<int64_t>(1, (128 << 10) / std::max<int64_t>(1, h * std::max<int64_t>(j, 1)));
  if (x.element_type() == ffi::DataType::F32) {
    LoadF32 load{static_cast<const float*>(x.untyped_data())};
    ParallelFor(pool, n, min_rows, [&](int64_t b, int64_t e) { ReduceRows(load, ot, o, ix, wt, b, e, j, h); });
  } else {
    LoadBF16 load{static_cast<const uint16_t*>(x.untyped_data())};
    ParallelFor(pool, n, min_rows, [&](int64_t b, int64_t e) { ReduceRows(load, ot, o, ix, wt, b, e, j, h); });
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(DeepEpGatherRowsCpu, GatherRowsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(DeepEpGatherReduceCpu, GatherReduceImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());

DSJAX_REGISTER_FFI("dsjax_deep_ep_gather_rows", DeepEpGatherRowsCpu);
DSJAX_REGISTER_FFI("dsjax_deep_ep_gather_reduce", DeepEpGatherReduceCpu);

}  // namespace dsjax::deep_ep
