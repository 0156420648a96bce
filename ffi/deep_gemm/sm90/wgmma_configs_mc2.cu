// WGMMA GEMM configurations with 2-CTA clusters along M that share the B tile by TMA multicast
// (dense layout only). (One file per family so that nvcc compiles the kernel instances in
// parallel.)
#include "deep_gemm/sm90/wgmma_launch.cuh"

namespace dsjax::deep_gemm::sm90 {

ffi::Error LaunchB128x160Mc2(const WgmmaProblem& w) {
  return LaunchConfig<Config<2, 160, 2>>(w, true);
}
ffi::Error LaunchB128x128Mc2(const WgmmaProblem& w) {
  return LaunchConfig<Config<2, 128, 2>>(w, true);
}
ffi::Error LaunchB128x192Mc2(const WgmmaProblem& w) {
  return LaunchConfig<Config<2, 192, 2>>(w, true);
}

}  // namespace dsjax::deep_gemm::sm90
