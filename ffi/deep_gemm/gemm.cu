// CUDA FP8 GEMMs for sm_90a: dense (1d2d / 1d1d), m-grouped contiguous / masked, k-grouped.
//
// Tensor cores through mma.sync m16n8k32 E4M3 x E4M3 -> F32 (sm_89+), the FP32 promotion of
// DeepSeek-V3 §3.3.2: each 128-wide K block is accumulated in a fresh set of f32 registers, then
// added into the running f32 accumulators multiplied by sa[row, kb] * sb[col, kb]. One kernel
// (mode chosen at run time, so one instantiation) serves all four layouts; shape checks are the
// host code shared with the CPU twin (gemm_common.h).
//
// This is the correctness-first kernel: 64x64 output tile per CTA (4 warps of 32x32), operands
// staged through shared memory with 16-byte loads. It is not the WGMMA/TMA pipeline the H200
// targets of the issue need; it exists so that the CUDA path is exact and testable.
//
// Data-dependent layout errors cannot be returned without a device sync, so on the GPU: rows whose
// m_indices is outside [0, G) output zero, masked_m is clamped to [0, m_max], and group_ks entries
// are clamped to [0, K - start] (the CPU twin returns errors for all of these instead); group_ks
// that are not multiples of 128 give undefined results here (Python rejects them when concrete).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

#include "common/ffi_common.h"
#include "common/registry.h"
#include "deep_gemm/gemm_common.h"

