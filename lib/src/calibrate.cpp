// --calibrate: this machine's achieved rates, measured with the toolkit's own kernels on small
// random problems, to replace a preset's datasheet rates in the cost model; and the models'
// layers measured at chosen positions beside the roofline's curves (DESIGN.md §3).
#include "dsa/calibrate.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <random>
#include <vector>

#include <fmt/format.h>

#include "dsa/attention.hpp"
#include "dsa/error.hpp"
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

std::vector<int64_t> default_measured_positions(int64_t max_context) {
  std::vector<int64_t> positions;
  for (const int64_t divisor : {64, 16, 4, 1}) {
    const int64_t x = max_context / divisor;
    if (x >= 1 && (positions.empty() || positions.back() < x)) positions.push_back(x);
  }
  return positions;
}

namespace {

double usd_per_million(double seconds, const HardwareSpec& hardware) {
  return seconds * hardware.price_per_gpu_hour / 3600.0 * 1e6;
}

bool same_layers(const LayerGroup& a, const LayerGroup& b) {
  return a.kind == b.kind && a.compress_ratio == b.compress_ratio;
}

}  // namespace

void check_measured_positions(const std::vector<int64_t>& positions) {
  if (positions.empty()) fail(ExitCode::usage, "no positions to measure");
  for (std::size_t i = 0; i < positions.size(); ++i) {
    if (positions[i] < 0 || positions[i] > kMaxCostPosition) {
      fail(ExitCode::usage, "position {} is outside 0 .. {}", positions[i], kMaxCostPosition);
    }
    if (i > 0 && positions[i] <= positions[i - 1]) {
      fail(ExitCode::usage, "positions must ascend, each once: {} follows {}", positions[i],
           positions[i - 1]);
    }
  }
}

MeasuredCurves measure_curves(const std::vector<ModelSpec>& models, const HardwareSpec& hardware,
                              const Workload& workload, const std::vector<int64_t>& positions,
                              Device device, int64_t tokens, double seconds) {
  check_measured_positions(positions);
  if (tokens < 1) fail(ExitCode::usage, "measured tokens must be >= 1, got {}", tokens);
  MeasuredCurves c;
  c.device = device_description(device);
  c.prefill_rows = std::min(tokens, workload.prefill_chunk);
  c.decode_sequences = std::min(tokens, workload.decode_batch);
  c.seconds = seconds;
  c.positions = positions;
  int64_t timings = 0;
  for (const ModelSpec& m : models) {
    timings += 2 * static_cast<int64_t>(layer_schedule(m).size() * positions.size());
  }
  detail::Progress progress("measure", timings, "layers");
  for (const ModelSpec& model : models) {
    const std::vector<LayerGroup> schedule = layer_schedule(model);
    MeasuredModel measured{model.name, {}};
    for (const int64_t x : positions) {
      MeasuredPoint point;
      point.position = x;
      for (const Phase phase : {Phase::prefill, Phase::decode}) {
        const bool prefill = phase == Phase::prefill;
        MeasuredToken& token = prefill ? point.prefill : point.decode;
        const TokenCost modelled = token_cost(model, hardware, workload, phase, x);
        for (const LayerGroup& group : schedule) {
          const LayerTiming run = time_layer(
              layer_timing_request(model, group, phase, x,
                                   prefill ? c.prefill_rows : c.decode_sequences, seconds),
              device);
          progress.advance(1);
          const double per_token =
              static_cast<double>(group.count) / static_cast<double>(run.rows * run.sequences);
          for (const TimedStage& stage : run.stages) {
            MeasuredStage s{stage.stage, group, stage.seconds * per_token, 0, ""};
            for (const StageCost& m : modelled.stages) {
              if (m.stage == stage.stage && m.layers.count > 0 && same_layers(m.layers, group)) {
                s.modelled_seconds = m.seconds;
                s.modelled_mode = m.mode;
              }
            }
            token.seconds += s.seconds;
            token.stages.push_back(s);
          }
          token.runs.push_back({group, run});
        }
        for (const StageCost& m : modelled.stages) {
          if (m.stage == "rest") token.rest_seconds = m.seconds;
        }
        token.seconds += token.rest_seconds;
        token.modelled_seconds = modelled.seconds;
        token.usd_per_million = usd_per_million(token.seconds, hardware);
        token.modelled_usd_per_million = modelled.usd_per_million;
      }
      measured.points.push_back(std::move(point));
    }
    c.models.push_back(std::move(measured));
  }
  return c;
}

