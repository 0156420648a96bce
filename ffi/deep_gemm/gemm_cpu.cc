// CPU twin of DeepGEMM's FP8 GEMMs (dense 1d2d / 1d1d, m-grouped contiguous and masked, k-grouped).
//
// Same semantics as dsjax/deep_gemm/gemm_reference.py, computed the way the Hopper kernels do:
// per 128-wide K block the FP8 products are accumulated in f32 registers, then promoted into the
// f32 output tile with the block's scales (sa[row] * sb[col]) -- DeepSeek-V3 §3.3.2.
//
// Layout of the work: the output is cut into tiles of up to kTileM x kTileN; tiles (of every
// problem of a grouped GEMM) are spread over XLA's intra-op pool. FP8 is decoded to f32 through a
// 256-entry table (exact). A is decoded once per call into micro-kernel order when several column
// tiles share it (within a memory budget); B, and A otherwise, are decoded per tile and K block
// into cache-resident panels. A register-blocked micro-kernel (12x32 AVX-512, 6x16 AVX2/FMA or
// portable C++, chosen at run time) accumulates one K block; its epilogue applies the scales.
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define DSJAX_X86 1
#endif

#include "common/ffi_common.h"
#include "common/fp8.h"
#include "common/parallel.h"
#include "common/registry.h"
#include "deep_gemm/gemm_common.h"

