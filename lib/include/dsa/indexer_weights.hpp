// The lightning indexer's projections from hidden states h [L, d_model] (what dsa-fit learns,
// what dsa-score and dsa-select apply):
//   q_I[t]  = W_q h_t, reshaped [H_I, d_I]               (checkpoint name wq_b.weight)
//   k_I[s]  = LayerNorm(W_k h_s) * gamma + beta           (wk.weight, k_norm.weight/.bias)
//   w[t]    = W_w h_t                                     (weights_proj.weight)
// Matrices use PyTorch's nn.Linear layout [out, in] and no bias, as DeepSeek-V3.2-Exp's
// inference code (class Indexer) does. Differences from that code, on purpose: W_q projects
// from h, not from the query LoRA latent; no RoPE on part of q_I and k_I; w is taken as
// W_w h without the H_I^-0.5 · d_I^-0.5 factors (dsa-score --raw-weights applies them).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "dsa/tensor.hpp"

namespace dsa {

inline constexpr double kIndexerNormEps = 1e-6;  // k_norm's LayerNorm epsilon (model.py)

struct IndexerWeights {
  int64_t d_model = 0, heads = 0, dim = 0;  // d_model, H_I, d_I
  std::vector<double> wq;                   // [H_I * d_I, d_model]
  std::vector<double> wk;                   // [d_I, d_model]
  std::vector<double> k_norm_weight;        // [d_I] (gamma)
  std::vector<double> k_norm_bias;          // [d_I] (beta)
  std::vector<double> weights_proj;         // [H_I, d_model]
};

// Zero-filled weights of these sizes (gamma zero too); Error(usage) for a size < 1.
IndexerWeights zero_indexer_weights(int64_t d_model, int64_t heads, int64_t dim);
// nn.Linear's default initialization, U(-1/sqrt(d_model), 1/sqrt(d_model)), from
// std::mt19937_64 seeded with `seed`; gamma 1, beta 0 (nn.LayerNorm's).
IndexerWeights random_indexer_weights(int64_t d_model, int64_t heads, int64_t dim, uint64_t seed);

// Every parameter in a fixed order (wq, wk, k_norm weight, k_norm bias, weights_proj): for
// optimizers and tests that treat the weights as one vector.
std::vector<std::vector<double>*> parameters(IndexerWeights& weights);

// The tensor names, with a prefix such as "model.layers.3.self_attn.indexer.".
struct IndexerWeightNames {
  std::string wq, wk, k_norm_weight, k_norm_bias, weights_proj;
};
IndexerWeightNames indexer_weight_names(const std::string& prefix = "");

// f32 tensors under those names, for write_safetensors.
std::vector<Tensor> indexer_weight_tensors(const IndexerWeights& weights,
                                           const std::string& prefix = "");
// Reads the five tensors from a .safetensors file (any floating dtype); Error(bad_input)
// naming the file and tensor when one is missing or its shape does not fit the others.
IndexerWeights read_indexer_weights(const std::string& path, const std::string& prefix = "");

// q_I [..., H_I, d_I], k_I [..., d_I] and w [..., H_I] of hidden states [..., d_model]
// (every leading dimension kept), named "q_index", "k_index", "weights". Computed in double
// in a fixed order per token and rounded to f32, so the result does not depend on the thread
// count. Error(bad_input) when the hidden states' last dimension is not d_model.
struct IndexerProjection {
  Tensor q_index, k_index, weights;
};
IndexerProjection project_indexer(const Tensor& hidden, const IndexerWeights& weights);

}  // namespace dsa
