// Internal: the main attention's probabilities in blocks of query rows, shared by
// dsa-compare's metrics and the indexer's training target (metrics.cpp, fit.cpp).
#pragma once

#include <cstdint>

#include "attention_kernels.hpp"

namespace dsa::detail {

// Rows of f32 keys or values in place, `stride` floats apart.
using Strided = Eigen::Map<const RowMatrix, 0, Eigen::OuterStride<>>;

// Softmax probabilities (scale · q · k) of the `group` query heads of kv head g for query rows
// rows[0..n_rows) of batch element b, over keys [0, visible_end), zero beyond each row's
// position: probs [n_rows * group, visible_end]. q_group is scratch. With lse [n_rows, H], the
// natural-log normalizer of each of those heads goes there too.
void group_probabilities(const AttentionInputs& a, const KeyValues& kv, int64_t b,
                         const int64_t* rows, int64_t n_rows, int64_t g, int64_t visible_end,
                         float scale, RowMatrix& q_group, RowMatrix& probs, float* lse = nullptr);

// DESIGN.md's target p[t,:] of those rows: the probabilities summed over the H heads and
// L1-normalized (divided by H), [n_rows, visible_end] into out.
void attention_target(const AttentionInputs& a, const KeyValues& kv, int64_t b, const int64_t* rows,
                      int64_t n_rows, int64_t visible_end, float scale, float* out);

}  // namespace dsa::detail
