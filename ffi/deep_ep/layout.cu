// CUDA twins of DeepEP's layout work (sm_90a): get_dispatch_layout counts, the send-slot routing
// of normal dispatch and the per-expert packing of the low-latency receive buffer. Same integers as
// dsjax/deep_ep/reference.py and the CPU twin (layout_cpu.cc).
//
// Routing: one CTA per destination scans the tokens in order (cub::BlockScan over tiles), so the
// k-th token for a destination gets slot k, deterministically. Out-of-range expert ids are ignored
// here (as the reference does; the CPU twin reports them) so that no handler has to synchronize
// the stream to return an error: nothing out of bounds is ever read or written.
#include <cuda_runtime.h>

#include <cub/block/block_scan.cuh>
#include <cstdint>

#include "common/ffi_common.h"
#include "common/registry.h"
#include "deep_ep/ep_common.h"

namespace dsjax::deep_ep {
namespace {

constexpr int kScanThreads = 512;

// Whether token row `ids` has an expert on destination d (experts [d*per_dest, (d+1)*per_dest)).
__device__ __forceinline__ bool GoesTo(const int32_t* ids, int64_t k, int64_t per_dest, int64_t limit, int64_t d) {
  bool hit = false;
  for (int64_t j = 0; j < k; ++j) {
    int32_t e = ids[j];
    hit |= e >= 0 && e < limit && e / per_dest == d;
  }
  return hit;
}

// One CTA per destination d. Writes reduce_idx[t, d] (if given), send_src[d*cap + p], the dropped
// count, and for the low-latency layout pos[t, j] (if given) and count[d] (if given).
__global__ void ScanKernel(const int32_t* __restrict__ ids, int64_t t, int64_t k, int64_t per_dest,
                           int64_t d_count, int64_t cap, int32_t* reduce_idx, int32_t* send_src,
                           int32_t* dropped, int32_t* pos, int32_t* count) {
  using Scan = cub::BlockScan<int, kScanThreads>;
  __shared__ typename Scan::TempStorage tmp;
  const int64_t d = blockIdx.x;
  const int64_t limit = per_dest * d_count;
  int64_t running = 0;
  int local_drop = 0;
  for (int64_t base = 0; base < t; base += kScanThreads) {
    const int64_t r = base + threadIdx.x;
    const bool in = r < t && GoesTo(ids + r * k, k, per_dest, limit, d);
    int prefix = 0, total = 0;
    Scan(tmp).ExclusiveSum(in ? 1 : 0, prefix, total);
    if (in) {
      const int64_t p = running + prefix;
      if (p < cap) {
        if (reduce_idx) reduce_idx[r * d_count + d] = static_cast<int32_t>(d * cap + p);
        send_src[d * cap + p] = static_cast<int32_t>(r);
        if (pos) {
          for (int64_t j = 0; j < k; ++j) {
            int32_t e = ids[r * k + j];
            if (e >= 0 && e < limit && e / per_dest == d) pos[r * k + j] = static_cast<int32_t>(d * cap + p);
          }
        }
      } else {
        ++local_drop;
      }
    }
    running += total;
    __syncthreads();  // tmp is reused by the next tile
  }
  if (dropped && local_drop) atomicAdd(dropped, local_drop);
  if (count && threadIdx.x == 0) count[d] = static_cast<int32_t>(running);
}

__global__ void FillSendMeta(const int32_t* __restrict__ ids, const float* __restrict__ w,
                             const int32_t* __restrict__ send_src, int64_t slots, int64_t k, int64_t cap,
                             int64_t per_dest, int64_t limit, bool local_ids, int32_t* send_idx, float* send_w) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= slots * k) return;
  const int64_t s = i / k, j = i % k, d = s / cap;
  const int32_t r = send_src[s];
  const int32_t id = r >= 0 ? ids[r * k + j] : -1;
  const bool valid = id >= 0 && id < limit;
  if (local_ids) {
    const bool mine = valid && id / per_dest == d;
    send_idx[i] = mine ? static_cast<int32_t>(id - d * per_dest) : -1;
    send_w[i] = mine ? w[r * k + j] : 0.0f;
  } else {
    send_idx[i] = valid ? id : -1;
    send_w[i] = r >= 0 ? w[r * k + j] : 0.0f;
  }
}

