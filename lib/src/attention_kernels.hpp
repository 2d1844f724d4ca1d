// Internal: the CPU attention building blocks shared by attention.cpp and metrics.cpp.
#pragma once

#include <cstdint>
#include <optional>
#include <vector>

#include <Eigen/Core>

#include "dsa/attention.hpp"
#include "dsa/tensor.hpp"

namespace dsa::detail {

using RowMatrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

// f32 keys and values of one batch element; in MQA mode the values are the first d_v
// columns of the keys' rows.
struct KeyValues {
  F32Buffer k;
  std::optional<F32Buffer> v;  // absent in MQA mode
  int64_t k_stride, v_stride;  // floats between consecutive positions

  KeyValues(const AttentionInputs& in, int64_t b);
  const float* key(int64_t s, int64_t g, int64_t d_qk) const {
    return k.data() + s * k_stride + g * d_qk;
  }
  const float* value(int64_t s, int64_t g, int64_t d_v) const {
    return (v ? v->data() : k.data()) + s * v_stride + g * d_v;
  }
};

// Buffers one thread reuses from row to row: queries packed for the kernels (cpu_kernels.hpp),
// the running softmax state of each row, a tile's logits and its key and value rows.
struct AttendScratch {
  std::vector<float> q, acc, max, sum, logits;
  std::vector<const float*> keys, values;
};

// Attention of one query row q [H, d_qk] over the n positions in `selected` (all heads):
// out [H, d_v] and lse [H]; n == 0 gives zeros and -inf.
void attend_selected(const AttentionInputs& in, const KeyValues& kv, const RowMatrix& q,
                     const int64_t* selected, int64_t n, float scale, float* out, float* lse,
                     AttendScratch& scratch);

// Softmax of row[0..n) in place; returns its log-sum-exp.
float softmax_row(float* row, int64_t n);

}  // namespace dsa::detail
