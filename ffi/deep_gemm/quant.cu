// CUDA FP8 quantizers for sm_90a (memory-bound: one pass over x, one warp per 1x128 group or one
// CTA per 128x128 block). Same encoding helpers as the CPU twin (common/fp8.h), so same bytes.
#include <cuda_runtime.h>

#include <cstdint>

#include "common/dtypes.h"
#include "common/ffi_common.h"
#include "common/fp8.h"
#include "common/registry.h"
#include "deep_gemm/quant_common.h"

namespace dsjax::deep_gemm {
namespace {

__device__ __forceinline__ float AmaxStepDev(float amax, float v) {
  float a = fabsf(v);
  return (a > amax || a != a) ? a : amax;
}

__device__ __forceinline__ float WarpAmax(float v) {
  for (int off = 16; off > 0; off >>= 1) v = AmaxStepDev(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}

// One warp per (row, group); each lane handles 4 of the group's 128 columns.
template <typename Load>
__global__ void PerTokenKernel(Load load, uint8_t* __restrict__ q, float* __restrict__ scales,
                               int64_t rows, int64_t k, bool ue8m0) {
  const int64_t groups = (k + kGroup - 1) / kGroup;
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (warp >= rows * groups) return;
  const int64_t r = warp / groups, g = warp % groups;
  const int64_t c0 = g * kGroup;
  const int64_t base = r * k + c0;
  const int64_t len = min(kGroup, k - c0);
  float v[4];
  float amax = 0.0f;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    int64_t c = lane + 32 * i;
    v[i] = c < len ? load(base + c) : 0.0f;
    amax = AmaxStepDev(amax, v[i]);
  }
  amax = WarpAmax(amax);
  const float s = ScaleFromAmax(amax, ue8m0);
  if (lane == 0) scales[r * groups + g] = s;
  const float inv = 1.0f / s;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    int64_t c = lane + 32 * i;
    if (c < len) q[base + c] = FloatToE4M3(v[i] * inv);
  }
}

// One CTA of 256 threads per 128x128 block; thread t covers column t % 128, every other row.
template <typename Load>
__global__ void PerBlockKernel(Load load, uint8_t* __restrict__ q, float* __restrict__ scales,
                               int64_t m, int64_t n, int64_t mb, int64_t nb, bool ue8m0) {
  __shared__ float red[8];
  __shared__ float scale_sh;
  const int64_t blk = blockIdx.x;
  const int64_t b = blk / (mb * nb), rem = blk % (mb * nb), i = rem / nb, j = rem % nb;
  const int64_t r0 = i * kGroup, c = j * kGroup + threadIdx.x % kGroup;
  const int64_t rows = min(kGroup, m - r0);
  const int64_t off = b * m * n;
  const bool col_ok = c < n;
  float amax = 0.0f;
  for (int64_t r = threadIdx.x / kGroup; r < rows; r += 2) {
    if (col_ok) amax = AmaxStepDev(amax, load(off + (r0 + r) * n + c));
  }
  amax = WarpAmax(amax);
  if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = amax;
  __syncthreads();
  if (threadIdx.x == 0) {
    float a = red[0];
    for (int w = 1; w < 8; ++w) a = AmaxStepDev(a, red[w]);
    scale_sh = ScaleFromAmax(a, ue8m0);
    scales[(b * mb + i) * nb + j] = scale_sh;
  }
  __syncthreads();
  const float inv = 1.0f / scale_sh;
  for (int64_t r = threadIdx.x / kGroup; r < rows; r += 2) {
    if (col_ok) q[off + (r0 + r) * n + c] = FloatToE4M3(load(off + (r0 + r) * n + c) * inv);
  }
}

cudaError_t LaunchPerToken(cudaStream_t st, ffi::DataType t, const void* x, uint8_t* q, float* s,
                           int64_t rows, int64_t k, bool ue8m0) {
  const int64_t warps = rows * ((k + kGroup - 1) / kGroup);
  const int threads = 256;
  const int64_t blocks = (warps * 32 + threads - 1) / threads;
  if (blocks > 0x7FFFFFFF) return cudaErrorInvalidConfiguration;
  switch (t) {
    case ffi::DataType::F32:
      PerTokenKernel<<<blocks, threads, 0, st>>>(LoadF32{static_cast<const float*>(x)}, q, s, rows, k, ue8m0);
      break;
    case ffi::DataType::BF16:
      PerTokenKernel<<<blocks, threads, 0, st>>>(LoadBF16{static_cast<const uint16_t*>(x)}, q, s, rows, k, ue8m0);
      break;
    default:
      PerTokenKernel<<<blocks, threads, 0, st>>>(LoadF16{static_cast<const uint16_t*>(x)}, q, s, rows, k, ue8m0);
      break;
  }
  return cudaGetLastError();
}

cudaError_t LaunchPerBlock(cudaStream_t st, ffi::DataType t, const void* x, uint8_t* q, float* s,
                           int64_t batch, int64_t m, int64_t n, bool ue8m0) {
  const int64_t mb = (m + kGroup - 1) / kGroup, nb = (n + kGroup - 1) / kGroup;
  const int64_t blocks = batch * mb * nb;
  if (blocks > 0x7FFFFFFF) return cudaErrorInvalidConfiguration;
  switch (t) {
    case ffi::DataType::F32:
      PerBlockKernel<<<blocks, 256, 0, st>>>(LoadF32{static_cast<const float*>(x)}, q, s, m, n, mb, nb, ue8m0);
      break;
    case ffi::DataType::BF16:
      PerBlockKernel<<<blocks, 256, 0, st>>>(LoadBF16{static_cast<const uint16_t*>(x)}, q, s, m, n, mb, nb, ue8m0);
      break;
    default:
      PerBlockKernel<<<blocks, 256, 0, st>>>(LoadF16{static_cast<const uint16_t*>(x)}, q, s, m, n, mb, nb, ue8m0);
      break;
  }
  return cudaGetLastError();
}

ffi::Error CudaStatus(cudaError_t err, const char* op) {
  if (err == cudaSuccess) return ffi::Error::Success();
  return ffi::Error(ffi::ErrorCode::kInternal, StrCat(op, ": CUDA launch failed: ", cudaGetErrorString(err)));
}

ffi::Error PerTokenCastCudaImpl(cudaStream_t stream, ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> q,
                                ffi::Result<ffi::AnyBuffer> scales, bool use_ue8m0) {
  QuantShape shape;
  DSJAX_RETURN_IF_ERROR(PerTokenShape(x, *q, *scales, &shape));
  if (shape.batch * shape.cols == 0) return ffi::Error::Success();
  return CudaStatus(LaunchPerToken(stream, x.element_type(), x.untyped_data(),
                                   static_cast<uint8_t*>(q->untyped_data()),
                                   static_cast<float*>(scales->untyped_data()), shape.batch,
                                   shape.cols, use_ue8m0),
                    "dsjax_deep_gemm_per_token_cast_to_fp8");
}

ffi::Error PerBlockCastCudaImpl(cudaStream_t stream, ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> q,
                                ffi::Result<ffi::AnyBuffer> scales, bool use_ue8m0) {
  QuantShape shape;
  DSJAX_RETURN_IF_ERROR(PerBlockShape(x, *q, *scales, &shape));
  if (shape.batch * shape.rows * shape.cols == 0) return ffi::Error::Success();
  return CudaStatus(LaunchPerBlock(stream, x.element_type(), x.untyped_data(),
                                   static_cast<uint8_t*>(q->untyped_data()),
                                   static_cast<float*>(scales->untyped_data()), shape.batch,
                                   shape.rows, shape.cols, use_ue8m0),
                    "dsjax_deep_gemm_per_block_cast_to_fp8");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(PerTokenCastToFp8Cuda, PerTokenCastCudaImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<bool>("use_ue8m0"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(PerBlockCastToFp8Cuda, PerBlockCastCudaImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<bool>("use_ue8m0"));

DSJAX_REGISTER_FFI("dsjax_deep_gemm_per_token_cast_to_fp8", PerTokenCastToFp8Cuda);
DSJAX_REGISTER_FFI("dsjax_deep_gemm_per_block_cast_to_fp8", PerBlockCastToFp8Cuda);

}  // namespace dsjax::deep_gemm
