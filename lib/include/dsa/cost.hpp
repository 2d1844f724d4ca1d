// The inference cost model of DESIGN.md §3 (dsa-cost): what one token at context position x
// costs in prefill and in decode, dense MLA against DSA, on given hardware at a given price
// (the DeepSeek-V3.2-Exp paper's Figure 3 for any model and machine); and, for several models
// side by side, what one token computes and what the sequence's cache holds (the DeepSeek-V4
// paper's Figure 1).
//
// The model, per token at position x (x = the number of earlier tokens it attends to, as in
// DESIGN.md §3) and per layer, summed over the layers, plus the position-independent rest of
// the model. A layer of a uniform model (no compress_ratios: DeepSeek-V3.x, kind "mla") holds
// x latent entries and attends all of them (dense, topk 0) or m = min(x, k) (DSA):
//
//   stage                 FLOPs per token              bytes per token (HBM traffic)
//   dense attention,      2·H·(d_qk_mha + d_v_mha)·x   x·E / prefill_chunk
//     prefill (MHA mode)
//   dense attention,      2·H·(d_qk + d_v)·x           x·E
//     decode (MQA mode)
//   indexer (Eq. 1)       2·H_I·d_I·x                  x·indexer_key_bytes   (/ prefill_chunk
//                                                                              in prefill)
//   top-k (Eq. 2)         0                            x·score_bytes
//   sparse attention      2·H·(d_qk + d_v)·min(x, k)   min(x, k)·E
//     (MQA mode, prefill and decode)
//   rest of the model     2·activated_params           activated_params·weight_bytes / tokens
//                                                      per step (prefill_chunk or decode_batch)
//
// with E = d_qk·kv_bytes the bytes of one cached entry as stored.
//
// A model with compress_ratios (DeepSeek-V4) has one ratio r per layer and a sliding window of
// w entries on every layer: w_x = min(x, w) window entries and c = ⌊x/r⌋ compressed ones.
//   SWA (r = 0)           attends the w_x window entries only;
//   CSA (r = csa_ratio)   the indexer scores the c compressed entries (2·H_I·d_I·c FLOPs,
//                         c·indexer_key_bytes bytes, c·score_bytes for top-k) and the attention
//                         reads w_x + min(k, c) entries;
//   HCA (any other r)     attends w_x + c entries, no indexer.
// The attention is MQA mode in both phases, 2·H·(d_qk + d_v) FLOPs and E bytes per entry; in
// prefill the window and HCA entries are read once per prefill step, CSA's selection per token.
// Cache of the x earlier tokens per layer: mla x·(E + indexer_key_bytes with topk > 0); SWA
// w_x·E; CSA w_x·E + c·(E + indexer_key_bytes); HCA w_x·E + c·E.
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
// - Top-k is modelled as one read of the indexer's score row (one score of score_bytes per
//   scored key); its arithmetic (a radix select) is negligible against the indexer's.
// - The rest of the model costs 2 FLOPs per activated parameter; the attention projections
//   (and V4's compressors) are part of those parameters.
// - A token's own entry, and the MTP layer of a V4 model, are not counted.
//
// Time of a stage = max(FLOPs / (peak · compute_efficiency), bytes / (bandwidth ·
// memory_efficiency)), a roofline with the peak of the stage's precision (attention bf16; the
// indexer and the weights at their own precision), per group of like layers. The stages of a
// token run one after the other: their times are summed (no overlap assumed). Cost per million
// tokens = seconds per token × price_per_gpu_hour / 3600 × 1e6.
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "dsa/report.hpp"

