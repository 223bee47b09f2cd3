// Building blocks shared by the guidance_kernels CUDA headers. No torch headers.
//
// Everything here that kernels use per element is `__host__ __device__` and compiles with a plain
// C++17 host compiler too (g++ without the CUDA toolkit): tests/host/ runs the same functions on
// the CPU, so index arithmetic, rounding and conversions are tested on machines without a GPU.
//
//  * fp32 arithmetic with explicit rounding (add_rn, mul_rn, fma_rn, ...): nvcc contracts a*b + c
//    into an FMA by default; the combine must round like the eager PyTorch reference (one rounding
//    per operation, in the reference's order), and explicit ops also make the CPU emulation in the
//    host test bit-identical to the device.
//  * Divider: 64-bit division by a run-time invariant with a multiply-high (the generic strided
//    path divides element indices by dimension sizes; a real 64-bit division is ~70 instructions).
//  * Geometry / Cursor: the (batch, inner) addressing of guidance_kernels/_layout.py, int64.
//  * Element formats: fp32 / fp16 / bf16 as raw bits, eight elements ("a group") per thread, packed
//    in 32-bit words so that a group of a 16-bit type is one 16-byte vector.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define GK_HD __host__ __device__ __forceinline__
#define GK_DEVICE __device__ __forceinline__
#define GK_UNROLL _Pragma("unroll")
#else
#include <cmath>
#define GK_HD inline
#define GK_UNROLL
#endif
#define GK_HOST inline

namespace guidance_kernels {

// --------------------------------------------------------------------------- fp32, rounded per op

GK_HD float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

GK_HD float sub_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}

GK_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

GK_HD float div_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

GK_HD float sqrt_rn(float a) {
#if defined(__CUDA_ARCH__)
  return __fsqrt_rn(a);
#else
  return std::sqrt(a);
#endif
}

GK_HD float fma_rn(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return __fmaf_rn(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}

GK_HD bool is_nan(float a) { return !(a == a); }

// torch.minimum / clamp semantics: NaN in either operand gives NaN (fminf would drop it).
GK_HD float min_nan(float a, float b) { return is_nan(a) ? a : (is_nan(b) ? b : (b < a ? b : a)); }
GK_HD float max_nan(float a, float b) { return is_nan(a) ? a : (is_nan(b) ? b : (b > a ? b : a)); }

GK_HD float bits_as_float(uint32_t bits) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(bits);
#else
  float x;
  std::memcpy(&x, &bits, sizeof(x));
  return x;
#endif
}

GK_HD uint32_t float_as_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  return bits;
#endif
}

// --------------------------------------------------------------------------- 64-bit invariant division

// q = n / d for 0 <= n < 2**63 and 1 <= d < 2**63 (Granlund & Montgomery's round-up method):
// with l = ceil(log2 d) and m = floor(2**64 (2**l - d) / d) + 1, q = (mulhi(n, m) + n) >> l. The
// sum cannot overflow because mulhi(n, m) <= n < 2**63. tests/host checks it against exact
// integer division around every power of two and beyond 2**31.
struct Divider {
  uint64_t divisor;
  uint64_t magic;
  uint32_t shift;
};

GK_HOST Divider make_divider(uint64_t d) {
  Divider v{d, 0, 0};
  while (v.shift < 64 && (uint64_t(1) << v.shift) < d) ++v.shift;
  const unsigned __int128 two64 = static_cast<unsigned __int128>(1) << 64;
  const unsigned __int128 excess = (static_cast<unsigned __int128>(1) << v.shift) - d;
  v.magic = static_cast<uint64_t>(two64 * excess / d + 1);
  return v;
}

GK_HD uint64_t mulhi64(uint64_t a, uint64_t b) {
#if defined(__CUDA_ARCH__)
  return __umul64hi(a, b);
#else
  return static_cast<uint64_t>((static_cast<unsigned __int128>(a) * b) >> 64);
#endif
}

GK_HD int64_t divide(const Divider& d, int64_t n) {
  const uint64_t u = static_cast<uint64_t>(n);
  return static_cast<int64_t>((mulhi64(u, d.magic) + u) >> d.shift);
}

// --------------------------------------------------------------------------- (batch, inner) addressing

// See guidance_kernels/_layout.py: sample b, inner index idx in [0, inner) (the output's memory
// order) is read at  b * batch_stride + i0 * s0 + i1 * s1 + i2 * s2  with (i0, i1, i2) the
// position of idx in (n0, n1, n2), and written at  b * inner + idx  of the output. Rank 1 has
// n0 = n1 = 1, n2 = inner; rank 2 has n0 = 1. All offsets are int64 (video latents pass 2**31).
struct Geometry {
  int64_t batch;
  int64_t inner;
  int64_t n1, n2;
  int64_t s0, s1, s2;
  int64_t batch_stride;
  int64_t carry2;  // offset change when i2 wraps to 0 and i1 steps: s1 - n2 * s2
  int64_t carry1;  // when i1 wraps to 0 and i0 steps: s0 - n1 * s1
  Divider by_n1, by_n2;
  int32_t rank;
};