namespace dsjax::deep_gemm {
namespace {

constexpr int kMR = 6;   // rows and columns of the portable and AVX2 micro-kernels
constexpr int kNR = 16;
constexpr int64_t kTileM = 384;
constexpr int64_t kTileN = 128;
constexpr int64_t kKB = kGroup;  // promotion interval = scale block

struct Lut {
  float v[256];
  Lut() {
    for (int i = 0; i < 256; ++i) v[i] = E4M3ToFloat(static_cast<uint8_t>(i));
  }
};
const Lut& E4M3Table() {
  static const Lut lut;
  return lut;
}

inline uint16_t FloatToBf16(float f) {
  uint32_t b = FloatBits(f);
  if ((b & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((b >> 16) | 0x40u);
  return static_cast<uint16_t>((b + 0x7FFFu + ((b >> 16) & 1u)) >> 16);
}

// acc(6x16) = sum_k pa[k][0..6) x pb[k][0..16); c[i][j] += acc[i][j] * sar[i] * sbc[j].
// c has row stride ldc and always 6 valid rows x 16 columns (the tile is padded).
void MicroKernelGeneric(int64_t kc, const float* pa, const float* pb, const float* sar,
                        const float* sbc, float* c, int64_t ldc) {
  float acc[kMR][kNR] = {};
  for (int64_t k = 0; k < kc; ++k) {
    for (int i = 0; i < kMR; ++i) {
      const float a = pa[k * kMR + i];
      for (int j = 0; j < kNR; ++j) acc[i][j] += a * pb[k * kNR + j];
    }
  }
  for (int i = 0; i < kMR; ++i)
    for (int j = 0; j < kNR; ++j) c[i * ldc + j] += acc[i][j] * (sar[i] * sbc[j]);
}

#ifdef DSJAX_X86
__attribute__((target("avx2,fma"))) void MicroKernelAvx2(int64_t kc, const float* pa,
                                                        const float* pb, const float* sar,
                                                        const float* sbc, float* c, int64_t ldc) {
  __m256 c00 = _mm256_setzero_ps(), c01 = _mm256_setzero_ps();
  __m256 c10 = _mm256_setzero_ps(), c11 = _mm256_setzero_ps();
  __m256 c20 = _mm256_setzero_ps(), c21 = _mm256_setzero_ps();
  __m256 c30 = _mm256_setzero_ps(), c31 = _mm256_setzero_ps();
  __m256 c40 = _mm256_setzero_ps(), c41 = _mm256_setzero_ps();
  __m256 c50 = _mm256_setzero_ps(), c51 = _mm256_setzero_ps();
  for (int64_t k = 0; k < kc; ++k) {
    const __m256 b0 = _mm256_load_ps(pb), b1 = _mm256_load_ps(pb + 8);
    __m256 a;
    a = _mm256_broadcast_ss(pa + 0); c00 = _mm256_fmadd_ps(a, b0, c00); c01 = _mm256_fmadd_ps(a, b1, c01);
    a = _mm256_broadcast_ss(pa + 1); c10 = _mm256_fmadd_ps(a, b0, c10); c11 = _mm256_fmadd_ps(a, b1, c11);
    a = _mm256_broadcast_ss(pa + 2); c20 = _mm256_fmadd_ps(a, b0, c20); c21 = _mm256_fmadd_ps(a, b1, c21);
    a = _mm256_broadcast_ss(pa + 3); c30 = _mm256_fmadd_ps(a, b0, c30); c31 = _mm256_fmadd_ps(a, b1, c31);
    a = _mm256_broadcast_ss(pa + 4); c40 = _mm256_fmadd_ps(a, b0, c40); c41 = _mm256_fmadd_ps(a, b1, c41);
    a = _mm256_broadcast_ss(pa + 5); c50 = _mm256_fmadd_ps(a, b0, c50); c51 = _mm256_fmadd_ps(a, b1, c51);
    pa += kMR;
    pb += kNR;
  }
  const __m256 s0 = _mm256_load_ps(sbc), s1 = _mm256_load_ps(sbc + 8);
  // A macro, not a lambda: a lambda would not inherit this function's target("avx2,fma").
#define DSJAX_PROMOTE(i, lo, hi)                                                                  \
  do {                                                                                            \
    const __m256 f = _mm256_broadcast_ss(sar + (i));                                              \
    float* row = c + (i) * ldc;                                                                   \
    _mm256_storeu_ps(row, _mm256_fmadd_ps(lo, _mm256_mul_ps(f, s0), _mm256_loadu_ps(row)));       \
    _mm256_storeu_ps(row + 8, _mm256_fmadd_ps(hi, _mm256_mul_ps(f, s1), _mm256_loadu_ps(row + 8))); \
  } while (0)
  DSJAX_PROMOTE(0, c00, c01);
  DSJAX_PROMOTE(1, c10, c11);
  DSJAX_PROMOTE(2, c20, c21);
  DSJAX_PROMOTE(3, c30, c31);
  DSJAX_PROMOTE(4, c40, c41);
  DSJAX_PROMOTE(5, c50, c51);
#undef DSJAX_PROMOTE
}

// 12x32 on AVX-512: 24 accumulators + 2 B vectors + 1 broadcast fit the 32 zmm registers.
__attribute__((target("avx512f"))) void MicroKernelAvx512(int64_t kc, const float* pa,
                                                         const float* pb, const float* sar,
                                                         const float* sbc, float* c, int64_t ldc) {
  constexpr int MR = 12;
  __m512 lo[MR], hi[MR];
#pragma GCC unroll 12
  for (int i = 0; i < MR; ++i) lo[i] = hi[i] = _mm512_setzero_ps();
  for (int64_t k = 0; k < kc; ++k) {
    const __m512 b0 = _mm512_load_ps(pb), b1 = _mm512_load_ps(pb + 16);
#pragma GCC unroll 12
    for (int i = 0; i < MR; ++i) {
      const __m512 a = _mm512_set1_ps(pa[i]);
      lo[i] = _mm512_fmadd_ps(a, b0, lo[i]);
      hi[i] = _mm512_fmadd_ps(a, b1, hi[i]);
    }
    pa += MR;
    pb += 32;
  }
  const __m512 s0 = _mm512_load_ps(sbc), s1 = _mm512_load_ps(sbc + 16);
#pragma GCC unroll 12
  for (int i = 0; i < MR; ++i) {
    const __m512 f = _mm512_set1_ps(sar[i]);
    float* row = c + i * ldc;
    _mm512_storeu_ps(row, _mm512_fmadd_ps(lo[i], _mm512_mul_ps(f, s0), _mm512_loadu_ps(row)));
    _mm512_storeu_ps(row + 16,
                     _mm512_fmadd_ps(hi[i], _mm512_mul_ps(f, s1), _mm512_loadu_ps(row + 16)));
  }
}
#endif

using MicroKernel = void (*)(int64_t, const float*, const float*, const float*, const float*,
                             float*, int64_t);

// The micro-kernel and the panel geometry it reads (rows per A strip, columns per B strip).
struct KernelConfig {
  MicroKernel fn;
  int mr, nr;
};

// The best micro-kernel this CPU runs. DSJAX_DEEP_GEMM_CPU_KERNEL=avx512|avx2|generic narrows the
// choice (read once per process), so that every kernel is testable on a machine that has them all.
KernelConfig PickKernel() {
  const char* env = std::getenv("DSJAX_DEEP_GEMM_CPU_KERNEL");
  const std::string want = env ? env : "";
#ifdef DSJAX_X86
  if ((want.empty() || want == "avx512") && __builtin_cpu_supports("avx512f"))
    return {MicroKernelAvx512, 12, 32};
  if ((want.empty() || want == "avx512" || want == "avx2") && __builtin_cpu_supports("avx2") &&
      __builtin_cpu_supports("fma"))
    return {MicroKernelAvx2, 6, 16};
#endif
  return {MicroKernelGeneric, 6, 16};
}

// Per-thread output tile, reused across tiles and calls.
std::vector<float>& ThreadCTile() {
  thread_local std::vector<float> ctile(kTileM * kTileN);
  return ctile;
}

// 64-byte aligned float storage (the micro-kernels use aligned vector loads of the panels).
struct AlignedFloats {
  std::vector<float> raw;
  float* p = nullptr;
  void Resize(int64_t n) {
    raw.assign(n + 16, 0.0f);
    auto u = reinterpret_cast<uintptr_t>(raw.data());
    p = reinterpret_cast<float*>((u + 63) & ~uintptr_t{63});
  }
};

// A problem's A decoded once to f32 (exact: every E4M3 value is an f32) in the order the
// micro-kernel reads it, [row strip of mr][k][mr] over the problem's K range (padding rows zero,
// with scale zero), when several column tiles reuse it.
struct Packed {
  AlignedFloats a, sa;  // a: [strip][k][mr], sa: [strip][kb][mr]
  int64_t klen = 0, nkb = 0, m_strips = 0;
  // false: A is decoded per tile and K block into a per-thread panel instead (when a single
  // column tile covers it, or when packing it would need more memory than kPackBudgetBytes).
  bool a_packed = true;
};

// Decodes rows [s*mr, s*mr + mr) of A over the problem-local K range [k0, k1) (k0 a multiple of
// 128) into dst[(kk - k0) * mr + i], and their scales into sdst[(kb - k0 / 128) * mr + i]; rows
// past m are written as zeros (value and scale).
void DecodeAStrip(const GemmProblem& p, int64_t s, int mr, int64_t k0, int64_t k1, float* dst,
                  float* sdst) {
  const float* lut = E4M3Table().v;
  const int64_t kb0 = (p.k_begin + k0) / kKB, nkb = CeilDiv(k1 - k0, kKB);
  const int rows = static_cast<int>(std::max<int64_t>(0, std::min<int64_t>(mr, p.m - s * mr)));
  // One K block at a time, so that the strided writes stay inside L1.
  for (int64_t c0 = k0; c0 < k1; c0 += kKB) {
    const int64_t c1 = std::min(k1, c0 + kKB);
    for (int i = 0; i < mr; ++i) {
      float* out = dst + (c0 - k0) * mr + i;
      if (i < rows) {
        const uint8_t* src = p.a + (s * mr + i) * p.lda + p.k_begin;
        for (int64_t kk = c0; kk < c1; ++kk, out += mr) *out = lut[src[kk]];
      } else {
        for (int64_t kk = c0; kk < c1; ++kk, out += mr) *out = 0.0f;
      }
    }
  }
  for (int i = 0; i < mr; ++i) {
    const float* srow = i < rows ? p.sa + (s * mr + i) * p.sa_ld : nullptr;
    for (int64_t t = 0; t < nkb; ++t) sdst[t * mr + i] = srow ? srow[kb0 + t] : 0.0f;
  }
}

void PackAStrip(const GemmProblem& p, Packed& q, int64_t s, const int kMR) {
  DecodeAStrip(p, s, kMR, 0, q.klen, q.a.p + s * q.klen * kMR, q.sa.p + s * q.nkb * kMR);
}

// Decodes columns [s*nr, s*nr + nr) of B over the problem-local K range [k0, k1) (k0 a multiple of
// 128) into dst[(kk - k0) * nr + j], and their scales into sdst[(kb - k0 / 128) * nr + j];
// columns past n are written as zeros (value and scale).
void DecodeBStrip(const GemmProblem& p, int64_t s, int nr, int64_t k0, int64_t k1, float* dst,
                  float* sdst) {
  const float* lut = E4M3Table().v;
  const int64_t kb0 = (p.k_begin + k0) / kKB, nkb = CeilDiv(k1 - k0, kKB);
  const int cols = static_cast<int>(std::max<int64_t>(0, std::min<int64_t>(nr, p.n - s * nr)));
  // One K block at a time, so that the strided writes stay inside L1.
  for (int64_t c0 = k0; c0 < k1; c0 += kKB) {
    const int64_t c1 = std::min(k1, c0 + kKB);
    for (int j = 0; j < nr; ++j) {
      float* out = dst + (c0 - k0) * nr + j;
      if (j < cols) {
        const uint8_t* src = p.b + (s * nr + j) * p.ldb + p.k_begin;
        for (int64_t kk = c0; kk < c1; ++kk, out += nr) *out = lut[src[kk]];
      } else {
        for (int64_t kk = c0; kk < c1; ++kk, out += nr) *out = 0.0f;
      }
    }
  }
  for (int j = 0; j < nr; ++j) {
    const int64_t col = s * nr + j;
    const float* srow = j >= cols      ? nullptr
                        : p.b_per_row ? p.sb + col * p.sb_ld
                                      : p.sb + (col / kGroup) * p.sb_ld;
    for (int64_t t = 0; t < nkb; ++t) sdst[t * nr + j] = srow ? srow[kb0 + t] : 0.0f;
  }
}

// Per-thread panels of operands decoded tile by tile: with one tile along the other dimension,
// each element is decoded exactly once either way, and the panel stays in cache.
struct Panel {
  AlignedFloats values, scales;
  explicit Panel(int64_t rows) {
    values.Resize(rows * kKB);
    scales.Resize(rows);
  }
};
Panel& ThreadAPanel() {
  thread_local Panel panel(kTileM + 32);
  return panel;
}
Panel& ThreadBPanel() {
  thread_local Panel panel(kTileN + 32);
  return panel;
}

// Packed (pre-decoded) operands of one call may use at most this much memory (f32 is 4x the FP8
// bytes); past it, operands are decoded per tile instead.
constexpr int64_t kPackBudgetBytes = int64_t{256} << 20;

struct Tile {
  int32_t problem;
  int64_t m0, m1, n0, n1;  // m0 multiple of 6, n0 multiple of 16
};

void RunTile(const GemmProblem& p, const Packed& q, const Tile& t, const KernelConfig& cfg) {
  const int64_t kMR = cfg.mr, kNR = cfg.nr;
  std::vector<float>& buf = ThreadCTile();
  float* ctile = buf.data();
  const int64_t mt = t.m1 - t.m0, nt = t.n1 - t.n0;
  const int64_t mt_pad = CeilDiv(mt, kMR) * kMR, nt_pad = CeilDiv(nt, kNR) * kNR;
  const int64_t ldc = nt_pad;
  std::fill(ctile, ctile + mt_pad * ldc, 0.0f);
  if (p.c != nullptr) {
    for (int64_t i = 0; i < mt; ++i)
      std::memcpy(ctile + i * ldc, p.c + (t.m0 + i) * p.n + t.n0, nt * sizeof(float));
  }
  for (int64_t kb = 0; kb < q.nkb; ++kb) {
    const int64_t kofs = kb * kKB, kc = std::min(kKB, q.klen - kofs);
    // B is always decoded here, per tile and K block: streaming a pre-decoded f32 B (4x the FP8
    // bytes) from memory once per row tile measured slower than decoding it again in cache.
    Panel& bpanel = ThreadBPanel();
    for (int64_t j0 = 0; j0 < nt_pad; j0 += kNR)
      DecodeBStrip(p, (t.n0 + j0) / kNR, static_cast<int>(kNR), kofs, kofs + kc,
                   bpanel.values.p + (j0 / kNR) * kc * kNR, bpanel.scales.p + j0);
    const float* a_vals = q.a.p;
    const float* a_scales = q.sa.p;
    int64_t a_strip0 = 0, a_klen = q.klen, a_nkb = q.nkb, a_kofs = kofs, a_kb = kb;
    if (!q.a_packed) {
      Panel& panel = ThreadAPanel();
      for (int64_t i0 = 0; i0 < mt_pad; i0 += kMR)
        DecodeAStrip(p, (t.m0 + i0) / kMR, static_cast<int>(kMR), kofs, kofs + kc,
                     panel.values.p + (i0 / kMR) * kc * kMR, panel.scales.p + i0);
      a_vals = panel.values.p, a_scales = panel.scales.p;
      a_strip0 = t.m0 / kMR, a_klen = kc, a_nkb = 1, a_kofs = 0, a_kb = 0;
    }
    for (int64_t i0 = 0; i0 < mt_pad; i0 += kMR) {
      const int64_t sa_strip = (t.m0 + i0) / kMR - a_strip0;
      const float* pa = a_vals + sa_strip * a_klen * kMR + a_kofs * kMR;
      const float* sar = a_scales + (sa_strip * a_nkb + a_kb) * kMR;
      for (int64_t j0 = 0; j0 < nt_pad; j0 += kNR) {
        const float* pb = bpanel.values.p + (j0 / kNR) * kc * kNR;
        const float* sbc = bpanel.scales.p + j0;
        cfg.fn(kc, pa, pb, sar, sbc, ctile + i0 * ldc + j0, ldc);
      }
    }
  }
  for (int64_t i = 0; i < mt; ++i) {
    const float* src = ctile + i * ldc;
    const int64_t off = (t.m0 + i) * p.n + t.n0;
    if (p.d_bf16) {
      uint16_t* dst = static_cast<uint16_t*>(p.d) + off;
      for (int64_t j = 0; j < nt; ++j) dst[j] = FloatToBf16(src[j]);
    } else {
      std::memcpy(static_cast<float*>(p.d) + off, src, nt * sizeof(float));
    }
  }
}

// Decodes every problem's operands, then runs all output tiles, both spread over the pool.
void RunProblems(ffi::ThreadPool& pool, const std::vector<GemmProblem>& problems) {
  static const KernelConfig cfg = PickKernel();
  const int64_t kMR = cfg.mr, kNR = cfg.nr;
  std::vector<Packed> packed(problems.size());
  struct Strip {
    int32_t problem;
    int64_t index;
  };
  std::vector<Strip> strips;
  std::vector<Tile> tiles;
  int64_t pack_bytes = 0;
  for (size_t i = 0; i < problems.size(); ++i) {
    const GemmProblem& p = problems[i];
    Packed& q = packed[i];
    q.klen = std::max<int64_t>(0, p.k_end - p.k_begin);
    q.nkb = CeilDiv(q.klen, kKB);
    q.m_strips = CeilDiv(p.m, kMR);
    // Even row tiles (257 rows -> 2 x 132, not 192 + 65); narrower column tiles when a problem
    // alone would leave threads idle.
    const int64_t tile_m = CeilDiv(CeilDiv(p.m, CeilDiv(p.m, kTileM)), kMR) * kMR;
    int64_t tile_n = kTileN;
    while (tile_n > kNR && CeilDiv(p.m, tile_m) * CeilDiv(p.n, tile_n) < 4 * pool.num_threads())
      tile_n /= 2;
    const int64_t a_bytes = q.m_strips * kMR * q.klen * 4;
    q.a_packed = CeilDiv(p.n, tile_n) > 1 && pack_bytes + a_bytes <= kPackBudgetBytes;
    if (q.a_packed) {
      pack_bytes += a_bytes;
      q.a.Resize(q.m_strips * kMR * q.klen);
      q.sa.Resize(q.m_strips * kMR * q.nkb);
      if (q.klen > 0)
        for (int64_t s = 0; s < q.m_strips; ++s) strips.push_back({static_cast<int32_t>(i), s});
    }
    for (int64_t m0 = 0; m0 < p.m; m0 += tile_m)
      for (int64_t n0 = 0; n0 < p.n; n0 += tile_n)
        tiles.push_back({static_cast<int32_t>(i), m0, std::min(p.m, m0 + tile_m), n0,
                         std::min(p.n, n0 + tile_n)});
  }
  ParallelFor(pool, static_cast<int64_t>(strips.size()), 4, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i)
      PackAStrip(problems[strips[i].problem], packed[strips[i].problem], strips[i].index, cfg.mr);
  });
  ParallelFor(pool, static_cast<int64_t>(tiles.size()), 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i)
      RunTile(problems[tiles[i].problem], packed[tiles[i].problem], tiles[i], cfg);
  });
}

