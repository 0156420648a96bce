// CPU twin of FlashMLA's split-KV decoding kernel and its combine kernel (deepseek-ai/FlashMLA,
// csrc/kernels/splitkv_mla.cu and mla_combine.cu), driven by the same tile-scheduler metadata.
//
// Work items are (metadata part, KV head): each walks its request range from the metadata and, per
// request, streams the keys [k0, k1) in blocks of 64 through an online softmax for ALL s_q * g query
// rows of that KV head at once, so each cache row is read (and converted) once per KV head. A
// request covered by one part is written straight to out/lse; a split request writes normalized
// partial results to out_accum/lse_accum (row num_splits[r] + split), and the combine pass merges
// them by log-sum-exp. Garbage never leaks: block-table entries are clamped, key rows past the
// request's length are zero-filled instead of read, and unwritten accumulator rows have lse -inf.
#include <array>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>

#include "common/ffi_common.h"
#include "common/fp8.h"
#include "common/parallel.h"
#include "common/registry.h"
#include "flash_mla/cpu_kernels.h"
#include "flash_mla/mla_common.h"

namespace dsjax::flash_mla {
namespace {

constexpr float kLn2 = 0.6931471805599453f;
constexpr float kLog2e = 1.4426950408889634f;

struct Args {
  MlaShape s;
  const uint16_t* q;
  const uint8_t* kc;  // bytes
  const int32_t* bt;
  const int32_t* seqlens;
  const int32_t* meta;
  const int32_t* nsplits;
  uint16_t* out;
  float* lse;
  float* oacc;
  float* lacc;
  float scale_log2;
  bool causal;
};

// All 256 E4M3 codes decoded once (common/fp8.h's exact decoder), for the FP8 cache loads.
const float* E4M3Table() {
  static const auto table = [] {
    std::array<float, 256> t{};
    for (int i = 0; i < 256; ++i) t[i] = E4M3ToFloat(static_cast<uint8_t>(i));
    return t;
  }();
  return table.data();
}

// Copies (bf16) or dequantizes (FP8, rounded to bf16) key rows [k, k + n) of request r, KV head h
// into kb16 and zero-fills the rest of the 64-row block.
void LoadBlock(const Args& a, int64_t r, int64_t h, int64_t k, int64_t n, uint16_t* kb16) {
  const MlaShape& s = a.s;
  const int64_t row_bytes = s.fp8 ? kFp8RowBytes : 2 * kDQk;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t key = k + i;
    const int64_t blk = ClampBlock(a.bt[r * s.max_blocks + key / s.page], s.num_blocks);
    const uint8_t* src = a.kc + ((blk * s.page + key % s.page) * s.h_kv + h) * row_bytes;
    uint16_t* dst = kb16 + i * kDQk;
    if (!s.fp8) {
      std::memcpy(dst, src, 2 * kDQk);
      continue;
    }
    const float* lut = E4M3Table();
    for (int t = 0; t < kDV / kFp8Tile; ++t) {
      float scale;
      std::memcpy(&scale, src + kDV + 4 * t, 4);
      for (int j = 0; j < kFp8Tile; ++j)
        dst[t * kFp8Tile + j] = FloatToBf16(lut[src[t * kFp8Tile + j]] * scale);
    }
    std::memcpy(dst + kDV, src + kDV + 16, 2 * (kDQk - kDV));
  }
  if (n < kBlockN) std::memset(kb16 + n * kDQk, 0, (kBlockN - n) * kDQk * 2);
}

template <typename K>
void RunItem(const Args& a, Scratch& w, int64_t r, int64_t h, const WorkItem& it) {
  const MlaShape& s = a.s;
  const int64_t m = s.m, m_pad = (m + 7) / 8 * 8;  // the kernels' row tiles are 8 and 4
  w.Reserve(m_pad);
  // Gather this KV head's query rows: row = i * g + gi is query token i, head h * g + gi.
  for (int64_t row = 0; row < m_pad; ++row) {
    uint16_t* dst = &w.q16[row * kDQk];
    if (row >= m) {
      std::memset(dst, 0, 2 * kDQk);
      continue;
    }
    const int64_t i = row / s.g, gi = row % s.g;
    std::memcpy(dst, a.q + ((r * s.s_q + i) * s.h_q + h * s.g + gi) * kDQk, 2 * kDQk);
  }
  K::PrepareQ(w, m_pad);
  std::fill(w.o.begin(), w.o.begin() + m_pad * kDV, 0.f);
  std::fill(w.m.begin(), w.m.begin() + m_pad, -INFINITY);
  std::fill(w.l.begin(), w.l.begin() + m_pad, 0.f);
  std::vector<int> nvalid(m_pad);
  std::vector<float> alpha(m_pad);
  for (int64_t k = it.k0; k < it.k1; k += kBlockN) {
    const int64_t n = std::min<int64_t>(kBlockN, it.k1 - k);
    // Row limits: keys < it.k1 of this piece, and (causal) < s_k - s_q + i + 1.
    bool any = false;
    for (int64_t row = 0; row < m_pad; ++row) {
      int64_t lim = it.k1;
      if (row >= m) {
        lim = k;  // padding rows see nothing
      } else if (a.causal) {
        lim = std::min<int64_t>(lim, it.s_k - s.s_q + row / s.g + 1);
      }
      int64_t nv = std::max<int64_t>(0, std::min<int64_t>(lim - k, n));
      nvalid[row] = static_cast<int>(nv);
      any |= nv > 0;
    }
    if (!any) continue;  // a causal block nobody sees
    LoadBlock(a, r, h, k, n, w.kb16.data());
    K::PrepareBlock(w);
    K::Scores(w, m_pad, n);
    K::Softmax(w, nvalid.data(), a.scale_log2, alpha.data(), m_pad);
    K::UpdateO(w, alpha.data(), m_pad, n);
  }
  // Finalize: normalized output and natural-log LSE; an empty row gives 0 and +inf (final) or
  // -inf (partial: weight 0 in the combine).
  for (int64_t row = 0; row < m; ++row) {
    const float l = w.l[row];
    const float inv = l > 0.f ? 1.f / l : 0.f;
    const float* o = &w.o[row * kDV];
    const int64_t i = row / s.g, head = h * s.g + row % s.g;
    if (it.splits == 1) {
      uint16_t* dst = a.out + ((r * s.s_q + i) * s.h_q + head) * kDV;
      for (int c = 0; c < kDV; ++c) dst[c] = FloatToBf16(o[c] * inv);
      a.lse[(r * s.h_q + head) * s.s_q + i] =
          l > 0.f ? (w.m[row] + std::log2(l)) * kLn2 : INFINITY;
    } else {
      float* dst = a.oacc + ((it.accum_row * s.h_kv + h) * s.m + row) * kDV;
      for (int c = 0; c < kDV; ++c) dst[c] = o[c] * inv;
      a.lacc[(it.accum_row * s.h_kv + h) * s.m + row] =
          l > 0.f ? (w.m[row] + std::log2(l)) * kLn2 : -INFINITY;
    }
  }
}

template <typename K>
void RunParts(ffi::ThreadPool& pool, const Args& a, std::atomic<int>* bad) {
  const MlaShape& s = a.s;
  const int64_t capacity = s.max_blocks * s.page;
  ParallelFor(pool, s.num_parts * s.h_kv, 1, [&](int64_t begin, int64_t end) {
    thread_local Scratch w;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t part = task / s.h_kv, h = task % s.h_kv;
      const PartRange p = DecodePart(a.meta, part);
      if (p.begin_req > p.end_req) continue;  // an empty part (all requests already taken)
      if (p.begin_req < 0 || p.end_req >= s.b) {
        bad->store(1);
        continue;
      }
      for (int64_t r = p.begin_req; r <= p.end_req; ++r) {
        const WorkItem it = MakeWorkItem(p, r, a.seqlens, a.nsplits, capacity, s.accum_rows);
        if (!it.ok) {
          bad->store(1);
          continue;
        }
        RunItem<K>(a, w, r, h, it);
      }
    }
  });
}

