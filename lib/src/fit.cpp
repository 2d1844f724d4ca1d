#include "dsa/fit.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <random>
#include <set>

#include <Eigen/Core>

#include "attention_kernels.hpp"
#include "dsa/error.hpp"
#include "dsa/metrics.hpp"
#include "dsa/topk.hpp"
#include "progress.hpp"
#include "target.hpp"

namespace dsa {

namespace {

using Matrix = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using ConstMap = Eigen::Map<const Matrix>;

constexpr int64_t kQueryBlock = 8;  // query rows per task: 8 x H_I x L doubles of scratch

std::size_t count(int64_t n) {
  return static_cast<std::size_t>(n);
}

// Hidden states [0, rows) as doubles.
Matrix hidden_rows(const Tensor& hidden, int64_t rows) {
  const int64_t D = hidden.dim(1);
  std::vector<float> f(count(rows * D));
  to_f32(hidden, 0, rows * D, f.data());
  return Eigen::Map<const Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>>(
             f.data(), rows, D)
      .cast<double>();
}

// A view of rows [first, first + rows) of a tensor's leading dimension.
Tensor row_view(const Tensor& t, int64_t first, int64_t rows) {
  Tensor view = t;
  view.shape[0] = rows;
  view.data = t.data + static_cast<std::size_t>(first) * (t.nbytes() / count(t.dim(0)));
  return view;
}

// KL(target || softmax(scores)) over n entries and its gradient with respect to the scores,
// softmax - target, scaled by `weight` into grad. target sums to 1.
double kl_and_gradient(int64_t n, const double* target, const double* scores, double weight,
                       double* grad) {
  double m = -std::numeric_limits<double>::infinity();
  for (int64_t i = 0; i < n; ++i) m = std::max(m, scores[i]);
  double sum = 0;
  for (int64_t i = 0; i < n; ++i) sum += std::exp(scores[i] - m);
  const double lse = m + std::log(sum);
  double kl = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (target[i] > 0) kl += target[i] * (std::log(target[i]) - (scores[i] - lse));
    grad[i] = weight * (std::exp(scores[i] - lse) - target[i]);
  }
  return kl;
}

}  // namespace

FitData make_fit_data(const Tensor& hidden, const AttentionInputs& attention, float scale) {
  if (attention.batched || attention.queries != attention.keys) {
    bad_usage(
        "fitting needs one unbatched prefill sequence (q and kv of the same length L), "
        "got {}",
        shape_string(attention.q->shape));
  }
  if (hidden.rank() != 2 || hidden.dim(0) != attention.keys || !is_floating(hidden.dtype)) {
    bad_input("{} (hidden): expected floating point [L = {}, d_model] (L from {}), got {} {}",
              hidden.name, attention.keys, attention.q->name, dtype_name(hidden.dtype),
              shape_string(hidden.shape));
  }
  return {&hidden, attention, scale};
}