void ZeroRows(void* d, bool bf16, int64_t row0, int64_t row1,
              int64_t n) {
  const size_t es = bf16 ? 2 : 4;
  std::memset(static_cast<char*>(d) + row0 * n * es, 0, (row1 - row0) * n * es);
}

const uint8_t* U8(const ffi::AnyBuffer& x) { return static_cast<const uint8_t*>(x.untyped_data()); }
const float* F32(const ffi::AnyBuffer& x) { return static_cast<const float*>(x.untyped_data()); }

// ---------------------------------------------------------------- dense (1d2d and 1d1d)
ffi::Error DenseImpl(ffi::ThreadPool pool, ffi::AnyBuffer a, ffi::AnyBuffer sa, ffi::AnyBuffer b,
                     ffi::AnyBuffer sb, ffi::AnyBuffer c, ffi::Result<ffi::AnyBuffer> d,
                     bool b_per_row, bool has_c) {
  const char* op = "dsjax_deep_gemm_fp8_gemm_nt";
  GemmDims dims;
  DSJAX_RETURN_IF_ERROR(CheckDenseShapes(op, a, sa, b, sb, c, *d, b_per_row, has_c, &dims));
  const int64_t m = dims.m, n = dims.n, k = dims.k;
  GemmProblem p;
  p.a = U8(a), p.sa = F32(sa), p.lda = k, p.sa_ld = CeilDiv(k, kGroup);
  p.b = U8(b), p.sb = F32(sb), p.ldb = k, p.sb_ld = CeilDiv(k, kGroup), p.b_per_row = b_per_row;
  p.m = m, p.n = n, p.k_begin = 0, p.k_end = k;
  p.c = has_c ? F32(c) : nullptr;
  p.d = d->untyped_data(), p.d_bf16 = d->element_type() == ffi::DataType::BF16;
  RunProblems(pool, {p});
  return ffi::Error::Success();
}

