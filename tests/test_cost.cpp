// The cost model of DESIGN.md section 3 against hand-computed counts, its properties
// (monotone, dense = DSA below k without an indexer, the crossover), the layer schedules of
// DeepSeek-V4 (per layer by hand and against a token-by-token fp64 count; the presets at 1M
// tokens), the preset loader and --set, and dsa-cost as a user runs it (JSON and CSV agree,
// the SVG is XML, several models compared to 1,048,576 tokens).
#include <gtest/gtest.h>

#include <sys/wait.h>
#include "temp_dir.hpp"

#include <unistd.h>
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "dsa/calibrate.hpp"
#include "dsa/cost.hpp"
#include "dsa/device.hpp"
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

// A CSV number against the report's: rounded to 6 significant digits, so within half a unit of
// the sixth (and not an exact copy: 5e-7 would not hold for a number cut to fewer digits).
void expect_six_digits(double csv, const nlohmann::json& report) {
  const double expected = report.get<double>();
  EXPECT_NEAR(csv, expected, 5.0000001e-6 * std::abs(expected)) << "expected " << expected;
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

// ---------------------------------------------------------------------------------------------
// Layer schedules (compress_ratios: SWA, CSA, HCA).

// tiny_dsa's shapes (E = 5·2 = 10 bytes and 2·2·(5 + 4) = 36 FLOPs per entry, 2·3·4 = 24 FLOPs
// and 6 bytes per indexer key, k = 8) with a window of 4 and one layer of each kind:
// SWA, CSA (ratio 4), HCA (ratio 8), and a second CSA layer.
ModelSpec tiny_hybrid() {
  ModelSpec m = tiny_dsa();
  m.name = "tiny-hybrid";
  m.layers = 4;
  m.topk = 3;
  m.short_prefill_mha = false;
  m.compress_ratios = {0, 4, 8, 4};
  m.window = 4;
  m.csa_ratio = 4;
  return m;
}

void expect_layer(const LayerFootprint& f, double window, double compressed, double attended,
                  double indexed, double attention_flops, double indexer_flops, double kv,
                  double kv_per_token) {
  SCOPED_TRACE(layer_kind_name(f.group.kind));
  expect_close(f.window_entries, window);
  expect_close(f.compressed_entries, compressed);
  expect_close(f.attended_entries, attended);
  expect_close(f.indexed_keys, indexed);
  expect_close(f.attention_flops, attention_flops);
  expect_close(f.indexer_flops, indexer_flops);
  expect_close(f.kv_cache_bytes, kv);
  expect_close(f.kv_bytes_per_token, kv_per_token);
}

TEST(CostSchedule, GroupsByKindAndRatio) {
  const std::vector<LayerGroup> g = layer_schedule(tiny_hybrid());
  ASSERT_EQ(g.size(), 3u);
  EXPECT_EQ(g[0].kind, LayerKind::swa);
  EXPECT_EQ(g[0].count, 1);
  EXPECT_EQ(g[1].kind, LayerKind::csa);
  EXPECT_EQ(g[1].compress_ratio, 4);
  EXPECT_EQ(g[1].count, 2);
  EXPECT_EQ(g[2].kind, LayerKind::hca);
  EXPECT_EQ(g[2].compress_ratio, 8);
  EXPECT_EQ(attention_label(tiny_hybrid()), "SWA+CSA+HCA");
  // Two HCA ratios are two groups of one kind, ascending.
  ModelSpec two = tiny_hybrid();
  two.compress_ratios = {128, 4, 64, 128};
  const std::vector<LayerGroup> h = layer_schedule(two);
  ASSERT_EQ(h.size(), 3u);
  EXPECT_EQ(h[1].compress_ratio, 64);
  EXPECT_EQ(h[2].compress_ratio, 128);
  EXPECT_EQ(h[2].count, 2);
  EXPECT_EQ(attention_label(two), "CSA+HCA");
  // A uniform model is one MLA group.
  const std::vector<LayerGroup> u = layer_schedule(tiny_dsa());
  ASSERT_EQ(u.size(), 1u);
  EXPECT_EQ(u[0].kind, LayerKind::mla);
  EXPECT_EQ(u[0].count, 2);
  EXPECT_EQ(attention_label(tiny_dsa()), "DSA");
  EXPECT_EQ(attention_label(tiny_dense()), "dense MLA");

  // The presets: DeepSeek-V4's compress_ratios without the MTP layer's.
  const auto counts = [](const std::string& name) {
    std::vector<std::pair<std::string, int64_t>> out;
    for (const LayerGroup& group : layer_schedule(load_model(kPresets, name)))
      out.emplace_back(layer_kind_name(group.kind), group.count);
    return out;
  };
  using Counts = std::vector<std::pair<std::string, int64_t>>;
  EXPECT_EQ(counts("DeepSeek-V4-Flash"), (Counts{{"swa", 2}, {"csa", 21}, {"hca", 20}}));
  EXPECT_EQ(counts("DeepSeek-V4-Pro"), (Counts{{"csa", 30}, {"hca", 31}}));
  EXPECT_EQ(counts("DeepSeek-V3.2"), (Counts{{"mla", 61}}));
}

TEST(CostLayerFootprint, CountsByHand) {
  const ModelSpec m = tiny_hybrid();
  const std::vector<LayerGroup> g = layer_schedule(m);
  // x = 21: window 4; CSA c = 5, of which k = 3 selected; HCA c = 2.
  expect_layer(layer_footprint(m, g[0], 21), 4, 0, 4, 0, 144, 0, 40, 0);
  expect_layer(layer_footprint(m, g[1], 21), 4, 5, 7, 5, 252, 120, 4 * 10 + 5 * 16, 16.0 / 4);
  expect_layer(layer_footprint(m, g[2], 21), 4, 2, 6, 0, 216, 0, 4 * 10 + 2 * 10, 10.0 / 8);
  // x = 3: the window is not full, no block is complete.
  expect_layer(layer_footprint(m, g[1], 3), 3, 0, 3, 0, 108, 0, 30, 4);
  // x = 0: nothing.
  expect_layer(layer_footprint(m, g[2], 0), 0, 0, 0, 0, 0, 0, 0, 1.25);
  // MLA: DSA over x keys, dense over x entries.
  const LayerGroup mla{LayerKind::mla, 0, 2};
  expect_layer(layer_footprint(tiny_dsa(), mla, 20), 0, 20, 8, 20, 288, 480, 20 * 16, 16);
  expect_layer(layer_footprint(tiny_dense(), mla, 20), 0, 20, 20, 0, 720, 0, 200, 10);

  // The model: SWA + 2 CSA + HCA, plus 2 FLOPs per activated parameter.
  const TokenFootprint t = token_footprint(m, 21);
  ASSERT_EQ(t.layers.size(), 3u);
  expect_close(t.attention_flops, 144 + 2 * (252 + 120) + 216);
  expect_close(t.flops, 144 + 2 * (252 + 120) + 216 + 2000);
  expect_close(t.kv_cache_bytes, 40 + 2 * 120 + 60);
  expect_close(t.kv_bytes_per_token, 2 * 4 + 1.25);
}

// What one layer of ratio r attends and holds at position x, by walking the x earlier tokens:
// the last `window` of them, and the blocks of r tokens that end at or before x (the indexer
// scores all of them, the attention reads the best topk of them or every one).
struct ReferenceLayer {
  double attention_flops = 0, indexer_flops = 0, kv_cache_bytes = 0;
};
ReferenceLayer reference_layer(const ModelSpec& m, int64_t ratio, int64_t x) {
  const bool csa = ratio > 0 && ratio == m.csa_ratio;
  const double entry = static_cast<double>(m.d_qk) * m.kv_bytes;
  int64_t window = 0, blocks = 0;
  for (int64_t s = 0; s < x; ++s) {
    if (s >= x - m.window) ++window;
    if (ratio > 0 && (s + 1) % ratio == 0) ++blocks;  // block s/r is complete at token s
  }
  const int64_t attended = window + (csa ? std::min(blocks, m.topk) : blocks);
  ReferenceLayer r;
  r.attention_flops =
      static_cast<double>(2 * m.heads * (m.d_qk + m.d_v)) * static_cast<double>(attended);
  r.indexer_flops = csa ? static_cast<double>(2 * m.indexer_heads * m.indexer_dim * blocks) : 0.0;
  r.kv_cache_bytes = static_cast<double>(window) * entry +
                     static_cast<double>(blocks) * (entry + (csa ? m.indexer_key_bytes : 0.0));
  return r;
}

TEST(CostLayerFootprint, MatchesTokenByTokenCountOnRandomSchedules) {
  std::mt19937_64 random(20251201);
  const int64_t ratios[] = {0, 1, 2, 3, 4, 8, 16, 128};
  for (int trial = 0; trial < 200; ++trial) {
    ModelSpec m = tiny_dsa();
    m.short_prefill_mha = false;
    m.heads = 1 + static_cast<int64_t>(random() % 8);
    m.d_qk = 1 + static_cast<int64_t>(random() % 64);
    m.d_v = 1 + static_cast<int64_t>(random() % 64);
    m.kv_bytes = 0.5 + static_cast<double>(random() % 8) / 4;
    m.indexer_heads = static_cast<int64_t>(random() % 5);
    m.indexer_dim = 1 + static_cast<int64_t>(random() % 16);
    m.indexer_key_bytes = static_cast<double>(random() % 40);
    m.topk = 1 + static_cast<int64_t>(random() % 20);
    m.window = 1 + static_cast<int64_t>(random() % 40);
    m.csa_ratio = ratios[random() % std::size(ratios)];
    m.layers = 1 + static_cast<int64_t>(random() % 7);
    m.compress_ratios.clear();
    for (int64_t i = 0; i < m.layers; ++i)
      m.compress_ratios.push_back(ratios[random() % std::size(ratios)]);
    const int64_t x = static_cast<int64_t>(random() % 700);
    double attention = 0, kv = 0;
    for (const int64_t ratio : m.compress_ratios) {
      const ReferenceLayer r = reference_layer(m, ratio, x);
      attention += r.attention_flops + r.indexer_flops;
      kv += r.kv_cache_bytes;
    }
    const TokenFootprint t = token_footprint(m, x);
    SCOPED_TRACE(::testing::Message() << "trial " << trial << " x=" << x);
    expect_close(t.attention_flops, attention);
    expect_close(t.kv_cache_bytes, kv);
    expect_close(t.flops, attention + 2 * m.activated_params);
    // The decode stages count the same FLOPs.
    double flops = 0;
    for (const auto& s : token_cost(m, tiny_hardware(), kTinyWorkload, Phase::decode, x).stages)
      flops += s.flops;
    expect_close(flops, t.flops);
  }
}

TEST(TokenCost, HybridStagesByHand) {
  const TokenCost c = token_cost(tiny_hybrid(), tiny_hardware(), kTinyWorkload, Phase::decode, 21);
  // swa attention; csa indexer, topk, attention; hca attention; rest.
  ASSERT_EQ(c.stages.size(), 6u);
  expect_stage(c.stages[0], "attention", "mqa", 144, 40, 1.44e-10, 1.6e-10);
  EXPECT_EQ(c.stages[0].layers.kind, LayerKind::swa);
  // 2 CSA layers: 5 keys of 6 bytes, 5 scores of 4 bytes, 7 entries of 10 bytes each.
  expect_stage(c.stages[1], "indexer", "", 240, 60, 1.2e-10, 2.4e-10);
  expect_stage(c.stages[2], "topk", "", 0, 40, 0, 1.6e-10);
  expect_stage(c.stages[3], "attention", "mqa", 504, 140, 5.04e-10, 5.6e-10);
  EXPECT_EQ(c.stages[3].layers.kind, LayerKind::csa);
  EXPECT_EQ(c.stages[3].layers.count, 2);
  expect_stage(c.stages[4], "attention", "mqa", 216, 60, 2.16e-10, 2.4e-10);
  EXPECT_EQ(c.stages[4].layers.compress_ratio, 8);
  expect_stage(c.stages[5], "rest", "", 2000, 250, 1e-9, 1e-9);
  EXPECT_EQ(c.stages[5].layers.count, 0);

  // Prefill (chunk 10): the window and HCA entries, and the indexer keys, are read once per
  // chunk; CSA's 3 selected entries per token.
  const TokenCost p = token_cost(tiny_hybrid(), tiny_hardware(), kTinyWorkload, Phase::prefill, 21);
  ASSERT_EQ(p.stages.size(), 6u);
  expect_stage(p.stages[0], "attention", "mqa", 144, 4, 1.44e-10, 1.6e-11);
  expect_stage(p.stages[1], "indexer", "", 240, 6, 1.2e-10, 2.4e-11);
  expect_stage(p.stages[2], "topk", "", 0, 40, 0, 1.6e-10);
  expect_stage(p.stages[3], "attention", "mqa", 504, 2 * (4 + 30), 5.04e-10, 2.72e-10);
  expect_stage(p.stages[4], "attention", "mqa", 216, 6, 2.16e-10, 2.4e-11);
}

// The DeepSeek-V4 paper's Figure 1 setting: one token at 2^20 against DeepSeek-V3.2, the
// per-layer terms of docs/DESIGN.md section 3 computed here by hand.
TEST(CostFootprint, DeepSeekV4AgainstV32AtOneMillion) {
  const int64_t x = int64_t{1} << 20;
  const double X = static_cast<double>(x);
  const TokenFootprint v32 = token_footprint(load_model(kPresets, "DeepSeek-V3.2"), x);
  const TokenFootprint pro = token_footprint(load_model(kPresets, "DeepSeek-V4-Pro"), x);
  const TokenFootprint flash = token_footprint(load_model(kPresets, "DeepSeek-V4-Flash"), x);
  // Bytes per token: V3.2 61·(656 + 132); CSA (584 + 68)/4 = 163; HCA 584/128.
  expect_close(v32.kv_bytes_per_token, 61.0 * (656 + 132));
  expect_close(pro.kv_bytes_per_token, 30 * 163.0 + 31 * 584.0 / 128);
  expect_close(flash.kv_bytes_per_token, 21 * 163.0 + 20 * 584.0 / 128);
  // The cache also holds each layer's window of 128 entries of 584 bytes.
  expect_close(v32.kv_cache_bytes, 61.0 * (656 + 132) * X);
  expect_close(pro.kv_cache_bytes, (30 * 163.0 + 31 * 584.0 / 128) * X + 61 * 128 * 584.0);
  expect_close(flash.kv_cache_bytes, (21 * 163.0 + 20 * 584.0 / 128) * X + 43 * 128 * 584.0);
  // FLOPs: 2·n_h·(512 + 512) per attended entry; the indexer 2·64·128 per scored key.
  const double v32_attention = 61 * (2.0 * 64 * 128 * X + 2.0 * 128 * (576 + 512) * 2048);
  const double pro_entry = 2.0 * 128 * 1024, flash_entry = 2.0 * 64 * 1024;
  const double indexer = 2.0 * 64 * 128 * (X / 4);
  const double pro_attention =
      30 * (pro_entry * (128 + 1024) + indexer) + 31 * pro_entry * (128 + X / 128);
  const double flash_attention = 2 * flash_entry * 128 +
                                 21 * (flash_entry * (128 + 512) + indexer) +
                                 20 * flash_entry * (128 + X / 128);
  expect_close(v32.attention_flops, v32_attention);
  expect_close(pro.attention_flops, pro_attention);
  expect_close(flash.attention_flops, flash_attention);
  expect_close(v32.flops, v32_attention + 2 * 37.85e9);
  expect_close(pro.flops, pro_attention + 2 * 49e9);
  expect_close(flash.flops, flash_attention + 2 * 13e9);
  // Against the paper's Figure 1: KV cache 9.5x (Pro) and 13.7x (Flash) smaller, within 0.5%;
  // FLOPs 3.7x lower (Pro), within 3.5%; FLOPs 9.8x lower (Flash) is 8.29x here, and the
  // attention alone 9.51x.
  EXPECT_NEAR(v32.kv_cache_bytes / pro.kv_cache_bytes, 9.5, 0.5e-2 * 9.5);
  EXPECT_NEAR(v32.kv_cache_bytes / flash.kv_cache_bytes, 13.7, 0.5e-2 * 13.7);
  EXPECT_NEAR(v32.flops / pro.flops, 3.7, 3.5e-2 * 3.7);
  EXPECT_NEAR(v32.flops / flash.flops, 8.29, 0.005);
  EXPECT_NEAR(v32.attention_flops / flash.attention_flops, 9.51, 0.005);
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
            (std::vector<std::string>{"DeepSeek-V3.1-Terminus", "DeepSeek-V3.2-Exp",
                                      "DeepSeek-V3.2", "DeepSeek-V4-Pro", "DeepSeek-V4-Flash"}));
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
  // So do the V4 presets, schedule and all.
  for (const char* name : {"DeepSeek-V4-Flash", "DeepSeek-V4-Pro"}) {
    const ModelSpec v4 = load_model(kPresets, name);
    EXPECT_EQ(v4.window, 128);
    EXPECT_EQ(v4.csa_ratio, 4);
    EXPECT_EQ(static_cast<int64_t>(v4.compress_ratios.size()), v4.layers);
    const std::string v4_path = write("v4.json", model_json(v4).dump());
    EXPECT_EQ(model_json(load_model(kPresets, v4_path)), model_json(v4));
  }
  EXPECT_EQ(load_model(kPresets, "DeepSeek-V4-Flash").compress_ratios, ([] {
              std::vector<int64_t> r = {0, 0};
              for (int i = 0; i < 20; ++i) r.insert(r.end(), {4, 128});
              r.push_back(4);
              return r;
            }()));
}

