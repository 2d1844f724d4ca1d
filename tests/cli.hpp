// The binaries as a user runs them: a fixture with a fresh directory holding small random
// inputs, a shell runner with the binaries on PATH, and a check that nothing else is left.
#pragma once

#include <gtest/gtest.h>
#include <sys/wait.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "dsa/io.hpp"
#include "reference.hpp"
#include "temp_dir.hpp"

namespace dsa::test {

namespace fs = std::filesystem;

struct Outcome {
  int code;
  std::string out;  // stdout
  std::string err;  // stderr
};

inline std::string slurp(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

class Cli : public TempDirTest {
 protected:
  void SetUp() override {
    TempDirTest::SetUp();
    std::mt19937_64 rng(42);
    write("q.npy", random_tensor({24, 4, 16}, rng));
    write("k.npy", random_tensor({24, 16}, rng));
    write("w.npy", random_tensor({24, 4}, rng));
    write("qa.npy", random_tensor({24, 3, 20}, rng));
    write("kv.npy", random_tensor({24, 20}, rng));
  }

  void write(const std::string& name, const Tensor& t) { write_tensor(path(name), t); }

  // Runs a shell command line in the test directory with the binaries on PATH.
  Outcome run(const std::string& command) const {
    const std::string line = "cd '" + dir_.string() +
                             "' && export PATH='" DSA_APPS_DIR "':$PATH && " + command +
                             " >stdout.txt 2>stderr.txt";
    const int status = std::system(line.c_str());
    Outcome r{WIFEXITED(status) ? WEXITSTATUS(status) : -1, slurp(dir_ / "stdout.txt"),
              slurp(dir_ / "stderr.txt")};
    fs::remove(dir_ / "stdout.txt");
    fs::remove(dir_ / "stderr.txt");
    return r;
  }

  // No file other than the expected ones (in particular no temporary output) is left.
  void expect_only(std::vector<std::string> names) const {
    std::vector<std::string> present;
    for (const auto& e : fs::directory_iterator(dir_))
      present.push_back(e.path().filename().string());
    std::sort(present.begin(), present.end());
    std::sort(names.begin(), names.end());
    EXPECT_EQ(present, names);
  }
};

}  // namespace dsa::test
