// CUDA FlashMLA decoding for sm_90a: a split-KV kernel on bf16 tensor cores (mma.sync m16n8k16,
// float32 accumulation) plus FlashMLA's combine kernel, driven by the same tile-scheduler metadata
// and the same host-side checks (flash_mla/mla_common.h) as the CPU twin (decode_cpu.cc).
//
// Grid (num_sm_parts, h_kv, ceil(m / 64)), 256 threads (8 warps). A CTA keeps a 64-row query tile
// in shared memory and streams its part's keys in blocks of 64 (cp.async for bf16 caches, a
// dequantizing load for FP8 caches). Warp w owns query rows 16 * (w % 4) .. +15 and output
// channels 256 * (w / 4) .. +255 (the 16 x 512 float32 accumulator would not fit one warp's
// registers); both warps of a row group compute the same scores, so no synchronization is needed
// for the softmax statistics. P enters the P·V product as two bf16 terms (hi + lo) so results
// match the float32 reference as closely as the CPU twin does.
//
// Not WGMMA/TMA: this is the straightforward tensor-core version, written without a GPU at hand;
// see the bench for what it reaches on an H200.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common/ffi_common.h"
#include "common/fp8.h"
#include "common/registry.h"
#include "flash_mla/mla_common.h"

namespace dsjax::flash_mla {
namespace {

constexpr int kRows = 64;          // query rows per CTA
constexpr int kThreads = 256;      // 8 warps
constexpr int kStride = kDQk + 8;  // smem row stride in bf16: 1168 B, conflict-free ldmatrix
constexpr int kSmemBytes = 2 * kRows * kStride * 2;  // Q tile + one K block
constexpr int kChunks = kDQk * 2 / 16;               // 16-byte chunks per 576-wide bf16 row

struct Params {
  const uint16_t* q;
  const uint8_t* kc;
  const int32_t* bt;
  const int32_t* seqlens;
  const int32_t* meta;
  const int32_t* nsplits;
  uint16_t* out;
  float* lse;
  float* oacc;
  float* lacc;
  MlaShape s;
  float scale_log2;
  bool causal;
};

__device__ __forceinline__ uint32_t SmemAddr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void LdMatrixX4(uint32_t addr, uint32_t& r0, uint32_t& r1, uint32_t& r2,
                                           uint32_t& r3) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(addr));
}

__device__ __forceinline__ void LdMatrixX4T(uint32_t addr, uint32_t& r0, uint32_t& r1, uint32_t& r2,
                                            uint32_t& r3) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(addr));
}

__device__ __forceinline__ void Mma(float* c, uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                    uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ void CpAsync16(uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(src_bytes));
}

__device__ __forceinline__ void CpAsyncWaitAll() {
  asm volatile("cp.async.commit_group;\ncp.async.wait_group 0;\n" ::);
}

