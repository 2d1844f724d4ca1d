// The inference cost model of DESIGN.md §3 (dsa-cost): what one token at context position x
// costs in prefill and in decode, dense MLA against DSA, on given hardware at a given price
// (the paper's Figure 3 for any model and machine).
//
// The model, per token at position x (x = the number of earlier tokens it attends to, as in
// DESIGN.md §3) and per layer, times the L layers, plus the position-independent rest of the
// model:
//
//   stage                 FLOPs per token              bytes per token (HBM traffic)
//   dense attention,      2·H·(d_qk_mha + d_v_mha)·x   x·d_qk·kv_bytes / prefill_chunk
//     prefill (MHA mode)
//   dense attention,      2·H·(d_qk + d_v)·x           x·d_qk·kv_bytes
//     decode (MQA mode)
//   indexer (Eq. 1)       2·H_I·d_I·x                  x·indexer_key_bytes   (/ prefill_chunk
//                                                                              in prefill)
//   top-k (Eq. 2)         0                            x·score_bytes
//   sparse attention      2·H·(d_qk + d_v)·min(x, k)   min(x, k)·d_qk·kv_bytes
//     (MQA mode, prefill and decode)
//   rest of the model     2·activated_params           activated_params·weight_bytes / tokens
//                                                      per step (prefill_chunk or decode_batch)
//
// Why these terms:
// - MLA runs in two modes. Prefill of the dense model uses MHA mode (per-head keys and values
//   up-projected from the latent, d 192/128): fewer FLOPs per key than the latent MQA mode
//   (576/512). Decode uses MQA mode for both models: it reads the compact latent cache. DSA's
//   sparse kernel is MQA mode in both phases (all H heads share the selected entries).
// - DeepSeek-V3.2-Exp's paper (Figure 3) says short prefills run a masked MHA mode that
//   simulates DSA. With `short_prefill_mha` the DSA prefill attention is the cheaper (by time)
//   of masked MHA over all x keys and sparse MQA over min(x, k); the stage reports its mode.
// - Decode: each sequence reads its own caches (latent cache, indexer keys); the weights are
//   read once per step and shared by the decode_batch sequences of the step.
// - Prefill: the cached keys of a layer and the weights are read once per prefill step of
//   prefill_chunk tokens (the least HBM traffic; kernels that re-read key tiles per query
//   tile hit L2), so prefill attention is compute-bound, as measured kernels are (DESIGN.md
//   §5). The sparse attention's selections differ per token: its entries are read per token.
// - Top-k is modelled as one read of the indexer's score row (x scores of score_bytes each);
//   its arithmetic (a radix select) is negligible against the indexer's.
// - The rest of the model costs 2 FLOPs per activated parameter; the attention projections
//   are part of those parameters in either MLA mode.
//
// Time of a stage = max(FLOPs / (peak · compute_efficiency), bytes / (bandwidth ·
// memory_efficiency)), a roofline with the peak of the stage's precision (attention bf16; the
// indexer and the weights at their own precision). The stages of a token run one after the
// other: their times are summed (no overlap assumed). Cost per million tokens =
// seconds per token × price_per_gpu_hour / 3600 × 1e6.
#pragma once

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

