// CRC-32 (IEEE 802.3, reflected polynomial 0xEDB88320), bit-identical to zlib's crc32(): the
// checksum FFRecord stores per sample and chains over its header. Slicing-by-8 (Intel's
// "slicing-by-N" scheme): eight 256-entry tables let the loop consume 8 bytes per step, which is
// several times the byte-at-a-time speed; it is the fallback when zlib is not found at build time.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

#if defined(DSJAX_IO_HAVE_ZLIB)
#include <zlib.h>
#endif
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#endif

namespace dsjax_io {

struct Crc32Tables {
  uint32_t t[8][256];
  Crc32Tables() {
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c & 1) ? (0xEDB88320u ^ (c >> 1)) : (c >> 1);
      t[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; ++i) {
      for (int s = 1; s < 8; ++s) t[s][i] = (t[s - 1][i] >> 8) ^ t[0][t[s - 1][i] & 0xFF];
    }
  }
};

inline const Crc32Tables& Crc32Table() {
  static const Crc32Tables tables;  // thread-safe initialisation (C++11 magic statics)
  return tables;
}

// The CRC register without zlib's pre/post inversion (Crc32Portable(crc) == ~Raw(~crc)).
inline uint32_t Crc32RawTable(uint32_t c, const uint8_t* data, size_t len) {
  const Crc32Tables& tb = Crc32Table();
  while (len > 0 && (reinterpret_cast<uintptr_t>(data) & 7) != 0) {
    c = tb.t[0][(c ^ *data++) & 0xFF] ^ (c >> 8);
    --len;
  }
  while (len >= 8) {
    uint32_t lo, hi;
    std::memcpy(&lo, data, 4);  // little-endian hosts only (x86-64, aarch64), as is FFRecord
    std::memcpy(&hi, data + 4, 4);
    lo ^= c;
    c = tb.t[7][lo & 0xFF] ^ tb.t[6][(lo >> 8) & 0xFF] ^ tb.t[5][(lo >> 16) & 0xFF] ^
        tb.t[4][lo >> 24] ^ tb.t[3][hi & 0xFF] ^ tb.t[2][(hi >> 8) & 0xFF] ^
        tb.t[1][(hi >> 16) & 0xFF] ^ tb.t[0][hi >> 24];
    data += 8;
    len -= 8;
  }
  while (len-- > 0) c = tb.t[0][(c ^ *data++) & 0xFF] ^ (c >> 8);
  return c;
}

// Continues a CRC: Crc32(Crc32(0, a), b) == Crc32(0, a + b), like zlib.crc32(b, crc32(a)).
inline uint32_t Crc32Portable(uint32_t crc, const uint8_t* data, size_t len) {
  return ~Crc32RawTable(~crc, data, len);
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define DSJAX_IO_HAVE_PCLMUL 1
// Carry-less-multiply folding (Intel, "Fast CRC Computation for Generic Polynomials Using
// PCLMULQDQ", 2009; the constants are those of Linux's crc32-pclmul for the reflected IEEE
// polynomial): four 128-bit lanes fold 64 bytes per step, then fold to 128, 64 and 32 bits with a
// Barrett reduction. Raw register in and out; len >= 64 and a multiple of 16.
__attribute__((target("pclmul,sse4.1"))) inline __m128i ClmulLoad(const uint8_t* p) {
  return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
}

// a(128 bits) * x^(fold distance) folded onto `next`: low half times k.low, high half times k.high.
__attribute__((target("pclmul,sse4.1"))) inline __m128i ClmulFold(__m128i a, __m128i k, __m128i next) {
  const __m128i hi = _mm_clmulepi64_si128(a, k, 0x11);
  const __m128i lo = _mm_clmulepi64_si128(a, k, 0x00);
  return _mm_xor_si128(_mm_xor_si128(lo, hi), next);
}

__attribute__((target("pclmul,sse4.1"))) inline uint32_t Crc32PclmulRaw(uint32_t crc, const uint8_t* buf,
                                                                         size_t len) {
  const __m128i k12 = _mm_set_epi64x(0x1c6e41596LL, 0x154442bd4LL);  // high: R2, low: R1
  const __m128i k34 = _mm_set_epi64x(0x0ccaa009eLL, 0x1751997d0LL);  // high: R4, low: R3
  const __m128i k5 = _mm_set_epi64x(0, 0x163cd6124LL);
  const __m128i poly = _mm_set_epi64x(0x1f7011641LL, 0x1db710641LL);  // high: mu, low: P
  const __m128i mask32 = _mm_set_epi32(0, 0, 0, -1);
  __m128i x1 = _mm_xor_si128(ClmulLoad(buf), _mm_cvtsi32_si128(static_cast<int>(crc)));
  __m128i x2 = ClmulLoad(buf + 16), x3 = ClmulLoad(buf + 32), x4 = ClmulLoad(buf + 48);
  buf += 64;
  len -= 64;
  while (len >= 64) {
    x1 = ClmulFold(x1, k12, ClmulLoad(buf));
    x2 = ClmulFold(x2, k12, ClmulLoad(buf + 16));
    x3 = ClmulFold(x3, k12, ClmulLoad(buf + 32));
    x4 = ClmulFold(x4, k12, ClmulLoad(buf + 48));
    buf += 64;
    len -= 64;
  }
  x1 = ClmulFold(x1, k34, x2);
  x1 = ClmulFold(x1, k34, x3);
  x1 = ClmulFold(x1, k34, x4);
  while (len >= 16) {
    x1 = ClmulFold(x1, k34, ClmulLoad(buf));
    buf += 16;
    len -= 16;
  }
  // 128 -> 64 bits (appending 32 zero bits), 64 -> 32, then Barrett reduction.
  __m128i t = _mm_clmulepi64_si128(x1, k34, 0x10);
  x1 = _mm_xor_si128(_mm_srli_si128(x1, 8), t);
  t = _mm_srli_si128(x1, 4);
  x1 = _mm_xor_si128(_mm_clmulepi64_si128(_mm_and_si128(x1, mask32), k5, 0x00), t);
  t = x1;
  x1 = _mm_clmulepi64_si128(_mm_and_si128(x1, mask32), poly, 0x10);
  x1 = _mm_clmulepi64_si128(_mm_and_si128(x1, mask32), poly, 0x00);
  return static_cast<uint32_t>(_mm_extract_epi32(_mm_xor_si128(x1, t), 1));
}

inline bool HavePclmul() {
  static const bool have = __builtin_cpu_supports("pclmul") && __builtin_cpu_supports("sse4.1");
  return have;
}

inline uint32_t Crc32Pclmul(uint32_t crc, const uint8_t* data, size_t len) {
  uint32_t c = ~crc;
  const size_t body = len >= 64 ? len & ~size_t{15} : 0;
  if (body) c = Crc32PclmulRaw(c, data, body);
  return ~Crc32RawTable(c, data + body, len - body);
}
#endif

// Fastest available: PCLMULQDQ folding on x86-64 CPUs that have it (all since 2010), else zlib's
// braided CRC (1.2.12+, about 2.5x slicing-by-8) when the build found zlib, else slicing-by-8.
inline uint32_t Crc32(uint32_t crc, const uint8_t* data, size_t len) {
#if defined(DSJAX_IO_HAVE_PCLMUL)
  if (HavePclmul()) return Crc32Pclmul(crc, data, len);
#endif
#if defined(DSJAX_IO_HAVE_ZLIB)
  return static_cast<uint32_t>(crc32_z(crc, data, len));
#else
  return Crc32Portable(crc, data, len);
#endif
}

}  // namespace dsjax_io
