// DeepSeek-V4's fidelity report (metrics.hpp compare_compressed_attention) against fp64.
#include <gtest/gtest.h>

#include <cmath>
#include <memory>
#include <random>
#include <vector>

#include "dsa/compressed_attention.hpp"
#include "dsa/error.hpp"
#include "dsa/kv_cache.hpp"
#include "dsa/metrics.hpp"
#include "reference.hpp"

using namespace dsa;

namespace {

constexpr int64_t T = 240, Lq = 24, H = 3, d = 32, W = 16, HI = 4, DI = 16;

struct Layer {
  std::mt19937_64 rng{61};
  Tensor q = test::random_tensor({Lq, H, d}, rng, 0.4f, "q");
  Tensor kv = test::random_tensor({T, d}, rng, 1.0f, "kv");
  Tensor c4 = test::random_tensor({T / 4, d}, rng, 1.0f, "compressed");
  Tensor sink = test::random_tensor({H}, rng, 1.0f, "sink");
  Tensor qi = test::random_tensor({Lq, HI, DI}, rng, 1.0f, "q_index");
  Tensor ki = test::random_tensor({T / 4, DI}, rng, 1.0f, "k_index");
  Tensor wi = test::random_tensor({Lq, HI}, rng, 1.0f, "weights");
};

double scale() {
  return 1.0 / std::sqrt(double(d));
}

// The reference's head-averaged probability of each visible entry (every-entry reference).
std::vector<double> entry_mass(const Layer& l, const CompressedAttentionInputs& in, int64_t r) {
  const int64_t visible = in.visible_entries(r);
  std::vector<int64_t> all(static_cast<std::size_t>(visible));
  for (int64_t j = 0; j < visible; ++j) all[j] = j;
  std::vector<double> mass(static_cast<std::size_t>(visible), 0.0);
  for (int64_t h = 0; h < H; ++h) {
    double lse = 0;
    const float* q = test::f32(l.q) + (r * H + h) * d;
    test::reference_v4_row(q, test::f32(l.kv), test::f32(l.c4), d, in.position(r), W, all,
                           test::f32(l.sink)[h], scale(), lse);
    for (int64_t j = 0; j < visible; ++j) {
      double dot = 0;
      for (int64_t e = 0; e < d; ++e) dot += double(q[e]) * test::f32(l.c4)[j * d + e];
      mass[j] += std::exp(scale() * dot - lse) / H;
    }
  }
  return mass;
}

}  // namespace