__device__ __forceinline__ uint32_t PackBf16(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

// hi = bf16(x), lo = bf16(x - hi) for a pair, packed.
__device__ __forceinline__ void SplitPack(float x0, float x1, uint32_t& hi, uint32_t& lo) {
  __nv_bfloat16 h0 = __float2bfloat16_rn(x0), h1 = __float2bfloat16_rn(x1);
  hi = PackBf16(__bfloat162float(h0), __bfloat162float(h1));
  lo = PackBf16(x0 - __bfloat162float(h0), x1 - __bfloat162float(h1));
}

__device__ __forceinline__ float QuadMax(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
  return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}

__device__ __forceinline__ float QuadSum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

// Loads keys [k, k + 64) of request r / KV head h into sK (rows past k1 are zero).
__device__ void LoadKeys(const Params& p, int64_t r, int64_t h, int64_t k, int64_t k1,
                         uint16_t* sK) {
  const MlaShape& s = p.s;
  for (int idx = threadIdx.x; idx < kRows * kChunks; idx += kThreads) {
    const int n = idx / kChunks, c = idx % kChunks;
    const int64_t key = k + n;
    uint16_t* dst = sK + n * kStride + c * 8;
    const bool valid = key < k1;
    int64_t row = 0;
    if (valid) {
      const int64_t blk = ClampBlock(p.bt[r * s.max_blocks + key / s.page], s.num_blocks);
      row = (blk * s.page + key % s.page) * s.h_kv + h;
    }
    if (!s.fp8) {
      const uint8_t* src = p.kc + row * (2 * kDQk) + c * 16;
      CpAsync16(SmemAddr(dst), valid ? src : p.kc, valid ? 16 : 0);
      continue;
    }
    uint4 v = make_uint4(0, 0, 0, 0);
    if (valid) {
      const uint8_t* base = p.kc + row * kFp8RowBytes;
      if (c < kDV / 8) {  // 8 e4m3 codes -> 8 bf16
        const float scale = *reinterpret_cast<const float*>(base + kDV + 4 * (c * 8 / kFp8Tile));
        const uint2 codes = *reinterpret_cast<const uint2*>(base + c * 8);
        const uint8_t* cb = reinterpret_cast<const uint8_t*>(&codes);
        uint32_t w[4];
#pragma unroll
        for (int j = 0; j < 4; ++j)
          w[j] = PackBf16(E4M3ToFloat(cb[2 * j]) * scale, E4M3ToFloat(cb[2 * j + 1]) * scale);
        v = make_uint4(w[0], w[1], w[2], w[3]);
      } else {  // RoPE part, bf16 already
        v = *reinterpret_cast<const uint4*>(base + kDV + 16 + (c - kDV / 8) * 16);
      }
    }
    *reinterpret_cast<uint4*>(dst) = v;
  }
}

__global__ void __launch_bounds__(kThreads, 1) DecodeKernel(const Params p) {
  extern __shared__ __align__(16) uint16_t smem[];
  uint16_t* sQ = smem;
  uint16_t* sK = smem + kRows * kStride;
  const MlaShape& s = p.s;
  const int64_t part = blockIdx.x, h = blockIdx.y, tile = blockIdx.z;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int rg = warp & 3, half = warp >> 2;
  const PartRange pr = DecodePart(p.meta, part);
  if (pr.begin_req > pr.end_req || pr.begin_req < 0 || pr.end_req >= s.b) return;
  const int64_t capacity = s.max_blocks * s.page;

  // This thread's two accumulator rows (tile-local) and their query token index.
  const int row_lo = rg * 16 + lane / 4;
  int64_t grow[2] = {tile * kRows + row_lo, tile * kRows + row_lo + 8};

  for (int64_t r = pr.begin_req; r <= pr.end_req; ++r) {
    const WorkItem it = MakeWorkItem(pr, r, p.seqlens, p.nsplits, capacity, s.accum_rows);
    if (!it.ok) continue;
    __syncthreads();  // the previous request's last block is done with sQ / sK
    for (int idx = threadIdx.x; idx < kRows * kChunks; idx += kThreads) {
      const int m = idx / kChunks, c = idx % kChunks;
      const int64_t gm = tile * kRows + m;
      uint4 v = make_uint4(0, 0, 0, 0);
      if (gm < s.m) {
        const int64_t i = gm / s.g, head = h * s.g + gm % s.g;
        v = *reinterpret_cast<const uint4*>(p.q + ((r * s.s_q + i) * s.h_q + head) * kDQk + c * 8);
      }
      *reinterpret_cast<uint4*>(sQ + m * kStride + c * 8) = v;
    }
    int64_t lim[2];
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      lim[j] = it.k1;
      if (grow[j] >= s.m) lim[j] = 0;
      else if (p.causal) lim[j] = min(lim[j], it.s_k - s.s_q + grow[j] / s.g + 1);
    }
    float o[32][4];
#pragma unroll
    for (int nt = 0; nt < 32; ++nt) o[nt][0] = o[nt][1] = o[nt][2] = o[nt][3] = 0.f;
    float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f};

    for (int64_t kb = it.k0; kb < it.k1; kb += kBlockN) {
      __syncthreads();
      LoadKeys(p, r, h, kb, it.k1, sK);
      CpAsyncWaitAll();
      __syncthreads();
      // S = Q Kᵀ for this warp's 16 rows and the 64 keys.
      float sc[8][4];
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) sc[nt][0] = sc[nt][1] = sc[nt][2] = sc[nt][3] = 0.f;
#pragma unroll 4
      for (int kk = 0; kk < kDQk / 16; ++kk) {
        uint32_t a0, a1, a2, a3;
        const int arow = rg * 16 + (lane % 8) + ((lane / 8) % 2) * 8;
        LdMatrixX4(SmemAddr(sQ + arow * kStride + kk * 16 + (lane / 16) * 8), a0, a1, a2, a3);
#pragma unroll
        for (int np = 0; np < 4; ++np) {  // pairs of 8-key tiles
          uint32_t b0, b1, b2, b3;
          const int krow = np * 16 + (lane % 8) + (lane / 16) * 8;
          LdMatrixX4(SmemAddr(sK + krow * kStride + kk * 16 + ((lane / 8) % 2) * 8), b0, b1, b2, b3);
          Mma(sc[2 * np], a0, a1, a2, a3, b0, b1);
          Mma(sc[2 * np + 1], a0, a1, a2, a3, b2, b3);
        }
      }
      // Online softmax (log2 domain) on rows row_lo (c0, c1) and row_lo + 8 (c2, c3).
      float alpha[2];
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        float mx = -INFINITY;
#pragma unroll
        for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int64_t key = kb + nt * 8 + (lane % 4) * 2 + e;
            float v = sc[nt][2 * j + e] * p.scale_log2;
            v = key < lim[j] ? v : -INFINITY;
            sc[nt][2 * j + e] = v;
            mx = fmaxf(mx, v);
          }
        }
        mx = QuadMax(mx);
        const float m_new = fmaxf(m_run[j], mx);
        const float m_use = m_new == -INFINITY ? 0.f : m_new;
        alpha[j] = m_run[j] == -INFINITY ? (m_new == -INFINITY ? 1.f : 0.f) : exp2f(m_run[j] - m_new);
        float sum = 0.f;
