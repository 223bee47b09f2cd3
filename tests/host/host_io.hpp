// Text protocol shared by the host emulators (tests/host/*_host.cpp): words from stdin, C99 hex
// floats (Python's float.hex / float.fromhex), tensor storage as hex bit patterns of 1, 2 or 4 bytes.
#pragma once

#include <guidance_kernels/common.cuh>

#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <stdexcept>
#include <string>
#include <vector>

namespace host_io {

struct Reader {
  std::istream& in;
  std::string word() {
    std::string w;
    if (!(in >> w)) throw std::runtime_error("unexpected end of input");
    return w;
  }
  void expect(const char* w) {
    const std::string got = word();
    if (got != w) throw std::runtime_error("expected '" + std::string(w) + "', got '" + got + "'");
  }
  int64_t i64() { return std::strtoll(word().c_str(), nullptr, 10); }
  double f64() { return std::strtod(word().c_str(), nullptr); }
  uint32_t bits() { return static_cast<uint32_t>(std::strtoul(word().c_str(), nullptr, 16)); }
};

// "f32" | "f16" | "bf16", and "none" where the request allows an absent tensor.
inline guidance_kernels::Fmt read_fmt(Reader& r, bool allow_none = false) {
  using guidance_kernels::Fmt;
  const std::string w = r.word();
  if (w == "f32") return Fmt::F32;
  if (w == "f16") return Fmt::F16;
  if (w == "bf16") return Fmt::BF16;
  if (allow_none && w == "none") return Fmt::None;
  throw std::runtime_error("unknown format " + w);
}

inline int fmt_bytes(guidance_kernels::Fmt f) { return f == guidance_kernels::Fmt::F32 ? 4 : 2; }

// Tensor storage as raw element bits, 16-byte aligned like a CUDA allocation (the kernels' vector
// paths test the alignment of the pointers they are given).
struct Storage {
  std::vector<guidance_kernels::Raw16> mem;
  int64_t count = 0;
  int bytes = 4;
  void* data() { return mem.data(); }
  void allocate(int64_t n, int element_bytes) {
    count = n;
    bytes = element_bytes;
    mem.assign(static_cast<size_t>(n * bytes / 16 + 1), guidance_kernels::Raw16{0, 0, 0, 0});
  }
  void read(Reader& r, int element_bytes) {
    allocate(r.i64(), element_bytes);
    for (int64_t i = 0; i < count; ++i) put(i, r.bits());
  }
  void put(int64_t i, uint32_t v) {
    char* base = static_cast<char*>(data());
    if (bytes == 4) {
      reinterpret_cast<uint32_t*>(base)[i] = v;
    } else if (bytes == 2) {
      reinterpret_cast<uint16_t*>(base)[i] = static_cast<uint16_t>(v);
    } else {
      reinterpret_cast<uint8_t*>(base)[i] = static_cast<uint8_t>(v);
    }
  }
  uint32_t get(int64_t i) {
    char* base = static_cast<char*>(data());
    if (bytes == 4) return reinterpret_cast<uint32_t*>(base)[i];
    if (bytes == 2) return reinterpret_cast<uint16_t*>(base)[i];
    return reinterpret_cast<uint8_t*>(base)[i];
  }
  void print(const char* name) {
    std::printf("%s %" PRId64, name, count);
    for (int64_t i = 0; i < count; ++i) std::printf(" %x", get(i));
    std::printf("\n");
  }
};

}  // namespace host_io