// One thread per token: its row of is_token_in_rank and its contributions to the counts.
__global__ void LayoutKernel(const int32_t* __restrict__ ids, int64_t t, int64_t k, int64_t e_count,
                             int64_t r_count, int64_t rpn, int32_t* per_rank, int32_t* per_node,
                             int32_t* per_expert, bool* in_rank) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= t) return;
  const int32_t* row = ids + r * k;
  const int64_t per_rank_e = e_count / r_count;
  for (int64_t d = 0; d < r_count; ++d) in_rank[r * r_count + d] = false;
  for (int64_t j = 0; j < k; ++j) {
    const int32_t e = row[j];
    if (e < 0 || e >= e_count) continue;
    bool seen_e = false, seen_r = false, seen_n = false;
    const int64_t rk = e / per_rank_e, nd = rk / rpn;
    for (int64_t i = 0; i < j; ++i) {
      const int32_t f = row[i];
      if (f < 0 || f >= e_count) continue;
      seen_e |= f == e;
      seen_r |= f / per_rank_e == rk;
      seen_n |= f / per_rank_e / rpn == nd;
    }
    if (!seen_e) atomicAdd(per_expert + e, 1);
    if (!seen_r) {
      atomicAdd(per_rank + rk, 1);
      in_rank[r * r_count + rk] = true;
    }
    if (!seen_n) atomicAdd(per_node + nd, 1);
  }
}

ffi::Error Status(cudaError_t err, const char* op) {
  if (err == cudaSuccess) return ffi::Error::Success();
  return ffi::Error(ffi::ErrorCode::kInternal, StrCat(op, ": CUDA error: ", cudaGetErrorString(err)));
}

int64_t Blocks(int64_t n, int threads) { return n <= 0 ? 0 : (n + threads - 1) / threads; }