// Log-sum-exp merge of the pieces of every split request (FlashMLA's combine kernel).
void Combine(ffi::ThreadPool& pool, const Args& a) {
  const MlaShape& s = a.s;
  ParallelFor(pool, s.b * s.h_kv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(kDV), wgt;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t r = task / s.h_kv, h = task % s.h_kv;
      const int64_t first = a.nsplits[r], n = static_cast<int64_t>(a.nsplits[r + 1]) - first;
      if (n <= 1 || first < 0 || first + n > s.accum_rows) continue;
      wgt.resize(n);
      for (int64_t row = 0; row < s.m; ++row) {
        float mx = -INFINITY;
        for (int64_t j = 0; j < n; ++j) mx = std::max(mx, a.lacc[((first + j) * s.h_kv + h) * s.m + row]);
        const int64_t i = row / s.g, head = h * s.g + row % s.g;
        uint16_t* dst = a.out + ((r * s.s_q + i) * s.h_q + head) * kDV;
        float* lse_dst = &a.lse[(r * s.h_q + head) * s.s_q + i];
        if (mx == -INFINITY) {
          std::memset(dst, 0, 2 * kDV);
          *lse_dst = INFINITY;
          continue;
        }
        float sum = 0.f;
        for (int64_t j = 0; j < n; ++j) {
          const float l = a.lacc[((first + j) * s.h_kv + h) * s.m + row];
          wgt[j] = l == -INFINITY ? 0.f : std::exp(l - mx);
          sum += wgt[j];
        }
        std::fill(acc.begin(), acc.end(), 0.f);
        for (int64_t j = 0; j < n; ++j) {
          if (wgt[j] == 0.f) continue;  // never touch a piece that was not written
          const float wj = wgt[j] / sum;
          const float* o = a.oacc + (((first + j) * s.h_kv + h) * s.m + row) * kDV;
          for (int c = 0; c < kDV; ++c) acc[c] += wj * o[c];
        }
        for (int c = 0; c < kDV; ++c) dst[c] = FloatToBf16(acc[c]);
        *lse_dst = mx + std::log(sum);
      }
    }
  });
}

