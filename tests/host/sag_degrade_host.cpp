// CPU emulation of csrc/include/guidance_kernels/sag_degrade.cuh, for machines without a GPU
// (driven by tests/test_sag_degrade_host.py). It runs the kernel's own __host__ __device__ stages —
// reflect-padded halo, horizontal pass, vertical pass + mask + blend + re-noise — for every block
// of the launch grid, every thread in turn with the barriers' order, over the same plane loop.
// Arithmetic uses explicit rounding on both sides, so on a GPU the kernel computes the same bits.
//
// Compiled with g++ (the header needs no CUDA toolkit then). Reads one request from stdin, writes
// the outputs to stdout. Floats travel as C99 hex floats (Python's float.hex), tensor storage as hex
// bit patterns.
//
//   index                                   reflect / nearest / tiles tables (the index math alone)
//   degrade fmt <f32|f16|bf16> map <f32|f16|bf16|u8> grid_z <n>
//   shape B C H W
//   x0 <count> <bits...> <4 strides>        other: "none" or the same fields
//   out <count> <4 strides> degraded <0|1>
//   mask <mb> <mh> <mw> <3 strides> <count> <bits...>
//   alpha n <hex> | alpha t <count> <stride> <hex...>
//   params <thresholded> <threshold hex> <renoise> <taps> <weights hex...>
//   end
#include <guidance_kernels/sag_degrade.cuh>

#include "host_io.hpp"

#include <cinttypes>
#include <cstdio>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace gk = guidance_kernels;
namespace gs = guidance_kernels::sag;
using gk::Fmt;
using gs::MapFmt;
using host_io::fmt_bytes;
using host_io::read_fmt;
using host_io::Reader;
using host_io::Storage;

