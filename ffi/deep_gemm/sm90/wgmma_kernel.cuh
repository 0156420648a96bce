// The sm_90a FP8 GEMM kernel (1d2d scales: a 1x128, b 128x128) for the dense, m-grouped
// contiguous and m-grouped masked layouts: persistent, warp-specialised, TMA + mbarrier ring +
// WGMMA, FP32 promotion every 128 K. Host side and the algorithm's overview: fp8_gemm_wgmma.cu.
//
// Roles. Warp 0 of the producer warpgroup walks the CTA's units (wgmma_config.cuh, DecodeUnit)
// and, per pass and K block, waits for a free stage and has lane 0 issue the TMA loads of A
// (kBM x 128) and B (kBN x 128, or its kBN / kCluster rows multicast to the cluster). Each
// consumer warpgroup owns 64 rows x kBN columns of the tile: per K block it issues 4 wgmma
// m64nNk32 into a temporary fragment (scale-d 0 on the first), waits for them, releases the
// stage, and promotes acc += tmp * sa[row, kb] * sb[col block, kb] in f32.
//
// Pipeline invariants (the reason it neither races nor hangs):
//  * Both roles walk the same sequence (unit, pass, kb): units u = cluster_id, cluster_id +
//    num_clusters, ...; passes from NextPassGroup (read-only inputs); kb in [0, num_kb). Iteration
//    i uses stage i % S with phase bit (i / S) & 1, tracked as (stage, phase) counters that run
//    on across passes and units, so a stage ring never restarts.
//  * full[s] is initialised with count 1: the producer's arrive.expect_tx(kStageBytes) plus the
//    stage's bytes (A from this CTA's TMA; B from this and, with kCluster 2, the peer's
//    multicast; complete_tx may land before the expect_tx, the phase still waits for the
//    arrival). Boxes overhanging the tensors are zero-filled and count in full.
//  * empty[s] is initialised with count kEmptyArrivals = 4 * kConsumers * kCluster: one arrival
//    per consumer warp of every CTA of the cluster, each made after that warp's wgmma.wait_group 0
//    (the tensor cores have finished reading the stage): on its own CTA's barrier a CTA-local
//    arrive, on the peer's a cluster-scope release arrive (mapa address). A producer writes
//    stage s of every CTA of its cluster (multicast), so it waits until all of them released it.
//  * Consumers wait full[s] for parity `phase`; the producer waits empty[s] for parity
//    `phase ^ 1`, which a freshly initialised barrier satisfies (its "previous" phase counts as
//    complete): round 0 goes through without arrivals.
//  * Barrier initialisation is fenced (fence.mbarrier_init) and followed by a CTA (cluster)
//    barrier before any TMA or remote arrival can touch the barriers; with kCluster 2 all threads
//    of both CTAs meet again at a cluster barrier before exiting, so no multicast or remote
//    arrival targets a CTA that has exited.
//  * Every stage buffer starts on a 1024-byte boundary (swizzle atom), so the wgmma descriptors
//    use base offset 0, and the consumers' 64-row halves (8 KiB apart) and the multicast halves
//    of B (kBRowsPerCta * 128 bytes apart, a multiple of 1024) stay aligned.
#pragma once

#include <cuda.h>

#include <cstdint>
#include <type_traits>

#include "deep_gemm/sm90/ptx.cuh"
#include "deep_gemm/sm90/wgmma_config.cuh"
#include "deep_gemm/sm90/wgmma_epilogue.cuh"
#include "deep_gemm/sm90/wgmma_ops.cuh"