bool UseAvx512() {
  static const bool has = CpuHasAvx512Bf16();
  const char* env = std::getenv("DSJAX_FLASH_MLA_CPU_KERNEL");
  if (env != nullptr && std::string(env) == "generic") return false;
  return has;
}

ffi::Error DecodeImpl(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer k_cache,
                      ffi::Buffer<ffi::S32> block_table, ffi::Buffer<ffi::S32> seqlens,
                      ffi::Buffer<ffi::S32> meta, ffi::Buffer<ffi::S32> num_splits,
                      ffi::Result<ffi::AnyBuffer> out, ffi::Result<ffi::Buffer<ffi::F32>> lse,
                      ffi::Result<ffi::Buffer<ffi::F32>> o_acc,
                      ffi::Result<ffi::Buffer<ffi::F32>> lse_acc, float softmax_scale, bool causal,
                      bool is_fp8) {
  Args a;
  DSJAX_RETURN_IF_ERROR(CheckDecodeShapes(q, k_cache, block_table, seqlens, meta, num_splits, *out,
                                          *lse, *o_acc, *lse_acc, is_fp8, &a.s));
  a.q = static_cast<const uint16_t*>(q.untyped_data());
  a.kc = static_cast<const uint8_t*>(k_cache.untyped_data());
  a.bt = block_table.typed_data();
  a.seqlens = seqlens.typed_data();
  a.meta = meta.typed_data();
  a.nsplits = num_splits.typed_data();
  a.out = static_cast<uint16_t*>(out->untyped_data());
  a.lse = lse->typed_data();
  a.oacc = o_acc->typed_data();
  a.lacc = lse_acc->typed_data();
  a.scale_log2 = softmax_scale * kLog2e;
  a.causal = causal && a.s.s_q > 1;
  const MlaShape& s = a.s;
  if (s.b == 0 || s.s_q == 0 || s.h_q == 0) return ffi::Error::Success();
  // Defined results even for rows no part covers (inconsistent metadata is reported below).
  std::memset(a.out, 0, s.b * s.s_q * s.h_q * kDV * 2);
  std::fill(a.lse, a.lse + s.b * s.h_q * s.s_q, INFINITY);
  std::fill(a.lacc, a.lacc + s.accum_rows * s.h_kv * s.m, -INFINITY);
  std::atomic<int> bad{0};
#if DSJAX_MLA_HAVE_AVX512
  if (UseAvx512()) {
    RunParts<Avx512Bf16Kernel>(pool, a, &bad);
  } else {
    RunParts<GenericKernel>(pool, a, &bad);
  }
#else
  RunParts<GenericKernel>(pool, a, &bad);
#endif
  Combine(pool, a);
  if (bad.load() != 0)
    return InvalidArgument(
        "flash_mla: tile_scheduler_metadata / num_splits do not match cache_seqlens (a part names "
        "a request or split outside the batch); compute them with get_mla_metadata(cache_seqlens, "
        "...) on the same lengths");
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FlashMlaDecodeCpu, DecodeImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
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

DSJAX_REGISTER_FFI("dsjax_flash_mla_decode", FlashMlaDecodeCpu);

}  // namespace dsjax::flash_mla
