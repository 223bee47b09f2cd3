// nvcc lane (tests/test_compile_lanes.py): instantiate every kernel template of
// csrc/include/guidance_kernels/fdg_combine.cuh that csrc/fdg_combine.cu can launch, for every
// element type. Keep GK_EXPECTED_KERNELS in sync.
#include <guidance_kernels/fdg_combine.cuh>

namespace gf = guidance_kernels::fdg;

#define GK_FDG_TYPE(T)                                                                                          \
  template __global__ void gf::down_kernel<T, true>(const gf::Params, const gf::Level, const gf::Level);      \
  template __global__ void gf::down_kernel<T, false>(const gf::Params, const gf::Level, const gf::Level);     \
  template __global__ void gf::stats_kernel<T, true, true>(const gf::Params, const gf::Level, const gf::Level, \
                                                           float*, int64_t, int64_t);                        \
  template __global__ void gf::stats_kernel<T, true, false>(const gf::Params, const gf::Level, const gf::Level, \
                                                            float*, int64_t, int64_t);                       \
  template __global__ void gf::stats_kernel<T, false, true>(const gf::Params, const gf::Level, const gf::Level, \
                                                            float*, int64_t, int64_t);                       \
  template __global__ void gf::stats_kernel<T, false, false>(const gf::Params, const gf::Level,               \
                                                             const gf::Level, float*, int64_t, int64_t);     \
  template __global__ void gf::final_kernel<T>(const gf::Params, const gf::Level);                          \
  template __global__ void gf::final_moments_kernel<T>(const gf::Params, const gf::Level);

GK_FDG_TYPE(float)
GK_FDG_TYPE(__half)
GK_FDG_TYPE(__nv_bfloat16)
template __global__ void gf::coef_kernel<gf::kMaxLevels>(const gf::Params);
template __global__ void gf::recon_kernel<true>(const gf::Params, const gf::Level, const gf::Level);
template __global__ void gf::recon_kernel<false>(const gf::Params, const gf::Level, const gf::Level);

// 3 types x (2 down + 4 stats + 2 final) + 1 coef + 2 recon = 27 kernels.
constexpr int GK_EXPECTED_KERNELS = 27;
