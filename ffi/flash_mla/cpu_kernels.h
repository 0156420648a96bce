// The per-block compute of the CPU twin of FlashMLA decoding, in two flavours:
//   Generic:   float32 everywhere (any x86-64 / AArch64 compiler target).
//   Avx512Bf16: VDPBF16PS for both products (Q·Kᵀ and P·V, float32 accumulation); Q and K are
//              bf16 already, P is split into hi + lo bf16 terms (see UpdateO).
// Each provides PrepareQ / PrepareBlock (repacking), Scores (S = Q·Kᵀ for one block of up to 64
// keys and all m query rows of a (request, KV head)), Softmax (the online-softmax step) and UpdateO
// (O = O·alpha + P·V); decode_cpu.cc drives them. The AVX-512 flavour exists on x86-64 builds
// only and is chosen at run time when the CPU has AVX512-BF16.
// Layouts (per thread, reused across blocks):
//   q16  bf16 [m_pad][576]      kb16 bf16 [64][576] (zero rows past the block's last key)
//   o    f32  [m_pad][512]      s    f32  [m_pad][64]
#pragma once

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define DSJAX_MLA_HAVE_AVX512 1
#include <immintrin.h>
#else
#define DSJAX_MLA_HAVE_AVX512 0
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "common/dtypes.h"
#include "flash_mla/mla_common.h"

