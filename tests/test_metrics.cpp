// dsa-compare's metrics against an fp64 reference, the summaries against hand-computed
// percentiles, and the properties every report must have (exact rows, monotone recall).
#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "dsa/error.hpp"
#include "dsa/metrics.hpp"
#include "dsa/topk.hpp"
#include "reference.hpp"

namespace dsa {
namespace {

using test::f32;

TEST(Summarize, PercentilesInterpolateLinearlyAndSkipNaN) {
  const Summary s = summarize({4, NAN, 1, 3, 2});
  EXPECT_EQ(s.count, 4);
  EXPECT_EQ(s.undefined, 1);
  EXPECT_DOUBLE_EQ(s.mean, 2.5);
  EXPECT_DOUBLE_EQ(s.p50, 2.5);
  EXPECT_DOUBLE_EQ(s.p90, 3.7);
  EXPECT_DOUBLE_EQ(s.p99, 3.97);
  EXPECT_EQ(s.min, 1);
  EXPECT_EQ(s.max, 4);
  const Summary one = summarize({7});
  EXPECT_EQ(one.p99, 7);
  const Summary none = summarize({NAN});
  EXPECT_EQ(none.count, 0);
  EXPECT_TRUE(std::isnan(none.mean));
  EXPECT_TRUE(summary_json(none)["mean"].is_null());
}

struct Case {
  int64_t batch, queries, keys, heads, kv_heads, d_qk, d_v, indexer_heads, indexer_dim;
  bool batched, latent;
  std::vector<int64_t> topk;
};

struct Problem {
  Case c;
  Tensor q, k, v, q_index, k_index, weights;
  CompareInputs inputs;
};

Shape batched(const Case& c, Shape s) {
  if (c.batched) s.insert(s.begin(), c.batch);
  return s;
}

std::unique_ptr<Problem> make_problem(const Case& c, uint64_t seed) {
  std::mt19937_64 rng(seed);
  auto p = std::make_unique<Problem>();
  p->c = c;
  p->q = test::random_tensor(batched(c, {c.queries, c.heads, c.d_qk}), rng, 1.5f, "q");
  if (c.latent) {
    p->k = test::random_tensor(batched(c, {c.keys, c.d_qk}), rng, 1.0f, "kv");
    p->inputs.attention = make_mqa_inputs(p->q, p->k, c.d_v);
  } else {
    p->k = test::random_tensor(batched(c, {c.keys, c.kv_heads, c.d_qk}), rng, 1.0f, "k");
    p->v = test::random_tensor(batched(c, {c.keys, c.kv_heads, c.d_v}), rng, 1.0f, "v");
    p->inputs.attention = make_mha_inputs(p->q, p->k, p->v);
  }
  p->q_index =
      test::random_tensor(batched(c, {c.queries, c.indexer_heads, c.indexer_dim}), rng, 1.0f, "qi");
  p->k_index = test::random_tensor(batched(c, {c.keys, c.indexer_dim}), rng, 1.0f, "ki");
  p->weights = test::random_tensor(batched(c, {c.queries, c.indexer_heads}), rng, 0.3f, "w");
  p->inputs.indexer =
      make_indexer_inputs(p->q_index, p->k_index, p->weights, p->inputs.indexer_config);
  p->inputs.scale = default_scale(c.d_qk);
  p->inputs.topk = c.topk;
  return p;
}

// Every per-row metric recomputed in fp64 from DESIGN.md section 2.
void expect_matches_reference(const Problem& p, const Comparison& got) {
  const Case& c = p.c;
  const int64_t H = c.heads, group = c.heads / c.kv_heads;
  const int64_t k_stride = c.latent ? c.d_qk : c.kv_heads * c.d_qk;
  const int64_t v_stride = c.latent ? c.d_qk : c.kv_heads * c.d_v;
  for (int64_t b = 0; b < c.batch; ++b) {
    const auto I =
        test::reference_scores(f32(p.q_index) + b * c.queries * c.indexer_heads * c.indexer_dim,
                               f32(p.k_index) + b * c.keys * c.indexer_dim,
                               f32(p.weights) + b * c.queries * c.indexer_heads, c.queries, c.keys,
                               c.indexer_heads, c.indexer_dim);
    const float* kb = f32(p.k) + b * c.keys * k_stride;
    const float* vb = (c.latent ? f32(p.k) : f32(p.v)) + b * c.keys * v_stride;
    auto key = [&](int64_t s, int64_t g) {
      return kb + s * k_stride + (c.latent ? 0 : g * c.d_qk);
    };
    auto value = [&](int64_t s, int64_t g) {
      return vb + s * v_stride + (c.latent ? 0 : g * c.d_v);
    };
    for (int64_t t = 0; t < c.queries; ++t) {
      const int64_t row = b * c.queries + t, pos = c.keys - c.queries + t, visible = pos + 1;
      const float* q = f32(p.q) + row * H * c.d_qk;
      std::vector<int64_t> all(static_cast<std::size_t>(visible));
      for (int64_t s = 0; s < visible; ++s) all[s] = s;
      std::vector<double> dense, dense_lse;
      test::reference_attention_row(q, H, c.kv_heads, c.d_qk, c.d_v, all, p.inputs.scale, key,
                                    value, dense, dense_lse);
      // Per-head dense probabilities and the head-summed target p.
      std::vector<std::vector<double>> ph(H, std::vector<double>(visible));
      std::vector<double> target(visible, 0.0);
      for (int64_t h = 0; h < H; ++h) {
        for (int64_t s = 0; s < visible; ++s) {
          double dot = 0;
          for (int64_t d = 0; d < c.d_qk; ++d)
            dot += double(q[h * c.d_qk + d]) * key(s, h / group)[d];
          ph[h][s] = std::exp(p.inputs.scale * dot - dense_lse[h]);
          target[s] += ph[h][s] / H;
        }
      }
      const double* I_row = I.data() + t * c.keys;
      double lse_I = -INFINITY;
      for (int64_t s = 0; s < visible; ++s) lse_I = std::max(lse_I, I_row[s]);
      double sum_I = 0;
      for (int64_t s = 0; s < visible; ++s) sum_I += std::exp(I_row[s] - lse_I);
      lse_I += std::log(sum_I);
      double kl_dense = 0;
      for (int64_t s = 0; s < visible; ++s)
        kl_dense += target[s] * (std::log(target[s]) - (I_row[s] - lse_I));
      ASSERT_NEAR(got.kl_dense[row], kl_dense, 1e-4 * std::max(1.0, kl_dense)) << "row " << row;
      const auto order = test::reference_topk(I_row, visible, c.topk.back());
      for (std::size_t ki = 0; ki < c.topk.size(); ++ki) {
        const int64_t k = c.topk[ki];
        const Fidelity& f = got.per_k[ki];
        std::vector<int64_t> S;
        for (int64_t i = 0; i < std::min(k, visible); ++i) S.push_back(order[i]);
        std::vector<double> sparse, sparse_lse;
        test::reference_attention_row(q, H, c.kv_heads, c.d_qk, c.d_v, S, p.inputs.scale, key,
                                      value, sparse, sparse_lse);
        for (int64_t h = 0; h < H; ++h) {
          double err = 0, ref = 0, own = 0, dot = 0, mass = 0;
          for (int64_t d = 0; d < c.d_v; ++d) {
            const double x = sparse[h * c.d_v + d], y = dense[h * c.d_v + d];
            err += (x - y) * (x - y);
            ref += y * y;
            own += x * x;
            dot += x * y;
          }
          for (int64_t s : S) mass += ph[h][s];
          ASSERT_NEAR(f.out_rel_err[row * H + h], std::sqrt(err / ref), 2e-5) << row << " " << h;
          ASSERT_NEAR(f.out_cosine[row * H + h], dot / std::sqrt(ref * own), 2e-5)
              << row << " " << h;
          ASSERT_NEAR(f.mass_recall_head[row * H + h], mass, 2e-5) << row << " " << h;
        }
        double mass = 0;
        for (int64_t s : S) mass += target[s];
        ASSERT_NEAR(f.mass_recall[row], mass, 2e-5) << row;
        const auto oracle = test::reference_topk(target.data(), visible, k);
        int64_t hits = 0;
        for (int64_t i = 0; i < std::min(k, visible); ++i)
          hits += std::count(S.begin(), S.end(), oracle[i]);
        ASSERT_NEAR(f.topk_recall[row], double(hits) / double(std::min(k, visible)), 1e-6) << row;
        double kl_sparse = 0, lse_S = -INFINITY, sum_S = 0;
        for (int64_t s : S) lse_S = std::max(lse_S, I_row[s]);
        for (int64_t s : S) sum_S += std::exp(I_row[s] - lse_S);
        lse_S += std::log(sum_S);
        for (int64_t s : S)
          kl_sparse += target[s] / mass * (std::log(target[s] / mass) - (I_row[s] - lse_S));
        ASSERT_NEAR(f.kl_sparse[row], kl_sparse, 1e-4 * std::max(1.0, kl_sparse)) << row;
      }
    }
  }
}

const Case kCases[] = {
    {1, 40, 40, 4, 1, 24, 16, 4, 16, false, true, {4, 9, 40}},
    {2, 7, 33, 4, 2, 12, 10, 2, 8, true, false, {5, 16}},
    {1, 1, 1, 2, 1, 8, 8, 1, 4, false, true, {1, 3}},
    {1, 65, 65, 2, 2, 16, 16, 3, 8, false, false, {8}},
};

TEST(CompareAttention, EveryMetricMatchesTheFp64Reference) {
  uint64_t seed = 1;
  for (const Case& c : kCases) {
    const auto p = make_problem(c, seed++);
    const Comparison got = compare_attention(p->inputs, nullptr);
    expect_matches_reference(*p, got);
  }
}

TEST(CompareAttention, RowsWithEveryTokenSelectedAreExact) {
  const auto p = make_problem({1, 30, 30, 3, 1, 16, 12, 2, 8, false, true, {2, 30}}, 5);
  const Comparison got = compare_attention(p->inputs, nullptr);
  for (int64_t ki = 0; ki < 2; ++ki) {
    const Fidelity& f = got.per_k[ki];
    for (int64_t row = 0; row < 30; ++row) {
      if (row + 1 > f.k) continue;
      EXPECT_NEAR(f.mass_recall[row], 1.0, 1e-6);
      EXPECT_EQ(f.topk_recall[row], 1.0f);
      // S_t = {0..t}: Eq. 4 restricted to S_t is Eq. 3.
      EXPECT_NEAR(f.kl_sparse[row], got.kl_dense[row], 1e-5);
      for (int64_t h = 0; h < 3; ++h) {
        EXPECT_LE(f.out_rel_err[row * 3 + h], 1e-6);
        EXPECT_NEAR(f.out_cosine[row * 3 + h], 1.0, 1e-6);
      }
    }
  }
  const nlohmann::json report = comparison_json(got);
  EXPECT_EQ(report[1]["rows"]["exact"], 30);
  EXPECT_EQ(report[1]["rows"]["sparse"], 0);
  EXPECT_TRUE(report[1]["out_rel_err_global"]["sparse"].is_null());
  EXPECT_LE(report[1]["out_rel_err_global"]["all"].get<double>(), 1e-6);
  EXPECT_EQ(report[0]["rows"]["exact"], 2);
}

TEST(CompareAttention, MassRecallNeverFallsAsKGrows) {
  const auto p = make_problem({2, 20, 90, 4, 1, 16, 16, 4, 8, true, true, {1, 4, 16, 64, 90}}, 6);
  const Comparison got = compare_attention(p->inputs, nullptr);
  for (int64_t row = 0; row < got.rows(); ++row) {
    for (std::size_t ki = 1; ki < got.per_k.size(); ++ki) {
      EXPECT_GE(got.per_k[ki].mass_recall[row], got.per_k[ki - 1].mass_recall[row] - 1e-6f) << row;
    }
  }
}

// What MPI ranks do (DESIGN.md section 8), in one process: each share computed alone, packed,
// and put into rank 0's, gives the whole comparison to the bit, across batch elements, with
// queries behind a longer context, and whatever the number of shares.
TEST(CompareAttention, SharesOfTheRowsPutTogetherAreTheWholeComparison) {
  const auto p = make_problem({2, 70, 90, 4, 1, 16, 16, 4, 8, true, true, {4, 16, 64}}, 21);
  Tensor needles = make_tensor(DType::i64, {3, 2}, "needles");
  const int64_t pairs[] = {25, 3, 60, 40, 89, 0};
  std::copy(std::begin(pairs), std::end(pairs), mutable_data<int64_t>(needles));
  p->inputs.needles = &needles;
  const Comparison whole = compare_attention(p->inputs, nullptr);
  nlohmann::json want = comparison_report(p->inputs, whole);
  want.erase("stage_ms");  // the run's own
  for (const int parts : {1, 2, 3, 5}) {
    SCOPED_TRACE(parts);
    const std::vector<RowRange> shares = balanced_rows(p->inputs, parts);
    ASSERT_EQ(shares.size(), static_cast<std::size_t>(parts));
    EXPECT_EQ(shares.front().begin, 0);
    EXPECT_EQ(shares.back().end, 2 * 70);
    for (int i = 0; i + 1 < parts; ++i) {
      EXPECT_EQ(shares[i].end, shares[i + 1].begin);
      EXPECT_EQ(shares[i].end % 70 % 16, 0) << "a share starts at a multiple of the blocks";
    }
    CompareInputs share = p->inputs;
    share.rows = shares[0];
    Comparison merged = compare_attention(share, nullptr);
    for (int i = 1; i < parts; ++i) {
      share.rows = shares[i];
      const Comparison part = compare_attention(share, nullptr);
      unpack_rows(merged, shares[i], pack_rows(part, shares[i]));
    }
    finish_comparison(p->inputs, merged);
    nlohmann::json got = comparison_report(p->inputs, merged);
    got.erase("stage_ms");
    EXPECT_EQ(got, want);
    // The per-row vectors too, NaN where the metric is undefined.
    for (std::size_t ki = 0; ki < whole.per_k.size(); ++ki) {
      const auto& a = whole.per_k[ki].out_rel_err;
      const auto& b = merged.per_k[ki].out_rel_err;
      ASSERT_EQ(a.size(), b.size());
      for (std::size_t i = 0; i < a.size(); ++i)
        ASSERT_TRUE(a[i] == b[i] || (std::isnan(a[i]) && std::isnan(b[i]))) << i;
    }
  }
  // A share of nothing, and rows outside the comparison.
  CompareInputs empty = p->inputs;
  empty.rows = {140, 140};
  EXPECT_NO_THROW(compare_attention(empty, nullptr));
  empty.rows = {0, 141};
  EXPECT_THROW(compare_attention(empty, nullptr), Error);
  EXPECT_THROW(balanced_rows(p->inputs, 0), Error);
}

TEST(CompareAttention, PrecomputedSelectionEqualsTheIndexersOwn) {
  const auto p = make_problem({1, 25, 25, 2, 1, 8, 8, 2, 8, false, true, {6}}, 7);
  const Comparison by_indexer = compare_attention(p->inputs, nullptr);
  Tensor indices = make_tensor(DType::i32, {25, 6}, "sel");
  select_from_indexer(
      *p->inputs.indexer, p->inputs.indexer_config, 6,
      [&](const SelectionBlock& b) {
        std::copy_n(b.indices, b.rows * 6, mutable_data<int32_t>(indices) + b.row_begin * 6);
      },
      nullptr);
  CompareInputs given = p->inputs;
  given.indexer.reset();
  given.indices = &indices;
  const Comparison by_file = compare_attention(given, nullptr);
  EXPECT_EQ(by_file.per_k[0].out_rel_err, by_indexer.per_k[0].out_rel_err);
  EXPECT_EQ(by_file.per_k[0].topk_recall, by_indexer.per_k[0].topk_recall);
  EXPECT_TRUE(by_file.kl_dense.empty());
  EXPECT_TRUE(comparison_json(by_file)[0]["kl_sparse"].is_null());
}

TEST(CompareAttention, ReportFieldsComeFromTheInputsAndTheComparison) {
  const auto p = make_problem({2, 7, 33, 4, 2, 12, 10, 2, 8, true, false, {5, 16}}, 9);
  const Comparison got = compare_attention(p->inputs, nullptr);
  const nlohmann::json report = comparison_report(p->inputs, got);
  EXPECT_EQ(report["shape"], nlohmann::json({{"batch", 2},
                                             {"queries", 7},
                                             {"keys", 33},
                                             {"heads", 4},
                                             {"kv_heads", 2},
                                             {"d_qk", 12},
                                             {"d_v", 10},
                                             {"indexer_heads", 2},
                                             {"indexer_dim", 8}}));
  EXPECT_EQ(report["layout"], "mha");
  EXPECT_EQ(report["scale"], p->inputs.scale);
  EXPECT_EQ(report["selection"], "indexer");
  EXPECT_EQ(report["indexer"], indexer_config_json(p->inputs.indexer_config));
  EXPECT_EQ(report["results"], comparison_json(got));
  EXPECT_EQ(report["flops"]["indexer"], got.indexer_flops);
  EXPECT_EQ(report["flops"]["dense_attention"], got.dense_flops);
  EXPECT_EQ(report["stage_ms"].size(), got.stage_seconds.size());
  // What only the caller knows is the caller's to add.
  for (const char* key : {"tool", "schema", "inputs", "device", "scale_rule", "timings_ms"}) {
    EXPECT_FALSE(report.contains(key)) << key;
  }
  // A precomputed selection: no indexer fields.
  const auto latent = make_problem({1, 12, 12, 2, 1, 8, 8, 2, 8, false, true, {4}}, 10);
  Tensor indices = make_tensor(DType::i32, {12, 4}, "sel");
  for (int64_t t = 0; t < 12; ++t) {
    for (int64_t i = 0; i < 4; ++i) mutable_data<int32_t>(indices)[t * 4 + i] = i <= t ? i : -1;
  }
  CompareInputs given = latent->inputs;
  given.indexer.reset();
  given.indices = &indices;
  const nlohmann::json by_file = comparison_report(given, compare_attention(given, nullptr));
  EXPECT_EQ(by_file["selection"], "indices");
  EXPECT_EQ(by_file["layout"], "mqa");
  EXPECT_FALSE(by_file.contains("indexer"));
  EXPECT_FALSE(by_file["shape"].contains("indexer_heads"));
}

TEST(CompareAttention, CountsNeedlesThatTheSelectionKeeps) {
  auto p = make_problem({1, 30, 30, 2, 1, 8, 8, 2, 8, false, true, {3, 30}}, 8);
  Tensor needles = make_tensor(DType::i32, {3, 2}, "needles");
  const std::vector<int32_t> pairs = {29, 0, 20, 5, 10, 10};
  std::copy(pairs.begin(), pairs.end(), mutable_data<int32_t>(needles));
  p->inputs.needles = &needles;
  const Comparison got = compare_attention(p->inputs, nullptr);
  EXPECT_EQ(got.per_k[1].needles, 3);
  EXPECT_EQ(got.per_k[1].needles_selected, 3);  // k = 30 keeps everything
  // At k = 3, a needle is kept exactly when its key is among the row's top 3 scores.
  const auto I =
      test::reference_scores(f32(p->q_index), f32(p->k_index), f32(p->weights), 30, 30, 2, 8);
  int64_t expected = 0;
  for (std::size_t i = 0; i < pairs.size(); i += 2) {
    const auto top = test::reference_topk(I.data() + pairs[i] * 30, pairs[i] + 1, 3);
    expected += std::count(top.begin(), top.end(), pairs[i + 1]);
  }
  EXPECT_EQ(got.per_k[0].needles_selected, expected);
  Tensor bad = make_tensor(DType::i32, {1, 2}, "bad_needles");
  mutable_data<int32_t>(bad)[0] = 5;
  mutable_data<int32_t>(bad)[1] = 6;  // a key after its query
  p->inputs.needles = &bad;
  EXPECT_THROW(compare_attention(p->inputs, nullptr), Error);
}

TEST(CompareAttention, RejectsUnorderedKAndMismatchedIndexer) {
  auto p = make_problem({1, 10, 10, 2, 1, 8, 8, 2, 8, false, true, {4, 2}}, 9);
  try {
    compare_attention(p->inputs, nullptr);
    FAIL();
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ExitCode::usage);
  }
  p->inputs.topk = {4};
  std::mt19937_64 rng(1);
  const Tensor short_q = test::random_tensor({9, 2, 8}, rng, 1, "short_qi"),
               w = test::random_tensor({9, 2}, rng);
  p->inputs.indexer = make_indexer_inputs(short_q, p->k_index, w, {});
  try {
    compare_attention(p->inputs, nullptr);
    FAIL();
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ExitCode::bad_input);
    EXPECT_NE(std::string(e.what()).find("short_qi"), std::string::npos);
  }
}

}  // namespace
}  // namespace dsa
