// Thin inline-PTX wrappers for the sm_90a features the WGMMA GEMM uses: mbarriers, TMA tensor
// loads and warpgroup MMA (wgmma) with shared-memory descriptors.
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
// A wait that lasts ~2^35 cycles (over 15 s; a correct pipeline waits microseconds) means a lost
// TMA transaction or arrival: it traps, so the caller gets a CUDA error instead of a hang.
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
    } else if (now - start > (1ll << 35)) {
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

// D[64 x 128] (+)= A[64 x 32] . B[128 x 32]^T, E4M3 x E4M3 -> F32, both operands K-major in
// shared memory. `accumulate` false overwrites d (scale-d = 0). Fragment layout of d, for thread
// t of the warpgroup (warp w = t / 32, lane l = t % 32) and register i in [0, 64):
//   row = 16 w + l / 4 + 8 * ((i / 2) % 2),  col = 8 * (i / 4) + 2 * (l % 4) + i % 2.
__device__ __forceinline__ void WgmmaM64N128K32(float (&d)[64], uint64_t desc_a, uint64_t desc_b,
                                                bool accumulate) {
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "setp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
      "%64, %65, p, 1, 1;\n"
      "}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),
        "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]),
        "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]),
        "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]),
        "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
        "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]),
        "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]),
        "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]),
        "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]),
        "+f"(d[62]), "+f"(d[63])
      : "l"(desc_a), "l"(desc_b), "r"(static_cast<uint32_t>(accumulate))
      : "memory");
}

}  // namespace dsjax::deep_gemm::sm90
