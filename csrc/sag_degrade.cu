// Launcher of the SAG degrade kernel (csrc/include/guidance_kernels/sag_degrade.cuh): argument
// checks (before any launch), device guard, the current stream, dtype dispatch.
//
// Called from guidance_kernels/cuda/sag_degrade.py, which has validated the public arguments and
// allocated the outputs (laid out like x0); the checks here guard the raw-pointer kernel against
// any other caller. Every tensor is read through its own sizes and strides, which torch keeps
// inside its storage, so no argument can make the kernel touch memory outside a tensor. No host
// synchronisation: the launch is enqueued on the current stream (CUDA-graph capturable).
#include "sag_degrade.h"

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>

#include <guidance_kernels/sag_degrade.cuh>

#include <algorithm>
#include <cstdint>

namespace guidance_kernels {
namespace {

namespace gs = guidance_kernels::sag;

void check_latent(const at::Tensor& t, const at::Tensor& x0, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.device() == x0.device(), "sag_degrade: ", name, ": must be on ", x0.device(),
              ", got ", t.device());
  TORCH_CHECK_TYPE(t.scalar_type() == x0.scalar_type(), "sag_degrade: ", name, ": dtype ", t.scalar_type(),
                   " differs from x0's ", x0.scalar_type());
  TORCH_CHECK(t.sizes() == x0.sizes(), "sag_degrade: ", name, ": shape ", t.sizes(), " differs from x0's ",
              x0.sizes());
}

template <typename T>
void launch(const gs::DegradeParams& params, at::ScalarType map_type, dim3 grid, cudaStream_t stream) {
  const dim3 block(gs::kThreadsX, gs::kThreadsY);
  switch (map_type) {
    case at::kFloat: gs::sag_degrade_kernel<T, gs::MapFmt::F32><<<grid, block, 0, stream>>>(params); break;
    case at::kHalf: gs::sag_degrade_kernel<T, gs::MapFmt::F16><<<grid, block, 0, stream>>>(params); break;
    case at::kBFloat16: gs::sag_degrade_kernel<T, gs::MapFmt::BF16><<<grid, block, 0, stream>>>(params); break;
    case at::kByte: gs::sag_degrade_kernel<T, gs::MapFmt::U8><<<grid, block, 0, stream>>>(params); break;
    default: TORCH_CHECK_TYPE(false, "sag_degrade: mask_map: dtype ", map_type, " is not supported");
  }
}

}  // namespace

