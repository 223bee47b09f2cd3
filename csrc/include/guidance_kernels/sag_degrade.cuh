// SAG degrade: threshold + nearest map lookup + Gaussian blur + blend + re-noise in ONE kernel.
//
//   m        = map[b, my, mx] > threshold (key mass)  |  map[b, my, mx] (ready mask: blend weights)
//              with (my, mx) the nearest source cell of F.interpolate(mode="nearest")
//   blurred  = Σ_i w_i Σ_j w_j x0[b, c, reflect(y + i − r), reflect(x + j − r)]   (r = taps / 2)
//   degraded = blurred·m + x0·(1 − m)
//   out      = sqrt(ᾱ_b)·degraded + sqrt(1 − ᾱ_b)·eps   (kDdpm, diffusers' add_noise)
//            | (degraded + x_t) − x0                    (kKdiff, ComfyUI's operation order)
//            | degraded                                 (kNone)
//
// Tensors: x0, out, degraded, eps / x_t are (B, C, H, W) of one element format (fp32 / fp16 /
// bf16), each addressed through its own four element strides; the map is (B|1, h, w) of MapFmt
// (fp32 / fp16 / bf16, or bytes for a bool mask; batch stride 0 broadcasts it). Arithmetic is fp32
// with explicit rounding (common.cuh): the taps are fused multiply-adds in tap order, the blend and
// the re-noise round once per operation in the eager reference's order. All offsets are int64.
// Requires H, W > taps / 2 (one reflection reaches every tap); the launcher checks it.
//
// Work split: a block of 32×8 threads computes a 32×32 output tile of one (b, c) plane and walks
// the planes blockIdx.z, blockIdx.z + gridDim.z, ... (gridDim.z ≤ 65535). Per plane it runs three
// stages separated by barriers: the reflect-padded (32 + 2r)² input tile into shared memory, the
// horizontal pass into a second shared buffer, then the vertical pass + epilogue (the x0 centre
// value comes from shared memory). Every input element is read from global memory once per tile
// (plus the halo).
//
// No torch header. The stages are __host__ __device__ functions of the thread index: the kernel
// runs them with barriers in between, tests/host/sag_degrade_host.cpp runs them for every thread
// in turn on the CPU (g++, no CUDA toolkit), so the emulation computes the kernel's bits.
#pragma once

#include <guidance_kernels/common.cuh>

#include <cstdint>