ffi::Error RouteCuda(cudaStream_t st, ffi::AnyBuffer idx, ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer> reduce_idx,
                     ffi::Result<ffi::AnyBuffer> send_src, ffi::Result<ffi::AnyBuffer> send_idx,
                     ffi::Result<ffi::AnyBuffer> send_w, ffi::Result<ffi::AnyBuffer> num_dropped,
                     int64_t per_dest, int64_t d_count, int64_t cap, bool local_ids) {
  const char* op = "dsjax_deep_ep_route";
  RouteDims rd;
  DSJAX_RETURN_IF_ERROR(CheckTopk(op, idx, &rd));
  const int64_t t = rd.tokens, k = rd.topk;
  if (per_dest < 1 || d_count < 1 || cap < 1)
    return InvalidArgument(op, ": experts_per_dest, num_dests and capacity must be >= 1");
  DSJAX_RETURN_IF_ERROR(ExpectType(op, "topk_weights", w.element_type(), ffi::DataType::F32));
  DSJAX_RETURN_IF_ERROR(ExpectDims(op, "topk_weights", w.dimensions(), {t, k}));
  DSJAX_RETURN_IF_ERROR(ExpectDims(op, "reduce_idx", reduce_idx->dimensions(), {t, d_count}));
  DSJAX_RETURN_IF_ERROR(ExpectDims(op, "send_src", send_src->dimensions(), {d_count * cap}));
  DSJAX_RETURN_IF_ERROR(ExpectDims(op, "send_idx", send_idx->dimensions(), {d_count * cap, k}));
  DSJAX_RETURN_IF_ERROR(ExpectDims(op, "send_w", send_w->dimensions(), {d_count * cap, k}));
  // num_dropped is written as one int32; the send metadata grid is one thread per (slot, k).
  DSJAX_RETURN_IF_ERROR(ExpectType(op, "num_dropped", num_dropped->element_type(), ffi::DataType::S32));
  DSJAX_RETURN_IF_ERROR(ExpectDims(op, "num_dropped", num_dropped->dimensions(), {}));
  if (d_count > 0x7FFFFFFF || Blocks(d_count * cap * k, 256) > 0x7FFFFFFF)
    return InvalidArgument(op, ": too many destinations or send slots for the CUDA grid (num_dests=", d_count,
                           ", capacity=", cap, ", topk=", k, ")");
  const int32_t* ids = static_cast<const int32_t*>(idx.untyped_data());
  int32_t* red = static_cast<int32_t*>(reduce_idx->untyped_data());
  int32_t* src = static_cast<int32_t*>(send_src->untyped_data());
  int32_t* drop = static_cast<int32_t*>(num_dropped->untyped_data());
  DSJAX_RETURN_IF_ERROR(Status(cudaMemsetAsync(red, 0xFF, sizeof(int32_t) * t * d_count, st), op));
  DSJAX_RETURN_IF_ERROR(Status(cudaMemsetAsync(src, 0xFF, sizeof(int32_t) * d_count * cap, st), op));
  DSJAX_RETURN_IF_ERROR(Status(cudaMemsetAsync(drop, 0, sizeof(int32_t), st), op));
  ScanKernel<<<static_cast<unsigned>(d_count), kScanThreads, 0, st>>>(ids, t, k, per_dest, d_count, cap, red, src,
                                                                      drop, nullptr, nullptr);
  const int64_t n = d_count * cap * k;
  if (n > 0)
    FillSendMeta<<<Blocks(n, 256), 256, 0, st>>>(ids, static_cast<const float*>(w.untyped_data()), src, d_count * cap,
                                                 k, cap, per_dest, per_dest * d_count, local_ids,
                                                 static_cast<int32_t*>(send_idx->untyped_data()),
                                                 static_cast<float*>(send_w->untyped_data()));
  return Status(cudaGetLastError(), op);
}

ffi::Error LayoutCuda(cudaStream_t st, ffi::AnyBuffer idx, ffi::Result<ffi::AnyBuffer> per_rank,
                      ffi::Result<ffi::AnyBuffer> per_node, ffi::Result<ffi::AnyBuffer> per_expert,
                      ffi::Result<ffi::AnyBuffer> in_rank, int64_t num_experts, int64_t num_ranks,
                      int64_t ranks_per_node) {
  const char* op = "dsjax_deep_ep_get_dispatch_layout";
  RouteDims rd;
  DSJAX_RETURN_IF_ERROR(CheckTopk(op, idx, &rd));
  const int64_t t = rd.tokens, k = rd.topk;
  if (num_ranks < 1 || num_experts < 1 || num_experts % num_ranks || ranks_per_node < 1 || num_ranks % ranks_per_node)
    return InvalidArgument(op, ": need num_experts a multiple of num_ranks and ranks_per_node dividing it");
  const int64_t nodes = num_ranks / ranks_per_node;
  DSJAX_RETURN_IF_ERROR(ExpectDims(op, "num_tokens_per_rank", per_rank->dimensions(), {num_ranks}));
  DSJAX_RETURN_IF_ERROR(ExpectDims(op, "num_tokens_per_node", per_node->dimensions(), {nodes}));
  DSJAX_RETURN_IF_ERROR(ExpectDims(op, "num_tokens_per_expert", per_expert->dimensions(), {num_experts}));
  DSJAX_RETURN_IF_ERROR(ExpectDims(op, "is_token_in_rank", in_rank->dimensions(), {t, num_ranks}));
  int32_t* pr = static_cast<int32_t*>(per_rank->untyped_data());
  int32_t* pn = static_cast<int32_t*>(per_node->untyped_data());
  int32_t* pe = static_cast<int32_t*>(per_expert->untyped_data());
  DSJAX_RETURN_IF_ERROR(Status(cudaMemsetAsync(pr, 0, sizeof(int32_t) * num_ranks, st), op));
  DSJAX_RETURN_IF_ERROR(Status(cudaMemsetAsync(pn, 0, sizeof(int32_t) * nodes, st), op));
  DSJAX_RETURN_IF_ERROR(Status(cudaMemsetAsync(pe, 0, sizeof(int32_t) * num_experts, st), op));
  if (Blocks(t, 256) > 0x7FFFFFFF) return InvalidArgument(op, ": too many tokens for the CUDA grid (", t, ")");
  if (t > 0)
    LayoutKernel<<<Blocks(t, 256), 256, 0, st>>>(static_cast<const int32_t*>(idx.untyped_data()), t, k, num_experts,
                                                 num_ranks, ranks_per_node, pr, pn, pe,
                                                 static_cast<bool*>(in_rank->untyped_data()));
  return Status(cudaGetLastError(), op);
}

