// CPU emulation of csrc/include/guidance_kernels/guidance_combine.cuh, for machines without a GPU
// (driven by tests/test_guidance_combine_host.py). It runs the kernels' own __host__ __device__
// functions — index arithmetic, element formats, per-element math, Chan merging, per-sample
// coefficients — over the same grid, chunk, thread and group decomposition as the kernels, with the
// same merge order (block_total_on_host / sample_moments_on_host). Arithmetic uses explicit
// rounding on both sides, so on a GPU the kernels compute the same bits.
//
// Compiled with g++ (the header needs no CUDA toolkit then) or with nvcc as a .cu host program.
// Reads requests from stdin, writes results to stdout. Floats travel as C99 hex floats (Python's
// float.hex / float.fromhex), tensor storage as hex bit patterns.
#include <guidance_kernels/guidance_combine.cuh>

#include "host_io.hpp"

#include <cinttypes>
#include <cstdio>
#include <stdexcept>
#include <string>
#include <vector>

namespace gk = guidance_kernels;
namespace gc = guidance_kernels::combine;
using gk::Fmt;
using host_io::fmt_bytes;
using host_io::read_fmt;
using host_io::Reader;
using host_io::Storage;

namespace {

gk::Geometry read_geometry(Reader& r, int64_t* n0 = nullptr) {
  r.expect("geometry");
  const int64_t batch = r.i64(), inner = r.i64(), a0 = r.i64(), n1 = r.i64(), n2 = r.i64();
  const int64_t s0 = r.i64(), s1 = r.i64(), s2 = r.i64(), bs = r.i64(), rank = r.i64();
  if (n0 != nullptr) *n0 = a0;
  return gk::make_geometry(batch, inner, n1, n2, s0, s1, s2, bs, static_cast<int32_t>(rank));
}

// "n <number>" or "t <count> <stride> <values...>" (fp32 device memory read at ptr[b * stride]).
gk::Scale read_scale(Reader& r, std::vector<std::vector<float>>& keep, double* number = nullptr) {
  const std::string kind = r.word();
  if (kind == "n") {
    const double v = r.f64();
    if (number != nullptr) *number = v;
    return gk::Scale{static_cast<float>(v), nullptr, 0};
  }
  const int64_t count = r.i64(), stride = r.i64();
  keep.emplace_back();
  for (int64_t i = 0; i < count; ++i) keep.back().push_back(static_cast<float>(r.f64()));
  return gk::Scale{0.0f, keep.back().data(), stride};
}

using gc::block_chunk;
using gc::first_group;
using gc::group_size;

// --------------------------------------------------------------------------- guidance_combine

template <Fmt F, bool VEC>
void emulate_combine(gc::CombineParams& p, bool rescale) {
  const int64_t blocks = p.geo.batch * p.parts;
  std::vector<float> stats;
  if (rescale) {  // combine_moments_kernel
    stats.assign(static_cast<size_t>(blocks * gc::kRowFloats), 0.0f);
    p.stats = stats.data();
    for (uint32_t block = 0; block < static_cast<uint64_t>(blocks); ++block) {
      const gc::BlockChunk ch = block_chunk(block, p.parts, p.chunk, p.geo.inner);
      float g[gc::kMaxTerms];
      gc::combine_scales(p, ch.b, g);
      std::vector<gc::CombineMoments> threads(gc::kThreads);
      for (uint32_t t = 0; t < gc::kThreads; ++t) {
        gk::Pack<F> s[gc::kMaxBranches];
        for (auto& x : s) x.clear();
        gc::CombineMoments m = gc::empty_moments<gc::CombineMoments>();
        for (int64_t start = first_group(ch, t); start < ch.hi; start += gc::kTile) {
          const int valid = group_size(start, ch.hi);
          gc::combine_load<F, VEC>(p, ch.b, start, valid, s);
          m = gc::merge(m, gc::combine_group_moments<F>(p, s, g, valid));
        }
        threads[t] = m;
      }
      gc::store_row(p.stats + (ch.b * p.parts + ch.part) * gc::kRowFloats, gc::block_total_on_host(threads.data()));
    }
  }
  for (uint32_t block = 0; block < static_cast<uint64_t>(blocks); ++block) {  // combine_kernel
    const gc::BlockChunk ch = block_chunk(block, p.parts, p.chunk, p.geo.inner);
    float g[gc::kMaxTerms];
    gc::combine_scales(p, ch.b, g);
    gc::Rescale rs{1.0f, 0.0f, 1.0f};
    if (rescale) {
      const gc::CombineMoments m = gc::sample_moments_on_host<gc::CombineMoments>(p.stats, ch.b, p.parts);
      rs = gc::rescale_for(p.phi, p.one_minus_phi, ch.b, m.n, m.m[0], m.m[1]);
    }
    for (uint32_t t = 0; t < gc::kThreads; ++t) {
      gk::Pack<F> s[gc::kMaxBranches];
      for (auto& x : s) x.clear();
      for (int64_t start = first_group(ch, t); start < ch.hi; start += gc::kTile) {
        const int valid = group_size(start, ch.hi);
        gc::combine_load<F, VEC>(p, ch.b, start, valid, s);
        gc::combine_store<F>(p, s, g, rescale, rs, ch.b, start, valid, VEC || p.out_vector);
      }
    }
  }
  p.stats = nullptr;
}

template <Fmt F>
void combine_path(gc::CombineParams& p, bool rescale, bool vec) {
  if (vec) {
    emulate_combine<F, true>(p, rescale);
  } else {
    emulate_combine<F, false>(p, rescale);
  }
}

void run_combine(Reader& r) {
  r.expect("fmt");
  const Fmt f = read_fmt(r);
  r.expect("vec");
  const bool vec = r.i64() != 0;
  const gk::Geometry geo = read_geometry(r);
  r.expect("plan");
  gc::CombineParams p{};
  p.parts = r.i64();
  p.chunk = r.i64();
  p.geo = geo;
  r.expect("slots");
  p.nslots = static_cast<int32_t>(r.i64());
  std::vector<Storage> slots(p.nslots);
  for (int k = 0; k < p.nslots; ++k) {
    slots[k].read(r, fmt_bytes(f));
    p.x[k] = slots[k].data();
  }
  r.expect("base");
  p.base = static_cast<int32_t>(r.i64());
  r.expect("terms");
  p.nterms = static_cast<int32_t>(r.i64());
  std::vector<std::vector<float>> keep;
  keep.reserve(32);
  for (int t = 0; t < p.nterms; ++t) {
    p.pos[t] = static_cast<int32_t>(r.i64());
    p.neg[t] = static_cast<int32_t>(r.i64());
    p.g[t] = read_scale(r, keep);
  }
  r.expect("rescale");
  const bool rescale = r.i64() != 0;
  p.ref = static_cast<int32_t>(r.i64());
  double phi = 0.0;
  p.phi = read_scale(r, keep, &phi);
  p.one_minus_phi = static_cast<float>(1.0 - phi);  // as the launcher rounds it
  r.expect("end");
  Storage out;
  out.allocate(geo.batch * geo.inner, fmt_bytes(f));
  p.out = out.data();
  p.out_vector = geo.inner % gk::kGroup == 0;
  switch (f) {
    case Fmt::F32: combine_path<Fmt::F32>(p, rescale, vec); break;
    case Fmt::F16: combine_path<Fmt::F16>(p, rescale, vec); break;
    case Fmt::BF16: combine_path<Fmt::BF16>(p, rescale, vec); break;
    default: throw std::runtime_error("bad format");
  }
  out.print("out");
}

// --------------------------------------------------------------------------- apg / cfg-zero*

template <int KIND, Fmt F, Fmt FB, bool VEC>
void emulate_projected(gc::ProjectedParams& p) {
  using Stats = typename gc::Projected<KIND, FB>::Stats;
  const int64_t blocks = p.geo.batch * p.parts;
  std::vector<float> stats(static_cast<size_t>(blocks * gc::kRowFloats), 0.0f);
  p.stats = stats.data();
  for (uint32_t block = 0; block < static_cast<uint64_t>(blocks); ++block) {  // projected_moments_kernel
    const gc::BlockChunk ch = block_chunk(block, p.parts, p.chunk, p.geo.inner);
    std::vector<Stats> threads(gc::kThreads);
    for (uint32_t t = 0; t < gc::kThreads; ++t) {
      Stats m = gc::empty_moments<Stats>();
      for (int64_t start = first_group(ch, t); start < ch.hi; start += gc::kTile) {
        const int valid = group_size(start, ch.hi);
        gc::ProjectedGroup<F, FB> in{};
        gc::projected_load<KIND, F, FB, VEC>(p, ch.b, start, valid, in);
        m = gc::merge(m, gc::projected_group_moments<KIND, F, FB, VEC>(p, ch.b, start, valid, in));
      }
      threads[t] = m;
    }
    gc::store_row(p.stats + (ch.b * p.parts + ch.part) * gc::kRowFloats, gc::block_total_on_host(threads.data()));
  }
  for (uint32_t block = 0; block < static_cast<uint64_t>(blocks); ++block) {  // projected_kernel
    const gc::BlockChunk ch = block_chunk(block, p.parts, p.chunk, p.geo.inner);
    const gc::ProjectedCoef k =
        gc::projected_coefficients<KIND, FB>(p, gc::sample_moments_on_host<Stats>(p.stats, ch.b, p.parts), ch.b);
    for (uint32_t t = 0; t < gc::kThreads; ++t) {
      for (int64_t start = first_group(ch, t); start < ch.hi; start += gc::kTile) {
        const int valid = group_size(start, ch.hi);
        gc::ProjectedGroup<F, FB> in{};
        gc::projected_load<KIND, F, FB, VEC>(p, ch.b, start, valid, in);
        gc::projected_store<KIND, F, FB>(p, k, in, ch.b, start, valid, VEC || p.out_vector);
      }
    }
  }
  p.stats = nullptr;
}

template <int KIND, Fmt F, Fmt FB>
void projected_path(gc::ProjectedParams& p, bool vec) {
  if (vec) {
    emulate_projected<KIND, F, FB, true>(p);
  } else {
    emulate_projected<KIND, F, FB, false>(p);
  }
}

template <Fmt F>
void projected_kind(gc::ProjectedParams& p, int kind, Fmt fb, bool vec) {
  if (kind == gc::kCfgZeroStar) return projected_path<gc::kCfgZeroStar, F, Fmt::None>(p, vec);
  if (kind == gc::kTcfg) return projected_path<gc::kTcfg, F, Fmt::None>(p, vec);
  if (kind == gc::kMag) return projected_path<gc::kMag, F, Fmt::None>(p, vec);
  switch (fb) {
    case Fmt::None: return projected_path<gc::kApg, F, Fmt::None>(p, vec);
    case Fmt::F32: return projected_path<gc::kApg, F, Fmt::F32>(p, vec);
    default:
      if (fb != F) throw std::runtime_error("a 16-bit momentum buffer must have the prediction dtype");
      return projected_path<gc::kApg, F, F == Fmt::F32 ? Fmt::F32 : F>(p, vec);
  }
}

void run_projected(Reader& r) {
  r.expect("kind");
  const int kind = static_cast<int>(r.i64());
  r.expect("fmt");
  const Fmt f = read_fmt(r);
  r.expect("buf");
  const Fmt fb = read_fmt(r, /*allow_none=*/true);
  r.expect("vec");
  const bool vec = r.i64() != 0;
  gc::ProjectedParams p{};
  p.geo = read_geometry(r);
  r.expect("plan");
  p.parts = r.i64();
  p.chunk = r.i64();
  Storage cond, uncond, buf;
  r.expect("cond");
  cond.read(r, fmt_bytes(f));
  r.expect("uncond");
  uncond.read(r, fmt_bytes(f));
  p.cond = cond.data();
  p.uncond = uncond.data();
  if (fb != Fmt::None) {
    r.expect("buffer");
    buf.read(r, fmt_bytes(fb));
    p.buf = buf.data();
  }
  r.expect("formulation");
  p.formulation = static_cast<int32_t>(r.i64());
  std::vector<std::vector<float>> keep;
  keep.reserve(8);
  r.expect("scale");
  double w = 0.0;
  p.w = read_scale(r, keep, &w);
  p.gain_number = static_cast<float>(kind == gc::kApg && p.formulation == gc::kPaper ? w - 1.0 : w);
  r.expect("eta");
  p.eta = static_cast<float>(r.f64());
  r.expect("threshold");
  p.threshold = static_cast<float>(r.f64());
  r.expect("momentum");
  p.momentum = static_cast<float>(r.f64());
  r.expect("alpha");
  p.alpha = static_cast<float>(r.f64());
  r.expect("rescale");
  p.rescale = static_cast<int32_t>(r.i64());
  double phi = 0.0;
  p.phi = read_scale(r, keep, &phi);
  p.one_minus_phi = static_cast<float>(1.0 - phi);
  r.expect("end");
  Storage out;
  out.allocate(p.geo.batch * p.geo.inner, fmt_bytes(f));
  p.out = out.data();
  p.out_vector = p.geo.inner % gk::kGroup == 0;
  switch (f) {
    case Fmt::F32: projected_kind<Fmt::F32>(p, kind, fb, vec); break;
    case Fmt::F16: projected_kind<Fmt::F16>(p, kind, fb, vec); break;
    case Fmt::BF16: projected_kind<Fmt::BF16>(p, kind, fb, vec); break;
    default: throw std::runtime_error("bad format");
  }
  out.print("out");
  if (fb != Fmt::None) buf.print("buffer");
}

// --------------------------------------------------------------------------- cfg-norm / mahiro

template <Fmt F>
void emulate_channel(gc::ChannelParams& p, int kind) {
  if (kind == gc::kCfgNorm) {  // cfg_norm_kernel: one thread per position
    for (int64_t b = 0; b < p.batch; ++b)
      for (int64_t pos = 0; pos < p.positions; ++pos) gc::cfg_norm_position<F>(p, b, pos);
    return;
  }
  std::vector<float> stats(static_cast<size_t>(p.batch * p.parts), 0.0f);
  p.stats = stats.data();
  for (int64_t block = 0; block < p.batch * p.parts; ++block) {  // mahiro_moments_kernel
    const int64_t b = block / p.parts, part = block - b * p.parts;
    const int64_t lo = part * p.chunk, hi = lo + p.chunk < p.positions ? lo + p.chunk : p.positions;
    float g[gc::kMaxTerms];
    gc::channel_scales(p, b, g);
    float per_thread[gc::kThreads];
    for (int t = 0; t < gc::kThreads; ++t) {
      per_thread[t] = 0.0f;
      for (int64_t pos = lo + t; pos < hi; pos += gc::kThreads)
        per_thread[t] = gk::add_rn(per_thread[t], gc::mahiro_cosine<F>(p, g, b, pos));
    }
    stats[block] = gc::block_sum_on_host(per_thread);
  }
  for (int64_t b = 0; b < p.batch; ++b) {  // mahiro_kernel
    const float sim = gc::mahiro_similarity_on_host(p, b);
    float g[gc::kMaxTerms];
    gc::channel_scales(p, b, g);
    for (int64_t pos = 0; pos < p.positions; ++pos) gc::mahiro_position<F>(p, g, b, pos, sim);
  }
  p.stats = nullptr;
}

void run_channel(Reader& r) {
  r.expect("kind");
  const int kind = static_cast<int>(r.i64());
  r.expect("fmt");
  const Fmt f = read_fmt(r);
  r.expect("geometry");
  gc::ChannelParams p{};
  p.batch = r.i64();
  p.channels = r.i64();
  const int64_t p1 = r.i64();
  p.p2 = r.i64();
  p.bs = r.i64();
  p.cs = r.i64();
  p.s1 = r.i64();
  p.s2 = r.i64();
  p.ocs = r.i64();
  p.o1 = r.i64();
  p.o2 = r.i64();
  p.positions = p1 * p.p2;
  p.inner = p.positions * p.channels;
  p.by_p2 = gk::make_divider(static_cast<uint64_t>(p.p2));
  r.expect("plan");
  p.parts = r.i64();
  p.chunk = r.i64();
  r.expect("slots");
  p.nslots = static_cast<int32_t>(r.i64());
  std::vector<Storage> slots(p.nslots);
  for (int k = 0; k < p.nslots; ++k) {
    slots[k].read(r, fmt_bytes(f));
    p.x[k] = slots[k].data();
  }
  r.expect("base");
  p.base = static_cast<int32_t>(r.i64());
  r.expect("terms");
  p.nterms = static_cast<int32_t>(r.i64());
  std::vector<std::vector<float>> keep;
  keep.reserve(32);
  for (int t = 0; t < p.nterms; ++t) {
    p.pos[t] = static_cast<int32_t>(r.i64());
    p.neg[t] = static_cast<int32_t>(r.i64());
    p.g[t] = read_scale(r, keep);
  }
  r.expect("ref");
  p.ref = static_cast<int32_t>(r.i64());
  r.expect("strength");
  p.strength = read_scale(r, keep);
  r.expect("end");
  Storage out;
  out.allocate(p.batch * p.inner, fmt_bytes(f));
  p.out = out.data();
  switch (f) {
    case Fmt::F32: emulate_channel<Fmt::F32>(p, kind); break;
    case Fmt::F16: emulate_channel<Fmt::F16>(p, kind); break;
    case Fmt::BF16: emulate_channel<Fmt::BF16>(p, kind); break;
    default: throw std::runtime_error("bad format");
  }
  out.print("out");
}

// --------------------------------------------------------------------------- building blocks

void run_divide(Reader& r) {
  const gk::Divider d = gk::make_divider(static_cast<uint64_t>(r.i64()));
  const int64_t count = r.i64();
  std::printf("q");
  for (int64_t i = 0; i < count; ++i) std::printf(" %" PRId64, gk::divide(d, r.i64()));
  std::printf("\n");
}

// For each (b, idx): the element offset of the group starting at idx, element by element, as the
// generic path computes it (one division, then stepping).
void run_offsets(Reader& r) {
  const gk::Geometry g = read_geometry(r);
  const int64_t count = r.i64();
  for (int64_t i = 0; i < count; ++i) {
    const int64_t b = r.i64(), idx = r.i64();
    const int valid = group_size(idx, g.inner);
    int64_t off[gk::kGroup];
    gc::group_offsets<false>(g, b, idx, valid, off);
    std::printf("offsets %d", valid);
    for (int e = 0; e < valid; ++e) std::printf(" %" PRId64, off[e]);
    std::printf("\n");
  }
}

template <Fmt F>
void convert(Reader& r, int64_t count) {
  std::printf("bits");
  std::vector<float> back;
  for (int64_t i = 0; i < count; ++i) {
    const uint32_t bits = gk::float_to_bits<F>(static_cast<float>(r.f64()));
    std::printf(" %x", bits);
    back.push_back(gk::bits_to_float<F>(bits));
  }
  std::printf("\nback");
  for (float x : back) std::printf(" %a", static_cast<double>(x));
  std::printf("\n");
}

void run_convert(Reader& r) {
  const Fmt f = read_fmt(r);
  const int64_t count = r.i64();
  if (f == Fmt::F16) return convert<Fmt::F16>(r, count);
  if (f == Fmt::BF16) return convert<Fmt::BF16>(r, count);
  return convert<Fmt::F32>(r, count);
}

// Every statistic of three fields (all centred, all raw sums): what the test checks.
using AllMoments = gc::Moments<3, 3, 0b111111u>;

void print_moments(const char* name, const AllMoments& m) {
  std::printf("%s %a", name, static_cast<double>(m.n));
  for (int i = 0; i < 3; ++i) std::printf(" %a", static_cast<double>(m.mean[i]));
  for (int k = 0; k < AllMoments::kCentred; ++k) std::printf(" %a", static_cast<double>(m.m[k]));
  for (int k = 0; k < AllMoments::kPairs; ++k) std::printf(" %a", static_cast<double>(m.s[k]));
  std::printf("\n");
}

// Moments of 3 fields over `count` values, merged three ways: groups one after the other; the
// kernels' decomposition of one chunk (threads take groups tid*8 + k*kTile, then block_total);
// and `parts` chunk rows merged like pass 2 (sample_moments).
void run_moments(Reader& r) {
  const int64_t count = r.i64(), parts = r.i64();
  std::vector<float> f[3];
  for (auto& field : f) {
    for (int64_t i = 0; i < count; ++i) field.push_back(static_cast<float>(r.f64()));
  }
  auto group_at = [&](int64_t start, int64_t hi) {
    float v[3][gk::kGroup] = {};
    const int valid = group_size(start, hi);
    for (int i = 0; i < 3; ++i)
      for (int e = 0; e < valid; ++e) v[i][e] = f[i][start + e];
    return gc::group_moments<AllMoments>(v, valid);
  };
  AllMoments seq = gc::empty_moments<AllMoments>();
  for (int64_t s = 0; s < count; s += gk::kGroup) seq = gc::merge(seq, group_at(s, count));
  print_moments("sequential", seq);
  const int64_t chunk = ((count + parts - 1) / parts + gc::kTile - 1) / gc::kTile * gc::kTile;
  const int64_t nparts = (count + chunk - 1) / chunk;
  std::vector<float> rows(static_cast<size_t>(nparts * gc::kRowFloats));
  for (int64_t part = 0; part < nparts; ++part) {
    const int64_t lo = part * chunk, hi = lo + chunk < count ? lo + chunk : count;
    std::vector<AllMoments> threads(gc::kThreads);
    for (uint32_t t = 0; t < gc::kThreads; ++t) {
      threads[t] = gc::empty_moments<AllMoments>();
      for (int64_t s = lo + int64_t(t) * gk::kGroup; s < hi; s += gc::kTile) {
        threads[t] = gc::merge(threads[t], group_at(s, hi));
      }
    }
    const AllMoments total = gc::block_total_on_host(threads.data());
    if (part == 0) print_moments("block", total);
    gc::store_row(rows.data() + part * gc::kRowFloats, total);
  }
  print_moments("rows", gc::sample_moments_on_host<AllMoments>(rows.data(), 0, nparts));
}

}  // namespace

int main() {
  Reader r{std::cin};
  std::string command;
  try {
    while (std::cin >> command) {
      if (command == "constants") {
        std::printf("constants %d %d %d %d\n", gc::kTile, gk::kGroup, gc::kThreads, gc::kRowFloats);
      } else if (command == "combine") {
        run_combine(r);
      } else if (command == "projected") {
        run_projected(r);
      } else if (command == "channel") {
        run_channel(r);
      } else if (command == "divide") {
        run_divide(r);
      } else if (command == "offsets") {
        run_offsets(r);
      } else if (command == "convert") {
        run_convert(r);
      } else if (command == "moments") {
        run_moments(r);
      } else {
        throw std::runtime_error("unknown command " + command);
      }
      std::fflush(stdout);
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "guidance_combine_host: %s\n", e.what());
    return 1;
  }
  return 0;
}
