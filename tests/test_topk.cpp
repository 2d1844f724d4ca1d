// Top-k selection (Eq. 2): hand-made edges (ties, padding, NaN, one token), random rows
// against a full sort, decode offsets and batches, fused against scores-then-select, shares of
// the rows.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>

#include "dsa/error.hpp"
#include "dsa/topk.hpp"
#include "reference.hpp"

namespace dsa {
namespace {

std::vector<int32_t> topk(const std::vector<float>& scores, int64_t k, int64_t visible = -1) {
  if (visible < 0) visible = static_cast<int64_t>(scores.size());
  std::vector<int32_t> indices(static_cast<std::size_t>(k));
  std::vector<float> selected(static_cast<std::size_t>(k));
  TopkScratch scratch;
  select_topk_row(scores.data(), visible, k, indices.data(), selected.data(), scratch);
  for (int64_t i = 0; i < k; ++i) {
    if (indices[i] < 0) {
      EXPECT_EQ(selected[i], -INFINITY);
    } else {
      EXPECT_TRUE(std::isnan(selected[i]) ? std::isnan(scores[indices[i]])
                                          : selected[i] == scores[indices[i]]);
    }
  }
  return indices;
}

using V = std::vector<int32_t>;

TEST(SelectTopkRow, HandMadeCases) {
  EXPECT_EQ(topk({1, 3, 3, 2, 3}, 2), (V{1, 2}));  // ties: lower position first
  EXPECT_EQ(topk({1, 3, 3, 2, 3}, 4), (V{1, 2, 4, 3}));
  EXPECT_EQ(topk({5, 5, 5, 5}, 2), (V{0, 1}));
  EXPECT_EQ(topk({0.5f, 2, 1}, 5), (V{1, 2, 0, -1, -1}));  // fewer than k: pad with -1
  EXPECT_EQ(topk({7}, 3), (V{0, -1, -1}));                 // one token
  EXPECT_EQ(topk({1, 2, 3}, 3), (V{2, 1, 0}));             // k == visible
  EXPECT_EQ(topk({NAN, -INFINITY, 1}, 3), (V{2, 0, 1}));   // NaN ranks like -inf
  EXPECT_EQ(topk({NAN, 4, NAN, 3}, 2), (V{1, 3}));
  EXPECT_EQ(topk({-INFINITY, -INFINITY, -1}, 2), (V{2, 0}));
  EXPECT_EQ(topk({9, 1, 2, 100}, 2, 3), (V{0, 2}));  // only the visible prefix counts
  EXPECT_EQ(topk({-0.0f, 0.0f}, 1), (V{0}));         // -0 == +0: a tie
}

TEST(SelectTopkRow, MatchesFullSortOnRandomRows) {
  std::mt19937_64 rng(1);
  for (int trial = 0; trial < 400; ++trial) {
    const int64_t n = 1 + static_cast<int64_t>(rng() % 300);
    const int64_t k = 1 + static_cast<int64_t>(rng() % 80);
    std::vector<float> scores(static_cast<std::size_t>(n));
    std::vector<double> as_double(scores.size());
    const bool many_ties = trial % 2 == 0;
    std::normal_distribution<float> normal;
    for (int64_t s = 0; s < n; ++s) {
      scores[s] = many_ties ? static_cast<float>(rng() % 7) : normal(rng);
      as_double[s] = scores[s];
    }
    ASSERT_EQ(topk(scores, k), test::reference_topk(as_double.data(), n, k)) << "trial " << trial;
  }
}

// Long rows whose scores agree in their high bits (1 + small steps, some equal, some negative),
// so the radix selection needs all of its passes to find the k-th.
TEST(SelectTopkRow, MatchesFullSortOnLongRowsOfCloseScores) {
  std::mt19937_64 rng(2);
  for (int trial = 0; trial < 12; ++trial) {
    const int64_t n = 2000 + static_cast<int64_t>(rng() % 20000);
    const int64_t k = 1 + static_cast<int64_t>(rng() % 3000);
    std::vector<float> scores(static_cast<std::size_t>(n));
    std::vector<double> as_double(scores.size());
    for (int64_t s = 0; s < n; ++s) {
      const float step = std::ldexp(static_cast<float>(rng() % 5000), -22);
      scores[s] = (trial % 3 == 0 ? -1.0f : 1.0f) + step;
      as_double[s] = scores[s];
    }
    ASSERT_EQ(topk(scores, k), test::reference_topk(as_double.data(), n, k)) << "trial " << trial;
  }
}

Tensor score_tensor(Shape shape, std::mt19937_64& rng) {
  Tensor t = test::random_tensor(std::move(shape), rng, 1.0f, "scores");
  // Integer-valued scores: many ties, so the tie order is exercised.
  float* p = mutable_data<float>(t);
  for (int64_t i = 0; i < t.numel(); ++i) p[i] = std::round(p[i] * 2);
  return t;
}

TEST(SelectFromScores, DecodeRowsSeeOnlyTheirPrefixAndBatchesAreIndependent) {
  std::mt19937_64 rng(2);
  const int64_t B = 3, Lq = 5, Lk = 40, k = 8;
  const Tensor scores = score_tensor({B, Lq, Lk}, rng);
  std::vector<int32_t> got(static_cast<std::size_t>(B * Lq * k), -7);
  select_from_scores(
      scores, k,
      [&](const SelectionBlock& b) {
        EXPECT_EQ(b.first_position, Lk - Lq + b.row_begin);
        std::copy_n(b.indices, b.rows * k, got.begin() + (b.batch * Lq + b.row_begin) * k);
      },
      nullptr);
  const float* s = test::f32(scores);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t t = 0; t < Lq; ++t) {
      std::vector<double> row(s + (b * Lq + t) * Lk, s + (b * Lq + t + 1) * Lk);
      const auto expected = test::reference_topk(row.data(), Lk - Lq + t + 1, k);
      EXPECT_EQ(
          std::vector<int32_t>(got.begin() + (b * Lq + t) * k, got.begin() + (b * Lq + t + 1) * k),
          expected)
          << "b=" << b << " t=" << t;
    }
  }
}

