// Launchers of the combine family: argument checks (before any launch), device guard, the
// current stream, dtype dispatch and the choice between the vectorised and the generic path.
// The launch plan (layout, chunks) comes from Python as plain integers (guidance_kernels/cuda/);
// it is validated here against every tensor's storage so that no plan can make a kernel read or
// write out of bounds. No host synchronisation: everything is enqueued on the current stream,
// so the calls can be captured in a CUDA graph.
#include "guidance_combine.h"

#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>

#include <guidance_kernels/guidance_combine.cuh>

#include <cstdint>
#include <limits>

namespace guidance_kernels {
namespace {

namespace gc = guidance_kernels::combine;

template <typename T>
struct TypeTag {
  using type = T;
};

// Calls f(TypeTag<T>{}) with T the CUDA element type of `dtype`.
template <typename F>
void dispatch_float(const char* fn, at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kFloat: f(TypeTag<float>{}); break;
    case at::kHalf: f(TypeTag<__half>{}); break;
    case at::kBFloat16: f(TypeTag<__nv_bfloat16>{}); break;
    default: TORCH_CHECK_TYPE(false, fn, ": dtype ", dtype, " is not supported (float32, float16, bfloat16)");
  }
}

struct Plan {
  Geometry geo;
  int64_t n0;
  int64_t parts, chunk;
};

bool mul_overflows(int64_t a, int64_t b, int64_t* out) { return __builtin_mul_overflow(a, b, out); }

Plan read_plan(const char* fn, const std::vector<int64_t>& g, int64_t parts, int64_t chunk) {
  TORCH_CHECK(g.size() == 10, fn, ": geometry: expected 10 integers, got ", g.size());
  const int64_t batch = g[0], inner = g[1], n0 = g[2], n1 = g[3], n2 = g[4];
  const int64_t s0 = g[5], s1 = g[6], s2 = g[7], bs = g[8], rank = g[9];
  TORCH_CHECK(batch >= 1 && inner >= 1, fn, ": geometry: empty launch (batch ", batch, ", inner ", inner, ")");
  TORCH_CHECK(rank >= 1 && rank <= 3, fn, ": geometry: rank must be 1..3, got ", rank);
  TORCH_CHECK(n0 >= 1 && n1 >= 1 && n2 >= 1, fn, ": geometry: sizes must be positive");
  TORCH_CHECK(s0 >= 0 && s1 >= 0 && s2 >= 0 && bs >= 0, fn, ": geometry: strides must be non-negative");
  TORCH_CHECK(rank == 3 || n0 == 1, fn, ": geometry: n0 must be 1 below rank 3");
  TORCH_CHECK(rank >= 2 || n1 == 1, fn, ": geometry: n1 must be 1 for rank 1");
  int64_t n01 = 0, n012 = 0;
  TORCH_CHECK(!mul_overflows(n0, n1, &n01) && !mul_overflows(n01, n2, &n012) && n012 == inner, fn,
              ": geometry: sizes ", n0, "x", n1, "x", n2, " do not multiply to inner = ", inner);
  TORCH_CHECK(chunk >= 1 && chunk % gc::kTile == 0, fn, ": chunk ", chunk, " must be a positive multiple of ",
              gc::kTile);
  const int64_t needed = inner / chunk + (inner % chunk != 0 ? 1 : 0);
  TORCH_CHECK(parts == needed, fn, ": parts ", parts, " x chunk ", chunk, " must cover inner = ", inner,
              " without empty chunks (", needed, " parts)");
  int64_t blocks = 0;
  TORCH_CHECK(!mul_overflows(batch, parts, &blocks) && blocks <= std::numeric_limits<int32_t>::max(), fn,
              ": too many blocks (batch ", batch, " x parts ", parts, ")");
  return Plan{make_geometry(batch, inner, n1, n2, s0, s1, s2, bs, static_cast<int32_t>(rank)), n0, parts, chunk};
}

// The largest element offset the kernels read through the plan's geometry, or -1 on overflow.
int64_t max_offset(const Plan& p) {
  const Geometry& g = p.geo;
  const int64_t extent[4][2] = {{g.batch - 1, g.batch_stride}, {p.n0 - 1, g.s0}, {g.n1 - 1, g.s1}, {g.n2 - 1, g.s2}};
  int64_t total = 0;
  for (const auto& e : extent) {
    int64_t term = 0;
    if (mul_overflows(e[0], e[1], &term) || __builtin_add_overflow(total, term, &total)) return -1;
  }
  return total;
}

void check_on_device(const char* fn, const char* name, const at::Tensor& t, const at::Tensor& out) {
  TORCH_CHECK(t.is_cuda() && t.layout() == at::kStrided, fn, ": ", name, ": expected a strided CUDA tensor");
  TORCH_CHECK(t.device() == out.device(), fn, ": ", name, ": is on ", t.device(), " but out is on ", out.device());
}

// A planned input: same dtype as out, and every element the geometry addresses inside its storage.
void check_input(const char* fn, const char* name, const at::Tensor& t, const at::Tensor& out, const Plan& p) {
  check_on_device(fn, name, t, out);
  TORCH_CHECK_TYPE(t.scalar_type() == out.scalar_type(), fn, ": ", name, ": dtype ", t.scalar_type(),
                   " differs from out ", out.scalar_type());
  const int64_t last = max_offset(p);
  const int64_t available = static_cast<int64_t>(t.storage().nbytes() / t.itemsize()) - t.storage_offset();
  TORCH_CHECK(last >= 0 && last < available, fn, ": ", name, ": the plan addresses element ", last,
              " but the storage holds ", available, " from the tensor's offset");
}

// out (and the momentum buffer) are written at b * inner + idx: dense, batch outermost.
void check_dense(const char* fn, const char* name, const at::Tensor& t, const at::Tensor& out, const Plan& p) {
  check_on_device(fn, name, t, out);
  TORCH_CHECK(t.numel() == p.geo.batch * p.geo.inner && t.dim() >= 1 && t.size(0) == p.geo.batch, fn, ": ", name,
              ": shape ", t.sizes(), " does not hold ", p.geo.batch, " samples of ", p.geo.inner, " elements");
  TORCH_CHECK(t.is_non_overlapping_and_dense() && (p.geo.batch == 1 || t.stride(0) == p.geo.inner), fn, ": ", name,
              ": must be dense with the batch outermost (strides ", t.strides(), ")");
}

Scale read_scale(const char* fn, const char* name, double value, const std::optional<at::Tensor>& t,
                 const at::Tensor& out, int64_t batch) {
  if (!t.has_value()) return Scale{static_cast<float>(value), nullptr, 0};
  check_on_device(fn, name, *t, out);
  TORCH_CHECK_TYPE(t->scalar_type() == at::kFloat, fn, ": ", name, ": scale tensors must be float32, got ",
                   t->scalar_type());
  TORCH_CHECK(t->dim() <= 1 && (t->numel() == 1 || t->numel() == batch), fn, ": ", name,
              ": expected shape (), (1,) or (", batch, ",), got ", t->sizes());
  return Scale{0.0f, t->data_ptr<float>(), t->numel() == 1 ? 0 : t->stride(0)};
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// The vectorised path: rank 1, unit stride, whole groups, 16-byte aligned groups in every input.
bool vector_path(const Plan& p, size_t itemsize, std::initializer_list<const void*> pointers) {
  const Geometry& g = p.geo;
  if (g.rank != 1 || g.s2 != 1 || g.inner % kGroup != 0) return false;
  if (g.batch > 1 && (g.batch_stride * static_cast<int64_t>(itemsize)) % 16 != 0) return false;
  for (const void* ptr : pointers) {
    if (ptr != nullptr && !aligned16(ptr)) return false;
  }
  return true;
}

at::Tensor stats_workspace(const at::Tensor& out, const Plan& p) {
  return at::empty({p.geo.batch * p.parts * gc::kRowFloats}, out.options().dtype(at::kFloat));
}

// The channel-wise plan: [batch, C, P1, P2, bs, cs, s1, s2, ocs, o1, o2] (_layout.channel_geometry).
struct ChannelPlan {
  int64_t batch, channels, p1, p2, bs, cs, s1, s2, ocs, o1, o2;
};

ChannelPlan read_channel_plan(const char* fn, const std::vector<int64_t>& g) {
  TORCH_CHECK(g.size() == 11, fn, ": geometry: expected 11 integers, got ", g.size());
  const ChannelPlan c{g[0], g[1], g[2], g[3], g[4], g[5], g[6], g[7], g[8], g[9], g[10]};
  TORCH_CHECK(c.batch >= 1 && c.channels >= 1 && c.p1 >= 1 && c.p2 >= 1, fn, ": geometry: sizes must be positive");
  TORCH_CHECK(c.bs >= 0 && c.cs >= 0 && c.s1 >= 0 && c.s2 >= 0 && c.ocs >= 0 && c.o1 >= 0 && c.o2 >= 0, fn,
              ": geometry: strides must be non-negative");
  return c;
}

// Largest offset of (b, c, i1, i2) with the given strides, or -1 on overflow.
int64_t channel_extent(const ChannelPlan& c, int64_t bs, int64_t cs, int64_t s1, int64_t s2) {
  const int64_t extent[4][2] = {{c.batch - 1, bs}, {c.channels - 1, cs}, {c.p1 - 1, s1}, {c.p2 - 1, s2}};
  int64_t total = 0;
  for (const auto& e : extent) {
    int64_t term = 0;
    if (mul_overflows(e[0], e[1], &term) || __builtin_add_overflow(total, term, &total)) return -1;
  }
  return total;
}

}  // namespace

int64_t guidance_combine_tile() { return gc::kTile; }

int64_t guidance_combine_threads() { return gc::kThreads; }

void channel_combine_cuda(const at::Tensor& out, const std::vector<at::Tensor>& xs, int64_t base,
                          const std::vector<int64_t>& pos, const std::vector<int64_t>& neg,
                          const std::vector<double>& scales,
                          const std::vector<std::optional<at::Tensor>>& scale_tensors, int64_t kind, int64_t ref,
                          double strength, const std::optional<at::Tensor>& strength_tensor,
                          const std::vector<int64_t>& geometry, int64_t parts, int64_t chunk) {
  TORCH_CHECK(kind == gc::kCfgNorm || kind == gc::kMahiro, "channel_combine (cuda): kind must be 1 (CFG-Norm) or "
              "2 (Mahiro), got ", kind);
  const char* fn = kind == gc::kCfgNorm ? "guidance_combine cfg_norm (cuda)" : "guidance_combine mahiro (cuda)";
  TORCH_CHECK(out.is_cuda(), fn, ": out must be a CUDA tensor");
  const ChannelPlan c = read_channel_plan(fn, geometry);
  int64_t positions = 0, inner = 0, numel = 0;
  TORCH_CHECK(!mul_overflows(c.p1, c.p2, &positions) && !mul_overflows(positions, c.channels, &inner) &&
              !mul_overflows(inner, c.batch, &numel), fn, ": geometry: sizes overflow");
  TORCH_CHECK(out.numel() == numel && out.dim() >= 2 && out.size(0) == c.batch && out.is_non_overlapping_and_dense() &&
              (c.batch == 1 || out.stride(0) == inner), fn, ": out: must be dense with the batch outermost and hold ",
              c.batch, " samples of ", inner, " elements");
  const int64_t last_out = channel_extent(c, inner, c.ocs, c.o1, c.o2);
  TORCH_CHECK(last_out >= 0 && last_out < numel, fn, ": geometry: output offsets leave out");
  const int64_t nslots = static_cast<int64_t>(xs.size());
  TORCH_CHECK(nslots >= 1 && nslots <= gc::kMaxBranches, fn, ": xs: 1 to ", gc::kMaxBranches, " branches, got ", nslots);
  const int64_t nterms = static_cast<int64_t>(pos.size());
  TORCH_CHECK(nterms <= gc::kMaxTerms && (kind == gc::kCfgNorm || nterms >= 1), fn, ": 1 to ", gc::kMaxTerms,
              " terms (Mahiro reads the first), got ", nterms);
  TORCH_CHECK(neg.size() == pos.size() && scales.size() == pos.size() && scale_tensors.size() == pos.size(), fn,
              ": pos, neg, scales and scale_tensors must have one entry per term");
  auto slot = [&](const char* name, int64_t i) {
    TORCH_CHECK(i >= 0 && i < nslots, fn, ": ", name, ": slot ", i, " out of range for ", nslots, " branches");
    return static_cast<int32_t>(i);
  };
  const int64_t last_in = channel_extent(c, c.bs, c.cs, c.s1, c.s2);
  gc::ChannelParams p{};
  p.out = out.data_ptr();
  p.nslots = static_cast<int32_t>(nslots);
  for (int64_t k = 0; k < nslots; ++k) {
    check_on_device(fn, "xs", xs[k], out);
    TORCH_CHECK_TYPE(xs[k].scalar_type() == out.scalar_type(), fn, ": xs: dtype ", xs[k].scalar_type(),
                     " differs from out ", out.scalar_type());
    const int64_t available = static_cast<int64_t>(xs[k].storage().nbytes() / xs[k].itemsize()) -
                              xs[k].storage_offset();
    TORCH_CHECK(last_in >= 0 && last_in < available, fn, ": xs: the plan addresses element ", last_in,
                " but the storage holds ", available, " from the tensor's offset");
    p.x[k] = xs[k].data_ptr();
  }
  p.base = slot("base", base);
  p.nterms = static_cast<int32_t>(nterms);
  p.ref = kind == gc::kCfgNorm ? slot("ref", ref) : 0;
  for (int64_t t = 0; t < nterms; ++t) {
    p.pos[t] = slot("pos", pos[t]);
    p.neg[t] = slot("neg", neg[t]);
    p.g[t] = read_scale(fn, "scale_tensors", scales[t], scale_tensors[t], out, c.batch);
  }
  if (kind == gc::kCfgNorm) p.strength = read_scale(fn, "strength_tensor", strength, strength_tensor, out, c.batch);
  p.batch = c.batch;
  p.channels = c.channels;
  p.positions = positions;
  p.p2 = c.p2;
  p.inner = inner;
  p.bs = c.bs;
  p.cs = c.cs;
  p.s1 = c.s1;
  p.s2 = c.s2;
  p.ocs = c.ocs;
  p.o1 = c.o1;
  p.o2 = c.o2;
  p.by_p2 = make_divider(static_cast<uint64_t>(c.p2));
  const int64_t per_sample = (positions + gc::kThreads - 1) / gc::kThreads;
  int64_t blocks = 0;
  TORCH_CHECK(!mul_overflows(c.batch, per_sample, &blocks) && blocks <= std::numeric_limits<int32_t>::max(), fn,
              ": too many blocks");
  at::Tensor stats;
  if (kind == gc::kMahiro) {
    TORCH_CHECK(chunk >= 1 && chunk % gc::kThreads == 0, fn, ": chunk ", chunk, " must be a positive multiple of ",
                gc::kThreads);
    TORCH_CHECK(parts == positions / chunk + (positions % chunk != 0 ? 1 : 0), fn, ": parts ", parts, " x chunk ",
                chunk, " must cover ", positions, " positions without empty chunks");
    TORCH_CHECK(c.batch * parts <= std::numeric_limits<int32_t>::max(), fn, ": too many blocks");
    p.parts = parts;
    p.chunk = chunk;
  }
  const c10::cuda::CUDAGuard guard(out.device());
  if (kind == gc::kMahiro) {
    stats = at::empty({c.batch * parts}, out.options().dtype(at::kFloat));
    p.stats = stats.data_ptr<float>();
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(out.get_device()).stream();
  dispatch_float(fn, out.scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    if (kind == gc::kCfgNorm) {
      gc::cfg_norm_kernel<T><<<static_cast<unsigned>(blocks), gc::kThreads, 0, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    gc::mahiro_moments_kernel<T><<<static_cast<unsigned>(c.batch * parts), gc::kThreads, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    gc::mahiro_kernel<T><<<static_cast<unsigned>(blocks), gc::kThreads, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void guidance_combine_cuda(const at::Tensor& out, const std::vector<at::Tensor>& xs, int64_t base,
                           const std::vector<int64_t>& pos, const std::vector<int64_t>& neg,
                           const std::vector<double>& scales,
                           const std::vector<std::optional<at::Tensor>>& scale_tensors, bool rescale, int64_t ref,
                           double phi, const std::optional<at::Tensor>& phi_tensor,
                           const std::vector<int64_t>& geometry, int64_t parts, int64_t chunk) {
  const char* fn = "guidance_combine (cuda)";
  TORCH_CHECK(out.is_cuda(), fn, ": out must be a CUDA tensor");
  const Plan plan = read_plan(fn, geometry, parts, chunk);
  check_dense(fn, "out", out, out, plan);
  const int64_t nslots = static_cast<int64_t>(xs.size());
  TORCH_CHECK(nslots >= 1 && nslots <= gc::kMaxBranches, fn, ": xs: 1 to ", gc::kMaxBranches,
              " branches, got ", nslots);
  const int64_t nterms = static_cast<int64_t>(pos.size());
  TORCH_CHECK(nterms <= gc::kMaxTerms, fn, ": at most ", gc::kMaxTerms, " terms, got ", nterms);
  TORCH_CHECK(neg.size() == pos.size() && scales.size() == pos.size() && scale_tensors.size() == pos.size(), fn,
              ": pos, neg, scales and scale_tensors must have one entry per term");
  auto slot = [&](const char* name, int64_t i) {
    TORCH_CHECK(i >= 0 && i < nslots, fn, ": ", name, ": slot ", i, " out of range for ", nslots, " branches");
    return static_cast<int32_t>(i);
  };

  gc::CombineParams p{};
  p.out = out.data_ptr();
  p.nslots = static_cast<int32_t>(nslots);
  p.base = slot("base", base);
  p.nterms = static_cast<int32_t>(nterms);
  p.ref = rescale ? slot("ref", ref) : 0;
  for (int64_t k = 0; k < nslots; ++k) {
    check_input(fn, "xs", xs[k], out, plan);
    p.x[k] = xs[k].data_ptr();
  }
  for (int64_t t = 0; t < nterms; ++t) {
    p.pos[t] = slot("pos", pos[t]);
    p.neg[t] = slot("neg", neg[t]);
    p.g[t] = read_scale(fn, "scale_tensors", scales[t], scale_tensors[t], out, plan.geo.batch);
  }
  if (rescale) {
    p.phi = read_scale(fn, "phi_tensor", phi, phi_tensor, out, plan.geo.batch);
    p.one_minus_phi = static_cast<float>(1.0 - phi);
  }
  p.parts = plan.parts;
  p.chunk = plan.chunk;
  p.geo = plan.geo;
  p.out_vector = aligned16(p.out) && plan.geo.inner % kGroup == 0;
  const bool vec = vector_path(plan, out.itemsize(), {p.x[0], p.x[1], p.x[2], p.x[3], p.x[4], p.x[5], p.x[6],
                                                      p.x[7], p.out});

  const c10::cuda::CUDAGuard guard(out.device());
  at::Tensor stats;
  if (rescale) {
    stats = stats_workspace(out, plan);
    p.stats = stats.data_ptr<float>();
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(out.get_device()).stream();
  const dim3 grid(static_cast<unsigned>(plan.geo.batch * plan.parts));
  dispatch_float(fn, out.scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    auto launch = [&](auto vec_tag) {
      constexpr bool VEC = decltype(vec_tag)::value;
      if (rescale) {
        gc::combine_moments_kernel<T, VEC><<<grid, gc::kThreads, 0, stream>>>(p);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      gc::combine_kernel<T, VEC><<<grid, gc::kThreads, 0, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (vec) {
      launch(std::true_type{});
    } else {
      launch(std::false_type{});
    }
  });
}

void projected_combine_cuda(const at::Tensor& out, const at::Tensor& cond, const at::Tensor& uncond,
                            const std::optional<at::Tensor>& momentum_buffer, int64_t kind, int64_t formulation,
                            double scale, const std::optional<at::Tensor>& scale_tensor, double eta,
                            double norm_threshold, double momentum, double alpha, bool rescale, double phi,
                            const std::optional<at::Tensor>& phi_tensor, const std::vector<int64_t>& geometry,
                            int64_t parts, int64_t chunk) {
  static const char* const names[] = {"projected_combine (cuda)", "apg_combine (cuda)", "cfg_zero_star_combine (cuda)",
                                      "tcfg_combine (cuda)", "mag_combine (cuda)"};
  TORCH_CHECK(kind >= gc::kApg && kind <= gc::kMag, "projected_combine (cuda): kind must be 1 (APG), 2 (CFG-Zero*), "
              "3 (TCFG) or 4 (MAG), got ", kind);
  const char* fn = names[kind];
  TORCH_CHECK(kind == gc::kApg ? (formulation >= gc::kPaper && formulation <= gc::kCfgOriginal)
                               : (formulation == 0 || formulation == 1),
              fn, ": formulation ", formulation, " out of range");
  TORCH_CHECK(kind == gc::kApg || !momentum_buffer.has_value(), fn, ": only APG takes a momentum buffer");
  TORCH_CHECK(out.is_cuda(), fn, ": out must be a CUDA tensor");
  const Plan plan = read_plan(fn, geometry, parts, chunk);
  check_dense(fn, "out", out, out, plan);
  check_input(fn, "cond", cond, out, plan);
  check_input(fn, "uncond", uncond, out, plan);

  gc::ProjectedParams p{};
  p.out = out.data_ptr();
  p.cond = cond.data_ptr();
  p.uncond = uncond.data_ptr();
  if (momentum_buffer.has_value()) {
    const at::Tensor& buf = *momentum_buffer;
    check_dense(fn, "momentum_buffer", buf, out, plan);
    TORCH_CHECK_TYPE(buf.scalar_type() == at::kFloat || buf.scalar_type() == out.scalar_type(), fn,
                     ": momentum_buffer: dtype ", buf.scalar_type(), " (float32 or ", out.scalar_type(), ")");
    for (int64_t d = 0; d < buf.dim(); ++d) {
      TORCH_CHECK(buf.size(d) == out.size(d) && (buf.size(d) == 1 || buf.stride(d) == out.stride(d)), fn,
                  ": momentum_buffer: layout ", buf.strides(), " differs from the output's ", out.strides());
    }
    p.buf = buf.data_ptr();
  }
  p.momentum = static_cast<float>(momentum);
  p.w = read_scale(fn, "scale_tensor", scale, scale_tensor, out, plan.geo.batch);
  p.gain_number = static_cast<float>(kind == gc::kApg && formulation == gc::kPaper ? scale - 1.0 : scale);
  p.eta = static_cast<float>(eta);
  p.threshold = static_cast<float>(norm_threshold);
  p.alpha = static_cast<float>(alpha);
  p.formulation = static_cast<int32_t>(formulation);
  p.rescale = rescale;
  if (rescale) {
    p.phi = read_scale(fn, "phi_tensor", phi, phi_tensor, out, plan.geo.batch);
    p.one_minus_phi = static_cast<float>(1.0 - phi);
  }
  p.parts = plan.parts;
  p.chunk = plan.chunk;
  p.geo = plan.geo;
  p.out_vector = aligned16(p.out) && plan.geo.inner % kGroup == 0;
  const bool vec = vector_path(plan, out.itemsize(), {p.cond, p.uncond, p.out, p.buf});

  const c10::cuda::CUDAGuard guard(out.device());
  const at::Tensor stats = stats_workspace(out, plan);
  p.stats = stats.data_ptr<float>();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(out.get_device()).stream();
  const dim3 grid(static_cast<unsigned>(plan.geo.batch * plan.parts));
  const bool buffer_float = momentum_buffer.has_value() && momentum_buffer->scalar_type() == at::kFloat;
  dispatch_float(fn, out.scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    auto launch = [&](auto kind_tag, auto buf_tag, auto vec_tag) {
      constexpr int KIND = decltype(kind_tag)::value;
      using BufT = typename decltype(buf_tag)::type;
      constexpr bool VEC = decltype(vec_tag)::value;
      gc::projected_moments_kernel<KIND, T, BufT, VEC><<<grid, gc::kThreads, 0, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      gc::projected_kernel<KIND, T, BufT, VEC><<<grid, gc::kThreads, 0, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    auto with_path = [&](auto kind_tag, auto buf_tag) {
      if (vec) {
        launch(kind_tag, buf_tag, std::true_type{});
      } else {
        launch(kind_tag, buf_tag, std::false_type{});
      }
    };
    using ApgTag = std::integral_constant<int, gc::kApg>;
    if (kind == gc::kCfgZeroStar) {
      with_path(std::integral_constant<int, gc::kCfgZeroStar>{}, TypeTag<NoBuffer>{});
    } else if (kind == gc::kTcfg) {
      with_path(std::integral_constant<int, gc::kTcfg>{}, TypeTag<NoBuffer>{});
    } else if (kind == gc::kMag) {
      with_path(std::integral_constant<int, gc::kMag>{}, TypeTag<NoBuffer>{});
    } else if (!momentum_buffer.has_value()) {
      with_path(ApgTag{}, TypeTag<NoBuffer>{});
    } else if (buffer_float) {
      with_path(ApgTag{}, TypeTag<float>{});
    } else {
      with_path(ApgTag{}, TypeTag<T>{});
    }
  });
}

}  // namespace guidance_kernels
