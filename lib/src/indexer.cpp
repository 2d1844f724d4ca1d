#include "dsa/indexer.hpp"

#include <algorithm>
#include <cmath>
#include <limits>

#include <Eigen/Core>

#include "backend.hpp"
#include "checks.hpp"
#include "chunks.hpp"
#include "cpu_kernels.hpp"
#include "dsa/error.hpp"
#include "progress.hpp"

namespace dsa {

namespace {

using RowMatrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

using detail::require_floating;

}  // namespace

namespace {

// The shapes both kinds of keys share; the length checks are the callers'.
IndexerInputs indexer_shapes(const Tensor& q_index, const Tensor& k_index, const Tensor& weights,
                             const IndexerConfig& config) {
  require_floating(q_index, "q_index");
  require_floating(k_index, "k_index");
  require_floating(weights, "weights");
  if (q_index.rank() != 3 && q_index.rank() != 4) {
    bad_input("{} (q_index): expected shape [B?, Lq, H_I, d_I], got {}", q_index.name,
              shape_string(q_index.shape));
  }
  IndexerInputs in;
  in.q_index = &q_index;
  in.k_index = &k_index;
  in.weights = &weights;
  in.batched = q_index.rank() == 4;
  const int64_t o = in.batched ? 1 : 0;
  in.batch = in.batched ? q_index.dim(0) : 1;
  in.queries = q_index.dim(o);
  in.heads = q_index.dim(o + 1);
  in.dim = q_index.dim(o + 2);
  if (in.heads < 1 || in.dim < 1) {
    bad_input("{} (q_index): H_I and d_I must be at least 1, got shape {}", q_index.name,
              shape_string(q_index.shape));
  }
  const Shape q_shape = q_index.shape;
  if (k_index.rank() != q_index.rank() - 1 || (in.batched && k_index.dim(0) != in.batch) ||
      k_index.dim(o + 1) != in.dim) {
    bad_input("{} (k_index): expected shape [{}Lk, {}] to match {} {}, got {}", k_index.name,
              in.batched ? fmt::format("{}, ", in.batch) : "", in.dim, q_index.name,
              shape_string(q_shape), shape_string(k_index.shape));
  }
  in.keys = k_index.dim(o);
  const Shape w_expected = with_batch({in.queries, in.heads}, in.batched, in.batch);
  if (weights.shape != w_expected) {
    bad_input("{} (weights): expected shape {} to match {} {}, got {}", weights.name,
              shape_string(w_expected), q_index.name, shape_string(q_shape),
              shape_string(weights.shape));
  }
  if (in.keys > std::numeric_limits<int32_t>::max()) {
    bad_input("{} (k_index): {} keys do not fit int32 indices", k_index.name, in.keys);
  }
  if (config.hadamard && !is_power_of_two(in.dim)) {
    bad_usage("the Hadamard rotation needs d_I to be a power of two, got {}", in.dim);
  }
  if (config.quant_block < 1) bad_usage("the fp8 block size must be positive");
  return in;
}

}  // namespace

void validate_indexer_config(const IndexerConfig& config) {
  if (config.ue8m0 && config.precision != Precision::fp8) {
    bad_usage("ue8m0 applies to precision fp8 only (precision is {})",
              precision_name(config.precision));
  }
}

nlohmann::json indexer_config_json(const IndexerConfig& config) {
  return {{"precision", precision_name(config.precision)},
          {"hadamard", config.hadamard},
          {"ue8m0", config.ue8m0},
          {"quant_block", config.quant_block},
          {"raw_weights", config.raw_weights},
          {"query_block", config.query_block}};
}

nlohmann::json indexer_report(const IndexerInputs& inputs, const IndexerConfig& config) {
  nlohmann::json report = {{"indexer", indexer_config_json(config)}};
  if (inputs.ratio > 1) {
    report["compressed_keys"] = {{"compress_ratio", inputs.ratio}, {"tokens", inputs.tokens}};
  }
  return report;
}

IndexerInputs make_indexer_inputs(const Tensor& q_index, const Tensor& k_index,
                                  const Tensor& weights, const IndexerConfig& config) {
  IndexerInputs in = indexer_shapes(q_index, k_index, weights, config);
  if (in.queries > in.keys) {
    bad_input(
        "{} (q_index) has {} queries but {} (k_index) only {} keys: queries are the last Lq "
        "positions of the keys",
        q_index.name, in.queries, k_index.name, in.keys);
  }
  in.tokens = in.keys;
  return in;
}

IndexerInputs make_compressed_indexer_inputs(const Tensor& q_index, const Tensor& k_index,
                                             const Tensor& weights, const IndexerConfig& config,
                                             int64_t ratio, int64_t tokens) {
  if (ratio < 1) bad_usage("compress ratio must be at least 1, got {}", ratio);
  IndexerInputs in = indexer_shapes(q_index, k_index, weights, config);
  if (tokens < in.queries) {
    bad_input(
        "{} (q_index) has {} queries but the keys come from {} tokens: queries are the last "
        "Lq tokens",
        q_index.name, in.queries, tokens);
  }
  if (in.keys != tokens / ratio) {
    bad_input("{} (k_index) has {} keys, but {} tokens make floor({} / {}) = {} compressed entries",
              k_index.name, in.keys, tokens, tokens, ratio, tokens / ratio);
  }
  in.tokens = tokens;
  in.ratio = ratio;
  return in;
}

IndexerInputs make_indexer_inputs(const Tensor& q_index, const Tensor& k_index,
                                  const Tensor& weights, const IndexerConfig& config, int64_t ratio,
                                  std::optional<int64_t> tokens) {
  if (ratio == 1 && !tokens) return make_indexer_inputs(q_index, k_index, weights, config);
  const int64_t queries = q_index.rank() >= 3 ? q_index.dim(q_index.rank() - 3) : 0;
  return make_compressed_indexer_inputs(q_index, k_index, weights, config, ratio,
                                        tokens.value_or(queries));
}

void prepare_indexer_rows(float* rows, int64_t count, int64_t dim, const IndexerConfig& config,
                          float* scales) {
  const bool code_values = config.precision == Precision::fp8 && dim <= config.quant_block;
  for (int64_t r = 0; r < count; ++r) {
    float* row = rows + r * dim;
    scales[r] = 1.0f;
    if (config.hadamard) hadamard_transform(row, dim);
    if (config.precision == Precision::f32) continue;
    for (int64_t i = 0; i < dim; ++i) row[i] = round_to_bf16(row[i]);
    if (code_values) {
      scales[r] = fp8_quantize_block(row, dim, config.ue8m0);
    } else if (config.precision == Precision::fp8) {
      fp8_fake_quantize(row, dim, config.quant_block, config.ue8m0, row);
    } else if (config.precision == Precision::fp4) {
      fp4_fake_quantize(row, dim, kFp4IndexerBlock, row);
    }
  }
}

void indexer_head_weights(const float* w, const float* q_scales, int64_t count, int64_t heads,
                          int64_t dim, const IndexerConfig& config, float* out) {
  if (!config.raw_weights) {
    for (int64_t i = 0; i < count; ++i) out[i] = w[i] * q_scales[i];
    return;
  }
  // Python's n ** -0.5 in double, then f32 as PyTorch applies a scalar to a bf16 or f32 tensor.
  const auto head_factor = static_cast<float>(std::pow(static_cast<double>(heads), -0.5));
  const auto dim_factor = static_cast<float>(std::pow(static_cast<double>(dim), -0.5));
  for (int64_t i = 0; i < count; ++i) {
    out[i] = round_to_bf16(w[i] * head_factor) * q_scales[i] * dim_factor;
  }
}

IndexerKernel::IndexerKernel(const IndexerInputs& inputs, const IndexerConfig& config,
                             int64_t batch)
    : inputs_(inputs), config_(config), batch_(batch) {
  using detail::kPanel;
  const int64_t d = inputs.dim, n = inputs.keys * d;
  const int64_t padded = detail::ceil_div(inputs.keys, kPanel) * kPanel;
  std::vector<float> keys(static_cast<std::size_t>(n));
  to_f32(*inputs.k_index, batch * n, n, keys.data());
  key_scales_.assign(static_cast<std::size_t>(padded), 1.0f);
  prepare_indexer_rows(keys.data(), inputs.keys, d, config, key_scales_.data());
  // Panels of kPanel keys, element-major, so the kernels read one element of kPanel keys at once.
  panels_.assign(static_cast<std::size_t>(padded * d), 0);
  for (int64_t s = 0; s < inputs.keys; ++s) {
    float* panel = panels_.data() + s / kPanel * d * kPanel + s % kPanel;
    for (int64_t i = 0; i < d; ++i) panel[i * kPanel] = keys[s * d + i];
  }
}

void IndexerKernel::score_rows(int64_t row_begin, int64_t rows, float* out, int64_t stride) const {
  const int64_t H = inputs_.heads, d = inputs_.dim, Lk = inputs_.keys;
  RowMatrix q(rows * H, d);
  to_f32(*inputs_.q_index, (batch_ * inputs_.queries + row_begin) * H * d, rows * H * d, q.data());
  std::vector<float> q_scales(static_cast<std::size_t>(rows * H));
  prepare_indexer_rows(q.data(), rows * H, d, config_, q_scales.data());
  std::vector<float> w(static_cast<std::size_t>(rows * H));
  to_f32(*inputs_.weights, (batch_ * inputs_.queries + row_begin) * H, rows * H, w.data());
  indexer_head_weights(w.data(), q_scales.data(), rows * H, H, d, config_, w.data());
  std::vector<int64_t> visible(static_cast<std::size_t>(rows));
  for (int64_t r = 0; r < rows; ++r) visible[r] = inputs_.visible(row_begin + r);
  detail::cpu_kernels().indexer_scores({q.data(), w.data(), panels_.data(), key_scales_.data(),
                                        visible.data(), rows, H, d, out, stride});
  for (int64_t r = 0; r < rows; ++r) {
    std::fill(out + r * stride + visible[r], out + r * stride + Lk,
              -std::numeric_limits<float>::infinity());
  }
}

Shape score_shape(const IndexerInputs& inputs) {
  return with_batch({inputs.queries, inputs.keys}, inputs.batched, inputs.batch);
}

std::vector<RowRange> balanced_rows(const IndexerInputs& inputs, const IndexerConfig& config,
                                    int parts) {
  // A row's work: the keys it is scored against (and selects from), and one for its output.
  return balanced_rows(inputs.batch, inputs.queries, std::max<int64_t>(1, config.query_block),
                       parts,
                       [&](int64_t t) { return static_cast<double>(inputs.visible(t) + 1); });
}

void indexer_scores(const IndexerInputs& inputs, const IndexerConfig& config,
                    const std::function<void(const ScoreBlock&)>& sink, StageTimes* times,
                    Device device) {
  const RowRange share = resolve_rows(inputs.rows, inputs.batch * inputs.queries, "the indexer's");
  const detail::Backend& backend = detail::backend(device, {&inputs, &config, 0, nullptr, false});
  if (backend.device == Device::cpu) {
    backend.indexer_scores(inputs, config, sink, times);  // counts its blocks as they finish
    return;
  }
  // Another backend's chunks are counted on the host as they arrive.
  detail::Progress progress("score", share.end - share.begin);
  backend.indexer_scores(
      inputs, config,
      [&](const ScoreBlock& block) {
        sink(block);
        progress.advance(block.rows);
      },
      times);
}

void detail::cpu_indexer_scores(const IndexerInputs& inputs, const IndexerConfig& config,
                                const ScoreSink& sink, StageTimes* times) {
  const int64_t block = std::max<int64_t>(1, config.query_block);
  const int64_t chunk = detail::chunk_rows(block, inputs.keys * 4);
  const RowRange share = resolve_rows(inputs.rows, inputs.batch * inputs.queries, "the indexer's");
  std::vector<float> scores;
  Progress progress("score", share.end - share.begin);
  for (int64_t b = 0; b < inputs.batch; ++b) {
    const QueryRows queries = batch_queries(share, b, inputs.queries);
    if (queries.first >= queries.last) continue;
    Stopwatch prepare;
    const IndexerKernel kernel(inputs, config, b);
    if (times) times->add("prepare", prepare.seconds());
    for (int64_t c0 = queries.first; c0 < queries.last; c0 += chunk) {
      const int64_t rows = std::min(chunk, queries.last - c0);
      scores.resize(static_cast<std::size_t>(rows * inputs.keys));
      Stopwatch watch;
#pragma omp parallel for schedule(dynamic, 1)
      for (int64_t r0 = 0; r0 < rows; r0 += block) {
        const int64_t n = std::min(block, rows - r0);
        kernel.score_rows(c0 + r0, n, scores.data() + r0 * inputs.keys, inputs.keys);
        progress.advance(n);
      }
      if (times) times->add("score", watch.seconds());
      sink({b, c0, rows, inputs.keys, scores.data()});
    }
  }
}

}  // namespace dsa