double indexer_loss(const FitData& data, const IndexerWeights& w, const std::vector<int64_t>& rows,
                    FitStage stage, int64_t topk, IndexerWeights* gradient,
                    std::vector<int32_t>* selection) {
  const AttentionInputs& a = data.attention;
  const int64_t D = w.d_model, H_I = w.heads, d_I = w.dim;
  const auto n = static_cast<int64_t>(rows.size());
  if (data.hidden->dim(1) != D) {
    bad_input("{} (hidden): d_model {} does not match the indexer weights' {}", data.hidden->name,
              data.hidden->dim(1), D);
  }
  if (n == 0) bad_usage("the loss needs at least one query row");
  for (int64_t t : rows) {
    if (t < 0 || t >= a.queries) bad_usage("query row {} is not in [0, L = {})", t, a.queries);
  }
  if (stage == FitStage::sparse && topk < 1) bad_usage("k must be at least 1, got {}", topk);
  const bool fixed = selection && !selection->empty();
  if (fixed && static_cast<int64_t>(selection->size()) != n * topk) {
    bad_usage("the fixed selection holds {} entries, expected {} rows x k {}", selection->size(), n,
              topk);
  }
  if (stage == FitStage::sparse && selection && !fixed) selection->assign(count(n * topk), -1);
  const int64_t V = *std::max_element(rows.begin(), rows.end()) + 1;  // keys any row sees

  // Keys: y = W_k h, k = LayerNorm(y) * gamma + beta (per token, over d_I).
  const Matrix h = hidden_rows(*data.hidden, V);
  const ConstMap wq(w.wq.data(), H_I * d_I, D), wk(w.wk.data(), d_I, D),
      wproj(w.weights_proj.data(), H_I, D);
  const Eigen::Map<const Eigen::RowVectorXd> gamma(w.k_norm_weight.data(), d_I),
      beta(w.k_norm_bias.data(), d_I);
  Matrix normalized = h * wk.transpose();
  Eigen::VectorXd inv_std(V);
  for (int64_t s = 0; s < V; ++s) {
    auto y = normalized.row(s);
    const double mean = y.mean();
    y.array() -= mean;
    inv_std(s) = 1.0 / std::sqrt(y.squaredNorm() / static_cast<double>(d_I) + kIndexerNormEps);
    y *= inv_std(s);
  }
  Matrix keys = normalized.array().rowwise() * gamma.array();
  keys.rowwise() += beta;

  Matrix h_rows(n, D);
  for (int64_t i = 0; i < n; ++i) h_rows.row(i) = h.row(rows[i]);
  const Matrix q_all = h_rows * wq.transpose();     // [n, H_I * d_I]
  const Matrix w_all = h_rows * wproj.transpose();  // [n, H_I]
  Matrix dq_all = Matrix::Zero(n, H_I * d_I), dw_all = Matrix::Zero(n, H_I);
  std::vector<double> losses(count(n), 0.0);
  const int64_t blocks = (n + kQueryBlock - 1) / kQueryBlock;
  std::vector<Matrix> dkeys(count(gradient ? blocks : 0));
  const detail::KeyValues kv(a, 0);
  const double row_weight = 1.0 / static_cast<double>(n);

#pragma omp parallel
  {
    std::vector<float> target_f, scores_f, selected_scores;
    std::vector<double> target, scores, grad, sub_target, sub_scores, sub_grad;
    std::vector<int32_t> own_selection;
    TopkScratch scratch;
    Matrix logits;
#pragma omp for schedule(dynamic, 1)
    for (int64_t blk = 0; blk < blocks; ++blk) {
      const int64_t first = blk * kQueryBlock, rows_b = std::min(kQueryBlock, n - first);
      int64_t visible_end = 0;
      for (int64_t i = 0; i < rows_b; ++i) visible_end = std::max(visible_end, rows[first + i] + 1);
      const ConstMap q_block(q_all.row(first).data(), rows_b * H_I, d_I);
      logits.noalias() = q_block * keys.topRows(visible_end).transpose();  // q_I . k_I
      target_f.resize(count(rows_b * visible_end));
      detail::attention_target(a, kv, 0, rows.data() + first, rows_b, visible_end, data.scale,
                               target_f.data());
      for (int64_t i = 0; i < rows_b; ++i) {
        const int64_t visible = rows[first + i] + 1;
        // Eq. 1 in double.
        scores.assign(count(visible), 0.0);
        for (int64_t j = 0; j < H_I; ++j) {
          const double wj = w_all(first + i, j);
          const double* l = logits.row(i * H_I + j).data();
          for (int64_t s = 0; s < visible; ++s) scores[s] += wj * std::max(l[s], 0.0);
        }
        target.assign(target_f.begin() + i * visible_end,
                      target_f.begin() + i * visible_end + visible);
        grad.assign(count(visible), 0.0);
        if (stage == FitStage::warmup) {  // Eq. 3
          losses[first + i] =
              kl_and_gradient(visible, target.data(), scores.data(), row_weight, grad.data());
        } else {  // Eq. 4 on S_t, both sides renormalized there
          const int32_t* sel;
          if (fixed) {
            sel = selection->data() + (first + i) * topk;
          } else {
            scores_f.assign(scores.begin(), scores.end());
            own_selection.resize(count(topk));
            selected_scores.resize(count(topk));
            select_topk_row(scores_f.data(), visible, topk, own_selection.data(),
                            selected_scores.data(), scratch);
            if (selection)
              std::copy(own_selection.begin(), own_selection.end(),
                        selection->begin() + (first + i) * topk);
            sel = own_selection.data();
          }
          int64_t m = 0;
          double mass = 0;
          while (m < topk && sel[m] >= 0) mass += target[sel[m++]];
          if (mass > 0) {  // else no target mass on S_t: the row has no loss
            sub_target.resize(count(m));
            sub_scores.resize(count(m));
            sub_grad.resize(count(m));
            for (int64_t e = 0; e < m; ++e) {
              sub_target[e] = target[sel[e]] / mass;
              sub_scores[e] = scores[sel[e]];
            }
            losses[first + i] = kl_and_gradient(m, sub_target.data(), sub_scores.data(), row_weight,
                                                sub_grad.data());
            for (int64_t e = 0; e < m; ++e) grad[sel[e]] = sub_grad[e];
          }
        }
        if (!gradient) continue;
        // dL/dw[t,j] = sum_s g_s ReLU(a_js); dL/da_js = g_s w[t,j] [a_js > 0] (in place).
        for (int64_t j = 0; j < H_I; ++j) {
          const double wj = w_all(first + i, j);
          double* l = logits.row(i * H_I + j).data();
          double dw = 0;
          for (int64_t s = 0; s < visible; ++s) {
            if (l[s] > 0) {
              dw += grad[s] * l[s];
              l[s] = grad[s] * wj;
            } else {
              l[s] = 0;
            }
          }
          std::fill(l + visible, l + visible_end, 0.0);
          dw_all(first + i, j) = dw;
        }
      }
      if (!gradient) continue;
      Eigen::Map<Matrix>(dq_all.row(first).data(), rows_b * H_I, d_I).noalias() =
          logits * keys.topRows(visible_end);
      dkeys[blk].noalias() = logits.transpose() * q_block;  // [visible_end, d_I]
    }
  }
  double loss = 0;
  for (double l : losses) loss += l;
  loss /= static_cast<double>(n);
  if (!gradient) return loss;

  // Key gradients summed in block order, then back through LayerNorm and W_k.
  Matrix dk = Matrix::Zero(V, d_I);
  for (const Matrix& part : dkeys) dk.topRows(part.rows()) += part;
  *gradient = zero_indexer_weights(D, H_I, d_I);
  Eigen::Map<Eigen::RowVectorXd> dgamma(gradient->k_norm_weight.data(), d_I),
      dbeta(gradient->k_norm_bias.data(), d_I);
  dgamma = (dk.array() * normalized.array()).colwise().sum();
  dbeta = dk.colwise().sum();
  Matrix dy = dk.array().rowwise() * gamma.array();  // dL/d(normalized)
  for (int64_t s = 0; s < V; ++s) {
    auto g = dy.row(s);
    const auto x = normalized.row(s);
    const double mean_g = g.mean(), mean_gx = g.dot(x) / static_cast<double>(d_I);
    g = inv_std(s) * (g.array() - mean_g - x.array() * mean_gx).matrix();
  }
  Eigen::Map<Matrix>(gradient->wk.data(), d_I, D).noalias() = dy.transpose() * h;
  Eigen::Map<Matrix>(gradient->wq.data(), H_I * d_I, D).noalias() = dq_all.transpose() * h_rows;
  Eigen::Map<Matrix>(gradient->weights_proj.data(), H_I, D).noalias() = dw_all.transpose() * h_rows;
  return loss;
}