// ---------------------------------------------------------------- m-grouped, contiguous layout
ffi::Error ContiguousImpl(ffi::ThreadPool pool, ffi::AnyBuffer a, ffi::AnyBuffer sa,
                          ffi::AnyBuffer b, ffi::AnyBuffer sb, ffi::AnyBuffer m_indices,
                          ffi::Result<ffi::AnyBuffer> d) {
  const char* op = "dsjax_deep_gemm_m_grouped_fp8_gemm_nt_contiguous";
  GemmDims dims;
  DSJAX_RETURN_IF_ERROR(CheckContiguousShapes(op, a, sa, b, sb, m_indices, *d, &dims));
  const int64_t m = dims.m, n = dims.n, k = dims.k, groups = dims.groups;
  std::vector<std::pair<int64_t, int64_t>> runs;
  std::vector<int32_t> run_group;
  DSJAX_RETURN_IF_ERROR(ContiguousRuns(op, static_cast<const int32_t*>(m_indices.untyped_data()),
                                       m, groups, &runs, &run_group));
  const bool bf16 = d->element_type() == ffi::DataType::BF16;
  const int64_t kb = CeilDiv(k, kGroup), nb = CeilDiv(n, kGroup);
  std::vector<GemmProblem> problems;
  for (size_t i = 0; i < runs.size(); ++i) {
    auto [r0, r1] = runs[i];
    if (run_group[i] < 0) {
      ZeroRows(d->untyped_data(), bf16, r0, r1, n);
      continue;
    }
    const int64_t g = run_group[i];
    GemmProblem p;
    p.a = U8(a) + r0 * k, p.sa = F32(sa) + r0 * kb, p.lda = k, p.sa_ld = kb;
    p.b = U8(b) + g * n * k, p.sb = F32(sb) + g * nb * kb, p.ldb = k, p.sb_ld = kb;
    p.m = r1 - r0, p.n = n, p.k_begin = 0, p.k_end = k;
    p.d = static_cast<char*>(d->untyped_data()) + r0 * n * (bf16 ? 2 : 4), p.d_bf16 = bf16;
    problems.push_back(p);
  }
  RunProblems(pool, problems);
  return ffi::Error::Success();
}

