// Thin inline-PTX wrappers for the sm_90a features the WGMMA GEMM uses: mbarriers, TMA tensor
// loads (plain and cluster multicast), cluster addressing, setmaxnreg and the wgmma fences and
// shared-memory descriptors (the MMAs themselves are in wgmma_ops.cuh).
//
// Semantics follow the PTX ISA (sections "mbarrier", "cp.async.bulk.tensor" and "wgmma") and
// CUTLASS's cute/arch/*_sm90*.hpp for the descriptor bit layout; the code is ours.
// Every shared-memory address here is a 32-bit offset in the CTA's shared window (cvta), which is
// what the PTX state spaces `.shared::cta` / `.shared::cluster` expect.
#pragma once

#include <cuda.h>  // CUtensorMap (a type only: nothing from libcuda is linked)

#include <cstdint>

namespace dsjax::deep_gemm::sm90 {

__device__ __forceinline__ uint32_t SmemAddr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// ---------------------------------------------------------------- mbarrier
__device__ __forceinline__ void MbarInit(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(count) : "memory");
}

// Makes the barrier initialisation visible to the async proxy (TMA completes transactions on
// these barriers) and to the other threads, before anyone uses them.
__device__ __forceinline__ void FenceBarrierInit() {
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
}

// One arrival plus `bytes` of expected transaction count for the current phase.
__device__ __forceinline__ void MbarArriveExpectTx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes)
               : "memory");
}

__device__ __forceinline__ void MbarArrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(bar) : "memory");
}

// Blocks until the phase with parity `parity` has completed. A freshly initialised barrier is in
// phase 0, and waiting for parity 1 returns at once (the "previous" phase counts as complete):
// that is how the producer's first pass over the empty barriers goes through.
// A wait that lasts ~2^32 cycles (over 2 s at Hopper's ~1.98 GHz; a correct pipeline waits
// microseconds, even behind a whole tile's epilogue) means a lost TMA transaction or arrival: it
// traps, so the caller gets a CUDA error instead of a hang that would eat a GPU session.
__device__ __forceinline__ void MbarWait(uint32_t bar, uint32_t parity) {
  uint32_t done = 0;
  long long start = 0;
  for (;;) {
    asm volatile(
        "{\n"
        ".reg .pred p;\n"
        "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
        "selp.u32 %0, 1, 0, p;\n"
        "}\n"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
    if (done) return;
    const long long now = clock64();
    if (start == 0) {
      start = now;
    } else if (now - start > (1ll << 32)) {
      __trap();  // no printf: a call inside the kernel would serialise the wgmma pipeline
    }
  }
}

// ---------------------------------------------------------------- TMA
__device__ __forceinline__ void PrefetchTensorMap(const CUtensorMap* map) {
  asm volatile("prefetch.tensormap [%0];" ::"l"(reinterpret_cast<uint64_t>(map)) : "memory");
}

// Loads the box at (c0 = innermost coordinate, c1) of a 2-D tensor map into shared memory and
// completes the box's full byte count on `bar` (also for boxes that overhang the tensor: the
// out-of-bounds part is zero-filled and still counted).
__device__ __forceinline__ void TmaLoad2d(uint32_t dst, const CUtensorMap* map, uint32_t bar,
                                          int32_t c0, int32_t c1) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%3, %4}], [%2];" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(bar), "r"(c0), "r"(c1)
      : "memory");
}

// Multicast variant (2-CTA clusters): the box lands at the same shared-memory offset in every CTA
// of `mask` (bit r = cluster rank r), and completes its byte count on the barrier at offset `bar`
// in each of those CTAs.
__device__ __forceinline__ void TmaLoad2dMulticast(uint32_t dst, const CUtensorMap* map,
                                                   uint32_t bar, int32_t c0, int32_t c1,
                                                   uint16_t mask) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes"
      ".multicast::cluster [%0], [%1, {%3, %4}], [%2], %5;" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(bar), "r"(c0), "r"(c1), "h"(mask)
      : "memory");
}

// ---------------------------------------------------------------- clusters
__device__ __forceinline__ uint32_t ClusterCtaRank() {
  uint32_t r;
  asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
  return r;
}

// The address of the same shared-memory offset in the CTA of cluster rank `rank`.
__device__ __forceinline__ uint32_t MapaShared(uint32_t addr, uint32_t rank) {
  uint32_t r;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(r) : "r"(addr), "r"(rank));
  return r;
}

// One arrival on a barrier anywhere in the cluster (address from MapaShared), with release
// semantics at cluster scope: this thread's earlier shared-memory reads are ordered before it.
__device__ __forceinline__ void MbarArriveCluster(uint32_t cluster_bar) {
  asm volatile("mbarrier.arrive.release.cluster.shared::cluster.b64 _, [%0];" ::"r"(cluster_bar)
               : "memory");
}

// Every thread of every CTA in the cluster: arrive, then wait for all. Not `.aligned`, so it
// may be reached from divergent code (the producer warpgroup's idle lanes).
__device__ __forceinline__ void ClusterSync() {
  asm volatile("barrier.cluster.arrive.release;\n"
               "barrier.cluster.wait.acquire;" ::: "memory");
}

// ---------------------------------------------------------------- register reconfiguration
// setmaxnreg (sm_90a): every warp of the warpgroup must execute it (.sync.aligned), and it only
// takes effect under a register cap at entry (__launch_bounds__(threads, 1)).
template <uint32_t kRegs>
__device__ __forceinline__ void SetMaxNRegDec() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" ::"n"(kRegs));
}
template <uint32_t kRegs>
__device__ __forceinline__ void SetMaxNRegInc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" ::"n"(kRegs));
}

// ---------------------------------------------------------------- wgmma
// Shared-memory matrix descriptor (PTX ISA "Matrix Descriptor Format"; cute::GmmaDescriptor):
//   bits  0-13 start address >> 4      bits 16-29 leading-dimension byte offset >> 4
//   bits 32-45 stride-dimension byte offset >> 4   bits 49-51 base offset   bits 62-63 swizzle
// For a K-major operand in the 128-byte swizzle mode (swizzle code 1) whose rows are exactly 128
// bytes (BLOCK_K = 128 FP8 values), 8 consecutive rows form one 1024-byte swizzle atom and atoms
// follow each other along M/N: stride byte offset = 1024. The leading byte offset is unused in
// this mode (one k32 slice is 32 bytes, inside the atom's 128-byte row) and set to 0. The base
// offset is 0 because every tile starts on a 1024-byte boundary; a k32 slice at byte 32*j of the
// row is addressed by adding 32*j to the start address (the hardware applies the XOR swizzle to
// the full address, exactly as TMA wrote it).
__device__ __forceinline__ uint64_t MakeSmemDescSw128(uint32_t addr) {
  constexpr uint64_t kSbo = 1024 >> 4;
  constexpr uint64_t kSwizzle128B = 1;
  return static_cast<uint64_t>((addr & 0x3FFFF) >> 4) | (kSbo << 32) | (kSwizzle128B << 62);
}

__device__ __forceinline__ void WgmmaFence() {
  asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
}
__device__ __forceinline__ void WgmmaCommit() {
  asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
}
template <int N>
__device__ __forceinline__ void WgmmaWait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory");
}

// Keeps the compiler from moving reads/writes of accumulator registers across the asynchronous
// wgmma boundaries (the registers are "in use" by the tensor cores between issue and wait).
__device__ __forceinline__ void FenceOperand(float& r) { asm volatile("" : "+f"(r)::"memory"); }

}  // namespace dsjax::deep_gemm::sm90
