// Hopper (sm_90a) FP8 GEMMs with TMA + mbarrier pipeline + WGMMA, for the three 1d2d layouts
// (a: 1x128 scales, b: 128x128 scales): dense `fp8_gemm_nt` (D = A . B^T (+ c)), and the MoE
// m-grouped contiguous (rows tagged with m_indices) and masked ([G, m_max] rows, masked_m valid)
// layouts; bf16 or f32 out.
//
// Design after DeepGEMM's sm90 FP8 kernels (deepseek-ai/DeepGEMM, impls/sm90_fp8_gemm_1d2d.cuh)
// and DeepSeek-V3 §3.3.2, written from the PTX ISA: warp specialisation with one producer
// warpgroup (one thread issues TMA loads of 128-wide K blocks of A and B into a ring of shared
// memory stages) and one or two consumer warpgroups (each owns 64 rows x 128 columns of the
// output tile). Per K block a consumer issues 4 wgmma m64n128k32 into a temporary f32 fragment
// (scale-d = 0 on the first, so the block starts from zero), waits for them, releases the stage,
// and promotes: acc += tmp * sa[row, kb] * sb[n_block, kb] in f32 (the "promotion every 128 K"
// that keeps FP8 accumulation error from growing with K). The epilogue adds c and stores bf16/f32
// straight from registers.
//
// A CTA owns one output tile and runs one "pass" (mainloop + epilogue) per group present in it:
// dense: one pass; masked: one pass (none when the tile lies past masked_m[g]); contiguous: one
// per distinct valid group among the tile's rows, in increasing order (one for a 128-aligned
// layout; a misaligned layout is still computed exactly, a pass per group). Each pass stores
// only the rows that belong to it; afterwards rows of no pass (masked rows past masked_m,
// contiguous rows tagged -1 or out of [0, G)) are written as zeros. The stage ring runs on
// across passes (iteration counter `it`), so producer and consumers stay in lockstep.
//
// Invariants relied on (checked by the host code or by construction):
//  * BLOCK_K = 128 = one scale group = one 128-byte swizzle row; BLOCK_N = 128, so an output tile
//    lies inside one 128-row block of b and needs one sb scalar per K block.
//  * k % 16 == 0 (TMA global strides are multiples of 16 bytes) and k > 0; tails of m, n and k
//    are zero-filled by TMA (zeros add nothing to the dot products), and scale loads and stores
//    are guarded by row/column bounds. Grouped operands are viewed as 2-D [G * rows, k] tensors;
//    a box that overhangs a group reads the next group's rows, which no pass of this group stores.
//  * Every stage buffer starts on a 1024-byte boundary (128B-swizzle atom), so the wgmma
//    descriptors use base offset 0 and the consumers' 64-row halves (8 KiB apart) stay aligned.
//  * Pipeline: full[s] expects 1 arrival (the producer's arrive.expect_tx) + the stage's bytes;
//    empty[s] expects one arrival per consumer warp. Iteration `it` uses stage it % S in round
//    it / S; consumers wait full[s] for parity (round & 1), the producer waits empty[s] for
//    parity ((round & 1) ^ 1), which lets round 0 through on fresh barriers.
//  * A consumer warp arrives on empty[s] only after its wgmma.wait_group 0, i.e. after the tensor
//    cores finished reading the stage, so the producer never overwrites data being read.
//  * The pass list is computed by all threads before the warp roles split, so producer and
//    consumers iterate over the same passes and K blocks.
// Tiles are rasterised in groups of 16 M-tiles so that the CTAs resident at one time share A and
// B K-slices in L2 (no persistent scheduler, no TMA multicast yet).
//
// Data-dependent layout errors cannot be returned without a device sync, so (as in gemm.cu):
// m_indices outside [0, G) are padding rows (zero output) and masked_m is clamped to [0, m_max].
#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <mutex>

#include "common/ffi_common.h"
#include "common/registry.h"
#include "deep_gemm/gemm_common.h"
#include "deep_gemm/sm90/ptx.cuh"

