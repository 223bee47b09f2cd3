// Launcher of the SAG degrade kernel (csrc/sag_degrade.cu), bound to Python by
// csrc/sag_degrade_bindings.cpp. Light ATen headers only.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <vector>

namespace guidance_kernels {

// out (and degraded, when given) = SAG's degraded latent of x0 (B, C, H, W), laid out like out:
// mask_map (B|1, h, w) is a key mass thresholded > threshold (thresholded) or blend weights (float,
// or uint8 for a bool mask); weights are the 1-D Gaussian taps (odd count <= 15); renoise 0 none,
// 1 DDPM (other = eps, alpha a float32 (1,)|(B,) tensor or alpha_value), 2 k-diffusion (other = x_t).
// One launch on the current stream, no host synchronisation.
void sag_degrade_cuda(const at::Tensor& out, const std::optional<at::Tensor>& degraded, const at::Tensor& x0,
                      const at::Tensor& mask_map, bool thresholded, double threshold,
                      const std::vector<double>& weights, int64_t renoise, const std::optional<at::Tensor>& other,
                      const std::optional<at::Tensor>& alpha, double alpha_value);

}  // namespace guidance_kernels