namespace dsjax::flash_mla {

inline uint16_t FloatToBf16(float x) {
  uint32_t b = FloatBits(x);
  if ((b & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((b >> 16) | 0x40u);  // quiet NaN
  b += 0x7FFFu + ((b >> 16) & 1u);
  return static_cast<uint16_t>(b >> 16);
}

struct Scratch {
  std::vector<uint16_t> q16, kb16;
  std::vector<float> qf, kf, o, s, p, m, l;
  std::vector<uint32_t> kp, vp, pb;
  void Reserve(int64_t m_pad) {
    q16.resize(m_pad * kDQk);
    kb16.resize(kBlockN * kDQk);
    o.resize(m_pad * kDV);
    s.resize(m_pad * kBlockN);
    m.resize(m_pad);
    l.resize(m_pad);
  }
};

// ---------------------------------------------------------------- generic float32 path
// Written so that the compiler vectorizes without reassociating sums (16 independent partial
// sums per dot product), and cloned for AVX2+FMA on x86-64 GCC builds (the module itself is built
// for the baseline ISA).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define DSJAX_GENERIC_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define DSJAX_GENERIC_CLONES
#endif

DSJAX_GENERIC_CLONES inline void GenericScores(Scratch& w, int64_t m_pad, int64_t nk) {
  for (int64_t r = 0; r < m_pad; ++r) {
    const float* q = &w.qf[r * kDQk];
    for (int64_t n = 0; n < nk; ++n) {
      const float* k = &w.kf[n * kDQk];
      float part[16] = {0.f};
      for (int d = 0; d < kDQk; d += 16)
        for (int l = 0; l < 16; ++l) part[l] += q[d + l] * k[d + l];
      float acc = 0.f;
      for (int l = 0; l < 16; ++l) acc += part[l];
      w.s[r * kBlockN + n] = acc;
    }
  }
}

DSJAX_GENERIC_CLONES inline void GenericUpdateO(Scratch& w, const float* alpha, int64_t m_pad,
                                                int64_t nk) {
  for (int64_t r = 0; r < m_pad; ++r) {
    float* o = &w.o[r * kDV];
    const float a = alpha[r];
    for (int c = 0; c < kDV; ++c) o[c] *= a;
    for (int64_t n = 0; n < nk; ++n) {
      const float pn = w.p[r * kBlockN + n];
      if (pn == 0.f) continue;
      const float* v = &w.kf[n * kDQk];
      for (int c = 0; c < kDV; ++c) o[c] += pn * v[c];
    }
  }
}

struct GenericKernel {
  static void PrepareQ(Scratch& w, int64_t m_pad) {
    w.qf.resize(m_pad * kDQk);
    for (int64_t i = 0; i < m_pad * kDQk; ++i) w.qf[i] = Bf16BitsToFloat(w.q16[i]);
  }
  static void PrepareBlock(Scratch& w) {
    w.kf.resize(kBlockN * kDQk);
    for (int64_t i = 0; i < kBlockN * kDQk; ++i) w.kf[i] = Bf16BitsToFloat(w.kb16[i]);
  }
  static void Scores(Scratch& w, int64_t m_pad, int64_t nk) { GenericScores(w, m_pad, nk); }
  // Online-softmax step over one block: rows see keys [0, nvalid[r]) of it. Updates the running
  // max m (log2 domain) and sum l, writes p (0 for unseen keys) and the rescale factor alpha.
  static void Softmax(Scratch& w, const int* nvalid, float scale_log2, float* alpha, int64_t m_pad) {
    w.p.resize(m_pad * kBlockN);
    for (int64_t r = 0; r < m_pad; ++r) {
      const float* s = &w.s[r * kBlockN];
      float* p = &w.p[r * kBlockN];
      const int nv = nvalid[r];
      float mx = -INFINITY;
      for (int n = 0; n < nv; ++n) mx = std::max(mx, s[n] * scale_log2);
      const float m_old = w.m[r];
      const float m_new = std::max(m_old, mx);
      const float m_use = m_new == -INFINITY ? 0.f : m_new;
      alpha[r] = m_old == -INFINITY ? (m_new == -INFINITY ? 1.f : 0.f) : std::exp2(m_old - m_new);
      float sum = 0.f;
      for (int n = 0; n < kBlockN; ++n) {
        p[n] = n < nv ? std::exp2(s[n] * scale_log2 - m_use) : 0.f;
        sum += p[n];
      }
      w.l[r] = w.l[r] * alpha[r] + sum;
      w.m[r] = m_new;
    }
  }
  // o[r] = o[r] * alpha[r] + p[r] · V, p float32 [m_pad][64].
  static void UpdateO(Scratch& w, const float* alpha, int64_t m_pad, int64_t nk) {
    GenericUpdateO(w, alpha, m_pad, nk);
  }
};

// ---------------------------------------------------------------- AVX-512 BF16 path
#if DSJAX_MLA_HAVE_AVX512
#define DSJAX_AVX512BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))

DSJAX_AVX512BF16 inline __m512 Exp2Ps(__m512 x) {
  // 2^x = 2^n · 2^f with n = round(x), f in [-0.5, 0.5]; degree-7 Taylor of e^(f ln2) is accurate
  // to ~5e-9 relative there. The clamp turns -inf (masked scores) into an exact 0 via scalef.
  x = _mm512_max_ps(x, _mm512_set1_ps(-200.f));
  __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 f = _mm512_mul_ps(_mm512_sub_ps(x, n), _mm512_set1_ps(0.6931471805599453f));
  __m512 p = _mm512_set1_ps(1.f / 5040.f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 720.f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 120.f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 24.f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 6.f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

// dst[j * dst_stride + i] = src[i * src_stride + j] for a 16x16 block of 32-bit words.
DSJAX_AVX512BF16 inline void Transpose16x16(const uint32_t* src, int64_t src_stride, uint32_t* dst,
                                            int64_t dst_stride) {
  __m512i r[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_si512(src + i * src_stride);
  // u[c][g]: column c, c+4, c+8, c+12 (one per 128-bit lane) of rows 4g..4g+3.
  __m512i u[4][4];
  for (int g = 0; g < 4; ++g) {
    const __m512i ta = _mm512_unpacklo_epi32(r[4 * g], r[4 * g + 1]);
    const __m512i tb = _mm512_unpackhi_epi32(r[4 * g], r[4 * g + 1]);
    const __m512i tc = _mm512_unpacklo_epi32(r[4 * g + 2], r[4 * g + 3]);
    const __m512i td = _mm512_unpackhi_epi32(r[4 * g + 2], r[4 * g + 3]);
    u[0][g] = _mm512_unpacklo_epi64(ta, tc);
    u[1][g] = _mm512_unpackhi_epi64(ta, tc);
    u[2][g] = _mm512_unpacklo_epi64(tb, td);
    u[3][g] = _mm512_unpackhi_epi64(tb, td);
  }
  for (int c = 0; c < 4; ++c) {
    const __m512i v0 = _mm512_shuffle_i32x4(u[c][0], u[c][1], 0x88);  // cols c, c+8
    const __m512i v1 = _mm512_shuffle_i32x4(u[c][0], u[c][1], 0xDD);  // cols c+4, c+12
    const __m512i v2 = _mm512_shuffle_i32x4(u[c][2], u[c][3], 0x88);
    const __m512i v3 = _mm512_shuffle_i32x4(u[c][2], u[c][3], 0xDD);
    _mm512_storeu_si512(dst + c * dst_stride, _mm512_shuffle_i32x4(v0, v2, 0x88));
    _mm512_storeu_si512(dst + (c + 8) * dst_stride, _mm512_shuffle_i32x4(v0, v2, 0xDD));
    _mm512_storeu_si512(dst + (c + 4) * dst_stride, _mm512_shuffle_i32x4(v1, v3, 0x88));
    _mm512_storeu_si512(dst + (c + 12) * dst_stride, _mm512_shuffle_i32x4(v1, v3, 0xDD));
  }
}

struct Avx512Bf16Kernel {
  static void PrepareQ(Scratch&, int64_t) {}

  // kp[t][n] = the bf16 pair (k[n][2t], k[n][2t+1]).
  // vp[c / 64][t][c % 64] = (k[2t][c], k[2t+1][c]): each 64-channel tile is one contiguous 8 KB
  // run (a [t][512] layout puts its rows 2 KB apart, all in the same few L1 sets).
  DSJAX_AVX512BF16 static void PrepareBlock(Scratch& w) {
    constexpr int kPairs = kDQk / 2;  // 288
    w.kp.resize(kPairs * kBlockN);
    w.vp.resize((kBlockN / 2) * kDV);
    const uint32_t* k32 = reinterpret_cast<const uint32_t*>(w.kb16.data());
    // 16x16 transposes of 32-bit words in registers.
    for (int n0 = 0; n0 < kBlockN; n0 += 16)
      for (int t0 = 0; t0 < kPairs; t0 += 16)
        Transpose16x16(k32 + n0 * kPairs + t0, kPairs, &w.kp[t0 * kBlockN + n0], kBlockN);
    const __m512i lo_idx = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8,
                                            39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
    const __m512i hi_idx = _mm512_set_epi16(63, 31, 62, 30, 61, 29, 60, 28, 59, 27, 58, 26, 57, 25, 56, 24,
                                            55, 23, 54, 22, 53, 21, 52, 20, 51, 19, 50, 18, 49, 17, 48, 16);
    for (int t = 0; t < kBlockN / 2; ++t) {
      const uint16_t* a = &w.kb16[(2 * t) * kDQk];
      const uint16_t* b = &w.kb16[(2 * t + 1) * kDQk];
      for (int c = 0; c < kDV; c += 32) {
        uint32_t* dst = &w.vp[((c / 64) * (kBlockN / 2) + t) * 64 + c % 64];
        __m512i va = _mm512_loadu_si512(a + c), vb = _mm512_loadu_si512(b + c);
        _mm512_storeu_si512(dst, _mm512_permutex2var_epi16(va, lo_idx, vb));
        _mm512_storeu_si512(dst + 16, _mm512_permutex2var_epi16(va, hi_idx, vb));
      }
    }
  }

  // S = Q·Kᵀ in tiles of 8 rows x 32 keys (16 accumulators); the 32-key half of kp (36 KB) is
  // the outer loop so it stays close to L1 while all row tiles stream past it.
  DSJAX_AVX512BF16 static void Scores(Scratch& w, int64_t m_pad, int64_t nk) {
    constexpr int kPairs = kDQk / 2;
    const uint32_t* q32 = reinterpret_cast<const uint32_t*>(w.q16.data());
    const int halves = static_cast<int>((nk + 31) / 32);
    for (int half = 0; half < 2; ++half) {
      if (half >= halves) {  // keys never loaded: scores 0 (masked by the caller)
        for (int64_t r = 0; r < m_pad; ++r)
          std::memset(&w.s[r * kBlockN + 32 * half], 0, 32 * sizeof(float));
        continue;
      }
      for (int64_t r = 0; r < m_pad; r += 8) {
        __m512 acc[8][2];
        for (int i = 0; i < 8; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
        const uint32_t* q0 = q32 + r * kPairs;
        for (int t = 0; t < kPairs; ++t) {
          const uint32_t* kt = &w.kp[t * kBlockN + 32 * half];
          const __m512bh k0 = (__m512bh)_mm512_loadu_si512(kt);
          const __m512bh k1 = (__m512bh)_mm512_loadu_si512(kt + 16);
          for (int i = 0; i < 8; ++i) {
            const __m512bh qb = (__m512bh)_mm512_set1_epi32(static_cast<int>(q0[i * kPairs + t]));
            acc[i][0] = _mm512_dpbf16_ps(acc[i][0], qb, k0);
            acc[i][1] = _mm512_dpbf16_ps(acc[i][1], qb, k1);
          }
        }
        for (int i = 0; i < 8; ++i) {
          _mm512_storeu_ps(&w.s[(r + i) * kBlockN + 32 * half], acc[i][0]);
          _mm512_storeu_ps(&w.s[(r + i) * kBlockN + 32 * half + 16], acc[i][1]);
        }
      }
    }
  }

  DSJAX_AVX512BF16 static void Softmax(Scratch& w, const int* nvalid, float scale_log2, float* alpha,
                                       int64_t m_pad) {
    w.p.resize(m_pad * kBlockN);
    const __m512 sc = _mm512_set1_ps(scale_log2), ninf = _mm512_set1_ps(-INFINITY);
    for (int64_t r = 0; r < m_pad; ++r) {
      const float* s = &w.s[r * kBlockN];
      float* p = &w.p[r * kBlockN];
      const int nv = nvalid[r];
      __m512 x[4];
      __mmask16 mk[4];
      __m512 vmax = ninf;
      for (int j = 0; j < 4; ++j) {
        int cnt = nv - 16 * j;
        cnt = cnt < 0 ? 0 : (cnt > 16 ? 16 : cnt);
        mk[j] = static_cast<__mmask16>((1u << cnt) - 1u);
        x[j] = _mm512_mask_mov_ps(ninf, mk[j], _mm512_mul_ps(_mm512_loadu_ps(s + 16 * j), sc));
        vmax = _mm512_max_ps(vmax, x[j]);
      }
      const float mx = _mm512_reduce_max_ps(vmax);
      const float m_old = w.m[r];
      const float m_new = std::max(m_old, mx);
      const float m_use = m_new == -INFINITY ? 0.f : m_new;
      alpha[r] = m_old == -INFINITY ? (m_new == -INFINITY ? 1.f : 0.f) : std::exp2(m_old - m_new);
      const __m512 mu = _mm512_set1_ps(m_use);
      __m512 vsum = _mm512_setzero_ps();
      for (int j = 0; j < 4; ++j) {
        __m512 e = _mm512_maskz_mov_ps(mk[j], Exp2Ps(_mm512_sub_ps(x[j], mu)));
        _mm512_storeu_ps(p + 16 * j, e);
        vsum = _mm512_add_ps(vsum, e);
      }
      w.l[r] = w.l[r] * alpha[r] + _mm512_reduce_add_ps(vsum);
      w.m[r] = m_new;
    }
  }

  // o[r] = o[r] * alpha[r] + p[r] · V with p split into two bf16 terms, p ≈ hi + lo (relative
  // error 2^-17), so the product keeps float32-level accuracy at twice the bf16 work. (FlashMLA
  // rounds P to one bf16; that alone costs up to ~3e-3 absolute against a float32 reference on
  // peaked softmaxes, above the tolerance we promise.)
  DSJAX_AVX512BF16 static void UpdateO(Scratch& w, const float* alpha, int64_t m_pad, int64_t nk) {
    constexpr int kTP = kBlockN / 2;
    w.pb.resize(2 * m_pad * kTP);
    for (int64_t r = 0; r < m_pad; ++r) {
      const float* p = &w.p[r * kBlockN];
      for (int j = 0; j < kBlockN; j += 32) {
        __m512 p0 = _mm512_loadu_ps(p + j), p1 = _mm512_loadu_ps(p + j + 16);
        __m512bh hi = _mm512_cvtne2ps_pbh(p1, p0);
        __m512i hii = (__m512i)hi;
        __m512 h0 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(hii)), 16));
        __m512 h1 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(hii, 1)), 16));
        __m512bh lo = _mm512_cvtne2ps_pbh(_mm512_sub_ps(p1, h1), _mm512_sub_ps(p0, h0));
        _mm512_storeu_si512(&w.pb[(2 * r) * kTP + j / 2], hii);
        _mm512_storeu_si512(&w.pb[(2 * r + 1) * kTP + j / 2], (__m512i)lo);
      }
    }
    const int tp = static_cast<int>((nk + 1) / 2);  // key pairs actually present
    // Channel tiles outside: one tile's V pairs (32 x 64 x 4 B = 8 KB) stay in L1 for all rows.
    for (int c = 0; c < kDV; c += 64) {
      for (int64_t r = 0; r < m_pad; r += 4) {
        const uint32_t* pr = &w.pb[(2 * r) * kTP];
        __m512 acc[4][4];
        for (int i = 0; i < 4; ++i) {
          const __m512 ai = _mm512_set1_ps(alpha[r + i]);
          for (int j = 0; j < 4; ++j)
            acc[i][j] = _mm512_mul_ps(_mm512_loadu_ps(&w.o[(r + i) * kDV + c + 16 * j]), ai);
        }
        for (int t = 0; t < tp; ++t) {
          const uint32_t* vt = &w.vp[((c / 64) * (kBlockN / 2) + t) * 64];
          __m512bh v0 = (__m512bh)_mm512_loadu_si512(vt), v1 = (__m512bh)_mm512_loadu_si512(vt + 16);
          __m512bh v2 = (__m512bh)_mm512_loadu_si512(vt + 32), v3 = (__m512bh)_mm512_loadu_si512(vt + 48);
          for (int i = 0; i < 4; ++i) {
            __m512bh ph = (__m512bh)_mm512_set1_epi32(static_cast<int>(pr[(2 * i) * kTP + t]));
            __m512bh pl = (__m512bh)_mm512_set1_epi32(static_cast<int>(pr[(2 * i + 1) * kTP + t]));
            acc[i][0] = _mm512_dpbf16_ps(acc[i][0], ph, v0);
            acc[i][1] = _mm512_dpbf16_ps(acc[i][1], ph, v1);
            acc[i][2] = _mm512_dpbf16_ps(acc[i][2], ph, v2);
            acc[i][3] = _mm512_dpbf16_ps(acc[i][3], ph, v3);
            acc[i][0] = _mm512_dpbf16_ps(acc[i][0], pl, v0);
            acc[i][1] = _mm512_dpbf16_ps(acc[i][1], pl, v1);
            acc[i][2] = _mm512_dpbf16_ps(acc[i][2], pl, v2);
            acc[i][3] = _mm512_dpbf16_ps(acc[i][3], pl, v3);
          }
        }
        for (int i = 0; i < 4; ++i)
          for (int j = 0; j < 4; ++j) _mm512_storeu_ps(&w.o[(r + i) * kDV + c + 16 * j], acc[i][j]);
      }
    }
  }
};

#endif  // DSJAX_MLA_HAVE_AVX512

inline bool CpuHasAvx512Bf16() {
#if DSJAX_MLA_HAVE_AVX512
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

}  // namespace dsjax::flash_mla