GK_HOST Geometry make_geometry(int64_t batch, int64_t inner, int64_t n1, int64_t n2, int64_t s0, int64_t s1,
                               int64_t s2, int64_t batch_stride, int32_t rank) {
  Geometry g{};
  g.batch = batch;
  g.inner = inner;
  g.n1 = n1;
  g.n2 = n2;
  g.s0 = s0;
  g.s1 = s1;
  g.s2 = s2;
  g.batch_stride = batch_stride;
  g.carry2 = s1 - n2 * s2;
  g.carry1 = s0 - n1 * s1;
  g.by_n1 = make_divider(static_cast<uint64_t>(n1 > 0 ? n1 : 1));
  g.by_n2 = make_divider(static_cast<uint64_t>(n2 > 0 ? n2 : 1));
  g.rank = rank;
  return g;
}

// Position of an inner index, stepped element by element without further divisions.
struct Cursor {
  int64_t off;  // i0 * s0 + i1 * s1 + i2 * s2
  int64_t i1, i2;
};

GK_HD Cursor cursor_at(const Geometry& g, int64_t idx) {
  Cursor c{0, 0, idx};
  if (g.rank == 1) {
    c.off = idx * g.s2;
    return c;
  }
  const int64_t rest = divide(g.by_n2, idx);
  c.i2 = idx - rest * g.n2;
  int64_t i0 = 0;
  c.i1 = rest;
  if (g.rank == 3) {
    i0 = divide(g.by_n1, rest);
    c.i1 = rest - i0 * g.n1;
  }
  c.off = i0 * g.s0 + c.i1 * g.s1 + c.i2 * g.s2;
  return c;
}

// idx -> idx + 1 (never called past the last element of a sample by the kernels).
GK_HD void advance(const Geometry& g, Cursor& c) {
  c.off += g.s2;
  if (++c.i2 == g.n2) {
    c.i2 = 0;
    c.off += g.carry2;
    if (++c.i1 == g.n1) {
      c.i1 = 0;
      c.off += g.carry1;
    }
  }
}

// --------------------------------------------------------------------------- element formats

// Fmt::None marks an absent operand (e.g. no APG momentum buffer).
enum class Fmt { F32, F16, BF16, None };

template <typename T>
struct Format;  // Format<T>::kFmt for each element type the kernels are instantiated with

template <>
struct Format<float> {
  static constexpr Fmt kFmt = Fmt::F32;
};

// An absent operand (an APG call without momentum buffer).
struct NoBuffer {};
template <>
struct Format<NoBuffer> {
  static constexpr Fmt kFmt = Fmt::None;
};

#if defined(__CUDACC__)
template <>
struct Format<__half> {
  static constexpr Fmt kFmt = Fmt::F16;
};
template <>
struct Format<__nv_bfloat16> {
  static constexpr Fmt kFmt = Fmt::BF16;
};
#endif

template <Fmt F>
struct FmtBits {
  using Storage = uint16_t;
  static constexpr int kBytes = 2;
};
template <>
struct FmtBits<Fmt::F32> {
  using Storage = uint32_t;
  static constexpr int kBytes = 4;
};

