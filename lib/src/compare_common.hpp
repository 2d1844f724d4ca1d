// Internal: what compare_attention (metrics.cpp) and compare_compressed_attention
// (compressed_compare.cpp) share.
#pragma once

#include <cstdint>
#include <utility>
#include <vector>

#include "dsa/metrics.hpp"
#include "dsa/tensor.hpp"

namespace dsa::detail {

// Needles [N, 2] as (t, s) pairs in ascending order; Error(bad_input) naming the tensor unless
// every t is a query position, first_query <= t < end, and 0 <= s <= t. `seen` names what s is
// in the message ("key", "token").
std::vector<std::pair<int64_t, int64_t>> read_needles(const Tensor& needles, int64_t first_query,
                                                      int64_t end, const char* seen);

// The comparison's shape with every per-k metric NaN (undefined until a row sets it), and
// kl_dense NaN per row when there is an indexer.
Comparison empty_comparison(int64_t batch, int64_t queries, int64_t keys, int64_t heads,
                            const std::vector<int64_t>& ks, bool with_indexer);

// The relative L2 error of one (row, head) output against another (inf when only the other is
// zero); returns the squared error and the squared norm of the other.
std::pair<double, double> relative_error(const float* out, const float* reference, int64_t d_v,
                                         float& rel_err);

}  // namespace dsa::detail
