// The indexer's projections from hidden states: q_I, k_I (LayerNorm) and w against an fp64
// reference, leading dimensions, the random start, and the .safetensors round trip with the
// checkpoint's names and its errors.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>

#include "dsa/error.hpp"
#include "dsa/indexer_weights.hpp"
#include "dsa/io.hpp"
#include "dsa/parallel.hpp"
#include "reference.hpp"
#include "temp_dir.hpp"

namespace dsa {
namespace {

using test::f32;

IndexerWeights test_weights(int64_t D, int64_t H_I, int64_t d_I, uint64_t seed) {
  IndexerWeights w = random_indexer_weights(D, H_I, d_I, seed);
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> u(-0.5, 0.5);
  for (double& x : w.k_norm_weight) x = 1.0 + u(rng);
  for (double& x : w.k_norm_bias) x = u(rng);
  return w;
}

TEST(IndexerWeights, ProjectionMatchesTheFp64Reference) {
  const int64_t L = 9, D = 7, H_I = 3, d_I = 5;
  std::mt19937_64 rng(1);
  const Tensor h = test::random_tensor({2, L, D}, rng, 2.0f, "h");  // batched
  const IndexerWeights w = test_weights(D, H_I, d_I, 2);
  set_threads(1);
  const IndexerProjection p = project_indexer(h, w);
  set_threads(2);
  const IndexerProjection again = project_indexer(h, w);
  set_threads(0);
  ASSERT_EQ(p.q_index.shape, (Shape{2, L, H_I, d_I}));
  ASSERT_EQ(p.k_index.shape, (Shape{2, L, d_I}));
  ASSERT_EQ(p.weights.shape, (Shape{2, L, H_I}));
  EXPECT_EQ(std::memcmp(p.k_index.data, again.k_index.data, p.k_index.nbytes()), 0);
  for (int64_t t = 0; t < 2 * L; ++t) {
    const float* x = f32(h) + t * D;
    auto row = [&](const std::vector<double>& m, int64_t r) {
      double sum = 0;
      for (int64_t c = 0; c < D; ++c) sum += m[r * D + c] * x[c];
      return sum;
    };
    for (int64_t r = 0; r < H_I * d_I; ++r) {
      EXPECT_NEAR(f32(p.q_index)[t * H_I * d_I + r], row(w.wq, r), 1e-5);
    }
    for (int64_t j = 0; j < H_I; ++j) {
      EXPECT_NEAR(f32(p.weights)[t * H_I + j], row(w.weights_proj, j), 1e-5);
    }
    std::vector<double> y(d_I);
    double mean = 0, var = 0;
    for (int64_t e = 0; e < d_I; ++e) mean += (y[e] = row(w.wk, e)) / d_I;
    for (double v : y) var += (v - mean) * (v - mean) / d_I;
    for (int64_t e = 0; e < d_I; ++e) {
      const double expected =
          (y[e] - mean) / std::sqrt(var + 1e-6) * w.k_norm_weight[e] + w.k_norm_bias[e];
      EXPECT_NEAR(f32(p.k_index)[t * d_I + e], expected, 1e-5) << t << " " << e;
    }
  }
}

TEST(IndexerWeights, RandomStartIsNnLinearWithTheFoldedWeightScale) {
  const IndexerWeights a = random_indexer_weights(16, 4, 8, 3);
  const IndexerWeights b = random_indexer_weights(16, 4, 8, 3);
  EXPECT_EQ(a.wq, b.wq);
  EXPECT_NE(a.wq, random_indexer_weights(16, 4, 8, 4).wq);
  auto largest = [](const std::vector<double>& v) {
    double m = 0;
    for (double x : v) m = std::max(m, std::abs(x));
    return m;
  };
  EXPECT_LE(largest(a.wq), 0.25);  // 1/sqrt(16)
  EXPECT_GT(largest(a.wq), 0.2);
  EXPECT_LE(largest(a.weights_proj), 0.25 / std::sqrt(32.0));
  EXPECT_EQ(a.k_norm_weight, std::vector<double>(8, 1.0));
  EXPECT_EQ(a.k_norm_bias, std::vector<double>(8, 0.0));
  EXPECT_THROW(random_indexer_weights(0, 4, 8, 1), Error);
}

class IndexerWeightsFile : public test::TempDirTest {};

TEST_F(IndexerWeightsFile, RoundTripsUnderTheCheckpointNames) {
  const IndexerWeights w = test_weights(6, 2, 4, 5);
  const std::string prefix = "model.layers.3.self_attn.indexer.";
  const std::vector<Tensor> tensors = indexer_weight_tensors(w, prefix);
  write_safetensors(path("w.safetensors"), tensors);
  EXPECT_EQ(safetensors_names(path("w.safetensors")),
            (std::vector<std::string>{prefix + "wq_b.weight", prefix + "wk.weight",
                                      prefix + "k_norm.weight", prefix + "k_norm.bias",
                                      prefix + "weights_proj.weight"}));
  EXPECT_EQ(tensors[0].shape, (Shape{8, 6}));
  EXPECT_EQ(tensors[4].shape, (Shape{2, 6}));
  const IndexerWeights back = read_indexer_weights(path("w.safetensors"), prefix);
  EXPECT_EQ(back.d_model, 6);
  EXPECT_EQ(back.heads, 2);
  EXPECT_EQ(back.dim, 4);
  for (std::size_t i = 0; i < w.wq.size(); ++i) EXPECT_EQ(back.wq[i], float(w.wq[i]));
  EXPECT_EQ(back.k_norm_bias[3], float(w.k_norm_bias[3]));
  // Without the prefix the tensors are not found, and the message names the missing one.
  try {
    read_indexer_weights(path("w.safetensors"));
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ExitCode::bad_input);
    EXPECT_NE(std::string(e.what()).find("has no tensor 'wk.weight'"), std::string::npos)
        << e.what();
  }
}

TEST_F(IndexerWeightsFile, ShapesThatDoNotFitAreBadInput) {
  const IndexerWeights w = test_weights(6, 2, 4, 6);
  std::vector<Tensor> tensors = indexer_weight_tensors(w);
  tensors[0] = make_tensor(DType::f32, {9, 6}, "wq_b.weight");  // not H_I * d_I rows
  write_safetensors(path("bad.safetensors"), tensors);
  try {
    read_indexer_weights(path("bad.safetensors"));
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ExitCode::bad_input);
    const std::string what = e.what();
    EXPECT_NE(what.find("bad.safetensors:wq_b.weight"), std::string::npos) << what;
    EXPECT_NE(what.find("expected shape [8, 6], got [9, 6]"), std::string::npos) << what;
  }
  tensors = indexer_weight_tensors(w);
  tensors[3] = make_tensor(DType::i32, {4}, "k_norm.bias");
  write_safetensors(path("int.safetensors"), tensors);
  EXPECT_THROW(read_indexer_weights(path("int.safetensors")), Error);
  write_tensor(path("w.npy"), tensors[0]);
  EXPECT_THROW(read_indexer_weights(path("w.npy")), Error);
  const Tensor narrow = make_tensor(DType::f32, {3, 5}, "h");
  EXPECT_THROW(project_indexer(narrow, w), Error);
}

}  // namespace
}  // namespace dsa
