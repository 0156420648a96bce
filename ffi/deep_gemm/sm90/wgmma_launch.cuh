// Host side of one WGMMA GEMM configuration: tensor maps, grid (persistent or one CTA per tile,
// clusters) and the launch. Each configuration is instantiated in a wgmma_configs_*.cu file (so
// that nvcc compiles them in parallel) and picked by name in fp8_gemm_wgmma.cu.
#pragma once

#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <mutex>

#include "common/ffi_common.h"
#include "deep_gemm/sm90/wgmma_config.cuh"
#include "deep_gemm/sm90/wgmma_kernel.cuh"

namespace dsjax::deep_gemm::sm90 {

// What a handler hands to a configuration. `a_rows` / `b_rows`: rows of the 2-D views of A and
// B (grouped operands flattened to [G * rows, k]); `z_count`: groups of the masked layout (each
// with its own row space of p.m rows), else 1. p.sa, sb, c, d, index, m, n, sb_gs, num_kb,
// n_blocks, groups, mode and d_bf16 are filled in; the rest is the configuration's.
struct WgmmaProblem {
  cudaStream_t stream;
  const char* op;
  const void* a;
  int64_t a_rows;
  const void* b;
  int64_t b_rows;
  int64_t k;
  int64_t z_count;
  Params p;
};

using WgmmaLauncher = ffi::Error (*)(const WgmmaProblem&);

inline PFN_cuTensorMapEncodeTiled_v12000 EncodeFn(cudaError_t* err) {
  // The driver entry point is looked up through the runtime, so that the module needs no link
  // against libcuda (cudart is linked statically).
  static PFN_cuTensorMapEncodeTiled_v12000 fn = nullptr;
  static cudaError_t status = cudaSuccess;
  static std::once_flag once;
  std::call_once(once, [] {
    void* ptr = nullptr;
    cudaDriverEntryPointQueryResult q = cudaDriverEntryPointSymbolNotFound;
    status = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &ptr, 12000,
                                              cudaEnableDefault, &q);
    if (status == cudaSuccess && q != cudaDriverEntryPointSuccess) status = cudaErrorSymbolNotFound;
    if (status == cudaSuccess) fn = reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(ptr);
  });
  *err = status;
  return fn;
}

// A K-major FP8 matrix [rows, k] as a 2-D tensor map with (128 x box_rows) boxes, 128B swizzle
// (the inner box is exactly the 128-byte swizzle span), zero fill out of bounds.
inline ffi::Error EncodeKMajor(const char* op, const char* name, CUtensorMap* map, const void* ptr,
                               int64_t rows, int64_t k, uint32_t box_rows) {
  cudaError_t err;
  auto encode = EncodeFn(&err);
  if (encode == nullptr)
    return ffi::Error(ffi::ErrorCode::kInternal,
                      StrCat(op, ": cuTensorMapEncodeTiled is unavailable from the driver (",
                             cudaGetErrorString(err), ")"));
  cuuint64_t dims[2] = {static_cast<cuuint64_t>(k), static_cast<cuuint64_t>(rows)};
  cuuint64_t strides[1] = {static_cast<cuuint64_t>(k)};  // bytes; k % 16 == 0 checked by caller
  cuuint32_t box[2] = {static_cast<cuuint32_t>(kBK), box_rows};
  cuuint32_t elem_strides[2] = {1, 1};
  CUresult r = encode(map, CU_TENSOR_MAP_DATA_TYPE_UINT8, 2, const_cast<void*>(ptr), dims, strides,
                      box, elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                      CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS)
    return ffi::Error(ffi::ErrorCode::kInternal,
                      StrCat(op, ": cuTensorMapEncodeTiled failed for ", name, " [", rows, ", ", k,
                             "] box ", box_rows, " rows (CUresult ", static_cast<int>(r), ")"));
  return ffi::Error::Success();
}

// Multiprocessors of the current device (cached per device: the query is not free).
inline ffi::Error NumSms(const char* op, int* out) {
  static std::atomic<int> cache[64] = {};
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err == cudaSuccess && dev >= 0 && dev < 64 && (*out = cache[dev].load()) > 0)
    return ffi::Error::Success();
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(out, cudaDevAttrMultiProcessorCount, dev);
  if (err != cudaSuccess || *out <= 0)
    return ffi::Error(ffi::ErrorCode::kInternal,
                      StrCat(op, ": cannot read the multiprocessor count: ",
                             cudaGetErrorString(err)));
  if (dev >= 0 && dev < 64) cache[dev].store(*out);
  return ffi::Error::Success();
}

