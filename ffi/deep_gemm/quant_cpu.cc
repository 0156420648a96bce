// CPU twin of DeepGEMM's FP8 quantizers (per_token_cast_to_fp8 / per_block_cast_to_fp8).
// Bit-identical to dsjax/deep_gemm/reference.py: amax in f32, scale = max(amax, 1e-4) / 448
// (optionally rounded up to a power of two), q = e4m3fn(clip(x * (1 / scale))) with round-to-nearest-even.
// Rows (per-token) or 128-row blocks (per-block) are spread over XLA's intra-op thread pool.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "common/dtypes.h"
#include "common/ffi_common.h"
#include "common/fp8.h"
#include "common/parallel.h"
#include "common/registry.h"
#include "deep_gemm/quant_common.h"

namespace dsjax::deep_gemm {
namespace {

// The two inner loops over one group, written for the vectorizer and compiled for AVX2 too
// (picked at load time), since the kernel is bound by these element-wise passes.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define DSJAX_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define DSJAX_CLONES
#endif

// |v| max over a group, NaN-propagating: for non-NaN floats the order of |v|'s bit patterns as
// integers is the order of the values, and every NaN pattern is above +inf, so an integer max
// (which vectorizes, unlike a NaN-aware float max) gives the amax, or a NaN if there is one.
DSJAX_CLONES float GroupAmax(const float* __restrict__ v, int64_t len, float amax) {
  int32_t m = static_cast<int32_t>(FloatBits(amax) & 0x7FFFFFFFu);
  for (int64_t j = 0; j < len; ++j) {
    int32_t b;
    std::memcpy(&b, v + j, 4);
    b &= 0x7FFFFFFF;
    m = b > m ? b : m;
  }
  return BitsFloat(static_cast<uint32_t>(m));
}

DSJAX_CLONES void GroupQuantize(const float* __restrict__ v, int64_t len, float inv,
                                uint8_t* __restrict__ out) {
  for (int64_t j = 0; j < len; ++j) out[j] = FloatToE4M3(v[j] * inv);
}

template <typename Load>
inline void LoadGroup(Load load, int64_t base, int64_t len, float* __restrict__ buf) {
  for (int64_t j = 0; j < len; ++j) buf[j] = load(base + j);
}

template <typename Load>
void PerTokenRows(Load load, uint8_t* q, float* scales, int64_t row_begin, int64_t row_end,
                  int64_t k, bool ue8m0) {
  const int64_t groups = CeilDiv(k, kGroup);
  alignas(64) float buf[kGroup];
  for (int64_t r = row_begin; r < row_end; ++r) {
    const int64_t base = r * k;
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t c0 = g * kGroup;
      const int64_t len = std::min(kGroup, k - c0);
      LoadGroup(load, base + c0, len, buf);
      const float s = ScaleFromAmax(GroupAmax(buf, len, 0.0f), ue8m0);
      scales[r * groups + g] = s;
      // DeepGEMM multiplies by the reciprocal of the scale; so do we, bit for bit.
      GroupQuantize(buf, len, 1.0f / s, q + base + c0);
    }
  }
}

template <typename Load>
void PerBlockRowBlocks(Load load, uint8_t* q, float* scales, int64_t blk_begin, int64_t blk_end,
                       int64_t m, int64_t n, bool ue8m0) {
  const int64_t mb = CeilDiv(m, kGroup), nb = CeilDiv(n, kGroup);
  std::vector<float> amax(nb), inv(nb), row_buf(n);
  for (int64_t blk = blk_begin; blk < blk_end; ++blk) {
    const int64_t b = blk / mb, i = blk % mb;
    const int64_t r0 = i * kGroup, r1 = std::min(m, r0 + kGroup);
    const int64_t batch_off = b * m * n;
    std::fill(amax.begin(), amax.end(), 0.0f);
    for (int64_t r = r0; r < r1; ++r) {
      LoadGroup(load, batch_off + r * n, n, row_buf.data());
      for (int64_t j = 0; j < nb; ++j) {
        const int64_t c0 = j * kGroup;
        amax[j] = GroupAmax(row_buf.data() + c0, std::min(kGroup, n - c0), amax[j]);
      }
    }
    float* srow = scales + (b * mb + i) * nb;
    for (int64_t j = 0; j < nb; ++j) {
      srow[j] = ScaleFromAmax(amax[j], ue8m0);
      inv[j] = 1.0f / srow[j];
    }
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t row = batch_off + r * n;
      LoadGroup(load, row, n, row_buf.data());
      for (int64_t j = 0; j < nb; ++j) {
        const int64_t c0 = j * kGroup;
        GroupQuantize(row_buf.data() + c0, std::min(kGroup, n - c0), inv[j], q + row + c0);
      }
    }
  }
}