TEST_F(Specs, FilesWithoutASchedule) {
  // A complete file written before compress_ratios existed (dsa-cost/1's model fields) loads as
  // the same uniform model.
  nlohmann::json old = model_json(load_model(kPresets, "DeepSeek-V3.2-Exp"));
  for (const char* field : {"compress_ratios", "window", "csa_ratio"}) old.erase(field);
  const ModelSpec m = load_model(kPresets, write("old.json", old.dump()));
  EXPECT_TRUE(m.compress_ratios.empty());
  EXPECT_EQ(m.window, 0);
  EXPECT_EQ(model_json(m), model_json(load_model(kPresets, "DeepSeek-V3.2-Exp")));
  // A schedule on a V3 base, by file and by --set.
  const ModelSpec h = load_model(
      kPresets, write("h.json", R"({"base": "DeepSeek-V3.2", "layers": 3, "compress_ratios":
        [0, 4, 128], "window": 64, "csa_ratio": 4, "short_prefill_mha": false})"));
  EXPECT_EQ(attention_label(h), "SWA+CSA+HCA");
  HardwareSpec hw = load_hardware(kPresets, "H800");
  ModelSpec dense = load_model(kPresets, "DeepSeek-V3.1-Terminus");
  ModelSpec v4 = load_model(kPresets, "DeepSeek-V4-Flash");
  apply_override("dsa.window=256", hw, dense, v4);
  EXPECT_EQ(v4.window, 256);
  ModelSpec pro = load_model(kPresets, "DeepSeek-V4-Pro");
  std::vector<NamedModel> keys = {{"DeepSeek-V4-Pro", &pro}, {"DeepSeek-V4-Flash", &v4}};
  apply_override("deepseek-v4-pro.topk=2048", hw, keys);  // the key in any case
  EXPECT_EQ(pro.topk, 2048);
  const std::string ratios =
      "DeepSeek-V4-Flash.compress_ratios=" + nlohmann::json(std::vector<int64_t>(43, 128)).dump();
  apply_override(ratios, hw, keys);
  EXPECT_EQ(attention_label(v4), "HCA");
  const auto [code, message] = error_of([&] { apply_override("dense.topk=1", hw, keys); });
  EXPECT_EQ(code, ExitCode::usage);
  EXPECT_NE(message.find("the keys are hardware.FIELD, DeepSeek-V4-Pro.FIELD or "
                         "DeepSeek-V4-Flash.FIELD"),
            std::string::npos)
      << message;
}

