// Every input the fuzzers (fuzz/, scripts/fuzz.sh) ever found, replayed through the same code
// as the fuzz target that found it: tests/data/regress/<target>/ holds them, one file each,
// named after what went wrong. Run under the sanitizer build too (.ci/run).
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>

#include "../fuzz/inputs.hpp"
#include "temp_dir.hpp"

namespace dsa {
namespace {

namespace fs = std::filesystem;

class FuzzRegress : public test::TempDirTest {
 protected:
  // Calls check(bytes, size) on every file of tests/data/regress/<kind>; returns how many.
  template <typename Check>
  int replay(const std::string& kind, Check check) {
    const fs::path dir = fs::path(DSA_TESTS_DIR) / "data" / "regress" / kind;
    int count = 0;
    if (!fs::exists(dir)) return count;
    for (const auto& entry : fs::directory_iterator(dir)) {
      std::ifstream in(entry.path(), std::ios::binary);
      const std::string bytes{std::istreambuf_iterator<char>(in), {}};
      SCOPED_TRACE(entry.path().string());
      check(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size());
      ++count;
    }
    return count;
  }
};

TEST_F(FuzzRegress, Npy) {
  EXPECT_GT(replay("npy", fuzz::npy), 0);
}

TEST_F(FuzzRegress, Safetensors) {
  replay("safetensors", fuzz::safetensors);
}

TEST_F(FuzzRegress, Jsonl) {
  replay("jsonl", fuzz::jsonl);
}

TEST_F(FuzzRegress, Config) {
  const int n = replay("config", [&](const uint8_t* data, std::size_t size) {
    fuzz::config(data, size, fs::path(DSA_TESTS_DIR) / ".." / "data" / "presets", dir_);
  });
  EXPECT_GT(n, 0);
}

}  // namespace
}  // namespace dsa