namespace dsjax::deep_gemm {
namespace {

constexpr int kBM = 64, kBN = 64, kBK = 128, kThreads = 128;
constexpr int kLds = kBK + 16;  // padded row stride (bytes): conflict-free fragment loads

enum Mode : int { kDense = 0, kContiguous = 1, kMasked = 2, kKGrouped = 3 };

struct DevGemm {
  const uint8_t* a;
  const float* sa;
  int64_t lda, sa_ld, a_gs, sa_gs;  // *_gs: per-group strides (masked)
  const uint8_t* b;
  const float* sb;
  int64_t ldb, sb_ld, b_gs, sb_gs;
  bool b_per_row;
  int64_t m, n, k;
  const int32_t* index;  // m_indices (contiguous), masked_m (masked), group_ks (k-grouped)
  int groups;
  const float* c;  // nullable; [m, n] (or [G, m, n])
  void* d;
  bool d_bf16;
  int mode;
  bool rows_on_x;  // row tiles on grid.x (when they exceed grid.y's 65535), column tiles on grid.y
};

__device__ __forceinline__ void Mma(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                    uint32_t a3, uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 "
      "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// Copies rows [r0, r0 + 64) x bytes [k0, k0 + kc) of a K-major FP8 matrix into shared memory,
// zero-filling rows at or past `rows` and bytes at or past kc.
__device__ __forceinline__ void LoadTile(uint8_t* s, const uint8_t* g, int64_t ld, int64_t r0,
                                         int64_t rows, int64_t k0, int kc) {
  const bool vec_ok = (ld % 16) == 0 && (k0 % 16) == 0 && (reinterpret_cast<uintptr_t>(g) % 16) == 0;
  for (int id = threadIdx.x; id < kBM * (kBK / 16); id += kThreads) {
    const int r = id / (kBK / 16), ch = (id % (kBK / 16)) * 16;
    uint8_t* dst = s + r * kLds + ch;
    const int64_t row = r0 + r;
    if (row < rows && vec_ok && ch + 16 <= kc) {
      *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(g + row * ld + k0 + ch);
    } else {
      for (int j = 0; j < 16; ++j)
        dst[j] = (row < rows && ch + j < kc) ? g[row * ld + k0 + ch + j] : uint8_t{0};
    }
  }
}

__global__ void __launch_bounds__(kThreads) Fp8GemmKernel(DevGemm p) {
  __shared__ __align__(16) uint8_t as[kBM * kLds];
  __shared__ __align__(16) uint8_t bs[kBN * kLds];
  __shared__ int next_group;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp >> 1, wn = warp & 1, grp = lane >> 2, tig = lane & 3;
  const int64_t row0 = static_cast<int64_t>(p.rows_on_x ? blockIdx.x : blockIdx.y) * kBM;
  const int64_t col0 = static_cast<int64_t>(p.rows_on_x ? blockIdx.y : blockIdx.x) * kBN;
  const int z = blockIdx.z;

  const uint8_t* A = p.a;
  const float* SA = p.sa;
  const float* C = p.c;
  int64_t rows_valid = p.m, k_begin = 0, k_end = p.k, d_off = 0;
  if (p.mode == kMasked) {
    A += z * p.a_gs;
    SA += z * p.sa_gs;
    rows_valid = min(static_cast<int64_t>(max(p.index[z], 0)), p.m);
    d_off = z * p.m * p.n;
  } else if (p.mode == kKGrouped) {
    for (int g = 0; g < z; ++g) k_begin += max(p.index[g], 0);
    k_begin = min(k_begin, p.k);
    k_end = min(p.k, k_begin + max(p.index[z], 0));
    d_off = z * p.m * p.n;
    if (C) C += d_off;
  }

  int g_prev = -1;
  for (;;) {
    int g = 0;
    if (p.mode == kContiguous) {
      // Every group present in this tile, in increasing order (one, for a 128-aligned layout).
      if (tid == 0) next_group = INT_MAX;
      __syncthreads();
      for (int r = tid; r < kBM; r += kThreads) {
        const int64_t row = row0 + r;
        if (row < p.m) {
          const int idx = p.index[row];
          if (idx > g_prev && idx < p.groups) atomicMin(&next_group, idx);
        }
      }
      __syncthreads();
      g = next_group;
      __syncthreads();
      if (g == INT_MAX) break;
    } else if (g_prev >= 0) {
      break;
    }
    const uint8_t* B = p.b;
    const float* SB = p.sb;
    if (p.mode == kContiguous) {
      B += g * p.b_gs;
      SB += g * p.sb_gs;
    } else if (p.mode == kMasked) {
      B += z * p.b_gs;
      SB += z * p.sb_gs;
    }

    float acc[2][4][4];
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.0f;

    const bool skip = row0 >= rows_valid;  // masked tile with no valid row
    for (int64_t k0 = k_begin; !skip && k0 < k_end; k0 += kBK) {
      const int kc = static_cast<int>(min(static_cast<int64_t>(kBK), k_end - k0));
      const int64_t kb = k0 / kBK;
      LoadTile(as, A, p.lda, row0, rows_valid, k0, kc);
      LoadTile(bs, B, p.ldb, col0, p.n, k0, kc);
      __syncthreads();
      float part[2][4][4];
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) part[i][j][e] = 0.0f;
#pragma unroll
      for (int ks = 0; ks < kBK / 32; ++ks) {
        uint32_t af[2][4], bf[4][2];
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          const uint8_t* base = as + (wm * 32 + i * 16 + grp) * kLds + ks * 32 + tig * 4;
          af[i][0] = *reinterpret_cast<const uint32_t*>(base);
          af[i][1] = *reinterpret_cast<const uint32_t*>(base + 8 * kLds);
          af[i][2] = *reinterpret_cast<const uint32_t*>(base + 16);
          af[i][3] = *reinterpret_cast<const uint32_t*>(base + 8 * kLds + 16);
        }
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const uint8_t* base = bs + (wn * 32 + j * 8 + grp) * kLds + ks * 32 + tig * 4;
          bf[j][0] = *reinterpret_cast<const uint32_t*>(base);
          bf[j][1] = *reinterpret_cast<const uint32_t*>(base + 16);
        }
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j)
            Mma(part[i][j], af[i][0], af[i][1], af[i][2], af[i][3], bf[j][0], bf[j][1]);
      }
      // Promotion: this block's partial sums, scaled, into the f32 accumulators.
#pragma unroll
      for (int i = 0; i < 2; ++i) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int64_t r = row0 + wm * 32 + i * 16 + grp + h * 8;
          const float sa = r < rows_valid ? SA[r * p.sa_ld + kb] : 0.0f;
#pragma unroll
          for (int j = 0; j < 4; ++j) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              const int64_t cc = col0 + wn * 32 + j * 8 + tig * 2 + e;
              float sb = 0.0f;
              if (cc < p.n) sb = p.b_per_row ? SB[cc * p.sb_ld + kb] : SB[(cc / kBK) * p.sb_ld + kb];
              acc[i][j][h * 2 + e] += part[i][j][h * 2 + e] * (sa * sb);
            }
          }
        }
      }
      __syncthreads();
    }

    // Epilogue: (+ c), convert, store the rows this pass owns.
