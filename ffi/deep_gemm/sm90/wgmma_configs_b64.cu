// WGMMA GEMM configurations with 64-row tiles (one consumer warpgroup): decode-sized row spaces.
// (One file per family so that nvcc compiles the kernel instances in parallel.)
#include "deep_gemm/sm90/wgmma_launch.cuh"

namespace dsjax::deep_gemm::sm90 {

ffi::Error LaunchB64x64(const WgmmaProblem& w) { return LaunchConfig<Config<1, 64, 1>>(w, true); }
ffi::Error LaunchB64x128(const WgmmaProblem& w) {
  return LaunchConfig<Config<1, 128, 1>>(w, true);
}

}  // namespace dsjax::deep_gemm::sm90