// Launches configuration Cfg. `persistent`: grid = min(units, what fits on the device at once)
// and each CTA (cluster) walks units with a stride of the grid; else one CTA per unit.
template <class Cfg>
ffi::Error LaunchConfig(const WgmmaProblem& w, bool persistent) {
  constexpr int kC = Cfg::kCluster;
  const char* op = w.op;
  Params p = w.p;
  const int64_t m_tiles = CeilDiv(p.m, Cfg::kBM), n_tiles = CeilDiv(p.n, Cfg::kBN);
  const int64_t m_units = CeilDiv(m_tiles, kC);
  const int64_t units = w.z_count * m_units * n_tiles;
  // Unit indices, the raster and TMA coordinates (row + box, of the last unit's tiles) are
  // int32 on the device.
  if (units > 0x7FFFFFFF || m_units + kRasterGroupM > 0x7FFFFFFF ||
      w.a_rows + int64_t{Cfg::kBM} * kC > 0x7FFFFFFF || w.b_rows + Cfg::kBN > 0x7FFFFFFF)
    return InvalidArgument(op, ": problem too large for one launch (", units, " units of ",
                           Cfg::kBM, "x", Cfg::kBN, " tiles, ", w.a_rows, " / ", w.b_rows,
                           " rows)");
  if (kC > 1 && p.mode != kDense)
    return InvalidArgument(op, ": cluster configurations run the dense layout only");
  p.m_tiles = static_cast<int>(m_tiles);
  p.n_tiles = static_cast<int>(n_tiles);
  p.m_units = static_cast<int>(m_units);
  p.num_units = static_cast<int>(units);
  CUtensorMap ma, mb;
  DSJAX_RETURN_IF_ERROR(EncodeKMajor(op, "a", &ma, w.a, w.a_rows, w.k, Cfg::kBM));
  DSJAX_RETURN_IF_ERROR(EncodeKMajor(op, "b", &mb, w.b, w.b_rows, w.k, Cfg::kBRowsPerCta));
  auto kernel = Fp8GemmWgmmaKernel<Cfg>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(Cfg::kSmemBytes));
  if (err != cudaSuccess)
    return ffi::Error(ffi::ErrorCode::kInternal,
                      StrCat(op, ": cannot reserve ", Cfg::kSmemBytes,
                             " bytes of shared memory: ", cudaGetErrorString(err)));

  cudaLaunchConfig_t cfg = {};
  cudaLaunchAttribute attr[1];
  cfg.blockDim = dim3(Cfg::kThreads);
  cfg.dynamicSmemBytes = Cfg::kSmemBytes;
  cfg.stream = w.stream;
  int64_t clusters = units;  // one CTA (cluster) per unit unless persistent
  if (kC > 1) {
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = kC;
    attr[0].val.clusterDim.y = 1;
    attr[0].val.clusterDim.z = 1;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
  }
  if (persistent) {
    int sms = 0;
    DSJAX_RETURN_IF_ERROR(NumSms(op, &sms));
    int64_t resident = sms / kC;  // one CTA per SM (the shared memory allows no more)
    if (kC > 1) {
      // GPCs need not hold an even number of free SMs: ask how many clusters fit at once. Once
      // per device and configuration (the answer depends on nothing else), so that calls on
      // small problems do not pay for the query on the host each time.
      static std::atomic<int> active_cache[64] = {};
      int dev = -1, active = 0;
      if (cudaGetDevice(&dev) != cudaSuccess) dev = -1;
      if (dev >= 0 && dev < 64) active = active_cache[dev].load();
      if (active <= 0) {
        cfg.gridDim = dim3(static_cast<unsigned>(kC * (resident > 0 ? resident : 1)));
        if (cudaOccupancyMaxActiveClusters(&active, kernel, &cfg) != cudaSuccess) active = 0;
        cudaGetLastError();  // a failed query only means the fallback count
        if (active > 0 && dev >= 0 && dev < 64) active_cache[dev].store(active);
      }
      if (active > 0) resident = active;
    }
    if (resident < 1) resident = 1;
    clusters = units < resident ? units : resident;
  }
  cfg.gridDim = dim3(static_cast<unsigned>(clusters * kC));
  err = cudaLaunchKernelEx(&cfg, kernel, ma, mb, p);
  if (err == cudaSuccess) err = cudaGetLastError();
  if (err != cudaSuccess)
    return ffi::Error(ffi::ErrorCode::kInternal,
                      StrCat(op, ": CUDA launch failed: ", cudaGetErrorString(err)));
  return ffi::Error::Success();
}

// The configurations (name: tile kBM x kBN, cluster, grid). Keep in step with the table in
// fp8_gemm_wgmma.cu and WGMMA_CONFIGS in dsjax/deep_gemm/_gemm_ffi.py.
ffi::Error LaunchB64x64(const WgmmaProblem& w);         // 64x64, persistent
ffi::Error LaunchB64x128(const WgmmaProblem& w);        // 64x128, persistent
ffi::Error LaunchB128x128Grid(const WgmmaProblem& w);   // 128x128, one CTA per tile
ffi::Error LaunchB128x128(const WgmmaProblem& w);       // 128x128, persistent
ffi::Error LaunchB128x160(const WgmmaProblem& w);       // 128x160, persistent
ffi::Error LaunchB128x192(const WgmmaProblem& w);       // 128x192, persistent
ffi::Error LaunchB128x160Mc2(const WgmmaProblem& w);    // 128x160, 2-CTA cluster, persistent
ffi::Error LaunchB128x128Mc2(const WgmmaProblem& w);    // 128x128, 2-CTA cluster, persistent
ffi::Error LaunchB128x192Mc2(const WgmmaProblem& w);    // 128x192, 2-CTA cluster, persistent

}  // namespace dsjax::deep_gemm::sm90