void sag_degrade_cuda(const at::Tensor& out, const std::optional<at::Tensor>& degraded, const at::Tensor& x0,
                      const at::Tensor& mask_map, bool thresholded, double threshold,
                      const std::vector<double>& weights, int64_t renoise, const std::optional<at::Tensor>& other,
                      const std::optional<at::Tensor>& alpha, double alpha_value) {
  TORCH_CHECK(x0.is_cuda(), "sag_degrade: x0: must be a CUDA tensor, got ", x0.device());
  TORCH_CHECK(x0.dim() == 4, "sag_degrade: x0: expected (B, C, H, W), got ", x0.sizes());
  const auto dtype = x0.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
                   "sag_degrade: x0: dtype must be float32, float16 or bfloat16, got ", dtype);
  check_latent(out, x0, "out");
  if (degraded.has_value()) {
    check_latent(*degraded, x0, "degraded");
    TORCH_CHECK(degraded->strides() == out.strides(), "sag_degrade: degraded: must be laid out like out");
  }
  const int taps = static_cast<int>(weights.size());
  TORCH_CHECK(taps >= 1 && taps <= gs::kMaxTaps && taps % 2 == 1, "sag_degrade: weights: need an odd count <= ",
              gs::kMaxTaps, ", got ", taps);
  const int64_t batch = x0.size(0), channels = x0.size(1), height = x0.size(2), width = x0.size(3);
  TORCH_CHECK(batch * channels == 0 || std::min(height, width) > taps / 2, "sag_degrade: x0: ", height, "x", width,
              " is too small for the reflect padding of ", taps, " taps");
  TORCH_CHECK(mask_map.is_cuda() && mask_map.device() == x0.device(), "sag_degrade: mask_map: must be on ",
              x0.device(), ", got ", mask_map.device());
  TORCH_CHECK(mask_map.dim() == 3 && (mask_map.size(0) == 1 || mask_map.size(0) == batch) && mask_map.size(1) >= 1 &&
                  mask_map.size(2) >= 1,
              "sag_degrade: mask_map: expected (1|B, h, w), got ", mask_map.sizes());
  TORCH_CHECK(renoise >= gs::kNone && renoise <= gs::kKdiff, "sag_degrade: renoise: unknown mode ", renoise);
  if (renoise != gs::kNone) {
    TORCH_CHECK(other.has_value(), "sag_degrade: other: eps / x_t required for re-noise mode ", renoise);
    check_latent(*other, x0, renoise == gs::kDdpm ? "eps" : "x_t");
  }
  if (alpha.has_value()) {
    TORCH_CHECK(alpha->is_cuda() && alpha->device() == x0.device(), "sag_degrade: alpha: must be on ", x0.device());
    TORCH_CHECK_TYPE(alpha->scalar_type() == at::kFloat, "sag_degrade: alpha: must be float32");
    TORCH_CHECK(alpha->dim() == 1 && (alpha->numel() == 1 || alpha->numel() == batch),
                "sag_degrade: alpha: expected shape (1,) or (", batch, ",), got ", alpha->sizes());
  }

  gs::DegradeParams params{};
  params.out = out.data_ptr();
  params.degraded = degraded.has_value() ? degraded->data_ptr() : nullptr;
  params.x0 = x0.data_ptr();
  params.other = other.has_value() ? other->data_ptr() : nullptr;
  params.map = mask_map.data_ptr();
  params.alpha = Scale{static_cast<float>(alpha_value), alpha.has_value() ? alpha->data_ptr<float>() : nullptr,
                       alpha.has_value() && alpha->numel() > 1 ? alpha->stride(0) : 0};
  params.batch = batch;
  params.channels = channels;
  params.height = height;
  params.width = width;
  for (int d = 0; d < 4; ++d) {
    params.x_stride[d] = x0.stride(d);
    params.out_stride[d] = out.stride(d);
    params.other_stride[d] = other.has_value() ? other->stride(d) : 0;
  }
  params.map_h = mask_map.size(1);
  params.map_w = mask_map.size(2);
  params.map_stride[0] = mask_map.size(0) > 1 ? mask_map.stride(0) : 0;
  params.map_stride[1] = mask_map.stride(1);
  params.map_stride[2] = mask_map.stride(2);
  params.threshold = static_cast<float>(threshold);
  params.thresholded = thresholded ? 1 : 0;
  params.renoise = static_cast<int>(renoise);
  params.taps = taps;
  for (int t = 0; t < taps; ++t) params.weights[t] = static_cast<float>(weights[t]);

  if (out.numel() == 0) return;
  const int64_t tiles_y = gs::tiles_along(height, gs::kTileH);
  TORCH_CHECK(tiles_y <= gs::kMaxTilesY, "sag_degrade: x0: height ", height, " exceeds the launch grid");
  const dim3 grid(static_cast<unsigned>(gs::tiles_along(width, gs::kTileW)), static_cast<unsigned>(tiles_y),
                  static_cast<unsigned>(std::min<int64_t>(batch * channels, gs::kMaxPlanesPerLaunch)));
  const c10::cuda::CUDAGuard guard(x0.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x0.device().index()).stream();
  switch (dtype) {
    case at::kFloat: launch<float>(params, mask_map.scalar_type(), grid, stream); break;
    case at::kHalf: launch<__half>(params, mask_map.scalar_type(), grid, stream); break;
    default: launch<__nv_bfloat16>(params, mask_map.scalar_type(), grid, stream); break;
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace guidance_kernels