namespace dsa {

// /2 added the layer schedule (compress_ratios, window, csa_ratio), the stages' layer_kind,
// layers and compress_ratio, and the comparison of several models (--compare-models); /3 the
// measured layers ("measured", calibrate.hpp) and hardware.calibrated meaning the rates alone.
inline constexpr const char* kCostSchema = "dsa-cost/3";

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
// Without compress_ratios every layer is MLA (with DSA when topk > 0); with them, each layer is
// SWA, CSA or HCA by its ratio (DeepSeek-V4).
struct ModelSpec {
  std::string name;
  int64_t layers = 0;                 // L, not counting an MTP layer
  double activated_params = 0;        // per token, everything but attention's arithmetic
  double weight_bytes = 1;            // bytes per weight (1: fp8)
  std::string weight_precision;       // "bf16" or "fp8": the rate of the rest of the model
  int64_t heads = 0;                  // H
  int64_t d_qk_mha = 0, d_v_mha = 0;  // MHA mode (prefill): 192, 128 in DeepSeek-V3
  int64_t d_qk = 0, d_v = 0;          // MQA mode (latent): 576, 512; V4 512, 512 (K = V)
  double kv_bytes = 2;                // bytes per element of a cached entry, as stored
  int64_t indexer_heads = 0;          // H_I; 0 without an indexer
  int64_t indexer_dim = 0;            // d_I
  double indexer_key_bytes = 0;       // per cached token: d_I fp8 values + the block scale
  std::string indexer_precision;      // "bf16" or "fp8"
  double score_bytes = 0;             // per indexer score read by top-k
  int64_t topk = 0;                   // k; 0: dense attention over every earlier token
  bool short_prefill_mha = false;     // DSA prefill may use masked MHA where it is cheaper
  std::string source;
  // Optional (absent from a file: these defaults, a uniform MLA model).
  std::vector<int64_t> compress_ratios;  // one per layer: 0 SWA, csa_ratio CSA, other HCA
  int64_t window = 0;                    // w: the sliding window of every layer (V4: 128)
  int64_t csa_ratio = 0;                 // the ratio of the layers with an indexer (V4: 4)
};

// The layer schedule: a model's layers grouped by what they attend to.
enum class LayerKind { mla, swa, csa, hca };
const char* layer_kind_name(LayerKind kind);

struct LayerGroup {
  LayerKind kind = LayerKind::mla;
  int64_t compress_ratio = 0;  // csa and hca: r; mla and swa: 0
  int64_t count = 0;           // layers in the group
};

// A report's layer fields of a group: layer_kind, layers, and compress_ratio for csa and hca.
void add_layer_group(nlohmann::json& j, const LayerGroup& group);

// The groups in the order mla, swa, csa, hca, HCA groups by ascending ratio; every group has at
// least one layer and the counts add up to model.layers.
std::vector<LayerGroup> layer_schedule(const ModelSpec& model);
// "dense MLA", "DSA", or the kinds of a schedule, e.g. "SWA+CSA+HCA".
std::string attention_label(const ModelSpec& model);

// What one layer of a group reads, computes and holds for one token at position x, in MQA
// mode (decode): the formulas above, per layer.
struct LayerFootprint {
  LayerGroup group;
  double window_entries = 0;      // w_x (mla: 0)
  double compressed_entries = 0;  // c (mla: x, every latent entry)
  double attended_entries = 0;    // what the attention reads: window plus selected or all
  double indexed_keys = 0;        // keys the indexer scores (0 without an indexer)
  double attention_flops = 0, indexer_flops = 0;
  double kv_cache_bytes = 0;      // the cache of the x earlier tokens: entries, indexer keys
  double kv_bytes_per_token = 0;  // what each further token adds to it, on average
};
LayerFootprint layer_footprint(const ModelSpec& model, const LayerGroup& group, int64_t position);

// One token's footprint over the whole model (the DeepSeek-V4 paper's Figure 1): its decode
// FLOPs and the KV cache it reads from.
struct TokenFootprint {
  std::vector<LayerFootprint> layers;  // per group of layer_schedule(model), values per layer
  double attention_flops = 0;          // Σ count·(attention_flops + indexer_flops)
  double flops = 0;                    // attention_flops + 2·activated_params
  double kv_cache_bytes = 0;           // Σ count·kv_cache_bytes
  double kv_bytes_per_token = 0;       // Σ count·kv_bytes_per_token
};
TokenFootprint token_footprint(const ModelSpec& model, int64_t position);

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
  LayerGroup layers;      // the layers it sums over; count 0 for "rest"
  double flops = 0, bytes = 0;
  double compute_seconds = 0, memory_seconds = 0, seconds = 0;
};

struct TokenCost {
  std::vector<StageCost> stages;
  double seconds = 0;          // summed over the stages
  double usd_per_million = 0;  // cost of a million such tokens
};

// The cost of one token at position x >= 0 under the model above: per group of layers (in
// layer_schedule's order) its indexer and top-k (mla with topk > 0, csa) and its attention,
// then the rest.
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
// The same for a model, which may also be a variant NAME@FIELD=VALUE[@FIELD=VALUE...]
// (e.g. DeepSeek-V3.2-Exp@topk=1024), named by the whole text, each VALUE read as in
// apply_override: several variants of one model can then be compared in one figure.
ModelSpec load_model(const PresetLibrary& presets, const std::string& name_or_file);
// From a JSON object; `origin` names it in messages.
HardwareSpec hardware_from_json(const nlohmann::json& json, const std::string& origin,
                                const HardwareSpec* base = nullptr);
ModelSpec model_from_json(const nlohmann::json& json, const std::string& origin,
                          const ModelSpec* base = nullptr);
nlohmann::json hardware_json(const HardwareSpec& hardware);
nlohmann::json model_json(const ModelSpec& model);

// One field overridden, KEY=VALUE with KEY hardware.FIELD or MODEL.FIELD, MODEL one of the
// models' keys (in any case; FIELD is what follows the last '.' before '='); VALUE is JSON (a
// number, true/false, "text", [4, 128]) or else taken as a string. Checked like a file's field;
// messages start with the assignment.
struct NamedModel {
  std::string key;  // "dense", "dsa", or a compared model's name
  ModelSpec* model;
};
void apply_override(const std::string& assignment, HardwareSpec& hardware,
                    const std::vector<NamedModel>& models);