#if !defined(__CUDA_ARCH__)
// Host (CPU emulation) conversions, round-to-nearest-even like the device intrinsics.
GK_HOST float host_half_to_float(uint32_t h) {
  const uint32_t sign = (h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t man = h & 0x3ffu;
  if (exp == 0x1f) return bits_as_float(sign | 0x7f800000u | (man << 13));  // inf / NaN
  if (exp == 0) {
    if (man == 0) return bits_as_float(sign);
    exp = 113;  // subnormal: normalise (2**-14 * man / 1024)
    while (!(man & 0x400u)) {
      man <<= 1;
      --exp;
    }
    return bits_as_float(sign | (exp << 23) | ((man & 0x3ffu) << 13));
  }
  return bits_as_float(sign | ((exp + 112) << 23) | (man << 13));
}

GK_HOST uint32_t host_float_to_half(float x) {
  const uint32_t bits = float_as_bits(x);
  const uint32_t sign = (bits >> 16) & 0x8000u;
  const uint32_t abs = bits & 0x7fffffffu;
  if (abs > 0x7f800000u) return sign | 0x7e00u;  // NaN
  if (abs >= 0x477ff000u) return sign | 0x7c00u;  // rounds to >= 65520: inf
  if (abs < 0x38800000u) {                        // below 2**-14: subnormal half (or zero)
    if (abs < 0x33000000u) return sign;           // < 2**-25 rounds to 0 (2**-25 ties to even 0)
    const uint32_t exp = abs >> 23;
    const uint32_t man = (abs & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126 - exp;  // value = man * 2**(exp - 150); half ulp here is 2**-24
    const uint32_t q = man >> shift;
    const uint32_t rem = man & ((1u << shift) - 1);
    const uint32_t half = 1u << (shift - 1);
    return sign | (q + ((rem > half || (rem == half && (q & 1))) ? 1 : 0));
  }
  const uint32_t rounded = abs + 0xfffu + ((abs >> 13) & 1);
  return sign | ((rounded - (112u << 23)) >> 13);
}

GK_HOST uint32_t host_float_to_bf16(float x) {
  const uint32_t bits = float_as_bits(x);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return ((bits >> 16) | 0x40u) & 0xffffu;  // quiet NaN
  return (bits + 0x7fffu + ((bits >> 16) & 1)) >> 16;
}
#endif

template <Fmt F>
GK_HD float bits_to_float(uint32_t bits) {
  if constexpr (F == Fmt::F32) return bits_as_float(bits);
  if constexpr (F == Fmt::BF16) return bits_as_float(bits << 16);
#if defined(__CUDA_ARCH__)
  return __half2float(__ushort_as_half(static_cast<unsigned short>(bits)));
#else
  return host_half_to_float(bits);
#endif
}

template <Fmt F>
GK_HD uint32_t float_to_bits(float x) {
  if constexpr (F == Fmt::F32) return float_as_bits(x);
#if defined(__CUDA_ARCH__)
  if constexpr (F == Fmt::BF16) return __bfloat16_as_ushort(__float2bfloat16_rn(x));
  return __half_as_ushort(__float2half_rn(x));
#else
  if constexpr (F == Fmt::BF16) return host_float_to_bf16(x);
  return host_float_to_half(x);
#endif
}

// Eight consecutive elements of one tensor ("a group": the unit of work of one thread), as raw
// bits in 32-bit words (two 16-bit elements per word, element 0 in the low half).
constexpr int kGroup = 8;

struct alignas(16) Raw16 {
  uint32_t x, y, z, w;
};

template <Fmt F>
struct Pack {
  static constexpr int kWords = kGroup * FmtBits<F>::kBytes / 4;
  uint32_t w[kWords];

  GK_HD float get(int e) const {
    if constexpr (F == Fmt::F32) return bits_as_float(w[e]);
    const uint32_t word = w[e / 2];
    return bits_to_float<F>((e & 1) ? (word >> 16) : (word & 0xffffu));
  }
  GK_HD void set(int e, float x) {
    const uint32_t bits = float_to_bits<F>(x);
    if constexpr (F == Fmt::F32) {
      w[e] = bits;
    } else {
      w[e / 2] = (e & 1) ? ((w[e / 2] & 0xffffu) | (bits << 16)) : ((w[e / 2] & 0xffff0000u) | bits);
    }
  }
  GK_HD void clear() {
    GK_UNROLL
    for (int i = 0; i < kWords; ++i) w[i] = 0;
  }
  // 16-byte vector load/store of a whole group; `p` is 16-byte aligned (checked by the launcher).
  GK_HD void load_vector(const void* p) {
    const Raw16* v = static_cast<const Raw16*>(p);
    GK_UNROLL
    for (int i = 0; i < kWords / 4; ++i) {
      const Raw16 r = v[i];
      w[4 * i] = r.x;
      w[4 * i + 1] = r.y;
      w[4 * i + 2] = r.z;
      w[4 * i + 3] = r.w;
    }
  }
  GK_HD void store_vector(void* p) const {
    Raw16* v = static_cast<Raw16*>(p);
    GK_UNROLL
    for (int i = 0; i < kWords / 4; ++i) v[i] = Raw16{w[4 * i], w[4 * i + 1], w[4 * i + 2], w[4 * i + 3]};
  }
  // Element e from / to `base[off]` (element offset), for the strided path and partial groups.
  GK_HD void load_element(int e, const void* base, int64_t off) {
    using S = typename FmtBits<F>::Storage;
    const uint32_t bits = static_cast<const S*>(base)[off];
    if constexpr (F == Fmt::F32) {
      w[e] = bits;
    } else {
      w[e / 2] |= (e & 1) ? (bits << 16) : bits;  // the pack was cleared first
    }
  }
  GK_HD void store_element(int e, void* base, int64_t off) const {
    using S = typename FmtBits<F>::Storage;
    uint32_t bits;
    if constexpr (F == Fmt::F32) {
      bits = w[e];
    } else {
      bits = (e & 1) ? (w[e / 2] >> 16) : (w[e / 2] & 0xffffu);
    }
    static_cast<S*>(base)[off] = static_cast<S>(bits);
  }
};

// A guidance scale: a Python number, or fp32 device memory read at ptr[b * stride] (stride 0: one
// value for every sample; 1 or more: per sample).
struct Scale {
  float value;
  const float* ptr;
  int64_t stride;

  GK_HD float at(int64_t b) const { return ptr != nullptr ? ptr[b * stride] : value; }
};

}  // namespace guidance_kernels
