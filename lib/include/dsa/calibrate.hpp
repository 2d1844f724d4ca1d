// Calibration of the cost model (dsa-cost --calibrate, DESIGN.md §3): this machine's achieved
// rates, measured with the toolkit's own kernels, in place of a preset's datasheet rates; and the
// models' attention layers timed on a backend (the CPU or a GPU) at chosen context positions, per
// token and scaled by each model's layer schedule, beside the roofline's curves.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "dsa/cost.hpp"
#include "dsa/device.hpp"

namespace dsa {

// Achieved rates of this machine, measured with the toolkit's own kernels (CPU).
struct Calibration {
  std::string device;                  // "cpu"
  double attention_tflops = 0;         // dense_attention, MQA mode: replaces bf16_tflops
  double indexer_tflops = 0;           // IndexerKernel::score_rows (a GEMM): replaces fp8_tflops
  double sparse_attention_tflops = 0;  // sparse_attention: reported only
  double memory_tb_s = 0;       // a parallel memcpy, read + write bytes: replaces memory_tb_s
  nlohmann::json measurements;  // per kernel: problem, FLOPs or bytes, repeats, seconds
};
// About `seconds` of timing per kernel.
Calibration calibrate(double seconds);
// The hardware with the measured rates and efficiencies 1 (the rates are achieved ones).
HardwareSpec calibrated_hardware(const HardwareSpec& hardware, const Calibration& calibration);
nlohmann::json calibration_json(const Calibration& calibration);

// ---- Measured layers -----------------------------------------------------------------------
// One attention layer of a model timed as the toolkit runs it, on inputs of its shapes (random
// values, resident where the backend computes): the indexer and its top-k (mla with topk > 0,
// csa; fused where the backend fuses them), then the attention (MQA mode: mla dense over every
// visible key or sparse over the selection; swa, csa, hca over the window and their entries,
// with a sink). A query at position x attends positions 0 .. x (itself too).
struct LayerTimingRequest {
  LayerKind kind = LayerKind::mla;
  int64_t compress_ratio = 0;  // csa and hca
  int64_t heads = 0, d_qk = 0, d_v = 0;
  int64_t topk = 0;  // mla: 0 dense, else DSA's k; csa: k
  int64_t indexer_heads = 0, indexer_dim = 0;
  std::string indexer_precision = "fp8";  // "fp8" or "bf16"
  int64_t window = 0;                     // swa, csa, hca
  bool fp8_cache = false;  // mla: the latent cache in FlashMLA's fp8 format (kv_bytes < 2)
  Phase phase = Phase::prefill;
  int64_t position = 0;  // x
  // prefill: query rows of one sequence about x (prefill_rows); decode: sequences, one query
  // each at x, with their own caches.
  int64_t tokens = 1;
  double seconds = 0.1;  // timing budget: one run, then repeats for this long (DESIGN.md §3)
};
// The request for a group of a model's layers (layer_schedule).
LayerTimingRequest layer_timing_request(const ModelSpec& model, const LayerGroup& group,
                                        Phase phase, int64_t position, int64_t tokens,
                                        double seconds);

// A prefill's measured query rows about x: n = min(tokens, 2x + 1) rows from x - floor(n / 2),
// so that their positions average x (x - 1/2 for an even n).
struct PrefillRows {
  int64_t first = 0, rows = 0;
};
PrefillRows prefill_rows(int64_t position, int64_t tokens);

struct TimedStage {
  std::string stage;   // "indexer", "topk", "attention"
  double seconds = 0;  // one run of every row of every sequence
};
struct LayerTiming {
  int64_t first_position = 0;  // the first query row's position (decode: x)
  int64_t rows = 0;            // query rows per sequence
  int64_t sequences = 0;       // sequences, each with its own caches
  std::string attention;       // "dense", "sparse", "window", "window+selected", "window+all"
  std::string cache;           // the attention's cache as stored: "bf16", "fp8", "f32"
  std::string indexer;         // the indexer's arithmetic ("fp8", "bf16", "f32"); "" without one
  bool fused_topk = false;     // the indexer and its top-k one kernel (the scores never stored)
  std::vector<TimedStage> stages;
  int64_t repeats = 0;  // the runs the times are the mean of
  int64_t bytes = 0;    // what the inputs, outputs and scratch held
};
// Error(usage) naming the limit when the device's kernels do not take the shapes.
LayerTiming time_layer(const LayerTimingRequest& request, Device device);

// The models' tokens at `positions` with their layers measured: per group of like layers, each
// stage's time per token (a layer's run over the measured tokens, divided by them, times the
// group's layers), the rest of the model from the roofline (no toolkit kernel computes it); and
// the roofline's times of the same stages beside them.
struct MeasuredStage {
  std::string stage;
  LayerGroup layers;
  double seconds = 0;           // per token, every layer of the group
  double modelled_seconds = 0;  // the roofline's
  std::string modelled_mode;    // the roofline's attention mode ("mha" or "mqa"); measured: mqa
};
struct MeasuredRun {
  LayerGroup layers;
  LayerTiming timing;  // what ran for one layer of the group
};
struct MeasuredToken {
  std::vector<MeasuredStage> stages;
  std::vector<MeasuredRun> runs;  // per group
  double rest_seconds = 0;        // modelled
  double seconds = 0;             // the stages' and the rest's
  double modelled_seconds = 0;    // token_cost's
  double usd_per_million = 0, modelled_usd_per_million = 0;
};
struct MeasuredPoint {
  int64_t position = 0;
  MeasuredToken prefill, decode;
};
struct MeasuredModel {
  std::string name;
  std::vector<MeasuredPoint> points;
};
struct MeasuredCurves {
  std::string device;  // device_description
  int64_t prefill_rows = 0, decode_sequences = 0;
  double seconds = 0;  // per layer timing
  std::vector<int64_t> positions;
  std::vector<MeasuredModel> models;
};
// Error(usage) unless the positions are ascending and distinct, in 0 .. kMaxCostPosition.
void check_measured_positions(const std::vector<int64_t>& positions);
// Positions as check_measured_positions takes them; tokens >= 1 (prefill rows at most
// workload.prefill_chunk, decode sequences at most workload.decode_batch). Progress: the stage
// "measure", one unit per layer timing.
MeasuredCurves measure_curves(const std::vector<ModelSpec>& models, const HardwareSpec& hardware,
                              const Workload& workload, const std::vector<int64_t>& positions,
                              Device device, int64_t tokens, double seconds);
// The default positions: max_context / 64, / 16, / 4 and max_context (those >= 1, distinct).
std::vector<int64_t> default_measured_positions(int64_t max_context);
// The report's "measured".
nlohmann::json measured_json(const MeasuredCurves& curves);
// Per model at the longest position: measured against modelled, prefill and decode.
std::vector<std::string> measured_summary_lines(const MeasuredCurves& curves);

}  // namespace dsa