namespace dsjax::deep_gemm::sm90 {
namespace {

constexpr int kBN = 128, kBK = 128, kWgThreads = 128, kRasterGroupM = 16;

enum Mode : int { kDense = 0, kContiguous = 1, kMasked = 2 };

// kConsumers consumer warpgroups of 64 rows each: the tile has 64 * kConsumers rows.
// (256-row tiles, each consumer running two 64-row waves per K block, would cut the B traffic per
// FLOP, but with 384 threads ptxas caps the kernel at 168 registers and the two accumulator sets
// spill: 448 bytes of stack with CUDA 13.0, even with setmaxnreg. A TMA-multicast cluster is the
// better next step.)
template <int kConsumers>
struct Config {
  static constexpr int kBM = 64 * kConsumers;
  static constexpr int kThreads = kWgThreads * (1 + kConsumers);
  static constexpr uint32_t kABytes = kBM * kBK, kBBytes = kBN * kBK;
  static constexpr uint32_t kStageBytes = kABytes + kBBytes;  // both multiples of 1024
  static constexpr int kStages = kConsumers == 2 ? 6 : 8;     // ~192 KiB of the 227 KiB
  static constexpr uint32_t kBarrierBytes = 2 * kStages * sizeof(uint64_t);
  // Per-tile row tags, first-occurrence flags and the sorted group list (contiguous layout).
  static constexpr uint32_t kMetaBytes = 3 * kBM * sizeof(int);
  // + 1024: the dynamic shared window is re-aligned by hand to the swizzle atom.
  static constexpr uint32_t kSmemBytes = kStages * kStageBytes + kBarrierBytes + kMetaBytes + 1024;
  static_assert(kABytes % 1024 == 0 && kBBytes % 1024 == 0, "stages must keep 1024-byte alignment");
  static_assert(kSmemBytes <= 232448, "over the 227 KiB of dynamic shared memory per block");
  static_assert(kBM <= kThreads, "one thread per tile row in the pass setup");
};

struct Params {
  const float* sa;       // [rows_a, num_kb]; masked: rows_a = G * m_max
  const float* sb;       // [G?, ceil(n/128), num_kb]
  const float* c;        // nullable, [m, n] f32 (dense only)
  void* d;               // [m, n] (dense, contiguous) or [G, m_max, n], bf16 or f32
  const int32_t* index;  // m_indices [m] (contiguous) or masked_m [G] (masked); else null
  int64_t m, n;          // m: rows of the row space (m_sum, or m_max for masked)
  int64_t sb_gs;         // per-group stride of sb (grouped layouts)
  int num_kb, m_tiles, n_tiles, groups, mode;
  bool d_bf16;
};

__device__ __forceinline__ void StorePair(const Params& p, int64_t row, int64_t col, float v0,
                                          float v1, bool vec) {
  const int64_t o = row * p.n + col;
  if (p.c != nullptr) {
    v0 += p.c[o];
    if (col + 1 < p.n) v1 += p.c[o + 1];
  }
  if (p.d_bf16) {
    __nv_bfloat16* d = static_cast<__nv_bfloat16*>(p.d) + o;
    if (vec) {
      *reinterpret_cast<__nv_bfloat162*>(d) = __floats2bfloat162_rn(v0, v1);
    } else {
      d[0] = __float2bfloat16_rn(v0);
      if (col + 1 < p.n) d[1] = __float2bfloat16_rn(v1);
    }
  } else {
    float* d = static_cast<float*>(p.d) + o;
    if (vec) {
      *reinterpret_cast<float2*>(d) = make_float2(v0, v1);
    } else {
      d[0] = v0;
      if (col + 1 < p.n) d[1] = v1;
    }
  }
}

template <int kConsumers>
__global__ void __launch_bounds__(Config<kConsumers>::kThreads, 1)
    Fp8GemmWgmmaKernel(const __grid_constant__ CUtensorMap tma_a,
                       const __grid_constant__ CUtensorMap tma_b, const Params p) {
  using Cfg = Config<kConsumers>;
  constexpr int S = Cfg::kStages, kBM = Cfg::kBM;
  extern __shared__ uint8_t smem_raw[];
  const uint32_t raw = SmemAddr(smem_raw);
  const uint32_t base = (raw + 1023u) & ~1023u;
  const uint32_t bar_base = base + S * Cfg::kStageBytes;
  auto full_bar = [&](int s) { return bar_base + 8u * s; };
  auto empty_bar = [&](int s) { return bar_base + 8u * (S + s); };
  int* row_tag = reinterpret_cast<int*>(smem_raw + (bar_base + Cfg::kBarrierBytes - raw));
  int* first_flag = row_tag + kBM;
  int* group_list = first_flag + kBM;

  // Grouped rasterisation: blocks [g * 16 * n_tiles, (g + 1) * 16 * n_tiles) cover M-tiles
  // [16 g, 16 g + gm) column by column. blockIdx.y is the group of the masked layout.
  const int pid = blockIdx.x;
  const int per_group = kRasterGroupM * p.n_tiles;
  const int first_m = (pid / per_group) * kRasterGroupM;
  const int gm = min(p.m_tiles - first_m, kRasterGroupM);
  const int in_group = pid % per_group;
  const int m_tile = first_m + in_group % gm;
  const int n_tile = in_group / gm;
  const int m0 = m_tile * kBM, n0 = n_tile * kBN;
  const int z = blockIdx.y;
  const int tid = threadIdx.x;

  // ---------------- passes of this tile (all threads, before the roles split)
  // valid_rows: rows [0, valid_rows) of the row space are computed (masked: masked_m clamped).
  int64_t valid_rows = p.m;
  int num_passes = 1;
  if (p.mode == kMasked) {
    valid_rows = min(static_cast<int64_t>(max(p.index[z], 0)), p.m);
    num_passes = m0 < valid_rows ? 1 : 0;
  }
  if (tid == 0) {
    PrefetchTensorMap(&tma_a);
    PrefetchTensorMap(&tma_b);
    for (int s = 0; s < S; ++s) {
      MbarInit(full_bar(s), 1);
      MbarInit(empty_bar(s), 4 * kConsumers);
    }
    FenceBarrierInit();
  }
  if (p.mode == kContiguous) {
    if (tid < kBM) {
      const int64_t r = m0 + tid;
      int v = r < p.m ? p.index[r] : -1;
      row_tag[tid] = (v >= 0 && v < p.groups) ? v : -1;
    }
    __syncthreads();
    bool first = false;
    if (tid < kBM && row_tag[tid] >= 0) {
      first = true;
      for (int t = 0; t < tid && first; ++t) first = row_tag[t] != row_tag[tid];
    }
    if (tid < kBM) first_flag[tid] = first;
    num_passes = __syncthreads_count(first);  // also publishes first_flag
    if (first) {
      int rank = 0;
      for (int t = 0; t < kBM; ++t) rank += first_flag[t] && row_tag[t] < row_tag[tid];
      group_list[rank] = row_tag[tid];
    }
  }
  __syncthreads();
  auto pass_group = [&](int pass) {
    return p.mode == kContiguous ? group_list[pass] : (p.mode == kMasked ? z : 0);
  };
  // Row of the 2-D A / sa view where this tile starts (masked: group z's block of m_max rows).
  const int64_t a_row0 = (p.mode == kMasked ? static_cast<int64_t>(z) * p.m : 0) + m0;

  const int wg = tid / kWgThreads;
  if (wg == 0) {
    // ---------------- producer warpgroup
    if (tid == 0) {
      int it = 0;
      for (int pass = 0; pass < num_passes; ++pass) {
        const int g = pass_group(pass);
        const int32_t b_row = static_cast<int32_t>((p.mode == kDense ? 0 : g * p.n) + n0);
        for (int kb = 0; kb < p.num_kb; ++kb, ++it) {
          const int s = it % S;
          const uint32_t round = static_cast<uint32_t>(it / S);
          MbarWait(empty_bar(s), (round & 1u) ^ 1u);
          const uint32_t dst = base + s * Cfg::kStageBytes;
          MbarArriveExpectTx(full_bar(s), Cfg::kStageBytes);
          TmaLoad2d(dst, &tma_a, full_bar(s), kb * kBK, static_cast<int32_t>(a_row0));
          TmaLoad2d(dst + Cfg::kABytes, &tma_b, full_bar(s), kb * kBK, b_row);
        }
      }
    }
    return;
  }

  // ---------------- consumer warpgroups
  // (No setmaxnreg: the consumers fit in the 168 registers a 384-thread block gets, so the
  // register split is left to the launch; see Config.)
  const int cw = wg - 1;  // which 64-row slice of the tile
  const int warp = (tid / 32) % 4, lane = tid % 32;
  // Tile rows of this thread: lr[h] = lr0 + 8 h, fragment registers i with (i / 2) % 2 == h.
  const int lr0 = cw * 64 + warp * 16 + lane / 4;
  const bool vec_ok = (p.n % 2) == 0;  // pairs of columns are 4/8-byte aligned
  // Output rows of the masked layout are offset by the group's block.
  const int64_t d_base = p.mode == kMasked ? static_cast<int64_t>(z) * p.m : 0;
  bool in[2];
  const float* sa_ptr[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int lr = lr0 + 8 * h;
    in[h] = m0 + lr < p.m;
    sa_ptr[h] = p.sa + (a_row0 + (in[h] ? lr : 0)) * p.num_kb;
  }

  float acc[64], tmp[64];
  int it = 0;
  for (int pass = 0; pass < num_passes; ++pass) {
    const int g = pass_group(pass);
    const float* sb_ptr = p.sb + g * p.sb_gs + static_cast<int64_t>(n_tile) * p.num_kb;
#pragma unroll
    for (int i = 0; i < 64; ++i) acc[i] = 0.0f;

    for (int kb = 0; kb < p.num_kb; ++kb, ++it) {
      const int s = it % S;
      const uint32_t round = static_cast<uint32_t>(it / S);
      // Scale loads are independent of the stage: issue them before waiting so that their
      // latency overlaps the barrier wait and the MMAs.
      const float sb = __ldg(sb_ptr + kb);
      const float sa0 = in[0] ? __ldg(sa_ptr[0] + kb) : 0.0f;
      const float sa1 = in[1] ? __ldg(sa_ptr[1] + kb) : 0.0f;
      MbarWait(full_bar(s), round & 1u);

      const uint32_t a_tile = base + s * Cfg::kStageBytes + cw * 64 * kBK;
      const uint32_t b_tile = base + s * Cfg::kStageBytes + Cfg::kABytes;
#pragma unroll
      for (int i = 0; i < 64; ++i) FenceOperand(tmp[i]);
      WgmmaFence();  // tmp was read by the previous promotion: order it before the MMAs write it
#pragma unroll
      for (int ks = 0; ks < kBK / 32; ++ks) {
        WgmmaM64N128K32(tmp, MakeSmemDescSw128(a_tile + ks * 32),
                        MakeSmemDescSw128(b_tile + ks * 32), ks > 0);
      }
      WgmmaCommit();
      WgmmaWait<0>();
#pragma unroll
      for (int i = 0; i < 64; ++i) FenceOperand(tmp[i]);

      // The stage has been consumed by this warp's MMAs: hand it back to the producer.
      __syncwarp();
      if (lane == 0) MbarArrive(empty_bar(s));

      const float s0 = sa0 * sb, s1 = sa1 * sb;
#pragma unroll
      for (int i = 0; i < 64; ++i) acc[i] = fmaf(tmp[i], (i & 2) ? s1 : s0, acc[i]);
    }

    // Epilogue of this pass: (+ c), convert, store the rows that belong to group g.
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int lr = lr0 + 8 * h;
      const int64_t r = m0 + lr;
      bool own = in[h];
      if (p.mode == kMasked) own = r < valid_rows;
      if (p.mode == kContiguous) own = own && row_tag[lr] == g;
      if (!own) continue;
#pragma unroll
      for (int j = 0; j < kBN / 8; ++j) {
        const int64_t col = n0 + j * 8 + 2 * (lane % 4);
        if (col >= p.n) continue;
        StorePair(p, d_base + r, col, acc[4 * j + 2 * h], acc[4 * j + 2 * h + 1],
                  vec_ok && col + 1 < p.n);
      }
    }
  }

