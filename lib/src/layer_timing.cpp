// One model layer timed on a backend (calibrate.hpp time_layer, DESIGN.md §3): the request built
// from a model's layer group, the timing loop both backends share, and the CPU's layer on host
// tensors through the CPU backend's own entries.
#include <algorithm>
#include <optional>
#include <random>

#include <fmt/format.h>

#include "backend.hpp"
#include "dsa/calibrate.hpp"
#include "dsa/compressed_attention.hpp"
#include "dsa/error.hpp"
#include "dsa/indexer.hpp"
#include "dsa/kv_cache.hpp"
#include "dsa/report.hpp"
#include "dsa/topk.hpp"

namespace dsa {

LayerTimingRequest layer_timing_request(const ModelSpec& model, const LayerGroup& group,
                                        Phase phase, int64_t position, int64_t tokens,
                                        double seconds) {
  LayerTimingRequest r;
  r.kind = group.kind;
  r.compress_ratio = group.compress_ratio;
  r.heads = model.heads;
  r.d_qk = model.d_qk;
  r.d_v = model.d_v;
  const bool indexed =
      (group.kind == LayerKind::mla && model.topk > 0) || group.kind == LayerKind::csa;
  r.topk = group.kind == LayerKind::mla || group.kind == LayerKind::csa ? model.topk : 0;
  if (indexed) {
    r.indexer_heads = model.indexer_heads;
    r.indexer_dim = model.indexer_dim;
    r.indexer_precision = model.indexer_precision;
  }
  r.window = group.kind == LayerKind::mla ? 0 : model.window;
  r.fp8_cache = model.kv_bytes < 2;
  r.phase = phase;
  r.position = position;
  r.tokens = tokens;
  r.seconds = seconds;
  return r;
}

PrefillRows prefill_rows(int64_t position, int64_t tokens) {
  const int64_t n = std::min(tokens, 2 * position + 1);
  return {position - n / 2, n};
}

namespace detail {

RunTiming time_runs(const std::function<void(std::vector<TimedStage>&)>& run, double budget) {
  const auto total = [](const std::vector<TimedStage>& stages) {
    double s = 0;
    for (const auto& stage : stages) s += stage.seconds;
    return s;
  };
  RunTiming timing;
  run(timing.stages);
  timing.repeats = 1;
  if (total(timing.stages) >= budget) return timing;
  // The first run was a warm-up: the mean of the runs after it.
  std::vector<TimedStage> sum;
  double spent = 0;
  int64_t repeats = 0;
  do {
    std::vector<TimedStage> stages;
    run(stages);
    if (sum.empty()) {
      sum = stages;
    } else {
      for (std::size_t i = 0; i < sum.size(); ++i) sum[i].seconds += stages.at(i).seconds;
    }
    spent += total(stages);
    ++repeats;
  } while (spent < budget);
  for (auto& stage : sum) stage.seconds /= static_cast<double>(repeats);
  timing.repeats = repeats;
  timing.stages = std::move(sum);
  return timing;
}

namespace {

Tensor normal_tensor(Shape shape, float sigma, std::mt19937_64& rng, const char* name) {
  Tensor t = make_tensor(DType::f32, std::move(shape), name);
  std::normal_distribution<float> normal(0.0f, sigma);
  float* p = mutable_data<float>(t);
  for (int64_t i = 0; i < t.numel(); ++i) p[i] = normal(rng);
  return t;
}

Precision indexer_precision(const std::string& name) {
  return name == "bf16" ? Precision::bf16 : Precision::fp8;
}

}  // namespace

// The CPU computes in f32 from host tensors; a decode batch is one call over [B, 1, ...] inputs.
LayerTiming cpu_time_layer(const LayerTimingRequest& r) {
  std::mt19937_64 rng(2026);
  const bool decode = r.phase == Phase::decode;
  const PrefillRows rows = decode ? PrefillRows{r.position, 1} : prefill_rows(r.position, r.tokens);
  const int64_t B = decode ? r.tokens : 1, Lq = rows.rows, T = rows.first + rows.rows;
  const bool v4 = r.kind != LayerKind::mla;
  const int64_t ratio = r.kind == LayerKind::csa || r.kind == LayerKind::hca ? r.compress_ratio : 0;
  const int64_t entries = ratio > 0 ? T / ratio : 0;
  const bool indexed = r.indexer_heads > 0 && (r.kind == LayerKind::mla || entries > 0);
  const int64_t keys = r.kind == LayerKind::mla ? T : entries;

  LayerTiming t;
  t.first_position = rows.first;
  t.rows = Lq;
  t.sequences = B;
  t.cache = r.fp8_cache ? "fp8" : "f32";
  const Tensor q = normal_tensor({B, Lq, r.heads, r.d_qk}, 1.0f, rng, "timing q");
  // The caches in f32, or quantized into the fp8 format the model stores.
  const auto cache = [&](Shape shape, const char* name) {
    Tensor values = normal_tensor(std::move(shape), 1.0f, rng, name);
    if (!r.fp8_cache) return values;
    return v4 ? quantize_v4_cache_fp8(values) : quantize_kv_cache_fp8(values);
  };
  const Tensor kv = cache({B, T, r.d_qk}, "timing kv");
  std::optional<Tensor> compressed, sink, q_index, k_index, weights, indices;
  if (ratio > 0) compressed = cache({B, entries, r.d_qk}, "timing entries");
  if (v4) sink = normal_tensor({r.heads}, 1.0f, rng, "timing sink");
  IndexerConfig config;
  config.precision = indexer_precision(r.indexer_precision);
  if (indexed) {
    q_index = normal_tensor({B, Lq, r.indexer_heads, r.indexer_dim}, 1.0f, rng, "timing q_index");
    k_index = normal_tensor({B, keys, r.indexer_dim}, 1.0f, rng, "timing k_index");
    weights = normal_tensor({B, Lq, r.indexer_heads}, 1.0f, rng, "timing weights");
    indices = make_tensor(DType::i32, {B, Lq, r.topk}, "timing indices");
    t.indexer = precision_name(config.precision);
  }
  int64_t bytes = 0;
  for (const Tensor* x : {&q, &kv}) bytes += static_cast<int64_t>(x->nbytes());
  for (const auto* x : {&compressed, &sink, &q_index, &k_index, &weights, &indices}) {
    if (*x) bytes += static_cast<int64_t>((*x)->nbytes());
  }
  bytes += B * Lq * r.heads * (r.d_v + 1) * 4;  // one block of outputs at most; counted whole
  t.bytes = bytes;

  std::optional<IndexerInputs> indexer;
  if (indexed) {
    indexer = r.kind == LayerKind::mla
                  ? make_indexer_inputs(*q_index, *k_index, *weights, config)
                  : make_compressed_indexer_inputs(*q_index, *k_index, *weights, config, ratio, T);
  }
  std::optional<AttentionInputs> mqa;
  if (!v4) mqa = make_mqa_inputs(q, kv, r.d_v);
  std::optional<CompressedAttentionInputs> v4_inputs;
  if (v4) {
    const V4Attention kind = r.kind == LayerKind::swa   ? V4Attention::swa
                             : r.kind == LayerKind::csa ? V4Attention::csa
                                                        : V4Attention::hca;
    v4_inputs = make_compressed_attention_inputs(q, kv, compressed ? &*compressed : nullptr, &*sink,
                                                 kind, r.window);
  }
  t.attention = !v4                        ? (r.topk > 0 ? "sparse" : "dense")
                : r.kind == LayerKind::swa ? "window"
                : r.kind == LayerKind::csa ? "window+selected"
                                           : "window+all";
  const float scale = default_scale(r.d_qk);
  const AttentionSink discard = [](const AttentionBlock&) {};
  const auto run = [&](std::vector<TimedStage>& stages) {
    if (indexer) {
      StageTimes times;
      int32_t* out = mutable_data<int32_t>(*indices);
      const SelectionSink keep = [&](const SelectionBlock& block) {
        std::copy_n(block.indices, block.rows * block.k,
                    out + (block.batch * Lq + block.row_begin) * block.k);
      };
      cpu_select_from_indexer(*indexer, config, r.topk, keep, &times);
      stages.push_back({"indexer", times.get("prepare") + times.get("score")});
      stages.push_back({"topk", times.get("select")});
    }
    const Stopwatch watch;
    if (v4) {
      cpu_compressed_attention(*v4_inputs,
                               r.kind == LayerKind::csa && indices ? &*indices : nullptr, scale,
                               discard, nullptr);
    } else {
      cpu_attention(*mqa, indices ? &*indices : nullptr, scale, discard, nullptr);
    }
    stages.push_back({"attention", watch.seconds()});
  };
  const RunTiming timing = time_runs(run, r.seconds);
  t.stages = timing.stages;
  t.repeats = timing.repeats;
  return t;
}

}  // namespace detail

LayerTiming time_layer(const LayerTimingRequest& r, Device device) {
  if (r.heads < 1 || r.d_qk < 1 || r.d_v < 1 || r.d_v > r.d_qk) {
    fail(ExitCode::usage,
         "a measured layer needs heads, d_qk >= 1 and 1 <= d_v <= d_qk, got {}, {}, {}", r.heads,
         r.d_qk, r.d_v);
  }
  if (r.position < 0 || r.tokens < 1) {
    fail(ExitCode::usage, "a measured layer needs a position >= 0 and tokens >= 1, got {} and {}",
         r.position, r.tokens);
  }
  const bool indexed = r.kind == LayerKind::csa || (r.kind == LayerKind::mla && r.topk > 0);
  if (indexed && (r.topk < 1 || r.indexer_heads < 1 || r.indexer_dim < 1)) {
    fail(ExitCode::usage,
         "a measured {} layer with an indexer needs topk, indexer_heads and indexer_dim >= 1",
         layer_kind_name(r.kind));
  }
  if (r.kind != LayerKind::mla && (r.window < 1 || r.d_v != r.d_qk)) {
    fail(ExitCode::usage, "a measured {} layer needs window >= 1 and d_v = d_qk (K = V)",
         layer_kind_name(r.kind));
  }
  // The toolkit's V4 attention (compressed_attention.hpp) is the released model's: CSA entries
  // of 4 tokens, HCA's of 128.
  if (r.kind == LayerKind::csa || r.kind == LayerKind::hca) {
    const int64_t ratio =
        v4_compress_ratio(r.kind == LayerKind::csa ? V4Attention::csa : V4Attention::hca);
    if (r.compress_ratio != ratio) {
      fail(ExitCode::usage, "a measured {} layer has compress_ratio {} in the toolkit, got {}",
           layer_kind_name(r.kind), ratio, r.compress_ratio);
    }
  }
  if (r.fp8_cache) {
    const bool v4 = r.kind != LayerKind::mla;
    const int64_t d = v4 ? kV4CacheDim : kFp8CacheDim;
    if (r.d_qk != d || (!v4 && r.d_v != kFp8CacheLatent)) {
      fail(ExitCode::usage,
           "a measured {} layer over the fp8 cache (kv_bytes < 2) needs d_qk {}{}, got d_qk {} "
           "and d_v {}",
           layer_kind_name(r.kind), d, v4 ? "" : " and d_v 512", r.d_qk, r.d_v);
    }
  }
  detail::Operation op;
  op.layer_timing = &r;
  return detail::backend(device, op).time_layer(r);
}

}  // namespace dsa
