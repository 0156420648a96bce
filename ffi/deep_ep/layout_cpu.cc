// CPU twins of DeepEP's layout work: get_dispatch_layout counts, the send-slot routing of normal
// dispatch (prefix counts per destination, so the k-th token for destination d gets slot k) and the
// per-expert packing of the low-latency receive buffer. Same integers as dsjax/deep_ep/reference.py.
//
// Routing is a two-pass chunked scan over XLA's intra-op pool: each chunk counts its tokens per
// destination, an exclusive prefix over chunks gives each chunk its first slot, and a second pass
// writes the slots; the per-slot metadata is then filled in parallel over slots.
#include <algorithm>
#include <atomic>
#include <vector>

#include "common/ffi_common.h"
#include "common/parallel.h"
#include "common/registry.h"
#include "deep_ep/ep_common.h"

namespace dsjax::deep_ep {
namespace {

// Distinct destinations of one token, in first-seen order; returns how many (at most K).
// Sets *bad when an id is >= limit.
inline int TokenDests(const int32_t* ids, int64_t k, int64_t per_dest, int64_t limit, int32_t* out, bool* bad) {
  int n = 0;
  for (int64_t j = 0; j < k; ++j) {
    int32_t e = ids[j];
    if (e < 0) continue;
    if (e >= limit) {
      *bad = true;
      continue;
    }
    int32_t d = static_cast<int32_t>(e / per_dest);
    bool seen = false;
    for (int i = 0; i < n; ++i) seen |= out[i] == d;
    if (!seen) out[n++] = d;
  }
  return n;
}

struct ChunkPlan {
  int64_t chunk = 1, num_chunks = 0;
};

ChunkPlan PlanChunks(ffi::ThreadPool& pool, int64_t n) {
  ChunkPlan p;
  int64_t threads = std::max<int64_t>(1, pool.num_threads());
  p.chunk = std::max<int64_t>(256, CeilDiv(n, 4 * threads));
  p.num_chunks = CeilDiv(n, p.chunk);
  return p;
}

// Slots of (row, destination) pairs: reduce_idx [T, D] and send_src [D*C]; returns the dropped
// count and the per-destination totals (before the capacity).
ffi::Error RouteCore(ffi::ThreadPool& pool, const char* op, const int32_t* ids, int64_t t, int64_t k,
                     int64_t per_dest, int64_t d_count, int64_t cap, int32_t* reduce_idx,
                     int32_t* send_src, int64_t* dropped, std::vector<int64_t>* totals) {
  const int64_t limit = per_dest * d_count;
  ChunkPlan cp = PlanChunks(pool, t);
  std::vector<int64_t> counts(static_cast<size_t>(cp.num_chunks * d_count), 0);
  std::atomic<bool> bad{false};
  ParallelFor(pool, cp.num_chunks, 1, [&](int64_t c0, int64_t c1) {
    std::vector<int32_t> dests(static_cast<size_t>(std::max<int64_t>(k, 1)));
    bool local_bad = false;
    for (int64_t c = c0; c < c1; ++c) {
      int64_t* cnt = counts.data() + c * d_count;
      for (int64_t r = c * cp.chunk, e = std::min(t, r + cp.chunk); r < e; ++r) {
        int n = TokenDests(ids + r * k, k, per_dest, limit, dests.data(), &local_bad);
        for (int i = 0; i < n; ++i) ++cnt[dests[i]];
      }
    }
    if (local_bad) bad.store(true, std::memory_order_relaxed);
  });
  if (bad.load())
    return InvalidArgument(op, ": an expert id is >= ", limit, " (the number of experts); ids must be in [-1, ", limit, ")");
  totals->assign(static_cast<size_t>(d_count), 0);
  for (int64_t c = 0; c < cp.num_chunks; ++c) {  // exclusive prefix over chunks, per destination
    for (int64_t d = 0; d < d_count; ++d) {
      int64_t v = counts[c * d_count + d];
      counts[c * d_count + d] = (*totals)[d];
      (*totals)[d] += v;
    }
  }
  std::fill(send_src, send_src + d_count * cap, -1);
  std::atomic<int64_t> drop{0};
  ParallelFor(pool, cp.num_chunks, 1, [&](int64_t c0, int64_t c1) {
    std::vector<int32_t> dests(static_cast<size_t>(std::max<int64_t>(k, 1)));
    bool unused = false;
    int64_t local_drop = 0;
    for (int64_t c = c0; c < c1; ++c) {
      int64_t* next = counts.data() + c * d_count;
      for (int64_t r = c * cp.chunk, e = std::min(t, r + cp.chunk); r < e; ++r) {
        int32_t* red = reduce_idx + r * d_count;
        std::fill(red, red + d_count, -1);
        int n = TokenDests(ids + r * k, k, per_dest, limit, dests.data(), &unused);
        for (int i = 0; i < n; ++i) {
          int64_t d = dests[i], p = next[d]++;
          if (p < cap) {
            red[d] = static_cast<int32_t>(d * cap + p);
            send_src[d * cap + p] = static_cast<int32_t>(r);
          } else {
            ++local_drop;
          }
        }
      }
    }
    drop.fetch_add(local_drop, std::memory_order_relaxed);
  });
  *dropped = drop.load();
  return ffi::Error::Success();
}

ffi::Error RouteImpl(ffi::ThreadPool pool, ffi::AnyBuffer idx, ffi::AnyBuffer w,
                     ffi::Result<ffi::AnyBuffer> reduce_idx, ffi::Result<ffi::AnyBuffer> send_src,
                     ffi::Result<ffi::AnyBuffer> send_idx, ffi::Result<ffi::AnyBuffer> send_w,
                     ffi::Result<ffi::AnyBuffer> num_dropped, int64_t per_dest, int64_t d_count,
                     int64_t cap, bool local_ids) {
  const char* op = "dsjax_deep_ep_route";
  RouteDims rd;
  DSJAX_RETURN_IF_ERROR(CheckTopk(op, idx, &rd));
  const int64_t t = rd.tokens, k = rd.topk;
  if (per_dest < 1 || d_count < 1 || cap < 1)
    return InvalidArgument(op, ": experts_per_dest, num_dests and capacity must be >= 1, got ", per_dest,
                           ", ", d_count, ", ", cap);
  DSJAX_RETURN_IF_ERROR(ExpectType(op, "topk_weights", w.element_type(), ffi::DataType::F32));
  DSJAX_RETURN_IF_ERROR(ExpectDims(op, "topk_weights", w.dimensions(), {t, k}));
  DSJAX_RETURN_IF_ERROR(ExpectDims(op, "reduce_idx", reduce_idx->dimensions(), {t, d_count}));
  DSJAX_RETURN_IF_ERROR(ExpectDims(op, "send_src", send_src->dimensions(), {d_count * cap}));
  DSJAX_RETURN_IF_ERROR(ExpectDims(op, "send_idx", send_idx->dimensions(), {d_count * cap, k}));
  DSJAX_RETURN_IF_ERROR(ExpectDims(op, "send_w", send_w->dimensions(), {d_count * cap, k}));
  const int32_t* ids = static_cast<const int32_t*>(idx.untyped_data());
  const float* wt = static_cast<const float*>(w.untyped_data());
  int32_t* red = static_cast<int32_t*>(reduce_idx->untyped_data());
  int32_t* src = static_cast<int32_t*>(send_src->untyped_data());
  int32_t* sidx = static_cast<int32_t*>(send_idx->untyped_data());
  float* sw = static_cast<float*>(send_w->untyped_data());
  int64_t dropped = 0;
  std::vector<int64_t> totals;
  DSJAX_RETURN_IF_ERROR(RouteCore(pool, op, ids, t, k, per_dest, d_count, cap, red, src, &dropped, &totals));
  *static_cast<int32_t*>(num_dropped->untyped_data()) = static_cast<int32_t>(dropped);
  const int64_t limit = per_dest * d_count;
  ParallelFor(pool, d_count * cap, std::max<int64_t>(1, 4096 / std::max<int64_t>(k, 1)), [&](int64_t b, int64_t e) {
    for (int64_t s = b; s < e; ++s) {
      int32_t r = src[s];
      int32_t* oi = sidx + s * k;
      float* ow = sw + s * k;
      const int64_t d = s / cap;
      for (int64_t j = 0; j < k; ++j) {
        int32_t id = r >= 0 ? ids[r * k + j] : -1;
        bool valid = id >= 0 && id < limit;
        if (local_ids) {
          bool mine = valid && id / per_dest == d;
          oi[j] = mine ? static_cast<int32_t>(id - d * per_dest) : -1;
          ow[j] = mine ? wt[r * k + j] : 0.0f;
        } else {
          oi[j] = valid ? id : -1;
          ow[j] = r >= 0 ? wt[r * k + j] : 0.0f;
        }
      }
    }
  });
  return ffi::Error::Success();
}

ffi::Error LayoutImpl(ffi::ThreadPool pool, ffi::AnyBuffer idx, ffi::Result<ffi::AnyBuffer> per_rank,
                      ffi::Result<ffi::AnyBuffer> per_node, ffi::Result<ffi::AnyBuffer> per_expert,
                      ffi::Result<ffi::AnyBuffer> in_rank, int64_t num_experts, int64_t num_ranks,
                      int64_t ranks_per_node) {
  const char* op = "dsjax_deep_ep_get_dispatch_layout";
  RouteDims rd;
  DSJAX_RETURN_IF_ERROR(CheckTopk(op, idx, &rd));
  const int64_t t = rd.tokens, k = rd.topk, r_count = num_ranks, e_count = num_experts;
  if (r_count < 1 || e_count < 1 || e_count % r_count || ranks_per_node < 1 || r_count % ranks_per_node)
    return InvalidArgument(op, ": need num_experts a multiple of num_ranks and ranks_per_node dividing it, got ",
                           e_count, ", ", r_count, ", ", ranks_per_node);
  const int64_t nodes = r_count / ranks_per_node, per_rank_e = e_count / r_count;
  DSJAX_RETURN_IF_ERROR(ExpectDims(op, "num_tokens_per_rank", per_rank->dimensions(), {r_count}));
  DSJAX_RETURN_IF_ERROR(ExpectDims(op, "num_tokens_per_node", per_node->dimensions(), {nodes}));
  DSJAX_RETURN_IF_ERROR(ExpectDims(op, "num_tokens_per_expert", per_expert->dimensions(), {e_count}));
  DSJAX_RETURN_IF_ERROR(ExpectDims(op, "is_token_in_rank", in_rank->dimensions(), {t, r_count}));
  const int32_t* ids = static_cast<const int32_t*>(idx.untyped_data());
  bool* in = static_cast<bool*>(in_rank->untyped_data());
  ChunkPlan cp = PlanChunks(pool, t);
  const int64_t width = r_count + nodes + e_count;
  std::vector<int32_t> counts(static_cast<size_t>(cp.num_chunks * width), 0);
  std::atomic<bool> bad{false};
  ParallelFor(pool, cp.num_chunks, 1, [&](int64_t c0, int64_t c1) {
    std::vector<int32_t> seen(static_cast<size_t>(std::max<int64_t>(k, 1)));
    std::vector<int32_t> dests(static_cast<size_t>(std::max<int64_t>(k, 1)));
    bool local_bad = false;
    for (int64_t c = c0; c < c1; ++c) {
      int32_t* cnt = counts.data() + c * width;
      for (int64_t r = c * cp.chunk, end = std::min(t, r + cp.chunk); r < end; ++r) {
        const int32_t* row = ids + r * k;
        bool* in_row = in + r * r_count;
        std::fill(in_row, in_row + r_count, false);
        int n = TokenDests(row, k, per_rank_e, e_count, dests.data(), &local_bad);
        for (int i = 0; i < n; ++i) {
          in_row[dests[i]] = true;
          ++cnt[dests[i]];
        }
        n = TokenDests(row, k, per_rank_e * ranks_per_node, e_count, dests.data(), &local_bad);
        for (int i = 0; i < n; ++i) ++cnt[r_count + dests[i]];
        n = TokenDests(row, k, 1, e_count, dests.data(), &local_bad);
        for (int i = 0; i < n; ++i) ++cnt[r_count + nodes + dests[i]];
      }
    }
    if (local_bad) bad.store(true, std::memory_order_relaxed);
  });
  if (bad.load())
    return InvalidArgument(op, ": an expert id is >= num_experts=", e_count, "; ids must be in [-1, ", e_count, ")");
  std::vector<int32_t> total(static_cast<size_t>(width), 0);
  for (int64_t c = 0; c < cp.num_chunks; ++c)
    for (int64_t i = 0; i < width; ++i) total[i] += counts[c * width + i];
  std::memcpy(per_rank->untyped_data(), total.data(), sizeof(int32_t) * r_count);
  std::memcpy(per_node->untyped_data(), total.data() + r_count, sizeof(int32_t) * nodes);
  std::memcpy(per_expert->untyped_data(), total.data() + r_count + nodes, sizeof(int32_t) * e_count);
  return ffi::Error::Success();
}

ffi::Error LlLayoutImpl(ffi::ThreadPool pool, ffi::AnyBuffer idx, ffi::Result<ffi::AnyBuffer> src_row,
                        ffi::Result<ffi::AnyBuffer> count, ffi::Result<ffi::AnyBuffer> pos,
                        int64_t num_local) {
  const char* op = "dsjax_deep_ep_ll_layout";
  RouteDims rd;
  DSJAX_RETURN_IF_ERROR(CheckTopk(op, idx, &rd));
  const int64_t m = rd.tokens, k = rd.topk, l = num_local;
  if (l < 1) return InvalidArgument(op, ": num_local_experts must be >= 1, got ", l);
  DSJAX_RETURN_IF_ERROR(ExpectDims(op, "src_row", src_row->dimensions(), {l * m}));
  DSJAX_RETURN_IF_ERROR(ExpectDims(op, "count", count->dimensions(), {l}));
  DSJAX_RETURN_IF_ERROR(ExpectDims(op, "pos", pos->dimensions(), {m, k}));
  if (m == 0) {
    std::fill_n(static_cast<int32_t*>(count->untyped_data()), l, 0);
    return ffi::Error::Success();
  }
  // Packing rows per local expert is routing with one expert per destination and room for all.
  std::vector<int32_t> red(static_cast<size_t>(m * l));
  const int32_t* ids = static_cast<const int32_t*>(idx.untyped_data());
  int64_t dropped = 0;
  std::vector<int64_t> totals;
  DSJAX_RETURN_IF_ERROR(RouteCore(pool, op, ids, m, k, 1, l, m, red.data(),
                                  static_cast<int32_t*>(src_row->untyped_data()), &dropped, &totals));
  int32_t* cnt = static_cast<int32_t*>(count->untyped_data());
  for (int64_t e = 0; e < l; ++e) cnt[e] = static_cast<int32_t>(totals[e]);
  int32_t* out = static_cast<int32_t*>(pos->untyped_data());
  ParallelFor(pool, m, 1024, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r)
      for (int64_t j = 0; j < k; ++j) {
        int32_t id = ids[r * k + j];
        out[r * k + j] = id >= 0 ? red[r * l + id] : -1;
      }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(DeepEpLayoutCpu, LayoutImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("num_experts")
                                  .Attr<int64_t>("num_ranks")
                                  .Attr<int64_t>("ranks_per_node"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(DeepEpRouteCpu, RouteImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("experts_per_dest")
                                  .Attr<int64_t>("num_dests")
                                  .Attr<int64_t>("capacity")
                                  .Attr<bool>("local_ids"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(DeepEpLlLayoutCpu, LlLayoutImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("num_local_experts"));

DSJAX_REGISTER_FFI("dsjax_deep_ep_get_dispatch_layout", DeepEpLayoutCpu);
DSJAX_REGISTER_FFI("dsjax_deep_ep_route", DeepEpRouteCpu);
DSJAX_REGISTER_FFI("dsjax_deep_ep_ll_layout", DeepEpLlLayoutCpu);

}  // namespace dsjax::deep_ep