  // Rows of no pass are zero: masked rows at or past masked_m, contiguous padding rows.
  if (p.mode != kDense) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int lr = lr0 + 8 * h;
      const int64_t r = m0 + lr;
      const bool zero = in[h] && (p.mode == kMasked ? r >= valid_rows : row_tag[lr] < 0);
      if (!zero) continue;
      for (int j = 0; j < kBN / 8; ++j) {
        const int64_t col = n0 + j * 8 + 2 * (lane % 4);
        if (col >= p.n) continue;
        StorePair(p, d_base + r, col, 0.0f, 0.0f, vec_ok && col + 1 < p.n);
      }
    }
  }
}

// ---------------------------------------------------------------- host side
// What this kernel accepts beyond the shared shape contract (gemm_common.h). Python
// (dsjax/deep_gemm/_gemm_ffi.py, wgmma_unsupported_reason) routes everything else to the mma
// kernel, so these errors only fire when a target is called directly. Any m, n and G work.
ffi::Error CheckWgmmaSupported(const char* op, int64_t k, bool b_per_row) {
  if (b_per_row)
    return InvalidArgument(op, ": b_per_row must be false (the WGMMA kernel implements 128x128 b "
                               "scales; fp8_gemm_nt_1d1d runs on the mma kernel), got true");
  if (k <= 0 || k % 16 != 0)
    return InvalidArgument(op, ": k must be a positive multiple of 16 (TMA needs 16-byte row "
                               "strides), got k=", k);
  return ffi::Error::Success();
}

