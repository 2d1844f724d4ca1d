// Internal: the CUDA backend's entry points behind the library's public functions. Defined in
// lib/cuda/ when the build has the backend (DSA_HAVE_CUDA); called only after
// resolve_device() returned Device::cuda.
#pragma once

#include <memory>
#include <string>

#include "dsa/attention.hpp"
#include "dsa/indexer.hpp"
#include "dsa/topk.hpp"

namespace dsa::cuda {

// An empty string when a GPU is usable, else why not.
std::string unavailable_reason();
std::string describe();

void indexer_scores(const IndexerInputs& inputs, const IndexerConfig& config,
                    const std::function<void(const ScoreBlock&)>& sink, StageTimes* times);
void select_from_indexer(const IndexerInputs& inputs, const IndexerConfig& config, int64_t k,
                         const SelectionSink& sink, StageTimes* times);
void sparse_attention(const AttentionInputs& inputs, const Tensor* indices, float scale,
                      const AttentionSink& sink, StageTimes* times);

// dsa-compare's arithmetic on the GPU for batch element b (MQA, d_qk 512 or 576, d_v 512), in
// blocks of query rows [c0, c0 + rows), results on the host; the metrics stay in metrics.cpp.
class CompareEngine {
 public:
  CompareEngine(const AttentionInputs& attention, const IndexerInputs* indexer,
                const IndexerConfig& config, float scale, int64_t b);
  ~CompareEngine();
  CompareEngine(const CompareEngine&) = delete;
  CompareEngine& operator=(const CompareEngine&) = delete;
  // Indexer scores out [rows, keys] (Eq. 1, -inf where s > t).
  void scores(int64_t c0, int64_t rows, int64_t keys, float* out);
  // Attention over indices [rows, k] (-1 skipped): out [rows, H, d_v], lse [rows, H].
  void attend(int64_t c0, int64_t rows, const int32_t* indices, int64_t k, float* out, float* lse);
  // Dense attention out and lse, and the head-averaged dense probabilities p [rows, stride]
  // for s <= t.
  void dense(int64_t c0, int64_t rows, float* out, float* lse, float* p, int64_t stride);

 private:
  struct State;
  std::unique_ptr<State> state_;
};

}  // namespace dsa::cuda
