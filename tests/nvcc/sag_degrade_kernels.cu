// nvcc lane (tests/test_compile_lanes.py): instantiate every kernel template of
// csrc/include/guidance_kernels/sag_degrade.cuh that csrc/sag_degrade.cu can launch — each latent
// element type with each map format. Keep GK_EXPECTED_KERNELS in sync.
#include <guidance_kernels/sag_degrade.cuh>

namespace gs = guidance_kernels::sag;

#define GK_DEGRADE(T)                                                                          \
  template __global__ void gs::sag_degrade_kernel<T, gs::MapFmt::F32>(const gs::DegradeParams);  \
  template __global__ void gs::sag_degrade_kernel<T, gs::MapFmt::F16>(const gs::DegradeParams);  \
  template __global__ void gs::sag_degrade_kernel<T, gs::MapFmt::BF16>(const gs::DegradeParams); \
  template __global__ void gs::sag_degrade_kernel<T, gs::MapFmt::U8>(const gs::DegradeParams);

GK_DEGRADE(float)
GK_DEGRADE(__half)
GK_DEGRADE(__nv_bfloat16)

// 3 element types x 4 map formats.
constexpr int GK_EXPECTED_KERNELS = 12;