PFN_cuTensorMapEncodeTiled_v12000 EncodeFn(cudaError_t* err) {
  // The driver entry point is looked up through the runtime, so that the module needs no link
  // against libcuda (cudart is linked statically).
  static PFN_cuTensorMapEncodeTiled_v12000 fn = nullptr;
  static cudaError_t status = cudaSuccess;
  static std::once_flag once;
  std::call_once(once, [] {
    void* ptr = nullptr;
    cudaDriverEntryPointQueryResult q = cudaDriverEntryPointSymbolNotFound;
    status = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &ptr, 12000,
                                              cudaEnableDefault, &q);
    if (status == cudaSuccess && q != cudaDriverEntryPointSuccess) status = cudaErrorSymbolNotFound;
    if (status == cudaSuccess) fn = reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(ptr);
  });
  *err = status;
  return fn;
}

// A K-major FP8 matrix [rows, k] as a 2-D tensor map with (128 x box_rows) boxes, 128B swizzle,
// zero fill out of bounds.
ffi::Error EncodeKMajor(const char* op, const char* name, CUtensorMap* map, const void* ptr,
                        int64_t rows, int64_t k, uint32_t box_rows) {
  cudaError_t err;
  auto encode = EncodeFn(&err);
  if (encode == nullptr)
    return ffi::Error(ffi::ErrorCode::kInternal,
                      StrCat(op, ": cuTensorMapEncodeTiled is unavailable from the driver (",
                             cudaGetErrorString(err), ")"));
  cuuint64_t dims[2] = {static_cast<cuuint64_t>(k), static_cast<cuuint64_t>(rows)};
  cuuint64_t strides[1] = {static_cast<cuuint64_t>(k)};  // bytes; k % 16 == 0 checked by caller
  cuuint32_t box[2] = {static_cast<cuuint32_t>(kBK), box_rows};
  cuuint32_t elem_strides[2] = {1, 1};
  CUresult r = encode(map, CU_TENSOR_MAP_DATA_TYPE_UINT8, 2, const_cast<void*>(ptr), dims, strides,
                      box, elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                      CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS)
    return ffi::Error(ffi::ErrorCode::kInternal,
                      StrCat(op, ": cuTensorMapEncodeTiled failed for ", name, " [", rows, ", ", k,
                             "] (CUresult ", static_cast<int>(r), ")"));
  return ffi::Error::Success();
}

