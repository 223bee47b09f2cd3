// CPU emulation of csrc/include/guidance_kernels/fdg_combine.cuh (driven by
// tests/test_fdg_combine_host.py): the kernels' own __host__ __device__ functions over the same
// launches, pixels, groups, block merges and stats rows, in the same order, so that the results are
// the device's bits. Requests on stdin, results on stdout (host_io.hpp's text protocol).
#include <guidance_kernels/fdg_combine.cuh>

#include "host_io.hpp"

#include <cstdio>
#include <stdexcept>
#include <string>
#include <vector>

namespace gk = guidance_kernels;
namespace gc = guidance_kernels::combine;
namespace gf = guidance_kernels::fdg;
using gk::Fmt;
using host_io::fmt_bytes;
using host_io::read_fmt;
using host_io::Reader;
using host_io::Storage;

namespace {

// "n <number>" or "t <count> <stride> <values...>" (fp32 device memory read at ptr[b * stride]).
gk::Scale read_scale(Reader& r, std::vector<std::vector<float>>& keep) {
  const std::string kind = r.word();
  if (kind == "n") return gk::Scale{static_cast<float>(r.f64()), nullptr, 0};
  const int64_t count = r.i64(), stride = r.i64();
  keep.emplace_back();
  for (int64_t i = 0; i < count; ++i) keep.back().push_back(static_cast<float>(r.f64()));
  return gk::Scale{0.0f, keep.back().data(), stride};
}

gf::Image read_image(Reader& r, Storage& s, int bytes) {
  s.read(r, bytes);
  r.expect("strides");
  gf::Image im{s.data(), 0, 0, 0, 0};
  im.bs = r.i64();
  im.cs = r.i64();
  im.ys = r.i64();
  im.xs = r.i64();
  return im;
}

gf::Level make_level(int32_t index, int64_t h, int64_t w) {
  gf::Level l{};
  l.index = index;
  l.h = h;
  l.w = w;
  l.by_h = gk::make_divider(static_cast<uint64_t>(h));
  l.by_w = gk::make_divider(static_cast<uint64_t>(w));
  return l;
}

template <Fmt F>
void emulate(gf::Params& p, std::vector<gf::Level>& lv, const std::vector<int64_t>& parts,
             const std::vector<int64_t>& chunks) {
  const gf::Level none = make_level(0, 1, 1);
  const int64_t planes = p.batch * p.channels;
  for (int i = 1; i < p.levels; ++i) {  // down_kernel
    for (int64_t idx = 0; idx < planes * lv[i].h * lv[i].w; ++idx) {
      float d, c;
      if (i == 1) {
        gf::down_at<F, true>(p, lv[0], lv[1], idx, &d, &c);
      } else {
        gf::down_at<F, false>(p, lv[i - 1], lv[i], idx, &d, &c);
      }
      lv[i].g_d[idx] = d;
      if (p.with_c) lv[i].g_c[idx] = c;
    }
  }
  for (int i = 0; i < p.levels; ++i) {  // stats_kernel
    if (!p.project[i] && !p.rescale[i]) continue;
    const bool last = i == p.levels - 1;
    const gf::Level& next = last ? none : lv[i + 1];
    const int64_t inner = p.channels * lv[i].h * lv[i].w;
    for (uint32_t block = 0; block < static_cast<uint64_t>(p.batch * parts[i]); ++block) {
      const gc::BlockChunk ch = gc::block_chunk(block, parts[i], chunks[i], inner);
      std::vector<gf::LevelMoments> threads(gc::kThreads);
      for (uint32_t t = 0; t < gc::kThreads; ++t) {
        gf::LevelMoments m = gc::empty_moments<gf::LevelMoments>();
        for (int64_t start = gc::first_group(ch, t); start < ch.hi; start += gc::kTile) {
          const int valid = gc::group_size(start, ch.hi);
          gf::LevelMoments g;
          if (i == 0) {
            g = last ? gf::level_group_moments<F, true, true>(p, lv[i], next, ch.b, start, valid)
                     : gf::level_group_moments<F, true, false>(p, lv[i], next, ch.b, start, valid);
          } else {
            g = last ? gf::level_group_moments<F, false, true>(p, lv[i], next, ch.b, start, valid)
                     : gf::level_group_moments<F, false, false>(p, lv[i], next, ch.b, start, valid);
          }
          m = gc::merge(m, g);
        }
        threads[t] = m;
      }
      gc::store_row(p.stats[i] + (ch.b * parts[i] + ch.part) * gc::kRowFloats, gc::block_total_on_host(threads.data()));
    }
  }
  for (int64_t b = 0; b < p.batch; ++b) gf::coefficients_on_host(p, b);  // coef_kernel
  if (p.levels >= 3) {  // recon_kernel
    for (int i = p.levels - 1; i >= 1; --i) {
      for (int64_t idx = 0; idx < planes * lv[i].h * lv[i].w; ++idx) {
        lv[i].r[idx] = i == p.levels - 1 ? gf::recon_at<false>(p, lv[i], none, idx)
                                         : gf::recon_at<true>(p, lv[i], lv[i + 1], idx);
      }
    }
  }
  const gf::Level& first = p.levels > 1 ? lv[1] : none;
  const int64_t inner = p.channels * p.height * p.width;
  if (p.data_rescale) {  // final_moments_kernel
    for (uint32_t block = 0; block < static_cast<uint64_t>(p.batch * p.final_parts); ++block) {
      const gc::BlockChunk ch = gc::block_chunk(block, p.final_parts, p.final_chunk, inner);
      std::vector<gc::CombineMoments> threads(gc::kThreads);
      for (uint32_t t = 0; t < gc::kThreads; ++t) {
        gc::CombineMoments m = gc::empty_moments<gc::CombineMoments>();
        for (int64_t start = gc::first_group(ch, t); start < ch.hi; start += gc::kTile) {
          m = gc::merge(m, gf::final_group_moments<F>(p, first, ch.b, start, gc::group_size(start, ch.hi)));
        }
        threads[t] = m;
      }
      gc::store_row(p.final_stats + (ch.b * p.final_parts + ch.part) * gc::kRowFloats,
                    gc::block_total_on_host(threads.data()));
    }
  }
  for (int64_t b = 0; b < p.batch; ++b) {  // final_kernel
    gc::Rescale rs{1.0f, 0.0f, 1.0f};
    if (p.data_rescale) {
      rs = gf::final_rescale(p, b, gc::sample_moments_on_host<gc::CombineMoments>(p.final_stats, b, p.final_parts));
    }
    for (int64_t local = 0; local < inner; ++local) {
      float c;
      const float out = gf::final_value<F>(p, first, b, local, &c);
      gc::store_scalar<F>(p.out, gf::final_offset(p, b, local), p.data_rescale ? gc::rescaled(out, rs) : out);
    }
  }
}

void run_fdg(Reader& r) {
  r.expect("fmt");
  const Fmt f = read_fmt(r);
  gf::Params p{};
  r.expect("original");
  p.original = static_cast<int32_t>(r.i64());
  r.expect("latent");
  p.batch = r.i64();
  p.channels = r.i64();
  p.height = r.i64();
  p.width = r.i64();
  p.by_height = gk::make_divider(static_cast<uint64_t>(p.height));
  p.by_width = gk::make_divider(static_cast<uint64_t>(p.width));
  r.expect("levels");
  p.levels = static_cast<int32_t>(r.i64());
  std::vector<gf::Level> lv;
  for (int i = 0; i < p.levels; ++i) {
    const int64_t h = r.i64(), w = r.i64();
    lv.push_back(make_level(i, h, w));
  }
  Storage cond, uncond;
  r.expect("cond");
  p.c = read_image(r, cond, fmt_bytes(f));
  r.expect("uncond");
  p.u = read_image(r, uncond, fmt_bytes(f));
  r.expect("out");
  p.obs = r.i64();
  p.ocs = r.i64();
  p.oys = r.i64();
  p.oxs = r.i64();
  const int64_t out_count = r.i64();
  std::vector<std::vector<float>> keep;
  keep.reserve(64);
  std::vector<int64_t> parts(p.levels, 1), chunks(p.levels, 0);
  for (int i = 0; i < p.levels; ++i) {
    r.expect("level");
    r.expect("scale");
    p.s[i] = read_scale(r, keep);
    r.expect("weight");
    p.weight[i] = static_cast<float>(r.f64());
    r.expect("project");
    p.project[i] = static_cast<int32_t>(r.i64());
    r.expect("rescale");
    p.rescale[i] = static_cast<int32_t>(r.i64());
    p.phi[i] = read_scale(r, keep);
    r.expect("plan");
    parts[i] = r.i64();
    chunks[i] = r.i64();
    p.parts[i] = parts[i];
    p.with_c = p.with_c || p.project[i] || p.rescale[i];
    if (i >= 1) {
      r.expect("tables");
      for (int axis = 0; axis < 2; ++axis) {
        const int64_t n = r.i64();
        keep.emplace_back();
        for (int64_t k = 0; k < n; ++k) keep.back().push_back(static_cast<float>(r.f64()));
        (axis == 0 ? lv[i].tab_y : lv[i].tab_x) = keep.back().data();
      }
    }
  }
  r.expect("data");
  p.data_rescale = static_cast<int32_t>(r.i64());
  p.data_phi = read_scale(r, keep);
  p.final_parts = r.i64();
  p.final_chunk = r.i64();
  r.expect("end");
  std::vector<std::vector<float>> buffers;
  buffers.reserve(64);
  auto buffer = [&](int64_t n) {
    buffers.emplace_back(static_cast<size_t>(n), 0.0f);
    return buffers.back().data();
  };
  for (int i = 0; i < p.levels; ++i) {
    const int64_t n = p.batch * p.channels * lv[i].h * lv[i].w;
    if (i >= 1) {
      lv[i].g_d = buffer(n);
      if (p.with_c) lv[i].g_c = buffer(n);
      if (p.levels >= 3) lv[i].r = buffer(n);
    }
    if (p.project[i] || p.rescale[i]) p.stats[i] = buffer(p.batch * parts[i] * gc::kRowFloats);
  }
  p.coef = buffer(p.batch * p.levels * 3);
  if (p.data_rescale) p.final_stats = buffer(p.batch * p.final_parts * gc::kRowFloats);
  Storage out;
  out.allocate(out_count, fmt_bytes(f));
  p.out = out.data();
  switch (f) {
    case Fmt::F32: emulate<Fmt::F32>(p, lv, parts, chunks); break;
    case Fmt::F16: emulate<Fmt::F16>(p, lv, parts, chunks); break;
    case Fmt::BF16: emulate<Fmt::BF16>(p, lv, parts, chunks); break;
    default: throw std::runtime_error("bad format");
  }
  out.print("out");
}

}  // namespace

int main() {
  Reader r{std::cin};
  std::string command;
  try {
    while (std::cin >> command) {
      if (command == "constants") {
        std::printf("constants %d %d\n", gc::kTile, gc::kRowFloats);
      } else if (command == "fdg") {
        run_fdg(r);
      } else {
        throw std::runtime_error("unknown command " + command);
      }
      std::fflush(stdout);
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "fdg_combine_host: %s\n", e.what());
    return 1;
  }
  return 0;
}