namespace dsa {

inline constexpr const char* kCostSchema = "dsa-cost/1";

// One GPU (or, calibrated, this machine): peak rates, efficiency factors and a price.
struct HardwareSpec {
  std::string name;
  double bf16_tflops = 0;         // dense (not 2:4 sparse) peak, 1e12 FLOP/s
  double fp8_tflops = 0;          // dense peak, 1e12 FLOP/s
  double memory_tb_s = 0;         // memory bandwidth, 1e12 bytes/s
  double price_per_gpu_hour = 0;  // $ per hour of one GPU
  double compute_efficiency = 1;  // achieved / peak arithmetic rate, in (0, 1]
  double memory_efficiency = 1;   // achieved / peak bandwidth, in (0, 1]
  std::string source;             // where the rates and efficiencies come from
  std::string price_source;       // where the price comes from
};

// The attention-relevant shape of one model. A dense model has topk = 0 and no indexer.
struct ModelSpec {
  std::string name;
  int64_t layers = 0;                 // L, every one with MLA (and with DSA: an indexer)
  double activated_params = 0;        // per token, everything but attention's arithmetic
  double weight_bytes = 1;            // bytes per weight (1: fp8)
  std::string weight_precision;       // "bf16" or "fp8": the rate of the rest of the model
  int64_t heads = 0;                  // H
  int64_t d_qk_mha = 0, d_v_mha = 0;  // MHA mode (prefill): 192, 128 in DeepSeek-V3
  int64_t d_qk = 0, d_v = 0;          // MQA mode (latent): 576, 512
  double kv_bytes = 2;                // bytes per element of the latent cache
  int64_t indexer_heads = 0;          // H_I; 0 without an indexer
  int64_t indexer_dim = 0;            // d_I
  double indexer_key_bytes = 0;       // per cached token: d_I fp8 values + the block scale
  std::string indexer_precision;      // "bf16" or "fp8"
  double score_bytes = 0;             // per indexer score read by top-k
  int64_t topk = 0;                   // k; 0: dense attention over every earlier token
  bool short_prefill_mha = false;     // DSA prefill may use masked MHA where it is cheaper
  std::string source;
};

// How the work is batched.
struct Workload {
  int64_t decode_batch = 64;     // sequences per decode step: tokens sharing one weight read
  int64_t prefill_chunk = 8192;  // tokens per prefill step: sharing weight and key reads
};

enum class Phase { prefill, decode };
const char* phase_name(Phase phase);

// One stage of one token: its counts, its roofline and its time.
struct StageCost {
  std::string stage;      // "indexer", "topk", "attention", "rest"
  std::string mode;       // attention: "mha" or "mqa"; others: ""
  std::string precision;  // the peak used: "bf16" or "fp8"
  double flops = 0, bytes = 0;
  double compute_seconds = 0, memory_seconds = 0, seconds = 0;
};

struct TokenCost {
  std::vector<StageCost> stages;
  double seconds = 0;          // summed over the stages
  double usd_per_million = 0;  // cost of a million such tokens
};

// The cost of one token at position x >= 0 under the model above.
TokenCost token_cost(const ModelSpec& model, const HardwareSpec& hardware, const Workload& workload,
                     Phase phase, int64_t position);

// The two models over a range of positions, and where DSA stops costing more.
struct CostPoint {
  int64_t position = 0;
  TokenCost prefill_dense, prefill_dsa, decode_dense, decode_dsa;
};

struct PhaseSummary {
  // The smallest x_c such that DSA costs no more than dense at every position in
  // [x_c, max_position]: below it, at some positions (all of them but 0 in practice), the
  // indexer's overhead makes DSA dearer. Empty when DSA costs more at max_position.
  std::optional<int64_t> dsa_costlier_below;
  int64_t max_position = 0;
  double dense_usd_per_million = 0, dsa_usd_per_million = 0;  // at max_position
  double dense_over_dsa = 0;
};

struct CostCurves {
  std::vector<CostPoint> points;  // 0, step, 2·step, ..., and max_position
  PhaseSummary prefill, decode;
};

// Positions 0..max_position by step (the last one always included); the crossovers are
// exact over every integer position. max_position at most kMaxCostPosition.
inline constexpr int64_t kMaxCostPosition = int64_t{1} << 24;
CostCurves cost_curves(const ModelSpec& dense, const ModelSpec& dsa, const HardwareSpec& hardware,
                       const Workload& workload, int64_t max_position, int64_t step);

// Presets and user files (data/presets/*.json). Every field is required, unless a user file
// names a preset to start from with "base"; unknown fields, missing fields, wrong types and
// values out of range are usage errors naming the file (and preset) and the field.
struct PresetLibrary {
  std::filesystem::path dir;  // holds hardware.json and models.json
  // How to choose another directory, for the message when dir holds no presets.
  std::string hint = "set DSA_PRESETS to another directory";
};
// `dir` when not empty, else $DSA_PRESETS, else the installed presets relative to the executable.
PresetLibrary find_presets(const std::string& dir);
std::vector<std::string> preset_names(const PresetLibrary& presets, const std::string& kind);

// NAME (a preset) or a path to a .json file (anything ending in .json or containing '/').
HardwareSpec load_hardware(const PresetLibrary& presets, const std::string& name_or_file);
ModelSpec load_model(const PresetLibrary& presets, const std::string& name_or_file);
// From a JSON object; `origin` names it in messages.
HardwareSpec hardware_from_json(const nlohmann::json& json, const std::string& origin,
                                const HardwareSpec* base = nullptr);
ModelSpec model_from_json(const nlohmann::json& json, const std::string& origin,
                          const ModelSpec* base = nullptr);
nlohmann::json hardware_json(const HardwareSpec& hardware);
nlohmann::json model_json(const ModelSpec& model);

// One field overridden, KEY=VALUE with KEY hardware.FIELD, dense.FIELD or dsa.FIELD; VALUE is
// JSON (a number, true/false, "text") or else taken as a string. Checked like a file's field;
// messages start with the assignment.
void apply_override(const std::string& assignment, HardwareSpec& hardware, ModelSpec& dense,
                    ModelSpec& dsa);

// The equations above as text: the report's "model" object.
nlohmann::json cost_model_json();
// The report's parts: per point every stage of every curve, and the summaries.
nlohmann::json cost_points_json(const CostCurves& curves);
nlohmann::json cost_summary_json(const CostCurves& curves);
// One row per point: position and the four costs per million tokens (shortest round-trip
// decimal, so it agrees with the JSON exactly).
std::string cost_csv(const CostCurves& curves);
// Two panels (prefill, decode), both curves, the crossovers marked; SVG 1.1 text.
std::string cost_plot_svg(const CostCurves& curves, const ModelSpec& dense, const ModelSpec& dsa,
                          const HardwareSpec& hardware, const Workload& workload);
// "prefill: DSA costs more below position ...; at 131072 dense $... vs DSA $... (x.xx)".
std::string cost_summary_line(Phase phase, const PhaseSummary& summary);

}  // namespace dsa
