// Fidelity of sparse against dense attention (DESIGN.md section 2): what is lost at k.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "dsa/attention.hpp"
#include "dsa/compressed_attention.hpp"
#include "dsa/indexer.hpp"
#include "dsa/report.hpp"
#include "dsa/rows.hpp"
#include "dsa/tensor.hpp"

namespace dsa {

inline constexpr const char* kCompareSchema = "dsa-compare/3";

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
  // Optional: the sparse attention reads this cache instead (the same queries over FlashMLA's
  // fp8 cache of attention's kv, kv_cache.hpp), so every metric is the fp8 cache's against the
  // dense reference over attention's own kv, and each k also reports the sparse output's loss
  // against the same selection over attention's kv (Fidelity::cache_*).
  const AttentionInputs* fp8_cache = nullptr;
  // The rows computed (one rank's share of a job, balanced_rows); the others' metrics stay NaN.
  // The comparison reads these, not the rows of `attention` and `indexer`.
  RowRange rows;
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
  // With CompareInputs::fp8_cache: per (row, head) the relative L2 error of the fp8 cache's
  // sparse output against the bf16 cache's over the same selection, and its Frobenius sums over
  // all rows; empty and 0 without.
  std::vector<float> cache_rel_err;
  double cache_error_squares = 0, cache_reference_squares = 0;
};

// What a comparison's global figures sum over rows, kept per row so that they are summed in row
// order whichever threads or ranks computed the rows: per k, squared output errors and norms (and
// the fp8 cache's), the positions attended and the needles (counted).
struct RowTotals {
  std::vector<double> error_squares, reference_squares;              // [k, row]
  std::vector<double> cache_error_squares, cache_reference_squares;  // [k, row], fp8 cache
  std::vector<int64_t> needle_counts;                                // [k]: (needles, selected)
  std::vector<int64_t> sparse_positions;                             // [k]
};

struct Comparison {
  int64_t batch = 1, queries = 0, keys = 0, heads = 0;
  // Compressed keys (DeepSeek-V4): the tokens they come from and tokens per key; 0 and 1 for
  // V3.2, where a key is a token.
  int64_t tokens = 0, ratio = 1;
  // [rows]; Eq. 3: KL(p[t,:] || softmax(I[t,:])) over s <= t; empty without the indexer.
  std::vector<float> kl_dense;
  std::vector<Fidelity> per_k;
  double indexer_flops = 0, dense_flops = 0;
  std::vector<std::pair<std::string, double>> stage_seconds;  // wall clock per stage
  std::string kv_cache;  // "fp8" when the sparse attention read the fp8 cache, else empty
  RowTotals totals;      // compare_attention's (DeepSeek-V3.2); empty for V4

  int64_t rows() const { return batch * queries; }
  int64_t position(int64_t row) const {
    return (tokens > 0 ? tokens : keys) - queries + row % queries;
  }
  // Keys the row's query sees: t + 1, or the complete compressed entries floor((t + 1) / ratio).
  int64_t visible(int64_t row) const {
    const int64_t n = (position(row) + 1) / ratio;
    return n < keys ? n : keys;
  }
};

// Dense and sparse attention in blocks of queries, never more than a few rows of L scores. On
// Device::cuda (MLA's latent inputs, d_qk 512 or 576, d_v 512) the GPU computes the scores,
// outputs and dense probabilities, and the host the selections and the metrics.
Comparison compare_attention(const CompareInputs& inputs, StageTimes* times,
                             Device device = Device::cpu);

// A job of `parts` ranks (docs/DESIGN.md section 8): contiguous shares of the rows, balanced by
// their causal work (a row at position t costs t + 1 dense positions and min(t + 1, k) sparse
// ones), each share starting at a multiple of the rows the CPU computes together (indexer query
// blocks, dense blocks), so every row is computed as one process computes it.
std::vector<RowRange> balanced_rows(const CompareInputs& inputs, int parts);
// One share's results as bytes (every per-row metric's slice, the per-row totals, the counts),
// and those bytes put into the whole comparison; once every share is in, finish_comparison
// gives one process's Comparison to the bit.
std::vector<std::byte> pack_rows(const Comparison& comparison, RowRange rows);
void unpack_rows(Comparison& comparison, RowRange rows, const std::vector<std::byte>& bytes);
// The global figures (Frobenius sums, needles, sparse FLOPs) from the totals, in row order.
void finish_comparison(const CompareInputs& inputs, Comparison& comparison);

