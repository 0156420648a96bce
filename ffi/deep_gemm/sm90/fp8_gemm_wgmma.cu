// Hopper (sm_90a) FP8 GEMMs with TMA + mbarrier pipeline + WGMMA, for the three 1d2d layouts
// (a: 1x128 scales, b: 128x128 scales): dense `fp8_gemm_nt` (D = A . B^T (+ c)), and the MoE
// m-grouped contiguous (rows tagged with m_indices) and masked ([G, m_max] rows, masked_m valid)
// layouts; bf16 or f32 out. This file: the handlers and the configuration table.
//
// Design after DeepGEMM's sm90 FP8 kernels (deepseek-ai/DeepGEMM, impls/sm90_fp8_gemm_1d2d.cuh)
// and DeepSeek-V3 §3.3.2, written from the PTX ISA. Files (one idea each):
//   wgmma_config.cuh    configurations (tile, stages, register budget), Params, tile scheduler
//   wgmma_kernel.cuh    the kernel: producer warp (TMA) / consumer warpgroups (WGMMA, promotion)
//   wgmma_epilogue.cuh  register-to-global stores (+ c, bf16/f32), zero rows
//   wgmma_ops.cuh       wgmma m64nNk32 E4M3 wrappers (generated)      ptx.cuh  other PTX
//   wgmma_launch.cuh    tensor maps, persistent / cluster grid, launch
//   wgmma_configs_*.cu  the instantiated configurations
//
// A CTA (or 2-CTA cluster) walks units of work (one tile per CTA) with a stride of the grid and
// runs one "pass" (mainloop + epilogue) per group present in its tile: dense: one; masked: one
// (none past masked_m[g]); contiguous: one per distinct valid group among the tile's rows (one
// for a 128-aligned layout; a misaligned layout is still computed exactly). Each pass stores only
// its rows; rows of no pass (masked rows past masked_m, contiguous rows tagged -1 or out of
// [0, G)) are written as zeros.
//
// Configurations (name: tile rows x columns, grid). Keep in step with WGMMA_CONFIGS in
// dsjax/deep_gemm/_gemm_ffi.py, which also holds the per-shape heuristic that names one:
//   b64x64, b64x128        64-row tiles, one consumer warpgroup, persistent (decode-sized m)
//   b128x128_grid          128x128, one CTA per tile (the first design, kept as a baseline)
//   b128x128/160/192       128-row tiles, two consumer warpgroups + setmaxnreg, persistent
//   b128x128/160/192_mc2   as above in 2-CTA clusters along M, B multicast by TMA (dense only;
//                          the grouped layouts run the same tile without the cluster)
//
// Invariants relied on (checked by the host code or by construction; the pipeline's own are in
// wgmma_kernel.cuh, the register budget in wgmma_config.cuh):
//  * BLOCK_K = 128 = one scale group = one 128-byte swizzle row. A tile spans at most two
//    128-column blocks of b's scales (static_assert on BLOCK_N), promoted per column block.
//  * k % 16 == 0 (TMA global strides are multiples of 16 bytes) and k > 0; tails of m, n and k
//    are zero-filled by TMA (zeros add nothing to the dot products), and scale loads and stores
//    are guarded by row/column bounds. Grouped operands are viewed as 2-D [G * rows, k] tensors;
//    a box that overhangs a group reads the next group's rows, which no pass of this group stores.
//
// Data-dependent layout errors cannot be returned without a device sync, so (as in gemm.cu):
// m_indices outside [0, G) are padding rows (zero output) and masked_m is clamped to [0, m_max].
#include <cuda_runtime.h>

#include <cstdint>
#include <string_view>

#include "common/ffi_common.h"
#include "common/registry.h"
#include "deep_gemm/gemm_common.h"
#include "deep_gemm/sm90/wgmma_launch.cuh"

