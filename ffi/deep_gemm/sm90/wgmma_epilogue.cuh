// Epilogue of the WGMMA FP8 GEMM: (+ c), convert, and store a consumer's f32 fragment of
// m64 x kBN straight from registers (bf16 or f32), plus the zero rows of the grouped layouts.
//
// Stores go from registers, not through shared memory + TMA: at the sizes where speed matters
// (k in the thousands) the output is a small fraction of the traffic, and with the persistent
// scheduler the producer keeps loading the next tile's stages while the consumers store.
#pragma once

#include <cuda_bf16.h>

#include <cstdint>

#include "deep_gemm/sm90/wgmma_config.cuh"

namespace dsjax::deep_gemm::sm90 {

// Two adjacent output columns (col, col + 1) of one row; `vec` when both are in bounds and the
// pair is 4/8-byte aligned (n even), else scalar stores guarded by col + 1 < n.
__device__ __forceinline__ void StorePair(const Params& p, int64_t row, int64_t col, float v0,
                                          float v1, bool vec) {
  const int64_t o = row * p.n + col;
  if (p.c != nullptr) {
    v0 += p.c[o];
    if (col + 1 < p.n) v1 += p.c[o + 1];
  }
  if (p.d_bf16) {
    __nv_bfloat16* d = static_cast<__nv_bfloat16*>(p.d) + o;
    if (vec) {
      *reinterpret_cast<__nv_bfloat162*>(d) = __floats2bfloat162_rn(v0, v1);
    } else {
      d[0] = __float2bfloat16_rn(v0);
      if (col + 1 < p.n) d[1] = __float2bfloat16_rn(v1);
    }
  } else {
    float* d = static_cast<float*>(p.d) + o;
    if (vec) {
      *reinterpret_cast<float2*>(d) = make_float2(v0, v1);
    } else {
      d[0] = v0;
      if (col + 1 < p.n) d[1] = v1;
    }
  }
}

// Stores row half h (tile-local row lr0 + 8 h, output row `row`) of the fragment `acc`, or zeros
// when `zero`. Fragment registers of half h: acc[4 j + 2 h], acc[4 j + 2 h + 1] at columns
// n0 + 8 j + 2 (lane % 4) + {0, 1} (layout in wgmma_ops.cuh).
template <int kBN>
__device__ __forceinline__ void StoreRowHalf(const Params& p, const float (&acc)[kBN / 2], int h,
                                             int64_t row, int64_t n0, int lane, bool zero) {
  const bool even_n = (p.n % 2) == 0;
#pragma unroll
  for (int j = 0; j < kBN / 8; ++j) {
    const int64_t col = n0 + j * 8 + 2 * (lane % 4);
    if (col >= p.n) continue;
    const float v0 = zero ? 0.0f : acc[4 * j + 2 * h];
    const float v1 = zero ? 0.0f : acc[4 * j + 2 * h + 1];
    StorePair(p, row, col, v0, v1, even_n && col + 1 < p.n);
  }
}

}  // namespace dsjax::deep_gemm::sm90