// Where --device `name` runs the comparison on these inputs (choose_device in indexer.hpp says
// how; the GPU needs MLA's latent layout with d_qk 512 or 576 and d_v 512).
DeviceChoice choose_device(const std::string& name, const CompareInputs& inputs);

// DeepSeek-V4 (docs/DESIGN.md section 6): CSA's selection, or HCA's compression, against
// `every_entry` (CSA with every visible entry: what the selection loses) or `dense` (causal
// attention over every raw token with the same sink: what compression and selection lose
// together, a probe: the model never computes it).
enum class V4Reference { every_entry, dense };
V4Reference parse_v4_reference(const std::string& text);  // "every-entry", "dense"
std::string v4_reference_name(V4Reference reference);

struct CompressedCompareInputs {
  CompressedAttentionInputs attention;  // CSA or HCA
  float scale = 1.0f;
  V4Reference reference = V4Reference::every_entry;
  // CSA: the indexer over the compressed keys (make_compressed_indexer_inputs, ratio 4) ...
  std::optional<IndexerInputs> indexer;
  IndexerConfig indexer_config;
  // ... or a precomputed selection of entries [B?, Lq, K]; HCA takes neither.
  const Tensor* indices = nullptr;
  std::vector<int64_t> positions;
  const Tensor* needles = nullptr;    // [N, 2] (t, s): s counts as kept in the window or its entry
  std::vector<int64_t> topk = {512};  // ascending; one k (the width) with indices; none for HCA
  // Optional: the window and entries are read from DeepSeek-V4's fp8 caches of attention's kv
  // and compressed instead (make_compressed_attention_inputs over quantize_v4_cache_fp8's
  // caches, the same queries and sink), so every metric is the fp8 caches' against the
  // reference over attention's own values, and each k also reports the output's loss against
  // the same selection over attention's values (Fidelity::cache_*, "kv_cache_loss").
  const CompressedAttentionInputs* fp8_cache = nullptr;
};

// The same Comparison as compare_attention's, per k, over the window and the selection (HCA:
// one "k", the entry count, every visible entry). Against every_entry, mass_recall_head is
// exp(lse_S - lse_ref) (the sink's and the window's shares are kept by both), topk_recall and
// the KL metrics use the reference's head-averaged probabilities of the entries, renormalized
// over the entries (Eq. 3, 4 on compressed keys); against dense they are NaN (the key sets
// differ). Rows with at most k visible entries are "exact". On the CPU; attention on `device`.
Comparison compare_compressed_attention(const CompressedCompareInputs& inputs, StageTimes* times,
                                        Device device = Device::cpu);

// The report's "results": per k, each metric summarized over rows with t + 1 > k ("sparse")
// and apart over rows with t + 1 <= k ("exact"), buckets by position, needle recall, and with
// the fp8 cache its "kv_cache_loss" (out_rel_err and out_rel_err_global against bf16). With
// compressed keys, "t + 1" is the visible entry count and the buckets count entries.
nlohmann::json comparison_json(const Comparison& comparison);

// The fields of dsa-compare's report that the inputs and the comparison give: "shape" (with the
// indexer's "indexer_heads" and "indexer_dim"), "layout", "scale", "selection", "indexer" (with
// the indexer), "results" (comparison_json), "flops" and "stage_ms". The caller adds the header,
// "schema", "inputs", "device", "scale_rule" and its own fields and timings.
nlohmann::json comparison_report(const CompareInputs& inputs, const Comparison& comparison);
// The same for DeepSeek-V4: "layout" v4, "attention", "reference", "window", "compress_ratio",
// "sink", and the shape's "tokens", "entries" and "d" besides.
nlohmann::json comparison_report(const CompressedCompareInputs& inputs,
                                 const Comparison& comparison);

}  // namespace dsa
