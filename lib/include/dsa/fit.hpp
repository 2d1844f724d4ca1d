// Training the lightning indexer the way DeepSeek-V3.2-Exp does (DESIGN.md section 1): a dense
// warm-up minimizing KL(p[t,:] || softmax(I[t,:])) (Eq. 3), then a sparse stage minimizing
// KL(p[t,S_t] || softmax(I[t,S_t])) on the indexer's own top-k selection (Eq. 4). p is the
// frozen main attention's head-summed, L1-normalized distribution; only the indexer's
// projections (dsa/indexer_weights.hpp) learn, from hidden states that carry no gradient
// (the paper's detached input). Adam on analytic gradients, in double.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include <nlohmann/json.hpp>

#include "dsa/attention.hpp"
#include "dsa/indexer_weights.hpp"
#include "dsa/tensor.hpp"

namespace dsa {

inline constexpr const char* kFitSchema = "dsa-fit/3";

enum class FitStage { warmup, sparse };

// One layer's data, prefill: hidden states [L, d_model] and the main attention's inputs with
// Lq == Lk == L and no batch dimension.
struct FitData {
  const Tensor* hidden = nullptr;
  AttentionInputs attention;
  float scale = 1.0f;  // the main attention's softmax scale
};
// Throws Error(bad_input) naming the tensors when the shapes disagree, Error(usage) for a
// batched or decode-shaped attention input.
FitData make_fit_data(const Tensor& hidden, const AttentionInputs& attention, float scale);

// Mean over `rows` (query positions) of Eq. 3 (warm-up) or Eq. 4 (sparse), and its gradient
// with respect to every weight when `gradient` is not null (resized to the weights' sizes).
// Sparse stage: S_t is the top-k of the f32-rounded I[t,:] (the selection dsa-select makes);
// `selection` [rows.size(), k] (-1 padded) is filled with it, or, when it comes in non-empty,
// used as S_t (held fixed). Blocks of 8 query rows run in parallel; the result does not depend
// on the thread count. Memory: O(L (d_model + d_I)) for the keys, 8 H_I L scores per thread and
// an L x d_I key gradient per block of rows; never L x L.
double indexer_loss(const FitData& data, const IndexerWeights& weights,
                    const std::vector<int64_t>& rows, FitStage stage, int64_t topk,
                    IndexerWeights* gradient, std::vector<int32_t>* selection = nullptr);

// The selection's fidelity on query rows [first_row, L) at k (dsa-compare's metrics, on the
// rows with t + 1 > k): means of mass_recall, topk_recall and kl_dense (Eq. 3); NaN when no
// such row exists.
struct FitEvaluation {
  int64_t step = 0;
  int64_t rows = 0;  // rows with t + 1 > k
  double mass_recall = 0, topk_recall = 0, kl_dense = 0;
};
FitEvaluation evaluate_indexer(const FitData& data, const IndexerWeights& weights,
                               int64_t first_row, int64_t k);

struct FitOptions {
  FitStage stage = FitStage::warmup;
  int64_t topk = 2048;  // sparse stage: |S_t|
  int64_t steps = 300;
  double lr = 1e-3;
  double beta1 = 0.9, beta2 = 0.999, epsilon = 1e-8;  // Adam
  int64_t batch_rows = 64;  // query rows sampled per step (without replacement)
  double holdout = 0.25;    // the last fraction of positions: evaluated, never trained on
  uint64_t seed = 0;
  int64_t eval_every = 25;  // held-out metrics at step 0, every this many steps, and the last
  int64_t eval_topk = 2048;
};

struct FitLog {
  int64_t train_rows = 0, holdout_rows = 0;
  std::vector<double> loss;  // per step, on that step's rows (before the update)
  std::vector<FitEvaluation> evaluations;
};

// The log's "rows", "loss" and "evaluations" (schema dsa-fit/2); undefined values as null.
nlohmann::json fit_log_json(const FitLog& log);

// The query rows fit_indexer trains on (the first ones) and holds out (the last
// ceil(holdout * L)). Error(usage) unless holdout is in (0, 1) and leaves at least one of each.
struct FitRows {
  int64_t train = 0, holdout = 0;
};
FitRows fit_rows(int64_t L, double holdout);

// Trains `weights` in place. `progress` (may be empty) sees every evaluation as it is made.
// Deterministic given the options and the starting weights, at any thread count.
FitLog fit_indexer(const FitData& data, IndexerWeights& weights, const FitOptions& options,
                   const std::function<void(const FitEvaluation&, double loss)>& progress);

}  // namespace dsa