namespace dsjax::deep_gemm::sm90 {
namespace {

struct ConfigEntry {
  const char* name;
  WgmmaLauncher dense;
  WgmmaLauncher grouped;  // the contiguous and masked layouts (no clusters there)
};

constexpr ConfigEntry kConfigs[] = {
    {"b64x64", LaunchB64x64, LaunchB64x64},
    {"b64x128", LaunchB64x128, LaunchB64x128},
    {"b128x128_grid", LaunchB128x128Grid, LaunchB128x128Grid},
    {"b128x128", LaunchB128x128, LaunchB128x128},
    {"b128x160", LaunchB128x160, LaunchB128x160},
    {"b128x192", LaunchB128x192, LaunchB128x192},
    {"b128x128_mc2", LaunchB128x128Mc2, LaunchB128x128},
    {"b128x160_mc2", LaunchB128x160Mc2, LaunchB128x160},
    {"b128x192_mc2", LaunchB128x192Mc2, LaunchB128x192},
};

ffi::Error FindConfig(const char* op, std::string_view name, const ConfigEntry** out) {
  std::string choices;
  for (const ConfigEntry& c : kConfigs) {
    if (name == c.name) {
      *out = &c;
      return ffi::Error::Success();
    }
    choices += choices.empty() ? "" : ", ";
    choices += c.name;
  }
  return InvalidArgument(op, ": config must be one of ", choices, ", got '", name, "'");
}

// What this kernel accepts beyond the shared shape contract (gemm_common.h). Python
// (dsjax/deep_gemm/_gemm_ffi.py, wgmma_unsupported_reason) routes everything else to the mma
// kernel, so these errors only fire when a target is called directly. Any m, n and G work.
ffi::Error CheckWgmmaSupported(const char* op, int64_t k, bool b_per_row) {
  if (b_per_row)
    return InvalidArgument(op, ": b_per_row must be false (the WGMMA kernel implements 128x128 b "
                               "scales; fp8_gemm_nt_1d1d runs on the mma kernel), got true");
  if (k <= 0 || k % 16 != 0)
    return InvalidArgument(op, ": k must be a positive multiple of 16 (TMA needs 16-byte row "
                               "strides), got k=", k);
  return ffi::Error::Success();
}

// Checks what TMA needs of the operands, then runs configuration `config`.
ffi::Error Launch(cudaStream_t stream, const char* op, std::string_view config,
                  const ffi::AnyBuffer& a, int64_t a_rows, const ffi::AnyBuffer& b, int64_t b_rows,
                  int64_t k, bool b_per_row, int64_t z_count, Params p) {
  const ConfigEntry* entry = nullptr;
  DSJAX_RETURN_IF_ERROR(FindConfig(op, config, &entry));
  DSJAX_RETURN_IF_ERROR(CheckWgmmaSupported(op, k, b_per_row));
  if (p.m == 0 || p.n == 0 || z_count == 0) return ffi::Error::Success();
  for (const ffi::AnyBuffer* x : {&a, &b}) {
    if (reinterpret_cast<uintptr_t>(x->untyped_data()) % 16 != 0)
      return InvalidArgument(op, ": TMA needs 16-byte aligned operand addresses; ",
                             x == &a ? "a" : "b", " is at ", x->untyped_data());
  }
  const int64_t num_kb = CeilDiv(k, kGroup);
  if (num_kb > 0x7FFFFFFF / kBK) return InvalidArgument(op, ": k too large (", k, ")");
  p.num_kb = static_cast<int>(num_kb);
  p.n_blocks = static_cast<int>(CeilDiv(p.n, kGroup));
  WgmmaProblem w{stream, op, a.untyped_data(), a_rows, b.untyped_data(), b_rows, k, z_count, p};
  return (p.mode == kDense ? entry->dense : entry->grouped)(w);
}

const float* F32(const ffi::AnyBuffer& x) { return static_cast<const float*>(x.untyped_data()); }
const int32_t* S32(const ffi::AnyBuffer& x) {
  return static_cast<const int32_t*>(x.untyped_data());
}

// The fields every layout sets the same way; `index` is m_indices / masked_m (null for dense).
Params MakeParams(const ffi::AnyBuffer& sa, const ffi::AnyBuffer& sb, const int32_t* index,
                  ffi::Result<ffi::AnyBuffer>& d, const GemmDims& dims, int mode) {
  Params p{};
  p.sa = F32(sa);
  p.sb = F32(sb);
  p.d = d->untyped_data();
  p.index = index;
  p.m = dims.m;  // masked: m_max
  p.n = dims.n;
  p.sb_gs = mode == kDense ? 0 : CeilDiv(dims.n, kGroup) * CeilDiv(dims.k, kGroup);
  p.groups = mode == kDense ? 1 : static_cast<int>(dims.groups);
  p.mode = mode;
  p.d_bf16 = d->element_type() == ffi::DataType::BF16;
  return p;
}

ffi::Error DenseWgmma(cudaStream_t stream, ffi::AnyBuffer a, ffi::AnyBuffer sa, ffi::AnyBuffer b,
                      ffi::AnyBuffer sb, ffi::AnyBuffer c, ffi::Result<ffi::AnyBuffer> d,
                      bool b_per_row, bool has_c, std::string_view config) {
  const char* op = "dsjax_deep_gemm_fp8_gemm_nt_wgmma";
  GemmDims dims;
  DSJAX_RETURN_IF_ERROR(CheckDenseShapes(op, a, sa, b, sb, c, *d, b_per_row, has_c, &dims));
  Params p = MakeParams(sa, sb, nullptr, d, dims, kDense);
  p.c = has_c ? F32(c) : nullptr;
  return Launch(stream, op, config, a, dims.m, b, dims.n, dims.k, b_per_row, 1, p);
}

ffi::Error ContiguousWgmma(cudaStream_t stream, ffi::AnyBuffer a, ffi::AnyBuffer sa,
                           ffi::AnyBuffer b, ffi::AnyBuffer sb, ffi::AnyBuffer m_indices,
                           ffi::Result<ffi::AnyBuffer> d, std::string_view config) {
  const char* op = "dsjax_deep_gemm_m_grouped_fp8_gemm_nt_contiguous_wgmma";
  GemmDims dims;
  DSJAX_RETURN_IF_ERROR(CheckContiguousShapes(op, a, sa, b, sb, m_indices, *d, &dims));
  if (dims.groups > 0x7FFFFFFF) return InvalidArgument(op, ": too many groups (", dims.groups, ")");
  Params p = MakeParams(sa, sb, S32(m_indices), d, dims, kContiguous);
  if (dims.groups == 0 && dims.m > 0 && dims.n > 0) {
    // Every row is padding (and B has no rows to describe to TMA): the output is zeros.
    const ConfigEntry* entry = nullptr;
    DSJAX_RETURN_IF_ERROR(FindConfig(op, config, &entry));
    DSJAX_RETURN_IF_ERROR(CheckWgmmaSupported(op, dims.k, false));
    const size_t bytes = static_cast<size_t>(dims.m * dims.n) * (p.d_bf16 ? 2 : 4);
    cudaError_t err = cudaMemsetAsync(p.d, 0, bytes, stream);
    if (err != cudaSuccess)
      return ffi::Error(ffi::ErrorCode::kInternal, StrCat(op, ": ", cudaGetErrorString(err)));
    return ffi::Error::Success();
  }
  return Launch(stream, op, config, a, dims.m, b, dims.groups * dims.n, dims.k, false, 1,
                p);
}

ffi::Error MaskedWgmma(cudaStream_t stream, ffi::AnyBuffer a, ffi::AnyBuffer sa, ffi::AnyBuffer b,
                       ffi::AnyBuffer sb, ffi::AnyBuffer masked_m, ffi::Result<ffi::AnyBuffer> d,
                       std::string_view config) {
  const char* op = "dsjax_deep_gemm_m_grouped_fp8_gemm_nt_masked_wgmma";
  GemmDims dims;
  DSJAX_RETURN_IF_ERROR(CheckMaskedShapes(op, a, sa, b, sb, masked_m, *d, &dims));
  Params p = MakeParams(sa, sb, S32(masked_m), d, dims, kMasked);
  return Launch(stream, op, config, a, dims.groups * dims.m, b, dims.groups * dims.n, dims.k,
                false, dims.groups, p);
}

}  // namespace
}  // namespace dsjax::deep_gemm::sm90

namespace dsjax::deep_gemm {

// Same operands and attributes as the mma targets of gemm.cu plus `config` (a name from
// kConfigs), so Python swaps the target name and adds the configuration.
XLA_FFI_DEFINE_HANDLER_SYMBOL(Fp8GemmNtWgmmaCuda, sm90::DenseWgmma,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<bool>("b_per_row")
                                  .Attr<bool>("has_c")
                                  .Attr<std::string_view>("config"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(MGroupedContiguousWgmmaCuda, sm90::ContiguousWgmma,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<std::string_view>("config"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(MGroupedMaskedWgmmaCuda, sm90::MaskedWgmma,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<std::string_view>("config"));

DSJAX_REGISTER_FFI("dsjax_deep_gemm_fp8_gemm_nt_wgmma", Fp8GemmNtWgmmaCuda);
DSJAX_REGISTER_FFI("dsjax_deep_gemm_m_grouped_fp8_gemm_nt_contiguous_wgmma",
                   MGroupedContiguousWgmmaCuda);
DSJAX_REGISTER_FFI("dsjax_deep_gemm_m_grouped_fp8_gemm_nt_masked_wgmma", MGroupedMaskedWgmmaCuda);

}  // namespace dsjax::deep_gemm
