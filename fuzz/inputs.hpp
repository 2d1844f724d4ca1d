// What each fuzz target does with one input, shared by the libFuzzer targets (fuzz_*.cpp) and
// the regression test that replays every input they ever found (tests/test_fuzz_regress.cpp).
// A hostile input may only end in dsa::Error; any other exception escapes (a crash under
// libFuzzer, a failure under GoogleTest), and so does anything AddressSanitizer or UBSan sees.
#pragma once

#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "dsa/cost.hpp"
#include "dsa/error.hpp"
#include "dsa/io.hpp"

namespace dsa::fuzz {

template <typename F>
void expect_only_dsa_errors(F&& f) {
  try {
    f();
  } catch (const Error&) {
  }
}

// Reads every element of an accepted tensor, so that AddressSanitizer sees any byte the header
// claims and the input lacks.
inline void touch(const Tensor& tensor) {
  const int64_t n = tensor.numel();
  if (is_floating(tensor.dtype)) {
    std::vector<float> values(static_cast<std::size_t>(n));
    to_f32(tensor, 0, n, values.data());
  } else {
    std::vector<int64_t> values(static_cast<std::size_t>(n));
    to_i64(tensor, 0, n, values.data());
  }
}

// The .npy reader (files and the stdin stream share parse_npy).
inline void npy(const uint8_t* data, std::size_t size) {
  expect_only_dsa_errors([&] {
    touch(parse_npy(reinterpret_cast<const std::byte*>(data), size, "fuzz.npy", nullptr));
  });
}

// The .safetensors reader: the single-tensor form (FILE) and a named tensor (FILE:x, the name
// the seeds use).
inline void safetensors(const uint8_t* data, std::size_t size) {
  for (const char* name : {"", "x"}) {
    expect_only_dsa_errors([&] {
      touch(parse_safetensors(reinterpret_cast<const std::byte*>(data), size, "fuzz.safetensors",
                              name, nullptr));
    });
  }
}

// The .jsonl token file reader; an accepted file has one position per row and -1 or a
// non-negative index in every entry.
inline void jsonl(const uint8_t* data, std::size_t size) {
  std::istringstream in(std::string(reinterpret_cast<const char*>(data), size));
  expect_only_dsa_errors([&] {
    const TokenFile tokens = parse_jsonl_tokens(in, "fuzz.jsonl");
    const Tensor& t = tokens.indices;
    int64_t rows = 1;
    for (std::size_t d = 0; d + 1 < t.shape.size(); ++d) rows *= t.shape[d];
    if (static_cast<int64_t>(tokens.positions.size()) != rows)
      throw std::logic_error("a position per row");
    const auto* indices = reinterpret_cast<const int32_t*>(t.data);
    for (int64_t i = 0; i < t.numel(); ++i)
      if (indices[i] < -1) throw std::logic_error("indices are -1 or positions");
  });
}

// dsa-cost's JSON loader, every way a JSON text reaches it: as the preset files
// (hardware.json, models.json), as a user's file (whose "base" names one of the presets in
// `shipped`), and as the VALUE of --set. `scratch` is a directory of the caller's.
inline void config(const uint8_t* data, std::size_t size, const std::filesystem::path& shipped,
                   const std::filesystem::path& scratch) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  for (const char* name : {"hardware.json", "models.json", "user.json"}) {
    std::ofstream(scratch / name, std::ios::binary | std::ios::trunc) << text;
  }
  const PresetLibrary fuzzed{scratch}, presets{shipped};
  const std::string user = (scratch / "user.json").string();
  expect_only_dsa_errors([&] { preset_names(fuzzed, "hardware"); });
  expect_only_dsa_errors([&] { preset_names(fuzzed, "models"); });
  expect_only_dsa_errors([&] { load_hardware(presets, user); });
  expect_only_dsa_errors([&] { load_model(presets, user); });
  HardwareSpec hardware;
  ModelSpec dense, sparse;
  for (const char* key : {"hardware.bf16_tflops=", "dense.name=", "dsa.topk="}) {
    expect_only_dsa_errors([&] { apply_override(key + text, hardware, dense, sparse); });
  }
}

}  // namespace dsa::fuzz