namespace {

nlohmann::json ratio_json(double measured, double modelled) {
  return modelled > 0 ? nlohmann::json(measured / modelled) : nlohmann::json();
}

nlohmann::json measured_token_json(const MeasuredToken& t) {
  nlohmann::json stages = nlohmann::json::array(), runs = nlohmann::json::array();
  double attention = 0, modelled_attention = 0;
  for (const MeasuredStage& s : t.stages) {
    nlohmann::json j = {{"stage", s.stage}};
    add_layer_group(j, s.layers);
    j["seconds"] = s.seconds;
    j["modelled_seconds"] = s.modelled_seconds;
    j["measured_over_modelled"] = ratio_json(s.seconds, s.modelled_seconds);
    if (s.stage == "attention") {
      j["mode"] = "mqa";
      if (!s.modelled_mode.empty()) j["modelled_mode"] = s.modelled_mode;
    }
    stages.push_back(j);
    attention += s.seconds;
    modelled_attention += s.modelled_seconds;
  }
  for (const MeasuredRun& run : t.runs) {
    const LayerTiming& r = run.timing;
    nlohmann::json times = nlohmann::json::array();
    for (const TimedStage& s : r.stages)
      times.push_back({{"stage", s.stage}, {"seconds", s.seconds}});
    nlohmann::json j = nlohmann::json::object();
    add_layer_group(j, run.layers);
    j.update(nlohmann::json{
        {"first_position", r.first_position},
        {"rows", r.rows},
        {"sequences", r.sequences},
        {"attention", r.attention},
        {"cache", r.cache},
        {"indexer", r.indexer.empty() ? nlohmann::json() : nlohmann::json(r.indexer)},
        {"fused_topk", r.fused_topk},
        {"repeats", r.repeats},
        {"bytes", r.bytes},
        {"stages", times}});
    runs.push_back(j);
  }
  return {{"seconds", t.seconds},
          {"usd_per_million_tokens", t.usd_per_million},
          {"modelled_seconds", t.modelled_seconds},
          {"modelled_usd_per_million_tokens", t.modelled_usd_per_million},
          {"measured_over_modelled", ratio_json(t.seconds, t.modelled_seconds)},
          {"attention_seconds", attention},
          {"modelled_attention_seconds", modelled_attention},
          {"attention_measured_over_modelled", ratio_json(attention, modelled_attention)},
          {"rest_seconds", t.rest_seconds},
          {"stages", stages},
          {"runs", runs}};
}

}  // namespace

nlohmann::json measured_json(const MeasuredCurves& c) {
  nlohmann::json models = nlohmann::json::array();
  for (const MeasuredModel& m : c.models) {
    nlohmann::json points = nlohmann::json::array();
    for (const MeasuredPoint& p : m.points) {
      points.push_back({{"position", p.position},
                        {"prefill", measured_token_json(p.prefill)},
                        {"decode", measured_token_json(p.decode)}});
    }
    models.push_back({{"name", m.name}, {"points", points}});
  }
  return {{"device", c.device},
          {"prefill_rows", c.prefill_rows},
          {"decode_sequences", c.decode_sequences},
          {"seconds", c.seconds},
          {"positions", c.positions},
          {"about",
           "each model's attention layers timed with the toolkit's kernels on this device (random "
           "inputs of the model's shapes, MQA mode), per token, times the layers of each group of "
           "the schedule; the rest of the model is the roofline's (no toolkit kernel computes "
           "it); modelled_* are the roofline's values for the same token"},
          {"models", models}};
}

std::vector<std::string> measured_summary_lines(const MeasuredCurves& c) {
  std::vector<std::string> lines;
  for (const MeasuredModel& m : c.models) {
    const MeasuredPoint& p = m.points.back();
    const auto phase = [](const char* name, const MeasuredToken& t) {
      double attention = 0, modelled = 0;
      for (const MeasuredStage& s : t.stages) {
        attention += s.seconds;
        modelled += s.modelled_seconds;
      }
      return fmt::format("{} attention {:.4g} ms per token measured vs {:.4g} modelled ({:.2f}x)",
                         name, attention * 1e3, modelled * 1e3,
                         modelled > 0 ? attention / modelled : 0.0);
    };
    lines.push_back(fmt::format("measured on {}: {} at {}: {}; {}", c.device, m.name, p.position,
                                phase("prefill", p.prefill), phase("decode", p.decode)));
  }
  return lines;
}

}  // namespace dsa
