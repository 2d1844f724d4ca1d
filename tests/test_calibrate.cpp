// Measured layers (calibrate.hpp, DESIGN.md section 3): the rows a measured prefill takes, the
// timing loop, each layer kind timed on the CPU as requested, and the measured curves: every
// stage scaled by its group's layers from what ran, the rest of the model the roofline's, the
// report's figures the same numbers. The GPU's time_layer is tested in test_cuda.cpp.
#include <gtest/gtest.h>

#include <cmath>
#include <utility>
#include <vector>

#include <fmt/format.h>

#include "../lib/src/backend.hpp"
#include "dsa/calibrate.hpp"
#include "dsa/cost.hpp"
#include "dsa/error.hpp"

namespace dsa {
namespace {

// DeepSeek-V3.2's structure at shapes the CPU times in milliseconds.
ModelSpec small_dsa() {
  ModelSpec m;
  m.name = "small-dsa";
  m.layers = 3;
  m.activated_params = 1e6;
  m.weight_precision = "fp8";
  m.heads = 4;
  m.d_qk_mha = 24;
  m.d_v_mha = 16;
  m.d_qk = 64;
  m.d_v = 48;
  m.kv_bytes = 2;
  m.indexer_heads = 4;
  m.indexer_dim = 32;
  m.indexer_key_bytes = 36;
  m.indexer_precision = "fp8";
  m.score_bytes = 4;
  m.topk = 16;
  return m;
}

ModelSpec small_dense() {
  ModelSpec m = small_dsa();
  m.name = "small-dense";
  m.indexer_heads = m.indexer_dim = 0;
  m.indexer_key_bytes = m.score_bytes = 0;
  m.topk = 0;
  return m;
}

// DeepSeek-V4's: SWA, CSA (ratio 4) and HCA (ratio 128) layers, K = V.
ModelSpec small_v4() {
  ModelSpec m = small_dsa();
  m.name = "small-v4";
  m.layers = 5;
  m.d_qk = m.d_v = m.d_qk_mha = m.d_v_mha = 64;
  m.topk = 8;
  m.compress_ratios = {0, 4, 128, 4, 128};
  m.window = 16;
  m.csa_ratio = 4;
  return m;
}

std::vector<std::string> stage_names(const LayerTiming& t) {
  std::vector<std::string> names;
  for (const auto& s : t.stages) names.push_back(s.stage);
  return names;
}

TEST(PrefillRows, CentreTheRowsOnThePosition) {
  EXPECT_EQ(prefill_rows(0, 8).first, 0);
  EXPECT_EQ(prefill_rows(0, 8).rows, 1);
  EXPECT_EQ(prefill_rows(2, 8).first, 0);  // 5 rows: positions 0 .. 4, mean 2
  EXPECT_EQ(prefill_rows(2, 8).rows, 5);
  EXPECT_EQ(prefill_rows(100, 8).first, 96);  // 96 .. 103, mean 99.5
  EXPECT_EQ(prefill_rows(100, 8).rows, 8);
  EXPECT_EQ(prefill_rows(100, 7).first, 97);  // 97 .. 103, mean 100
  EXPECT_EQ(prefill_rows(100, 1).first, 100);
}

TEST(TimeRuns, WarmsUpThenAveragesUntilTheBudget) {
  // A warm-up shorter than the budget, then runs until their seconds reach it.
  std::vector<double> seconds = {0.01, 0.02, 0.04, 0.06, 5.0};
  std::size_t next = 0;
  const auto run = [&](std::vector<TimedStage>& stages) {
    stages.push_back({"indexer", seconds.at(next) / 2});
    stages.push_back({"attention", seconds.at(next) / 2});
    ++next;
  };
  detail::RunTiming t = detail::time_runs(run, 0.1);
  EXPECT_EQ(t.repeats, 3);
  EXPECT_EQ(next, 4u);
  ASSERT_EQ(t.stages.size(), 2u);
  EXPECT_EQ(t.stages[0].stage, "indexer");
  EXPECT_NEAR(t.stages[0].seconds, 0.02, 1e-15);
  EXPECT_NEAR(t.stages[1].seconds, 0.02, 1e-15);
  // A first run as long as the budget is the measurement itself.
  seconds = {0.3, 1.0};
  next = 0;
  t = detail::time_runs(run, 0.1);
  EXPECT_EQ(t.repeats, 1);
  EXPECT_EQ(next, 1u);
  EXPECT_DOUBLE_EQ(t.stages[0].seconds + t.stages[1].seconds, 0.3);
}

TEST(TimeLayer, CpuRunsEachLayerKindAsRequested) {
  struct Case {
    ModelSpec model;
    LayerGroup group;
    const char* attention;
    std::vector<std::string> stages;
  };
  const std::vector<Case> cases = {
      {small_dense(), {LayerKind::mla, 0, 3}, "dense", {"attention"}},
      {small_dsa(), {LayerKind::mla, 0, 3}, "sparse", {"indexer", "topk", "attention"}},
      {small_v4(), {LayerKind::swa, 0, 1}, "window", {"attention"}},
      {small_v4(), {LayerKind::csa, 4, 2}, "window+selected", {"indexer", "topk", "attention"}},
      {small_v4(), {LayerKind::hca, 128, 2}, "window+all", {"attention"}}};
  for (const Case& c : cases) {
    for (const Phase phase : {Phase::prefill, Phase::decode}) {
      SCOPED_TRACE(fmt::format("{} {}", layer_kind_name(c.group.kind), phase_name(phase)));
      const LayerTimingRequest r = layer_timing_request(c.model, c.group, phase, 300, 3, 0.001);
      EXPECT_EQ(r.window, c.group.kind == LayerKind::mla ? 0 : 16);
      const LayerTiming t = time_layer(r, Device::cpu);
      EXPECT_EQ(t.first_position, phase == Phase::prefill ? 299 : 300);
      EXPECT_EQ(t.rows, phase == Phase::prefill ? 3 : 1);
      EXPECT_EQ(t.sequences, phase == Phase::prefill ? 1 : 3);
      EXPECT_EQ(t.attention, c.attention);
      EXPECT_EQ(t.cache, "f32");
      EXPECT_EQ(t.indexer, c.stages.size() > 1 ? "fp8" : "");
      EXPECT_EQ(stage_names(t), c.stages);
      EXPECT_GT(t.stages.back().seconds, 0);
      for (const auto& s : t.stages) EXPECT_GE(s.seconds, 0) << s.stage;
      EXPECT_GE(t.repeats, 1);
      EXPECT_GT(t.bytes, 0);
    }
  }
  // Where the model stores its cache in fp8 (kv_bytes < 2) the CPU reads the fp8 caches too:
  // V3.2's at 576/512, V4's at 512.
  ModelSpec v32 = small_dsa();
  v32.heads = 2;
  v32.d_qk = 576;
  v32.d_v = 512;
  v32.kv_bytes = 656.0 / 576.0;
  ModelSpec v4 = small_v4();
  v4.heads = 2;
  v4.d_qk = v4.d_v = 512;
  v4.kv_bytes = 584.0 / 512.0;
  for (const auto& [model, group] : {std::pair{v32, LayerGroup{LayerKind::mla, 0, 3}},
                                     {v4, LayerGroup{LayerKind::csa, 4, 2}},
                                     {v4, LayerGroup{LayerKind::hca, 128, 2}}}) {
    SCOPED_TRACE(layer_kind_name(group.kind));
    const LayerTimingRequest r = layer_timing_request(model, group, Phase::decode, 300, 2, 0.001);
    EXPECT_TRUE(r.fp8_cache);
    const LayerTiming t = time_layer(r, Device::cpu);
    EXPECT_EQ(t.cache, "fp8");
    EXPECT_GT(t.stages.back().seconds, 0);
  }
  // A CSA query at position 2 sees no complete entry: no indexer, the window alone.
  const LayerTiming early = time_layer(
      layer_timing_request(small_v4(), {LayerKind::csa, 4, 2}, Phase::decode, 2, 1, 0.001),
      Device::cpu);
  EXPECT_EQ(stage_names(early), std::vector<std::string>{"attention"});
  EXPECT_EQ(early.indexer, "");
}

TEST(TimeLayer, RejectsShapesItCannotTime) {
  const auto code = [](LayerTimingRequest r) {
    try {
      time_layer(r, Device::cpu);
    } catch (const Error& e) {
      return static_cast<int>(e.code());
    }
    return 0;
  };
  const LayerTimingRequest good =
      layer_timing_request(small_v4(), {LayerKind::csa, 4, 2}, Phase::prefill, 20, 2, 0.001);
  LayerTimingRequest r = good;
  r.d_v = r.d_qk + 1;
  EXPECT_EQ(code(r), 2);
  r = good;
  r.window = 0;
  EXPECT_EQ(code(r), 2);
  r = good;
  r.tokens = 0;
  EXPECT_EQ(code(r), 2);
  r = good;
  r.position = -1;
  EXPECT_EQ(code(r), 2);
  r = good;
  r.topk = 0;
  EXPECT_EQ(code(r), 2);
  r = good;
  r.fp8_cache = true;  // V4's fp8 cache holds 512-wide entries, not 64
  EXPECT_EQ(code(r), 2);
  r = good;
  r.compress_ratio = 8;  // the toolkit's CSA compresses 4 tokens
  EXPECT_EQ(code(r), 2);
  EXPECT_EQ(code(good), 0);
}

TEST(MeasureCurves, ScaleEachLayerByTheScheduleAndAddTheModelledRest) {
  const std::vector<ModelSpec> models = {small_dsa(), small_v4()};
  HardwareSpec hardware;
  hardware.name = "test";
  hardware.bf16_tflops = 1;
  hardware.fp8_tflops = 2;
  hardware.memory_tb_s = 0.1;
  hardware.price_per_gpu_hour = 2;
  Workload workload;
  workload.decode_batch = 2;
  workload.prefill_chunk = 3;
  const std::vector<int64_t> positions = {8, 300};
  const MeasuredCurves c =
      measure_curves(models, hardware, workload, positions, Device::cpu, 5, 0.001);
  EXPECT_EQ(c.device, "cpu");
  EXPECT_EQ(c.prefill_rows, 3);
  EXPECT_EQ(c.decode_sequences, 2);
  EXPECT_EQ(c.positions, positions);
  ASSERT_EQ(c.models.size(), 2u);
  const nlohmann::json j = measured_json(c);
  for (std::size_t m = 0; m < models.size(); ++m) {
    const std::vector<LayerGroup> schedule = layer_schedule(models[m]);
    EXPECT_EQ(c.models[m].name, models[m].name);
    ASSERT_EQ(c.models[m].points.size(), positions.size());
    for (std::size_t p = 0; p < positions.size(); ++p) {
      const MeasuredPoint& point = c.models[m].points[p];
      EXPECT_EQ(point.position, positions[p]);
      for (const Phase phase : {Phase::prefill, Phase::decode}) {
        SCOPED_TRACE(fmt::format("{} at {} {}", models[m].name, point.position, phase_name(phase)));
        const MeasuredToken& t = phase == Phase::prefill ? point.prefill : point.decode;
        const TokenCost modelled = token_cost(models[m], hardware, workload, phase, point.position);
        ASSERT_EQ(t.runs.size(), schedule.size());
        double sum = 0;
        std::size_t s = 0;
        for (std::size_t g = 0; g < schedule.size(); ++g) {
          const LayerTiming& run = t.runs[g].timing;
          EXPECT_EQ(t.runs[g].layers.count, schedule[g].count);
          EXPECT_EQ(run.rows * run.sequences, phase == Phase::prefill ? 3 : 2);
          for (const TimedStage& ran : run.stages) {
            ASSERT_LT(s, t.stages.size());
            const MeasuredStage& stage = t.stages[s++];
            EXPECT_EQ(stage.stage, ran.stage);
            EXPECT_EQ(stage.layers.kind, schedule[g].kind);
            EXPECT_DOUBLE_EQ(stage.seconds, ran.seconds * static_cast<double>(schedule[g].count) /
                                                static_cast<double>(run.rows * run.sequences));
            sum += stage.seconds;
            // The roofline's figure of the same stage of the same layers.
            double expected = -1;
            for (const StageCost& mc : modelled.stages) {
              if (mc.stage == ran.stage && mc.layers.kind == schedule[g].kind &&
                  mc.layers.compress_ratio == schedule[g].compress_ratio && mc.layers.count > 0)
                expected = mc.seconds;
            }
            EXPECT_EQ(stage.modelled_seconds, expected);
          }
        }
        EXPECT_EQ(s, t.stages.size());
        EXPECT_EQ(t.rest_seconds, modelled.stages.back().seconds);
        EXPECT_EQ(modelled.stages.back().stage, "rest");
        EXPECT_NEAR(t.seconds, sum + t.rest_seconds, 1e-15 * t.seconds);
        EXPECT_EQ(t.modelled_seconds, modelled.seconds);
        EXPECT_DOUBLE_EQ(t.usd_per_million, t.seconds * 2 / 3600 * 1e6);
        const auto& jt = j["models"][m]["points"][p][phase_name(phase)];
        EXPECT_EQ(jt["seconds"].get<double>(), t.seconds);
        EXPECT_EQ(jt["runs"].size(), schedule.size());
        EXPECT_EQ(jt["stages"].size(), t.stages.size());
        EXPECT_NEAR(jt["attention_seconds"].get<double>(), sum, 1e-15 * sum);
      }
    }
  }
  EXPECT_EQ(measured_summary_lines(c).size(), 2u);
  EXPECT_EQ(j["positions"], nlohmann::json(positions));

  for (const std::vector<int64_t>& bad :
       {std::vector<int64_t>{}, {300, 8}, {8, 8}, {-1}, {kMaxCostPosition + 1}}) {
    EXPECT_THROW(measure_curves(models, hardware, workload, bad, Device::cpu, 5, 0.001), Error);
  }
  EXPECT_THROW(measure_curves(models, hardware, workload, positions, Device::cpu, 0, 0.001), Error);
}

TEST(MeasureCurves, DefaultPositionsAreQuartersOfQuarters) {
  EXPECT_EQ(default_measured_positions(131072), (std::vector<int64_t>{2048, 8192, 32768, 131072}));
  EXPECT_EQ(default_measured_positions(20), (std::vector<int64_t>{1, 5, 20}));
  EXPECT_EQ(default_measured_positions(1), (std::vector<int64_t>{1}));
}

}  // namespace
}  // namespace dsa
