// CUDA kernels of the combine family: guidance_combine, apg_combine, cfg_zero_star_combine.
// Raw pointers, sizes and strides only; no torch headers. csrc/guidance_combine.cu launches them.
//
// The design mirrors guidance_kernels/triton/guidance_combine.py (read its docstring first):
//
//  * Python plans the launch (_layout.output_like / plan / partitions): B samples of `inner`
//    elements, inputs addressed through a Geometry (rank <= 3, int64), the output written in its
//    own memory order at out + b * inner + idx. Each sample is cut into `parts` chunks of `chunk`
//    elements (a multiple of kTile); block (b, part) = blockIdx.x handles one chunk, its 256
//    threads taking a group of 8 consecutive elements each per kTile step.
//  * Plain combine: ONE launch of combine_kernel, acc = D[base] + sum_t g_t (D[pos_t] - D[neg_t])
//    in fp32 with one rounding per operation in the reference's order (bit-identical to the
//    eager fp32 reference), stored in the input dtype.
//  * Rescale / APG / CFG-Zero*: TWO launches, no atomics, no host sync. Pass 1
//    (*_moments_kernel) gives one row per (sample, chunk): count, means and centred co-moments of
//    two or three fp32 fields, merged with Chan's formula (groups of 8 -> thread -> warp -> block,
//    a fixed order, so the result is deterministic). Pass 2 (combine_kernel /
//    projected_kernel) merges its sample's rows (every block of a sample in the same order, hence
//    the same per-sample coefficients), derives the rescale ratio, the APG projection or the
//    CFG-Zero* alpha, recomputes its elements from the inputs and writes them. Fields per kind:
//    combine (ref, acc); APG (cond, cond - uncond[, running diff]); CFG-Zero* (cond, cond -
//    uncond, uncond). Every output whose std is needed is linear in the fields with per-sample
//    coefficients, so its variance is a quadratic form of the co-moments.
//
// Paths. Fast path (VEC = true), chosen on the host: rank 1, unit stride, inner % 8 == 0 and
// every pointer and the batch stride 16-byte aligned; a group is one 16-byte load per input
// (two for fp32) and one 16-byte store. Generic path (VEC = false): any rank <= 3 strides; the
// thread decomposes its first index once (multiply-high division) and steps the other seven.
// The term structure (<= 8 branches, <= 8 terms) comes by value in the params; branches are held
// as raw packed groups in registers with compile-time indices, and a term's operands are chosen
// by a switch on a warp-uniform slot index (a runtime-indexed register array would go to local
// memory; a select chain would cost ~28 SEL per operand per group).
//
// Performance expectations (H100 SXM, bf16; not measurable on the development machine):
//  * Video latent 16x21x90x160, 3 branches, plain: 4.8M elements -> 2363 blocks of 256 threads,
//    each thread keeping 3 x 16 B loads in flight (~96 KB per SM at full occupancy, well above the
//    ~25 KB Little's law asks for at ~3 TB/s). Per 16-byte group: ~35 instructions of slot
//    selection, 8 x 3 FP ops, 8 x 4 conversions, against a budget of ~300 thread-instructions per
//    64 B moved per SM: memory bound, expected >= 85-90% of copy_ bandwidth like torch's own
//    vectorised elementwise kernels.
//  * SDXL (4x128x128) / Flux (16x128x128) latents: the data (0.4 / 1.5 MB) is latency bound; one
//    launch (plain) or two (rescale, APG, CFG-Zero*) of 32-128 blocks, each a single DRAM round
//    trip; pass 2 finds its inputs in L2 (pass 1 just read them), issues the first group's loads
//    before merging the <= 128 rows, and merges them 256 threads wide. Eager diffusers code runs
//    5-25 kernels here (2.5-4 us each) and torch.compile 1-3, so >= 2.5x / 4x / 6x over eager for
//    plain / rescale / APG and parity with torch.compile are expected from launch count alone.
#pragma once

#include "common.cuh"

