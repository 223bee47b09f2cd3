// CUDA kernels of the combine family: guidance_combine, apg_combine, cfg_zero_star_combine,
// tcfg_combine, mag_combine. Raw pointers, sizes and strides only; no torch headers.
// csrc/guidance_combine.cu launches them.
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
//  * Rescale / APG / CFG-Zero* / TCFG / MAG: TWO launches, no atomics, no host sync. Pass 1
//    (*_moments_kernel) gives one row per (sample, chunk): count, means and centred co-moments of
//    two or three fp32 fields, merged with Chan's formula (groups of 8 -> thread -> warp -> block,
//    a fixed order, so the result is deterministic; a group's mean is taken relative to its first
//    element, so constant data has exactly zero co-moments and rescales to 0/0 = NaN like
//    torch.std), and the raw dot products sum f_i f_j (plain sums: inf and NaN propagate as in
//    torch's sums). Pass 2 (combine_kernel / projected_kernel) merges its sample's rows (every
//    block of a sample in the same order, hence the same per-sample coefficients), derives the
//    rescale ratio (centred moments), the APG projection, the CFG-Zero* alpha, TCFG's projection
//    or MAG's damped scale (raw sums), recomputes its elements from the inputs and writes them.
//    Fields per kind: combine (ref, acc); APG (cond, cond - uncond[, running diff]); CFG-Zero*,
//    TCFG, MAG (cond, cond - uncond, uncond). Every output whose std is needed is linear in the
//    fields with per-sample coefficients, so its variance is a quadratic form of the co-moments.
//    Minima and maxima go through min_nan / max_nan (NaN propagates like torch.minimum / clamp).
//    Every operation rounds explicitly, so the host emulation computes the device's bits — except
//    MAG's exp (one per sample), where the device's expf and the host's libm may differ by an ulp.
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

#include <type_traits>