TEST(SelectFromScores, RejectsBadShapesAndK) {
  std::mt19937_64 rng(3);
  const auto noop = [](const SelectionBlock&) {};
  for (const Shape& shape : std::vector<Shape>{{5}, {6, 5}, {2, 2, 2, 2}}) {
    try {
      select_from_scores(score_tensor(shape, rng), 2, noop, nullptr);
      FAIL() << shape_string(shape);
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), ExitCode::bad_input);
      EXPECT_NE(std::string(e.what()).find("scores"), std::string::npos);
    }
  }
  try {
    select_from_scores(score_tensor({4, 4}, rng), 0, noop, nullptr);
    FAIL();
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ExitCode::usage);
    EXPECT_EQ(std::string(e.what()), "top-k size k must be at least 1, got 0");
  }
  try {
    select_from_scores(score_tensor({4, 4}, rng), int64_t{1} << 31, noop, nullptr);
    FAIL();
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ExitCode::usage);
    EXPECT_EQ(std::string(e.what()), "top-k size k = 2147483648 does not fit int32 indices");
  }
}

TEST(SelectFromIndexer, FusedEqualsScoresThenSelect) {
  std::mt19937_64 rng(4);
  struct Case {
    int64_t B, Lq, Lk, H, d, k, block;
  };
  for (const Case& c : {Case{1, 50, 50, 4, 16, 8, 16}, Case{2, 7, 61, 3, 8, 16, 5},
                        Case{1, 33, 33, 2, 4, 64, 1}, Case{1, 1, 1, 1, 1, 4, 16}}) {
    const bool batched = c.B > 1;
    Shape qs = {c.Lq, c.H, c.d}, ks = {c.Lk, c.d}, ws = {c.Lq, c.H};
    if (batched) {
      qs.insert(qs.begin(), c.B);
      ks.insert(ks.begin(), c.B);
      ws.insert(ws.begin(), c.B);
    }
    const Tensor q = test::random_tensor(qs, rng), k = test::random_tensor(ks, rng),
                 w = test::random_tensor(ws, rng);
    IndexerConfig config;
    config.query_block = c.block;
    const IndexerInputs inputs = make_indexer_inputs(q, k, w, config);
    Shape score_shape = {c.Lq, c.Lk};
    if (batched) score_shape.insert(score_shape.begin(), c.B);
    Tensor scores = make_tensor(DType::f32, score_shape, "scores");
    indexer_scores(
        inputs, config,
        [&](const ScoreBlock& b) {
          std::copy_n(b.scores, b.rows * b.keys,
                      mutable_data<float>(scores) + (b.batch * c.Lq + b.row_begin) * c.Lk);
        },
        nullptr);
    std::vector<int32_t> fused(static_cast<std::size_t>(c.B * c.Lq * c.k)), staged(fused.size());
    std::vector<float> fused_scores(fused.size());
    select_from_indexer(
        inputs, config, c.k,
        [&](const SelectionBlock& b) {
          EXPECT_EQ(b.first_position, c.Lk - c.Lq + b.row_begin);
          std::copy_n(b.indices, b.rows * c.k,
                      fused.begin() + (b.batch * c.Lq + b.row_begin) * c.k);
          std::copy_n(b.scores, b.rows * c.k,
                      fused_scores.begin() + (b.batch * c.Lq + b.row_begin) * c.k);
        },
        nullptr);
    select_from_scores(
        scores, c.k,
        [&](const SelectionBlock& b) {
          std::copy_n(b.indices, b.rows * c.k,
                      staged.begin() + (b.batch * c.Lq + b.row_begin) * c.k);
        },
        nullptr);
    EXPECT_EQ(fused, staged);
    // The selected scores are the indexer's scores at those positions.
    for (int64_t r = 0; r < c.B * c.Lq; ++r) {
      for (int64_t i = 0; i < c.k; ++i) {
        const int32_t s = fused[r * c.k + i];
        if (s >= 0) EXPECT_EQ(fused_scores[r * c.k + i], test::f32(scores)[r * c.Lk + s]);
      }
    }
    // Row t of a prefill has min(k, t + 1) entries, the rest -1.
    for (int64_t r = 0; r < c.B * c.Lq; ++r) {
      const int64_t visible = c.Lk - c.Lq + r % c.Lq + 1;
      for (int64_t i = 0; i < c.k; ++i)
        EXPECT_EQ(fused[r * c.k + i] >= 0, i < visible) << r << " " << i;
    }
  }
}