#pragma unroll
        for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const float v = sc[nt][2 * j + e];
            const float e2 = v == -INFINITY ? 0.f : exp2f(v - m_use);
            sc[nt][2 * j + e] = e2;
            sum += e2;
          }
        }
        l_run[j] = l_run[j] * alpha[j] + QuadSum(sum);
        m_run[j] = m_new;
      }
#pragma unroll
      for (int nt = 0; nt < 32; ++nt) {
        o[nt][0] *= alpha[0];
        o[nt][1] *= alpha[0];
        o[nt][2] *= alpha[1];
        o[nt][3] *= alpha[1];
      }
      // O += P V over this warp's 256 channels; P as hi + lo bf16 A fragments.
#pragma unroll
      for (int kk = 0; kk < kBlockN / 16; ++kk) {
        uint32_t ah[4], al[4];
        SplitPack(sc[2 * kk][0], sc[2 * kk][1], ah[0], al[0]);
        SplitPack(sc[2 * kk][2], sc[2 * kk][3], ah[1], al[1]);
        SplitPack(sc[2 * kk + 1][0], sc[2 * kk + 1][1], ah[2], al[2]);
        SplitPack(sc[2 * kk + 1][2], sc[2 * kk + 1][3], ah[3], al[3]);
        const int vrow = kk * 16 + (lane % 8) + ((lane / 8) % 2) * 8;
#pragma unroll
        for (int np = 0; np < 16; ++np) {  // pairs of 8-channel tiles
          uint32_t b0, b1, b2, b3;
          const int col = half * 256 + np * 16 + (lane / 16) * 8;
          LdMatrixX4T(SmemAddr(sK + vrow * kStride + col), b0, b1, b2, b3);
          Mma(o[2 * np], ah[0], ah[1], ah[2], ah[3], b0, b1);
          Mma(o[2 * np], al[0], al[1], al[2], al[3], b0, b1);
          Mma(o[2 * np + 1], ah[0], ah[1], ah[2], ah[3], b2, b3);
          Mma(o[2 * np + 1], al[0], al[1], al[2], al[3], b2, b3);
        }
      }
    }
    // Finalize this request's piece.
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int64_t gm = grow[j];
      if (gm >= s.m) continue;
      const float l = l_run[j];
      const float inv = l > 0.f ? 1.f / l : 0.f;
      const int64_t i = gm / s.g, head = h * s.g + gm % s.g;
      if (it.splits == 1) {
        uint16_t* dst = p.out + ((r * s.s_q + i) * s.h_q + head) * kDV + half * 256 + (lane % 4) * 2;
#pragma unroll
        for (int nt = 0; nt < 32; ++nt)
          *reinterpret_cast<uint32_t*>(dst + nt * 8) = PackBf16(o[nt][2 * j] * inv, o[nt][2 * j + 1] * inv);
        if (half == 0 && lane % 4 == 0)
          p.lse[(r * s.h_q + head) * s.s_q + i] = l > 0.f ? (m_run[j] + log2f(l)) * 0.6931471805599453f : INFINITY;
      } else {
        float* dst = p.oacc + ((it.accum_row * s.h_kv + h) * s.m + gm) * kDV + half * 256 + (lane % 4) * 2;
#pragma unroll
        for (int nt = 0; nt < 32; ++nt)
          *reinterpret_cast<float2*>(dst + nt * 8) = make_float2(o[nt][2 * j] * inv, o[nt][2 * j + 1] * inv);
        if (half == 0 && lane % 4 == 0)
          p.lacc[(it.accum_row * s.h_kv + h) * s.m + gm] = l > 0.f ? (m_run[j] + log2f(l)) * 0.6931471805599453f : -INFINITY;
      }
    }
  }
}

