// The cost model of DESIGN.md section 3 against hand-computed counts, its properties
// (monotone, dense = DSA below k without an indexer, the crossover), the preset loader and
// --set, and dsa-cost as a user runs it (JSON and CSV agree, the SVG is XML).
#include <gtest/gtest.h>

#include <sys/wait.h>
#include "temp_dir.hpp"

#include <unistd.h>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>

#include <nlohmann/json.hpp>

#include "dsa/calibrate.hpp"
#include "dsa/cost.hpp"
#include "dsa/error.hpp"

namespace dsa {
namespace {

namespace fs = std::filesystem;

const PresetLibrary kPresets{fs::path(DSA_TESTS_DIR) / ".." / "data" / "presets"};

// 2 layers, 2 heads; numbers small enough to count by hand.
ModelSpec tiny_dsa() {
  ModelSpec m;
  m.name = "tiny-dsa";
  m.layers = 2;
  m.activated_params = 1000;
  m.weight_bytes = 1;
  m.weight_precision = "fp8";
  m.heads = 2;
  m.d_qk_mha = 3;
  m.d_v_mha = 2;
  m.d_qk = 5;
  m.d_v = 4;
  m.kv_bytes = 2;
  m.indexer_heads = 3;
  m.indexer_dim = 4;
  m.indexer_key_bytes = 6;
  m.indexer_precision = "fp8";
  m.score_bytes = 4;
  m.topk = 8;
  m.short_prefill_mha = true;
  return m;
}

ModelSpec tiny_dense() {
  ModelSpec m = tiny_dsa();
  m.name = "tiny-dense";
  m.indexer_heads = m.indexer_dim = 0;
  m.indexer_key_bytes = m.score_bytes = 0;
  m.topk = 0;
  m.short_prefill_mha = false;
  return m;
}

// 2e12 FLOP/s bf16, 4e12 fp8, at efficiency 0.5; 1e12 B/s at 0.25; $1 per second.
HardwareSpec tiny_hardware() {
  HardwareSpec h;
  h.name = "tiny";
  h.bf16_tflops = 2;
  h.fp8_tflops = 4;
  h.memory_tb_s = 1;
  h.price_per_gpu_hour = 3600;
  h.compute_efficiency = 0.5;
  h.memory_efficiency = 0.25;
  return h;
}

const Workload kTinyWorkload{4, 10};  // decode batch 4, prefill chunk 10

void expect_close(double actual, double expected) {
  EXPECT_NEAR(actual, expected, 1e-12 * std::abs(expected)) << "expected " << expected;
}

void expect_stage(const StageCost& s, const char* stage, const char* mode, double flops,
                  double bytes, double compute_seconds, double memory_seconds) {
  SCOPED_TRACE(stage);
  EXPECT_EQ(s.stage, stage);
  EXPECT_EQ(s.mode, mode);
  expect_close(s.flops, flops);
  expect_close(s.bytes, bytes);
  expect_close(s.compute_seconds, compute_seconds);
  expect_close(s.memory_seconds, memory_seconds);
  expect_close(s.seconds, std::max(compute_seconds, memory_seconds));
}

TEST(TokenCost, DecodeCountsByHand) {
  const TokenCost c = token_cost(tiny_dsa(), tiny_hardware(), kTinyWorkload, Phase::decode, 20);
  ASSERT_EQ(c.stages.size(), 4u);
  // indexer: 2 L H_I d_I x = 2*2*3*4*20 FLOPs at 2e12/s; L x 6 bytes at 2.5e11/s.
  expect_stage(c.stages[0], "indexer", "", 960, 240, 4.8e-10, 9.6e-10);
  EXPECT_EQ(c.stages[0].precision, "fp8");
  expect_stage(c.stages[1], "topk", "", 0, 160, 0, 6.4e-10);  // L x 4 bytes
  // sparse MQA over k = 8: 2 L H (5 + 4) 8 FLOPs at 1e12/s; L 8 5 2 bytes per token.
  expect_stage(c.stages[2], "attention", "mqa", 576, 160, 5.76e-10, 6.4e-10);
  EXPECT_EQ(c.stages[2].precision, "bf16");
  // rest: 2 P FLOPs at fp8; P bytes shared by the batch of 4.
  expect_stage(c.stages[3], "rest", "", 2000, 250, 1e-9, 1e-9);
  expect_close(c.seconds, 3.24e-9);
  expect_close(c.usd_per_million, 3.24e-3);  // $1 per second

  const TokenCost d = token_cost(tiny_dense(), tiny_hardware(), kTinyWorkload, Phase::decode, 20);
  ASSERT_EQ(d.stages.size(), 2u);
  expect_stage(d.stages[0], "attention", "mqa", 1440, 400, 1.44e-9, 1.6e-9);  // all 20 keys
  expect_close(d.seconds, 2.6e-9);
}

TEST(TokenCost, PrefillCountsByHand) {
  const TokenCost c = token_cost(tiny_dsa(), tiny_hardware(), kTinyWorkload, Phase::prefill, 20);
  ASSERT_EQ(c.stages.size(), 4u);
  expect_stage(c.stages[0], "indexer", "", 960, 24, 4.8e-10, 9.6e-11);  // keys / chunk
  expect_stage(c.stages[1], "topk", "", 0, 160, 0, 6.4e-10);
  // Sparse MQA (6.4e-10 s) beats masked MHA over 20 keys (2 L H (3 + 2) 20 = 800 FLOPs,
  // 8e-10 s); the sparse entries are read per token, not shared by the chunk.
  expect_stage(c.stages[2], "attention", "mqa", 576, 160, 5.76e-10, 6.4e-10);
  expect_stage(c.stages[3], "rest", "", 2000, 100, 1e-9, 4e-10);  // weights / chunk
  expect_close(c.seconds, 2.76e-9);

  // At x = 4 masked MHA (160 FLOPs, 1.6e-10 s) beats sparse MQA (3.2e-10 s).
  const TokenCost s = token_cost(tiny_dsa(), tiny_hardware(), kTinyWorkload, Phase::prefill, 4);
  expect_stage(s.stages[2], "attention", "mha", 160, 8, 1.6e-10, 3.2e-11);
  ModelSpec no_mha = tiny_dsa();
  no_mha.short_prefill_mha = false;
  const TokenCost m = token_cost(no_mha, tiny_hardware(), kTinyWorkload, Phase::prefill, 4);
  expect_stage(m.stages[2], "attention", "mqa", 288, 80, 2.88e-10, 3.2e-10);

  const TokenCost d = token_cost(tiny_dense(), tiny_hardware(), kTinyWorkload, Phase::prefill, 20);
  ASSERT_EQ(d.stages.size(), 2u);
  expect_stage(d.stages[0], "attention", "mha", 800, 40, 8e-10, 1.6e-10);
}

TEST(TokenCost, PositionZeroCostsOnlyTheRest) {
  for (const Phase phase : {Phase::prefill, Phase::decode}) {
    const TokenCost c = token_cost(tiny_dsa(), tiny_hardware(), kTinyWorkload, phase, 0);
    for (const auto& s : c.stages) {
      if (s.stage != "rest") EXPECT_EQ(s.seconds, 0) << s.stage;
    }
  }
}

TEST(TokenCost, MonotoneInPositionAndDenseProportional) {
  const HardwareSpec h = load_hardware(kPresets, "H800");
  const ModelSpec dense = load_model(kPresets, "DeepSeek-V3.1-Terminus");
  const ModelSpec dsa = load_model(kPresets, "DeepSeek-V3.2-Exp");
  const Workload w;
  for (const Phase phase : {Phase::prefill, Phase::decode}) {
    for (const ModelSpec* model : {&dense, &dsa}) {
      TokenCost previous = token_cost(*model, h, w, phase, 0);
      for (int64_t x = 1; x <= 131072; x += 997) {
        const TokenCost c = token_cost(*model, h, w, phase, x);
        EXPECT_GE(c.seconds, previous.seconds) << phase_name(phase) << " " << model->name << x;
        for (std::size_t i = 0; i < c.stages.size(); ++i) {
          if (c.stages[i].mode != previous.stages[i].mode) continue;  // MHA -> MQA switch
          EXPECT_GE(c.stages[i].flops, previous.stages[i].flops);
          EXPECT_GE(c.stages[i].bytes, previous.stages[i].bytes);
        }
        previous = c;
      }
    }
    // Dense attention per token grows in proportion to the position.
    const double a = token_cost(dense, h, w, phase, 65536).stages[0].seconds;
    const double b = token_cost(dense, h, w, phase, 131072).stages[0].seconds;
    expect_close(b, 2 * a);
  }
}

TEST(TokenCost, DenseEqualsDsaBelowKWithoutIndexer) {
  ModelSpec dsa = tiny_dsa();
  dsa.indexer_heads = 0;
  dsa.indexer_key_bytes = dsa.score_bytes = 0;
  for (const Phase phase : {Phase::prefill, Phase::decode}) {
    for (int64_t x = 0; x <= dsa.topk; ++x) {
      EXPECT_DOUBLE_EQ(token_cost(dsa, tiny_hardware(), kTinyWorkload, phase, x).seconds,
                       token_cost(tiny_dense(), tiny_hardware(), kTinyWorkload, phase, x).seconds)
          << phase_name(phase) << " x=" << x;
    }
  }
  // The same on the presets, the indexer zeroed through --set.
  HardwareSpec h = load_hardware(kPresets, "H800");
  ModelSpec dense = load_model(kPresets, "DeepSeek-V3.1-Terminus");
  ModelSpec v32 = load_model(kPresets, "DeepSeek-V3.2-Exp");
  for (const char* s : {"dsa.indexer_heads=0", "dsa.indexer_key_bytes=0", "dsa.score_bytes=0",
                        "dsa.activated_params=37e9"}) {
    apply_override(s, h, dense, v32);
  }
  for (const Phase phase : {Phase::prefill, Phase::decode}) {
    for (const int64_t x : {0, 1, 100, 1024, 2047, 2048}) {
      EXPECT_DOUBLE_EQ(token_cost(v32, h, Workload{}, phase, x).seconds,
                       token_cost(dense, h, Workload{}, phase, x).seconds);
    }
    EXPECT_LT(token_cost(v32, h, Workload{}, phase, 65536).seconds,
              token_cost(dense, h, Workload{}, phase, 65536).seconds);
  }
}

// The crossover by its definition, position by position.
std::optional<int64_t> brute_crossover(const ModelSpec& dense, const ModelSpec& dsa,
                                       const HardwareSpec& h, const Workload& w, Phase phase,
                                       int64_t max_position) {
  std::optional<int64_t> last_costlier;
  for (int64_t x = 0; x <= max_position; ++x) {
    if (token_cost(dsa, h, w, phase, x).seconds > token_cost(dense, h, w, phase, x).seconds)
      last_costlier = x;
  }
  if (!last_costlier) return 0;
  if (*last_costlier == max_position) return std::nullopt;
  return *last_costlier + 1;
}

TEST(CostCurves, CrossoverMatchesDefinition) {
  const HardwareSpec h = tiny_hardware();
  // The tiny indexer reads as many bytes per key as dense decode attention: lighten it so that
  // DSA wins at long contexts: decode from x = 14 (0.64 ns + 0.032 ns x against 0.08 ns x),
  // prefill from x = 80 (0.64 ns + 0.032 ns x against 0.04 ns x; equal there).
  ModelSpec light = tiny_dsa();
  light.indexer_key_bytes = light.score_bytes = 1;
  const CostCurves curves = cost_curves(tiny_dense(), light, h, kTinyWorkload, 200, 7);
  for (const Phase phase : {Phase::prefill, Phase::decode}) {
    const PhaseSummary& s = phase == Phase::prefill ? curves.prefill : curves.decode;
    EXPECT_EQ(s.dsa_costlier_below,
              brute_crossover(tiny_dense(), light, h, kTinyWorkload, phase, 200))
        << phase_name(phase);
    ASSERT_TRUE(s.dsa_costlier_below.has_value());
    EXPECT_EQ(*s.dsa_costlier_below, phase == Phase::prefill ? 80 : 14);
    EXPECT_EQ(s.max_position, 200);
    EXPECT_GT(s.dense_over_dsa, 1);
  }
  // Positions 0, 7, ..., 196 and then 200.
  ASSERT_EQ(curves.points.size(), 30u);
  EXPECT_EQ(curves.points[1].position, 7);
  EXPECT_EQ(curves.points.back().position, 200);

  // Short contexts: DSA costs more everywhere, so there is no crossover.
  const CostCurves short_curves = cost_curves(tiny_dense(), tiny_dsa(), h, kTinyWorkload, 5, 1);
  EXPECT_FALSE(short_curves.decode.dsa_costlier_below.has_value());
  EXPECT_LT(short_curves.decode.dense_over_dsa, 1);
  // Without an indexer DSA never costs more: the crossover is 0.
  ModelSpec free = tiny_dsa();
  free.indexer_heads = 0;
  free.indexer_key_bytes = free.score_bytes = 0;
  const CostCurves free_curves = cost_curves(tiny_dense(), free, h, kTinyWorkload, 100, 10);
  EXPECT_EQ(free_curves.prefill.dsa_costlier_below, 0);
  EXPECT_EQ(free_curves.decode.dsa_costlier_below, 0);
}

TEST(CostCurves, DefaultsHaveTheShapeOfTheFigure) {
  const HardwareSpec h = load_hardware(kPresets, "H800");
  const CostCurves c =
      cost_curves(load_model(kPresets, "DeepSeek-V3.1-Terminus"),
                  load_model(kPresets, "DeepSeek-V3.2-Exp"), h, Workload{}, 131072, 4096);
  for (const PhaseSummary* s : {&c.prefill, &c.decode}) {
    ASSERT_TRUE(s->dsa_costlier_below.has_value());
    EXPECT_GT(*s->dsa_costlier_below, 2048);
    EXPECT_LT(*s->dsa_costlier_below, 16384);
    EXPECT_GT(s->dense_over_dsa, 3);
  }
  // DSA's growth from 64K to 128K is a small fraction of dense's.
  const CostPoint& mid = c.points[16];
  const CostPoint& end = c.points.back();
  ASSERT_EQ(mid.position, 65536);
  EXPECT_LT(end.decode_dsa.usd_per_million - mid.decode_dsa.usd_per_million,
            0.2 * (end.decode_dense.usd_per_million - mid.decode_dense.usd_per_million));
  EXPECT_LT(end.prefill_dsa.usd_per_million - mid.prefill_dsa.usd_per_million,
            0.2 * (end.prefill_dense.usd_per_million - mid.prefill_dense.usd_per_million));
}

TEST(CostCurves, RejectsBadRanges) {
  const auto code = [](auto&& f) {
    try {
      f();
    } catch (const Error& e) {
      return e.code();
    }
    return ExitCode::ok;
  };
  const HardwareSpec h = tiny_hardware();
  EXPECT_EQ(code([&] { cost_curves(tiny_dense(), tiny_dsa(), h, kTinyWorkload, 0, 1); }),
            ExitCode::usage);
  EXPECT_EQ(code([&] { cost_curves(tiny_dense(), tiny_dsa(), h, kTinyWorkload, 10, 0); }),
            ExitCode::usage);
  EXPECT_EQ(code([&] {
              cost_curves(tiny_dense(), tiny_dsa(), h, Workload{0, 1}, 10, 1);
            }),
            ExitCode::usage);
}

// ---------------------------------------------------------------------------------------------
// Presets, files and --set.

class Specs : public test::TempDirTest {
 protected:
  std::string write(const std::string& name, const std::string& text) const {
    std::ofstream(dir_ / name) << text;
    return (dir_ / name).string();
  }