// Launches one configuration. `a_rows` / `b_rows`: rows of the 2-D views of A and B (grouped
// operands flattened to [G * rows, k]); `grid_z`: groups of the masked layout (else 1).
template <int kConsumers>
ffi::Error LaunchConfig(cudaStream_t stream, const char* op, const void* a, int64_t a_rows,
                        const void* b, int64_t b_rows, int64_t k, int64_t grid_z, Params p) {
  using Cfg = Config<kConsumers>;
  const int64_t m_tiles = CeilDiv(p.m, Cfg::kBM), n_tiles = CeilDiv(p.n, kBN);
  // Tile indices, the grouped raster and TMA coordinates are int32 on the device.
  if (m_tiles * n_tiles > 0x7FFFFFFF || m_tiles + kRasterGroupM > 0x7FFFFFFF ||
      a_rows + Cfg::kBM > 0x7FFFFFFF || b_rows + kBN > 0x7FFFFFFF || grid_z > 65535)
    return InvalidArgument(op, ": problem too large for one launch (", m_tiles, " x ", n_tiles,
                           " tiles, ", grid_z, " groups, ", a_rows, " / ", b_rows, " rows)");
  p.m_tiles = static_cast<int>(m_tiles);
  p.n_tiles = static_cast<int>(n_tiles);
  CUtensorMap ma, mb;
  DSJAX_RETURN_IF_ERROR(EncodeKMajor(op, "a", &ma, a, a_rows, k, Cfg::kBM));
  DSJAX_RETURN_IF_ERROR(EncodeKMajor(op, "b", &mb, b, b_rows, k, kBN));
  auto kernel = Fp8GemmWgmmaKernel<kConsumers>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(Cfg::kSmemBytes));
  if (err != cudaSuccess)
    return ffi::Error(ffi::ErrorCode::kInternal,
                      StrCat(op, ": cannot reserve ", Cfg::kSmemBytes,
                             " bytes of shared memory: ", cudaGetErrorString(err)));
  const dim3 grid(static_cast<unsigned>(m_tiles * n_tiles), static_cast<unsigned>(grid_z));
  kernel<<<grid, Cfg::kThreads, Cfg::kSmemBytes, stream>>>(ma, mb, p);
  err = cudaGetLastError();
  if (err != cudaSuccess)
    return ffi::Error(ffi::ErrorCode::kInternal,
                      StrCat(op, ": CUDA launch failed: ", cudaGetErrorString(err)));
  return ffi::Error::Success();
}