#pragma unroll
    for (int i = 0; i < 2; ++i) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t r = row0 + wm * 32 + i * 16 + grp + h * 8;
        if (r >= p.m) continue;
        bool active = true;
        if (p.mode == kContiguous) active = p.index[r] == g;
        if (p.mode == kMasked) active = true;  // rows past masked_m were zero-filled: acc is 0
        if (!active) continue;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int64_t cc = col0 + wn * 32 + j * 8 + tig * 2 + e;
            if (cc >= p.n) continue;
            float v = (p.mode == kMasked && r >= rows_valid) ? 0.0f : acc[i][j][h * 2 + e];
            if (C) v += C[r * p.n + cc];
            const int64_t o = d_off + r * p.n + cc;
            if (p.d_bf16)
              static_cast<__nv_bfloat16*>(p.d)[o] = __float2bfloat16_rn(v);
            else
              static_cast<float*>(p.d)[o] = v;
          }
        }
      }
    }
    g_prev = g;
  }

  if (p.mode == kContiguous) {
    // Rows of no group (-1 padding, or an index outside [0, G)) are zero.
    for (int id = tid; id < kBM * kBN; id += kThreads) {
      const int64_t r = row0 + id / kBN, cc = col0 + id % kBN;
      if (r >= p.m || cc >= p.n) continue;
      const int idx = p.index[r];
      if (idx >= 0 && idx < p.groups) continue;
      if (p.d_bf16)
        static_cast<__nv_bfloat16*>(p.d)[r * p.n + cc] = __float2bfloat16_rn(0.0f);
      else
        static_cast<float*>(p.d)[r * p.n + cc] = 0.0f;
    }
  }
}

ffi::Error Launch(cudaStream_t stream, DevGemm p, int64_t m_tiles_rows, int grid_z,
                  const char* op) {
  // Column tiles on grid.x (blocks launched together share A's row tile in L2); row tiles move
  // to grid.x when there are more than grid.y's 65535 of them.
  const int64_t n_tiles = CeilDiv(p.n, kBN), m_tiles = CeilDiv(m_tiles_rows, kBM);
  if (n_tiles == 0 || m_tiles == 0 || grid_z == 0) return ffi::Error::Success();
  p.rows_on_x = m_tiles > 65535;
  const int64_t gx = p.rows_on_x ? m_tiles : n_tiles, gy = p.rows_on_x ? n_tiles : m_tiles;
  if (gx > 0x7FFFFFFF || gy > 65535 || grid_z > 65535)
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      StrCat(op, ": problem too large for the grid (", m_tiles, " row tiles x ", n_tiles,
                             " column tiles x ", grid_z, " groups)"));
  Fp8GemmKernel<<<dim3(gx, gy, grid_z), kThreads, 0, stream>>>(p);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    return ffi::Error(ffi::ErrorCode::kInternal, StrCat(op, ": CUDA launch failed: ", cudaGetErrorString(err)));
  return ffi::Error::Success();
}

const uint8_t* U8(const ffi::AnyBuffer& x) { return static_cast<const uint8_t*>(x.untyped_data()); }
const float* F32(const ffi::AnyBuffer& x) { return static_cast<const float*>(x.untyped_data()); }

ffi::Error DenseCuda(cudaStream_t stream, ffi::AnyBuffer a, ffi::AnyBuffer sa, ffi::AnyBuffer b,
                     ffi::AnyBuffer sb, ffi::AnyBuffer c, ffi::Result<ffi::AnyBuffer> d,
                     bool b_per_row, bool has_c) {
  const char* op = "dsjax_deep_gemm_fp8_gemm_nt";
  GemmDims dims;
  DSJAX_RETURN_IF_ERROR(CheckDenseShapes(op, a, sa, b, sb, c, *d, b_per_row, has_c, &dims));
  const int64_t m = dims.m, n = dims.n, k = dims.k;
  const int64_t kb = CeilDiv(k, kGroup);
  DevGemm p{U8(a), F32(sa), k, kb, 0, 0, U8(b), F32(sb), k, kb, 0, 0, b_per_row, m, n, k,
            nullptr, 1, has_c ? F32(c) : nullptr, d->untyped_data(),
            d->element_type() == ffi::DataType::BF16, kDense};
  return Launch(stream, p, m, 1, op);
}

