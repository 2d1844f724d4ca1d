// --calibrate: this machine's achieved rates, measured with the toolkit's own kernels on small
// random problems, to replace a preset's datasheet rates in the cost model (DESIGN.md §3).
#include "dsa/calibrate.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <random>
#include <vector>

#include <fmt/format.h>

#include "dsa/attention.hpp"
#include "dsa/indexer.hpp"
#include "dsa/parallel.hpp"
#include "dsa/report.hpp"
#include "progress.hpp"

namespace dsa {

namespace {

Tensor random_tensor(Shape shape, std::mt19937_64& rng, const char* name) {
  Tensor t = make_tensor(DType::f32, std::move(shape), name);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  float* p = mutable_data<float>(t);
  for (int64_t i = 0; i < t.numel(); ++i) p[i] = normal(rng);
  return t;
}

struct Timing {
  int64_t repeats = 0;
  double seconds = 0;
};

// The kernels timed, each for its budget: the progress counts microseconds of the budgets.
constexpr int64_t kKernels = 4;

int64_t budget_us(double budget) {
  return std::max<int64_t>(1, std::llround(budget * 1e6));
}

// One untimed run (caches, page faults), then repeats until `budget` seconds have passed.
Timing time_repeats(const std::function<void()>& run, double budget, detail::Progress& progress) {
  run();
  Timing timing;
  const Stopwatch watch;
  const int64_t share = budget_us(budget);
  int64_t counted = 0;
  do {
    run();
    ++timing.repeats;
    timing.seconds = watch.seconds();
    const int64_t spent = std::min<int64_t>(share, std::llround(timing.seconds * 1e6));
    progress.advance(spent - counted);
    counted = spent;
  } while (timing.seconds < budget);
  progress.advance(share - counted);
  return timing;
}

}  // namespace

Calibration calibrate(double seconds) {
  Calibration c;
  c.device = "cpu";
  c.measurements = nlohmann::json::object();
  std::mt19937_64 rng(2025);
  const AttentionSink discard = [](const AttentionBlock&) {};
  // The kernels' own calls report nothing inside this stage.
  detail::Progress progress("calibrate", kKernels * budget_us(seconds), "");

  // Main attention in MQA mode (MLA's latent layout), causal prefill; the FLOPs counted as the
  // cost model counts them: 2·H·(d_qk + d_v) per visible key.
  const int64_t L = 512, H = 16, d_qk = 576, d_v = 512, k = 128;
  const Tensor q = random_tensor({L, H, d_qk}, rng, "calibration q");
  const Tensor kv = random_tensor({L, d_qk}, rng, "calibration kv");
  const AttentionInputs attention = make_mqa_inputs(q, kv, d_v);
  const float scale = default_scale(d_qk);
  double visible = 0, selected = 0;
  for (int64_t t = 0; t < L; ++t) {
    visible += static_cast<double>(t + 1);
    selected += static_cast<double>(std::min(t + 1, k));
  }
  const double per_key = 2.0 * static_cast<double>(H * (d_qk + d_v));
  const Timing dense =
      time_repeats([&] { dense_attention(attention, scale, discard, nullptr); }, seconds, progress);
  c.attention_tflops =
      per_key * visible * static_cast<double>(dense.repeats) / dense.seconds / 1e12;
  c.measurements["dense_attention"] = {
      {"kernel", "dense_attention (MQA mode, causal prefill)"},
      {"shape", {{"L", L}, {"H", H}, {"d_qk", d_qk}, {"d_v", d_v}}},
      {"flops", per_key * visible},
      {"repeats", dense.repeats},
      {"seconds", dense.seconds},
      {"tflops", c.attention_tflops}};

  // Sparse attention over the last min(t + 1, k) positions of each row (a valid selection; the
  // kernel's cost does not depend on which entries are selected).
  Tensor indices = make_tensor(DType::i32, {L, k}, "calibration indices");
  int32_t* idx = mutable_data<int32_t>(indices);
  for (int64_t t = 0; t < L; ++t) {
    for (int64_t j = 0; j < k; ++j) idx[t * k + j] = j <= t ? static_cast<int32_t>(t - j) : -1;
  }
  const Timing sparse = time_repeats(
      [&] { sparse_attention(attention, indices, scale, discard, nullptr); }, seconds, progress);
  c.sparse_attention_tflops =
      per_key * selected * static_cast<double>(sparse.repeats) / sparse.seconds / 1e12;
  c.measurements["sparse_attention"] = {
      {"kernel", "sparse_attention (MQA mode, k selected entries per row)"},
      {"shape", {{"L", L}, {"H", H}, {"d_qk", d_qk}, {"d_v", d_v}, {"k", k}}},
      {"flops", per_key * selected},
      {"repeats", sparse.repeats},
      {"seconds", sparse.seconds},
      {"tflops", c.sparse_attention_tflops}};

  // The indexer (Eq. 1) at DeepSeek-V3.2's sizes, decode-like: the last Lq of Lk positions,
  // fp8 arithmetic; 2·H_I·d_I FLOPs per visible key.
  const int64_t Lk = 4096, Lq = 64, H_I = 64, d_I = 128, block = 16;
  const Tensor q_index = random_tensor({Lq, H_I, d_I}, rng, "calibration q_index");
  const Tensor k_index = random_tensor({Lk, d_I}, rng, "calibration k_index");
  const Tensor weights = random_tensor({Lq, H_I}, rng, "calibration weights");
  IndexerConfig config;
  config.precision = Precision::fp8;
  const IndexerInputs indexer = make_indexer_inputs(q_index, k_index, weights, config);
  const IndexerKernel kernel(indexer, config, 0);
  std::vector<float> scores(static_cast<std::size_t>(Lq * Lk));
  double indexer_keys = 0;
  for (int64_t r = 0; r < Lq; ++r) indexer_keys += static_cast<double>(indexer.position(r) + 1);
  const double indexer_flops = 2.0 * static_cast<double>(H_I * d_I) * indexer_keys;
  const Timing scored = time_repeats(
      [&] {
#pragma omp parallel for schedule(dynamic, 1)
        for (int64_t r0 = 0; r0 < Lq; r0 += block) {
          kernel.score_rows(r0, std::min(block, Lq - r0), scores.data() + r0 * Lk, Lk);
        }
      },
      seconds, progress);
  c.indexer_tflops = indexer_flops * static_cast<double>(scored.repeats) / scored.seconds / 1e12;
  c.measurements["indexer"] = {{"kernel", "IndexerKernel::score_rows (fp8, decode-like rows)"},
                               {"shape", {{"Lq", Lq}, {"Lk", Lk}, {"H_I", H_I}, {"d_I", d_I}}},
                               {"flops", indexer_flops},
                               {"repeats", scored.repeats},
                               {"seconds", scored.seconds},
                               {"tflops", c.indexer_tflops}};

  // Memory: a parallel copy of 128 MiB, far beyond the caches; read + write bytes counted.
  const std::size_t size = std::size_t{128} << 20, pieces = 64, piece = size / pieces;
  std::vector<char> from(size, 1), to(size, 0);
  const Timing copied = time_repeats(
      [&] {
#pragma omp parallel for schedule(static)
        for (std::size_t i = 0; i < pieces; ++i) {
          std::memcpy(to.data() + i * piece, from.data() + i * piece, piece);
        }
      },
      seconds, progress);
  c.memory_tb_s =
      2.0 * static_cast<double>(size) * static_cast<double>(copied.repeats) / copied.seconds / 1e12;
  c.measurements["memory"] = {{"kernel", "parallel memcpy"},
                              {"bytes", 2.0 * static_cast<double>(size)},
                              {"repeats", copied.repeats},
                              {"seconds", copied.seconds},
                              {"tb_s", c.memory_tb_s}};
  c.measurements["threads"] = max_threads();
  return c;
}

HardwareSpec calibrated_hardware(const HardwareSpec& hardware, const Calibration& calibration) {
  HardwareSpec h = hardware;
  h.name = fmt::format("{} (calibrated; price of {})", calibration.device, hardware.name);
  h.bf16_tflops = calibration.attention_tflops;
  h.fp8_tflops = calibration.indexer_tflops;
  h.memory_tb_s = calibration.memory_tb_s;
  h.compute_efficiency = 1;
  h.memory_efficiency = 1;
  h.source = fmt::format(
      "measured on this {} with the toolkit's kernels: bf16 rate = dense_attention, fp8 rate = "
      "the indexer's score_rows (f32 arithmetic on the CPU), bandwidth = a parallel memcpy; "
      "efficiencies 1 because the rates are achieved ones",
      calibration.device);
  return h;
}

nlohmann::json calibration_json(const Calibration& calibration) {
  return {{"calibrated", true},
          {"device", calibration.device},
          {"attention_tflops", calibration.attention_tflops},
          {"indexer_tflops", calibration.indexer_tflops},
          {"sparse_attention_tflops", calibration.sparse_attention_tflops},
          {"memory_tb_s", calibration.memory_tb_s},
          {"measurements", calibration.measurements},
          {"replaces",
           "bf16_tflops <- attention_tflops, fp8_tflops <- indexer_tflops, memory_tb_s <- "
           "memory_tb_s, compute_efficiency and memory_efficiency <- 1"}};
}

}  // namespace dsa