namespace guidance_kernels {
namespace combine {

constexpr int kMaxBranches = 8;
constexpr int kMaxTerms = 8;
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kTile = kThreads * kGroup;  // elements per block step; chunks are multiples of it
constexpr int kRowFloats = 12;  // n, mean0..2, M00, M11, M22, M01, M02, M12, 2 pad (48 B rows)

enum Kind : int { kApg = 1, kCfgZeroStar = 2 };
enum ApgFormulation : int { kPaper = 0, kDiffusers = 1, kDiffusersOriginal = 2 };

// --------------------------------------------------------------------------- moments

// Count, means and centred co-moments M_ij = sum (f_i - mean_i)(f_j - mean_j) of NF fields.
// m[] holds the diagonal first, then the upper triangle: NF = 2: M00 M11 M01; NF = 3: M00 M11
// M22 M01 M02 M12.
template <int NF>
struct Moments {
  static constexpr int kPairs = NF * (NF + 1) / 2;
  float n;
  float mean[NF];
  float m[kPairs];
};

template <int NF>
GK_HD constexpr int pair_index(int i, int j) {
  return i == j ? i : (NF == 2 ? 2 : 2 + i + j);
}

// Position of M_ij in a stats row.
GK_HD constexpr int row_index(int i, int j) { return i == j ? 4 + i : 6 + i + j; }

template <int NF>
GK_HD Moments<NF> empty_moments() {
  Moments<NF> r;
  r.n = 0.0f;
  GK_UNROLL
  for (int i = 0; i < NF; ++i) r.mean[i] = 0.0f;
  GK_UNROLL
  for (int k = 0; k < Moments<NF>::kPairs; ++k) r.m[k] = 0.0f;
  return r;
}

// Chan, Golub & LeVeque's pairwise update. An empty side (n = 0, means 0) leaves the other exact.
template <int NF>
GK_HD Moments<NF> merge(const Moments<NF>& a, const Moments<NF>& b) {
  Moments<NF> r;
  r.n = add_rn(a.n, b.n);
  const float w = div_rn(b.n, r.n > 1.0f ? r.n : 1.0f);  // counts are whole numbers
  const float cross = mul_rn(a.n, w);                      // a.n * b.n / n
  float d[NF];
  GK_UNROLL
  for (int i = 0; i < NF; ++i) {
    d[i] = sub_rn(b.mean[i], a.mean[i]);
    r.mean[i] = fma_rn(d[i], w, a.mean[i]);
  }
  GK_UNROLL
  for (int i = 0; i < NF; ++i) {
    GK_UNROLL
    for (int j = i; j < NF; ++j) {
      const int k = pair_index<NF>(i, j);
      r.m[k] = add_rn(add_rn(a.m[k], b.m[k]), mul_rn(mul_rn(d[i], d[j]), cross));
    }
  }
  return r;
}

// Exact-order moments of one group: elements e < valid of f[i][e].
template <int NF>
GK_HD Moments<NF> group_moments(const float (&f)[NF][kGroup], int valid) {
  Moments<NF> r = empty_moments<NF>();
  if (valid <= 0) return r;
  r.n = static_cast<float>(valid);
  float dev[NF][kGroup];
  GK_UNROLL
  for (int i = 0; i < NF; ++i) {
    float sum = 0.0f;
    GK_UNROLL
    for (int e = 0; e < kGroup; ++e) sum = add_rn(sum, e < valid ? f[i][e] : 0.0f);
    // Division by 8 is exact as a multiplication: skip the division sequence for full groups.
    r.mean[i] = valid == kGroup ? mul_rn(sum, 1.0f / kGroup) : div_rn(sum, r.n);
    GK_UNROLL
    for (int e = 0; e < kGroup; ++e) dev[i][e] = e < valid ? sub_rn(f[i][e], r.mean[i]) : 0.0f;
  }
  GK_UNROLL
  for (int i = 0; i < NF; ++i) {
    GK_UNROLL
    for (int j = i; j < NF; ++j) {
      float acc = 0.0f;
      GK_UNROLL
      for (int e = 0; e < kGroup; ++e) acc = fma_rn(dev[i][e], dev[j][e], acc);
      r.m[pair_index<NF>(i, j)] = acc;
    }
  }
  return r;
}

template <int NF>
GK_HD void store_row(float* row, const Moments<NF>& m) {
  float v[kRowFloats];
  GK_UNROLL
  for (int k = 0; k < kRowFloats; ++k) v[k] = 0.0f;
  v[0] = m.n;
  GK_UNROLL
  for (int i = 0; i < NF; ++i) {
    v[1 + i] = m.mean[i];
    GK_UNROLL
    for (int j = i; j < NF; ++j) v[row_index(i, j)] = m.m[pair_index<NF>(i, j)];
  }
#if defined(__CUDA_ARCH__)
  float4* out = reinterpret_cast<float4*>(row);  // rows are 48 B apart in a 16 B aligned buffer
  GK_UNROLL
  for (int q = 0; q < kRowFloats / 4; ++q) out[q] = make_float4(v[4 * q], v[4 * q + 1], v[4 * q + 2], v[4 * q + 3]);
#else
  for (int k = 0; k < kRowFloats; ++k) row[k] = v[k];
#endif
}

template <int NF>
GK_HD Moments<NF> load_row(const float* row) {
  float v[kRowFloats];
#if defined(__CUDA_ARCH__)
  const float4* in = reinterpret_cast<const float4*>(row);
  GK_UNROLL
  for (int q = 0; q < kRowFloats / 4; ++q) {
    const float4 t = in[q];
    v[4 * q] = t.x;
    v[4 * q + 1] = t.y;
    v[4 * q + 2] = t.z;
    v[4 * q + 3] = t.w;
  }
#else
  for (int k = 0; k < kRowFloats; ++k) v[k] = row[k];
#endif
  Moments<NF> m;
  m.n = v[0];
  GK_UNROLL
  for (int i = 0; i < NF; ++i) {
    m.mean[i] = v[1 + i];
    GK_UNROLL
    for (int j = i; j < NF; ++j) m.m[pair_index<NF>(i, j)] = v[row_index(i, j)];
  }
  return m;
}

// sum f_i f_j from the centred moments (exact identity; no cancellation for i == j).
template <int NF>
GK_HD float raw_dot(const Moments<NF>& m, int i, int j) {
  return add_rn(m.m[pair_index<NF>(i, j)], mul_rn(mul_rn(m.n, m.mean[i]), m.mean[j]));
}

// a^T M a for the symmetric co-moment matrix, clamped at 0 (rounding can go below).
template <int NF>
GK_HD float quadratic(const Moments<NF>& m, const float (&a)[NF]) {
  float diag = 0.0f;
  float off = 0.0f;
  GK_UNROLL
  for (int i = 0; i < NF; ++i) {
    diag = fma_rn(mul_rn(a[i], a[i]), m.m[pair_index<NF>(i, i)], diag);
    GK_UNROLL
    for (int j = i + 1; j < NF; ++j) off = fma_rn(mul_rn(a[i], a[j]), m.m[pair_index<NF>(i, j)], off);
  }
  const float q = fma_rn(2.0f, off, diag);
  return q > 0.0f ? q : (is_nan(q) ? q : 0.0f);
}

// --------------------------------------------------------------------------- per-sample coefficients

// diffusers' rescale_noise_cfg: out' = phi * (out * (std_ref / std_out)) + (1 - phi) * out, with
// unbiased std = sqrt(M / (n - 1)) (n = 1 gives NaN, as torch.std does).
struct Rescale {
  float ratio;
  float phi;
  float one_minus_phi;
};

GK_HD Rescale make_rescale(float n, float m_ref, float m_out, float phi, float one_minus_phi) {
  const float nm1 = sub_rn(n, 1.0f);
  const float ratio = div_rn(sqrt_rn(div_rn(m_ref, nm1)), sqrt_rn(div_rn(m_out, nm1)));
  return Rescale{ratio, phi, one_minus_phi};
}

GK_HD float rescaled(float x, const Rescale& r) {
  return add_rn(mul_rn(r.phi, mul_rn(x, r.ratio)), mul_rn(r.one_minus_phi, x));
}

// phi as the reference rounds it: a number's 1 - phi is rounded once from double (the launcher
// passes it), a tensor's is computed in fp32 like (1 - tensor).
GK_HD Rescale rescale_for(const Scale& phi, float one_minus_phi_number, int64_t b, float n, float m_ref,
                          float m_out) {
  const float p = phi.at(b);
  return make_rescale(n, m_ref, m_out, p, phi.ptr != nullptr ? sub_rn(1.0f, p) : one_minus_phi_number);
}

// APG (Sadat et al. Algorithm 1) per sample: with d the (running) difference and c the cond,
//   f = min(1, r / ||d||) if r > 0 else 1;  par = <f d, c> / ||c||^2 (||c|| >= 1e-12 like F.normalize)
//   update = (f d - par c) + eta par c;  out = X + gain * update,  X = c or u (diffusers formulation)
struct ApgCoef {
  float f, par, eta, gain;
  bool from_uncond;
};

GK_HD float apg_element(float c, float u, float d, const ApgCoef& k) {
  const float diff = mul_rn(k.f, d);
  const float par = mul_rn(k.par, c);
  const float update = add_rn(sub_rn(diff, par), mul_rn(k.eta, par));
  return add_rn(k.from_uncond ? u : c, mul_rn(k.gain, update));
}

// Fields: 0 = cond, 1 = cond - uncond, 2 = running difference (momentum buffer) when present.
template <int NF>
GK_HD ApgCoef apg_coefficients(const Moments<NF>& m, float gain, float eta, float threshold, int formulation,
                               float* m_out) {
  constexpr int kD = NF == 3 ? 2 : 1;
  const float r_cc = raw_dot(m, 0, 0);
  const float r_dd = raw_dot(m, kD, kD);
  const float r_dc = raw_dot(m, 0, kD);
  const float f = threshold > 0.0f ? min_nan(1.0f, div_rn(threshold, sqrt_rn(r_dd))) : 1.0f;
  const float c_norm = max_nan(sqrt_rn(r_cc), 1e-12f);
  ApgCoef k{f, div_rn(div_rn(mul_rn(f, r_dc), c_norm), c_norm), eta, gain, formulation == kDiffusers};
  // out = a_c cond + a_r (cond - uncond) + a_d running
  float a[NF];
  a[0] = fma_rn(mul_rn(gain, sub_rn(eta, 1.0f)), k.par, 1.0f);
  a[1] = k.from_uncond ? -1.0f : 0.0f;
  const float a_d = mul_rn(gain, f);
  if constexpr (NF == 3) {
    a[NF - 1] = a_d;
  } else {
    a[1] = add_rn(a[1], a_d);
  }
  *m_out = quadratic(m, a);
  return k;
}

// CFG-Zero*: alpha = <c, u> / (||u||^2 + 1e-8);  out = X + w (c - alpha u), X = alpha u (default)
// or c (original formulation). Fields: 0 = cond, 1 = cond - uncond, 2 = uncond.
struct Cfg0Coef {
  float alpha, w;
  bool original;
};

GK_HD float cfg0_element(float c, float u, const Cfg0Coef& k) {
  const float u_alpha = mul_rn(u, k.alpha);
  const float shift = sub_rn(c, u_alpha);
  return add_rn(k.original ? c : u_alpha, mul_rn(k.w, shift));
}

GK_HD Cfg0Coef cfg0_coefficients(const Moments<3>& m, float w, bool original, float* m_out) {
  const Cfg0Coef k{div_rn(raw_dot(m, 0, 2), add_rn(raw_dot(m, 2, 2), 1e-8f)), w, original};
  // out = a_cond cond + a_unc uncond = (a_cond + a_unc) cond - a_unc (cond - uncond)
  const float a_cond = original ? add_rn(1.0f, w) : w;
  const float a_unc = original ? -mul_rn(w, k.alpha) : mul_rn(k.alpha, sub_rn(1.0f, w));
  const float a[3] = {add_rn(a_cond, a_unc), -a_unc, 0.0f};
  *m_out = quadratic(m, a);
  return k;
}

// --------------------------------------------------------------------------- addressing a group

// Element offsets of a thread's group in every input (all inputs of a launch share strides).
template <bool VEC>
GK_HD void group_offsets(const Geometry& g, int64_t b, int64_t start, int valid, int64_t (&off)[kGroup]) {
  const int64_t base = b * g.batch_stride;
  if constexpr (VEC) {
    off[0] = base + start;  // rank 1, unit stride
    return;
  }
  Cursor c = cursor_at(g, start);
  GK_UNROLL
  for (int e = 0; e < kGroup; ++e) {
    off[e] = base + c.off;
    if (e + 1 < valid) advance(g, c);
  }
}

template <Fmt F, bool VEC>
GK_HD void load_group(Pack<F>& p, const void* x, const int64_t (&off)[kGroup], int valid) {
  if constexpr (VEC) {
    p.load_vector(static_cast<const char*>(x) + off[0] * FmtBits<F>::kBytes);
    return;
  }
  p.clear();
  GK_UNROLL
  for (int e = 0; e < kGroup; ++e) {
    if (e < valid) p.load_element(e, x, off[e]);
  }
}

// A group of a dense (output-layout) tensor: elements at + 0 .. at + valid - 1.
template <Fmt F>
GK_HD void load_dense(Pack<F>& p, const void* x, int64_t at, int valid, bool vector) {
  if (vector && valid == kGroup) {
    p.load_vector(static_cast<const char*>(x) + at * FmtBits<F>::kBytes);
    return;
  }
  p.clear();
  GK_UNROLL
  for (int e = 0; e < kGroup; ++e) {
    if (e < valid) p.load_element(e, x, at + e);
  }
}

template <Fmt F>
GK_HD void store_dense(const Pack<F>& p, void* x, int64_t at, int valid, bool vector) {
  if (vector && valid == kGroup) {
    p.store_vector(static_cast<char*>(x) + at * FmtBits<F>::kBytes);
    return;
  }
  GK_UNROLL
  for (int e = 0; e < kGroup; ++e) {
    if (e < valid) p.store_element(e, x, at + e);
  }
}

// --------------------------------------------------------------------------- guidance_combine

struct CombineParams {
  void* out;
  const void* x[kMaxBranches];  // the distinct branches used ("slots")
  int32_t nslots, base, nterms, ref;
  int32_t pos[kMaxTerms], neg[kMaxTerms];  // slot indices
  Scale g[kMaxTerms];
  Scale phi;            // rescale factor (used when stats != nullptr)
  float one_minus_phi;  // 1 - phi for a number phi
  float* stats;         // (B, parts, kRowFloats) rows; nullptr: plain combine, one launch
  int64_t parts, chunk;
  int32_t out_vector;   // output groups may be stored as 16-byte vectors (generic path)
  Geometry geo;
};

// The operand in slot i: a switch on a warp-uniform index keeps every slot in registers.
template <Fmt F>
GK_HD Pack<F> pick(const Pack<F> (&s)[kMaxBranches], int i) {
  switch (i) {
    case 1: return s[1];
    case 2: return s[2];
    case 3: return s[3];
    case 4: return s[4];
    case 5: return s[5];
    case 6: return s[6];
    case 7: return s[7];
    default: return s[0];
  }
}

template <Fmt F, bool VEC>
GK_HD void combine_load(const CombineParams& p, int64_t b, int64_t start, int valid, Pack<F> (&s)[kMaxBranches]) {
  int64_t off[kGroup];
  group_offsets<VEC>(p.geo, b, start, valid, off);
  GK_UNROLL
  for (int k = 0; k < kMaxBranches; ++k) {
    if (k < p.nslots) load_group<F, VEC>(s[k], p.x[k], off, valid);
  }
}

// acc = D[base] + sum_t g_t (D[pos_t] - D[neg_t]), rounded per operation like the reference.
template <Fmt F>
GK_HD void combine_values(const CombineParams& p, const Pack<F> (&s)[kMaxBranches], const float (&g)[kMaxTerms],
                          float (&acc)[kGroup]) {
  const Pack<F> base = pick(s, p.base);
  GK_UNROLL
  for (int e = 0; e < kGroup; ++e) acc[e] = base.get(e);
  GK_UNROLL
  for (int t = 0; t < kMaxTerms; ++t) {
    if (t < p.nterms) {
      const Pack<F> pos = pick(s, p.pos[t]);
      const Pack<F> neg = pick(s, p.neg[t]);
      GK_UNROLL
      for (int e = 0; e < kGroup; ++e) acc[e] = add_rn(acc[e], mul_rn(g[t], sub_rn(pos.get(e), neg.get(e))));
    }
  }
}

// Pass 1 of a rescaled combine: fields (D[ref], acc).
template <Fmt F>
GK_HD Moments<2> combine_group_moments(const CombineParams& p, const Pack<F> (&s)[kMaxBranches],
                                       const float (&g)[kMaxTerms], int valid) {
  float f[2][kGroup];
  combine_values<F>(p, s, g, f[1]);
  const Pack<F> ref = pick(s, p.ref);
  GK_UNROLL
  for (int e = 0; e < kGroup; ++e) f[0][e] = ref.get(e);
  return group_moments<2>(f, valid);
}

template <Fmt F>
GK_HD void combine_store(const CombineParams& p, const Pack<F> (&s)[kMaxBranches], const float (&g)[kMaxTerms],
                         bool do_rescale, const Rescale& rs, int64_t b, int64_t start, int valid, bool vector) {
  float acc[kGroup];
  combine_values<F>(p, s, g, acc);
  Pack<F> out;
  out.clear();
  GK_UNROLL
  for (int e = 0; e < kGroup; ++e) out.set(e, do_rescale ? rescaled(acc[e], rs) : acc[e]);
  store_dense<F>(out, p.out, b * p.geo.inner + start, valid, vector);
}

GK_HD void combine_scales(const CombineParams& p, int64_t b, float (&g)[kMaxTerms]) {
  GK_UNROLL
  for (int t = 0; t < kMaxTerms; ++t) g[t] = t < p.nterms ? p.g[t].at(b) : 0.0f;
}

// --------------------------------------------------------------------------- apg / cfg-zero*

struct ProjectedParams {
  void* out;
  const void* cond;
  const void* uncond;
  void* buf;  // APG momentum buffer (output layout), updated in place by pass 1
  float momentum;
  Scale w;            // guidance scale
  float gain_number;  // APG gain (w - 1 or w) for a number w, rounded once from double
  float eta, threshold;
  int32_t formulation;  // ApgFormulation; CFG-Zero*: 1 = original formulation
  int32_t rescale;
  Scale phi;
  float one_minus_phi;
  float* stats;
  int64_t parts, chunk;
  int32_t out_vector;
  Geometry geo;
};

template <int KIND, Fmt FB>
struct Projected {
  static_assert(KIND == kApg || FB == Fmt::None, "only APG has a momentum buffer");
  static constexpr bool kHasBuf = FB != Fmt::None;
  static constexpr int kFields = (KIND == kApg && !kHasBuf) ? 2 : 3;
};

// The group's inputs: cond, uncond and (APG with momentum, pass 2) the running difference.
template <Fmt F, Fmt FB>
struct ProjectedGroup {
  Pack<F> c, u;
  Pack<FB == Fmt::None ? Fmt::F32 : FB> d;
};

template <int KIND, Fmt F, Fmt FB, bool VEC>
GK_HD void projected_load(const ProjectedParams& p, int64_t b, int64_t start, int valid,
                          ProjectedGroup<F, FB>& in) {
  int64_t off[kGroup];
  group_offsets<VEC>(p.geo, b, start, valid, off);
  load_group<F, VEC>(in.c, p.cond, off, valid);
  load_group<F, VEC>(in.u, p.uncond, off, valid);
  if constexpr (FB != Fmt::None) {
    load_dense<FB>(in.d, p.buf, b * p.geo.inner + start, valid, VEC);
  }
}

// Pass 1: the group's fields (and, with a momentum buffer, its in-place update).
template <int KIND, Fmt F, Fmt FB, bool VEC>
GK_HD Moments<Projected<KIND, FB>::kFields> projected_group_moments(const ProjectedParams& p, int64_t b,
                                                                    int64_t start, int valid,
                                                                    const ProjectedGroup<F, FB>& in) {
  constexpr int NF = Projected<KIND, FB>::kFields;
  float f[NF][kGroup];
  GK_UNROLL
  for (int e = 0; e < kGroup; ++e) {
    const float c = in.c.get(e);
    const float u = in.u.get(e);
    f[0][e] = c;
    f[1][e] = sub_rn(c, u);
    if constexpr (NF == 3 && KIND == kCfgZeroStar) f[NF - 1][e] = u;
  }
  if constexpr (FB != Fmt::None) {
    // running = diff + momentum * buffer, stored in the buffer's dtype; the statistics use the
    // stored (rounded) value, which is what pass 2 reads back.
    Pack<FB> running;
    running.clear();
    GK_UNROLL
    for (int e = 0; e < kGroup; ++e) {
      running.set(e, add_rn(f[1][e], mul_rn(p.momentum, in.d.get(e))));
      f[NF - 1][e] = running.get(e);
    }
    store_dense<FB>(running, p.buf, b * p.geo.inner + start, valid, VEC);
  }
  return group_moments<NF>(f, valid);
}

// Pass 2 per-sample coefficients, identical in every block of the sample.
struct ProjectedCoef {
  ApgCoef apg;
  Cfg0Coef cfg0;
  Rescale rescale;
};

template <int KIND, Fmt FB>
GK_HD ProjectedCoef projected_coefficients(const ProjectedParams& p, const Moments<Projected<KIND, FB>::kFields>& m,
                                           int64_t b) {
  const float w = p.w.at(b);
  ProjectedCoef k{};
  float m_out = 0.0f;
  if constexpr (KIND == kApg) {
    const float gain = p.w.ptr != nullptr ? (p.formulation == kPaper ? sub_rn(w, 1.0f) : w) : p.gain_number;
    k.apg = apg_coefficients(m, gain, p.eta, p.threshold, p.formulation, &m_out);
  } else {
    k.cfg0 = cfg0_coefficients(m, w, p.formulation == 1, &m_out);
  }
  if (p.rescale) k.rescale = rescale_for(p.phi, p.one_minus_phi, b, m.n, m.m[0], m_out);
  return k;
}

template <int KIND, Fmt F, Fmt FB>
GK_HD void projected_store(const ProjectedParams& p, const ProjectedCoef& k, const ProjectedGroup<F, FB>& in,
                           int64_t b, int64_t start, int valid, bool vector) {
  Pack<F> out;
  out.clear();
  GK_UNROLL
  for (int e = 0; e < kGroup; ++e) {
    const float c = in.c.get(e);
    const float u = in.u.get(e);
    float o;
    if constexpr (KIND == kApg) {
      o = apg_element(c, u, FB != Fmt::None ? in.d.get(e) : sub_rn(c, u), k.apg);
    } else {
      o = cfg0_element(c, u, k.cfg0);
    }
    out.set(e, p.rescale ? rescaled(o, k.rescale) : o);
  }
  store_dense<F>(out, p.out, b * p.geo.inner + start, valid, vector);
}

// --------------------------------------------------------------------------- work decomposition

// Block `block` (blockIdx.x) of a launch over batch * parts blocks handles chunk `part` of sample b:
// inner indices [lo, hi). Its thread t takes the groups starting at lo + 8 t, lo + 8 t + kTile, ...
struct BlockChunk {
  int64_t b, part, lo, hi;
};

GK_HD BlockChunk block_chunk(uint32_t block, int64_t parts, int64_t chunk, int64_t inner) {
  BlockChunk c;
  // The launcher keeps batch * parts below 2**31, so 32-bit division is exact here.
  c.b = static_cast<int64_t>(block / static_cast<uint32_t>(parts));
  c.part = static_cast<int64_t>(block) - c.b * parts;
  c.lo = c.part * chunk;
  c.hi = c.lo + chunk < inner ? c.lo + chunk : inner;
  return c;
}

GK_HD int64_t first_group(const BlockChunk& c, uint32_t thread) { return c.lo + static_cast<int64_t>(thread) * kGroup; }

// Elements of the group starting at `start` that belong to the chunk (8 except at a sample's end).
GK_HD int group_size(int64_t start, int64_t hi) {
  return hi - start < kGroup ? static_cast<int>(hi - start) : kGroup;
}

// --------------------------------------------------------------------------- block-level merging

// The order block_total merges in, for the CPU emulation in tests/host: lanes fold pairwise
// (lane l takes lane l + d for d = 16, 8, 4, 2, 1), then warp totals left to right.
template <int NF>
GK_HOST Moments<NF> block_total_on_host(const Moments<NF>* thread_moments) {
  Moments<NF> warp[kWarps];
  for (int w = 0; w < kWarps; ++w) {
    Moments<NF> lane[32];
    for (int l = 0; l < 32; ++l) lane[l] = thread_moments[32 * w + l];
    for (int d = 16; d > 0; d /= 2) {
      for (int l = 0; l < d; ++l) lane[l] = merge(lane[l], lane[l + d]);
    }
    warp[w] = lane[0];
  }
  Moments<NF> total = warp[0];
  for (int w = 1; w < kWarps; ++w) total = merge(total, warp[w]);
  return total;
}

// sample_moments' order on the CPU: thread t merges rows t, t + 256, ..., then block_total.
template <int NF>
GK_HOST Moments<NF> sample_moments_on_host(const float* stats, int64_t b, int64_t parts) {
  const float* rows = stats + b * parts * kRowFloats;
  Moments<NF> per_thread[kThreads];
  for (int t = 0; t < kThreads; ++t) {
    per_thread[t] = empty_moments<NF>();
    for (int64_t r = t; r < parts; r += kThreads) {
      per_thread[t] = merge(per_thread[t], load_row<NF>(rows + r * kRowFloats));
    }
  }
  return block_total_on_host<NF>(per_thread);
}

#if defined(__CUDACC__)

template <int NF>
GK_DEVICE Moments<NF> shfl_down(const Moments<NF>& m, int d) {
  Moments<NF> r;
  r.n = __shfl_down_sync(0xffffffffu, m.n, d);
  GK_UNROLL
  for (int i = 0; i < NF; ++i) r.mean[i] = __shfl_down_sync(0xffffffffu, m.mean[i], d);
  GK_UNROLL
  for (int k = 0; k < Moments<NF>::kPairs; ++k) r.m[k] = __shfl_down_sync(0xffffffffu, m.m[k], d);
  return r;
}

// The block's merged moments, identical in every thread (each merges the warp totals in the same
// order). Called at most once per kernel (its shared buffer is not re-synchronised).
template <int NF>
GK_DEVICE Moments<NF> block_total(Moments<NF> m) {
  __shared__ Moments<NF> warp_total[kWarps];
  GK_UNROLL
  for (int d = 16; d > 0; d /= 2) m = merge(m, shfl_down(m, d));
  if ((threadIdx.x & 31) == 0) warp_total[threadIdx.x >> 5] = m;
  __syncthreads();
  Moments<NF> total = warp_total[0];
  GK_UNROLL
  for (int w = 1; w < kWarps; ++w) total = merge(total, warp_total[w]);
  return total;
}

// Merge the `parts` rows of sample b (thread t takes rows t, t + 256, ...).
template <int NF>
GK_DEVICE Moments<NF> sample_moments(const float* stats, int64_t b, int64_t parts) {
  const float* rows = stats + b * parts * kRowFloats;
  Moments<NF> m = empty_moments<NF>();
  for (int64_t r = threadIdx.x; r < parts; r += kThreads) m = merge(m, load_row<NF>(rows + r * kRowFloats));
  return block_total(m);
}

// Plain combine (stats == nullptr) or pass 2 of a rescaled combine.
template <typename T, bool VEC>
__global__ void __launch_bounds__(kThreads) combine_kernel(const CombineParams p) {
  constexpr Fmt F = Format<T>::kFmt;
  const BlockChunk ch = block_chunk(blockIdx.x, p.parts, p.chunk, p.geo.inner);
  float g[kMaxTerms];
  combine_scales(p, ch.b, g);
  Pack<F> s[kMaxBranches];
  GK_UNROLL
  for (int k = 0; k < kMaxBranches; ++k) s[k].clear();  // unused slots stay defined
  const int64_t first = first_group(ch, threadIdx.x);
  // The first group's loads are issued before the (latency-bound) merge of the sample's rows.
  if (first < ch.hi) combine_load<F, VEC>(p, ch.b, first, group_size(first, ch.hi), s);
  const bool do_rescale = p.stats != nullptr;
  Rescale rs{1.0f, 0.0f, 1.0f};
  if (do_rescale) {
    const Moments<2> m = sample_moments<2>(p.stats, ch.b, p.parts);
    rs = rescale_for(p.phi, p.one_minus_phi, ch.b, m.n, m.m[0], m.m[1]);
  }
  for (int64_t start = first; start < ch.hi; start += kTile) {
    const int valid = group_size(start, ch.hi);
    if (start != first) combine_load<F, VEC>(p, ch.b, start, valid, s);
    combine_store<F>(p, s, g, do_rescale, rs, ch.b, start, valid, VEC || p.out_vector);
  }
}

// Pass 1 of a rescaled combine: one stats row per (sample, chunk).
template <typename T, bool VEC>
__global__ void __launch_bounds__(kThreads) combine_moments_kernel(const CombineParams p) {
  constexpr Fmt F = Format<T>::kFmt;
  const BlockChunk ch = block_chunk(blockIdx.x, p.parts, p.chunk, p.geo.inner);
  float g[kMaxTerms];
  combine_scales(p, ch.b, g);
  Pack<F> s[kMaxBranches];
  GK_UNROLL
  for (int k = 0; k < kMaxBranches; ++k) s[k].clear();
  Moments<2> m = empty_moments<2>();
  for (int64_t start = first_group(ch, threadIdx.x); start < ch.hi; start += kTile) {
    const int valid = group_size(start, ch.hi);
    combine_load<F, VEC>(p, ch.b, start, valid, s);
    m = merge(m, combine_group_moments<F>(p, s, g, valid));
  }
  const Moments<2> total = block_total(m);
  if (threadIdx.x == 0) store_row(p.stats + (ch.b * p.parts + ch.part) * kRowFloats, total);
}

template <int KIND, typename T, typename BufT, bool VEC>
__global__ void __launch_bounds__(kThreads) projected_moments_kernel(const ProjectedParams p) {
  constexpr Fmt F = Format<T>::kFmt;
  constexpr Fmt FB = Format<BufT>::kFmt;
  constexpr int NF = Projected<KIND, FB>::kFields;
  const BlockChunk ch = block_chunk(blockIdx.x, p.parts, p.chunk, p.geo.inner);
  Moments<NF> m = empty_moments<NF>();
  for (int64_t start = first_group(ch, threadIdx.x); start < ch.hi; start += kTile) {
    const int valid = group_size(start, ch.hi);
    ProjectedGroup<F, FB> in{};
    projected_load<KIND, F, FB, VEC>(p, ch.b, start, valid, in);
    m = merge(m, projected_group_moments<KIND, F, FB, VEC>(p, ch.b, start, valid, in));
  }
  const Moments<NF> total = block_total(m);
  if (threadIdx.x == 0) store_row(p.stats + (ch.b * p.parts + ch.part) * kRowFloats, total);
}

template <int KIND, typename T, typename BufT, bool VEC>
__global__ void __launch_bounds__(kThreads) projected_kernel(const ProjectedParams p) {
  constexpr Fmt F = Format<T>::kFmt;
  constexpr Fmt FB = Format<BufT>::kFmt;
  constexpr int NF = Projected<KIND, FB>::kFields;
  const BlockChunk ch = block_chunk(blockIdx.x, p.parts, p.chunk, p.geo.inner);
  const int64_t first = first_group(ch, threadIdx.x);
  ProjectedGroup<F, FB> in{};
  if (first < ch.hi) projected_load<KIND, F, FB, VEC>(p, ch.b, first, group_size(first, ch.hi), in);
  const ProjectedCoef k = projected_coefficients<KIND, FB>(p, sample_moments<NF>(p.stats, ch.b, p.parts), ch.b);
  for (int64_t start = first; start < ch.hi; start += kTile) {
    const int valid = group_size(start, ch.hi);
    if (start != first) projected_load<KIND, F, FB, VEC>(p, ch.b, start, valid, in);
    projected_store<KIND, F, FB>(p, k, in, ch.b, start, valid, VEC || p.out_vector);
  }
}

#endif  // __CUDACC__

}  // namespace combine
}  // namespace guidance_kernels
