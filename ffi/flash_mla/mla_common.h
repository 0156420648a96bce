// Host-side logic of FlashMLA decoding shared by the CPU twin and the CUDA kernels: the operand
// bookkeeping, the checks of the tile-scheduler metadata, and the work-item decoding of one
// metadata row. Semantics: dsjax/flash_mla/reference.py and dsjax/flash_mla/metadata.py.
#pragma once

#include <algorithm>
#include <cstdint>

#include "common/ffi_common.h"

#ifdef __CUDACC__
#define MLA_HD __host__ __device__ __forceinline__
#else
#define MLA_HD inline
#endif

namespace dsjax::flash_mla {

constexpr int kDQk = 576;         // 512 latent + 64 RoPE
constexpr int kDV = 512;          // V = first 512 channels of the latent row
constexpr int kBlockN = 64;       // keys per scheduler block (get_mla_metadata's block_size_n)
constexpr int kMetaSize = 8;      // ints per tile-scheduler metadata row
constexpr int kFp8RowBytes = 656; // 512 e4m3 + 4 f32 scales + 64 bf16
constexpr int kFp8Tile = 128;

struct MlaShape {
  int64_t b = 0, s_q = 0, h_q = 0, h_kv = 0, g = 0;  // g = h_q / h_kv
  int64_t m = 0;                                     // query rows per (request, kv head) = s_q * g
  int64_t num_blocks = 0, page = 0, max_blocks = 0, num_parts = 0, accum_rows = 0;
  int64_t row_elems = 0;                             // 576 (bf16) or 656 (fp8 bytes)
  bool fp8 = false;
};

// One metadata row: [begin_req, begin_key, end_req, end_key, begin_split, 0, 0, 0].
struct PartRange {
  int begin_req, begin_key, end_req, end_key, begin_split;
};

MLA_HD PartRange DecodePart(const int32_t* meta, int64_t part) {
  const int32_t* r = meta + part * kMetaSize;
  return PartRange{r[0], r[1], r[2], r[3], r[4]};
}

// Effective key count of request r: negative lengths are 0, lengths past the block table's
// capacity are clamped to it (the reference's gather has no more keys either).
MLA_HD int64_t EffectiveSeqlen(const int32_t* seqlens, int64_t r, int64_t capacity) {
  int64_t s = seqlens[r];
  s = s < 0 ? 0 : s;
  return s > capacity ? capacity : s;
}

// The keys [k0, k1) of request r that a part handles, and where its result goes.
struct WorkItem {
  int64_t k0, k1, s_k;
  int64_t splits;     // pieces of this request in total (1: write the final result directly)
  int64_t accum_row;  // row of the accumulators when splits > 1
  bool ok;            // false: metadata inconsistent with num_splits / seqlens (nothing written)
};

MLA_HD WorkItem MakeWorkItem(const PartRange& p, int64_t r, const int32_t* seqlens,
                             const int32_t* num_splits, int64_t capacity, int64_t accum_rows) {
  WorkItem w;
  w.s_k = EffectiveSeqlen(seqlens, r, capacity);
  int64_t k0 = r == p.begin_req ? p.begin_key : 0;
  int64_t k1 = r == p.end_req ? p.end_key : w.s_k;
  k1 = k1 > w.s_k ? w.s_k : k1;
  k0 = k0 < 0 ? 0 : k0;
  if (k0 > k1) k0 = k1;
  w.k0 = k0;
  w.k1 = k1;
  w.splits = static_cast<int64_t>(num_splits[r + 1]) - num_splits[r];
  int64_t split = r == p.begin_req ? p.begin_split : 0;
  w.accum_row = static_cast<int64_t>(num_splits[r]) + split;
  w.ok = w.splits >= 1 && split >= 0 && split < w.splits &&
         (w.splits == 1 || (w.accum_row >= 0 && w.accum_row < accum_rows));
  return w;
}

// Clamps a block-table entry into [0, num_blocks): garbage in unused entries never reads outside
// the cache (entries of used pages are the caller's responsibility, as in FlashMLA).
MLA_HD int64_t ClampBlock(int32_t idx, int64_t num_blocks) {
  return idx < 0 ? 0 : (idx >= num_blocks ? num_blocks - 1 : idx);
}

// Checks the operands of dsjax_flash_mla_decode (same on CPU and CUDA).
inline ffi::Error CheckDecodeShapes(ffi::AnyBuffer q, ffi::AnyBuffer k_cache,
                                    ffi::Buffer<ffi::S32> block_table,
                                    ffi::Buffer<ffi::S32> seqlens, ffi::Buffer<ffi::S32> meta,
                                    ffi::Buffer<ffi::S32> num_splits, ffi::AnyBuffer out,
                                    ffi::Buffer<ffi::F32> lse, ffi::Buffer<ffi::F32> o_acc,
                                    ffi::Buffer<ffi::F32> lse_acc, bool fp8, MlaShape* s) {
  auto qd = q.dimensions();
  auto kd = k_cache.dimensions();
  if (qd.size() != 4) return InvalidArgument("flash_mla: q must be [b, s_q, h_q, 576], got ", DimsToString(qd));
  if (kd.size() != 4) return InvalidArgument("flash_mla: k_cache must be rank 4, got ", DimsToString(kd));
  if (q.element_type() != ffi::DataType::BF16)
    return InvalidArgument("flash_mla: q must be bfloat16, got ", DTypeName(q.element_type()));
  if (out.element_type() != ffi::DataType::BF16)
    return InvalidArgument("flash_mla: out must be bfloat16, got ", DTypeName(out.element_type()));
  s->b = qd[0]; s->s_q = qd[1]; s->h_q = qd[2];
  if (qd[3] != kDQk) return InvalidArgument("flash_mla: q's last dim must be 576, got ", qd[3]);
  s->num_blocks = kd[0]; s->page = kd[1]; s->h_kv = kd[2];
  s->fp8 = fp8;
  s->row_elems = fp8 ? kFp8RowBytes : kDQk;
  if (kd[3] != s->row_elems)
    return InvalidArgument("flash_mla: k_cache's last dim must be ", s->row_elems, ", got ", kd[3]);
  auto kt = k_cache.element_type();
  if (fp8 ? (kt != ffi::DataType::U8 && kt != ffi::DataType::F8E4M3FN) : kt != ffi::DataType::BF16)
    return InvalidArgument("flash_mla: k_cache has dtype ", DTypeName(kt),
                           fp8 ? ", expected uint8 or float8_e4m3fn" : ", expected bfloat16");
  if (s->h_kv <= 0 || s->h_q % s->h_kv != 0)
    return InvalidArgument("flash_mla: h_q (", s->h_q, ") must be a multiple of h_kv (", s->h_kv, ")");
  s->g = s->h_q / s->h_kv;
  s->m = s->s_q * s->g;
  auto bt = block_table.dimensions();
  if (bt.size() != 2 || bt[0] != s->b)
    return InvalidArgument("flash_mla: block_table must be [", s->b, ", max_blocks], got ", DimsToString(bt));
  s->max_blocks = bt[1];
  if (seqlens.dimensions().size() != 1 || seqlens.dimensions()[0] != s->b)
    return InvalidArgument("flash_mla: cache_seqlens must be [", s->b, "], got ", DimsToString(seqlens.dimensions()));
  auto md = meta.dimensions();
  if (md.size() != 2 || md[1] != kMetaSize || md[0] < 1)
    return InvalidArgument("flash_mla: tile_scheduler_metadata must be [num_sm_parts, 8], got ", DimsToString(md));
  s->num_parts = md[0];
  if (num_splits.dimensions().size() != 1 || num_splits.dimensions()[0] != s->b + 1)
    return InvalidArgument("flash_mla: num_splits must be [", s->b + 1, "], got ", DimsToString(num_splits.dimensions()));
  s->accum_rows = s->b + s->num_parts;
  auto od = out.dimensions();
  if (od.size() != 4 || od[0] != s->b || od[1] != s->s_q || od[2] != s->h_q || od[3] != kDV)
    return InvalidArgument("flash_mla: out must be [b, s_q, h_q, 512], got ", DimsToString(od));
  auto ld = lse.dimensions();
  if (ld.size() != 3 || ld[0] != s->b || ld[1] != s->h_q || ld[2] != s->s_q)
    return InvalidArgument("flash_mla: lse must be [b, h_q, s_q], got ", DimsToString(ld));
  auto oa = o_acc.dimensions();
  if (oa.size() != 4 || oa[0] != s->accum_rows || oa[1] != s->h_kv || oa[2] != s->m || oa[3] != kDV)
    return InvalidArgument("flash_mla: out_accum must be [b + num_sm_parts, h_kv, s_q * h_q / h_kv, 512], got ", DimsToString(oa));
  auto la = lse_acc.dimensions();
  if (la.size() != 3 || la[0] != s->accum_rows || la[1] != s->h_kv || la[2] != s->m)
    return InvalidArgument("flash_mla: lse_accum must be [b + num_sm_parts, h_kv, s_q * h_q / h_kv], got ", DimsToString(la));
  if (s->page <= 0) return InvalidArgument("flash_mla: page_block_size must be positive, got ", s->page);
  if (s->num_blocks <= 0 && s->b > 0) return InvalidArgument("flash_mla: k_cache has no blocks");
  return ffi::Error::Success();
}

}  // namespace dsjax::flash_mla
