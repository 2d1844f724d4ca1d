// The lightning indexer (Eq. 1): I[t,s] = sum_j w[t,j] * ReLU(q_I[t,j,:] . k_I[s,:]), causal.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <vector>

#include <nlohmann/json.hpp>

#include "dsa/device.hpp"
#include "dsa/precision.hpp"
#include "dsa/report.hpp"
#include "dsa/rows.hpp"
#include "dsa/tensor.hpp"

namespace dsa {

struct IndexerConfig {
  Precision precision = Precision::f32;
  bool hadamard = false;      // rotate q_I and k_I along d_I before rounding/quantizing
  bool ue8m0 = false;         // fp8 scales rounded up to powers of two
  int64_t quant_block = 128;  // fp8: one scale per this many elements of a row
  bool raw_weights = false;   // w are raw weights_proj outputs: the released factors apply
  int64_t query_block = 16;   // query rows scored together
};
// Error(usage), naming the parameter, for a configuration that contradicts itself: ue8m0
// (power-of-two fp8 scales) without precision fp8.
void validate_indexer_config(const IndexerConfig& config);
// The report's "indexer": the configuration, every field.
nlohmann::json indexer_config_json(const IndexerConfig& config);

// Shapes of validated indexer inputs: q_I [B?, Lq, H_I, d_I], k_I [B?, Lk, d_I],
// w [B?, Lq, H_I]. Query row t sits at position Lk - Lq + t (decode when Lq < Lk).
// With compressed keys (DeepSeek-V4's CSA, docs/DESIGN.md section 6) the keys are entries of
// `ratio` tokens each: query row t sits at token position T - Lq + t of T tokens, and sees the
// entries j < floor((t + 1) / ratio), those whose window is complete.
struct IndexerInputs {
  const Tensor* q_index = nullptr;
  const Tensor* k_index = nullptr;
  const Tensor* weights = nullptr;
  bool batched = false;
  int64_t batch = 1, queries = 0, keys = 0, heads = 0, dim = 0;
  int64_t tokens = 0, ratio = 1;  // T (= keys unless compressed) and tokens per key
  // The query rows indexer_scores and select_from_indexer compute and hand to the sink (one
  // rank's share of a job, balanced_rows below); every row by default. A range that starts at a
  // multiple of config.query_block in its batch element gives each row the bits the whole
  // computation gives it.
  RowRange rows;

  int64_t position(int64_t row) const { return tokens - queries + row; }
  // Keys [0, visible(row)) are visible to the row: position + 1, or the complete entries.
  int64_t visible(int64_t row) const {
    const int64_t n = (position(row) + 1) / ratio;
    return n < keys ? n : keys;
  }
};
// Throws Error(bad_input) naming the tensor whose shape or dtype does not fit.
IndexerInputs make_indexer_inputs(const Tensor& q_index, const Tensor& k_index,
                                  const Tensor& weights, const IndexerConfig& config);
// Keys that are compressed entries of `ratio` tokens (DeepSeek-V4's CSA): k_index [B?, N, d_I]
// with N = floor(tokens / ratio), the queries the last Lq of the tokens.
IndexerInputs make_compressed_indexer_inputs(const Tensor& q_index, const Tensor& k_index,
                                             const Tensor& weights, const IndexerConfig& config,
                                             int64_t ratio, int64_t tokens);
// The inputs as the tools' --compress-ratio and --tokens (the Python module's compress_ratio and
// tokens) mean them: plain keys for ratio 1 and no tokens, else compressed entries of `ratio`
// tokens from `tokens` tokens, by default the queries' Lq (a whole prefill).
IndexerInputs make_indexer_inputs(const Tensor& q_index, const Tensor& k_index,
                                  const Tensor& weights, const IndexerConfig& config, int64_t ratio,
                                  std::optional<int64_t> tokens);

// The indexer for one batch element: keys prepared once (rotated, rounded or quantized),
// query rows scored on demand.
class IndexerKernel {
 public:
  IndexerKernel(const IndexerInputs& inputs, const IndexerConfig& config, int64_t batch);
  // Scores of query rows [row_begin, row_begin + rows) against every key, into out with the
  // given row stride (>= keys). Invisible entries (s > position) are -inf.
  void score_rows(int64_t row_begin, int64_t rows, float* out, int64_t stride) const;

