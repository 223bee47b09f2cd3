// Launchers of the combine family (csrc/guidance_combine.cu), bound to Python by
// csrc/guidance_combine_bindings.cpp. Light ATen headers only.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <vector>

namespace guidance_kernels {

// geometry = [batch, inner, n0, n1, n2, s0, s1, s2, batch_stride, rank] (guidance_kernels/_layout.Plan);
// parts, chunk: the per-sample chunks of the reduction passes (plain combine: one tile each).

// out = D[base] + sum_t g_t (D[pos_t] - D[neg_t]) (+ rescale against D[ref]); xs are the distinct
// branches used, and base / pos / neg / ref index into xs. One launch, or two with rescale.
void guidance_combine_cuda(const at::Tensor& out, const std::vector<at::Tensor>& xs, int64_t base,
                           const std::vector<int64_t>& pos, const std::vector<int64_t>& neg,
                           const std::vector<double>& scales,
                           const std::vector<std::optional<at::Tensor>>& scale_tensors, bool rescale, int64_t ref,
                           double phi, const std::optional<at::Tensor>& phi_tensor,
                           const std::vector<int64_t>& geometry, int64_t parts, int64_t chunk);

// APG (kind 1; formulation 0 paper, 1 diffusers, 2 diffusers_original, 3 cfg, 4 cfg_original;
// optional momentum buffer updated in place), CFG-Zero* (kind 2), TCFG (kind 3) or MAG (kind 4,
// with alpha); for kinds 2-4 formulation 1 = original. Always two launches.
void projected_combine_cuda(const at::Tensor& out, const at::Tensor& cond, const at::Tensor& uncond,
                            const std::optional<at::Tensor>& momentum_buffer, int64_t kind, int64_t formulation,
                            double scale, const std::optional<at::Tensor>& scale_tensor, double eta,
                            double norm_threshold, double momentum, double alpha, bool rescale, double phi,
                            const std::optional<at::Tensor>& phi_tensor, const std::vector<int64_t>& geometry,
                            int64_t parts, int64_t chunk);

// CFG-Norm (kind 1, against slot ref, times strength) or Mahiro (kind 2, from the first term) after
// the combine, channel-wise on (B, C, *spatial); geometry = [batch, C, P1, P2, bs, cs, s1, s2, ocs,
// o1, o2] (guidance_kernels/_layout.py channel_geometry); Mahiro's pass 1 covers `chunk` positions
// (a multiple of 256) per block, `parts` blocks per sample. One launch (CFG-Norm) or two (Mahiro).
void channel_combine_cuda(const at::Tensor& out, const std::vector<at::Tensor>& xs, int64_t base,
                          const std::vector<int64_t>& pos, const std::vector<int64_t>& neg,
                          const std::vector<double>& scales,
                          const std::vector<std::optional<at::Tensor>>& scale_tensors, int64_t kind, int64_t ref,
                          double strength, const std::optional<at::Tensor>& strength_tensor,
                          const std::vector<int64_t>& geometry, int64_t parts, int64_t chunk);

// Elements per block step: reduction chunks must be multiples of it.
int64_t guidance_combine_tile();

// Threads per block (Mahiro's position chunks are multiples of it).
int64_t guidance_combine_threads();

}  // namespace guidance_kernels