FitEvaluation evaluate_indexer(const FitData& data, const IndexerWeights& weights,
                               int64_t first_row, int64_t k) {
  const AttentionInputs& a = data.attention;
  const int64_t rows = a.queries - first_row;
  const IndexerProjection p = project_indexer(*data.hidden, weights);
  const Tensor q_index = row_view(p.q_index, first_row, rows);
  const Tensor w = row_view(p.weights, first_row, rows);
  const Tensor q = row_view(*a.q, first_row, rows);
  CompareInputs in;
  in.attention = a.latent ? make_mqa_inputs(q, *a.k, a.d_v) : make_mha_inputs(q, *a.k, *a.v);
  in.scale = data.scale;
  in.indexer = make_indexer_inputs(q_index, p.k_index, w, in.indexer_config);
  in.topk = {k};
  const nlohmann::json result = comparison_json(compare_attention(in, nullptr)).at(0);
  auto mean = [&](const char* metric) {
    const nlohmann::json& m = result.at(metric).at("sparse").at("mean");
    return m.is_null() ? std::numeric_limits<double>::quiet_NaN() : m.get<double>();
  };
  FitEvaluation e;
  e.rows = result.at("rows").at("sparse").get<int64_t>();
  e.mass_recall = mean("mass_recall");
  e.topk_recall = mean("topk_recall");
  e.kl_dense = mean("kl_dense");
  return e;
}

