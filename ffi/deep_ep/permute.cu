// CUDA twins of DeepEP's data movement around the collectives (sm_90a): gather_rows (pack into
// per-destination send buffers / unpack received rows: one CTA per row, 16-byte vector copies when
// the row allows) and gather_reduce (combine: weighted f32 sum of each token's copies in index
// order, explicitly rounded multiply then add so the result equals the CPU twin's bit for bit).
// Indices outside [-1, M) give zero rows / are skipped (no stream sync to report them; the CPU twin
// returns an error), so nothing out of bounds is read.
#include <cuda_runtime.h>

#include <cstdint>

#include "common/dtypes.h"
#include "common/ffi_common.h"
#include "common/registry.h"
#include "deep_ep/ep_common.h"

namespace dsjax::deep_ep {
namespace {

template <typename V>
__global__ void GatherRowsKernel(const V* __restrict__ x, const int32_t* __restrict__ idx, V* __restrict__ out,
                                 int64_t m, int64_t row_elems) {
  const int64_t r = blockIdx.x;
  const int32_t s = idx[r];
  V* o = out + r * row_elems;
  if (s < 0 || s >= m) {
    const V zero{};
    for (int64_t c = threadIdx.x; c < row_elems; c += blockDim.x) o[c] = zero;
    return;
  }
  const V* in = x + static_cast<int64_t>(s) * row_elems;
  for (int64_t c = threadIdx.x; c < row_elems; c += blockDim.x) o[c] = in[c];
}

template <typename Load, bool kBf16Out>
__global__ void GatherReduceKernel(Load load, const int32_t* __restrict__ idx, const float* __restrict__ w,
                                   void* __restrict__ out, int64_t m, int64_t j_count, int64_t h) {
  const int64_t r = blockIdx.x;
  for (int64_t c = threadIdx.x; c < h; c += blockDim.x) {
    float acc = 0.0f;
    for (int64_t j = 0; j < j_count; ++j) {
      const int32_t s = idx[r * j_count + j];
      if (s < 0 || s >= m) continue;
      acc = __fadd_rn(acc, __fmul_rn(load(static_cast<int64_t>(s) * h + c), w[r * j_count + j]));
    }
    if (kBf16Out) {
      static_cast<uint16_t*>(out)[r * h + c] = FloatToBf16Bits(acc);
    } else {
      static_cast<float*>(out)[r * h + c] = acc;
    }
  }
}

ffi::Error Status(cudaError_t err, const char* op) {
  if (err == cudaSuccess) return ffi::Error::Success();
  return ffi::Error(ffi::ErrorCode::kInternal, StrCat(op, ": CUDA error: ", cudaGetErrorString(err)));
}

ffi::Error GatherRowsCuda(cudaStream_t st, ffi::AnyBuffer x, ffi::AnyBuffer idx, ffi::Result<ffi::AnyBuffer> out) {
  const char* op = "dsjax_deep_ep_gather_rows";
  int64_t m = 0, n = 0, row_bytes = 0;
  DSJAX_RETURN_IF_ERROR(CheckGatherRows(op, x, idx, *out, &m, &n, &row_bytes));
  if (n == 0 || row_bytes == 0) return ffi::Error::Success();
  if (n > 0x7FFFFFFF) return InvalidArgument(op, ": too many rows (", n, ")");
  const int32_t* ix = static_cast<const int32_t*>(idx.untyped_data());
  const void* src = x.untyped_data();
  void* dst = out->untyped_data();
  auto aligned = [&](int64_t a) {
    return row_bytes % a == 0 && reinterpret_cast<uintptr_t>(src) % a == 0 && reinterpret_cast<uintptr_t>(dst) % a == 0;
  };
  const unsigned blocks = static_cast<unsigned>(n);
  if (aligned(16)) {
    GatherRowsKernel<uint4><<<blocks, 128, 0, st>>>(static_cast<const uint4*>(src), ix, static_cast<uint4*>(dst), m,
                                                    row_bytes / 16);
  } else if (aligned(4)) {
    GatherRowsKernel<uint32_t><<<blocks, 128, 0, st>>>(static_cast<const uint32_t*>(src), ix,
                                                       static_cast<uint32_t*>(dst), m, row_bytes / 4);
  } else {
    GatherRowsKernel<uint8_t><<<blocks, 128, 0, st>>>(static_cast<const uint8_t*>(src), ix, static_cast<uint8_t*>(dst),
                                                      m, row_bytes);
  }
  return Status(cudaGetLastError(), op);
}

ffi::Error GatherReduceCuda(cudaStream_t st, ffi::AnyBuffer x, ffi::AnyBuffer idx, ffi::AnyBuffer w,
                            ffi::Result<ffi::AnyBuffer> out) {
  const char* op = "dsjax_deep_ep_gather_reduce";
  int64_t m = 0, n = 0, j = 0, h = 0;
  DSJAX_RETURN_IF_ERROR(CheckGatherReduce(op, x, idx, w, *out, &m, &n, &j, &h));
  if (n == 0 || h == 0) return ffi::Error::Success();
  if (n > 0x7FFFFFFF) return InvalidArgument(op, ": too many rows (", n, ")");
  const unsigned blocks = static_cast<unsigned>(n);
  const int threads = h >= 256 ? 256 : 128;
  const int32_t* ix = static_cast<const int32_t*>(idx.untyped_data());
  const float* wt = static_cast<const float*>(w.untyped_data());
  void* o = out->untyped_data();
  const bool bf16_out = out->element_type() == ffi::DataType::BF16;
  if (x.element_type() == ffi::DataType::F32) {
    LoadF32 load{static_cast<const float*>(x.untyped_data())};
    if (bf16_out) GatherReduceKernel<LoadF32, true><<<blocks, threads, 0, st>>>(load, ix, wt, o, m, j, h);
    else GatherReduceKernel<LoadF32, false><<<blocks, threads, 0, st>>>(load, ix, wt, o, m, j, h);
  } else {
    LoadBF16 load{static_cast<const uint16_t*>(x.untyped_data())};
    if (bf16_out) GatherReduceKernel<LoadBF16, true><<<blocks, threads, 0, st>>>(load, ix, wt, o, m, j, h);
    else GatherReduceKernel<LoadBF16, false><<<blocks, threads, 0, st>>>(load, ix, wt, o, m, j, h);
  }
  return Status(cudaGetLastError(), op);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(DeepEpGatherRowsCuda, GatherRowsCuda,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(DeepEpGatherReduceCuda, GatherReduceCuda,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());

DSJAX_REGISTER_FFI("dsjax_deep_ep_gather_rows", DeepEpGatherRowsCuda);
DSJAX_REGISTER_FFI("dsjax_deep_ep_gather_reduce", DeepEpGatherReduceCuda);

}  // namespace dsjax::deep_ep
