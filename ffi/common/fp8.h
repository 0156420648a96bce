// FP8 E4M3FN encoding and the scale rules of DeepSeek's quantizers, shared by the CPU twin and the
// CUDA kernels so that both produce the same bytes as the pure-JAX reference.
//
// E4M3FN: 1 sign, 4 exponent (bias 7), 3 mantissa bits; no infinities; max finite 448 (0x7E);
// NaN is S.1111.111; smallest normal 2^-6, subnormals step 2^-9.
#pragma once

#include <cstdint>
#include <cstring>

#ifdef __CUDACC__
#define DSJAX_HD __host__ __device__ __forceinline__
#else
#define DSJAX_HD inline
#endif

namespace dsjax {

constexpr float kFp8E4M3Max = 448.0f;
constexpr float kAmaxClamp = 1e-4f;  // DeepGEMM clamps each group's amax below at 1e-4.

DSJAX_HD uint32_t FloatBits(float x) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(x);
#else
  uint32_t b;
  std::memcpy(&b, &x, 4);
  return b;
#endif
}

DSJAX_HD float BitsFloat(uint32_t b) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(b);
#else
  float x;
  std::memcpy(&x, &b, 4);
  return x;
#endif
}

// Round-to-nearest-even f32 -> E4M3FN, saturating to +-448; NaN -> NaN (sign kept).
// Branch-free, in int32 and float ops only, so that the CPU compiler vectorizes it.
DSJAX_HD uint8_t FloatToE4M3(float x) {
  const int32_t bits = static_cast<int32_t>(FloatBits(x));
  const int32_t sign = (bits >> 24) & 0x80;
  const int32_t abs_bits = bits & 0x7FFFFFFF;
  // Selects are written as masks (all ones / zero) so that the loop has no control flow.
  const int32_t nan_mask = -static_cast<int32_t>(abs_bits > 0x7F800000);
  // Saturate first: everything at or above 448 (including +inf) becomes 448 (0x43E00000).
  const int32_t sat_mask = -static_cast<int32_t>(abs_bits < 0x43E00000);
  const int32_t a_bits = (abs_bits & sat_mask) | (0x43E00000 & ~sat_mask);
  // Subnormal range (< 2^-6): |x| / 2^-9 rounded to nearest even. Scaling by 512 is exact, and
  // adding then subtracting 1.5 * 2^23 rounds a float in [0, 2^22) to an integer, ties to even.
  const float scaled = BitsFloat(static_cast<uint32_t>(a_bits)) * 512.0f;
  const float rounded = (scaled + 12582912.0f) - 12582912.0f;
  const int32_t sub = static_cast<int32_t>(rounded);  // 0..8; 8 is the smallest normal, 0x08
  // Normal range: drop 20 mantissa bits with round-to-nearest-even, then rebias 127 -> 7.
  const int32_t r = a_bits + 0x7FFFF + ((a_bits >> 20) & 1);
  const int32_t normal = (((r >> 23) - 120) << 3) | ((r >> 20) & 7);
  const int32_t sub_mask = -static_cast<int32_t>(a_bits < 0x3C800000);  // 2^-6
  int32_t code = (sub & sub_mask) | (normal & ~sub_mask);
  code = (0x7F & nan_mask) | (code & ~nan_mask);
  return static_cast<uint8_t>(sign | code);
}

DSJAX_HD float E4M3ToFloat(uint8_t v) {
  uint32_t sign = (v & 0x80u) << 24;
  uint32_t e = (v >> 3) & 0xFu, m = v & 7u;
  if (e == 0xF && m == 7) return BitsFloat(sign | 0x7FC00000u);
  float mag = e == 0 ? static_cast<float>(m) * (1.0f / 512.0f)
                     : BitsFloat(((e + 120u) << 23) | (m << 20));
  return BitsFloat(FloatBits(mag) | sign);
}

// Rounds a positive scale up to a power of two (UE8M0), exactly: 2^ceil(log2(s)).
DSJAX_HD float CeilToUE8M0(float s) {
  uint32_t b = FloatBits(s);
  uint32_t e = (b >> 23) & 0xFFu;
  if (e == 0xFFu) return s;  // NaN / inf pass through
  uint32_t up = (b & 0x7FFFFFu) != 0 ? 1u : 0u;
  return BitsFloat((e + up) << 23);
}

// The scale of one group from its amax: clamp, divide by 448, optionally round up to UE8M0.
DSJAX_HD float ScaleFromAmax(float amax, bool use_ue8m0) {
  // NaN must survive the clamp: (NaN < c) is false, so NaN stays NaN.
  float clamped = amax < kAmaxClamp ? kAmaxClamp : amax;
  float s = clamped / kFp8E4M3Max;
  return use_ue8m0 ? CeilToUE8M0(s) : s;
}

}  // namespace dsjax