namespace {

MapFmt read_map_fmt(Reader& r) {
  const std::string w = r.word();
  if (w == "f32") return MapFmt::F32;
  if (w == "f16") return MapFmt::F16;
  if (w == "bf16") return MapFmt::BF16;
  if (w == "u8") return MapFmt::U8;
  throw std::runtime_error("unknown map format " + w);
}

int map_bytes(MapFmt f) { return f == MapFmt::F32 ? 4 : (f == MapFmt::U8 ? 1 : 2); }

void read_strides(Reader& r, int64_t* stride, int n) {
  for (int d = 0; d < n; ++d) stride[d] = r.i64();
}

// The kernel's grid: blocks (x, y) over the tiles, z over the planes with a stride of grid_z.
template <Fmt F, MapFmt M>
void emulate(const gs::DegradeParams& p, int64_t grid_z) {
  auto tile = std::make_unique<gs::Tile>();
  const int64_t tiles_x = gs::tiles_along(p.width, gs::kTileW);
  const int64_t tiles_y = gs::tiles_along(p.height, gs::kTileH);
  for (int64_t bz = 0; bz < grid_z; ++bz) {
    for (int64_t by = 0; by < tiles_y; ++by) {
      for (int64_t bx = 0; bx < tiles_x; ++bx) {
        const int64_t y0 = by * gs::kTileH;
        const int64_t x0 = bx * gs::kTileW;
        for (int64_t plane = bz; plane < p.batch * p.channels; plane += grid_z) {
          const int64_t b = plane / p.channels;
          const int64_t c = plane - b * p.channels;
          for (int t = 0; t < gs::kThreads; ++t) gs::stage_halo<F>(p, *tile, b, c, y0, x0, t);
          for (int t = 0; t < gs::kThreads; ++t) gs::stage_rows(p, *tile, t);
          for (int ty = 0; ty < gs::kThreadsY; ++ty) {
            for (int tx = 0; tx < gs::kThreadsX; ++tx) gs::stage_output<F, M>(p, *tile, b, c, y0, x0, tx, ty);
          }
        }
      }
    }
  }
}

template <Fmt F>
void emulate_map(const gs::DegradeParams& p, MapFmt m, int64_t grid_z) {
  switch (m) {
    case MapFmt::F32: emulate<F, MapFmt::F32>(p, grid_z); break;
    case MapFmt::F16: emulate<F, MapFmt::F16>(p, grid_z); break;
    case MapFmt::BF16: emulate<F, MapFmt::BF16>(p, grid_z); break;
    case MapFmt::U8: emulate<F, MapFmt::U8>(p, grid_z); break;
  }
}

void run_degrade(Reader& r) {
  r.expect("fmt");
  const Fmt fmt = read_fmt(r);
  r.expect("map");
  const MapFmt map_fmt = read_map_fmt(r);
  r.expect("grid_z");
  const int64_t grid_z = r.i64();
  gs::DegradeParams p{};
  r.expect("shape");
  p.batch = r.i64();
  p.channels = r.i64();
  p.height = r.i64();
  p.width = r.i64();
  Storage x0, other, out, degraded, mask;
  r.expect("x0");
  x0.read(r, fmt_bytes(fmt));
  read_strides(r, p.x_stride, 4);
  r.expect("other");
  const bool has_other = r.word() == "some";
  if (has_other) {
    other.read(r, fmt_bytes(fmt));
    read_strides(r, p.other_stride, 4);
  }
  r.expect("out");
  out.allocate(r.i64(), fmt_bytes(fmt));
  read_strides(r, p.out_stride, 4);
  r.expect("degraded");
  const bool with_degraded = r.i64() != 0;
  if (with_degraded) degraded.allocate(out.count, fmt_bytes(fmt));
  r.expect("mask");
  const int64_t map_batch = r.i64();
  p.map_h = r.i64();
  p.map_w = r.i64();
  read_strides(r, p.map_stride, 3);
  if (map_batch == 1) p.map_stride[0] = 0;  // broadcast, as the launcher sets it
  mask.read(r, map_bytes(map_fmt));
  r.expect("alpha");
  std::vector<float> alpha_values;
  if (r.word() == "n") {
    p.alpha = gk::Scale{static_cast<float>(r.f64()), nullptr, 0};
  } else {
    const int64_t count = r.i64(), stride = r.i64();
    for (int64_t i = 0; i < count; ++i) alpha_values.push_back(static_cast<float>(r.f64()));
    p.alpha = gk::Scale{0.0f, alpha_values.data(), stride};
  }
  r.expect("params");
  p.thresholded = static_cast<int>(r.i64());
  p.threshold = static_cast<float>(r.f64());
  p.renoise = static_cast<int>(r.i64());
  p.taps = static_cast<int>(r.i64());
  if (p.taps < 1 || p.taps > gs::kMaxTaps || p.taps % 2 == 0) throw std::runtime_error("bad tap count");
  for (int t = 0; t < p.taps; ++t) p.weights[t] = static_cast<float>(r.f64());
  r.expect("end");
  p.x0 = x0.data();
  p.other = has_other ? other.data() : nullptr;
  p.out = out.data();
  p.degraded = with_degraded ? degraded.data() : nullptr;
  p.map = mask.data();
  switch (fmt) {
    case Fmt::F32: emulate_map<Fmt::F32>(p, map_fmt, grid_z); break;
    case Fmt::F16: emulate_map<Fmt::F16>(p, map_fmt, grid_z); break;
    default: emulate_map<Fmt::BF16>(p, map_fmt, grid_z); break;
  }
  out.print("out");
  if (with_degraded) degraded.print("degraded");
}

void run_index() {
  for (int64_t n = 1; n <= 40; ++n) {
    for (int64_t i = -8; i < n + 8; ++i) std::printf("r %" PRId64 " %" PRId64 " %" PRId64 "\n", n, i,
                                                     gs::reflect_index(i, n));
  }
  for (int64_t in = 1; in <= 40; ++in) {
    for (int64_t out = 1; out <= 80; ++out) {
      std::printf("n %" PRId64 " %" PRId64, in, out);
      for (int64_t d = 0; d < out; ++d) std::printf(" %" PRId64, gs::nearest_source_index(d, in, out));
      std::printf("\n");
    }
  }
  std::printf("t %" PRId64 " %" PRId64 " %" PRId64 "\n", gs::tiles_along(1, 32), gs::tiles_along(32, 32),
              gs::tiles_along(33, 32));
}

}  // namespace

int main() {
  try {
    Reader r{std::cin};
    const std::string command = r.word();
    if (command == "index") {
      run_index();
    } else if (command == "degrade") {
      run_degrade(r);
    } else {
      throw std::runtime_error("unknown command " + command);
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "sag_degrade_host: %s\n", e.what());
    return 1;
  }
  return 0;
}
