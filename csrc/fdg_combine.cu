// Launcher of fdg_combine: argument checks against every tensor's storage (before any launch),
// device guard, the current stream, dtype dispatch, the level buffers and the launch sequence of
// csrc/include/guidance_kernels/fdg_combine.cuh. No host synchronisation (CUDA-graph capturable).
#include "fdg_combine.h"

#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>

#include <guidance_kernels/fdg_combine.cuh>

#include <cstdint>
#include <limits>

namespace guidance_kernels {
namespace {

namespace gf = guidance_kernels::fdg;
namespace gc = guidance_kernels::combine;

constexpr const char* kFn = "fdg_combine (cuda)";

template <typename T>
struct TypeTag {
  using type = T;
};

template <typename F>
void dispatch_float(at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kFloat: f(TypeTag<float>{}); break;
    case at::kHalf: f(TypeTag<__half>{}); break;
    case at::kBFloat16: f(TypeTag<__nv_bfloat16>{}); break;
    default: TORCH_CHECK_TYPE(false, kFn, ": dtype ", dtype, " is not supported (float32, float16, bfloat16)");
  }
}

bool mul_overflows(int64_t a, int64_t b, int64_t* out) { return __builtin_mul_overflow(a, b, out); }

// Largest element offset of a (B, C', H, W) tensor through its strides (all reads stay inside).
void check_extent(const char* name, const at::Tensor& t, const at::Tensor& like) {
  TORCH_CHECK(t.is_cuda() && t.layout() == at::kStrided && t.dim() == 4, kFn, ": ", name,
              ": expected a strided 4-D CUDA tensor");
  TORCH_CHECK(t.device() == like.device(), kFn, ": ", name, ": is on ", t.device(), " but out is on ", like.device());
  TORCH_CHECK_TYPE(t.scalar_type() == like.scalar_type(), kFn, ": ", name, ": dtype ", t.scalar_type(),
                   " differs from out ", like.scalar_type());
  TORCH_CHECK(t.sizes() == like.sizes(), kFn, ": ", name, ": shape ", t.sizes(), " differs from out ", like.sizes());
  int64_t last = 0;
  for (int64_t d = 0; d < 4; ++d) {
    int64_t term = 0;
    TORCH_CHECK(t.stride(d) >= 0 && !mul_overflows(t.size(d) - 1, t.stride(d), &term) &&
                !__builtin_add_overflow(last, term, &last), kFn, ": ", name, ": bad strides ", t.strides());
  }
  const int64_t available = static_cast<int64_t>(t.storage().nbytes() / t.itemsize()) - t.storage_offset();
  TORCH_CHECK(last < available, kFn, ": ", name, ": addresses element ", last, " but the storage holds ", available);
}

Scale read_scale(const char* name, double value, const std::optional<at::Tensor>& t, const at::Tensor& out,
                 int64_t batch) {
  if (!t.has_value()) return Scale{static_cast<float>(value), nullptr, 0};
  TORCH_CHECK(t->is_cuda() && t->device() == out.device(), kFn, ": ", name, ": must be on ", out.device());
  TORCH_CHECK_TYPE(t->scalar_type() == at::kFloat, kFn, ": ", name, ": scale tensors must be float32");
  TORCH_CHECK(t->dim() <= 1 && (t->numel() == 1 || t->numel() == batch), kFn, ": ", name,
              ": expected shape (), (1,) or (", batch, ",), got ", t->sizes());
  return Scale{0.0f, t->data_ptr<float>(), t->numel() == 1 ? 0 : t->stride(0)};
}

gf::Level make_level(int32_t index, int64_t h, int64_t w) {
  gf::Level l{};
  l.index = index;
  l.h = h;
  l.w = w;
  l.by_h = make_divider(static_cast<uint64_t>(h));
  l.by_w = make_divider(static_cast<uint64_t>(w));
  return l;
}

unsigned blocks_for(int64_t n) {
  const int64_t blocks = (n + gf::kThreads - 1) / gf::kThreads;
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), kFn, ": too many blocks");
  return static_cast<unsigned>(blocks);
}

}  // namespace

int64_t fdg_combine_tile() { return gc::kTile; }