  // The error's code and message of f(), or ok.
  template <typename F>
  std::pair<ExitCode, std::string> error_of(F&& f) const {
    try {
      f();
    } catch (const Error& e) {
      return {e.code(), e.what()};
    }
    return {ExitCode::ok, ""};
  }
};

TEST_F(Specs, PresetsLoadAndRoundTrip) {
  EXPECT_EQ(preset_names(kPresets, "hardware"), (std::vector<std::string>{"H800", "H100", "H200"}));
  EXPECT_EQ(preset_names(kPresets, "models"),
            (std::vector<std::string>{"DeepSeek-V3.1-Terminus", "DeepSeek-V3.2-Exp"}));
  const HardwareSpec h800 = load_hardware(kPresets, "h800");  // names match in any case
  EXPECT_EQ(h800.name, "H800");
  EXPECT_EQ(h800.price_per_gpu_hour, 2.0);
  EXPECT_EQ(h800.bf16_tflops, 989);
  EXPECT_EQ(h800.fp8_tflops, 1979);
  EXPECT_EQ(h800.memory_tb_s, 3.35);
  EXPECT_EQ(load_hardware(kPresets, "H200").memory_tb_s, 4.8);
  for (const auto& name : preset_names(kPresets, "hardware")) {
    EXPECT_FALSE(load_hardware(kPresets, name).source.empty());
    EXPECT_FALSE(load_hardware(kPresets, name).price_source.empty());
  }
  const ModelSpec v32 = load_model(kPresets, "DeepSeek-V3.2-Exp");
  EXPECT_EQ(v32.indexer_heads, 64);
  EXPECT_EQ(v32.indexer_dim, 128);
  EXPECT_EQ(v32.topk, 2048);
  EXPECT_EQ(load_model(kPresets, "DeepSeek-V3.1-Terminus").topk, 0);
  // A file holding a report's spec reads back as the same spec.
  const std::string path = write("v32.json", model_json(v32).dump());
  EXPECT_EQ(model_json(load_model(kPresets, path)), model_json(v32));
  const std::string hpath = write("h.json", hardware_json(h800).dump());
  EXPECT_EQ(hardware_json(load_hardware(kPresets, hpath)), hardware_json(h800));
}

TEST_F(Specs, UserFileWithBaseOverridesFields) {
  const std::string path =
      write("mine.json", R"({"base": "H100", "name": "my H100", "price_per_gpu_hour": 1.25})");
  const HardwareSpec h = load_hardware(kPresets, path);
  EXPECT_EQ(h.name, "my H100");
  EXPECT_EQ(h.price_per_gpu_hour, 1.25);
  EXPECT_EQ(h.memory_tb_s, 3.35);
}

TEST_F(Specs, LoaderErrorsNameTheFileAndField) {
  const auto expect_usage = [&](const std::string& json, const std::string& needle) {
    const std::string path = write("bad.json", json);
    const auto [code, message] = error_of([&] { load_hardware(kPresets, path); });
    EXPECT_EQ(code, ExitCode::usage) << json;
    EXPECT_NE(message.find(path), std::string::npos) << message;
    EXPECT_NE(message.find(needle), std::string::npos) << message;
  };
  expect_usage(R"({"base": "H800", "bf16_tflop": 1})", "unknown field \"bf16_tflop\"");
  expect_usage(R"({"base": "H800", "memory_tb_s": "fast"})",
               "field \"memory_tb_s\" must be a number");
  expect_usage(R"({"base": "H800", "compute_efficiency": 1.5})",
               "\"compute_efficiency\" must be in");
  expect_usage(R"({"base": "H800", "name": 7})", "field \"name\" must be a string");
  expect_usage(R"({"base": "B200"})", "no hardware preset \"B200\"");
  expect_usage(R"({"base": 3})", "field \"base\" must be the name of a preset");
  expect_usage(R"([1, 2])", "expected a JSON object");
  expect_usage(R"({"name": "x", "bf16_tflops": 1})", "missing field \"fp8_tflops\"");

  const std::string model = write("model.json", R"({"base": "DeepSeek-V3.2-Exp", "layers": 2.5})");
  const auto [code, message] = error_of([&] { load_model(kPresets, model); });
  EXPECT_EQ(code, ExitCode::usage);
  EXPECT_NE(message.find("field \"layers\" must be an integer"), std::string::npos) << message;
  EXPECT_EQ(error_of([&] {
              load_model(
                  kPresets,
                  write("p.json", R"({"base": "DeepSeek-V3.2-Exp", "indexer_precision": "fp4"})"));
            }).first,
            ExitCode::usage);

  // Unreadable or malformed files are bad input; unknown preset names a usage error.
  EXPECT_EQ(error_of([&] { load_hardware(kPresets, write("broken.json", "{")); }).first,
            ExitCode::bad_input);
  EXPECT_EQ(error_of([&] { load_hardware(kPresets, (dir_ / "none.json").string()); }).first,
            ExitCode::bad_input);
  const auto unknown = error_of([&] { load_model(kPresets, "GPT-5"); });
  EXPECT_EQ(unknown.first, ExitCode::usage);
  EXPECT_NE(unknown.second.find("DeepSeek-V3.2-Exp"), std::string::npos) << unknown.second;

  // A broken preset file names the preset.
  const fs::path presets = dir_ / "presets";
  fs::create_directories(presets);
  std::ofstream(presets / "hardware.json") << R"({"hardware": [{"name": "X", "bf16_tflops": 1}]})";
  const auto broken = error_of([&] { load_hardware(PresetLibrary{presets}, "X"); });
  EXPECT_EQ(broken.first, ExitCode::usage);
  EXPECT_NE(broken.second.find("preset \"X\""), std::string::npos) << broken.second;
  EXPECT_NE(broken.second.find("missing field"), std::string::npos) << broken.second;
}

TEST_F(Specs, SetOverridesAndItsErrors) {
  HardwareSpec h = load_hardware(kPresets, "H800");
  ModelSpec dense = load_model(kPresets, "DeepSeek-V3.1-Terminus");
  ModelSpec dsa = load_model(kPresets, "DeepSeek-V3.2-Exp");
  const double before = token_cost(dsa, h, Workload{}, Phase::decode, 65536).usd_per_million;
  apply_override("hardware.price_per_gpu_hour=2.5", h, dense, dsa);
  EXPECT_EQ(h.price_per_gpu_hour, 2.5);
  expect_close(token_cost(dsa, h, Workload{}, Phase::decode, 65536).usd_per_million, before * 1.25);
  apply_override("dsa.topk=1024", h, dense, dsa);
  apply_override("dsa.short_prefill_mha=false", h, dense, dsa);
  apply_override("dense.name=my dense", h, dense, dsa);
  apply_override("dense.source=\"quoted text\"", h, dense, dsa);
  EXPECT_EQ(dsa.topk, 1024);
  EXPECT_FALSE(dsa.short_prefill_mha);
  EXPECT_EQ(dense.name, "my dense");
  EXPECT_EQ(dense.source, "quoted text");
  for (const std::string bad :
       {"hardware.price=2", "gpu.price_per_gpu_hour=2", "price=2", "dsa.topk=many", "dsa.topk=-1",
        "hardware.memory_tb_s=0", "dense.layers=1.5", "hardware.base=H100"}) {
    const auto [code, message] = error_of([&] { apply_override(bad, h, dense, dsa); });
    EXPECT_EQ(code, ExitCode::usage) << bad;
    EXPECT_EQ(message.rfind(bad + ": ", 0), 0u) << message;  // the app puts --set in front
  }
}

TEST(Calibration, ReplacesRatesWithMeasuredOnes) {
  const Calibration c = calibrate(0.02);
  EXPECT_EQ(c.device, "cpu");
  for (const double rate :
       {c.attention_tflops, c.indexer_tflops, c.sparse_attention_tflops, c.memory_tb_s}) {
    EXPECT_GT(rate, 1e-6);  // more than a MFLOP/s or MB/s
    EXPECT_LT(rate, 1e3);   // less than a PFLOP/s or PB/s
  }
  const HardwareSpec h = calibrated_hardware(load_hardware(kPresets, "H800"), c);
  EXPECT_EQ(h.bf16_tflops, c.attention_tflops);
  EXPECT_EQ(h.fp8_tflops, c.indexer_tflops);
  EXPECT_EQ(h.memory_tb_s, c.memory_tb_s);
  EXPECT_EQ(h.compute_efficiency, 1);
  EXPECT_EQ(h.memory_efficiency, 1);
  EXPECT_EQ(h.price_per_gpu_hour, 2.0);
  const nlohmann::json j = calibration_json(c);
  EXPECT_TRUE(j["calibrated"].get<bool>());
  for (const char* kernel : {"dense_attention", "sparse_attention", "indexer", "memory"}) {
    EXPECT_GE(j["measurements"][kernel]["repeats"].get<int64_t>(), 1) << kernel;
  }
}

// ---------------------------------------------------------------------------------------------
// dsa-cost as a user runs it.

class CostCli : public Specs {
 protected:
  // Exit code of a command line run in the test directory with the binaries on PATH.
  int run(const std::string& command) const {
    const std::string line = "cd '" + dir_.string() +
                             "' && export PATH='" DSA_APPS_DIR "':$PATH && " + command +
                             " 2>stderr.txt";
    const int status = std::system(line.c_str());
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  }
  std::string slurp(const std::string& name) const {
    std::ifstream in(dir_ / name);
    std::stringstream s;
    s << in.rdbuf();
    return s.str();
  }
};

TEST_F(CostCli, CsvAndJsonAgree) {
  ASSERT_EQ(run("dsa-cost --step 8192 -o cost.json"), 0);
  ASSERT_EQ(run("dsa-cost --step 8192 --format csv -q > cost.csv"), 0);
  const nlohmann::json report = nlohmann::json::parse(slurp("cost.json"));
  EXPECT_EQ(report["schema"], kCostSchema);
  EXPECT_EQ(report["hardware"]["name"], "H800");
  EXPECT_FALSE(report["hardware"]["calibrated"].get<bool>());
  EXPECT_EQ(report["models"]["dsa"]["topk"], 2048);
  std::istringstream csv(slurp("cost.csv"));
  std::string line;
  std::getline(csv, line);
  EXPECT_EQ(line,
            "position,prefill_dense_usd_per_mtok,prefill_dsa_usd_per_mtok,"
            "decode_dense_usd_per_mtok,decode_dsa_usd_per_mtok");
  const auto& points = report["points"];
  std::size_t row = 0;
  for (; std::getline(csv, line); ++row) {
    ASSERT_LT(row, points.size());
    std::istringstream fields(line);
    std::string field;
    std::vector<double> values;
    while (std::getline(fields, field, ',')) values.push_back(std::stod(field));
    ASSERT_EQ(values.size(), 5u) << line;
    const auto& p = points[row];
    EXPECT_EQ(values[0], p["position"].get<double>());
    EXPECT_EQ(values[1], p["prefill"]["dense"]["usd_per_million_tokens"].get<double>());
    EXPECT_EQ(values[2], p["prefill"]["dsa"]["usd_per_million_tokens"].get<double>());
    EXPECT_EQ(values[3], p["decode"]["dense"]["usd_per_million_tokens"].get<double>());
    EXPECT_EQ(values[4], p["decode"]["dsa"]["usd_per_million_tokens"].get<double>());
    // Every stage is in the JSON, and the stages add up to the token's time.
    double sum = 0;
    for (const auto& s : p["decode"]["dsa"]["stages"]) sum += s["seconds"].get<double>();
    expect_close(sum, p["decode"]["dsa"]["seconds"].get<double>());
  }
  EXPECT_EQ(row, points.size());
  EXPECT_EQ(points.size(), 17u);
  EXPECT_EQ(points.back()["position"], 131072);
  const auto& prefill = report["summary"]["prefill"];
  EXPECT_TRUE(prefill["dsa_costlier_below"].is_number_integer());
  EXPECT_EQ(prefill["max_position"], 131072);
  // The summary lines on stderr state the crossover and the ratio at 128K.
  ASSERT_EQ(run("dsa-cost --step 65536 -o curves.json"), 0);
  const std::string err = slurp("stderr.txt");
  EXPECT_NE(err.find("prefill: DSA costs more below position"), std::string::npos) << err;
  EXPECT_NE(err.find("decode: DSA costs more below position"), std::string::npos) << err;
  EXPECT_NE(err.find("dense/DSA"), std::string::npos) << err;
}

TEST_F(CostCli, PlotIsWellFormedSvg) {
  ASSERT_EQ(run("dsa-cost --hardware H200 --plot plot.svg -q -o curves.json"), 0);
  const std::string svg = slurp("plot.svg");
  for (const char* text :
       {"Prefill", "Decode", "context position (K tokens)", "cost per million tokens ($)",
        "DeepSeek-V3.1-Terminus (dense MLA)", "DeepSeek-V3.2-Exp (DSA)", "crossover", "polyline"}) {
    EXPECT_NE(svg.find(text), std::string::npos) << text;
  }
  if (std::system("/usr/bin/python3 -c 'import xml.etree.ElementTree' 2>/dev/null") != 0) {
    GTEST_SKIP() << "no python3 to parse the SVG";
  }
  EXPECT_EQ(run("/usr/bin/python3 -c \"import sys, xml.etree.ElementTree as E; "
                "r = E.parse('plot.svg').getroot(); "
                "sys.exit(r.tag != '{http://www.w3.org/2000/svg}svg')\""),
            0);
}

TEST_F(CostCli, CalibrateSetAndFiles) {
  ASSERT_EQ(run("dsa-cost --calibrate --calibrate-seconds 0.02 --threads 1 --step 65536 "
                "--set hardware.price_per_gpu_hour=1 -q -o cal.json"),
            0);
  const nlohmann::json cal = nlohmann::json::parse(slurp("cal.json"));
  EXPECT_TRUE(cal["hardware"]["calibrated"].get<bool>());
  EXPECT_TRUE(cal["calibration"]["calibrated"].get<bool>());
  EXPECT_EQ(cal["hardware"]["bf16_tflops"], cal["calibration"]["attention_tflops"]);
  EXPECT_EQ(cal["hardware"]["price_per_gpu_hour"], 1.0);
  EXPECT_EQ(cal["threads"], 1);

  write("model.json", R"({"base": "DeepSeek-V3.2-Exp", "topk": 512})");
  ASSERT_EQ(run("dsa-cost --dsa-model model.json --step 65536 -q -o k512.json"), 0);
  EXPECT_EQ(nlohmann::json::parse(slurp("k512.json"))["models"]["dsa"]["topk"], 512);
}

TEST_F(CostCli, FailuresExitWithTheirCodeAndLeaveNoFile) {
  EXPECT_EQ(run("dsa-cost --hardware B200 -o out.json --plot out.svg"), 2);
  EXPECT_NE(slurp("stderr.txt").find("no hardware preset \"B200\""), std::string::npos);
  EXPECT_EQ(run("dsa-cost --set hardware.bogus=1 -o out.json"), 2);
  EXPECT_NE(slurp("stderr.txt").find("error: --set: hardware.bogus=1: unknown field \"bogus\""),
            std::string::npos)
      << slurp("stderr.txt");
  EXPECT_EQ(run("dsa-cost --format xml -o out.json"), 2);
  EXPECT_EQ(run("dsa-cost --step 0 -o out.json"), 2);
  EXPECT_EQ(run("dsa-cost --max-context 0 -o out.json"), 2);
  EXPECT_EQ(run("dsa-cost --calibrate-seconds 1 -o out.json"), 2);  // needs --calibrate
  EXPECT_EQ(run("dsa-cost -o - --plot -"), 2);
  write("broken.json", "{");
  EXPECT_EQ(run("dsa-cost --hardware broken.json -o out.json"), 3);
  EXPECT_EQ(run("dsa-cost --presets nowhere -o out.json"), 3);
  EXPECT_NE(slurp("stderr.txt").find("give --presets DIR or set DSA_PRESETS"), std::string::npos)
      << slurp("stderr.txt");
  EXPECT_EQ(run("DSA_PRESETS=nowhere dsa-cost -o out.json"), 3);
  EXPECT_FALSE(fs::exists(dir_ / "out.json"));
  EXPECT_FALSE(fs::exists(dir_ / "out.svg"));
  EXPECT_EQ(
      run("DSA_PRESETS='" DSA_TESTS_DIR "/../data/presets' dsa-cost --step 65536 -q -o out.json"),
      0);
}

}  // namespace
}  // namespace dsa