TEST(CompressedCompare, CsaWithTheIndexerAgainstEveryEntryMatchesFp64) {
  const Layer l;
  CompressedCompareInputs ci;
  ci.attention = make_compressed_attention_inputs(l.q, l.kv, &l.c4, &l.sink, V4Attention::csa, W);
  ci.scale = static_cast<float>(scale());
  ci.indexer = make_compressed_indexer_inputs(l.qi, l.ki, l.wi, {}, 4, T);
  ci.topk = {4, 20};
  const Comparison c = compare_compressed_attention(ci, nullptr);
  ASSERT_EQ(c.per_k.size(), 2u);
  EXPECT_EQ(c.keys, T / 4);
  const CompressedAttentionInputs& in = ci.attention;
  for (std::size_t ki = 0; ki < 2; ++ki) {
    const Fidelity& f = c.per_k[ki];
    for (int64_t r = 0; r < Lq; ++r) {
      const int64_t t = in.position(r), visible = in.visible_entries(r);
      // The indexer's scores in fp64 and its top-k.
      std::vector<double> score(static_cast<std::size_t>(visible));
      for (int64_t j = 0; j < visible; ++j) {
        for (int64_t h = 0; h < HI; ++h) {
          double dot = 0;
          for (int64_t e = 0; e < DI; ++e)
            dot += double(test::f32(l.qi)[(r * HI + h) * DI + e]) * test::f32(l.ki)[j * DI + e];
          score[j] += test::f32(l.wi)[r * HI + h] * std::max(dot, 0.0);
        }
      }
      const std::vector<int32_t> top = test::reference_topk(score.data(), visible, f.k);
      const std::vector<int64_t> sel(top.begin(), top.end());
      std::vector<int64_t> all(static_cast<std::size_t>(visible));
      for (int64_t j = 0; j < visible; ++j) all[j] = j;
      double mass = 0;
      for (int64_t h = 0; h < H; ++h) {
        const float* q = test::f32(l.q) + (r * H + h) * d;
        double lse_s = 0, lse_a = 0;
        const std::vector<double> os =
            test::reference_v4_row(q, test::f32(l.kv), test::f32(l.c4), d, t, W, sel,
                                   test::f32(l.sink)[h], scale(), lse_s);
        const std::vector<double> oa =
            test::reference_v4_row(q, test::f32(l.kv), test::f32(l.c4), d, t, W, all,
                                   test::f32(l.sink)[h], scale(), lse_a);
        double err = 0, norm = 0;
        for (int64_t e = 0; e < d; ++e) {
          err += (os[e] - oa[e]) * (os[e] - oa[e]);
          norm += oa[e] * oa[e];
        }
        EXPECT_NEAR(f.out_rel_err[r * H + h], std::sqrt(err / norm), 1e-5) << r;
        EXPECT_NEAR(f.mass_recall_head[r * H + h], std::exp(lse_s - lse_a), 1e-5) << r;
        mass += std::exp(lse_s - lse_a) / H;
      }
      EXPECT_NEAR(f.mass_recall[r], mass, 1e-5);
      // Oracle top-k recall and the KL losses on the entries.
      const std::vector<double> p = entry_mass(l, in, r);
      const std::vector<int32_t> oracle = test::reference_topk(p.data(), visible, f.k);
      int64_t hits = 0;
      for (int32_t j : oracle) hits += j >= 0 && std::find(sel.begin(), sel.end(), j) != sel.end();
      EXPECT_NEAR(f.topk_recall[r], double(hits) / std::min<int64_t>(f.k, visible), 1e-6) << r;
      const auto kl = [&](const std::vector<int64_t>& set) {
        double pm = 0, top_score = -INFINITY, z = 0, sum = 0;
        for (int64_t j : set) {
          if (j < 0) continue;
          pm += p[j];
          top_score = std::max(top_score, score[j]);
        }
        for (int64_t j : set) {
          if (j >= 0) z += std::exp(score[j] - top_score);
        }
        for (int64_t j : set) {
          if (j < 0) continue;
          const double pi = p[j] / pm, qi = std::exp(score[j] - top_score) / z;
          sum += pi * std::log(pi / qi);
        }
        return sum;
      };
      EXPECT_NEAR(f.kl_sparse[r], kl(sel), 1e-4 * (1 + kl(sel))) << r;
      if (ki == 0) EXPECT_NEAR(c.kl_dense[r], kl(all), 1e-4 * (1 + kl(all))) << r;
    }
  }
  // k at least every visible entry: the every-entry reference itself.
  ci.topk = {T / 4};
  const Comparison whole = compare_compressed_attention(ci, nullptr);
  for (float e : whole.per_k[0].out_rel_err) EXPECT_LT(e, 1e-5);
  for (float m : whole.per_k[0].mass_recall) EXPECT_NEAR(m, 1.0, 1e-5);
  for (float m : whole.per_k[0].topk_recall) EXPECT_EQ(m, 1.0f);
  const nlohmann::json results = comparison_json(whole);
  EXPECT_EQ(results[0]["rows"]["exact"], Lq);  // every row sees at most k entries
}

TEST(CompressedCompare, ReportFieldsComeFromTheInputsAndTheComparison) {
  Layer l;
  CompressedCompareInputs ci;
  ci.attention = make_compressed_attention_inputs(l.q, l.kv, &l.c4, &l.sink, V4Attention::csa, W);
  ci.scale = static_cast<float>(scale());
  ci.indexer = make_compressed_indexer_inputs(l.qi, l.ki, l.wi, ci.indexer_config, 4, T);
  ci.topk = {4, 8};
  const Comparison c = compare_compressed_attention(ci, nullptr);
  const nlohmann::json report = comparison_report(ci, c);
  EXPECT_EQ(report["shape"], nlohmann::json({{"batch", 1},
                                             {"queries", Lq},
                                             {"keys", T / 4},
                                             {"heads", H},
                                             {"kv_heads", 1},
                                             {"d_qk", d},
                                             {"d_v", d},
                                             {"tokens", T},
                                             {"entries", T / 4},
                                             {"d", d},
                                             {"indexer_heads", HI},
                                             {"indexer_dim", DI}}));
  EXPECT_EQ(report["layout"], "v4");
  EXPECT_EQ(report["attention"], "csa");
  EXPECT_EQ(report["reference"], "every-entry");
  EXPECT_EQ(report["window"], W);
  EXPECT_EQ(report["compress_ratio"], 4);
  EXPECT_EQ(report["sink"], true);
  EXPECT_EQ(report["scale"], ci.scale);
  EXPECT_EQ(report["selection"], "indexer");
  EXPECT_EQ(report["indexer"], indexer_config_json(ci.indexer_config));
  EXPECT_EQ(report["results"], comparison_json(c));
  EXPECT_EQ(report["flops"]["dense_attention"], c.dense_flops);
  EXPECT_FALSE(report.contains("scale_rule"));  // the caller's
  // HCA against dense attention: every visible entry, no indexer.
  Tensor c128 = test::random_tensor({T / 128, d}, l.rng, 1.0f, "compressed");
  CompressedCompareInputs hca;
  hca.attention = make_compressed_attention_inputs(l.q, l.kv, &c128, nullptr, V4Attention::hca, W);
  hca.reference = V4Reference::dense;
  const nlohmann::json every = comparison_report(hca, compare_compressed_attention(hca, nullptr));
  EXPECT_EQ(every["attention"], "hca");
  EXPECT_EQ(every["reference"], "dense");
  EXPECT_EQ(every["selection"], "every-entry");
  EXPECT_EQ(every["sink"], false);
  EXPECT_EQ(every["compress_ratio"], 128);
  EXPECT_FALSE(every.contains("indexer"));
}

