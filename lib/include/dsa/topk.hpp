// Fine-grained token selection (Eq. 2): S_t = TopK_k({I[t,s] : s <= t}).
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include "dsa/indexer.hpp"
#include "dsa/report.hpp"
#include "dsa/rows.hpp"
#include "dsa/tensor.hpp"

namespace dsa {

// Buffers one thread reuses from row to row.
struct TopkScratch {
  std::vector<uint32_t> keys, candidates;
  std::vector<uint64_t> picked, buffer;
};

// One row: scores[0..visible) are the candidates. Writes k indices in descending score order,
// equal scores lower position first, NaN ranked like -inf; a row with fewer than k candidates
// is padded with -1 (score -inf). O(visible + k) time: radix selection, then a radix sort.
void select_topk_row(const float* scores, int64_t visible, int64_t k, int32_t* indices,
                     float* selected_scores, TopkScratch& scratch);

struct SelectionBlock {
  int64_t batch, row_begin, rows, k;
  const int32_t* indices;  // [rows, k]
  const float* scores;     // [rows, k]
  int64_t first_position;  // the position of query row row_begin (Lk - Lq + row_begin)
};
using SelectionSink = std::function<void(const SelectionBlock&)>;

// [B?, Lq, k]: the shape of the selection from these indexer inputs, or from this score matrix
// (its last dimension replaced; select_from_scores validates the rest).
Shape selection_shape(const IndexerInputs& inputs, int64_t k);
Shape selection_shape(const Tensor& scores, int64_t k);

// From a score matrix [B?, Lq, Lk]; query row t sees s <= Lk - Lq + t. `rows` are the query
// rows selected and handed to the sink (one rank's share, balanced_rows below; every row by
// default).
void select_from_scores(const Tensor& scores, int64_t k, const SelectionSink& sink,
                        StageTimes* times, RowRange rows = {});
// A job of `parts` ranks (docs/DESIGN.md section 8): shares of a score matrix's rows for
// select_from_scores, balanced by their candidates. Error(bad_input) for a tensor that is no
// score matrix, as select_from_scores says it.
std::vector<RowRange> balanced_rows(const Tensor& scores, int parts);

// Fused: scores a block of queries, selects, hands the block on; never stores Lq x Lk.
void select_from_indexer(const IndexerInputs& inputs, const IndexerConfig& config, int64_t k,
                         const SelectionSink& sink, StageTimes* times, Device device = Device::cpu);

}  // namespace dsa
