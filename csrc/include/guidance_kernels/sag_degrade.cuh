// SAG degrade: threshold + nearest map lookup + Gaussian blur + blend + re-noise in ONE kernel.
//
//   m        = map[b, my, mx] > threshold (key mass)  |  map[b, my, mx] (ready mask, blend weights)
//              with (my, mx) the nearest source cell of F.interpolate(mode="nearest")
//   blurred  = Σ_i w_i Σ_j w_j x0[b, c, reflect(y + i − r), reflect(x + j − r)]   (r = taps / 2)
//   degraded = blurred·m + x0·(1 − m)
//   out      = sqrt(ᾱ_b)·degraded + sqrt(1 − ᾱ_b)·eps   (kDdpm)
//            | (degraded + x_t) − x0                    (kKdiff, ComfyUI's operation order)
//            | degraded                                 (kNone)
//
// Tensors: x0, out, degraded, eps / x_t are (B, C, H, W) of element type T (float, __half,
// __nv_bfloat16), each addressed through its own four element strides; the map is (B|1, h, w) of
// MapT (float, __half, __nv_bfloat16, uint8_t for bool masks; batch stride 0 broadcasts it). All
// arithmetic is fp32, all offsets int64. Requires H, W > taps / 2 (one reflection reaches every
// tap); the launcher checks it.
//
// Work split: one block of 32×8 threads computes a 32×32 output tile of one (b, c) plane and walks
// the planes blockIdx.z, blockIdx.z + gridDim.z, ... (gridDim.z ≤ 65535). Per plane the block
// stages the reflect-padded (32 + 2r)² input tile in shared memory, runs the horizontal pass into a
// second shared buffer and the vertical pass + epilogue from there: every input element is read
// from global memory once per tile (plus the halo), and the x0 centre value comes from shared memory.
//
// No torch header: this file compiles with nvcc alone (tests/test_sag_degrade.py), and the index
// math below (GK_HOST_DEVICE) compiles with a host C++ compiler as well, for host-side tests.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define GK_HOST_DEVICE __host__ __device__ __forceinline__
#else
#include <cmath>
#define GK_HOST_DEVICE inline
#endif

