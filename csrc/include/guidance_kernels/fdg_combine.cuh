// CUDA kernels of fdg_combine (frequency-decoupled guidance on kornia's Laplacian pyramid). Raw
// pointers, sizes and strides only; no torch headers. csrc/fdg_combine.cu launches them; the
// algorithm and the launch sequence are those of guidance_kernels/triton/fdg_combine.py (read its
// docstring first):
//
//   down_kernel (levels 1 .. L-1)  G_i = pyrdown(G_{i-1}) of d = cond - uncond (and of cond when a
//                                   level needs statistics): a 6x6 stencil per output pixel, level 0
//                                   read through kornia's power-of-two reflect padding
//   stats_kernel (levels that need statistics)  rows of count, means, centred co-moments and raw
//                                   sums of (Lc_i, Ld_i), L_i = G_i - pyrup(G_{i+1}) on the fly; the
//                                   combine family's Moments, groups of 8, block merge and rows
//   coef_kernel (one block per sample)  (a_i, b_i, guided): level i's value a_i Lc_i + b_i Ld_i (a
//                                   kept level never reads uncond: the d terms of level i are taken
//                                   only where level i or i - 1 is guided, as the anchor reads it)
//   recon_kernel (i = L-1 .. 1, L >= 3)  R_i = (a_i - a_{i-1}) G_i(c) + (b_i - b_{i-1}) G_i(d) + pyrup(R_{i+1})
//   final_kernel                     out = a_0 c + b_0 d + pyrup(R_1) over the (H, W) crop; with a
//                                   data-space rescale, final_moments_kernel first gives rows of the
//                                   moments of (cond, out) (out in fp32) and final_kernel rescales
//
// pyrup is a 5x5 stencil whose per-axis weights come from guidance_kernels/_spec.py pyrup_table
// (exact in fp32); pyrdown's per-axis taps are [1, 5, 10, 10, 5, 1] / 32 (exact). One thread per
// output element; every operation rounds explicitly, so tests/host/fdg_combine_host.cpp computes
// the device's bits on the CPU.
#pragma once

#include "guidance_combine.cuh"

// pyrup's rows one at a time: unrolling all 25 taps keeps them all in flight, past 128 registers.
#if defined(__CUDACC__)
#define GK_FDG_ROLLED _Pragma("unroll 1")
#else
#define GK_FDG_ROLLED
#endif

