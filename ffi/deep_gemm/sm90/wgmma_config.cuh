// Compile-time configuration, run-time parameters and the tile scheduler of the sm_90a WGMMA FP8
// GEMM (fp8_gemm_wgmma.cu). One configuration = (consumer warpgroups, BLOCK_N, cluster size).
//
// Shared-memory layout (dynamic window re-aligned by hand to 1024 bytes, the 128-byte swizzle
// atom): kStages stages of [A: kBM rows x 128 bytes][B: kBN rows x 128 bytes], then kStages full
// and kStages empty mbarriers (8 bytes each).
#pragma once

#include <cstdint>

namespace dsjax::deep_gemm::sm90 {

constexpr int kBK = 128;          // one scale group of K = one 128-byte swizzle row of FP8
constexpr int kWgThreads = 128;   // a warpgroup
constexpr int kRasterGroupM = 16; // M-tiles per raster group (see DecodeUnit)
constexpr int kNoGroup = 0x7FFFFFFF;

enum Mode : int { kDense = 0, kContiguous = 1, kMasked = 2 };

// kConsumers consumer warpgroups of 64 rows each (tile height kBM = 64 * kConsumers), one
// producer warpgroup (one warp of it issues the TMA loads), tile width kBN, and kCluster CTAs per
// cluster along M sharing the B tile through TMA multicast (each loads kBN / kCluster rows of it).
//
// Register budget (one CTA per SM):
//  * kConsumers == 2: 384 threads start capped at kEntryRegs = 168 registers
//    (__launch_bounds__(384, 1): 65536 / 384 rounded down to the allocation granularity of 8),
//    so the CTA owns 384 * 168 = 64512 registers, not the SM's 65536. setmaxnreg only moves
//    registers inside that per-CTA pool (PTX ISA "setmaxnreg": .inc blocks until the CTA's pool
//    can supply them), so producer + consumers must fit in 64512: the producer warpgroup drops
//    to kProducerRegs and the consumers rise to kConsumerRegs (24 / 240 or 40 / 232, the splits
//    of CUTLASS's and FlashAttention-3's 3-warpgroup kernels). A consumer holds acc[kBN / 2] and
//    tmp[kBN / 2] f32 fragments: 192 registers at kBN = 192, leaving 48 for addresses, scales
//    and loop state (kBN = 256 would need 256 for the fragments alone).
//  * kConsumers == 1: 256 threads may use 255 registers each with no reconfiguration.
template <int kConsumers_, int kBN_, int kCluster_>
struct Config {
  static constexpr int kConsumers = kConsumers_, kBN = kBN_, kCluster = kCluster_;
  static constexpr int kBM = 64 * kConsumers;
  static constexpr int kThreads = kWgThreads * (1 + kConsumers);
  static constexpr int kRegs = kBN / 2;  // f32 fragment registers per thread per m64 x kBN tile
  // Registers per thread at launch (ptxas gives a kernel with setmaxnreg exactly this cap; the
  // CTA's setmaxnreg pool is kThreads * kEntryRegs).
  static constexpr uint32_t kEntryRegs = 65536 / kThreads / 8 * 8;
  // Producer / consumer registers after setmaxnreg (multiples of 8, together at most the CTA's
  // pool: a budget over it leaves a consumer warp spinning in setmaxnreg.inc forever). The
  // consumers of kBN = 192 need 240 to keep the K loop free of spills, which leaves the producer
  // 24 (504 - 2 * 240); elsewhere 40 / 232 gives the producer (cluster rank, multicast, pass
  // search) room. With CUDA 13.0 no K loop touches local memory.
  // (Without setmaxnreg, kConsumers == 1, both stay at the entry cap.)
  static constexpr bool kSetMaxNReg = kConsumers == 2;
  static constexpr uint32_t kProducerRegs = !kSetMaxNReg ? kEntryRegs : kBN_ > 160 ? 24 : 40;
  static constexpr uint32_t kConsumerRegs =
      !kSetMaxNReg ? kEntryRegs
                   : (kThreads * kEntryRegs / kWgThreads - kProducerRegs) / kConsumers / 8 * 8;
  static constexpr uint32_t kABytes = kBM * kBK, kBBytes = kBN * kBK;
  static constexpr uint32_t kStageBytes = kABytes + kBBytes;
  // Rows of B each CTA of the cluster loads (and multicasts to all of them).
  static constexpr int kBRowsPerCta = kBN / kCluster;
  // 227 KiB of dynamic shared memory per block, less the 1024 bytes of re-alignment and room
  // for the barriers; at most 8 stages (more buys nothing once the ring covers the latency).
  static constexpr int kStages = (232448 - 1024 - 256) / kStageBytes < 8
                                     ? (232448 - 1024 - 256) / kStageBytes
                                     : 8;
  static constexpr uint32_t kBarrierBytes = 2 * kStages * sizeof(uint64_t);
  static constexpr uint32_t kSmemBytes = kStages * kStageBytes + kBarrierBytes + 1024;
  // Consumer warps that release a stage: every consumer warp of every CTA of the cluster, since
  // each CTA's producer writes its B rows into all of them.
  static constexpr uint32_t kEmptyArrivals = 4 * kConsumers * kCluster;
  // A tile may straddle two 128-column blocks of b's 128x128 scales (never three, see below).
  static constexpr bool kTwoScaleBlocks = kBN % 128 != 0 && kBN != 64;

