// The main attention's probabilities and the indexer's training target (target.hpp), apart from
// dsa-compare's metrics so that fitting does not depend on the report code.
#include "target.hpp"

#include <algorithm>

namespace dsa {

namespace detail {

void group_probabilities(const AttentionInputs& a, const KeyValues& kv, int64_t b,
                         const int64_t* rows, int64_t n_rows, int64_t g, int64_t visible_end,
                         float scale, RowMatrix& q_group, RowMatrix& probs, float* lse) {
  const int64_t H = a.heads, group = a.heads / a.kv_heads;
  q_group.resize(n_rows * group, a.d_qk);
  for (int64_t r = 0; r < n_rows; ++r) {
    to_f32(*a.q, ((b * a.queries + rows[r]) * H + g * group) * a.d_qk, group * a.d_qk,
           q_group.row(r * group).data());
  }
  const Strided keys(kv.key(0, g, a.d_qk), visible_end, a.d_qk, Eigen::OuterStride<>(kv.k_stride));
  probs.noalias() = scale * (q_group * keys.transpose());
  for (int64_t i = 0; i < n_rows * group; ++i) {
    const int64_t visible = a.position(rows[i / group]) + 1;
    float* p = probs.row(i).data();
    const float normalizer = softmax_row(p, visible);
    if (lse) lse[(i / group) * H + g * group + i % group] = normalizer;
    std::fill(p + visible, p + visible_end, 0.0f);
  }
}

void attention_target(const AttentionInputs& a, const KeyValues& kv, int64_t b, const int64_t* rows,
                      int64_t n_rows, int64_t visible_end, float scale, float* out) {
  const int64_t group = a.heads / a.kv_heads;
  RowMatrix q_group, probs;
  std::fill(out, out + n_rows * visible_end, 0.0f);
  for (int64_t g = 0; g < a.kv_heads; ++g) {
    group_probabilities(a, kv, b, rows, n_rows, g, visible_end, scale, q_group, probs);
    for (int64_t i = 0; i < n_rows * group; ++i) {
      const float* p = probs.row(i).data();
      float* sum = out + (i / group) * visible_end;
      for (int64_t s = 0; s < visible_end; ++s) sum[s] += p[s] / static_cast<float>(a.heads);
    }
  }
}

}  // namespace detail

}  // namespace dsa
