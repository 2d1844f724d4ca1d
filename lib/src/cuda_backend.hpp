// Internal: the CUDA backend's entry points behind the library's public functions. Defined in
// lib/cuda/ when the build has the backend (DSA_HAVE_CUDA); called only after
// resolve_device() returned Device::cuda.
#pragma once

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

}  // namespace dsa::cuda