namespace dsjax::deep_gemm::sm90 {

// Stage ring position: stage index and the phase bit of its current round.
struct Ring {
  int stage = 0;
  uint32_t phase = 0;
  template <int S>
  __device__ __forceinline__ void Advance() {
    if (++stage == S) {
      stage = 0;
      phase ^= 1u;
    }
  }
};

template <class Cfg>
__device__ __forceinline__ void ProducerWarp(const CUtensorMap* tma_a, const CUtensorMap* tma_b,
                                             const Params& p, uint32_t base, uint32_t bar_base,
                                             uint32_t rank) {
  constexpr int S = Cfg::kStages;
  const int lane = threadIdx.x % 32;
  const int cluster_id = blockIdx.x / Cfg::kCluster;
  const int num_clusters = gridDim.x / Cfg::kCluster;
  Ring ring;
  for (int u = cluster_id; u < p.num_units; u += num_clusters) {
    const Unit t = DecodeUnit<Cfg::kCluster>(p, u);
    const int m_tile = t.m_unit * Cfg::kCluster + static_cast<int>(rank);
    const int64_t m0 = static_cast<int64_t>(m_tile) * Cfg::kBM;
    // Row of the 2-D A view (masked: group z's block of m_max rows). Host-checked to fit int32.
    const int32_t a_row = static_cast<int32_t>((p.mode == kMasked ? int64_t{t.z} * p.m : 0) + m0);
    for (int g = NextPassGroup<Cfg::kBM>(p, t.z, m0, -1); g != kNoGroup;
         g = NextPassGroup<Cfg::kBM>(p, t.z, m0, g)) {
      const int32_t b_row = static_cast<int32_t>((p.mode == kDense ? 0 : int64_t{g} * p.n) +
                                                 int64_t{t.n_tile} * Cfg::kBN +
                                                 int64_t{rank} * Cfg::kBRowsPerCta);
      for (int kb = 0; kb < p.num_kb; ++kb, ring.Advance<S>()) {
        const uint32_t full = bar_base + 8u * ring.stage;
        const uint32_t empty = bar_base + 8u * (S + ring.stage);
        MbarWait(empty, ring.phase ^ 1u);
        if (lane == 0) {
          const uint32_t dst = base + ring.stage * Cfg::kStageBytes;
          MbarArriveExpectTx(full, Cfg::kStageBytes);
          TmaLoad2d(dst, tma_a, full, kb * kBK, a_row);
          const uint32_t dst_b = dst + Cfg::kABytes + rank * Cfg::kBRowsPerCta * kBK;
          if constexpr (Cfg::kCluster == 1) {
            TmaLoad2d(dst_b, tma_b, full, kb * kBK, b_row);
          } else {
            TmaLoad2dMulticast(dst_b, tma_b, full, kb * kBK, b_row,
                               static_cast<uint16_t>((1u << Cfg::kCluster) - 1));
          }
        }
        __syncwarp();
      }
    }
  }
}

template <class Cfg>
__device__ __forceinline__ void ConsumerWarpgroup(const Params& p, uint32_t base,
                                                  uint32_t bar_base, uint32_t rank) {
  constexpr int S = Cfg::kStages, kBN = Cfg::kBN, kR = Cfg::kRegs;
  const int tid = threadIdx.x;
  const int cw = tid / kWgThreads - 1;  // which 64-row slice of the tile
  const int warp = (tid / 32) % 4, lane = tid % 32;
  // Tile rows of this thread: lr0 + 8 h, fragment registers i with (i / 2) % 2 == h.
  const int lr0 = cw * 64 + warp * 16 + lane / 4;
  const int cluster_id = blockIdx.x / Cfg::kCluster;
  const int num_clusters = gridDim.x / Cfg::kCluster;
  // Where this warp releases stages: its own CTA's empty barriers (a CTA-local arrival: the
  // producer that waits on them is in this CTA) and, in a cluster, the peer's (cluster-window
  // address of its barrier block, computed once: registers are tight).
  const uint32_t peer_bars = Cfg::kCluster > 1 ? MapaShared(bar_base, rank ^ 1u) : bar_base;

  float acc[kR], tmp[kR];
  Ring ring;
  for (int u = cluster_id; u < p.num_units; u += num_clusters) {
    const Unit t = DecodeUnit<Cfg::kCluster>(p, u);
    const int m_tile = t.m_unit * Cfg::kCluster + static_cast<int>(rank);
    const int64_t m0 = static_cast<int64_t>(m_tile) * Cfg::kBM;
    const int64_t n0 = static_cast<int64_t>(t.n_tile) * kBN;
    const int64_t row_base = p.mode == kMasked ? int64_t{t.z} * p.m : 0;  // of A, sa and d
    // sa of this thread's rows (r0 = m0 + lr0 and r0 + 8): one pointer and the second row's
    // offset; rows past m read the group's first row instead and are never stored. Row
    // ownership (masked_m, group tags) is re-derived in the epilogue rather than kept live
    // through the K loop: registers are tight at kBN = 192.
    const int64_t r0 = m0 + lr0;
    const float* sa0_ptr = p.sa + (row_base + (r0 < p.m ? r0 : 0)) * p.num_kb;
    const int sa1_off = r0 + 8 < p.m ? 8 * p.num_kb : 0;
    // b's scale blocks under this tile: nb0 for tile columns [0, split), nb0 + 1 after (when it
    // exists; past n the columns are never stored).
    const int nb0 = static_cast<int>(n0 / 128);
    const int split = 128 - static_cast<int>(n0 % 128);
    const int nb1 = nb0 + 1 < p.n_blocks ? nb0 + 1 : nb0;

    for (int g = NextPassGroup<Cfg::kBM>(p, t.z, m0, -1); g != kNoGroup;
         g = NextPassGroup<Cfg::kBM>(p, t.z, m0, g)) {
      const float* sb0_ptr = p.sb + g * p.sb_gs + static_cast<int64_t>(nb0) * p.num_kb;
      const int sb1_off = (nb1 - nb0) * p.num_kb;
#pragma unroll
      for (int i = 0; i < kR; ++i) acc[i] = 0.0f;

      // The K loop, compiled once per possible scale-block split of the tile's columns, so that
      // the promotion picks each column's scale at compile time (a run-time split cost ~100
      // extra instructions per K block at kBN = 160: products and selects per 8 columns).
      auto k_loop = [&](auto split_c) {
        constexpr int kSplit = decltype(split_c)::value;  // columns [0, kSplit) use block nb0
        for (int kb = 0; kb < p.num_kb; ++kb, ring.Advance<S>()) {
          // Scale loads do not depend on the stage: issued before the wait, so that their
          // latency hides behind it and the MMAs.
          const float sb0 = __ldg(sb0_ptr + kb);
          const float sb1 = kSplit < kBN ? __ldg(sb0_ptr + sb1_off + kb) : sb0;
          const float sa0 = __ldg(sa0_ptr + kb);
          const float sa1 = __ldg(sa0_ptr + sa1_off + kb);
          MbarWait(bar_base + 8u * ring.stage, ring.phase);  // full[stage]

          const uint32_t a_tile = base + ring.stage * Cfg::kStageBytes + cw * 64 * kBK;
          const uint32_t b_tile = base + ring.stage * Cfg::kStageBytes + Cfg::kABytes;
#pragma unroll
          for (int i = 0; i < kR; ++i) FenceOperand(tmp[i]);
          WgmmaFence();  // tmp was read by the previous promotion: order it before the MMAs
#pragma unroll
          for (int ks = 0; ks < kBK / 32; ++ks) {
            Wgmma<kBN>::Mma(tmp, MakeSmemDescSw128(a_tile + ks * 32),
                            MakeSmemDescSw128(b_tile + ks * 32), ks > 0 ? 1u : 0u);
          }
          WgmmaCommit();
          WgmmaWait<0>();
#pragma unroll
          for (int i = 0; i < kR; ++i) FenceOperand(tmp[i]);

          // The stage has been consumed by this warp's MMAs: release it to every producer that
          // writes into it.
          __syncwarp();
          if (lane == 0) {
            MbarArrive(bar_base + 8u * (S + ring.stage));  // empty[stage]
            if constexpr (Cfg::kCluster > 1) MbarArriveCluster(peer_bars + 8u * (S + ring.stage));
          }

          const float s00 = sa0 * sb0, s10 = sa1 * sb0;  // rows r0, r0 + 8; block nb0
          const float s01 = sa0 * sb1, s11 = sa1 * sb1;  // block nb1
#pragma unroll
          for (int j = 0; j < kBN / 8; ++j) {
            const float q0 = 8 * j < kSplit ? s00 : s01, q1 = 8 * j < kSplit ? s10 : s11;
            acc[4 * j + 0] = fmaf(tmp[4 * j + 0], q0, acc[4 * j + 0]);
            acc[4 * j + 1] = fmaf(tmp[4 * j + 1], q0, acc[4 * j + 1]);
            acc[4 * j + 2] = fmaf(tmp[4 * j + 2], q1, acc[4 * j + 2]);
            acc[4 * j + 3] = fmaf(tmp[4 * j + 3], q1, acc[4 * j + 3]);
          }
        }
      };
      // split = 128 - n0 % 128 is a multiple of gcd(kBN, 128): 32 at kBN = 160, 64 at 192;
      // kBN <= 128 never straddles (kSplit = kBN: one scale).
      using std::integral_constant;
      if constexpr (!Cfg::kTwoScaleBlocks) {
        k_loop(integral_constant<int, kBN>{});
      } else if constexpr (kBN == 192) {
        if (split == 64) k_loop(integral_constant<int, 64>{});
        else k_loop(integral_constant<int, 128>{});
      } else {
        static_assert(kBN == 160, "the splits below are those of kBN = 160");
        if (split == 32) k_loop(integral_constant<int, 32>{});
        else if (split == 64) k_loop(integral_constant<int, 64>{});
        else if (split == 96) k_loop(integral_constant<int, 96>{});
        else k_loop(integral_constant<int, 128>{});
      }

      // Epilogue of this pass: the rows that belong to group g.
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        if (RowPass(p, t.z, r0 + 8 * h) == g)
          StoreRowHalf<kBN>(p, acc, h, row_base + r0 + 8 * h, n0, lane, false);
      }
    }

    // Rows of no pass are zero: masked rows at or past masked_m, contiguous padding rows.
    if (p.mode != kDense) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t r = r0 + 8 * h;
        if (r < p.m && RowPass(p, t.z, r) == kNoGroup)
          StoreRowHalf<kBN>(p, acc, h, row_base + r, n0, lane, true);
      }
    }
  }
}