  static_assert(kConsumers == 1 || kConsumers == 2, "one or two consumer warpgroups");
  static_assert(kBN % 8 == 0 && kBN >= 64 && kBN <= 192, "wgmma N is a multiple of 8; <= 192 "
                "keeps both f32 fragments in the consumer's 232 registers");
  // Straddling: n0 = t * kBN, so n0 % 128 is a multiple of g = gcd(kBN, 128) and at most
  // 128 - g; the tile then ends before (128 - g) + kBN <= 256 for every kBN allowed here
  // (64, 128: g = kBN, no straddle; 160: g = 32, 96 + 160 = 256; 192: g = 64, 64 + 192 = 256).
  static_assert(kBN == 64 || kBN == 128 || kBN == 160 || kBN == 192,
                "BLOCK_N must keep every tile within two 128-column scale blocks");
  static_assert(kCluster == 1 || kCluster == 2, "clusters of one or two CTAs");
  static_assert(kBRowsPerCta % 8 == 0, "each multicast half of B must be whole 8-row swizzle "
                "atoms, so that it starts on a 1024-byte boundary like a full box would");
  static_assert(kABytes % 1024 == 0 && kBBytes % 1024 == 0, "stages keep 1024-byte alignment");
  static_assert(kStages >= 2, "at least double buffering");
  static_assert(kSmemBytes <= 232448, "over the 227 KiB of dynamic shared memory per block");
  static_assert(!kSetMaxNReg ||
                    kProducerRegs * kWgThreads + kConsumerRegs * kWgThreads * kConsumers <=
                        kThreads * kEntryRegs,
                "register reconfiguration exceeds the CTA's register pool (threads x entry cap)");
  static_assert(!kSetMaxNReg || (kProducerRegs % 8 == 0 && kConsumerRegs % 8 == 0 &&
                                 kProducerRegs >= 24 && kConsumerRegs <= 256 &&
                                 kProducerRegs <= kEntryRegs && kConsumerRegs >= kEntryRegs),
                "setmaxnreg takes multiples of 8 in [24, 256]; .dec lowers, .inc raises the cap");
};

struct Params {
  const float* sa;       // [rows_a, num_kb]; masked: rows_a = G * m_max
  const float* sb;       // [G?, n_blocks, num_kb]
  const float* c;        // nullable, [m, n] f32 (dense only)
  void* d;               // [m, n] (dense, contiguous) or [G, m_max, n], bf16 or f32
  const int32_t* index;  // m_indices [m] (contiguous) or masked_m [G] (masked); else null
  int64_t m, n;          // m: rows of the row space (m_sum, or m_max for masked)
  int64_t sb_gs;         // per-group stride of sb (grouped layouts)
  int num_kb;            // ceil(k / 128)
  int n_blocks;          // ceil(n / 128): scale blocks of b along n
  int m_tiles, n_tiles;  // tiles of one group's row space
  int m_units;           // ceil(m_tiles / kCluster): units of work along M
  int num_units;         // z_count * m_units * n_tiles
  int groups, mode;
  bool d_bf16;
};

// One unit of work: kCluster vertically adjacent tiles sharing an n-tile (one per CTA of the
// cluster). Units are numbered group by group (the masked layout's z), and inside a group by a
// grouped raster: units [r * R * n_tiles, (r + 1) * R * n_tiles), R = kRasterGroupM / kCluster,
// cover M-units [R r, R r + R) column by column, so that the CTAs resident at one time (units
// u .. u + gridDim) share A and B K-slices in L2.
struct Unit {
  int z, m_unit, n_tile;
};

template <int kCluster>
__host__ __device__ __forceinline__ Unit DecodeUnit(const Params& p, int u) {
  constexpr int R = kRasterGroupM / kCluster;
  const int per_z = p.m_units * p.n_tiles;
  const int z = u / per_z;
  const int v = u - z * per_z;
  const int per_group = R * p.n_tiles;
  const int first_m = (v / per_group) * R;
  const int gm = p.m_units - first_m < R ? p.m_units - first_m : R;  // last group may be shorter
  const int in_group = v - (v / per_group) * per_group;
  return Unit{z, first_m + in_group % gm, in_group / gm};
}

// Rows [0, valid_rows) of group z's row space are computed: masked_m clamped to [0, m_max]
// (data-dependent errors cannot be returned without a device sync), else every row.
__device__ __forceinline__ int64_t ValidRows(const Params& p, int z) {
  if (p.mode != kMasked) return p.m;
  const int64_t v = p.index[z];
  return v < 0 ? 0 : (v > p.m ? p.m : v);
}

// The group tag of row r of the contiguous layout: m_indices[r] when in [0, G), else -1
// (padding: zero output). Rows past m are -1.
__device__ __forceinline__ int RowTag(const Params& p, int64_t r) {
  if (r >= p.m) return -1;
  const int v = __ldg(p.index + r);
  return (v >= 0 && v < p.groups) ? v : -1;
}

// The pass that stores row r of group z's row space (the group whose result it is), or kNoGroup
// for a row no pass stores: past m, masked rows at or past masked_m (zero output), contiguous
// padding rows (zero output).
__device__ __forceinline__ int RowPass(const Params& p, int z, int64_t r) {
  if (r >= p.m) return kNoGroup;
  if (p.mode == kDense) return 0;
  if (p.mode == kMasked) return r < ValidRows(p, z) ? z : kNoGroup;
  const int t = RowTag(p, r);
  return t < 0 ? kNoGroup : t;
}

// Passes of a tile: the smallest group of the tile greater than `after` (kNoGroup when none).
// Dense: group 0 once. Masked: group z once if the tile starts below valid_rows. Contiguous: the
// distinct valid tags of the tile's rows in increasing order (one for a 128-aligned layout; a
// misaligned layout is still computed exactly, a pass per group). The result depends only on
// read-only inputs, so the producer warp and every consumer warp derive the same pass list
// independently (no shared-memory handoff between the roles). Must be called by a whole
// converged warp (warp reduction).
template <int kBM>
__device__ __forceinline__ int NextPassGroup(const Params& p, int z, int64_t m0, int after) {
  if (p.mode == kDense) return after < 0 ? 0 : kNoGroup;
  if (p.mode == kMasked) return (after < 0 && m0 < ValidRows(p, z)) ? z : kNoGroup;
  const int lane = threadIdx.x % 32;
  int best = kNoGroup;
#pragma unroll
  for (int j = 0; j < kBM / 32; ++j) {
    const int t = RowTag(p, m0 + lane + 32 * j);
    if (t > after && t < best) best = t;
  }
  return __reduce_min_sync(0xFFFFFFFFu, best);
}

}  // namespace dsjax::deep_gemm::sm90