TEST_F(Specs, BadSchedulesNameTheFieldOnOneLine) {
  const auto expect_usage = [&](const std::string& json, const std::string& needle) {
    const std::string path = write("bad.json", json);
    const auto [code, message] = error_of([&] { load_model(kPresets, path); });
    EXPECT_EQ(code, ExitCode::usage) << json;
    EXPECT_EQ(message.rfind(path + ": ", 0), 0u) << message;
    EXPECT_NE(message.find(needle), std::string::npos) << message;
    EXPECT_EQ(message.find('\n'), std::string::npos) << message;
  };
  const std::string flash = R"({"base": "DeepSeek-V4-Flash", )";
  std::vector<int64_t> with_mtp = load_model(kPresets, "DeepSeek-V4-Flash").compress_ratios;
  with_mtp.push_back(0);
  expect_usage(flash + R"("compress_ratios": )" + nlohmann::json(with_mtp).dump() + "}",
               "field \"compress_ratios\" must be one ratio per layer, 43");
  expect_usage(flash + R"("layers": 1, "compress_ratios": [-4]})",
               "field \"compress_ratios\" must be ratios of at least 0");
  expect_usage(flash + R"("compress_ratios": "4,128"})",
               "field \"compress_ratios\" must be an array of integers");
  expect_usage(flash + R"("layers": 2, "compress_ratios": [4, 1.5]})",
               "field \"compress_ratios\" must be an array of integers");
  expect_usage(flash + R"("window": 0})", "field \"window\" must be at least 1 with");
  expect_usage(flash + R"("topk": 0})", "field \"topk\" must be at least 1 with CSA layers");
  expect_usage(flash + R"("short_prefill_mha": true})", "field \"short_prefill_mha\" must be");
  expect_usage(flash + R"("csa_ratio": -1})", "field \"csa_ratio\" must be at least 0");
  expect_usage(R"({"base": "DeepSeek-V3.2", "window": 128})",
               "field \"window\" must be 0 without compress_ratios");
  expect_usage(R"({"base": "DeepSeek-V3.2", "csa_ratio": 4})",
               "field \"csa_ratio\" must be 0 without compress_ratios");
  // Without a CSA layer, topk may be 0 (HCA and SWA only).
  EXPECT_EQ(error_of([&] {
              load_model(kPresets, write("hca.json", flash + R"("csa_ratio": 0, "topk": 0})"));
            }).first,
            ExitCode::ok);
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

TEST_F(Specs, RunCostAssemblesTheReportFromTheLibrarysParts) {
  CostRequest request;
  request.max_context = 8192;
  request.overrides = {"dsa.topk=1024"};
  request.want_csv = true;
  StageTimes times;
  const CostRun run = run_cost(kPresets, request, &times);
  const HardwareSpec h800 = load_hardware(kPresets, "H800");
  const ModelSpec dense = load_model(kPresets, "DeepSeek-V3.1-Terminus");
  ModelSpec dsa = load_model(kPresets, "DeepSeek-V3.2-Exp");
  dsa.topk = 1024;
  const CostCurves curves = cost_curves(dense, dsa, h800, Workload{}, 8192, 4096);
  EXPECT_EQ(run.report["schema"], kCostSchema);
  EXPECT_EQ(run.report["presets"], kPresets.dir.string());
  nlohmann::json hardware = hardware_json(h800);
  hardware["calibrated"] = false;
  EXPECT_EQ(run.report["hardware"], hardware);
  EXPECT_EQ(
      run.report["workload"],
      nlohmann::json(
          {{"decode_batch", 64}, {"prefill_chunk", 8192}, {"max_context", 8192}, {"step", 4096}}));
  EXPECT_EQ(run.report["model"], cost_model_json());
  EXPECT_EQ(run.report["models"]["dsa"], model_json(dsa));
  EXPECT_EQ(run.report["points"], cost_points_json(curves));
  EXPECT_EQ(run.report["summary"], cost_summary_json(curves));
  EXPECT_EQ(run.csv, cost_csv(curves));
  EXPECT_TRUE(run.svg.empty());  // not asked for
  EXPECT_EQ(run.summary,
            (std::vector<std::string>{cost_summary_line(Phase::prefill, curves.prefill),
                                      cost_summary_line(Phase::decode, curves.decode)}));
  EXPECT_FALSE(run.report.contains("tool"));  // the header and timings are the caller's
  EXPECT_FALSE(run.report.contains("timings_ms"));
  EXPECT_GE(times.get("model"), 0.0);

  // Several models against a baseline named in any case.
  CostRequest compared;
  compared.compare_models = {"DeepSeek-V3.2", "DeepSeek-V4-Flash"};
  compared.baseline = "deepseek-v4-flash";
  compared.max_context = 65536;
  compared.step = 32768;
  compared.want_plot = true;
  const CostRun side_by_side = run_cost(kPresets, compared);
  const std::vector<ModelSpec> models = {load_model(kPresets, "DeepSeek-V3.2"),
                                         load_model(kPresets, "DeepSeek-V4-Flash")};
  const ModelComparison comparison = compare_models(models, 1, h800, Workload{}, 65536, 32768);
  EXPECT_EQ(side_by_side.report["comparison"], comparison_json(comparison));
  EXPECT_EQ(side_by_side.svg, comparison_plot_svg(comparison, h800, Workload{}));
  EXPECT_EQ(side_by_side.summary, comparison_summary_lines(comparison));
  EXPECT_FALSE(side_by_side.report.contains("models"));

  // Messages name the request's fields as the caller says: its flags or keywords.
  compared.overrides = {"dsa.topk=1"};
  EXPECT_EQ(
      error_of([&] { run_cost(kPresets, compared); }).second.rfind("overrides: dsa.topk=1: ", 0),
      0u);
  compared.names.overrides = "--set";
  EXPECT_EQ(error_of([&] { run_cost(kPresets, compared); }).second.rfind("--set: dsa.topk=1: ", 0),
            0u);
  compared.overrides.clear();
  compared.baseline = "GPT";
  const auto [code, message] = error_of([&] { run_cost(kPresets, compared); });
  EXPECT_EQ(code, ExitCode::usage);
  EXPECT_EQ(message.rfind("baseline: no model named \"GPT\"", 0), 0u) << message;
  compared.baseline.clear();
  compared.compare_models = {"DeepSeek-V3.2", "deepseek-v3.2"};
  compared.names.compare_models = "--compare-models";
  EXPECT_EQ(
      error_of([&] { run_cost(kPresets, compared); }).second.rfind("--compare-models: two", 0), 0u);
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
            "position,prefill_dense_usd_per_million_tokens,prefill_dsa_usd_per_million_tokens,"
            "decode_dense_usd_per_million_tokens,decode_dsa_usd_per_million_tokens");
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
    expect_six_digits(values[1], p["prefill"]["dense"]["usd_per_million_tokens"]);
    expect_six_digits(values[2], p["prefill"]["dsa"]["usd_per_million_tokens"]);
    expect_six_digits(values[3], p["decode"]["dense"]["usd_per_million_tokens"]);
    expect_six_digits(values[4], p["decode"]["dsa"]["usd_per_million_tokens"]);
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

// --calibrate with --calibrate-positions on the CPU: the models' layers measured beside the
// curves (calibrate.hpp; test_calibrate.cpp checks the figures), as points on the plot, a
// summary line per model; bad positions are usage errors naming the flag, with no file left.
TEST_F(CostCli, CalibrateMeasuresLayersAtPositions) {
  write("small.json", R"({"base": "DeepSeek-V3.2-Exp", "name": "small", "heads": 4, "d_qk": 64,
      "d_v": 48, "indexer_heads": 4, "indexer_dim": 32, "topk": 16})");
  write("small-v4.json", R"({"base": "DeepSeek-V4-Flash", "name": "small-v4", "heads": 4,
      "d_qk": 64, "d_v": 64, "kv_bytes": 2, "indexer_heads": 4, "indexer_dim": 32, "topk": 8})");
  const std::string common =
      "dsa-cost --calibrate --calibrate-seconds 0.001 --threads 1 --compare-models "
      "small.json,small-v4.json --max-context 512 --step 256 ";
  ASSERT_EQ(
      run(common + "--calibrate-positions 64,512 --calibrate-tokens 2 --plot m.svg -o m.json"), 0)
      << slurp("stderr.txt");
  const nlohmann::json report = nlohmann::json::parse(slurp("m.json"));
  EXPECT_EQ(report["schema"], "dsa-cost/3");
  EXPECT_TRUE(report["hardware"]["calibrated"].get<bool>());
  const auto& m = report["measured"];
  EXPECT_EQ(m["device"], "cpu");
  EXPECT_EQ(m["positions"], nlohmann::json({64, 512}));
  EXPECT_EQ(m["prefill_rows"], 2);
  EXPECT_EQ(m["decode_sequences"], 2);
  ASSERT_EQ(m["models"].size(), 2u);
  EXPECT_EQ(m["models"][1]["name"], "small-v4");
  for (const auto& model : m["models"]) {
    ASSERT_EQ(model["points"].size(), 2u);
    for (const auto& point : model["points"]) {
      for (const char* phase : {"prefill", "decode"}) {
        const auto& t = point[phase];
        EXPECT_GT(t["seconds"].get<double>(), t["rest_seconds"].get<double>());
        EXPECT_GT(t["modelled_seconds"].get<double>(), 0);
      }
    }
  }
  // V4-Flash's three groups (SWA, CSA, HCA), each run once per phase.
  EXPECT_EQ(m["models"][1]["points"][1]["decode"]["runs"].size(), 3u);
  EXPECT_TRUE(report["timings_ms"].contains("measure"));
  const std::string err = slurp("stderr.txt");
  EXPECT_NE(err.find("dsa-cost: measured on cpu: small at 512: prefill attention "),
            std::string::npos)
      << err;
  EXPECT_NE(err.find("dsa-cost: measured on cpu: small-v4 at 512: "), std::string::npos) << err;
  const std::string svg = slurp("m.svg");
  EXPECT_NE(svg.find("<circle"), std::string::npos);
  EXPECT_NE(svg.find("small-v4 measured"), std::string::npos);
  EXPECT_NE(svg.find("points measured on cpu"), std::string::npos);

  EXPECT_EQ(run(common + "--calibrate-positions 512,64 -o bad.json --plot bad.svg"), 2);
  EXPECT_NE(slurp("stderr.txt").find("--calibrate-positions: positions must ascend"),
            std::string::npos)
      << slurp("stderr.txt");
  EXPECT_EQ(run("dsa-cost --calibrate-positions 64 -o bad.json"), 2);  // needs --calibrate
  EXPECT_EQ(run("dsa-cost --device cuda -o bad.json"), 2);             // needs --calibrate
  if (!cuda_available()) {
    EXPECT_EQ(run(common + "--device cuda -o bad.json"), 1);
    EXPECT_NE(slurp("stderr.txt").find("error:"), std::string::npos);
  }
  EXPECT_FALSE(fs::exists(dir_ / "bad.json"));
  EXPECT_FALSE(fs::exists(dir_ / "bad.svg"));
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

