// Uses the installed library through its public headers only: the version, a causal top-2
// selection on a 3 x 3 score matrix, and errors thrown by the library and by fmt here.
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include "dsa/device.hpp"
#include "dsa/error.hpp"
#include "dsa/report.hpp"
#include "dsa/tensor.hpp"
#include "dsa/topk.hpp"
#include "dsa/version.hpp"

int main() {
  int failures = 0;
  auto check = [&](bool ok, const std::string& what) {
    if (!ok) std::fprintf(stderr, "consumer: FAILED: %s\n", what.c_str());
    failures += !ok;
  };
  check(dsa::version() == dsa::kVersion,
        "dsa::version() " + dsa::version() + " == kVersion of the installed version.hpp");
  check(dsa::version() == DSA_EXPECTED_VERSION,
        "dsa::version() " + dsa::version() + " == the package's " DSA_EXPECTED_VERSION);

  // Row t sees positions s <= t; the top 2 in descending score order, -1 padding.
  dsa::Tensor scores = dsa::make_tensor(dsa::DType::f32, {3, 3}, "scores");
  const float values[9] = {1, 9, 9, 0.5f, 2, 9, 3, 1, 2};
  float* data = dsa::mutable_data<float>(scores);
  for (int i = 0; i < 9; ++i) data[i] = values[i];
  std::vector<int32_t> got(6, -7);
  dsa::select_from_scores(
      scores, 2,
      [&](const dsa::SelectionBlock& block) {
        for (int64_t i = 0; i < block.rows * block.k; ++i)
          got[static_cast<std::size_t>(block.row_begin * block.k + i)] = block.indices[i];
      },
      nullptr);
  check(got == std::vector<int32_t>{0, -1, 1, 0, 0, 2}, "top-2 selection {0,-1, 1,0, 0,2}");

  bool thrown = false;
  try {  // from the library
    dsa::select_from_scores(
        scores, 0, [](const dsa::SelectionBlock&) {}, nullptr);
  } catch (const dsa::Error& error) {
    thrown = error.code() == dsa::ExitCode::usage;
  }
  check(thrown, "select_from_scores with k = 0 throws dsa::Error(usage)");
  thrown = false;
  try {  // from here
    dsa::bad_usage("--topk: must be an integer >= 1, got {}", 0);
  } catch (const dsa::Error& error) {
    thrown = std::string(error.what()) == "--topk: must be an integer >= 1, got 0";
  }
  check(thrown, "dsa::bad_usage formats its message");
  std::printf("consumer: dsa %s, %s, CUDA backend usable: %s: %s\n", dsa::version().c_str(),
              dsa::device_description(dsa::Device::cpu).c_str(),
              dsa::cuda_available() ? "yes" : "no", failures ? "FAILED" : "ok");
  return failures ? 1 : 0;
}
