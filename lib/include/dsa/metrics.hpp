// Fidelity of sparse against dense attention (DESIGN.md section 2): what is lost at k.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "dsa/attention.hpp"
#include "dsa/indexer.hpp"
#include "dsa/report.hpp"
#include "dsa/tensor.hpp"

namespace dsa {

inline constexpr const char* kCompareSchema = "dsa-compare/2";

// Aggregate of a metric over rows. NaN values (undefined metrics) are left out of every field
// and counted apart; percentiles interpolate linearly between order statistics (NumPy's
// default). All fields but the counts are NaN when no value is defined.
struct Summary {
  int64_t count = 0;
  int64_t undefined = 0;
  double mean = NAN, p50 = NAN, p90 = NAN, p99 = NAN, min = NAN, max = NAN;
};
Summary summarize(const std::vector<double>& values);
nlohmann::json summary_json(const Summary& summary);  // NaN written as null

struct CompareInputs {
  AttentionInputs attention;
  float scale = 1.0f;
  // Either the indexer (selection by Eq. 1-2, and the KL metrics) ...
  std::optional<IndexerInputs> indexer;
  IndexerConfig indexer_config;
  // ... or a precomputed selection [B?, Lq, K] (validated against the attention inputs).
  const Tensor* indices = nullptr;
  std::vector<int64_t> positions;  // of the selection's rows, from .jsonl; may be empty
  // Optional needles [N, 2]: (query position t, key position s) pairs that must be selected.
  const Tensor* needles = nullptr;
  // Ascending k values; with the indexer, S_t at each k is the prefix of the selection at the
  // largest. With a precomputed selection: exactly one k, its width.
  std::vector<int64_t> topk = {2048};
};

// Per-row metrics at one k. Row r is (batch r / Lq, query r % Lq); per-head vectors are
// indexed r * H + h.
struct Fidelity {
  int64_t k = 0;
  std::vector<float> out_rel_err, out_cosine, mass_recall_head;  // [rows * H]
  // [rows]; kl_sparse (Eq. 4: KL(p[t,S_t] || softmax(I[t,S_t])), both renormalized on S_t) is
  // NaN without the indexer.
  std::vector<float> mass_recall, topk_recall, kl_sparse;
  int64_t needles = 0, needles_selected = 0;
  double error_squares_sparse = 0, reference_squares_sparse = 0;  // Frobenius, rows t+1 > k
  double error_squares_all = 0, reference_squares_all = 0;
  double sparse_flops = 0;
};

struct Comparison {
  int64_t batch = 1, queries = 0, keys = 0, heads = 0;
  // [rows]; Eq. 3: KL(p[t,:] || softmax(I[t,:])) over s <= t; empty without the indexer.
  std::vector<float> kl_dense;
  std::vector<Fidelity> per_k;
  double indexer_flops = 0, dense_flops = 0;
  std::vector<std::pair<std::string, double>> stage_seconds;  // wall clock per stage

  int64_t rows() const { return batch * queries; }
  int64_t position(int64_t row) const { return keys - queries + row % queries; }
};

// Dense and sparse attention in blocks of queries, never more than a few rows of L scores. On
// Device::cuda (MLA's latent inputs, d_qk 512 or 576, d_v 512) the GPU computes the scores,
// outputs and dense probabilities, and the host the selections and the metrics.
Comparison compare_attention(const CompareInputs& inputs, StageTimes* times,
                             Device device = Device::cpu);

// Where --device `name` runs the comparison on these inputs (choose_device in indexer.hpp says
// how; the GPU needs MLA's latent layout with d_qk 512 or 576 and d_v 512).
DeviceChoice choose_device(const std::string& name, const CompareInputs& inputs);

// The report's "results": per k, each metric summarized over rows with t + 1 > k ("sparse")
// and apart over rows with t + 1 <= k ("exact"), buckets by position, needle recall.
nlohmann::json comparison_json(const Comparison& comparison);

}  // namespace dsa