namespace guidance_kernels {
namespace fdg {

namespace gc = guidance_kernels::combine;

constexpr int kThreads = 256;
constexpr int kMaxLevels = 8;
constexpr float kNormalizeEps = 1e-12f;  // F.normalize

// pyrdown's per-axis taps on the reflected source at 2i - 2 .. 2i + 3: [1, 5, 10, 10, 5, 1] / 32.
GK_HD constexpr float down_weight(int t) {
  return (t == 0 || t == 5) ? 1.0f / 32 : ((t == 1 || t == 4) ? 5.0f / 32 : 10.0f / 32);
}

// Statistics of (Lc, Ld): both centred, raw sums S_cc (pair 00) and S_cd (pair 01).
using LevelMoments = gc::Moments<2, 2, 0b101u>;

// A prediction as (B, C', H, W) with element strides.
struct Image {
  const void* ptr;
  int64_t bs, cs, ys, xs;
};

// One pyramid level: its size, its fp32 buffers (levels >= 1: G of d and of c, then R) and the
// pyrup weights that expand it to the next finer level ((2h, 5) and (2w, 5)). Each launch gets the
// levels it touches as values (no run-time indexing into the kernel parameters).
struct Level {
  int32_t index;
  int64_t h, w;
  Divider by_h, by_w;
  float* g_d;
  float* g_c;
  float* r;
  const float* tab_y;
  const float* tab_x;
};

struct Params {
  void* out;
  int64_t obs, ocs, oys, oxs;  // the output as (B, C', H, W)
  Image c, u;
  int64_t batch, channels, height, width;  // the latent (unpadded)
  Divider by_height, by_width;
  int32_t levels, original, with_c;
  // Per level, read by coef_kernel only (with compile-time indices):
  Scale s[kMaxLevels];
  float weight[kMaxLevels];  // parallel weights
  Scale phi[kMaxLevels];     // frequency-space rescale
  int32_t project[kMaxLevels], rescale[kMaxLevels];
  float* stats[kMaxLevels];  // (B, parts_i, gc::kRowFloats) rows of the levels that need them
  int64_t parts[kMaxLevels];
  float* coef;  // (B, L, 3): (a_i, b_i, 1 if guided else 0)
  // Data-space rescale: rows of the moments of (cond, out) over each sample's crop (fp32 out).
  int32_t data_rescale;
  Scale data_phi;
  float* final_stats;
  int64_t final_parts, final_chunk;
};

GK_HD int64_t reflect(int64_t i, int64_t n) {
  i = i < 0 ? -i : i;
  return i >= n ? 2 * (n - 1) - i : i;
}

GK_HD int64_t clamp_index(int64_t i, int64_t n) { return i < 0 ? 0 : (i >= n ? n - 1 : i); }

// (plane = b C' + channel, y, x) of a flat index over (B, C', h, w).
struct Pixel {
  int64_t plane, y, x;
};

GK_HD Pixel pixel_at(const Divider& by_h, const Divider& by_w, int64_t h, int64_t w, int64_t idx) {
  const int64_t rest = divide(by_w, idx);
  const int64_t plane = divide(by_h, rest);
  return Pixel{plane, rest - plane * h, idx - rest * w};
}

// A prediction at (plane, y, x) of kornia's padded level 0 (reflect beyond the latent).
template <Fmt F>
GK_HD float level0(const Params& p, const Image& im, int64_t plane, int64_t y, int64_t x) {
  y = y >= p.height ? 2 * (p.height - 1) - y : y;
  x = x >= p.width ? 2 * (p.width - 1) - x : x;
  const int64_t b = plane / p.channels;
  const int64_t ch = plane - b * p.channels;
  return gc::load_scalar<F>(im.ptr, b * im.bs + ch * im.cs + y * im.ys + x * im.xs);
}

// pyrup of `src` (an fp32 buffer of `from`'s size) at (y, x) of the doubled grid. Zero-weight taps
// are skipped, not multiplied: a non-finite pixel outside kornia's footprint must not become NaN.
GK_HD float up_at(const Level& from, const float* src, int64_t plane, int64_t y, int64_t x) {
  const float* base = src + plane * from.h * from.w;
  float acc = 0.0f;
  GK_FDG_ROLLED
  for (int ty = 0; ty < 5; ++ty) {
    const float wy = from.tab_y[y * 5 + ty];
    const int64_t sy = clamp_index(y / 2 - 2 + ty, from.h);
    float row = 0.0f;
    GK_UNROLL
    for (int tx = 0; tx < 5; ++tx) {
      const float wx = from.tab_x[x * 5 + tx];
      const float tap = base[sy * from.w + clamp_index(x / 2 - 2 + tx, from.w)];  // always in bounds
      row = add_rn(row, wx != 0.0f ? mul_rn(wx, tap) : 0.0f);
    }
    acc = add_rn(acc, wy != 0.0f ? mul_rn(wy, row) : 0.0f);
  }
  return acc;
}

// pyrdown from `src` (level 0: the predictions) at pixel idx of `dst`: (d, c).
template <Fmt F, bool FIRST>
GK_HD void down_at(const Params& p, const Level& src, const Level& dst, int64_t idx, float* d_out, float* c_out) {
  const Pixel px = pixel_at(dst.by_h, dst.by_w, dst.h, dst.w, idx);
  float acc_d = 0.0f, acc_c = 0.0f;
  GK_UNROLL
  for (int ty = 0; ty < 6; ++ty) {
    const int64_t ry = reflect(2 * px.y - 2 + ty, src.h);
    float row_d = 0.0f, row_c = 0.0f;
    GK_UNROLL
    for (int tx = 0; tx < 6; ++tx) {
      const int64_t rx = reflect(2 * px.x - 2 + tx, src.w);
      float d, c = 0.0f;
      if constexpr (FIRST) {
        c = level0<F>(p, p.c, px.plane, ry, rx);
        d = sub_rn(c, level0<F>(p, p.u, px.plane, ry, rx));
      } else {
        const int64_t at = (px.plane * src.h + ry) * src.w + rx;
        d = src.g_d[at];
        if (p.with_c) c = src.g_c[at];
      }
      row_d = add_rn(row_d, mul_rn(down_weight(tx), d));
      row_c = add_rn(row_c, mul_rn(down_weight(tx), c));
    }
    acc_d = add_rn(acc_d, mul_rn(down_weight(ty), row_d));
    acc_c = add_rn(acc_c, mul_rn(down_weight(ty), row_c));
  }
  *d_out = acc_d;
  *c_out = acc_c;
}

// (Lc, Ld) of `lvl` at its flat index idx (sample included); `next` is the coarser level.
template <Fmt F, bool LEVEL0, bool LAST>
GK_HD void laplacian_at(const Params& p, const Level& lvl, const Level& next, int64_t idx, float* lc, float* ld) {
  const Pixel px = pixel_at(lvl.by_h, lvl.by_w, lvl.h, lvl.w, idx);
  float c, d;
  if constexpr (LEVEL0) {
    c = level0<F>(p, p.c, px.plane, px.y, px.x);
    d = sub_rn(c, level0<F>(p, p.u, px.plane, px.y, px.x));
  } else {
    c = lvl.g_c[idx];
    d = lvl.g_d[idx];
  }
  if constexpr (!LAST) {
    c = sub_rn(c, up_at(next, next.g_c, px.plane, px.y, px.x));
    d = sub_rn(d, up_at(next, next.g_d, px.plane, px.y, px.x));
  }
  *lc = c;
  *ld = d;
}

// A level's statistics over the group of 8 elements at `start` of sample b (valid of them).
template <Fmt F, bool LEVEL0, bool LAST>
GK_HD LevelMoments level_group_moments(const Params& p, const Level& lvl, const Level& next, int64_t b,
                                       int64_t start, int valid) {
  const int64_t inner = p.channels * lvl.h * lvl.w;
  float f[2][kGroup];
  GK_UNROLL
  for (int e = 0; e < kGroup; ++e) {  // constant indices: f stays in registers
    float lc = 0.0f, ld = 0.0f;
    if (e < valid) laplacian_at<F, LEVEL0, LAST>(p, lvl, next, b * inner + start + e, &lc, &ld);
    f[0][e] = lc;
    f[1][e] = ld;
  }
  return gc::group_moments<LevelMoments>(f, valid);
}

// (a_i, b_i) of sample b at level i from its merged statistics m (when it needs them).
GK_HD void level_coefficients(const Params& p, int i, int64_t b, const LevelMoments& m, float* coef) {
  const float s = p.s[i].at(b);
  float a = 1.0f;
  float bc = p.original ? s : sub_rn(s, 1.0f);
  if (p.project[i]) {
    const float norm = max_nan(sqrt_rn(gc::raw_dot(m, 0, 0)), kNormalizeEps);
    const float k = div_rn(div_rn(gc::raw_dot(m, 0, 1), norm), norm);
    a = add_rn(1.0f, mul_rn(mul_rn(s, sub_rn(p.weight[i], 1.0f)), k));
  }
  if (p.rescale[i]) {
    const float phi = p.phi[i].at(b);
    const float coeffs[2] = {a, bc};
    const float nm1 = sub_rn(m.n, 1.0f);
    const float ratio = div_rn(sqrt_rn(div_rn(m.m[0], nm1)), sqrt_rn(div_rn(gc::quadratic(m, coeffs), nm1)));
    const float rho = add_rn(mul_rn(phi, ratio), sub_rn(1.0f, phi));
    a = mul_rn(a, rho);
    bc = mul_rn(bc, rho);
  }
  const bool keep = s == (p.original ? 0.0f : 1.0f);  // diffusers' isclose: the level stays cond's
  coef[3 * i] = keep ? 1.0f : a;
  coef[3 * i + 1] = keep ? 0.0f : bc;
  coef[3 * i + 2] = keep ? 0.0f : 1.0f;
}

// R of `lvl` at its flat index idx; `next` holds R of the coarser level (when HAS_UP).
template <bool HAS_UP>
GK_HD float recon_at(const Params& p, const Level& lvl, const Level& next, int64_t idx) {
  const Pixel px = pixel_at(lvl.by_h, lvl.by_w, lvl.h, lvl.w, idx);
  const float* k = p.coef + (px.plane / p.channels) * p.levels * 3 + 3 * lvl.index;
  // uncond enters G_i(d) only where the anchor reads it: level i or i - 1 guided
  float v = (k[2] + k[-1] > 0.0f) ? mul_rn(sub_rn(k[1], k[-2]), lvl.g_d[idx]) : 0.0f;
  if (p.with_c) v = add_rn(v, mul_rn(sub_rn(k[0], k[-3]), lvl.g_c[idx]));
  if constexpr (HAS_UP) v = add_rn(v, up_at(next, next.r, px.plane, px.y, px.x));
  return v;
}

// The output of sample b at `local` (an index of its (C', H, W) crop), in fp32; `first` is level 1
// (two or more levels). *cond receives the cond value there (the rescale's reference).
template <Fmt F>
GK_HD float final_value(const Params& p, const Level& first, int64_t b, int64_t local, float* cond) {
  const Pixel px = pixel_at(p.by_height, p.by_width, p.height, p.width, b * p.channels * p.height * p.width + local);
  const int64_t ch = px.plane - b * p.channels;
  const float c = gc::load_scalar<F>(p.c.ptr, b * p.c.bs + ch * p.c.cs + px.y * p.c.ys + px.x * p.c.xs);
  const float u = gc::load_scalar<F>(p.u.ptr, b * p.u.bs + ch * p.u.cs + px.y * p.u.ys + px.x * p.u.xs);
  const float* k = p.coef + b * p.levels * 3;
  float out = add_rn(mul_rn(k[0], c), k[2] > 0.0f ? mul_rn(k[1], sub_rn(c, u)) : 0.0f);
  if (p.levels == 2) {
    const float up_d = up_at(first, first.g_d, px.plane, px.y, px.x);
    out = add_rn(out, k[2] + k[5] > 0.0f ? mul_rn(sub_rn(k[4], k[1]), up_d) : 0.0f);
    if (p.with_c) out = add_rn(out, mul_rn(sub_rn(k[3], k[0]), up_at(first, first.g_c, px.plane, px.y, px.x)));
  } else if (p.levels > 2) {
    out = add_rn(out, up_at(first, first.r, px.plane, px.y, px.x));
  }
  *cond = c;
  return out;
}

// The output's element offset of sample b's `local`.
GK_HD int64_t final_offset(const Params& p, int64_t b, int64_t local) {
  const Pixel px = pixel_at(p.by_height, p.by_width, p.height, p.width, b * p.channels * p.height * p.width + local);
  return b * p.obs + (px.plane - b * p.channels) * p.ocs + px.y * p.oys + px.x * p.oxs;
}

// Data-space rescale, pass 1: moments of (cond, out) over the group of 8 at `start` of sample b.
template <Fmt F>
GK_HD gc::CombineMoments final_group_moments(const Params& p, const Level& first, int64_t b, int64_t start,
                                             int valid) {
  float f[2][kGroup];
  GK_UNROLL
  for (int e = 0; e < kGroup; ++e) {
    float c = 0.0f, out = 0.0f;
    if (e < valid) out = final_value<F>(p, first, b, start + e, &c);
    f[0][e] = c;
    f[1][e] = out;
  }
  return gc::group_moments<gc::CombineMoments>(f, valid);
}

// The rescale of sample b from its merged rows (diffusers' rescale_noise_cfg against cond).
GK_HD gc::Rescale final_rescale(const Params& p, int64_t b, const gc::CombineMoments& m) {
  const float phi = p.data_phi.at(b);
  return gc::make_rescale(m.n, m.m[0], m.m[1], phi, sub_rn(1.0f, phi));
}

// The per-level merge of coef_kernel on the CPU, for the host emulation.
GK_HOST void coefficients_on_host(const Params& p, int64_t b) {
  for (int i = 0; i < p.levels; ++i) {
    LevelMoments m = gc::empty_moments<LevelMoments>();
    if (p.project[i] || p.rescale[i]) m = gc::sample_moments_on_host<LevelMoments>(p.stats[i], b, p.parts[i]);
    level_coefficients(p, i, b, m, p.coef + b * p.levels * 3);
  }
}

#if defined(__CUDACC__)

// One thread per pixel of `dst` (levels 1 .. L-1); FIRST: src is level 0, the predictions.
template <typename T, bool FIRST>
__global__ void __launch_bounds__(kThreads) down_kernel(const Params p, const Level src, const Level dst) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (idx >= p.batch * p.channels * dst.h * dst.w) return;
  float d, c;
  down_at<Format<T>::kFmt, FIRST>(p, src, dst, idx, &d, &c);
  dst.g_d[idx] = d;
  if (p.with_c) dst.g_c[idx] = c;
}

// Block (b, part) of a level: one stats row (the combine family's decomposition and merge order).
template <typename T, bool LEVEL0, bool LAST>
__global__ void __launch_bounds__(kThreads) stats_kernel(const Params p, const Level lvl, const Level next,
                                                         float* stats, int64_t parts, int64_t chunk) {
  const gc::BlockChunk ch = gc::block_chunk(blockIdx.x, parts, chunk, p.channels * lvl.h * lvl.w);
  LevelMoments m = gc::empty_moments<LevelMoments>();
  for (int64_t start = gc::first_group(ch, threadIdx.x); start < ch.hi; start += gc::kTile) {
    m = gc::merge(m, level_group_moments<Format<T>::kFmt, LEVEL0, LAST>(p, lvl, next, ch.b, start,
                                                                         gc::group_size(start, ch.hi)));
  }
  const LevelMoments total = gc::block_total(m);
  if (threadIdx.x == 0) gc::store_row(stats + (ch.b * parts + ch.part) * gc::kRowFloats, total);
}

// One block per sample: each level's rows merged in the combine family's order, thread 0 writes
// its coefficients. Levels are unrolled so that every per-level parameter has a constant index
// (a template only so that the header defines no non-inline symbol).
template <int MAX_LEVELS = kMaxLevels>
__global__ void __launch_bounds__(kThreads) coef_kernel(const Params p) {
  const int64_t b = blockIdx.x;
  GK_UNROLL
  for (int i = 0; i < MAX_LEVELS; ++i) {
    if (i < p.levels) {
      LevelMoments m = gc::empty_moments<LevelMoments>();
      if (p.project[i] || p.rescale[i]) {
        m = gc::sample_moments<LevelMoments>(p.stats[i], b, p.parts[i]);
        __syncthreads();  // block_total's shared buffer is written again by the next level
      }
      if (threadIdx.x == 0) level_coefficients(p, i, b, m, p.coef + b * p.levels * 3);
    }
  }
}

template <bool HAS_UP>
__global__ void __launch_bounds__(kThreads) recon_kernel(const Params p, const Level lvl, const Level next) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (idx < p.batch * p.channels * lvl.h * lvl.w) lvl.r[idx] = recon_at<HAS_UP>(p, lvl, next, idx);
}

