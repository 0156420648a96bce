// Loading bf16 / f16 / f32 elements as f32, exactly, on host and device.
#pragma once

#include <cstdint>

#include "common/fp8.h"

namespace dsjax {

DSJAX_HD float Bf16BitsToFloat(uint16_t h) { return BitsFloat(static_cast<uint32_t>(h) << 16); }

// IEEE binary16 -> binary32, exact (normals, subnormals, inf, NaN).
DSJAX_HD float F16BitsToFloat(uint16_t h) {
  uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t e = (h >> 10) & 0x1Fu, m = h & 0x3FFu;
  uint32_t bits;
  if (e == 0x1F) {
    bits = sign | 0x7F800000u | (m << 13);
  } else if (e != 0) {
    bits = sign | ((e + 112u) << 23) | (m << 13);
  } else {
    // Subnormal or zero: m * 2^-24, exact in f32.
    float v = static_cast<float>(m) * (1.0f / 16777216.0f);
    bits = sign | FloatBits(v);
  }
  return BitsFloat(bits);
}

struct LoadF32 {
  const float* p;
  DSJAX_HD float operator()(int64_t i) const { return p[i]; }
};
struct LoadBF16 {
  const uint16_t* p;
  DSJAX_HD float operator()(int64_t i) const { return Bf16BitsToFloat(p[i]); }
};
struct LoadF16 {
  const uint16_t* p;
  DSJAX_HD float operator()(int64_t i) const { return F16BitsToFloat(p[i]); }
};

}  // namespace dsjax
