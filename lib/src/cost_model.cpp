// The model (DESIGN.md §3; the equations are in cost.hpp): the stages of one token, and the two
// models' curves over positions with their crossovers.
#include "dsa/cost.hpp"

#include <algorithm>

#include "dsa/error.hpp"

namespace dsa {

const char* phase_name(Phase phase) {
  return phase == Phase::prefill ? "prefill" : "decode";
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
  const double x = static_cast<double>(position), L = static_cast<double>(model.layers);
  const double H = static_cast<double>(model.heads);
  const bool prefill = phase == Phase::prefill;
  const bool sparse = model.topk > 0;
  const double chunk = static_cast<double>(workload.prefill_chunk);
  // Cached keys shared by the query tokens of a prefill step; per sequence in decode.
  const double key_share = prefill ? chunk : 1.0;

  TokenCost cost;
  if (sparse) {
    const double H_I = static_cast<double>(model.indexer_heads);
    const double d_I = static_cast<double>(model.indexer_dim);
    cost.stages.push_back(make_stage("indexer", "", model.indexer_precision, L * 2 * H_I * d_I * x,
                                     L * x * model.indexer_key_bytes / key_share, hardware));
    cost.stages.push_back(make_stage("topk", "", "", 0.0, L * x * model.score_bytes, hardware));
  }
  const double entries = sparse ? std::min(x, static_cast<double>(model.topk)) : x;
  const double mqa_flops = L * 2 * H * static_cast<double>(model.d_qk + model.d_v) * entries;
  // A sparse selection differs from token to token: its entries are read per token.
  const double mqa_bytes =
      L * entries * static_cast<double>(model.d_qk) * model.kv_bytes / (sparse ? 1.0 : key_share);
  const StageCost mqa = make_stage("attention", "mqa", "bf16", mqa_flops, mqa_bytes, hardware);
  const StageCost mha =
      make_stage("attention", "mha", "bf16",
                 L * 2 * H * static_cast<double>(model.d_qk_mha + model.d_v_mha) * x,
                 L * x * static_cast<double>(model.d_qk) * model.kv_bytes / chunk, hardware);
  if (!prefill) {
    cost.stages.push_back(mqa);
  } else if (!sparse) {
    cost.stages.push_back(mha);
  } else {
    cost.stages.push_back(model.short_prefill_mha && mha.seconds < mqa.seconds ? mha : mqa);
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

}  // namespace

CostCurves cost_curves(const ModelSpec& dense, const ModelSpec& dsa, const HardwareSpec& hardware,
                       const Workload& workload, int64_t max_position, int64_t step) {
  if (max_position < 1 || max_position > kMaxCostPosition) {
    bad_usage("the largest position must be in [1, {}], got {}", kMaxCostPosition, max_position);
  }
  if (step < 1) bad_usage("the step between positions must be at least 1, got {}", step);
  if (workload.decode_batch < 1 || workload.prefill_chunk < 1) {
    bad_usage("the decode batch and the prefill chunk must be at least 1, got {} and {}",
              workload.decode_batch, workload.prefill_chunk);
  }
  CostCurves curves;
  for (int64_t x = 0;; x = std::min(x + step, max_position)) {
    curves.points.push_back({x, token_cost(dense, hardware, workload, Phase::prefill, x),
                             token_cost(dsa, hardware, workload, Phase::prefill, x),
                             token_cost(dense, hardware, workload, Phase::decode, x),
                             token_cost(dsa, hardware, workload, Phase::decode, x)});
    if (x == max_position) break;
  }
  curves.prefill = summarize_phase(dense, dsa, hardware, workload, Phase::prefill, max_position);
  curves.decode = summarize_phase(dense, dsa, hardware, workload, Phase::decode, max_position);
  return curves;
}

}  // namespace dsa