void fdg_combine_cuda(const at::Tensor& out, const at::Tensor& cond, const at::Tensor& uncond,
                      const std::vector<int64_t>& sizes, const std::vector<at::Tensor>& tables,
                      const std::vector<double>& scales, const std::vector<std::optional<at::Tensor>>& scale_tensors,
                      const std::vector<double>& weights, const std::vector<double>& phis,
                      const std::vector<std::optional<at::Tensor>>& phi_tensors, const std::vector<int64_t>& project,
                      const std::vector<int64_t>& rescale, bool original, const std::vector<int64_t>& parts,
                      const std::vector<int64_t>& chunks, double data_phi,
                      const std::optional<at::Tensor>& data_phi_tensor, int64_t final_parts, int64_t final_chunk) {
  TORCH_CHECK(out.is_cuda() && out.dim() == 4, kFn, ": out must be a 4-D CUDA tensor");
  TORCH_CHECK(out.is_non_overlapping_and_dense(), kFn, ": out: must not overlap itself");
  check_extent("out", out, out);
  check_extent("cond", cond, out);
  check_extent("uncond", uncond, out);
  const int64_t levels = static_cast<int64_t>(scales.size());
  TORCH_CHECK(levels >= 1 && levels <= gf::kMaxLevels, kFn, ": 1 to ", gf::kMaxLevels, " levels, got ", levels);
  TORCH_CHECK(static_cast<int64_t>(sizes.size()) == 2 * levels && static_cast<int64_t>(tables.size()) == 2 * (levels - 1)
              && static_cast<int64_t>(scale_tensors.size()) == levels && static_cast<int64_t>(weights.size()) == levels
              && static_cast<int64_t>(phis.size()) == levels && static_cast<int64_t>(phi_tensors.size()) == levels
              && static_cast<int64_t>(project.size()) == levels && static_cast<int64_t>(rescale.size()) == levels
              && static_cast<int64_t>(parts.size()) == levels && static_cast<int64_t>(chunks.size()) == levels,
              kFn, ": sizes, tables and the per-level lists must describe ", levels, " levels");
  const int64_t batch = out.size(0), channels = out.size(1), height = out.size(2), width = out.size(3);
  TORCH_CHECK(batch >= 1 && channels >= 1 && height >= 1 && width >= 1, kFn, ": empty output");
  TORCH_CHECK(sizes[0] >= height && sizes[1] >= width && sizes[0] < 2 * height + (height == 1) &&
              sizes[1] < 2 * width + (width == 1), kFn, ": level 0 ", sizes[0], "x", sizes[1],
              " is not a reflect padding of ", height, "x", width);
  for (int64_t i = 1; i < levels; ++i) {
    TORCH_CHECK(sizes[2 * i] * 2 == sizes[2 * i - 2] && sizes[2 * i + 1] * 2 == sizes[2 * i - 1] &&
                sizes[2 * i] >= 2 && sizes[2 * i + 1] >= 2, kFn, ": level ", i, " must halve level ", i - 1,
                " and be at least 2x2");
    for (int64_t a = 0; a < 2; ++a) {
      const at::Tensor& t = tables[2 * (i - 1) + a];
      TORCH_CHECK(t.is_cuda() && t.device() == out.device() && t.scalar_type() == at::kFloat && t.is_contiguous() &&
                  t.numel() == 2 * sizes[2 * i + a] * 5, kFn, ": tables: level ", i, " needs contiguous fp32 (",
                  2 * sizes[2 * i + a], ", 5) pyrup weights");
    }
  }
  int64_t numel = 0;
  TORCH_CHECK(!mul_overflows(batch * channels, sizes[0] * sizes[1], &numel), kFn, ": sizes overflow");

  gf::Params p{};
  p.out = out.data_ptr();
  p.obs = out.stride(0);
  p.ocs = out.stride(1);
  p.oys = out.stride(2);
  p.oxs = out.stride(3);
  p.c = gf::Image{cond.data_ptr(), cond.stride(0), cond.stride(1), cond.stride(2), cond.stride(3)};
  p.u = gf::Image{uncond.data_ptr(), uncond.stride(0), uncond.stride(1), uncond.stride(2), uncond.stride(3)};
  p.batch = batch;
  p.channels = channels;
  p.height = height;
  p.width = width;
  p.by_height = make_divider(static_cast<uint64_t>(height));
  p.by_width = make_divider(static_cast<uint64_t>(width));
  p.levels = static_cast<int32_t>(levels);
  p.original = original;
  bool with_c = false;
  for (int64_t i = 0; i < levels; ++i) {
    p.s[i] = read_scale("scale_tensors", scales[i], scale_tensors[i], out, batch);
    p.weight[i] = static_cast<float>(weights[i]);
    p.project[i] = project[i] != 0;
    p.rescale[i] = rescale[i] != 0;
    if (p.rescale[i]) p.phi[i] = read_scale("phi_tensors", phis[i], phi_tensors[i], out, batch);
    with_c = with_c || p.project[i] || p.rescale[i];
    if (p.project[i] || p.rescale[i]) {
      const int64_t inner = channels * sizes[2 * i] * sizes[2 * i + 1];
      TORCH_CHECK(chunks[i] >= 1 && chunks[i] % gc::kTile == 0 &&
                  parts[i] == inner / chunks[i] + (inner % chunks[i] != 0 ? 1 : 0) &&
                  batch * parts[i] <= std::numeric_limits<int32_t>::max(), kFn, ": level ", i, ": parts ", parts[i],
                  " x chunk ", chunks[i], " must cover ", inner, " elements in multiples of ", gc::kTile);
      p.parts[i] = parts[i];
    }
  }
  p.with_c = with_c;
  p.data_rescale = data_phi_tensor.has_value() || data_phi > 0;
  if (p.data_rescale) {
    p.data_phi = read_scale("data_phi_tensor", data_phi, data_phi_tensor, out, batch);
    const int64_t inner = channels * height * width;
    TORCH_CHECK(final_chunk >= 1 && final_chunk % gc::kTile == 0 &&
                final_parts == inner / final_chunk + (inner % final_chunk != 0 ? 1 : 0) &&
                batch * final_parts <= std::numeric_limits<int32_t>::max(), kFn, ": final_parts ", final_parts,
                " x final_chunk ", final_chunk, " must cover ", inner, " elements in multiples of ", gc::kTile);
    p.final_parts = final_parts;
    p.final_chunk = final_chunk;
  }

  const c10::cuda::CUDAGuard guard(out.device());
  const auto f32 = out.options().dtype(at::kFloat);
  std::vector<gf::Level> lv;
  std::vector<at::Tensor> keep;  // the workspaces live until every launch is enqueued
  for (int64_t i = 0; i < levels; ++i) {
    gf::Level l = make_level(static_cast<int32_t>(i), sizes[2 * i], sizes[2 * i + 1]);
    if (i >= 1) {
      const int64_t n = batch * channels * l.h * l.w;
      keep.push_back(at::empty({n}, f32));
      l.g_d = keep.back().data_ptr<float>();
      if (with_c) {
        keep.push_back(at::empty({n}, f32));
        l.g_c = keep.back().data_ptr<float>();
      }
      if (levels >= 3) {
        keep.push_back(at::empty({n}, f32));
        l.r = keep.back().data_ptr<float>();
      }
      l.tab_y = tables[2 * (i - 1)].data_ptr<float>();
      l.tab_x = tables[2 * (i - 1) + 1].data_ptr<float>();
    }
    if (p.project[i] || p.rescale[i]) {
      keep.push_back(at::empty({batch * parts[i] * gc::kRowFloats}, f32));
      p.stats[i] = keep.back().data_ptr<float>();
    }
    lv.push_back(l);
  }
  keep.push_back(at::empty({batch * levels * 3}, f32));
  p.coef = keep.back().data_ptr<float>();
  if (p.data_rescale) {
    keep.push_back(at::empty({batch * p.final_parts * gc::kRowFloats}, f32));
    p.final_stats = keep.back().data_ptr<float>();
  }
  const gf::Level none = make_level(0, 1, 1);

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(out.get_device()).stream();
  dispatch_float(out.scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    for (int64_t i = 1; i < levels; ++i) {
      const unsigned grid = blocks_for(batch * channels * lv[i].h * lv[i].w);
      if (i == 1) {
        gf::down_kernel<T, true><<<grid, gf::kThreads, 0, stream>>>(p, lv[0], lv[1]);
      } else {
        gf::down_kernel<T, false><<<grid, gf::kThreads, 0, stream>>>(p, lv[i - 1], lv[i]);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    for (int64_t i = 0; i < levels; ++i) {
      if (!p.project[i] && !p.rescale[i]) continue;
      const bool last = i == levels - 1;
      const gf::Level& next = last ? none : lv[i + 1];
      const unsigned grid = static_cast<unsigned>(batch * parts[i]);
      auto launch = [&](auto level0, auto is_last) {
        gf::stats_kernel<T, decltype(level0)::value, decltype(is_last)::value>
            <<<grid, gf::kThreads, 0, stream>>>(p, lv[i], next, p.stats[i], parts[i], chunks[i]);
      };
      if (i == 0) {
        if (last) launch(std::true_type{}, std::true_type{}); else launch(std::true_type{}, std::false_type{});
      } else {
        if (last) launch(std::false_type{}, std::true_type{}); else launch(std::false_type{}, std::false_type{});
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    gf::coef_kernel<gf::kMaxLevels><<<static_cast<unsigned>(batch), gf::kThreads, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (levels >= 3) {
      for (int64_t i = levels - 1; i >= 1; --i) {
        const unsigned grid = blocks_for(batch * channels * lv[i].h * lv[i].w);
        if (i == levels - 1) {
          gf::recon_kernel<false><<<grid, gf::kThreads, 0, stream>>>(p, lv[i], none);
        } else {
          gf::recon_kernel<true><<<grid, gf::kThreads, 0, stream>>>(p, lv[i], lv[i + 1]);
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    }
    const gf::Level& first = levels > 1 ? lv[1] : none;
    if (p.data_rescale) {
      gf::final_moments_kernel<T><<<static_cast<unsigned>(batch * p.final_parts), gf::kThreads, 0, stream>>>(p, first);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    const int64_t per_sample = (channels * height * width + gf::kThreads - 1) / gf::kThreads;
    TORCH_CHECK(batch * per_sample <= std::numeric_limits<int32_t>::max(), kFn, ": too many blocks");
    gf::final_kernel<T><<<static_cast<unsigned>(batch * per_sample), gf::kThreads, 0, stream>>>(p, first);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace guidance_kernels