 private:
  const IndexerInputs& inputs_;
  IndexerConfig config_;
  int64_t batch_;
  std::vector<float> panels_;      // the prepared keys, packed for the CPU kernels
  std::vector<float> key_scales_;  // prepare_indexer_rows's scale of each key (padded with 1)
};

// Applies the precision pipeline to rows of length dim, in the released code's order
// (DeepSeek-V3.2-Exp inference/model.py Indexer.forward; docs/DESIGN.md section 1):
//   1. the Hadamard rotation (if set), in f32;
//   2. bf16, fp8 and fp4: rounding to bf16 (the released rotate_activation returns bf16, and its
//      act_quant reads bf16);
//   3. fp8: block quantization to e4m3 (fp8_block_scale: amax · f32(1/448), or ue8m0);
//      fp4 (DeepSeek-V4's indexer, its fp4_act_quant with inplace=True): e2m1 in blocks of
//      kFp4IndexerBlock with ue8m0 scales (fp4_fake_quantize), the rows keeping the values
//      (exact in bf16), scales[r] = 1.
// Where an fp8 row is one block (dim <= quant_block, DSA's d_I = 128), the row keeps the values
// of its e4m3 codes and scales[r] its scale, which the scoring multiplies in after the dot product
// as the released fp8_index does (q's into the weights, k's into the head sum); rows of several
// blocks hold the values the codes stand for, with scales[r] = 1. Outside fp8 scales[r] = 1.
// The reference for every backend.
void prepare_indexer_rows(float* rows, int64_t count, int64_t dim, const IndexerConfig& config,
                          float* scales);

// The weight of head j in Eq. 1 as the scoring applies it, for count = rows * heads entries:
// out = w * q_scale, or with config.raw_weights (w are weights_proj outputs) the released steps
// (Indexer.forward): bf16(w · f32(H_I^-0.5)), then · q_scale, then · f32(d_I^-0.5), in f32.
// q_scales are prepare_indexer_rows's scales of the query rows (one per row and head).
void indexer_head_weights(const float* w, const float* q_scales, int64_t count, int64_t heads,
                          int64_t dim, const IndexerConfig& config, float* out);

struct ScoreBlock {
  int64_t batch, row_begin, rows, keys;
  const float* scores;  // [rows, keys]
};
// [B?, Lq, Lk]: the shape of the score matrix of these inputs.
Shape score_shape(const IndexerInputs& inputs);

// A job of `parts` ranks (docs/DESIGN.md section 8): shares of the rows of indexer_scores or
// select_from_indexer (a row costs its visible keys), each starting at a multiple of
// config.query_block in its batch element, so that the shares put together are the whole.
std::vector<RowRange> balanced_rows(const IndexerInputs& inputs, const IndexerConfig& config,
                                    int parts);

// The full causal score matrix, streamed in blocks of query rows (for small L). Every operation
// takes its device the same way, as its last parameter (choose_device gives it for a --device).
void indexer_scores(const IndexerInputs& inputs, const IndexerConfig& config,
                    const std::function<void(const ScoreBlock&)>& sink, StageTimes* times,
                    Device device = Device::cpu);

// Where --device `name` runs the indexer on these inputs (and, with topk > 0, its top-k
// selection): dsa/device.hpp's rules, asking the backend first whether it takes the shapes.
// "cuda" on inputs the GPU cannot take is Error(usage) naming the limit, before any work;
// "auto" then runs on the CPU and says so in the note.
DeviceChoice choose_device(const std::string& name, const IndexerInputs& inputs,
                           const IndexerConfig& config, int64_t topk = 0);

// The report fields of an indexer run (dsa-score, dsa-select's fused mode): "indexer"
// (indexer_config_json) and, over compressed keys, "compressed_keys" (compress_ratio, tokens).
nlohmann::json indexer_report(const IndexerInputs& inputs, const IndexerConfig& config);

}  // namespace dsa
