// Host-side contract of the FP8 GEMMs (shape/dtype checks and the problem list), shared by the CPU
// twin and any CUDA implementation, so that the checks and the group bookkeeping are tested on CPU.
//
// Every GEMM is NT: D[m, n] = sum_kb (A[m, kb-block] . B[n, kb-block]^T) * sa[m, kb] * sb(n, kb),
// A and B float8_e4m3fn K-major; sa 1x128 scales; sb 128x128 (per n-block) or 1x128 (per row).
#pragma once

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <vector>

#include "common/ffi_common.h"
#include "deep_gemm/quant_common.h"

namespace dsjax::deep_gemm {

// One dense NT GEMM over a K range; grouped GEMMs become a list of these.
struct GemmProblem {
  const uint8_t* a = nullptr;  // [m, lda] row-major, float8_e4m3fn codes
  const float* sa = nullptr;   // sa[r * sa_ld + kb]
  int64_t lda = 0, sa_ld = 0;
  const uint8_t* b = nullptr;  // [n, ldb]
  const float* sb = nullptr;   // per_row: sb[c * sb_ld + kb]; else sb[(c / 128) * sb_ld + kb]
  int64_t ldb = 0, sb_ld = 0;
  bool b_per_row = false;
  int64_t m = 0, n = 0;
  int64_t k_begin = 0, k_end = 0;  // k_begin is a multiple of 128
  const float* c = nullptr;        // optional [m, n] (row stride n), added in f32
  void* d = nullptr;               // [m, n] (row stride n)
  bool d_bf16 = false;
};

inline ffi::Error ExpectType(const char* op, const char* name, const ffi::AnyBuffer& x,
                             ffi::DataType want) {
  if (x.element_type() != want)
    return InvalidArgument(op, ": ", name, " must be ", DTypeName(want), ", got ",
                           DTypeName(x.element_type()));
  return ffi::Error::Success();
}

inline ffi::Error ExpectDims(const char* op, const char* name, const ffi::AnyBuffer& x,
                             std::initializer_list<int64_t> want) {
  auto d = x.dimensions();
  bool ok = d.size() == want.size();
  size_t i = 0;
  for (int64_t w : want) {
    if (!ok) break;
    ok = d[i++] == w;
  }
  if (!ok) {
    std::vector<int64_t> w(want);
    return InvalidArgument(op, ": ", name, " must have shape ",
                           DimsToString(ffi::Span<const int64_t>(w.data(), w.size())), ", got ",
                           DimsToString(d));
  }
  return ffi::Error::Success();
}

inline ffi::Error ExpectRank(const char* op, const char* name, const ffi::AnyBuffer& x, size_t r) {
  if (x.dimensions().size() != r)
    return InvalidArgument(op, ": ", name, " must have rank ", r, ", got shape ",
                           DimsToString(x.dimensions()));
  return ffi::Error::Success();
}

inline ffi::Error ExpectOutDtype(const char* op, const ffi::AnyBuffer& d, bool allow_bf16) {
  auto t = d.element_type();
  if (t == ffi::DataType::F32 || (allow_bf16 && t == ffi::DataType::BF16))
    return ffi::Error::Success();
  return InvalidArgument(op, ": output must be ", allow_bf16 ? "bfloat16 or float32" : "float32",
                         ", got ", DTypeName(t));
}

// The operand pair (fp8 values, f32 scales) of an LHS with 1x128 scales: [lead..., m, k].
inline ffi::Error CheckLhs(const char* op, const ffi::AnyBuffer& a, const ffi::AnyBuffer& sa) {
  DSJAX_RETURN_IF_ERROR(ExpectType(op, "a", a, ffi::DataType::F8E4M3FN));
  DSJAX_RETURN_IF_ERROR(ExpectType(op, "a scales", sa, ffi::DataType::F32));
  auto ad = a.dimensions();
  auto sd = sa.dimensions();
  bool ok = ad.size() >= 2 && sd.size() == ad.size();
  for (size_t i = 0; ok && i < ad.size(); ++i)
    ok = sd[i] == (i + 1 == ad.size() ? CeilDiv(ad[i], kGroup) : ad[i]);
  if (!ok)
    return InvalidArgument(op, ": a scales must have shape [..., ceil(k/128)] matching a=",
                           DimsToString(ad), ", got ", DimsToString(sd));
  return ffi::Error::Success();
}

// An RHS [lead..., n, k] with 128x128 scales [lead..., ceil(n/128), ceil(k/128)] or, per_row,
// 1x128 scales [lead..., n, ceil(k/128)].
inline ffi::Error CheckRhs(const char* op, const ffi::AnyBuffer& b, const ffi::AnyBuffer& sb,
                           bool per_row) {
  DSJAX_RETURN_IF_ERROR(ExpectType(op, "b", b, ffi::DataType::F8E4M3FN));
  DSJAX_RETURN_IF_ERROR(ExpectType(op, "b scales", sb, ffi::DataType::F32));
  auto bd = b.dimensions();
  auto sd = sb.dimensions();
  size_t r = bd.size();
  bool ok = r >= 2 && sd.size() == r;
  for (size_t i = 0; ok && i < r; ++i) {
    int64_t want = i + 1 == r ? CeilDiv(bd[i], kGroup)
                   : i + 2 == r ? (per_row ? bd[i] : CeilDiv(bd[i], kGroup))
                                : bd[i];
    ok = sd[i] == want;
  }
  if (!ok)
    return InvalidArgument(op, ": b scales must have shape ",
                           per_row ? "[..., n, ceil(k/128)]" : "[..., ceil(n/128), ceil(k/128)]",
                           " matching b=", DimsToString(bd), ", got ", DimsToString(sd));
  return ffi::Error::Success();
}

// Splits the contiguous layout into one problem per run of rows sharing a group. Checks every
// index against [-1, G) and the 128-row alignment (all non-padding rows of an aligned 128-row block
// share one group, as the GPU kernels assume). `padding_rows` gets the rows whose output is zero.
inline ffi::Error ContiguousRuns(const char* op, const int32_t* m_indices, int64_t m_sum,
                                 int64_t groups, std::vector<std::pair<int64_t, int64_t>>* runs,
                                 std::vector<int32_t>* run_group) {
  for (int64_t blk = 0; blk < m_sum; blk += kGroup) {
    int32_t seen = -1;
    for (int64_t r = blk; r < std::min(m_sum, blk + kGroup); ++r) {
      int32_t g = m_indices[r];
      if (g < -1 || g >= groups)
        return InvalidArgument(op, ": m_indices[", r, "] must be -1 (padding) or in [0, ", groups,
                               "), got ", g);
      if (g >= 0 && seen >= 0 && g != seen)
        return InvalidArgument(op, ": m_indices breaks the 128-row alignment: rows ", blk, "..",
                               std::min(m_sum, blk + kGroup) - 1, " mix groups ", seen, " and ", g,
                               " (each group must start at a multiple of 128 rows; pad with -1)");
      if (g >= 0) seen = g;
    }
  }
  int64_t r = 0;
  while (r < m_sum) {
    int64_t e = r + 1;
    while (e < m_sum && m_indices[e] == m_indices[r]) ++e;
    runs->emplace_back(r, e);
    run_group->push_back(m_indices[r]);
    r = e;
  }
  return ffi::Error::Success();
}

inline ffi::Error CheckMaskedM(const char* op, const int32_t* masked_m, int64_t groups,
                               int64_t m_max) {
  for (int64_t g = 0; g < groups; ++g) {
    if (masked_m[g] < 0 || masked_m[g] > m_max)
      return InvalidArgument(op, ": masked_m[", g, "] must be in [0, m_max=", m_max, "], got ",
                             masked_m[g]);
  }
  return ffi::Error::Success();
}

inline ffi::Error CheckGroupKs(const char* op, const int32_t* ks, int64_t groups, int64_t k) {
  int64_t total = 0;
  for (int64_t g = 0; g < groups; ++g) {
    if (ks[g] < 0 || ks[g] % kGroup != 0)
      return InvalidArgument(op, ": group_ks[", g, "] must be a non-negative multiple of 128, got ",
                             ks[g]);
    total += ks[g];
  }
  if (total > k)
    return InvalidArgument(op, ": sum(group_ks) must be <= K=", k, ", got ", total);
  return ffi::Error::Success();
}

// ---------------------------------------------------------------- per-op shape contracts
// One function per GEMM layout, shared by the CPU twin and the CUDA handlers, so both accept
// exactly the same operands. Sizes come back in GemmDims (m is m_max for the masked layout).
struct GemmDims {
  int64_t m = 0, n = 0, k = 0, groups = 1;
};

inline ffi::Error CheckDenseShapes(const char* op, const ffi::AnyBuffer& a, const ffi::AnyBuffer& sa,
                                   const ffi::AnyBuffer& b, const ffi::AnyBuffer& sb,
                                   const ffi::AnyBuffer& c, const ffi::AnyBuffer& d, bool b_per_row,
                                   bool has_c, GemmDims* out) {
  DSJAX_RETURN_IF_ERROR(ExpectRank(op, "a", a, 2));
  DSJAX_RETURN_IF_ERROR(ExpectRank(op, "b", b, 2));
  DSJAX_RETURN_IF_ERROR(CheckLhs(op, a, sa));
  DSJAX_RETURN_IF_ERROR(CheckRhs(op, b, sb, b_per_row));
  const int64_t m = a.dimensions()[0], k = a.dimensions()[1], n = b.dimensions()[0];
  DSJAX_RETURN_IF_ERROR(ExpectDims(op, "b", b, {n, k}));
  DSJAX_RETURN_IF_ERROR(ExpectOutDtype(op, d, true));
  DSJAX_RETURN_IF_ERROR(ExpectDims(op, "d", d, {m, n}));
  if (has_c) {
    DSJAX_RETURN_IF_ERROR(ExpectType(op, "c", c, ffi::DataType::F32));
    DSJAX_RETURN_IF_ERROR(ExpectDims(op, "c", c, {m, n}));
  }
  *out = GemmDims{m, n, k, 1};
  return ffi::Error::Success();
}

inline ffi::Error CheckContiguousShapes(const char* op, const ffi::AnyBuffer& a,
                                        const ffi::AnyBuffer& sa, const ffi::AnyBuffer& b,
                                        const ffi::AnyBuffer& sb, const ffi::AnyBuffer& m_indices,
                                        const ffi::AnyBuffer& d, GemmDims* out) {
  DSJAX_RETURN_IF_ERROR(ExpectRank(op, "a", a, 2));
  DSJAX_RETURN_IF_ERROR(ExpectRank(op, "b", b, 3));
  DSJAX_RETURN_IF_ERROR(CheckLhs(op, a, sa));
  DSJAX_RETURN_IF_ERROR(CheckRhs(op, b, sb, false));
  const int64_t m = a.dimensions()[0], k = a.dimensions()[1];
  const int64_t groups = b.dimensions()[0], n = b.dimensions()[1];
  DSJAX_RETURN_IF_ERROR(ExpectDims(op, "b", b, {groups, n, k}));
  DSJAX_RETURN_IF_ERROR(ExpectType(op, "m_indices", m_indices, ffi::DataType::S32));
  DSJAX_RETURN_IF_ERROR(ExpectDims(op, "m_indices", m_indices, {m}));
  DSJAX_RETURN_IF_ERROR(ExpectOutDtype(op, d, true));
  DSJAX_RETURN_IF_ERROR(ExpectDims(op, "d", d, {m, n}));
  *out = GemmDims{m, n, k, groups};
  return ffi::Error::Success();
}

inline ffi::Error CheckMaskedShapes(const char* op, const ffi::AnyBuffer& a, const ffi::AnyBuffer& sa,
                                    const ffi::AnyBuffer& b, const ffi::AnyBuffer& sb,
                                    const ffi::AnyBuffer& masked_m, const ffi::AnyBuffer& d,
                                    GemmDims* out) {
  DSJAX_RETURN_IF_ERROR(ExpectRank(op, "a", a, 3));
  DSJAX_RETURN_IF_ERROR(ExpectRank(op, "b", b, 3));
  DSJAX_RETURN_IF_ERROR(CheckLhs(op, a, sa));
  DSJAX_RETURN_IF_ERROR(CheckRhs(op, b, sb, false));
  const int64_t groups = a.dimensions()[0], m_max = a.dimensions()[1], k = a.dimensions()[2];
  const int64_t n = b.dimensions()[1];
  DSJAX_RETURN_IF_ERROR(ExpectDims(op, "b", b, {groups, n, k}));
  DSJAX_RETURN_IF_ERROR(ExpectType(op, "masked_m", masked_m, ffi::DataType::S32));
  DSJAX_RETURN_IF_ERROR(ExpectDims(op, "masked_m", masked_m, {groups}));
  DSJAX_RETURN_IF_ERROR(ExpectOutDtype(op, d, true));
  DSJAX_RETURN_IF_ERROR(ExpectDims(op, "d", d, {groups, m_max, n}));
  *out = GemmDims{m_max, n, k, groups};
  return ffi::Error::Success();
}

inline ffi::Error CheckKGroupedShapes(const char* op, const ffi::AnyBuffer& a,
                                      const ffi::AnyBuffer& sa, const ffi::AnyBuffer& b,
                                      const ffi::AnyBuffer& sb, const ffi::AnyBuffer& group_ks,
                                      const ffi::AnyBuffer& c, const ffi::AnyBuffer& d, bool has_c,
                                      GemmDims* out) {
  DSJAX_RETURN_IF_ERROR(ExpectRank(op, "a", a, 2));
  DSJAX_RETURN_IF_ERROR(ExpectRank(op, "b", b, 2));
  DSJAX_RETURN_IF_ERROR(CheckLhs(op, a, sa));
  DSJAX_RETURN_IF_ERROR(CheckRhs(op, b, sb, true));
  const int64_t m = a.dimensions()[0], k = a.dimensions()[1], n = b.dimensions()[0];
  DSJAX_RETURN_IF_ERROR(ExpectDims(op, "b", b, {n, k}));
  DSJAX_RETURN_IF_ERROR(ExpectType(op, "group_ks", group_ks, ffi::DataType::S32));
  DSJAX_RETURN_IF_ERROR(ExpectRank(op, "group_ks", group_ks, 1));
  const int64_t groups = group_ks.dimensions()[0];
  DSJAX_RETURN_IF_ERROR(ExpectOutDtype(op, d, false));
  DSJAX_RETURN_IF_ERROR(ExpectDims(op, "d", d, {groups, m, n}));
  if (has_c) {
    DSJAX_RETURN_IF_ERROR(ExpectType(op, "c", c, ffi::DataType::F32));
    DSJAX_RETURN_IF_ERROR(ExpectDims(op, "c", c, {groups, m, n}));
  }
  *out = GemmDims{m, n, k, groups};
  return ffi::Error::Success();
}

}  // namespace dsjax::deep_gemm