namespace guidance_kernels {
namespace sag {

constexpr int kMaxTaps = 15;
constexpr int kMaxRadius = kMaxTaps / 2;
constexpr int kTileW = 32;
constexpr int kTileH = 32;
constexpr int kThreadsX = 32;
constexpr int kThreadsY = 8;
constexpr int kThreads = kThreadsX * kThreadsY;
constexpr int kMaxPlanesPerLaunch = 65535;  // gridDim.z limit; more planes are walked in a loop

enum Renoise : int { kNone = 0, kDdpm = 1, kKdiff = 2 };

struct DegradeParams {
  void* out;              // (B, C, H, W), strides out_stride
  void* degraded;         // optional second output (same strides as out); nullptr: not written
  const void* x0;         // (B, C, H, W), strides x_stride
  const void* other;      // eps (kDdpm) or x_t (kKdiff), strides other_stride; unused for kNone
  const void* map;        // (B|1, map_h, map_w), strides map_stride (map_stride[0] = 0: broadcast)
  const float* alpha;     // per-sample ᾱ (fp32, index b·alpha_stride), or nullptr: alpha_value
  int64_t batch, channels, height, width;
  int64_t x_stride[4];
  int64_t out_stride[4];
  int64_t other_stride[4];
  int64_t map_h, map_w;
  int64_t map_stride[3];
  int64_t alpha_stride;
  float alpha_value;
  float threshold;
  int thresholded;        // 1: map is a key mass, m = map > threshold; 0: map is the blend weight
  int renoise;            // Renoise
  int taps;               // odd, 1..kMaxTaps
  float weights[kMaxTaps];  // 1-D Gaussian weights (reference.gaussian_kernel_1d, float32)
};

// PyTorch "reflect" padding index for -(n-1) <= i <= 2(n-1) (the edge is not repeated), clamped
// into [0, n) so that positions outside the image (never used for a valid output) stay in bounds.
GK_HOST_DEVICE int64_t reflect_index(int64_t i, int64_t n) {
  if (i < 0) i = -i;
  if (i >= n) i = 2 * (n - 1) - i;
  return i < 0 ? 0 : (i >= n ? n - 1 : i);
}

// ATen's nearest_idx for F.interpolate(mode="nearest") without scale_factor: a copy when the
// sizes match, dst >> 1 for an exact 2x upscale, else min(floor(dst · (float)in / out), in − 1)
// in float32 — the float rounding is part of the contract (it decides edge cells of odd sizes).
GK_HOST_DEVICE int64_t nearest_source_index(int64_t dst, int64_t in_size, int64_t out_size) {
  if (out_size == in_size) return dst;
  if (out_size == 2 * in_size) return dst >> 1;
  const float scale = static_cast<float>(in_size) / static_cast<float>(out_size);
  const int64_t src = static_cast<int64_t>(floorf(static_cast<float>(dst) * scale));
  return src < in_size - 1 ? src : in_size - 1;
}

// Number of output tiles along a dimension of n elements.
GK_HOST_DEVICE int64_t tiles_along(int64_t n, int64_t tile) { return (n + tile - 1) / tile; }

#if defined(__CUDACC__)

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(uint8_t v) { return static_cast<float>(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

template <typename T, typename MapT>
__global__ void __launch_bounds__(kThreads) sag_degrade_kernel(const DegradeParams p) {
  // +1 column: the vertical pass reads down a column of `rows`; the padding keeps the 32 threads
  // of a warp (consecutive columns) on distinct banks in both passes.
  __shared__ float tile[kTileH + 2 * kMaxRadius][kTileW + 2 * kMaxRadius + 1];
  __shared__ float rows[kTileH + 2 * kMaxRadius][kTileW + 1];

  const int radius = p.taps / 2;
  const int halo_h = kTileH + 2 * radius;
  const int halo_w = kTileW + 2 * radius;
  const int64_t y_origin = static_cast<int64_t>(blockIdx.y) * kTileH;
  const int64_t x_origin = static_cast<int64_t>(blockIdx.x) * kTileW;
  const int tid = threadIdx.y * kThreadsX + threadIdx.x;
  const int64_t planes = p.batch * p.channels;
  const T* x0 = static_cast<const T*>(p.x0);
  const T* other = static_cast<const T*>(p.other);
  const MapT* map = static_cast<const MapT*>(p.map);
  T* out = static_cast<T*>(p.out);
  T* degraded_out = static_cast<T*>(p.degraded);

  for (int64_t plane = blockIdx.z; plane < planes; plane += gridDim.z) {
    const int64_t b = plane / p.channels;
    const int64_t c = plane % p.channels;
    const T* x_plane = x0 + b * p.x_stride[0] + c * p.x_stride[1];

    __syncthreads();  // the previous plane's readers of `tile` and `rows` are done
    for (int i = tid; i < halo_h * halo_w; i += kThreads) {
      const int ly = i / halo_w;
      const int lx = i % halo_w;
      const int64_t gy = reflect_index(y_origin + ly - radius, p.height);
      const int64_t gx = reflect_index(x_origin + lx - radius, p.width);
      tile[ly][lx] = to_float(x_plane[gy * p.x_stride[2] + gx * p.x_stride[3]]);
    }
    __syncthreads();
    for (int i = tid; i < halo_h * kTileW; i += kThreads) {
      const int ly = i / kTileW;
      const int lx = i % kTileW;
      float acc = 0.f;
      // Unrolled with constant indices: a runtime index into the parameter array would make nvcc
      // copy it to local memory (a stack frame).
#pragma unroll
      for (int t = 0; t < kMaxTaps; ++t) {
        if (t < p.taps) acc += p.weights[t] * tile[ly][lx + t];
      }
      rows[ly][lx] = acc;
    }
    __syncthreads();

    const int lx = threadIdx.x;
    const int64_t x = x_origin + lx;
    if (x >= p.width) continue;  // no barrier follows before the next plane's first one
    const int64_t mx = nearest_source_index(x, p.map_w, p.width);
    float alpha = p.alpha_value;
    if (p.renoise == kDdpm && p.alpha != nullptr) alpha = p.alpha[b * p.alpha_stride];
    const float sqrt_alpha = sqrtf(alpha);
    const float sqrt_one_minus_alpha = sqrtf(1.f - alpha);
    for (int ly = threadIdx.y; ly < kTileH; ly += kThreadsY) {
      const int64_t y = y_origin + ly;
      if (y >= p.height) break;
      float blurred = 0.f;
#pragma unroll
      for (int t = 0; t < kMaxTaps; ++t) {
        if (t < p.taps) blurred += p.weights[t] * rows[ly + t][lx];
      }
      const float center = tile[ly + radius][lx + radius];
      const int64_t my = nearest_source_index(y, p.map_h, p.height);
      float m = to_float(map[b * p.map_stride[0] + my * p.map_stride[1] + mx * p.map_stride[2]]);
      if (p.thresholded) m = m > p.threshold ? 1.f : 0.f;
      const float degraded = blurred * m + center * (1.f - m);
      float result = degraded;
      if (p.renoise == kDdpm) {
        const float eps = to_float(other[b * p.other_stride[0] + c * p.other_stride[1] + y * p.other_stride[2] +
                                         x * p.other_stride[3]]);
        result = sqrt_alpha * degraded + sqrt_one_minus_alpha * eps;
      } else if (p.renoise == kKdiff) {
        const float x_t = to_float(other[b * p.other_stride[0] + c * p.other_stride[1] + y * p.other_stride[2] +
                                         x * p.other_stride[3]]);
        result = (degraded + x_t) - center;
      }
      const int64_t o = b * p.out_stride[0] + c * p.out_stride[1] + y * p.out_stride[2] + x * p.out_stride[3];
      out[o] = from_float<T>(result);
      if (degraded_out != nullptr) degraded_out[o] = from_float<T>(degraded);
    }
  }
}

#endif  // __CUDACC__

}  // namespace sag
}  // namespace guidance_kernels