// Log-sum-exp merge of the pieces of split requests; one CTA per (request, KV head).
__global__ void __launch_bounds__(kThreads) CombineKernel(const Params p) {
  const MlaShape& s = p.s;
  const int64_t r = blockIdx.x / s.h_kv, h = blockIdx.x % s.h_kv;
  const int64_t first = p.nsplits[r], n = static_cast<int64_t>(p.nsplits[r + 1]) - first;
  if (n <= 1 || first < 0 || first + n > s.accum_rows) return;
  for (int64_t m = 0; m < s.m; ++m) {
    const float* lrow = p.lacc + (first * s.h_kv + h) * s.m + m;
    const int64_t lstride = s.h_kv * s.m;
    float mx = -INFINITY;
    for (int64_t j = 0; j < n; ++j) mx = fmaxf(mx, lrow[j * lstride]);
    const int64_t i = m / s.g, head = h * s.g + m % s.g;
    uint16_t* dst = p.out + ((r * s.s_q + i) * s.h_q + head) * kDV;
    if (mx == -INFINITY) {
      for (int c = threadIdx.x; c < kDV; c += kThreads) dst[c] = 0;
      if (threadIdx.x == 0) p.lse[(r * s.h_q + head) * s.s_q + i] = INFINITY;
      continue;
    }
    float sum = 0.f;
    for (int64_t j = 0; j < n; ++j) {
      const float l = lrow[j * lstride];
      sum += l == -INFINITY ? 0.f : expf(l - mx);
    }
    for (int c = threadIdx.x; c < kDV; c += kThreads) {
      float acc = 0.f;
      for (int64_t j = 0; j < n; ++j) {
        const float l = lrow[j * lstride];
        if (l == -INFINITY) continue;  // a piece that was never written
        acc += expf(l - mx) / sum * p.oacc[(((first + j) * s.h_kv + h) * s.m + m) * kDV + c];
      }
      __nv_bfloat16 b = __float2bfloat16_rn(acc);
      dst[c] = *reinterpret_cast<uint16_t*>(&b);
    }
    if (threadIdx.x == 0) p.lse[(r * s.h_q + head) * s.s_q + i] = mx + logf(sum);
  }
}

__global__ void FillKernel(float* x, int64_t n, float v) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    x[i] = v;
}

