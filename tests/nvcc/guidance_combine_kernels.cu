// nvcc lane (tests/test_compile_lanes.py): instantiate every kernel template of
// csrc/include/guidance_kernels/guidance_combine.cuh for every element type, so that ptxas
// compiles (and reports registers and spills for) exactly the set csrc/guidance_combine.cu can
// launch. The count of entry functions is checked by the test: keep GK_EXPECTED_KERNELS in sync.
#include <guidance_kernels/guidance_combine.cuh>

namespace gk = guidance_kernels::combine;
using guidance_kernels::NoBuffer;

#define GK_COMBINE(T, VEC)                                                  \
  template __global__ void gk::combine_kernel<T, VEC>(const gk::CombineParams); \
  template __global__ void gk::combine_moments_kernel<T, VEC>(const gk::CombineParams);

#define GK_PROJECTED(KIND, T, BUF, VEC)                                                        \
  template __global__ void gk::projected_moments_kernel<KIND, T, BUF, VEC>(const gk::ProjectedParams); \
  template __global__ void gk::projected_kernel<KIND, T, BUF, VEC>(const gk::ProjectedParams);

#define GK_ALL_FOR_TYPE(T, VEC)                    \
  GK_COMBINE(T, VEC)                               \
  GK_PROJECTED(gk::kApg, T, NoBuffer, VEC)         \
  GK_PROJECTED(gk::kApg, T, float, VEC)            \
  GK_PROJECTED(gk::kCfgZeroStar, T, NoBuffer, VEC) \
  GK_PROJECTED(gk::kTcfg, T, NoBuffer, VEC)        \
  GK_PROJECTED(gk::kMag, T, NoBuffer, VEC)

#define GK_CHANNEL(T)                                                      \
  template __global__ void gk::cfg_norm_kernel<T>(const gk::ChannelParams);       \
  template __global__ void gk::mahiro_moments_kernel<T>(const gk::ChannelParams); \
  template __global__ void gk::mahiro_kernel<T>(const gk::ChannelParams);

#define GK_BOTH_PATHS(T) GK_ALL_FOR_TYPE(T, true) GK_ALL_FOR_TYPE(T, false) GK_CHANNEL(T)

GK_BOTH_PATHS(float)
GK_BOTH_PATHS(__half)
GK_BOTH_PATHS(__nv_bfloat16)
// A momentum buffer may also have the prediction's own 16-bit dtype.
GK_PROJECTED(gk::kApg, __half, __half, true)
GK_PROJECTED(gk::kApg, __half, __half, false)
GK_PROJECTED(gk::kApg, __nv_bfloat16, __nv_bfloat16, true)
GK_PROJECTED(gk::kApg, __nv_bfloat16, __nv_bfloat16, false)

// 3 types x (2 paths x (2 combine + 5 x 2 projected) + 3 channel-wise) + 4 x 2 (16-bit buffers) = 89 kernels.
constexpr int GK_EXPECTED_KERNELS = 89;