// The keys dense and dsa.
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
// With `measured` (calibrate.hpp), each model's measured costs as points beside its line.
struct MeasuredCurves;
std::string cost_plot_svg(const CostCurves& curves, const ModelSpec& dense, const ModelSpec& dsa,
                          const HardwareSpec& hardware, const Workload& workload,
                          const MeasuredCurves* measured = nullptr);
// "prefill: DSA costs more below position ...; at 131072 dense $... vs DSA $... (x.xx)".
std::string cost_summary_line(Phase phase, const PhaseSummary& summary);

// Several models side by side, each against a baseline among them: per position each one's
// footprint and its prefill and decode costs.
struct ComparedToken {
  TokenFootprint footprint;
  TokenCost prefill, decode;
};
struct ComparisonPoint {
  int64_t position = 0;
  std::vector<ComparedToken> models;  // in the order of ModelComparison::models
};
struct ModelComparison {
  std::vector<ModelSpec> models;
  std::size_t baseline = 0;
  std::vector<ComparisonPoint> points;  // 0, step, 2·step, ..., and max_position
};
// At least one model, distinct names, positions as cost_curves'.
ModelComparison compare_models(const std::vector<ModelSpec>& models, std::size_t baseline,
                               const HardwareSpec& hardware, const Workload& workload,
                               int64_t max_position, int64_t step);
// The index of the model named `name` (in any case); a usage error naming them otherwise.
std::size_t model_index(const std::vector<ModelSpec>& models, const std::string& name);

// The report's "comparison": the models, every layer group's footprint and the stages at the
// longest position, and per point each model's totals with the baseline's value over its own.
nlohmann::json comparison_json(const ModelComparison& comparison);
// One row per position and model, the numbers of the report's points.
std::string comparison_csv(const ModelComparison& comparison);
// Four panels: prefill and decode cost, decode FLOPs per token, KV cache; SVG 1.1 text.
std::string comparison_plot_svg(const ModelComparison& comparison, const HardwareSpec& hardware,
                                const Workload& workload, const MeasuredCurves* measured = nullptr);
// At the longest position: the baseline's footprint, then each other model's with the
// baseline's KV cache, FLOPs (all, and attention alone) and decode cost over its own.
std::vector<std::string> comparison_summary_lines(const ModelComparison& comparison);

// How run_cost's messages name the request's fields they are about ("--set: dsa.topk=1:
// unknown \"dsa\""): the tools give their flags, the Python module its keywords.
struct CostFieldNames {
  std::string overrides = "overrides", baseline = "baseline", compare_models = "compare_models";
  std::string calibrate_positions = "calibrate_positions";
};

// One run of dsa-cost (and of the Python module's cost()).
struct CostRequest {
  std::string hardware = "H800";  // NAME or FILE.json, as load_hardware reads it
  std::string dense_model = "DeepSeek-V3.1-Terminus", dsa_model = "DeepSeek-V3.2-Exp";
  std::vector<std::string> compare_models;  // not empty: these side by side, not dense and dsa
  std::string baseline;                     // among compare_models, by name; empty: the first
  Workload workload;
  int64_t max_context = 131072, step = 4096;
  std::vector<std::string> overrides;  // apply_override's assignments, in order
  bool calibrate = false;              // this machine's rates (calibrate.hpp) for the preset's
  double calibrate_seconds = 1.0;
  // Where --calibrate measures: on the CPU its rates replace the preset's, and with positions
  // the layers are measured too; on a GPU ("cuda", or "auto" finding one) the layers are
  // measured at `calibrate_positions` (default_measured_positions when empty) beside the
  // roofline of the preset's rates, which stay.
  std::string device = "cpu";
  std::vector<int64_t> calibrate_positions;
  int64_t calibrate_tokens = 0;  // rows of a measured prefill, sequences of a decode; 0: the
                                 // workload's on a GPU, kCpuMeasuredTokens on the CPU
  bool want_csv = false, want_plot = false;
  CostFieldNames names;
};

inline constexpr int64_t kCpuMeasuredTokens = 4;

struct CostRun {
  // The report but report_header's fields and "timings_ms", which the caller adds: "schema",
  // "presets", "hardware", "workload", "model", "calibration" when the rates are calibrated,
  // "measured" when layers are, then "models",
  // "summary" and "points" of the two models, or "comparison".
  nlohmann::json report;
  std::string csv, svg;              // with want_csv and want_plot: cost_csv or comparison_csv,
                                     // cost_plot_svg or comparison_plot_svg
  std::vector<std::string> summary;  // cost_summary_line per phase, or comparison_summary_lines
};

// The models and hardware loaded from `presets`, calibrated, overridden (in that order), then the
// two models' curves or the comparison of several, and their measured layers, timed as the stages
// "calibrate", "model" and "measure".
CostRun run_cost(const PresetLibrary& presets, const CostRequest& request,
                 StageTimes* times = nullptr);

}  // namespace dsa