// Checks what TMA needs of the operands, then picks the tile height: one consumer warpgroup
// (64-row tiles) when the row space has at most 64 rows (decode-sized m wastes no MMA rows),
// else two (128-row tiles).
ffi::Error Launch(cudaStream_t stream, const char* op, const ffi::AnyBuffer& a, int64_t a_rows,
                  const ffi::AnyBuffer& b, int64_t b_rows, int64_t k, bool b_per_row,
                  int64_t grid_z, Params p) {
  DSJAX_RETURN_IF_ERROR(CheckWgmmaSupported(op, k, b_per_row));
  if (p.m == 0 || p.n == 0 || grid_z == 0) return ffi::Error::Success();
  for (const ffi::AnyBuffer* x : {&a, &b}) {
    if (reinterpret_cast<uintptr_t>(x->untyped_data()) % 16 != 0)
      return InvalidArgument(op, ": TMA needs 16-byte aligned operand addresses; ",
                             x == &a ? "a" : "b", " is at ", x->untyped_data());
  }
  const int64_t num_kb = CeilDiv(k, kGroup);
  if (num_kb > 0x7FFFFFFF / kBK) return InvalidArgument(op, ": k too large (", k, ")");
  p.num_kb = static_cast<int>(num_kb);
  const void* pa = a.untyped_data();
  const void* pb = b.untyped_data();
  if (p.m <= 64) return LaunchConfig<1>(stream, op, pa, a_rows, pb, b_rows, k, grid_z, p);
  return LaunchConfig<2>(stream, op, pa, a_rows, pb, b_rows, k, grid_z, p);
}

const float* F32(const ffi::AnyBuffer& x) { return static_cast<const float*>(x.untyped_data()); }
const int32_t* S32(const ffi::AnyBuffer& x) {
  return static_cast<const int32_t*>(x.untyped_data());
}

ffi::Error DenseWgmma(cudaStream_t stream, ffi::AnyBuffer a, ffi::AnyBuffer sa, ffi::AnyBuffer b,
                      ffi::AnyBuffer sb, ffi::AnyBuffer c, ffi::Result<ffi::AnyBuffer> d,
                      bool b_per_row, bool has_c) {
  const char* op = "dsjax_deep_gemm_fp8_gemm_nt_wgmma";
  GemmDims dims;
  DSJAX_RETURN_IF_ERROR(CheckDenseShapes(op, a, sa, b, sb, c, *d, b_per_row, has_c, &dims));
  Params p{};
  p.sa = F32(sa);
  p.sb = F32(sb);
  p.c = has_c ? F32(c) : nullptr;
  p.d = d->untyped_data();
  p.m = dims.m;
  p.n = dims.n;
  p.groups = 1;
  p.mode = kDense;
  p.d_bf16 = d->element_type() == ffi::DataType::BF16;
  return Launch(stream, op, a, dims.m, b, dims.n, dims.k, b_per_row, 1, p);
}