namespace guidance_kernels {
namespace combine {

constexpr int kMaxBranches = 8;
constexpr int kMaxTerms = 8;
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kTile = kThreads * kGroup;  // elements per block step; chunks are multiples of it
// n, mean0..2, M00 M11 M22 M01 M02 M12 (centred), S00 S11 S22 S01 S02 S12 (raw): 64 B rows
constexpr int kRowFloats = 16;

enum Kind : int { kApg = 1, kCfgZeroStar = 2, kTcfg = 3, kMag = 4 };
// guidance_kernels/_spec.py APG_FORMULATION_CODES; kCfg / kCfgOriginal: AdaptiveProjectedMix's CFG phase.
enum ApgFormulation : int { kPaper = 0, kDiffusers = 1, kDiffusersOriginal = 2, kCfg = 3, kCfgOriginal = 4 };
constexpr float kNormalizeEps = 1e-12f;  // F.normalize
constexpr float kCfg0Eps = 1e-8f;        // CFG-Zero*'s ||u||^2 + 1e-8

// --------------------------------------------------------------------------- moments

// Pair (i, j), i <= j, of F fields: the diagonal first, then the upper triangle
// (F = 2: 00 11 01; F = 3: 00 11 22 01 02 12).
template <int F>
GK_HD constexpr int pair_index(int i, int j) {
  return i == j ? i : (F == 2 ? 2 : 2 + i + j);
}

// Statistics of NF fields: count, means and centred co-moments M_ij = sum (f_i - mean_i)(f_j -
// mean_j) of the first NC fields, and the raw sums S_ij = sum f_i f_j of the pairs in the bit
// mask RAW (bit pair_index<NF>(i, j)). Each kind keeps only what its coefficients read, which
// keeps the moments kernels within 128 registers.
template <int NF_, int NC_, unsigned RAW_>
struct Moments {
  static constexpr int NF = NF_;
  static constexpr int NC = NC_;
  static constexpr unsigned kRaw = RAW_;
  static constexpr int kPairs = NF * (NF + 1) / 2;
  static constexpr int kCentred = NC * (NC + 1) / 2;
  static GK_HD constexpr bool raw(int i, int j) { return ((kRaw >> pair_index<NF>(i, j)) & 1u) != 0; }
  float n;
  float mean[NC];
  float m[kCentred];
  float s[kPairs];  // entries outside RAW stay 0
};

// Position of M_ij (and S_ij, kRawOffset further on) in a stats row.
GK_HD constexpr int row_index(int i, int j) { return i == j ? 4 + i : 6 + i + j; }
constexpr int kRawOffset = 6;

template <class M>
GK_HD M empty_moments() {
  M r;
  r.n = 0.0f;
  GK_UNROLL
  for (int i = 0; i < M::NC; ++i) r.mean[i] = 0.0f;
  GK_UNROLL
  for (int k = 0; k < M::kCentred; ++k) r.m[k] = 0.0f;
  GK_UNROLL
  for (int k = 0; k < M::kPairs; ++k) r.s[k] = 0.0f;
  return r;
}

// Chan, Golub & LeVeque's pairwise update. An empty side (n = 0, means 0) leaves the other exact.
template <class M>
GK_HD M merge(const M& a, const M& b) {
  M r;
  r.n = add_rn(a.n, b.n);
  const float w = div_rn(b.n, r.n > 1.0f ? r.n : 1.0f);  // counts are whole numbers
  const float cross = mul_rn(a.n, w);                      // a.n * b.n / n
  float d[M::NC];
  GK_UNROLL
  for (int i = 0; i < M::NC; ++i) {
    d[i] = sub_rn(b.mean[i], a.mean[i]);
    r.mean[i] = fma_rn(d[i], w, a.mean[i]);
  }
  GK_UNROLL
  for (int i = 0; i < M::NC; ++i) {
    GK_UNROLL
    for (int j = i; j < M::NC; ++j) {
      const int k = pair_index<M::NC>(i, j);
      r.m[k] = add_rn(add_rn(a.m[k], b.m[k]), mul_rn(mul_rn(d[i], d[j]), cross));
    }
  }
  GK_UNROLL
  for (int i = 0; i < M::NF; ++i) {
    GK_UNROLL
    for (int j = i; j < M::NF; ++j) {
      const int k = pair_index<M::NF>(i, j);
      r.s[k] = M::raw(i, j) ? add_rn(a.s[k], b.s[k]) : 0.0f;
    }
  }
  return r;
}

// Exact-order moments of one group: elements e < valid of f[i][e] (overwritten: the deviations
// are formed in place, so one group's values occupy registers once). The mean is taken relative
// to the group's first element (pivot + mean of the differences): a constant group gets its value
// as mean exactly and zero deviations, and merging equal means keeps them exact.
template <class M>
GK_HD M group_moments(float (&f)[M::NF][kGroup], int valid) {
  M r = empty_moments<M>();
  if (valid <= 0) return r;
  r.n = static_cast<float>(valid);
  GK_UNROLL
  for (int i = 0; i < M::NF; ++i) {
    GK_UNROLL
    for (int j = i; j < M::NF; ++j) {
      if (!M::raw(i, j)) continue;
      float raw = 0.0f;
      GK_UNROLL
      for (int e = 0; e < kGroup; ++e) {
        if (e < valid) raw = fma_rn(f[i][e], f[j][e], raw);
      }
      r.s[pair_index<M::NF>(i, j)] = raw;
    }
  }
  GK_UNROLL
  for (int i = 0; i < M::NC; ++i) {
    const float pivot = f[i][0];
    float sum = 0.0f;
    GK_UNROLL
    for (int e = 0; e < kGroup; ++e) sum = add_rn(sum, e < valid ? sub_rn(f[i][e], pivot) : 0.0f);
    // Division by 8 is exact as a multiplication: skip the division sequence for full groups.
    r.mean[i] = add_rn(pivot, valid == kGroup ? mul_rn(sum, 1.0f / kGroup) : div_rn(sum, r.n));
    GK_UNROLL
    for (int e = 0; e < kGroup; ++e) f[i][e] = e < valid ? sub_rn(f[i][e], r.mean[i]) : 0.0f;
  }
  GK_UNROLL
  for (int i = 0; i < M::NC; ++i) {
    GK_UNROLL
    for (int j = i; j < M::NC; ++j) {
      float acc = 0.0f;
      GK_UNROLL
      for (int e = 0; e < kGroup; ++e) acc = fma_rn(f[i][e], f[j][e], acc);
      r.m[pair_index<M::NC>(i, j)] = acc;
    }
  }
  return r;
}

template <class M>
GK_HD void store_row(float* row, const M& m) {
  float v[kRowFloats];
  GK_UNROLL
  for (int k = 0; k < kRowFloats; ++k) v[k] = 0.0f;
  v[0] = m.n;
  GK_UNROLL
  for (int i = 0; i < M::NC; ++i) {
    v[1 + i] = m.mean[i];
    GK_UNROLL
    for (int j = i; j < M::NC; ++j) v[row_index(i, j)] = m.m[pair_index<M::NC>(i, j)];
  }
  GK_UNROLL
  for (int i = 0; i < M::NF; ++i) {
    GK_UNROLL
    for (int j = i; j < M::NF; ++j) v[row_index(i, j) + kRawOffset] = m.s[pair_index<M::NF>(i, j)];
  }
#if defined(__CUDA_ARCH__)
  float4* out = reinterpret_cast<float4*>(row);  // rows are 64 B apart in a 16 B aligned buffer
  GK_UNROLL
  for (int q = 0; q < kRowFloats / 4; ++q) out[q] = make_float4(v[4 * q], v[4 * q + 1], v[4 * q + 2], v[4 * q + 3]);
#else
  for (int k = 0; k < kRowFloats; ++k) row[k] = v[k];
#endif
}

template <class M>
GK_HD M load_row(const float* row) {
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
  M m;
  m.n = v[0];
  GK_UNROLL
  for (int i = 0; i < M::NC; ++i) {
    m.mean[i] = v[1 + i];
    GK_UNROLL
    for (int j = i; j < M::NC; ++j) m.m[pair_index<M::NC>(i, j)] = v[row_index(i, j)];
  }
  GK_UNROLL
  for (int i = 0; i < M::NF; ++i) {
    GK_UNROLL
    for (int j = i; j < M::NF; ++j) m.s[pair_index<M::NF>(i, j)] = v[row_index(i, j) + kRawOffset];
  }
  return m;
}

// sum f_i f_j: a raw sum (an inf or a NaN in the data propagates as in a plain sum).
template <class M>
GK_HD float raw_dot(const M& m, int i, int j) {
  return m.s[pair_index<M::NF>(i, j)];
}

// a^T M a for the symmetric co-moment matrix of the centred fields, clamped at 0 (rounding can go
// below; NaN stays).
template <class M>
GK_HD float quadratic(const M& m, const float (&a)[M::NC]) {
  float diag = 0.0f;
  float off = 0.0f;
  GK_UNROLL
  for (int i = 0; i < M::NC; ++i) {
    diag = fma_rn(mul_rn(a[i], a[i]), m.m[pair_index<M::NC>(i, i)], diag);
    GK_UNROLL
    for (int j = i + 1; j < M::NC; ++j) off = fma_rn(mul_rn(a[i], a[j]), m.m[pair_index<M::NC>(i, j)], off);
  }
  const float q = fma_rn(2.0f, off, diag);
  return q > 0.0f ? q : (is_nan(q) ? q : 0.0f);
}

// The statistics each kernel keeps. Combine: (ref, acc), centred only. APG: (cond, cond - uncond)
// with raw 00 11 01, or with a momentum buffer (cond, cond - uncond, running) all centred and raw
// 00 22 02. CFG-Zero*, TCFG, MAG: (cond, cond - uncond, uncond), the first two centred, raw
// 00 11 22 01 02.
using CombineMoments = Moments<2, 2, 0u>;
using ApgMoments = Moments<2, 2, 0b111u>;
using ApgBufferMoments = Moments<3, 3, 0b010101u>;
using PairMoments = Moments<3, 2, 0b011111u>;

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
// The CFG formulations (AdaptiveProjectedMix's CFG phase) give out = X + gain * (c - u).
struct ApgCoef {
  float f, par, eta, gain;
  bool from_uncond, cfg;
};

GK_HD float apg_element(float c, float u, float d, const ApgCoef& k) {
  if (k.cfg) return add_rn(k.from_uncond ? u : c, mul_rn(k.gain, sub_rn(c, u)));
  const float diff = mul_rn(k.f, d);
  const float par = mul_rn(k.par, c);
  const float update = add_rn(sub_rn(diff, par), mul_rn(k.eta, par));
  return add_rn(k.from_uncond ? u : c, mul_rn(k.gain, update));
}

// Fields: 0 = cond, 1 = cond - uncond, 2 = running difference (momentum buffer) when present.
template <class M>
GK_HD ApgCoef apg_coefficients(const M& m, float gain, float eta, float threshold, int formulation, float* m_out) {
  constexpr int NF = M::NF;
  float a[NF];
  GK_UNROLL
  for (int i = 0; i < NF; ++i) a[i] = 0.0f;
  a[0] = 1.0f;
  if (formulation >= kCfg) {
    const bool from_uncond = formulation == kCfg;
    // out = cond + (gain - 1 or gain) (cond - uncond)
    a[1] = from_uncond ? sub_rn(gain, 1.0f) : gain;
    *m_out = quadratic(m, a);
    return ApgCoef{1.0f, 0.0f, eta, gain, from_uncond, true};
  }
  constexpr int kD = NF == 3 ? 2 : 1;
  const float r_cc = raw_dot(m, 0, 0);
  const float r_dd = raw_dot(m, kD, kD);
  const float r_dc = raw_dot(m, 0, kD);
  const float f = threshold > 0.0f ? min_nan(1.0f, div_rn(threshold, sqrt_rn(r_dd))) : 1.0f;
  const float c_norm = max_nan(sqrt_rn(r_cc), kNormalizeEps);
  ApgCoef k{f, div_rn(div_rn(mul_rn(f, r_dc), c_norm), c_norm), eta, gain, formulation == kDiffusers, false};
  // out = a_c cond + a_r (cond - uncond) + a_d running
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

// In the (cond, cond - uncond) basis: a_cond cond + a_unc uncond = (a_cond + a_unc) cond - a_unc (cond - uncond).
GK_HD float variance_cu(const PairMoments& m, float a_cond, float a_unc) {
  const float a[2] = {add_rn(a_cond, a_unc), -a_unc};
  return quadratic(m, a);
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

GK_HD Cfg0Coef cfg0_coefficients(const PairMoments& m, float w, bool original, float* m_out) {
  const Cfg0Coef k{div_rn(raw_dot(m, 0, 2), add_rn(raw_dot(m, 2, 2), kCfg0Eps)), w, original};
  const float a_cond = original ? add_rn(1.0f, w) : w;
  const float a_unc = original ? -mul_rn(w, k.alpha) : mul_rn(k.alpha, sub_rn(1.0f, w));
  *m_out = variance_cu(m, a_cond, a_unc);
  return k;
}

// TCFG (guidance_kernels.tcfg_combine): u' = pq c + q u with (pq, q) = (e_c e_u, e_u^2) of the
// Gram matrix's principal unit eigenvector, from <c,u>, <c,c-u>, ||c-u||^2; out = X + w (c - u'),
// X = u' (default) or c (original). r = 0 (two equal eigenvalues) takes cond's direction: pq = q = 0.
// poison = ||c||^2 + ||u||^2 turns the coefficients into NaN for a sample holding inf or NaN.
struct TcfgCoef {
  float pq, q, w;
  bool original;
};

GK_HD void tcfg_projection(float s_cu, float s_cd, float s_dd, float poison, float* pq, float* q) {
  const float delta = sub_rn(mul_rn(2.0f, s_cd), s_dd);
  const float two_b = mul_rn(2.0f, s_cu);
  const float big = max_nan(delta < 0.0f ? -delta : delta, two_b < 0.0f ? -two_b : two_b);
  const float unit = big > 0.0f ? big : 1.0f;
  const float x = div_rn(delta, unit);
  const float y = div_rn(two_b, unit);
  const float r = add_rn(mul_rn(big, sqrt_rn(add_rn(mul_rn(x, x), mul_rn(y, y)))), sub_rn(poison, poison));
  if (r == 0.0f) {
    *pq = 0.0f;
    *q = 0.0f;
    return;
  }
  *pq = div_rn(s_cu, r);
  *q = delta >= 0.0f ? mul_rn(mul_rn(2.0f, *pq), div_rn(s_cu, add_rn(r, delta)))
                     : div_rn(sub_rn(r, delta), mul_rn(2.0f, r));
}

GK_HD float tcfg_element(float c, float u, const TcfgCoef& k) {
  const float u_t = add_rn(mul_rn(k.pq, c), mul_rn(k.q, u));
  return add_rn(k.original ? c : u_t, mul_rn(k.w, sub_rn(c, u_t)));
}

GK_HD TcfgCoef tcfg_coefficients(const PairMoments& m, float w, bool original, float* m_out) {
  TcfgCoef k{0.0f, 0.0f, w, original};
  tcfg_projection(raw_dot(m, 0, 2), raw_dot(m, 0, 1), raw_dot(m, 1, 1), add_rn(raw_dot(m, 0, 0), raw_dot(m, 2, 2)),
                  &k.pq, &k.q);
  const float one_minus_w = sub_rn(1.0f, w);
  const float a_cond = original ? sub_rn(add_rn(1.0f, w), mul_rn(w, k.pq)) : add_rn(mul_rn(one_minus_w, k.pq), w);
  const float a_unc = original ? -mul_rn(w, k.q) : mul_rn(one_minus_w, k.q);
  *m_out = variance_cu(m, a_cond, a_unc);
  return k;
}

// MAG (guidance_kernels.mag_combine): ratio = ||c - u|| / ||u||, damp = exp(-alpha ratio);
// gain = 1 + (w - 1) damp (default) or w damp (original); out = X + gain (c - u), X = u or c.
struct MagCoef {
  float gain;
  bool original;
};

GK_HD float exp_f(float x) {
#if defined(__CUDA_ARCH__)
  return expf(x);
#else
  return std::exp(x);
#endif
}

GK_HD float mag_element(float c, float u, const MagCoef& k) {
  return add_rn(k.original ? c : u, mul_rn(k.gain, sub_rn(c, u)));
}

GK_HD MagCoef mag_coefficients(const PairMoments& m, float w, float alpha, bool original, float* m_out) {
  const float ratio = div_rn(sqrt_rn(raw_dot(m, 1, 1)), sqrt_rn(raw_dot(m, 2, 2)));
  const float damp = exp_f(mul_rn(-alpha, ratio));
  const MagCoef k{original ? mul_rn(w, damp) : add_rn(1.0f, mul_rn(sub_rn(w, 1.0f), damp)), original};
  const float a[2] = {1.0f, original ? k.gain : sub_rn(k.gain, 1.0f)};  // cond + (.) (cond - uncond)
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
GK_HD CombineMoments combine_group_moments(const CombineParams& p, const Pack<F> (&s)[kMaxBranches],
                                       const float (&g)[kMaxTerms], int valid) {
  float f[2][kGroup];
  combine_values<F>(p, s, g, f[1]);
  const Pack<F> ref = pick(s, p.ref);
  GK_UNROLL
  for (int e = 0; e < kGroup; ++e) f[0][e] = ref.get(e);
  return group_moments<CombineMoments>(f, valid);
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
  float alpha;          // MAG
  int32_t formulation;  // ApgFormulation; CFG-Zero*, TCFG, MAG: 1 = original formulation
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
  using Stats = typename std::conditional<KIND == kApg, typename std::conditional<kHasBuf, ApgBufferMoments,
                                                                               ApgMoments>::type,
                                          PairMoments>::type;
  static constexpr int kFields = Stats::NF;
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
GK_HD typename Projected<KIND, FB>::Stats projected_group_moments(const ProjectedParams& p, int64_t b,
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
    if constexpr (NF == 3 && KIND != kApg) f[NF - 1][e] = u;
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
  return group_moments<typename Projected<KIND, FB>::Stats>(f, valid);
}

// Pass 2 per-sample coefficients, identical in every block of the sample.
struct ProjectedCoef {
  ApgCoef apg;
  Cfg0Coef cfg0;
  TcfgCoef tcfg;
  MagCoef mag;
  Rescale rescale;
};

template <int KIND, Fmt FB>
GK_HD ProjectedCoef projected_coefficients(const ProjectedParams& p, const typename Projected<KIND, FB>::Stats& m,
                                           int64_t b) {
  const float w = p.w.at(b);
  ProjectedCoef k{};
  float m_out = 0.0f;
  const bool original = p.formulation == 1;
  if constexpr (KIND == kApg) {
    const float gain = p.w.ptr != nullptr ? (p.formulation == kPaper ? sub_rn(w, 1.0f) : w) : p.gain_number;
    k.apg = apg_coefficients(m, gain, p.eta, p.threshold, p.formulation, &m_out);
  } else if constexpr (KIND == kCfgZeroStar) {
    k.cfg0 = cfg0_coefficients(m, w, original, &m_out);
  } else if constexpr (KIND == kTcfg) {
    k.tcfg = tcfg_coefficients(m, w, original, &m_out);
  } else {
    k.mag = mag_coefficients(m, w, p.alpha, original, &m_out);
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
    } else if constexpr (KIND == kCfgZeroStar) {
      o = cfg0_element(c, u, k.cfg0);
    } else if constexpr (KIND == kTcfg) {
      o = tcfg_element(c, u, k.tcfg);
    } else {
      o = mag_element(c, u, k.mag);
    }
    out.set(e, p.rescale ? rescaled(o, k.rescale) : o);
  }
  store_dense<F>(out, p.out, b * p.geo.inner + start, valid, vector);
}

// --------------------------------------------------------------------------- channel-wise: CFG-Norm, Mahiro

// (B, C, *spatial) addressed as in guidance_kernels/_layout.py channel_geometry: element (b, c, p),
// p = i1 * P2 + i2, is read at b bs + c cs + i1 s1 + i2 s2 and written at b inner + c ocs + i1 o1 +
// i2 o2. One thread per spatial position walks the channels (sequentially: a fixed order).
enum ChannelKind : int { kCfgNorm = 1, kMahiro = 2 };
constexpr float kCfgNormEps = 1e-8f;  // ComfyUI CFGNorm: ||out|| + 1e-8
constexpr float kCosineEps = 1e-8f;   // F.cosine_similarity

struct ChannelParams {
  void* out;
  const void* x[kMaxBranches];  // the distinct branches used ("slots")
  int32_t nslots, base, nterms, ref;  // ref: CFG-Norm's reference slot
  int32_t pos[kMaxTerms], neg[kMaxTerms];  // slot indices; Mahiro's cond / uncond are pos[0] / neg[0]
  Scale g[kMaxTerms];
  Scale strength;  // CFG-Norm
  int64_t batch, channels, positions, p2, inner;
  int64_t bs, cs, s1, s2, ocs, o1, o2;
  Divider by_p2;
  float* stats;         // Mahiro: (B, parts) sums of the per-position cosine similarity
  int64_t parts, chunk;  // Mahiro pass 1: positions [part * chunk, ...) per block (chunk % kThreads == 0)
};

template <Fmt F>
GK_HD float load_scalar(const void* x, int64_t off) {
  using S = typename FmtBits<F>::Storage;
  return bits_to_float<F>(static_cast<const S*>(x)[off]);
}

template <Fmt F>
GK_HD void store_scalar(void* x, int64_t off, float v) {
  using S = typename FmtBits<F>::Storage;
  static_cast<S*>(x)[off] = static_cast<S>(float_to_bits<F>(v));
}

// The value in slot i: a switch on a warp-uniform index keeps the slots in registers.
GK_HD float pick_value(const float (&v)[kMaxBranches], int i) {
  switch (i) {
    case 1: return v[1];
    case 2: return v[2];
    case 3: return v[3];
    case 4: return v[4];
    case 5: return v[5];
    case 6: return v[6];
    case 7: return v[7];
    default: return v[0];
  }
}

// Input and output offsets of position p of sample b (channel 0).
struct Position {
  int64_t in, out;
};

GK_HD Position position_at(const ChannelParams& p, int64_t b, int64_t pos) {
  const int64_t i1 = divide(p.by_p2, pos);
  const int64_t i2 = pos - i1 * p.p2;
  return Position{b * p.bs + i1 * p.s1 + i2 * p.s2, b * p.inner + i1 * p.o1 + i2 * p.o2};
}

// The slots at one element, and the combine D[base] + sum_t g_t (D[pos_t] - D[neg_t]) there
// (rounded per operation like the reference).
template <Fmt F>
GK_HD float channel_value(const ChannelParams& p, const float (&g)[kMaxTerms], int64_t off, float (&v)[kMaxBranches]) {
  GK_UNROLL
  for (int k = 0; k < kMaxBranches; ++k) v[k] = k < p.nslots ? load_scalar<F>(p.x[k], off) : 0.0f;
  float acc = pick_value(v, p.base);
  GK_UNROLL
  for (int t = 0; t < kMaxTerms; ++t) {
    if (t < p.nterms) acc = add_rn(acc, mul_rn(g[t], sub_rn(pick_value(v, p.pos[t]), pick_value(v, p.neg[t]))));
  }
  return acc;
}

GK_HD void channel_scales(const ChannelParams& p, int64_t b, float (&g)[kMaxTerms]) {
  GK_UNROLL
  for (int t = 0; t < kMaxTerms; ++t) g[t] = t < p.nterms ? p.g[t].at(b) : 0.0f;
}

// CFG-Norm at one position: out = (acc * clamp(||ref|| / (||acc|| + 1e-8), 0, 1)) * strength.
template <Fmt F>
GK_HD void cfg_norm_position(const ChannelParams& p, int64_t b, int64_t pos) {
  float g[kMaxTerms];
  channel_scales(p, b, g);
  const Position at = position_at(p, b, pos);
  float v[kMaxBranches];
  float n_out = 0.0f;
  float n_ref = 0.0f;
  for (int64_t c = 0; c < p.channels; ++c) {
    const float acc = channel_value<F>(p, g, at.in + c * p.cs, v);
    const float ref = pick_value(v, p.ref);
    n_out = fma_rn(acc, acc, n_out);
    n_ref = fma_rn(ref, ref, n_ref);
  }
  const float scale = min_nan(div_rn(sqrt_rn(n_ref), add_rn(sqrt_rn(n_out), kCfgNormEps)), 1.0f);
  const float strength = p.strength.at(b);
  for (int64_t c = 0; c < p.channels; ++c) {
    const float acc = channel_value<F>(p, g, at.in + c * p.cs, v);
    store_scalar<F>(p.out, at.out + c * p.ocs, mul_rn(mul_rn(acc, scale), strength));
  }
}

GK_HD float signed_sqrt(float x) {
  const float root = sqrt_rn(x < 0.0f ? -x : x);
  return x < 0.0f ? -root : (x > 0.0f ? root : mul_rn(root, 0.0f));
}

// Mahiro pass 1 at one position: the channel cosine similarity of sqrt|s u| sign(s u) and
// sqrt|merge| sign(merge), merge = (s c + acc) / 2, each norm clamped at 1e-8 (F.cosine_similarity).
template <Fmt F>
GK_HD float mahiro_cosine(const ChannelParams& p, const float (&g)[kMaxTerms], int64_t b, int64_t pos) {
  const Position at = position_at(p, b, pos);
  float v[kMaxBranches];
  float dot = 0.0f, n_u = 0.0f, n_m = 0.0f;
  for (int64_t c = 0; c < p.channels; ++c) {
    const float acc = channel_value<F>(p, g, at.in + c * p.cs, v);
    const float leap = mul_rn(pick_value(v, p.pos[0]), g[0]);
    const float norm_u = signed_sqrt(mul_rn(pick_value(v, p.neg[0]), g[0]));
    const float norm_m = signed_sqrt(div_rn(add_rn(leap, acc), 2.0f));
    dot = fma_rn(norm_u, norm_m, dot);
    n_u = fma_rn(norm_u, norm_u, n_u);
    n_m = fma_rn(norm_m, norm_m, n_m);
  }
  return div_rn(dot, mul_rn(max_nan(sqrt_rn(n_u), kCosineEps), max_nan(sqrt_rn(n_m), kCosineEps)));
}

// Mahiro pass 2 at one position: k = 2 (sim + 1), out = (k acc + (4 - k) s c) / 4.
template <Fmt F>
GK_HD void mahiro_position(const ChannelParams& p, const float (&g)[kMaxTerms], int64_t b, int64_t pos, float sim) {
  const Position at = position_at(p, b, pos);
  const float k = mul_rn(2.0f, add_rn(sim, 1.0f));
  const float rest = sub_rn(4.0f, k);
  float v[kMaxBranches];
  for (int64_t c = 0; c < p.channels; ++c) {
    const float acc = channel_value<F>(p, g, at.in + c * p.cs, v);
    const float leap = mul_rn(pick_value(v, p.pos[0]), g[0]);
    store_scalar<F>(p.out, at.out + c * p.ocs, div_rn(add_rn(mul_rn(k, acc), mul_rn(rest, leap)), 4.0f));
  }
}

// The per-sample similarity: sum of the sample's rows (thread t takes rows t, t + 256, ...; then
// the block sum), divided by the number of positions.
GK_HOST float block_sum_on_host(const float* per_thread) {
  float warp[kWarps];
  for (int w = 0; w < kWarps; ++w) {
    float lane[32];
    for (int l = 0; l < 32; ++l) lane[l] = per_thread[32 * w + l];
    for (int d = 16; d > 0; d /= 2) {
      for (int l = 0; l < d; ++l) lane[l] = add_rn(lane[l], lane[l + d]);
    }
    warp[w] = lane[0];
  }
  float total = warp[0];
  for (int w = 1; w < kWarps; ++w) total = add_rn(total, warp[w]);
  return total;
}

GK_HOST float mahiro_similarity_on_host(const ChannelParams& p, int64_t b) {
  float per_thread[kThreads];
  for (int t = 0; t < kThreads; ++t) {
    per_thread[t] = 0.0f;
    for (int64_t r = t; r < p.parts; r += kThreads) per_thread[t] = add_rn(per_thread[t], p.stats[b * p.parts + r]);
  }
  return div_rn(block_sum_on_host(per_thread), static_cast<float>(p.positions));
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
template <class M>
GK_HOST M block_total_on_host(const M* thread_moments) {
  M warp[kWarps];
  for (int w = 0; w < kWarps; ++w) {
    M lane[32];
    for (int l = 0; l < 32; ++l) lane[l] = thread_moments[32 * w + l];
    for (int d = 16; d > 0; d /= 2) {
      for (int l = 0; l < d; ++l) lane[l] = merge(lane[l], lane[l + d]);
    }
    warp[w] = lane[0];
  }
  M total = warp[0];
  for (int w = 1; w < kWarps; ++w) total = merge(total, warp[w]);
  return total;
}

// sample_moments' order on the CPU: thread t merges rows t, t + 256, ..., then block_total.
template <class M>
GK_HOST M sample_moments_on_host(const float* stats, int64_t b, int64_t parts) {
  const float* rows = stats + b * parts * kRowFloats;
  M per_thread[kThreads];
  for (int t = 0; t < kThreads; ++t) {
    per_thread[t] = empty_moments<M>();
    for (int64_t r = t; r < parts; r += kThreads) {
      per_thread[t] = merge(per_thread[t], load_row<M>(rows + r * kRowFloats));
    }
  }
  return block_total_on_host<M>(per_thread);
}

#if defined(__CUDACC__)

template <class M>
GK_DEVICE M shfl_down(const M& m, int d) {
  M r;
  r.n = __shfl_down_sync(0xffffffffu, m.n, d);
  GK_UNROLL
  for (int i = 0; i < M::NC; ++i) r.mean[i] = __shfl_down_sync(0xffffffffu, m.mean[i], d);
  GK_UNROLL
  for (int k = 0; k < M::kCentred; ++k) r.m[k] = __shfl_down_sync(0xffffffffu, m.m[k], d);
  GK_UNROLL
  for (int i = 0; i < M::NF; ++i) {
    GK_UNROLL
    for (int j = i; j < M::NF; ++j) {
      const int k = pair_index<M::NF>(i, j);
      r.s[k] = M::raw(i, j) ? __shfl_down_sync(0xffffffffu, m.s[k], d) : 0.0f;
    }
  }
  return r;
}

// The block's merged moments, identical in every thread (each merges the warp totals in the same
// order). Called at most once per kernel (its shared buffer is not re-synchronised).
template <class M>
GK_DEVICE M block_total(M m) {
  __shared__ M warp_total[kWarps];
  GK_UNROLL
  for (int d = 16; d > 0; d /= 2) m = merge(m, shfl_down(m, d));
  if ((threadIdx.x & 31) == 0) warp_total[threadIdx.x >> 5] = m;
  __syncthreads();
  M total = warp_total[0];
  GK_UNROLL
  for (int w = 1; w < kWarps; ++w) total = merge(total, warp_total[w]);
  return total;
}

// Merge the `parts` rows of sample b (thread t takes rows t, t + 256, ...).
template <class M>
GK_DEVICE M sample_moments(const float* stats, int64_t b, int64_t parts) {
  const float* rows = stats + b * parts * kRowFloats;
  M m = empty_moments<M>();
  for (int64_t r = threadIdx.x; r < parts; r += kThreads) m = merge(m, load_row<M>(rows + r * kRowFloats));
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
    const CombineMoments m = sample_moments<CombineMoments>(p.stats, ch.b, p.parts);
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
  CombineMoments m = empty_moments<CombineMoments>();
  for (int64_t start = first_group(ch, threadIdx.x); start < ch.hi; start += kTile) {
    const int valid = group_size(start, ch.hi);
    combine_load<F, VEC>(p, ch.b, start, valid, s);
    m = merge(m, combine_group_moments<F>(p, s, g, valid));
  }
  const CombineMoments total = block_total(m);
  if (threadIdx.x == 0) store_row(p.stats + (ch.b * p.parts + ch.part) * kRowFloats, total);
}

template <int KIND, typename T, typename BufT, bool VEC>
__global__ void __launch_bounds__(kThreads) projected_moments_kernel(const ProjectedParams p) {
  constexpr Fmt F = Format<T>::kFmt;
  constexpr Fmt FB = Format<BufT>::kFmt;
  using Stats = typename Projected<KIND, FB>::Stats;
  const BlockChunk ch = block_chunk(blockIdx.x, p.parts, p.chunk, p.geo.inner);
  Stats m = empty_moments<Stats>();
  for (int64_t start = first_group(ch, threadIdx.x); start < ch.hi; start += kTile) {
    const int valid = group_size(start, ch.hi);
    ProjectedGroup<F, FB> in{};
    projected_load<KIND, F, FB, VEC>(p, ch.b, start, valid, in);
    m = merge(m, projected_group_moments<KIND, F, FB, VEC>(p, ch.b, start, valid, in));
  }
  const Stats total = block_total(m);
  if (threadIdx.x == 0) store_row(p.stats + (ch.b * p.parts + ch.part) * kRowFloats, total);
}

template <int KIND, typename T, typename BufT, bool VEC>
__global__ void __launch_bounds__(kThreads) projected_kernel(const ProjectedParams p) {
  constexpr Fmt F = Format<T>::kFmt;
  constexpr Fmt FB = Format<BufT>::kFmt;
  using Stats = typename Projected<KIND, FB>::Stats;
  const BlockChunk ch = block_chunk(blockIdx.x, p.parts, p.chunk, p.geo.inner);
  const int64_t first = first_group(ch, threadIdx.x);
  ProjectedGroup<F, FB> in{};
  if (first < ch.hi) projected_load<KIND, F, FB, VEC>(p, ch.b, first, group_size(first, ch.hi), in);
  const ProjectedCoef k = projected_coefficients<KIND, FB>(p, sample_moments<Stats>(p.stats, ch.b, p.parts), ch.b);
  for (int64_t start = first; start < ch.hi; start += kTile) {
    const int valid = group_size(start, ch.hi);
    if (start != first) projected_load<KIND, F, FB, VEC>(p, ch.b, start, valid, in);
    projected_store<KIND, F, FB>(p, k, in, ch.b, start, valid, VEC || p.out_vector);
  }
}

// Sum of v over the block, identical in every thread (warp tree, then warps left to right).
// Called at most once per kernel (its shared buffer is not re-synchronised).
GK_DEVICE float block_sum(float v) {
  __shared__ float warp_total[kWarps];
  GK_UNROLL
  for (int d = 16; d > 0; d /= 2) v = add_rn(v, __shfl_down_sync(0xffffffffu, v, d));
  if ((threadIdx.x & 31) == 0) warp_total[threadIdx.x >> 5] = v;
  __syncthreads();
  float total = warp_total[0];
  GK_UNROLL
  for (int w = 1; w < kWarps; ++w) total = add_rn(total, warp_total[w]);
  return total;
}

// CFG-Norm: one launch, block b * blocks_per_sample + j takes positions [256 j, 256 j + 256).
template <typename T>
__global__ void __launch_bounds__(kThreads) cfg_norm_kernel(const ChannelParams p) {
  const int64_t per_sample = (p.positions + kThreads - 1) / kThreads;
  const int64_t b = blockIdx.x / per_sample;
  const int64_t pos = (blockIdx.x - b * per_sample) * kThreads + threadIdx.x;
  if (pos < p.positions) cfg_norm_position<Format<T>::kFmt>(p, b, pos);
}

// Mahiro pass 1: block (b, part) sums the cosine similarity over positions [part * chunk, ...).
template <typename T>
__global__ void __launch_bounds__(kThreads) mahiro_moments_kernel(const ChannelParams p) {
  const int64_t b = blockIdx.x / p.parts;
  const int64_t part = blockIdx.x - b * p.parts;
  const int64_t lo = part * p.chunk;
  const int64_t hi = lo + p.chunk < p.positions ? lo + p.chunk : p.positions;
  float g[kMaxTerms];
  channel_scales(p, b, g);
  float sum = 0.0f;
  for (int64_t pos = lo + threadIdx.x; pos < hi; pos += kThreads) sum = add_rn(sum, mahiro_cosine<Format<T>::kFmt>(p, g, b, pos));
  const float total = block_sum(sum);
  if (threadIdx.x == 0) p.stats[blockIdx.x] = total;
}

// Mahiro pass 2: like cfg_norm_kernel's grid; every block merges its sample's rows first.
template <typename T>
__global__ void __launch_bounds__(kThreads) mahiro_kernel(const ChannelParams p) {
  const int64_t per_sample = (p.positions + kThreads - 1) / kThreads;
  const int64_t b = blockIdx.x / per_sample;
  const int64_t pos = (blockIdx.x - b * per_sample) * kThreads + threadIdx.x;
  float rows = 0.0f;
  for (int64_t r = threadIdx.x; r < p.parts; r += kThreads) rows = add_rn(rows, p.stats[b * p.parts + r]);
  const float sim = div_rn(block_sum(rows), static_cast<float>(p.positions));
  float g[kMaxTerms];
  channel_scales(p, b, g);
  if (pos < p.positions) mahiro_position<Format<T>::kFmt>(p, g, b, pos, sim);
}

#endif  // __CUDACC__

}  // namespace combine
}  // namespace guidance_kernels