// Data-space rescale, pass 1: block (b, part) of the crop, the combine family's decomposition.
template <typename T>
__global__ void __launch_bounds__(kThreads) final_moments_kernel(const Params p, const Level first) {
  const gc::BlockChunk ch = gc::block_chunk(blockIdx.x, p.final_parts, p.final_chunk, p.channels * p.height * p.width);
  gc::CombineMoments m = gc::empty_moments<gc::CombineMoments>();
  for (int64_t start = gc::first_group(ch, threadIdx.x); start < ch.hi; start += gc::kTile) {
    m = gc::merge(m, final_group_moments<Format<T>::kFmt>(p, first, ch.b, start, gc::group_size(start, ch.hi)));
  }
  const gc::CombineMoments total = gc::block_total(m);
  if (threadIdx.x == 0) gc::store_row(p.final_stats + (ch.b * p.final_parts + ch.part) * gc::kRowFloats, total);
}

// The output: block (b, j) takes elements [256 j, 256 j + 256) of sample b's crop; with a
// data-space rescale it first merges the sample's rows (every block of a sample in the same order).
template <typename T>
__global__ void __launch_bounds__(kThreads) final_kernel(const Params p, const Level first) {
  const int64_t inner = p.channels * p.height * p.width;
  const int64_t per_sample = (inner + kThreads - 1) / kThreads;
  const int64_t b = blockIdx.x / per_sample;
  const int64_t local = (blockIdx.x - b * per_sample) * kThreads + threadIdx.x;
  gc::Rescale rs{1.0f, 0.0f, 1.0f};
  if (p.data_rescale) {
    rs = final_rescale(p, b, gc::sample_moments<gc::CombineMoments>(p.final_stats, b, p.final_parts));
  }
  if (local >= inner) return;
  float c;
  const float out = final_value<Format<T>::kFmt>(p, first, b, local, &c);
  gc::store_scalar<Format<T>::kFmt>(p.out, final_offset(p, b, local), p.data_rescale ? gc::rescaled(out, rs) : out);
}

#endif  // __CUDACC__

}  // namespace fdg
}  // namespace guidance_kernels