namespace guidance_kernels {
namespace sag {

constexpr int kMaxTaps = 15;
constexpr int kMaxRadius = kMaxTaps / 2;
constexpr int kTileW = 32;
constexpr int kTileH = 32;
constexpr int kThreadsX = 32;
constexpr int kThreadsY = 8;
constexpr int kThreads = kThreadsX * kThreadsY;
constexpr int kHaloH = kTileH + 2 * kMaxRadius;
constexpr int kHaloW = kTileW + 2 * kMaxRadius;
constexpr int64_t kMaxPlanesPerLaunch = 65535;  // gridDim.z limit; more planes are walked in a loop
constexpr int64_t kMaxTilesY = 65535;           // gridDim.y limit

enum Renoise : int { kNone = 0, kDdpm = 1, kKdiff = 2 };

// Element formats of the map: a float key mass / mask, or bytes (a bool mask viewed as uint8).
enum class MapFmt { F32, F16, BF16, U8 };

struct DegradeParams {
  void* out;            // (B, C, H, W), strides out_stride
  void* degraded;       // optional second output with out's strides; nullptr: not written
  const void* x0;       // (B, C, H, W), strides x_stride
  const void* other;    // eps (kDdpm) or x_t (kKdiff), strides other_stride; unused for kNone
  const void* map;      // (B|1, map_h, map_w), strides map_stride (map_stride[0] = 0: broadcast)
  Scale alpha;          // ᾱ: a number, or fp32 memory at ptr[b * stride]
  int64_t batch, channels, height, width;
  int64_t x_stride[4];
  int64_t out_stride[4];
  int64_t other_stride[4];
  int64_t map_h, map_w;
  int64_t map_stride[3];
  float threshold;
  int thresholded;      // 1: the map is a key mass, m = map > threshold; 0: the map is the blend weight
  int renoise;          // Renoise
  int taps;             // odd, 1..kMaxTaps
  float weights[kMaxTaps];  // 1-D Gaussian weights (reference.gaussian_kernel_1d, float32)
};

// One block's shared memory: the reflect-padded input tile and the horizontally blurred rows. The
// +1 columns keep a warp's 32 consecutive columns on distinct banks in both passes.
struct Tile {
  float halo[kHaloH][kHaloW + 1];
  float rows[kHaloH][kTileW + 1];
};

// --------------------------------------------------------------------------- index math

GK_HD float floor_f(float x) {
#if defined(__CUDA_ARCH__)
  return floorf(x);
#else
  return std::floor(x);
#endif
}

// PyTorch "reflect" padding index for -(n-1) <= i <= 2(n-1) (the edge is not repeated), clamped
// into [0, n) so that positions no in-image output uses (beyond one reflection) stay in bounds.
GK_HD int64_t reflect_index(int64_t i, int64_t n) {
  if (i < 0) i = -i;
  if (i >= n) i = 2 * (n - 1) - i;
  return i < 0 ? 0 : (i >= n ? n - 1 : i);
}

// ATen's nearest_idx for F.interpolate(mode="nearest") without scale_factor: a copy when the
// sizes match, dst >> 1 for an exact 2x upscale, else min(floor(dst · (float)in / out), in − 1)
// in float32 — the float rounding is part of the contract (it decides edge cells of odd sizes).
GK_HD int64_t nearest_source_index(int64_t dst, int64_t in_size, int64_t out_size) {
  if (out_size == in_size) return dst;
  if (out_size == 2 * in_size) return dst >> 1;
  const float scale = div_rn(static_cast<float>(in_size), static_cast<float>(out_size));
  const int64_t src = static_cast<int64_t>(floor_f(mul_rn(static_cast<float>(dst), scale)));
  return src < in_size - 1 ? src : in_size - 1;
}

// Number of tiles covering n elements.
GK_HD int64_t tiles_along(int64_t n, int64_t tile) { return (n + tile - 1) / tile; }

// --------------------------------------------------------------------------- elements

template <Fmt F>
GK_HD float load_value(const void* base, int64_t off) {
  using S = typename FmtBits<F>::Storage;
  return bits_to_float<F>(static_cast<const S*>(base)[off]);
}

template <Fmt F>
GK_HD void store_value(void* base, int64_t off, float x) {
  using S = typename FmtBits<F>::Storage;
  static_cast<S*>(base)[off] = static_cast<S>(float_to_bits<F>(x));
}

template <MapFmt M>
GK_HD float load_map(const void* base, int64_t off) {
  if constexpr (M == MapFmt::U8) return static_cast<float>(static_cast<const uint8_t*>(base)[off]);
  if constexpr (M == MapFmt::F32) return load_value<Fmt::F32>(base, off);
  if constexpr (M == MapFmt::F16) return load_value<Fmt::F16>(base, off);
  return load_value<Fmt::BF16>(base, off);
}

GK_HD int64_t offset4(const int64_t* stride, int64_t b, int64_t c, int64_t y, int64_t x) {
  return b * stride[0] + c * stride[1] + y * stride[2] + x * stride[3];
}

// Σ_t w_t · v[t · step] over the taps: fused multiply-adds in tap order, unrolled with constant
// indices (a run-time index into the parameter array would make nvcc copy it to a stack frame).
GK_HD float tap_sum(const DegradeParams& p, const float* v, int step) {
  float acc = 0.0f;
  GK_UNROLL
  for (int t = 0; t < kMaxTaps; ++t) {
    if (t < p.taps) acc = fma_rn(p.weights[t], v[t * step], acc);
  }
  return acc;
}

// The blend weight of output pixel (y, x) of sample b.
template <MapFmt M>
GK_HD float mask_weight(const DegradeParams& p, int64_t b, int64_t y, int64_t x) {
  const int64_t my = nearest_source_index(y, p.map_h, p.height);
  const int64_t mx = nearest_source_index(x, p.map_w, p.width);
  const float v = load_map<M>(p.map, b * p.map_stride[0] + my * p.map_stride[1] + mx * p.map_stride[2]);
  if (p.thresholded) return v > p.threshold ? 1.0f : 0.0f;
  return v;
}

// --------------------------------------------------------------------------- the three stages

// Stage 1 (thread tid of kThreads): the reflect-padded input tile around (y0, x0) of plane (b, c).
template <Fmt F>
GK_HD void stage_halo(const DegradeParams& p, Tile& s, int64_t b, int64_t c, int64_t y0, int64_t x0, int tid) {
  const int radius = p.taps / 2;
  const int halo_h = kTileH + 2 * radius;
  const int halo_w = kTileW + 2 * radius;
  for (int i = tid; i < halo_h * halo_w; i += kThreads) {
    const int ly = i / halo_w;
    const int lx = i % halo_w;
    const int64_t gy = reflect_index(y0 + ly - radius, p.height);
    const int64_t gx = reflect_index(x0 + lx - radius, p.width);
    s.halo[ly][lx] = load_value<F>(p.x0, offset4(p.x_stride, b, c, gy, gx));
  }
}

// Stage 2 (thread tid): the horizontal pass over every halo row.
GK_HD void stage_rows(const DegradeParams& p, Tile& s, int tid) {
  const int halo_h = kTileH + 2 * (p.taps / 2);
  for (int i = tid; i < halo_h * kTileW; i += kThreads) {
    const int ly = i / kTileW;
    const int lx = i % kTileW;
    s.rows[ly][lx] = tap_sum(p, &s.halo[ly][lx], 1);
  }
}

// Stage 3 (thread (tx, ty) of kThreadsX × kThreadsY): the vertical pass, the mask, the blend and
// the re-noise for column tx and rows ty, ty + kThreadsY, ... of the tile; stores the outputs.
template <Fmt F, MapFmt M>
GK_HD void stage_output(const DegradeParams& p, const Tile& s, int64_t b, int64_t c, int64_t y0, int64_t x0, int tx,
                        int ty) {
  const int radius = p.taps / 2;
  const int64_t x = x0 + tx;
  if (x >= p.width) return;
  const float alpha = p.renoise == kDdpm ? p.alpha.at(b) : 0.0f;
  const float sqrt_alpha = sqrt_rn(alpha);
  const float sqrt_one_minus_alpha = sqrt_rn(sub_rn(1.0f, alpha));
  for (int ly = ty; ly < kTileH; ly += kThreadsY) {
    const int64_t y = y0 + ly;
    if (y >= p.height) return;
    const float blurred = tap_sum(p, &s.rows[ly][tx], kTileW + 1);
    const float center = s.halo[ly + radius][tx + radius];
    const float m = mask_weight<M>(p, b, y, x);
    const float degraded = add_rn(mul_rn(blurred, m), mul_rn(center, sub_rn(1.0f, m)));
    float result = degraded;
    if (p.renoise == kDdpm) {
      const float eps = load_value<F>(p.other, offset4(p.other_stride, b, c, y, x));
      result = add_rn(mul_rn(sqrt_alpha, degraded), mul_rn(sqrt_one_minus_alpha, eps));
    } else if (p.renoise == kKdiff) {
      const float x_t = load_value<F>(p.other, offset4(p.other_stride, b, c, y, x));
      result = sub_rn(add_rn(degraded, x_t), center);
    }
    const int64_t o = offset4(p.out_stride, b, c, y, x);
    store_value<F>(p.out, o, result);
    if (p.degraded != nullptr) store_value<F>(p.degraded, o, degraded);
  }
}

#if defined(__CUDACC__)

// grid (tiles along W, tiles along H, min(B·C, kMaxPlanesPerLaunch)), block (kThreadsX, kThreadsY).
template <typename T, MapFmt M>
__global__ void __launch_bounds__(kThreads) sag_degrade_kernel(const DegradeParams p) {
  constexpr Fmt F = Format<T>::kFmt;
  __shared__ Tile s;
  const int64_t y0 = static_cast<int64_t>(blockIdx.y) * kTileH;
  const int64_t x0 = static_cast<int64_t>(blockIdx.x) * kTileW;
  const int tid = threadIdx.y * kThreadsX + threadIdx.x;
  for (int64_t plane = blockIdx.z; plane < p.batch * p.channels; plane += gridDim.z) {
    const int64_t b = plane / p.channels;
    const int64_t c = plane - b * p.channels;
    __syncthreads();  // the previous plane's readers of the tile are done
    stage_halo<F>(p, s, b, c, y0, x0, tid);
    __syncthreads();
    stage_rows(p, s, tid);
    __syncthreads();
    stage_output<F, M>(p, s, b, c, y0, x0, threadIdx.x, threadIdx.y);
  }
}

#endif  // __CUDACC__

}  // namespace sag
}  // namespace guidance_kernels
