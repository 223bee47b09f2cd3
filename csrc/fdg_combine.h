// Launcher of fdg_combine (csrc/fdg_combine.cu), bound to Python by csrc/fdg_combine_bindings.cpp.
// Light ATen headers only.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <vector>

namespace guidance_kernels {

// Frequency-decoupled guidance on (B, C', H, W) views of the output and of cond / uncond (any
// strides). sizes = [h_0, w_0, h_1, w_1, ...] (level 0 = kornia's padded latent); tables = the
// pyrup weights of levels 1 .. L-1 as [y_1, x_1, y_2, x_2, ...] ((2 h_i, 5) and (2 w_i, 5) fp32);
// per level: scale (number or fp32 tensor), parallel weight, frequency-space phi (number or
// tensor), project / rescale flags and the stats plan (parts, chunk; only where a flag is set).
// data_phi (number or tensor; 0 and no tensor = off): the data-space rescale of the crop in fp32,
// its moments pass planned as (final_parts, final_chunk) per sample.
// Launches: L - 1 down, one stats per flagged level, one coefficient, L - 2 recon, one final (two
// with the data-space rescale).
void fdg_combine_cuda(const at::Tensor& out, const at::Tensor& cond, const at::Tensor& uncond,
                      const std::vector<int64_t>& sizes, const std::vector<at::Tensor>& tables,
                      const std::vector<double>& scales, const std::vector<std::optional<at::Tensor>>& scale_tensors,
                      const std::vector<double>& weights, const std::vector<double>& phis,
                      const std::vector<std::optional<at::Tensor>>& phi_tensors, const std::vector<int64_t>& project,
                      const std::vector<int64_t>& rescale, bool original, const std::vector<int64_t>& parts,
                      const std::vector<int64_t>& chunks, double data_phi,
                      const std::optional<at::Tensor>& data_phi_tensor, int64_t final_parts, int64_t final_chunk);

// Elements per block step of the stats kernels: their chunks must be multiples of it.
int64_t fdg_combine_tile();

}  // namespace guidance_kernels