TEST_F(CostCli, ComparesModelsToOneMillionTokens) {
  const std::string models =
      "DeepSeek-V3.1-Terminus,DeepSeek-V3.2-Exp,DeepSeek-V3.2,DeepSeek-V4-Pro,DeepSeek-V4-Flash";
  ASSERT_EQ(run("dsa-cost --compare-models " + models +
                " --baseline deepseek-v3.2 --max-context 1048576 --plot fig.svg -o fig.json"),
            0);
  const std::string err = slurp("stderr.txt");
  const nlohmann::json report = nlohmann::json::parse(slurp("fig.json"));
  EXPECT_EQ(report["schema"], "dsa-cost/3");
  EXPECT_FALSE(report.contains("points"));
  const auto& c = report["comparison"];
  EXPECT_EQ(c["baseline"], "DeepSeek-V3.2");
  ASSERT_EQ(c["models"].size(), 5u);
  EXPECT_EQ(c["models"][4]["compress_ratios"].size(), 43u);
  const auto& points = c["points"];
  ASSERT_EQ(points.size(), 257u);  // 0, 4096, ..., 1048576
  EXPECT_EQ(points.back()["position"], 1048576);
  const auto& at_max = c["at_max_context"];
  EXPECT_EQ(at_max["position"], 1048576);
  for (std::size_t i = 0; i < 5; ++i) {
    const auto& row = at_max["models"][i];
    const auto& point = points.back()["models"][i];
    EXPECT_EQ(row["name"], c["models"][i]["name"]);
    EXPECT_EQ(row["flops"], point["flops"]);
    EXPECT_EQ(row["kv_cache_bytes"], point["kv_cache_bytes"]);
    // The decode stages add up to the token's FLOPs, the layer groups to its cache.
    double flops = 0, kv = 0;
    for (const auto& s : row["decode"]["stages"]) flops += s["flops"].get<double>();
    for (const auto& l : row["layers"])
      kv += l["layers"].get<double>() * l["kv_cache_bytes"].get<double>();
    expect_close(flops, row["flops"].get<double>());
    expect_close(kv, row["kv_cache_bytes"].get<double>());
  }
  // The closing note states the baseline's KV cache and FLOPs over each model's, as in the JSON.
  for (const char* name : {"DeepSeek-V4-Pro", "DeepSeek-V4-Flash"}) {
    const auto& rows = at_max["models"];
    const auto row =
        *std::find_if(rows.begin(), rows.end(), [&](const auto& r) { return r["name"] == name; });
    const auto& over = row["baseline_over"];
    for (const std::string text :
         {fmt::format("{}: KV cache", name),
          fmt::format("{:.2f}x smaller", over["kv_cache_bytes"].get<double>()),
          fmt::format("{:.2f}x lower", over["flops"].get<double>()),
          fmt::format("attention alone {:.2f}x lower", over["attention_flops"].get<double>())}) {
      EXPECT_NE(err.find(text), std::string::npos) << text << "\n" << err;
    }
    EXPECT_GT(over["kv_cache_bytes"].get<double>(), 9);
  }
  EXPECT_NE(err.find("DeepSeek-V3.2 (baseline)"), std::string::npos) << err;
  // Position 0: no cache, no ratio.
  EXPECT_TRUE(points[0]["models"][3]["baseline_over"]["kv_cache_bytes"].is_null());

  // The CSV holds the same numbers, one row per position and model.
  ASSERT_EQ(run("dsa-cost --compare-models " + models +
                " --baseline DeepSeek-V3.2 --max-context 1048576 --format csv -q -o fig.csv"),
            0);
  std::istringstream csv(slurp("fig.csv"));
  std::string line;
  std::getline(csv, line);
  EXPECT_EQ(line,
            "position,model,flops,attention_flops,kv_cache_bytes,prefill_usd_per_million_tokens,"
            "decode_usd_per_million_tokens,baseline_over_flops,baseline_over_attention_flops,"
            "baseline_over_kv_cache_bytes,baseline_over_prefill_cost,baseline_over_decode_cost");
  std::size_t rows = 0;
  for (; std::getline(csv, line); ++rows) {
    const auto& p = points[rows / 5]["models"][rows % 5];
    std::vector<std::string> fields;
    std::istringstream in(line);
    for (std::string f; std::getline(in, f, ',');) fields.push_back(f);
    ASSERT_GE(fields.size(), 11u) << line;
    EXPECT_EQ(fields[1], p["name"].get<std::string>());
    expect_six_digits(std::stod(fields[2]), p["flops"]);
    expect_six_digits(std::stod(fields[4]), p["kv_cache_bytes"]);
    expect_six_digits(std::stod(fields[6]), p["decode_usd_per_million_tokens"]);
    if (!p["baseline_over"]["kv_cache_bytes"].is_null())
      expect_six_digits(std::stod(fields[9]), p["baseline_over"]["kv_cache_bytes"]);
  }
  EXPECT_EQ(rows, 5 * points.size());

  const std::string svg = slurp("fig.svg");
  for (const char* text :
       {"Prefill", "Decode", "FLOPs of one decode token", "KV cache of the sequence", "GiB",
        "DeepSeek-V4-Flash (SWA+CSA+HCA)", "DeepSeek-V4-Pro (CSA+HCA)", "DeepSeek-V3.2 (baseline)",
        "x smaller", "1024"}) {
    EXPECT_NE(svg.find(text), std::string::npos) << text;
  }
}