template <class Cfg>
__global__ void __launch_bounds__(Cfg::kThreads, 1)
    Fp8GemmWgmmaKernel(const __grid_constant__ CUtensorMap tma_a,
                       const __grid_constant__ CUtensorMap tma_b, const Params p) {
  constexpr int S = Cfg::kStages;
  extern __shared__ uint8_t smem_raw[];
  const uint32_t base = (SmemAddr(smem_raw) + 1023u) & ~1023u;
  const uint32_t bar_base = base + S * Cfg::kStageBytes;
  const int tid = threadIdx.x;
  if (tid == 0) {
    PrefetchTensorMap(&tma_a);
    PrefetchTensorMap(&tma_b);
    for (int s = 0; s < S; ++s) {
      MbarInit(bar_base + 8u * s, 1);
      MbarInit(bar_base + 8u * (S + s), Cfg::kEmptyArrivals);
    }
    FenceBarrierInit();
  }
  uint32_t rank = 0;
  if constexpr (Cfg::kCluster > 1) {
    rank = ClusterCtaRank();
    ClusterSync();  // the peer's barriers exist before any multicast or remote arrival
  } else {
    __syncthreads();
  }

  if (tid < kWgThreads) {
    if constexpr (Cfg::kSetMaxNReg) SetMaxNRegDec<Cfg::kProducerRegs>();
    if (tid < 32) ProducerWarp<Cfg>(&tma_a, &tma_b, p, base, bar_base, rank);
  } else {
    if constexpr (Cfg::kSetMaxNReg) SetMaxNRegInc<Cfg::kConsumerRegs>();
    ConsumerWarpgroup<Cfg>(p, base, bar_base, rank);
  }

  if constexpr (Cfg::kCluster > 1) ClusterSync();  // no CTA leaves while its peer may signal it
}

}  // namespace dsjax::deep_gemm::sm90
