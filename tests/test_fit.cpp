// Training the indexer: the loss of Eq. 3 and Eq. 4 against a straightforward fp64 reference,
// its analytic gradient against central finite differences (LayerNorm included, ReLU kinks
// kept away, the sparse selection held fixed), determinism across thread counts, and a short
// fit that lowers the loss.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>

#include "dsa/error.hpp"
#include "dsa/fit.hpp"
#include "dsa/indexer_weights.hpp"
#include "dsa/parallel.hpp"
#include "reference.hpp"

namespace dsa {
namespace {

using test::f32;

struct Problem {
  Tensor hidden, q, kv;
  // Points into the tensors above: made where the problem stays.
  FitData data() const { return make_fit_data(hidden, make_mqa_inputs(q, kv, 4), 0.5f); }
};

// A small MQA layer: L tokens, H heads, d_qk, d_v = d_qk / 2, hidden states of width D.
Problem make_problem(int64_t L, int64_t D, uint64_t seed) {
  std::mt19937_64 rng(seed);
  Problem p;
  p.hidden = test::random_tensor({L, D}, rng, 1.0f, "hidden");
  p.q = test::random_tensor({L, 2, 8}, rng, 1.0f, "q");
  p.kv = test::random_tensor({L, 8}, rng, 1.0f, "kv");
  return p;
}

// p[t,:] in fp64 (DESIGN.md section 1).
std::vector<double> reference_target(const Problem& p, int64_t t) {
  const int64_t H = p.q.dim(1), d = p.q.dim(2);
  std::vector<double> target(static_cast<std::size_t>(t + 1), 0.0);
  for (int64_t h = 0; h < H; ++h) {
    std::vector<double> logits;
    for (int64_t s = 0; s <= t; ++s) {
      double dot = 0;
      for (int64_t c = 0; c < d; ++c)
        dot += double(f32(p.q)[(t * H + h) * d + c]) * f32(p.kv)[s * d + c];
      logits.push_back(0.5 * dot);
    }
    const double m = *std::max_element(logits.begin(), logits.end());
    double sum = 0;
    for (double l : logits) sum += std::exp(l - m);
    for (int64_t s = 0; s <= t; ++s) target[s] += std::exp(logits[s] - m) / sum / double(H);
  }
  return target;
}

// I[t, 0..t] (Eq. 1) from the hidden states in fp64, and the smallest |q_I . k_I| seen.
std::vector<double> reference_scores_from_hidden(const Problem& p, const IndexerWeights& w,
                                                 int64_t t, double* smallest_dot) {
  const int64_t D = w.d_model, H_I = w.heads, d_I = w.dim;
  const float* h = f32(p.hidden);
  auto key = [&](int64_t s) {
    std::vector<double> y(static_cast<std::size_t>(d_I));
    double mean = 0, var = 0;
    for (int64_t e = 0; e < d_I; ++e) {
      for (int64_t c = 0; c < D; ++c) y[e] += w.wk[e * D + c] * h[s * D + c];
      mean += y[e] / double(d_I);
    }
    for (double v : y) var += (v - mean) * (v - mean) / double(d_I);
    for (int64_t e = 0; e < d_I; ++e) {
      y[e] =
          (y[e] - mean) / std::sqrt(var + kIndexerNormEps) * w.k_norm_weight[e] + w.k_norm_bias[e];
    }
    return y;
  };
  std::vector<double> scores(static_cast<std::size_t>(t + 1), 0.0);
  for (int64_t s = 0; s <= t; ++s) {
    const std::vector<double> k = key(s);
    for (int64_t j = 0; j < H_I; ++j) {
      double weight = 0, dot = 0;
      for (int64_t c = 0; c < D; ++c) weight += w.weights_proj[j * D + c] * h[t * D + c];
      for (int64_t e = 0; e < d_I; ++e) {
        double q = 0;
        for (int64_t c = 0; c < D; ++c) q += w.wq[(j * d_I + e) * D + c] * h[t * D + c];
        dot += q * k[e];
      }
      *smallest_dot = std::min(*smallest_dot, std::abs(dot));
      scores[s] += weight * std::max(dot, 0.0);
    }
  }
  return scores;
}

double reference_kl(const std::vector<double>& target, const std::vector<double>& scores) {
  const double m = *std::max_element(scores.begin(), scores.end());
  double sum = 0;
  for (double s : scores) sum += std::exp(s - m);
  const double lse = m + std::log(sum);
  double kl = 0;
  for (std::size_t i = 0; i < target.size(); ++i)
    kl += target[i] * (std::log(target[i]) - (scores[i] - lse));
  return kl;
}

// Weights with gamma and beta away from their initial 1 and 0, so their gradients matter.
IndexerWeights test_weights(int64_t D, int64_t H_I, int64_t d_I, uint64_t seed) {
  IndexerWeights w = random_indexer_weights(D, H_I, d_I, seed);
  std::mt19937_64 rng(seed + 1);
  std::uniform_real_distribution<double> u(-0.5, 0.5);
  for (double& x : w.k_norm_weight) x = 1.0 + u(rng);
  for (double& x : w.k_norm_bias) x = 0.2 * u(rng);
  for (double& x : w.weights_proj) x *= 4;  // scores of order 1
  return w;
}

TEST(Fit, WarmupLossMatchesTheFp64Reference) {
  const Problem p = make_problem(24, 12, 1);
  const IndexerWeights w = test_weights(12, 3, 4, 2);
  const std::vector<int64_t> rows = {0, 5, 11, 17, 23};
  double expected = 0, smallest = 1e300;
  for (int64_t t : rows) {
    expected +=
        reference_kl(reference_target(p, t), reference_scores_from_hidden(p, w, t, &smallest));
  }
  expected /= double(rows.size());
  EXPECT_NEAR(indexer_loss(p.data(), w, rows, FitStage::warmup, 0, nullptr), expected,
              1e-5 * expected);
}

TEST(Fit, SparseLossIsTheKlOnTheSelectionRenormalized) {
  const Problem p = make_problem(24, 12, 3);
  const IndexerWeights w = test_weights(12, 3, 4, 4);
  const std::vector<int64_t> rows = {2, 9, 20, 23};
  const int64_t k = 5;
  std::vector<int32_t> selection;
  const double loss = indexer_loss(p.data(), w, rows, FitStage::sparse, k, nullptr, &selection);
  ASSERT_EQ(selection.size(), rows.size() * k);
  double expected = 0, smallest = 1e300;
  for (std::size_t i = 0; i < rows.size(); ++i) {
    const int64_t t = rows[i];
    const std::vector<double> target = reference_target(p, t);
    const std::vector<double> scores = reference_scores_from_hidden(p, w, t, &smallest);
    const std::vector<int32_t> best = test::reference_topk(scores.data(), t + 1, k);
    std::vector<double> sub_target, sub_scores;
    double mass = 0;
    for (int64_t e = 0; e < k && best[e] >= 0; ++e) {
      EXPECT_EQ(selection[i * k + e], best[e]) << "row " << t;
      mass += target[best[e]];
      sub_scores.push_back(scores[best[e]]);
      sub_target.push_back(target[best[e]]);
    }
    for (double& x : sub_target) x /= mass;
    expected += reference_kl(sub_target, sub_scores);
  }
  expected /= double(rows.size());
  EXPECT_NEAR(loss, expected, 1e-5 * expected);
  // Row 2 sees 3 keys: its selection is all of them, padded with -1.
  EXPECT_EQ(selection[4], -1);
}

// Central differences of the loss in every parameter against the analytic gradient.
void check_gradient(FitStage stage, uint64_t seed) {
  const std::vector<int64_t> rows = {0, 4, 7, 13, 19};
  const int64_t k = 4;
  // The first problem from `seed` on with every q_I . k_I at least 1e-3 away from the ReLU
  // kink: a step of 1e-6 in any weight cannot cross it.
  Problem p;
  IndexerWeights w;
  for (double smallest = 0; smallest < 1e-3; ++seed) {
    p = make_problem(20, 6, seed);
    w = test_weights(6, 2, 4, seed + 1000);
    smallest = 1e300;
    for (int64_t t : rows) reference_scores_from_hidden(p, w, t, &smallest);
  }
  std::vector<int32_t> selection;  // the sparse stage's S_t, held fixed below
  IndexerWeights grad;
  indexer_loss(p.data(), w, rows, stage, k, &grad, &selection);
  const double step = 1e-6;
  std::vector<std::vector<double>*> params = parameters(w), grads = parameters(grad);
  for (std::size_t i = 0; i < grads.size(); ++i) {  // every kind of parameter matters here
    double largest = 0;
    for (double g : *grads[i]) largest = std::max(largest, std::abs(g));
    EXPECT_GT(largest, 1e-4) << "parameter " << i;
  }
  const char* names[] = {"wq", "wk", "k_norm.weight", "k_norm.bias", "weights_proj"};
  for (std::size_t i = 0; i < params.size(); ++i) {
    for (std::size_t e = 0; e < params[i]->size(); ++e) {
      double& x = (*params[i])[e];
      const double saved = x;
      x = saved + step;
      std::vector<int32_t> fixed = selection;
      const double up = indexer_loss(p.data(), w, rows, stage, k, nullptr, &fixed);
      x = saved - step;
      fixed = selection;
      const double down = indexer_loss(p.data(), w, rows, stage, k, nullptr, &fixed);
      x = saved;
      const double numeric = (up - down) / (2 * step), analytic = (*grads[i])[e];
      EXPECT_NEAR(analytic, numeric, 1e-6 + 1e-5 * std::abs(numeric))
          << names[i] << "[" << e << "]";
    }
  }
}

TEST(Fit, WarmupGradientMatchesFiniteDifferences) {
  check_gradient(FitStage::warmup, 5);
}

TEST(Fit, SparseGradientMatchesFiniteDifferences) {
  check_gradient(FitStage::sparse, 6);
}

TEST(Fit, LossAndGradientDoNotDependOnTheThreadCount) {
  const Problem p = make_problem(64, 10, 7);
  const IndexerWeights w = test_weights(10, 2, 4, 8);
  std::vector<int64_t> rows;
  for (int64_t t = 1; t < 64; t += 3) rows.push_back(t);
  IndexerWeights g1, g2;
  set_threads(1);
  const double l1 = indexer_loss(p.data(), w, rows, FitStage::warmup, 0, &g1);
  set_threads(2);
  const double l2 = indexer_loss(p.data(), w, rows, FitStage::warmup, 0, &g2);
  set_threads(0);
  EXPECT_EQ(l1, l2);
  EXPECT_EQ(g1.wq, g2.wq);
  EXPECT_EQ(g1.wk, g2.wk);
  EXPECT_EQ(g1.k_norm_weight, g2.k_norm_weight);
  EXPECT_EQ(g1.weights_proj, g2.weights_proj);
}

TEST(Fit, AdamLowersTheLossDeterministically) {
  const Problem p = make_problem(96, 10, 9);
  FitOptions o;
  o.steps = 40;
  o.lr = 1e-2;
  o.batch_rows = 16;
  o.eval_every = 20;
  o.eval_topk = 8;
  IndexerWeights a = random_indexer_weights(10, 2, 4, 3), b = a;
  set_threads(1);
  const FitLog log = fit_indexer(p.data(), a, o, {});
  set_threads(2);
  const FitLog again = fit_indexer(p.data(), b, o, {});
  set_threads(0);
  EXPECT_EQ(log.loss, again.loss);
  EXPECT_EQ(a.wq, b.wq);
  ASSERT_EQ(log.loss.size(), 40u);
  ASSERT_EQ(log.evaluations.size(), 3u);  // steps 0, 20 and the end
  EXPECT_EQ(log.evaluations.back().step, 40);
  EXPECT_EQ(log.holdout_rows, 24);
  EXPECT_EQ(log.evaluations[0].rows, 24);  // every held-out row sees more than 8 keys
  double first = 0, last = 0;
  for (int i = 0; i < 5; ++i) first += log.loss[i], last += log.loss[35 + i];
  EXPECT_LT(last, first);
}

// The held-out rows are the last ceil(holdout * L); a fraction that leaves none of either kind,
// or bad options, are usage errors naming the option.
TEST(Fit, HoldoutSplitAndBadOptions) {
  EXPECT_EQ(fit_rows(96, 0.25).train, 72);
  EXPECT_EQ(fit_rows(96, 0.25).holdout, 24);
  EXPECT_EQ(fit_rows(24, 0.01).holdout, 1);
  auto message = [](auto f) {
    try {
      f();
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), ExitCode::usage);
      return std::string(e.what());
    }
    return std::string("no error");
  };
  EXPECT_EQ(message([] { fit_rows(24, 0.99); }),
            "fit: holdout 0.99 of L = 24 leaves no training or no held-out rows");
  EXPECT_EQ(message([] { fit_rows(24, 1); }), "fit: holdout must be a fraction in (0, 1), got 1");
  const Problem p = make_problem(16, 6, 11);
  IndexerWeights w = random_indexer_weights(6, 2, 4, 1);
  FitOptions o;
  o.lr = 0;
  EXPECT_EQ(message([&] { fit_indexer(p.data(), w, o, {}); }), "fit: lr must be positive, got 0");
  o = {};
  o.steps = -1;
  EXPECT_EQ(message([&] { fit_indexer(p.data(), w, o, {}); }),
            "fit: steps must be non-negative, got -1");
}

TEST(Fit, BadInputsAreReported) {
  const Problem p = make_problem(16, 6, 11);
  const Tensor short_hidden = make_tensor(DType::f32, {15, 6}, "h.npy");
  try {
    make_fit_data(short_hidden, p.data().attention, 1.0f);
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ExitCode::bad_input);
    EXPECT_NE(std::string(e.what()).find("h.npy"), std::string::npos) << e.what();
  }
  const IndexerWeights wrong = random_indexer_weights(7, 2, 4, 1);
  EXPECT_THROW(indexer_loss(p.data(), wrong, {3}, FitStage::warmup, 0, nullptr), Error);
  const IndexerWeights right = random_indexer_weights(6, 2, 4, 1);
  EXPECT_THROW(indexer_loss(p.data(), right, {16}, FitStage::warmup, 0, nullptr), Error);
  EXPECT_THROW(indexer_loss(p.data(), right, {}, FitStage::warmup, 0, nullptr), Error);
  EXPECT_THROW(project_indexer(p.hidden, wrong), Error);
}

}  // namespace
}  // namespace dsa
