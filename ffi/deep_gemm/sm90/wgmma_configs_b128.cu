// WGMMA GEMM configurations with 128-row tiles (two consumer warpgroups, setmaxnreg), one CTA per
// cluster. (One file per family so that nvcc compiles the kernel instances in parallel.)
#include "deep_gemm/sm90/wgmma_launch.cuh"

namespace dsjax::deep_gemm::sm90 {

ffi::Error LaunchB128x128Grid(const WgmmaProblem& w) {
  return LaunchConfig<Config<2, 128, 1>>(w, false);
}
ffi::Error LaunchB128x128(const WgmmaProblem& w) {
  return LaunchConfig<Config<2, 128, 1>>(w, true);
}
ffi::Error LaunchB128x160(const WgmmaProblem& w) {
  return LaunchConfig<Config<2, 160, 1>>(w, true);
}
ffi::Error LaunchB128x192(const WgmmaProblem& w) {
  return LaunchConfig<Config<2, 192, 1>>(w, true);
}

}  // namespace dsjax::deep_gemm::sm90