ffi::Error ContiguousWgmma(cudaStream_t stream, ffi::AnyBuffer a, ffi::AnyBuffer sa,
                           ffi::AnyBuffer b, ffi::AnyBuffer sb, ffi::AnyBuffer m_indices,
                           ffi::Result<ffi::AnyBuffer> d) {
  const char* op = "dsjax_deep_gemm_m_grouped_fp8_gemm_nt_contiguous_wgmma";
  GemmDims dims;
  DSJAX_RETURN_IF_ERROR(CheckContiguousShapes(op, a, sa, b, sb, m_indices, *d, &dims));
  if (dims.groups > 0x7FFFFFFF) return InvalidArgument(op, ": too many groups (", dims.groups, ")");
  Params p{};
  p.sa = F32(sa);
  p.sb = F32(sb);
  p.d = d->untyped_data();
  p.index = S32(m_indices);
  p.m = dims.m;
  p.n = dims.n;
  p.sb_gs = CeilDiv(dims.n, kGroup) * CeilDiv(dims.k, kGroup);
  p.groups = static_cast<int>(dims.groups);
  p.mode = kContiguous;
  p.d_bf16 = d->element_type() == ffi::DataType::BF16;
  if (dims.groups == 0 && dims.m > 0 && dims.n > 0) {
    // Every row is padding (and B has no rows to describe to TMA): the output is zeros.
    DSJAX_RETURN_IF_ERROR(CheckWgmmaSupported(op, dims.k, false));
    const size_t bytes = static_cast<size_t>(dims.m * dims.n) * (p.d_bf16 ? 2 : 4);
    cudaError_t err = cudaMemsetAsync(p.d, 0, bytes, stream);
    if (err != cudaSuccess)
      return ffi::Error(ffi::ErrorCode::kInternal, StrCat(op, ": ", cudaGetErrorString(err)));
    return ffi::Error::Success();
  }
  return Launch(stream, op, a, dims.m, b, dims.groups * dims.n, dims.k, false, 1, p);
}

ffi::Error MaskedWgmma(cudaStream_t stream, ffi::AnyBuffer a, ffi::AnyBuffer sa, ffi::AnyBuffer b,
                       ffi::AnyBuffer sb, ffi::AnyBuffer masked_m, ffi::Result<ffi::AnyBuffer> d) {
  const char* op = "dsjax_deep_gemm_m_grouped_fp8_gemm_nt_masked_wgmma";
  GemmDims dims;
  DSJAX_RETURN_IF_ERROR(CheckMaskedShapes(op, a, sa, b, sb, masked_m, *d, &dims));
  Params p{};
  p.sa = F32(sa);
  p.sb = F32(sb);
  p.d = d->untyped_data();
  p.index = S32(masked_m);
  p.m = dims.m;  // m_max
  p.n = dims.n;
  p.sb_gs = CeilDiv(dims.n, kGroup) * CeilDiv(dims.k, kGroup);
  p.groups = static_cast<int>(dims.groups);
  p.mode = kMasked;
  p.d_bf16 = d->element_type() == ffi::DataType::BF16;
  return Launch(stream, op, a, dims.groups * dims.m, b, dims.groups * dims.n, dims.k, false,
                dims.groups, p);
}

}  // namespace
}  // namespace dsjax::deep_gemm::sm90

namespace dsjax::deep_gemm {

// Same operands and attributes as the mma targets of gemm.cu, so Python swaps the target name
// and nothing else.
XLA_FFI_DEFINE_HANDLER_SYMBOL(Fp8GemmNtWgmmaCuda, sm90::DenseWgmma,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<bool>("b_per_row")
                                  .Attr<bool>("has_c"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(MGroupedContiguousWgmmaCuda, sm90::ContiguousWgmma,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(MGroupedMaskedWgmmaCuda, sm90::MaskedWgmma,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());

DSJAX_REGISTER_FFI("dsjax_deep_gemm_fp8_gemm_nt_wgmma", Fp8GemmNtWgmmaCuda);
DSJAX_REGISTER_FFI("dsjax_deep_gemm_m_grouped_fp8_gemm_nt_contiguous_wgmma",
                   MGroupedContiguousWgmmaCuda);
DSJAX_REGISTER_FFI("dsjax_deep_gemm_m_grouped_fp8_gemm_nt_masked_wgmma", MGroupedMaskedWgmmaCuda);

}  // namespace dsjax::deep_gemm