ffi::Error LlLayoutCuda(cudaStream_t st, ffi::AnyBuffer idx, ffi::Result<ffi::AnyBuffer> src_row,
                        ffi::Result<ffi::AnyBuffer> count, ffi::Result<ffi::AnyBuffer> pos, int64_t num_local) {
  const char* op = "dsjax_deep_ep_ll_layout";
  RouteDims rd;
  DSJAX_RETURN_IF_ERROR(CheckTopk(op, idx, &rd));
  const int64_t m = rd.tokens, k = rd.topk, l = num_local;
  if (l < 1 || l > 0x7FFFFFFF) return InvalidArgument(op, ": num_local_experts must be in [1, 2^31), got ", l);
  DSJAX_RETURN_IF_ERROR(ExpectDims(op, "src_row", src_row->dimensions(), {l * m}));
  DSJAX_RETURN_IF_ERROR(ExpectDims(op, "count", count->dimensions(), {l}));
  DSJAX_RETURN_IF_ERROR(ExpectDims(op, "pos", pos->dimensions(), {m, k}));
  int32_t* src = static_cast<int32_t*>(src_row->untyped_data());
  int32_t* ps = static_cast<int32_t*>(pos->untyped_data());
  DSJAX_RETURN_IF_ERROR(Status(cudaMemsetAsync(src, 0xFF, sizeof(int32_t) * l * m, st), op));
  DSJAX_RETURN_IF_ERROR(Status(cudaMemsetAsync(ps, 0xFF, sizeof(int32_t) * m * k, st), op));
  // Room for every row in every expert (cap = m): nothing is dropped.
  ScanKernel<<<static_cast<unsigned>(l), kScanThreads, 0, st>>>(static_cast<const int32_t*>(idx.untyped_data()), m,
                                                                k, 1, l, m, nullptr, src, nullptr, ps,
                                                                static_cast<int32_t*>(count->untyped_data()));
  return Status(cudaGetLastError(), op);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(DeepEpLayoutCuda, LayoutCuda,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("num_experts")
                                  .Attr<int64_t>("num_ranks")
                                  .Attr<int64_t>("ranks_per_node"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(DeepEpRouteCuda, RouteCuda,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
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

XLA_FFI_DEFINE_HANDLER_SYMBOL(DeepEpLlLayoutCuda, LlLayoutCuda,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("num_local_experts"));

DSJAX_REGISTER_FFI("dsjax_deep_ep_get_dispatch_layout", DeepEpLayoutCuda);
DSJAX_REGISTER_FFI("dsjax_deep_ep_route", DeepEpRouteCuda);
DSJAX_REGISTER_FFI("dsjax_deep_ep_ll_layout", DeepEpLlLayoutCuda);

}  // namespace dsjax::deep_ep