TEST(CompressedCompare, HcaAgainstDenseAttentionOverTheRawTokens) {
  Layer l;
  Tensor c128 = test::random_tensor({T / 128, d}, l.rng, 1.0f, "compressed");
  CompressedCompareInputs ci;
  ci.attention = make_compressed_attention_inputs(l.q, l.kv, &c128, &l.sink, V4Attention::hca, W);
  ci.scale = static_cast<float>(scale());
  ci.reference = V4Reference::dense;
  const Comparison c = compare_compressed_attention(ci, nullptr);
  ASSERT_EQ(c.per_k.size(), 1u);
  const CompressedAttentionInputs& in = ci.attention;
  for (int64_t r = 0; r < Lq; ++r) {
    const int64_t t = in.position(r);
    std::vector<int64_t> entries;
    for (int64_t j = 0; j < in.visible_entries(r); ++j) entries.push_back(j);
    for (int64_t h = 0; h < H; ++h) {
      const float* q = test::f32(l.q) + (r * H + h) * d;
      double lse_h = 0, lse_d = 0;
      const std::vector<double> oh =
          test::reference_v4_row(q, test::f32(l.kv), test::f32(c128), d, t, W, entries,
                                 test::f32(l.sink)[h], scale(), lse_h);
      const std::vector<double> od = test::reference_v4_row(
          q, test::f32(l.kv), nullptr, d, t, t + 1, {}, test::f32(l.sink)[h], scale(), lse_d);
      double err = 0, norm = 0;
      for (int64_t e = 0; e < d; ++e) {
        err += (oh[e] - od[e]) * (oh[e] - od[e]);
        norm += od[e] * od[e];
      }
      EXPECT_NEAR(c.per_k[0].out_rel_err[r * H + h], std::sqrt(err / norm), 1e-5) << r;
      EXPECT_TRUE(std::isnan(c.per_k[0].mass_recall_head[r * H + h]));  // other key sets
    }
  }
  // What the comparison refuses.
  ci.reference = V4Reference::every_entry;
  EXPECT_THROW(compare_compressed_attention(ci, nullptr), Error);
  ci.attention = make_compressed_attention_inputs(l.q, l.kv, nullptr, &l.sink, V4Attention::swa, W);
  ci.reference = V4Reference::dense;
  EXPECT_THROW(compare_compressed_attention(ci, nullptr), Error);
  EXPECT_THROW(parse_v4_reference("sparse"), Error);
}

