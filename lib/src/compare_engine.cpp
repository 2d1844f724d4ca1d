// dsa-compare's arithmetic on the CPU, behind the same CompareEngine as the GPU's (backend.hpp),
// so that one loop (metrics.cpp) compares on either device.
#include <algorithm>
#include <optional>
#include <vector>

#include "attention_kernels.hpp"
#include "backend.hpp"
#include "target.hpp"

namespace dsa::detail {

namespace {

class CpuCompareEngine : public CompareEngine {
 public:
  CpuCompareEngine(const AttentionInputs& a, const IndexerInputs* indexer,
                   const IndexerConfig& config, float scale, int64_t b)
      : a_(a), scale_(scale), b_(b), kv_(a, b), config_(config) {
    if (indexer) kernel_.emplace(*indexer, config, b);
    // Dense rows per task: a few rows' worth of H x Lk probabilities per thread. The product of
    // probabilities and values blocks its sums by the matrices' sizes, so the blocks start at
    // multiples of this from row 0 whatever the caller's chunks (compare_attention's chunks are
    // multiples of it): the same rows always share a product.
    block_ = dense_block(a);
  }

  static int64_t dense_block(const AttentionInputs& a) {
    const int64_t group = a.heads / a.kv_heads;
    return std::clamp<int64_t>((64 << 20) / std::max<int64_t>(1, group * a.keys * 4), 1, 16);
  }

  void scores(int64_t c0, int64_t rows, int64_t keys, float* out) override {
    const int64_t block = std::max<int64_t>(1, config_.query_block);
#pragma omp parallel for schedule(dynamic, 1)
    for (int64_t r0 = 0; r0 < rows; r0 += block) {
      kernel_->score_rows(c0 + r0, std::min(block, rows - r0), out + r0 * keys, keys);
    }
  }

  void attend(int64_t c0, int64_t rows, const int32_t* indices, int64_t k, float* out,
              float* lse) override {
    const int64_t H = a_.heads, d_qk = a_.d_qk, d_v = a_.d_v;
#pragma omp parallel
    {
      RowMatrix q(H, d_qk);
      std::vector<int64_t> selected;
      AttendScratch scratch;
#pragma omp for schedule(dynamic, 4)
      for (int64_t r = 0; r < rows; ++r) {
        selected.clear();
        for (int64_t j = 0; j < k; ++j) {
          if (indices[r * k + j] >= 0) selected.push_back(indices[r * k + j]);
        }
        to_f32(*a_.q, (b_ * a_.queries + c0 + r) * H * d_qk, H * d_qk, q.data());
        attend_selected(a_, kv_, q, selected.data(), static_cast<int64_t>(selected.size()), scale_,
                        out + r * H * d_v, lse + r * H, scratch);
      }
    }
  }

  void dense(int64_t c0, int64_t rows, float* out, float* lse, float* p, int64_t stride) override {
    const int64_t H = a_.heads, group = H / a_.kv_heads, d_v = a_.d_v;
#pragma omp parallel
    {
      RowMatrix q_group, probs, dense_group;
      std::vector<int64_t> block_rows;
#pragma omp for schedule(dynamic, 1)
      for (int64_t r0 = 0; r0 < rows; r0 += block_) {
        const int64_t n_rows = std::min(block_, rows - r0);
        const int64_t visible_end = a_.position(c0 + r0 + n_rows - 1) + 1;
        block_rows.resize(static_cast<std::size_t>(n_rows));
        for (int64_t r = 0; r < n_rows; ++r) block_rows[r] = c0 + r0 + r;
        for (int64_t r = 0; r < n_rows; ++r) {
          std::fill(p + (r0 + r) * stride, p + (r0 + r) * stride + visible_end, 0.0f);
        }
        for (int64_t g = 0; g < a_.kv_heads; ++g) {
          group_probabilities(a_, kv_, b_, block_rows.data(), n_rows, g, visible_end, scale_,
                              q_group, probs, lse + r0 * H);
          const Strided values(kv_.value(0, g, d_v), visible_end, d_v,
                               Eigen::OuterStride<>(kv_.v_stride));
          dense_group.noalias() = probs * values;
          for (int64_t i = 0; i < n_rows * group; ++i) {
            const int64_t r = i / group, h = g * group + i % group;
            std::copy_n(dense_group.row(i).data(), d_v, out + ((r0 + r) * H + h) * d_v);
            const float* ph = probs.row(i).data();
            float* sum = p + (r0 + r) * stride;
            for (int64_t s = 0; s < visible_end; ++s) sum[s] += ph[s] / static_cast<float>(H);
          }
        }
      }
    }
  }

 private:
  const AttentionInputs& a_;
  float scale_;
  int64_t b_;
  KeyValues kv_;
  IndexerConfig config_;
  std::optional<IndexerKernel> kernel_;
  int64_t block_ = 1;
};

}  // namespace

std::unique_ptr<CompareEngine> cpu_compare_engine(const AttentionInputs& attention,
                                                  const IndexerInputs* indexer,
                                                  const IndexerConfig& config, float scale,
                                                  int64_t b) {
  return std::make_unique<CpuCompareEngine>(attention, indexer, config, scale, b);
}

int64_t cpu_compare_rows(const AttentionInputs& attention) {
  return CpuCompareEngine::dense_block(attention);
}

}  // namespace dsa::detail