nlohmann::json fit_log_json(const FitLog& log) {
  nlohmann::json out = {{"rows", {{"train", log.train_rows}, {"holdout", log.holdout_rows}}},
                        {"loss", nlohmann::json::array()},
                        {"evaluations", nlohmann::json::array()}};
  for (double l : log.loss) out["loss"].push_back(number_or_null(l));
  for (const FitEvaluation& e : log.evaluations) {
    out["evaluations"].push_back({{"step", e.step},
                                  {"rows", e.rows},
                                  {"mass_recall_mean", number_or_null(e.mass_recall)},
                                  {"topk_recall_mean", number_or_null(e.topk_recall)},
                                  {"kl_dense_mean", number_or_null(e.kl_dense)}});
  }
  return out;
}

FitRows fit_rows(int64_t L, double holdout) {
  if (!(holdout > 0 && holdout < 1)) {
    bad_usage("fit: holdout must be a fraction in (0, 1), got {}", holdout);
  }
  FitRows rows;
  rows.holdout = static_cast<int64_t>(std::ceil(holdout * static_cast<double>(L)));
  rows.train = L - rows.holdout;
  if (rows.train < 1 || rows.holdout < 1) {
    bad_usage("fit: holdout {} of L = {} leaves no training or no held-out rows", holdout, L);
  }
  return rows;
}

FitLog fit_indexer(const FitData& data, IndexerWeights& weights, const FitOptions& o,
                   const std::function<void(const FitEvaluation&, double loss)>& progress) {
  if (o.steps < 0) bad_usage("fit: steps must be non-negative, got {}", o.steps);
  if (!(o.lr > 0)) bad_usage("fit: lr must be positive, got {}", o.lr);
  if (o.batch_rows < 1) bad_usage("fit: batch_rows must be at least 1, got {}", o.batch_rows);
  if (o.eval_every < 1) bad_usage("fit: eval_every must be at least 1, got {}", o.eval_every);
  if (o.eval_topk < 1) bad_usage("fit: eval_topk must be at least 1, got {}", o.eval_topk);
  const FitRows rows = fit_rows(data.attention.queries, o.holdout);
  FitLog log;
  log.train_rows = rows.train;
  log.holdout_rows = rows.holdout;
  const int64_t batch = std::min(o.batch_rows, log.train_rows);

  std::mt19937_64 engine(o.seed);
  std::vector<std::vector<double>*> params = parameters(weights);
  std::vector<std::vector<double>> m1, m2;
  for (auto* p : params) {
    m1.emplace_back(p->size(), 0.0);
    m2.emplace_back(p->size(), 0.0);
  }
  IndexerWeights grad;
  // The evaluations' compare_attention reports nothing inside this stage.
  detail::Progress steps("fit", o.steps, "steps");
  auto evaluate = [&](int64_t step, double loss) {
    FitEvaluation e = evaluate_indexer(data, weights, log.train_rows, o.eval_topk);
    e.step = step;
    log.evaluations.push_back(e);
    if (progress) progress(e, loss);
  };
  for (int64_t step = 0; step < o.steps; ++step) {
    // Floyd's sampling: `batch` distinct training rows, in ascending order.
    std::set<int64_t> picked;
    for (int64_t j = log.train_rows - batch; j < log.train_rows; ++j) {
      const auto r = static_cast<int64_t>(engine() % static_cast<uint64_t>(j + 1));
      picked.insert(picked.count(r) ? j : r);
    }
    const std::vector<int64_t> rows(picked.begin(), picked.end());
    const double loss = indexer_loss(data, weights, rows, o.stage, o.topk, &grad);
    log.loss.push_back(loss);
    if (step % o.eval_every == 0) evaluate(step, loss);
    // Adam, bias-corrected.
    const double t = static_cast<double>(step + 1);
    const double c1 = 1 - std::pow(o.beta1, t), c2 = 1 - std::pow(o.beta2, t);
    std::vector<std::vector<double>*> grads = parameters(grad);
    for (std::size_t p = 0; p < params.size(); ++p) {
      std::vector<double>& x = *params[p];
      const std::vector<double>& g = *grads[p];
      for (std::size_t i = 0; i < x.size(); ++i) {
        m1[p][i] = o.beta1 * m1[p][i] + (1 - o.beta1) * g[i];
        m2[p][i] = o.beta2 * m2[p][i] + (1 - o.beta2) * g[i] * g[i];
        x[i] -= o.lr * (m1[p][i] / c1) / (std::sqrt(m2[p][i] / c2) + o.epsilon);
      }
    }
    steps.advance(1);
  }
  evaluate(o.steps, log.loss.empty() ? std::numeric_limits<double>::quiet_NaN() : log.loss.back());
  return log;
}

}  // namespace dsa