// ---------------------------------------------------------------- m-grouped, masked layout
ffi::Error MaskedImpl(ffi::ThreadPool pool, ffi::AnyBuffer a, ffi::AnyBuffer sa, ffi::AnyBuffer b,
                      ffi::AnyBuffer sb, ffi::AnyBuffer masked_m, ffi::Result<ffi::AnyBuffer> d) {
  const char* op = "dsjax_deep_gemm_m_grouped_fp8_gemm_nt_masked";
  GemmDims dims;
  DSJAX_RETURN_IF_ERROR(CheckMaskedShapes(op, a, sa, b, sb, masked_m, *d, &dims));
  const int64_t m_max = dims.m, n = dims.n, k = dims.k, groups = dims.groups;
  const int32_t* mm = static_cast<const int32_t*>(masked_m.untyped_data());
  DSJAX_RETURN_IF_ERROR(CheckMaskedM(op, mm, groups, m_max));
  const bool bf16 = d->element_type() == ffi::DataType::BF16;
  const int64_t kb = CeilDiv(k, kGroup), nb = CeilDiv(n, kGroup);
  std::vector<GemmProblem> problems;
  for (int64_t g = 0; g < groups; ++g) {
    ZeroRows(d->untyped_data(), bf16, g * m_max + mm[g], (g + 1) * m_max, n);
    if (mm[g] == 0) continue;
    GemmProblem p;
    p.a = U8(a) + g * m_max * k, p.sa = F32(sa) + g * m_max * kb, p.lda = k, p.sa_ld = kb;
    p.b = U8(b) + g * n * k, p.sb = F32(sb) + g * nb * kb, p.ldb = k, p.sb_ld = kb;
    p.m = mm[g], p.n = n, p.k_begin = 0, p.k_end = k;
    p.d = static_cast<char*>(d->untyped_data()) + g * m_max * n * (bf16 ? 2 : 4), p.d_bf16 = bf16;
    problems.push_back(p);
  }
  RunProblems(pool, problems);
  return ffi::Error::Success();
}