// What MPI ranks do (DESIGN.md section 8), in one process: shares of the rows selected alone,
// fused with the indexer or from a score matrix, hand the sink only their rows, and put together
// are the whole selection to the bit (indices and their scores), across batch elements.
TEST(SelectFromIndexer, SharesOfTheRowsPutTogetherAreTheWhole) {
  std::mt19937_64 rng(12);
  const int64_t B = 2, Lq = 45, Lk = 60, H = 3, d = 16, k = 10;
  const Tensor q = test::random_tensor({B, Lq, H, d}, rng),
               keys = test::random_tensor({B, Lk, d}, rng),
               w = test::random_tensor({B, Lq, H}, rng);
  IndexerConfig config;
  config.precision = Precision::bf16;
  config.query_block = 6;
  const IndexerInputs inputs = make_indexer_inputs(q, keys, w, config);
  Tensor scores = make_tensor(DType::f32, {B, Lq, Lk}, "scores");
  indexer_scores(
      inputs, config,
      [&](const ScoreBlock& b) {
        std::copy_n(b.scores, b.rows * b.keys,
                    mutable_data<float>(scores) + (b.batch * Lq + b.row_begin) * Lk);
      },
      nullptr);
  struct Selection {
    std::vector<int32_t> indices = std::vector<int32_t>(B * Lq * k, -7);
    std::vector<float> scores = std::vector<float>(B * Lq * k, NAN);
  };
  // Selects rows `share` (fused or from the scores) into `out`, checking that only they come.
  auto select = [&](bool fused, RowRange share, Selection& out) {
    int64_t next = share.begin;
    const SelectionSink sink = [&](const SelectionBlock& b) {
      EXPECT_EQ(b.batch * Lq + b.row_begin, next) << "a row outside the share";
      next += b.rows;
      std::copy_n(b.indices, b.rows * k, out.indices.begin() + (b.batch * Lq + b.row_begin) * k);
      std::copy_n(b.scores, b.rows * k, out.scores.begin() + (b.batch * Lq + b.row_begin) * k);
    };
    if (fused) {
      IndexerInputs part = inputs;
      part.rows = share;
      select_from_indexer(part, config, k, sink, nullptr);
    } else {
      select_from_scores(scores, k, sink, nullptr, share);
    }
    EXPECT_EQ(next, share.end < 0 ? B * Lq : share.end);
  };
  for (const bool fused : {true, false}) {
    SCOPED_TRACE(fused ? "fused" : "from scores");
    Selection whole;
    select(fused, {}, whole);
    for (const int parts : {1, 2, 3, 5}) {
      SCOPED_TRACE(parts);
      const std::vector<RowRange> shares =
          fused ? balanced_rows(inputs, config, parts) : balanced_rows(scores, parts);
      ASSERT_EQ(shares.size(), static_cast<std::size_t>(parts));
      EXPECT_EQ(shares.front().begin, 0);
      EXPECT_EQ(shares.back().end, B * Lq);
      Selection merged;
      for (int i = 0; i < parts; ++i) {
        if (i + 1 < parts) {
          EXPECT_EQ(shares[i].end, shares[i + 1].begin);
          if (fused) EXPECT_EQ(shares[i].end % Lq % config.query_block, 0);
        }
        select(fused, shares[i], merged);
      }
      EXPECT_EQ(merged.indices, whole.indices);
      EXPECT_EQ(0, std::memcmp(merged.scores.data(), whole.scores.data(),
                               whole.scores.size() * sizeof(float)));
    }
  }
  EXPECT_THROW(select_from_scores(scores, k, [](const SelectionBlock&) {}, nullptr, {3, 2}), Error);
  // The shares of a tensor that is no score matrix: the error select_from_scores gives.
  try {
    balanced_rows(make_tensor(DType::i32, {4, 4}, "sel"), 2);
    FAIL();
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ExitCode::bad_input);
  }
}

}  // namespace
}  // namespace dsa