ffi::Error ContiguousCuda(cudaStream_t stream, ffi::AnyBuffer a, ffi::AnyBuffer sa,
                          ffi::AnyBuffer b, ffi::AnyBuffer sb, ffi::AnyBuffer m_indices,
                          ffi::Result<ffi::AnyBuffer> d) {
  const char* op = "dsjax_deep_gemm_m_grouped_fp8_gemm_nt_contiguous";
  GemmDims dims;
  DSJAX_RETURN_IF_ERROR(CheckContiguousShapes(op, a, sa, b, sb, m_indices, *d, &dims));
  const int64_t m = dims.m, n = dims.n, k = dims.k, groups = dims.groups;
  const int64_t kb = CeilDiv(k, kGroup), nb = CeilDiv(n, kGroup);
  DevGemm p{U8(a), F32(sa), k, kb, 0, 0, U8(b), F32(sb), k, kb, n * k, nb * kb, false, m, n, k,
            static_cast<const int32_t*>(m_indices.untyped_data()), static_cast<int>(groups),
            nullptr, d->untyped_data(), d->element_type() == ffi::DataType::BF16, kContiguous};
  return Launch(stream, p, m, 1, op);
}

ffi::Error MaskedCuda(cudaStream_t stream, ffi::AnyBuffer a, ffi::AnyBuffer sa, ffi::AnyBuffer b,
                      ffi::AnyBuffer sb, ffi::AnyBuffer masked_m, ffi::Result<ffi::AnyBuffer> d) {
  const char* op = "dsjax_deep_gemm_m_grouped_fp8_gemm_nt_masked";
  GemmDims dims;
  DSJAX_RETURN_IF_ERROR(CheckMaskedShapes(op, a, sa, b, sb, masked_m, *d, &dims));
  const int64_t m_max = dims.m, n = dims.n, k = dims.k, groups = dims.groups;
  const int64_t kb = CeilDiv(k, kGroup), nb = CeilDiv(n, kGroup);
  DevGemm p{U8(a), F32(sa), k, kb, m_max * k, m_max * kb, U8(b), F32(sb), k, kb, n * k, nb * kb,
            false, m_max, n, k, static_cast<const int32_t*>(masked_m.untyped_data()),
            static_cast<int>(groups), nullptr, d->untyped_data(),
            d->element_type() == ffi::DataType::BF16, kMasked};
  return Launch(stream, p, m_max, static_cast<int>(groups), op);
}

ffi::Error KGroupedCuda(cudaStream_t stream, ffi::AnyBuffer a, ffi::AnyBuffer sa,
                        ffi::AnyBuffer b, ffi::AnyBuffer sb, ffi::AnyBuffer group_ks,
                        ffi::AnyBuffer c, ffi::Result<ffi::AnyBuffer> d, bool has_c) {
  const char* op = "dsjax_deep_gemm_k_grouped_fp8_gemm_nt_contiguous";
  GemmDims dims;
  DSJAX_RETURN_IF_ERROR(CheckKGroupedShapes(op, a, sa, b, sb, group_ks, c, *d, has_c, &dims));
  const int64_t m = dims.m, n = dims.n, k = dims.k, groups = dims.groups;
  const int64_t kb = CeilDiv(k, kGroup);
  DevGemm p{U8(a), F32(sa), k, kb, 0, 0, U8(b), F32(sb), k, kb, 0, 0, true, m, n, k,
            static_cast<const int32_t*>(group_ks.untyped_data()), static_cast<int>(groups),
            has_c ? F32(c) : nullptr, d->untyped_data(), false, kKGrouped};
  return Launch(stream, p, m, static_cast<int>(groups), op);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(Fp8GemmNtCuda, DenseCuda,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<bool>("b_per_row")
                                  .Attr<bool>("has_c"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(MGroupedContiguousCuda, ContiguousCuda,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(MGroupedMaskedCuda, MaskedCuda,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(KGroupedContiguousCuda, KGroupedCuda,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<bool>("has_c"));

DSJAX_REGISTER_FFI("dsjax_deep_gemm_fp8_gemm_nt", Fp8GemmNtCuda);
DSJAX_REGISTER_FFI("dsjax_deep_gemm_m_grouped_fp8_gemm_nt_contiguous", MGroupedContiguousCuda);
DSJAX_REGISTER_FFI("dsjax_deep_gemm_m_grouped_fp8_gemm_nt_masked", MGroupedMaskedCuda);
DSJAX_REGISTER_FFI("dsjax_deep_gemm_k_grouped_fp8_gemm_nt_contiguous", KGroupedContiguousCuda);

}  // namespace dsjax::deep_gemm