template <template <typename> class Kernel, typename... Args>
void DispatchLoad(ffi::DataType t, const void* data, Args&&... args) {
  switch (t) {
    case ffi::DataType::F32:
      Kernel<LoadF32>::Run(LoadF32{static_cast<const float*>(data)}, args...);
      break;
    case ffi::DataType::BF16:
      Kernel<LoadBF16>::Run(LoadBF16{static_cast<const uint16_t*>(data)}, args...);
      break;
    default:  // F16; the dtype was checked before.
      Kernel<LoadF16>::Run(LoadF16{static_cast<const uint16_t*>(data)}, args...);
      break;
  }
}

template <typename Load>
struct PerTokenKernel {
  static void Run(Load load, ffi::ThreadPool& pool, uint8_t* q, float* s, int64_t rows, int64_t k,
                  bool ue8m0) {
    // ~16K elements per chunk keeps the scheduling overhead small.
    int64_t min_rows = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, k));
    ParallelFor(pool, rows, min_rows, [&](int64_t b, int64_t e) {
      PerTokenRows(load, q, s, b, e, k, ue8m0);
    });
  }
};

template <typename Load>
struct PerBlockKernel {
  static void Run(Load load, ffi::ThreadPool& pool, uint8_t* q, float* s, int64_t batch, int64_t m,
                  int64_t n, bool ue8m0) {
    int64_t blocks = batch * CeilDiv(m, kGroup);
    ParallelFor(pool, blocks, 1, [&](int64_t b, int64_t e) {
      PerBlockRowBlocks(load, q, s, b, e, m, n, ue8m0);
    });
  }
};

ffi::Error PerTokenCastImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> q,
                            ffi::Result<ffi::AnyBuffer> scales, bool use_ue8m0) {
  QuantShape shape;
  DSJAX_RETURN_IF_ERROR(PerTokenShape(x, *q, *scales, &shape));
  if (shape.batch * shape.cols == 0) return ffi::Error::Success();
  DispatchLoad<PerTokenKernel>(x.element_type(), x.untyped_data(), pool,
                               static_cast<uint8_t*>(q->untyped_data()),
                               static_cast<float*>(scales->untyped_data()), shape.batch, shape.cols,
                               use_ue8m0);
  return ffi::Error::Success();
}

ffi::Error PerBlockCastImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> q,
                            ffi::Result<ffi::AnyBuffer> scales, bool use_ue8m0) {
  QuantShape shape;
  DSJAX_RETURN_IF_ERROR(PerBlockShape(x, *q, *scales, &shape));
  if (shape.batch * shape.rows * shape.cols == 0) return ffi::Error::Success();
  DispatchLoad<PerBlockKernel>(x.element_type(), x.untyped_data(), pool,
                               static_cast<uint8_t*>(q->untyped_data()),
                               static_cast<float*>(scales->untyped_data()), shape.batch, shape.rows,
                               shape.cols, use_ue8m0);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(PerTokenCastToFp8Cpu, PerTokenCastImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<bool>("use_ue8m0"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(PerBlockCastToFp8Cpu, PerBlockCastImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<bool>("use_ue8m0"));

DSJAX_REGISTER_FFI("dsjax_deep_gemm_per_token_cast_to_fp8", PerTokenCastToFp8Cpu);
DSJAX_REGISTER_FFI("dsjax_deep_gemm_per_block_cast_to_fp8", PerBlockCastToFp8Cpu);

}  // namespace dsjax::deep_gemm