TEST_F(CostCli, V4AgainstDenseToOneMillionTokens) {
  ASSERT_EQ(run("dsa-cost --dsa-model DeepSeek-V4-Flash --max-context 1048576 --step 65536 "
                "--plot flash.svg -o flash.json"),
            0);
  const nlohmann::json report = nlohmann::json::parse(slurp("flash.json"));
  EXPECT_EQ(report["models"]["dsa"]["window"], 128);
  EXPECT_EQ(report["points"].size(), 17u);
  EXPECT_EQ(report["points"].back()["position"], 1048576);
  std::vector<std::string> kinds;
  for (const auto& s : report["points"].back()["decode"]["dsa"]["stages"])
    kinds.push_back(s.value("layer_kind", "") + ":" + s["stage"].get<std::string>());
  EXPECT_EQ(kinds, (std::vector<std::string>{"swa:attention", "csa:indexer", "csa:topk",
                                             "csa:attention", "hca:attention", ":rest"}));
  EXPECT_NE(slurp("flash.svg").find("DeepSeek-V4-Flash (SWA+CSA+HCA)"), std::string::npos);
  EXPECT_NE(slurp("stderr.txt").find("at 1048576"), std::string::npos) << slurp("stderr.txt");
}

TEST_F(CostCli, CompareFailures) {
  const auto one_line_error = [&](const std::string& needle) {
    const std::string err = slurp("stderr.txt");
    EXPECT_EQ(err.rfind("dsa-cost: error: ", 0), 0u) << err;
    EXPECT_EQ(err.find('\n'), err.size() - 1) << err;
    EXPECT_NE(err.find(needle), std::string::npos) << err;
  };
  write("bad.json", R"({"base": "DeepSeek-V4-Pro", "compress_ratios": [4, 128]})");
  EXPECT_EQ(run("dsa-cost --dsa-model bad.json -o out.json"), 2);
  one_line_error("bad.json: field \"compress_ratios\" must be one ratio per layer, 61");
  EXPECT_EQ(run("dsa-cost --compare-models DeepSeek-V3.2,bad.json -o out.json"), 2);
  one_line_error("must be one ratio per layer");
  EXPECT_EQ(run("dsa-cost --compare-models DeepSeek-V3.2,DeepSeek-V4-Pro --baseline GPT "
                "-o out.json"),
            2);
  one_line_error("--baseline: no model named \"GPT\" among DeepSeek-V3.2, DeepSeek-V4-Pro");
  EXPECT_EQ(run("dsa-cost --compare-models DeepSeek-V3.2,deepseek-v3.2 -o out.json"), 2);
  one_line_error("two models are named \"DeepSeek-V3.2\"");
  EXPECT_EQ(run("dsa-cost --compare-models DeepSeek-V3.2 --set dsa.topk=1 -o out.json"), 2);
  one_line_error("--set: dsa.topk=1: unknown \"dsa\"");
  EXPECT_EQ(run("dsa-cost --baseline DeepSeek-V3.2 -o out.json"), 2);
  EXPECT_EQ(run("dsa-cost --compare-models DeepSeek-V3.2 --dsa-model DeepSeek-V4-Pro -o out.json"),
            2);
  EXPECT_FALSE(fs::exists(dir_ / "out.json"));
  // --set names a compared model by its name.
  ASSERT_EQ(run("dsa-cost --compare-models DeepSeek-V3.2,DeepSeek-V4-Pro --step 65536 "
                "--set DeepSeek-V4-Pro.topk=2048 -q -o out.json"),
            0);
  EXPECT_EQ(nlohmann::json::parse(slurp("out.json"))["comparison"]["models"][1]["topk"], 2048);
}

}  // namespace
}  // namespace dsa