// ---------------------------------------------------------------- k-grouped (weight gradient)
ffi::Error KGroupedImpl(ffi::ThreadPool pool, ffi::AnyBuffer a, ffi::AnyBuffer sa,
                        ffi::AnyBuffer b, ffi::AnyBuffer sb, ffi::AnyBuffer group_ks,
                        ffi::AnyBuffer c, ffi::Result<ffi::AnyBuffer> d, bool has_c) {
  const char* op = "dsjax_deep_gemm_k_grouped_fp8_gemm_nt_contiguous";
  GemmDims dims;
  DSJAX_RETURN_IF_ERROR(CheckKGroupedShapes(op, a, sa, b, sb, group_ks, c, *d, has_c, &dims));
  const int64_t m = dims.m, n = dims.n, k = dims.k, groups = dims.groups;
  const int32_t* ks = static_cast<const int32_t*>(group_ks.untyped_data());
  DSJAX_RETURN_IF_ERROR(CheckGroupKs(op, ks, groups, k));
  const int64_t kb = CeilDiv(k, kGroup);
  std::vector<GemmProblem> problems;
  int64_t k0 = 0;
  for (int64_t g = 0; g < groups; ++g) {
    GemmProblem p;
    p.a = U8(a), p.sa = F32(sa), p.lda = k, p.sa_ld = kb;
    p.b = U8(b), p.sb = F32(sb), p.ldb = k, p.sb_ld = kb, p.b_per_row = true;
    p.m = m, p.n = n, p.k_begin = k0, p.k_end = k0 + ks[g];
    p.c = has_c ? F32(c) + g * m * n : nullptr;
    p.d = static_cast<float*>(d->untyped_data()) + g * m * n, p.d_bf16 = false;
    problems.push_back(p);
    k0 += ks[g];
  }
  RunProblems(pool, problems);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(Fp8GemmNtCpu, DenseImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<bool>("b_per_row")
                                  .Attr<bool>("has_c"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(MGroupedContiguousCpu, ContiguousImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(MGroupedMaskedCpu, MaskedImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(KGroupedContiguousCpu, KGroupedImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<bool>("has_c"));

DSJAX_REGISTER_FFI("dsjax_deep_gemm_fp8_gemm_nt", Fp8GemmNtCpu);
DSJAX_REGISTER_FFI("dsjax_deep_gemm_m_grouped_fp8_gemm_nt_contiguous", MGroupedContiguousCpu);
DSJAX_REGISTER_FFI("dsjax_deep_gemm_m_grouped_fp8_gemm_nt_masked", MGroupedMaskedCpu);
DSJAX_REGISTER_FFI("dsjax_deep_gemm_k_grouped_fp8_gemm_nt_contiguous", KGroupedContiguousCpu);

}  // namespace dsjax::deep_gemm