// With V4's fp8 caches (--kv-cache fp8): the selected attention reads the caches, so out_rel_err
// is theirs against the dense reference over the raw values, and kv_cache_loss is their output
// against the same selection over the values; both against fp64 on the dequantized rows.
TEST(CompressedCompare, Fp8CachesAgainstTheValuesAndTheReference) {
  constexpr int64_t T8 = 200, Lq8 = 12, H8 = 2, d8 = 512, k = 6;
  std::mt19937_64 rng(67);
  const Tensor q = test::random_tensor({Lq8, H8, d8}, rng, 0.05f, "q");
  const Tensor kv = test::random_tensor({T8, d8}, rng, 1.0f, "kv");
  const Tensor c4 = test::random_tensor({T8 / 4, d8}, rng, 1.0f, "compressed");
  const Tensor sink = test::random_tensor({H8}, rng, 1.0f, "sink");
  Tensor indices = make_tensor(DType::i32, {Lq8, k}, "indices");
  CompressedCompareInputs ci;
  ci.attention = make_compressed_attention_inputs(q, kv, &c4, &sink, V4Attention::csa, W);
  const CompressedAttentionInputs& in = ci.attention;
  for (int64_t r = 0; r < Lq8; ++r) {  // the last entries first, -1 past the visible ones
    for (int64_t i = 0; i < k; ++i) {
      const int64_t visible = in.visible_entries(r);
      mutable_data<int32_t>(indices)[r * k + i] =
          static_cast<int32_t>(i < visible ? visible - 1 - i : -1);
    }
  }
  ci.indices = &indices;
  ci.scale = 1.0f / std::sqrt(float(d8));
  ci.reference = V4Reference::dense;
  const std::unique_ptr<V4Fp8CacheAttention> fp8 = fp8_v4_cache_attention(in);
  ci.fp8_cache = &fp8->inputs;
  const Comparison c = compare_compressed_attention(ci, nullptr);
  ASSERT_EQ(c.kv_cache, "fp8");
  ASSERT_EQ(c.per_k.size(), 1u);
  const Fidelity& f = c.per_k[0];
  std::vector<float> kv8(static_cast<std::size_t>(T8 * d8)),
      c8(static_cast<std::size_t>(T8 / 4 * d8));
  dequantize_v4_cache_fp8(fp8->kv, 0, T8, kv8.data());
  dequantize_v4_cache_fp8(fp8->compressed, 0, T8 / 4, c8.data());
  double squares = 0, norms = 0;
  for (int64_t r = 0; r < Lq8; ++r) {
    const int64_t t = in.position(r);
    std::vector<int64_t> selected;
    for (int64_t i = 0; i < k; ++i) {
      const int32_t j = mutable_data<int32_t>(indices)[r * k + i];
      if (j >= 0) selected.push_back(j);
    }
    for (int64_t h = 0; h < H8; ++h) {
      const float* qh = test::f32(q) + (r * H8 + h) * d8;
      const double s = test::f32(sink)[h];
      double lse = 0;
      const std::vector<double> cached =
          test::reference_v4_row(qh, kv8.data(), c8.data(), d8, t, W, selected, s, ci.scale, lse);
      const std::vector<double> values = test::reference_v4_row(
          qh, test::f32(kv), test::f32(c4), d8, t, W, selected, s, ci.scale, lse);
      const std::vector<double> dense =
          test::reference_v4_row(qh, test::f32(kv), nullptr, d8, t, t + 1, {}, s, ci.scale, lse);
      double loss = 0, norm = 0, err = 0, dense_norm = 0;
      for (int64_t e = 0; e < d8; ++e) {
        loss += (cached[e] - values[e]) * (cached[e] - values[e]);
        norm += values[e] * values[e];
        err += (cached[e] - dense[e]) * (cached[e] - dense[e]);
        dense_norm += dense[e] * dense[e];
      }
      squares += loss;
      norms += norm;
      const float want = static_cast<float>(std::sqrt(loss / norm));
      EXPECT_GT(want, 1e-3) << "the fp8 caches lose something";
      EXPECT_NEAR(f.cache_rel_err[r * H8 + h], want, 2e-3 * want) << r << " " << h;
      EXPECT_NEAR(f.out_rel_err[r * H8 + h], std::sqrt(err / dense_norm), 1e-4) << r << " " << h;
    }
  }
  EXPECT_NEAR(f.cache_error_squares / f.cache_reference_squares, squares / norms,
              5e-3 * squares / norms);
  const nlohmann::json report = comparison_report(ci, c);
  EXPECT_EQ(report["kv_cache"], "fp8");
  EXPECT_NEAR(report["results"][0]["kv_cache_loss"]["out_rel_err_global"].get<double>(),
              std::sqrt(squares / norms), 3e-3 * std::sqrt(squares / norms));
  // Inputs that are not fp8 caches, or caches of another layer's shape, are refused.
  CompressedCompareInputs other = ci;
  other.fp8_cache = &ci.attention;
  EXPECT_THROW(compare_compressed_attention(other, nullptr), Error);
  const CompressedAttentionInputs wider =
      make_compressed_attention_inputs(q, kv, &c4, &sink, V4Attention::csa, W + 1);
  const std::unique_ptr<V4Fp8CacheAttention> wrong = fp8_v4_cache_attention(wider);
  other.fp8_cache = &wrong->inputs;
  EXPECT_THROW(compare_compressed_attention(other, nullptr), Error);
}
