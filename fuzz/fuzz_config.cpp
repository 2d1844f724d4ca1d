// libFuzzer target: dsa-cost's JSON preset and configuration loader (fuzz/inputs.hpp).
#include <cstdlib>
#include <filesystem>
#include <string>

#include "inputs.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, std::size_t size) {
  // One scratch directory per process for the files the loader reads.
  static const std::filesystem::path scratch = [] {
    std::string pattern =
        (std::filesystem::temp_directory_path() / "dsa-fuzz-config-XXXXXX").string();
    if (::mkdtemp(pattern.data()) == nullptr) std::abort();
    return std::filesystem::path(pattern);
  }();
  dsa::fuzz::config(data, size, DSA_SHIPPED_PRESETS, scratch);
  return 0;
}
