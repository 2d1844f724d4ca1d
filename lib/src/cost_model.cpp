// The model (DESIGN.md §3; the equations are in cost.hpp): the layer schedule, what one layer
// reads, computes and holds, the stages of one token, the two models' curves over positions
// with their crossovers, and the comparison of several models.
#include "dsa/cost.hpp"

#include <algorithm>
#include <cctype>
#include <tuple>

#include "dsa/error.hpp"

namespace dsa {

const char* phase_name(Phase phase) {
  return phase == Phase::prefill ? "prefill" : "decode";
}

const char* layer_kind_name(LayerKind kind) {
  switch (kind) {
    case LayerKind::swa:
      return "swa";
    case LayerKind::csa:
      return "csa";
    case LayerKind::hca:
      return "hca";
    default:
      return "mla";
  }
}

std::vector<LayerGroup> layer_schedule(const ModelSpec& model) {
  if (model.compress_ratios.empty()) return {{LayerKind::mla, 0, model.layers}};
  std::vector<LayerGroup> groups;
  for (const int64_t ratio : model.compress_ratios) {
    const LayerKind kind = ratio == 0                 ? LayerKind::swa
                           : ratio == model.csa_ratio ? LayerKind::csa
                                                      : LayerKind::hca;
    const auto same = [&](const LayerGroup& g) {
      return g.kind == kind && g.compress_ratio == ratio;
    };
    const auto group = std::find_if(groups.begin(), groups.end(), same);
    if (group != groups.end()) {
      ++group->count;
    } else {
      groups.push_back({kind, ratio, 1});
    }
  }
  std::sort(groups.begin(), groups.end(), [](const LayerGroup& a, const LayerGroup& b) {
    return std::tie(a.kind, a.compress_ratio) < std::tie(b.kind, b.compress_ratio);
  });
  return groups;
}

std::string attention_label(const ModelSpec& model) {
  if (model.compress_ratios.empty()) return model.topk > 0 ? "DSA" : "dense MLA";
  std::string label;
  LayerKind previous = LayerKind::mla;
  for (const LayerGroup& g : layer_schedule(model)) {
    if (g.kind == previous) continue;  // two HCA ratios, one name
    std::string name = layer_kind_name(g.kind);
    std::transform(name.begin(), name.end(), name.begin(),
                   [](unsigned char c) { return static_cast<char>(std::toupper(c)); });
    label += (label.empty() ? "" : "+") + name;
    previous = g.kind;
  }
  return label;
}

LayerFootprint layer_footprint(const ModelSpec& model, const LayerGroup& group, int64_t position) {
  const double x = static_cast<double>(position);
  const double entry_bytes = static_cast<double>(model.d_qk) * model.kv_bytes;  // E
  const double entry_flops = 2.0 * static_cast<double>(model.heads * (model.d_qk + model.d_v));
  const double key_flops = 2.0 * static_cast<double>(model.indexer_heads * model.indexer_dim);
  const double k = static_cast<double>(model.topk);
  LayerFootprint f;
  f.group = group;
  if (group.kind == LayerKind::mla) {
    const bool sparse = model.topk > 0;
    const double key_bytes = sparse ? model.indexer_key_bytes : 0.0;
    f.compressed_entries = x;
    f.attended_entries = sparse ? std::min(x, k) : x;
    f.indexed_keys = sparse ? x : 0.0;
    f.kv_bytes_per_token = entry_bytes + key_bytes;
    f.kv_cache_bytes = x * f.kv_bytes_per_token;
  } else {
    const bool csa = group.kind == LayerKind::csa;
    const double key_bytes = csa ? model.indexer_key_bytes : 0.0;
    f.window_entries = std::min(x, static_cast<double>(model.window));
    if (group.kind != LayerKind::swa) {
      const double r = static_cast<double>(group.compress_ratio);
      f.compressed_entries = static_cast<double>(position / group.compress_ratio);  // ⌊x/r⌋
      f.kv_bytes_per_token = (entry_bytes + key_bytes) / r;
    }
    f.attended_entries =
        f.window_entries + (csa ? std::min(k, f.compressed_entries) : f.compressed_entries);
    f.indexed_keys = csa ? f.compressed_entries : 0.0;
    f.kv_cache_bytes =
        f.window_entries * entry_bytes + f.compressed_entries * (entry_bytes + key_bytes);
  }
  f.attention_flops = entry_flops * f.attended_entries;
  f.indexer_flops = key_flops * f.indexed_keys;
  return f;
}

TokenFootprint token_footprint(const ModelSpec& model, int64_t position) {
  TokenFootprint t;
  for (const LayerGroup& g : layer_schedule(model)) {
    const LayerFootprint f = layer_footprint(model, g, position);
    const double n = static_cast<double>(g.count);
    t.attention_flops += n * (f.attention_flops + f.indexer_flops);
    t.kv_cache_bytes += n * f.kv_cache_bytes;
    t.kv_bytes_per_token += n * f.kv_bytes_per_token;
    t.layers.push_back(f);
  }
  t.flops = t.attention_flops + 2 * model.activated_params;
  return t;
}

namespace {

StageCost make_stage(const char* stage, const char* mode, const std::string& precision,
                     double flops, double bytes, const HardwareSpec& hardware) {
  StageCost s;
  s.stage = stage;
  s.mode = mode;
  s.precision = precision;
  s.flops = flops;
  s.bytes = bytes;
  const double peak = precision == "fp8" ? hardware.fp8_tflops : hardware.bf16_tflops;
  s.compute_seconds = flops > 0 ? flops / (peak * 1e12 * hardware.compute_efficiency) : 0.0;
  s.memory_seconds =
      bytes > 0 ? bytes / (hardware.memory_tb_s * 1e12 * hardware.memory_efficiency) : 0.0;
  s.seconds = std::max(s.compute_seconds, s.memory_seconds);  // the roofline
  return s;
}

}  // namespace

TokenCost token_cost(const ModelSpec& model, const HardwareSpec& hardware, const Workload& workload,
                     Phase phase, int64_t position) {
  const double x = static_cast<double>(position);
  const double H = static_cast<double>(model.heads);
  const double entry_bytes = static_cast<double>(model.d_qk) * model.kv_bytes;  // E
  const bool prefill = phase == Phase::prefill;
  const double chunk = static_cast<double>(workload.prefill_chunk);
  // Cached keys shared by the query tokens of a prefill step; per sequence in decode.
  const double key_share = prefill ? chunk : 1.0;

  TokenCost cost;
  const std::vector<LayerGroup> schedule = layer_schedule(model);
  cost.stages.reserve(3 * schedule.size() + 1);  // at most indexer, top-k, attention per group
  for (const LayerGroup& group : schedule) {
    const LayerFootprint f = layer_footprint(model, group, position);
    const double n = static_cast<double>(group.count);
    const auto add = [&](StageCost stage) {
      stage.layers = group;
      cost.stages.push_back(std::move(stage));
    };
    const bool indexed =
        group.kind == LayerKind::csa || (group.kind == LayerKind::mla && model.topk > 0);
    if (indexed) {
      add(make_stage("indexer", "", model.indexer_precision, n * f.indexer_flops,
                     n * f.indexed_keys * model.indexer_key_bytes / key_share, hardware));
      add(make_stage("topk", "", "", 0.0, n * f.indexed_keys * model.score_bytes, hardware));
    }
    // A selection differs from token to token: its entries are read per token. The window and
    // attention over every entry read what the tokens of a prefill step share.
    const double selected = indexed ? f.attended_entries - f.window_entries : 0.0;
    const double shared = f.attended_entries - selected;
    const StageCost mqa =
        make_stage("attention", "mqa", "bf16", n * f.attention_flops,
                   n * (shared * entry_bytes / key_share + selected * entry_bytes), hardware);
    if (group.kind != LayerKind::mla || !prefill) {
      add(mqa);
      continue;
    }
    const StageCost mha =
        make_stage("attention", "mha", "bf16",
                   n * 2 * H * static_cast<double>(model.d_qk_mha + model.d_v_mha) * x,
                   n * x * entry_bytes / chunk, hardware);
    if (model.topk == 0) {
      add(mha);
    } else {
      add(model.short_prefill_mha && mha.seconds < mqa.seconds ? mha : mqa);
    }
  }
  const double tokens_per_step = prefill ? chunk : static_cast<double>(workload.decode_batch);
  cost.stages.push_back(make_stage("rest", "", model.weight_precision, 2 * model.activated_params,
                                   model.activated_params * model.weight_bytes / tokens_per_step,
                                   hardware));
  for (const auto& s : cost.stages) cost.seconds += s.seconds;
  cost.usd_per_million = cost.seconds * hardware.price_per_gpu_hour / 3600.0 * 1e6;
  return cost;
}

namespace {

PhaseSummary summarize_phase(const ModelSpec& dense, const ModelSpec& dsa,
                             const HardwareSpec& hardware, const Workload& workload, Phase phase,
                             int64_t max_position) {
  // Seconds, not dollars, so that a price of 0 still finds the crossover.
  const auto costlier = [&](int64_t x) {
    const double a = token_cost(dsa, hardware, workload, phase, x).seconds;
    const double b = token_cost(dense, hardware, workload, phase, x).seconds;
    return a > b * (1 + 1e-12);
  };
  PhaseSummary summary;
  summary.max_position = max_position;
  int64_t x = max_position;
  while (x >= 0 && !costlier(x)) --x;
  if (x < max_position) summary.dsa_costlier_below = x + 1;
  const TokenCost a = token_cost(dense, hardware, workload, phase, max_position);
  const TokenCost b = token_cost(dsa, hardware, workload, phase, max_position);
  summary.dense_usd_per_million = a.usd_per_million;
  summary.dsa_usd_per_million = b.usd_per_million;
  summary.dense_over_dsa = a.seconds / b.seconds;
  return summary;
}

void check_positions(const Workload& workload, int64_t max_position, int64_t step) {
  if (max_position < 1 || max_position > kMaxCostPosition) {
    bad_usage("the largest position must be in [1, {}], got {}", kMaxCostPosition, max_position);
  }
  if (step < 1) bad_usage("the step between positions must be at least 1, got {}", step);
  if (workload.decode_batch < 1 || workload.prefill_chunk < 1) {
    bad_usage("the decode batch and the prefill chunk must be at least 1, got {} and {}",
              workload.decode_batch, workload.prefill_chunk);
  }
}

// 0, step, 2·step, ..., and max_position.
std::vector<int64_t> positions(int64_t max_position, int64_t step) {
  std::vector<int64_t> out;
  for (int64_t x = 0;; x = std::min(x + step, max_position)) {
    out.push_back(x);
    if (x == max_position) return out;
  }
}

}  // namespace

CostCurves cost_curves(const ModelSpec& dense, const ModelSpec& dsa, const HardwareSpec& hardware,
                       const Workload& workload, int64_t max_position, int64_t step) {
  check_positions(workload, max_position, step);
  CostCurves curves;
  for (const int64_t x : positions(max_position, step)) {
    curves.points.push_back({x, token_cost(dense, hardware, workload, Phase::prefill, x),
                             token_cost(dsa, hardware, workload, Phase::prefill, x),
                             token_cost(dense, hardware, workload, Phase::decode, x),
                             token_cost(dsa, hardware, workload, Phase::decode, x)});
  }
  curves.prefill = summarize_phase(dense, dsa, hardware, workload, Phase::prefill, max_position);
  curves.decode = summarize_phase(dense, dsa, hardware, workload, Phase::decode, max_position);
  return curves;
}

ModelComparison compare_models(const std::vector<ModelSpec>& models, std::size_t baseline,
                               const HardwareSpec& hardware, const Workload& workload,
                               int64_t max_position, int64_t step) {
  check_positions(workload, max_position, step);
  if (models.empty()) bad_usage("no models to compare");
  if (baseline >= models.size()) {
    bad_usage("the baseline must be one of the {} models, got #{}", models.size(), baseline + 1);
  }
  for (std::size_t i = 0; i < models.size(); ++i) {
    if (model_index(models, models[i].name) != i) {
      bad_usage(
          "two models are named \"{}\": give one its own name (a file with \"base\" and "
          "\"name\")",
          models[i].name);
    }
  }
  ModelComparison comparison{models, baseline, {}};
  for (const int64_t x : positions(max_position, step)) {
    ComparisonPoint point{x, {}};
    for (const ModelSpec& model : models) {
      point.models.push_back({token_footprint(model, x),
                              token_cost(model, hardware, workload, Phase::prefill, x),
                              token_cost(model, hardware, workload, Phase::decode, x)});
    }
    comparison.points.push_back(std::move(point));
  }
  return comparison;
}

}  // namespace dsa