ffi::Error DecodeCudaImpl(cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer k_cache,
                          ffi::Buffer<ffi::S32> block_table, ffi::Buffer<ffi::S32> seqlens,
                          ffi::Buffer<ffi::S32> meta, ffi::Buffer<ffi::S32> num_splits,
                          ffi::Result<ffi::AnyBuffer> out, ffi::Result<ffi::Buffer<ffi::F32>> lse,
                          ffi::Result<ffi::Buffer<ffi::F32>> o_acc,
                          ffi::Result<ffi::Buffer<ffi::F32>> lse_acc, float softmax_scale,
                          bool causal, bool is_fp8) {
  Params p;
  DSJAX_RETURN_IF_ERROR(CheckDecodeShapes(q, k_cache, block_table, seqlens, meta, num_splits, *out,
                                          *lse, *o_acc, *lse_acc, is_fp8, &p.s));
  const MlaShape& s = p.s;
  p.q = static_cast<const uint16_t*>(q.untyped_data());
  p.kc = static_cast<const uint8_t*>(k_cache.untyped_data());
  p.bt = block_table.typed_data();
  p.seqlens = seqlens.typed_data();
  p.meta = meta.typed_data();
  p.nsplits = num_splits.typed_data();
  p.out = static_cast<uint16_t*>(out->untyped_data());
  p.lse = lse->typed_data();
  p.oacc = o_acc->typed_data();
  p.lacc = lse_acc->typed_data();
  p.scale_log2 = softmax_scale * 1.4426950408889634f;
  p.causal = causal && s.s_q > 1;
  if (s.b == 0 || s.s_q == 0 || s.h_q == 0) return ffi::Error::Success();
  // The kernels read q and the cache with 16-byte vector loads / cp.async and store the outputs in
  // 4- and 8-byte pairs; XLA's buffers are aligned far beyond that, but a misaligned access would
  // poison the whole CUDA context, so it is refused here instead.
  const auto misaligned = [](const void* ptr, uintptr_t a) {
    return reinterpret_cast<uintptr_t>(ptr) % a != 0;
  };
  if (misaligned(p.q, 16) || misaligned(p.kc, 16) || misaligned(p.out, 4) || misaligned(p.oacc, 8))
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "flash_mla: q and k_cache must be 16-byte aligned, out 4-byte and out_accum "
                      "8-byte aligned (the CUDA kernel's vector accesses)");
  const int64_t m_tiles = (s.m + kRows - 1) / kRows;
  const int64_t combine_blocks = s.b * s.h_kv;
  if (s.num_parts > 0x7FFFFFFF || s.h_kv > 65535 || m_tiles > 65535 || combine_blocks > 0x7FFFFFFF)
    return InvalidArgument("flash_mla: problem too large for the CUDA grid (num_sm_parts=",
                           s.num_parts, ", h_kv=", s.h_kv, " (at most 65535), ceil(s_q * h_q / h_kv / 64)=",
                           m_tiles, " (at most 65535), b * h_kv=", combine_blocks, ")");
  cudaError_t err = cudaMemsetAsync(p.out, 0, s.b * s.s_q * s.h_q * kDV * 2, stream);
  if (err == cudaSuccess) {
    FillKernel<<<64, 256, 0, stream>>>(p.lse, s.b * s.h_q * s.s_q, INFINITY);
    FillKernel<<<64, 256, 0, stream>>>(p.lacc, s.accum_rows * s.h_kv * s.m, -INFINITY);
    err = cudaFuncSetAttribute(DecodeKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes);
  }
  if (err == cudaSuccess) {
    dim3 grid(static_cast<unsigned>(s.num_parts), static_cast<unsigned>(s.h_kv),
              static_cast<unsigned>(m_tiles));
    DecodeKernel<<<grid, kThreads, kSmemBytes, stream>>>(p);
    CombineKernel<<<static_cast<unsigned>(combine_blocks), kThreads, 0, stream>>>(p);
    err = cudaGetLastError();
  }
  if (err != cudaSuccess)
    return ffi::Error(ffi::ErrorCode::kInternal,
                      StrCat("dsjax_flash_mla_decode: CUDA error: ", cudaGetErrorString(err)));
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FlashMlaDecodeCuda, DecodeCudaImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("softmax_scale")
                                  .Attr<bool>("causal")
                                  .Attr<bool>("is_fp8"));

DSJAX_REGISTER_FFI("dsjax_flash_mla_decode", FlashMlaDecodeCuda);

}  // namespace dsjax::flash_mla
