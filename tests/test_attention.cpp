// Sparse and dense attention against an fp64 reference: MQA (latent kv), MHA and GQA, decode
// offsets, batches, padding, empty rows, lse merging, shares of the rows and index validation.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>

#include "dsa/attention.hpp"
#include "dsa/error.hpp"
#include "reference.hpp"

namespace dsa {
namespace {

using test::f32;

struct Layout {
  int64_t batch, queries, keys, heads, kv_heads, d_qk, d_v;
  bool batched, latent;
};

struct Problem {
  Layout layout;
  Tensor q, k, v;
  AttentionInputs inputs;
};

Shape with_batch(const Layout& l, Shape shape) {
  if (l.batched) shape.insert(shape.begin(), l.batch);
  return shape;
}

std::unique_ptr<Problem> make_problem(const Layout& l, uint64_t seed, float q_scale = 1.0f) {
  std::mt19937_64 rng(seed);
  auto p = std::make_unique<Problem>();
  p->layout = l;
  p->q = test::random_tensor(with_batch(l, {l.queries, l.heads, l.d_qk}), rng, q_scale, "q");
  if (l.latent) {
    p->k = test::random_tensor(with_batch(l, {l.keys, l.d_qk}), rng, 1.0f, "kv");
    p->inputs = make_mqa_inputs(p->q, p->k, l.d_v);
  } else {
    p->k = test::random_tensor(with_batch(l, {l.keys, l.kv_heads, l.d_qk}), rng, 1.0f, "k");
    p->v = test::random_tensor(with_batch(l, {l.keys, l.kv_heads, l.d_v}), rng, 1.0f, "v");
    p->inputs = make_mha_inputs(p->q, p->k, p->v);
  }
  return p;
}

struct Result {
  std::vector<float> out, lse;
};

AttentionSink collector(const Layout& l, Result& r) {
  r.out.assign(static_cast<std::size_t>(l.batch * l.queries * l.heads * l.d_v), NAN);
  r.lse.assign(static_cast<std::size_t>(l.batch * l.queries * l.heads), NAN);
  return [&r, l](const AttentionBlock& b) {
    const int64_t row = b.batch * l.queries + b.row_begin;
    std::copy_n(b.out, b.rows * l.heads * l.d_v, r.out.begin() + row * l.heads * l.d_v);
    std::copy_n(b.lse, b.rows * l.heads, r.lse.begin() + row * l.heads);
  };
}

// Random selections: a random subset of the visible positions of random size (sometimes
// empty), in random order, with -1 padding scattered among them.
Tensor random_indices(const Layout& l, int64_t k, std::mt19937_64& rng, bool allow_empty) {
  Tensor t = make_tensor(DType::i32, with_batch(l, {l.queries, k}), "idx");
  int32_t* p = mutable_data<int32_t>(t);
  for (int64_t r = 0; r < l.batch * l.queries; ++r) {
    const int64_t visible = l.keys - l.queries + r % l.queries + 1;
    std::vector<int32_t> all(static_cast<std::size_t>(visible));
    for (int64_t s = 0; s < visible; ++s) all[s] = static_cast<int32_t>(s);
    std::shuffle(all.begin(), all.end(), rng);
    const int64_t lo = allow_empty ? 0 : 1;
    const int64_t n =
        lo + static_cast<int64_t>(rng() % static_cast<uint64_t>(std::min(k, visible) - lo + 1));
    all.resize(static_cast<std::size_t>(n));
    all.resize(static_cast<std::size_t>(k), -1);
    std::shuffle(all.begin(), all.end(), rng);
    std::copy(all.begin(), all.end(), p + r * k);
  }
  return t;
}

void expect_matches_reference(const Problem& p, const Tensor* indices, const Result& got,
                              double scale) {
  const Layout& l = p.layout;
  const int64_t k_stride = l.latent ? l.d_qk : l.kv_heads * l.d_qk;
  const int64_t v_stride = l.latent ? l.d_qk : l.kv_heads * l.d_v;
  double err = 0, norm = 0;
  for (int64_t b = 0; b < l.batch; ++b) {
    const float* kb = f32(p.k) + b * l.keys * k_stride;
    const float* vb = (l.latent ? f32(p.k) : f32(p.v)) + b * l.keys * v_stride;
    auto key = [&](int64_t s, int64_t g) {
      return kb + s * k_stride + (l.latent ? 0 : g * l.d_qk);
    };
    auto value = [&](int64_t s, int64_t g) {
      return vb + s * v_stride + (l.latent ? 0 : g * l.d_v);
    };
    for (int64_t t = 0; t < l.queries; ++t) {
      const int64_t row = b * l.queries + t;
      std::vector<int64_t> selected;
      if (indices) {
        const int64_t k = indices->shape.back();
        for (int64_t i = 0; i < k; ++i) {
          const int32_t s = reinterpret_cast<const int32_t*>(indices->data)[row * k + i];
          if (s >= 0) selected.push_back(s);
        }
      } else {
        for (int64_t s = 0; s <= l.keys - l.queries + t; ++s) selected.push_back(s);
      }
      std::vector<double> out, lse;
      test::reference_attention_row(f32(p.q) + row * l.heads * l.d_qk, l.heads, l.kv_heads, l.d_qk,
                                    l.d_v, selected, scale, key, value, out, lse);
      for (int64_t i = 0; i < l.heads * l.d_v; ++i) {
        const double diff = got.out[row * l.heads * l.d_v + i] - out[i];
        err += diff * diff;
        norm += out[i] * out[i];
      }
      for (int64_t h = 0; h < l.heads; ++h) {
        const float actual = got.lse[row * l.heads + h];
        if (std::isinf(lse[h])) {
          ASSERT_EQ(actual, -INFINITY) << "row " << row;
        } else {
          ASSERT_NEAR(actual, lse[h], 1e-5 * std::max(1.0, std::fabs(lse[h])))
              << "row " << row << " head " << h;
        }
      }
    }
  }
  EXPECT_LE(std::sqrt(err), 1e-5 * std::sqrt(norm) + 1e-12) << "relative Frobenius error";
}

const Layout kLayouts[] = {
    {1, 1, 1, 1, 1, 8, 8, false, true},   {1, 37, 37, 4, 1, 24, 16, false, true},
    {2, 5, 50, 8, 1, 40, 32, true, true}, {1, 30, 30, 4, 4, 16, 12, false, false},
    {2, 9, 21, 6, 2, 8, 10, true, false}, {1, 150, 150, 2, 1, 64, 64, false, true},
};

TEST(SparseAttention, MatchesFp64ReferenceOnRandomSelections) {
  uint64_t seed = 1;
  for (const Layout& l : kLayouts) {
    const auto p = make_problem(l, seed++);
    std::mt19937_64 rng(seed++);
    for (int64_t k : {1, 7, 64}) {
      const Tensor indices = random_indices(l, k, rng, true);
      validate_indices(p->inputs, indices, {});
      Result r;
      const float scale = default_scale(l.d_qk);
      sparse_attention(p->inputs, indices, scale, collector(l, r), nullptr);
      expect_matches_reference(*p, &indices, r, scale);
    }
  }
}

TEST(DenseAttention, MatchesFp64ReferenceAndSparseOverEveryPosition) {
  uint64_t seed = 100;
  for (const Layout& l : kLayouts) {
    const auto p = make_problem(l, seed++);
    const float scale = 0.3f;
    Result dense;
    dense_attention(p->inputs, scale, collector(l, dense), nullptr);
    expect_matches_reference(*p, nullptr, dense, scale);
    // S_t = {0..t}: the sparse path over every visible position is the same function.
    Tensor all = make_tensor(DType::i32, with_batch(l, {l.queries, l.keys}), "all");
    for (int64_t r = 0; r < l.batch * l.queries; ++r) {
      for (int64_t s = 0; s < l.keys; ++s) {
        mutable_data<int32_t>(all)[r * l.keys + s] =
            s <= l.keys - l.queries + r % l.queries ? static_cast<int32_t>(s) : -1;
      }
    }
    Result sparse;
    sparse_attention(p->inputs, all, scale, collector(l, sparse), nullptr);
    for (std::size_t i = 0; i < dense.out.size(); ++i)
      ASSERT_NEAR(dense.out[i], sparse.out[i], 1e-5);
    for (std::size_t i = 0; i < dense.lse.size(); ++i)
      ASSERT_NEAR(dense.lse[i], sparse.lse[i], 1e-4);
  }
}

TEST(DenseAttention, LargeLogitsStayFinite) {
  const Layout l = {1, 300, 300, 2, 1, 32, 32, false, true};
  const auto p = make_problem(l, 7, 30.0f);  // logits in the hundreds: exp overflows naively
  Result r;
  dense_attention(p->inputs, 1.0f, collector(l, r), nullptr);
  for (float x : r.out) ASSERT_TRUE(std::isfinite(x));
  expect_matches_reference(*p, nullptr, r, 1.0f);
}

TEST(SparseAttention, LseMergesPartialResults) {
  // softmax over A u B from the parts: o = (e^lse_A o_A + e^lse_B o_B) / (e^lse_A + e^lse_B).
  const Layout l = {1, 1, 40, 3, 1, 16, 8, false, true};
  const auto p = make_problem(l, 8);
  auto run = [&](std::vector<int32_t> sel) {
    Tensor t = make_tensor(DType::i32, {1, static_cast<int64_t>(sel.size())}, "sel");
    std::copy(sel.begin(), sel.end(), mutable_data<int32_t>(t));
    Result r;
    sparse_attention(p->inputs, t, 0.25f, collector(l, r), nullptr);
    return r;
  };
  const Result a = run({0, 5, 9, 20}), b = run({1, 2, 39}), both = run({0, 5, 9, 20, 1, 2, 39});
  for (int64_t h = 0; h < l.heads; ++h) {
    const double m = std::max(a.lse[h], b.lse[h]);
    const double wa = std::exp(a.lse[h] - m), wb = std::exp(b.lse[h] - m);
    EXPECT_NEAR(both.lse[h], m + std::log(wa + wb), 1e-5);
    for (int64_t c = 0; c < l.d_v; ++c) {
      const double merged = (wa * a.out[h * l.d_v + c] + wb * b.out[h * l.d_v + c]) / (wa + wb);
      EXPECT_NEAR(both.out[h * l.d_v + c], merged, 1e-5);
    }
  }
}

TEST(SparseAttention, EmptyRowGivesZeroAndMinusInfinity) {
  const Layout l = {1, 3, 3, 2, 1, 4, 4, false, true};
  const auto p = make_problem(l, 9);
  Tensor none = make_tensor(DType::i64, {3, 2}, "none");
  std::fill_n(mutable_data<int64_t>(none), 6, -1);
  Result r;
  sparse_attention(p->inputs, none, 1.0f, collector(l, r), nullptr);
  for (float x : r.out) EXPECT_EQ(x, 0.0f);
  for (float x : r.lse) EXPECT_EQ(x, -INFINITY);
}

// What MPI ranks do (DESIGN.md section 8), in one process: each share of the rows computed
// alone hands the sink only its rows, in order, and the shares put together are the whole
// computation to the bit, sparse and dense, MQA and GQA, across batch elements and decode rows.
TEST(Attention, SharesOfTheRowsPutTogetherAreTheWhole) {
  const Layout layouts[] = {{2, 70, 90, 4, 1, 16, 8, true, true},
                            {1, 150, 150, 2, 1, 64, 64, false, true},
                            {3, 9, 21, 6, 2, 8, 10, true, false}};
  uint64_t seed = 300;
  for (const Layout& l : layouts) {
    const auto p = make_problem(l, seed++);
    std::mt19937_64 rng(seed++);
    const Tensor indices = random_indices(l, 24, rng, true);
    for (const Tensor* selection : {&indices, static_cast<const Tensor*>(nullptr)}) {
      SCOPED_TRACE(selection ? "sparse" : "dense");
      auto attend = [&](const AttentionInputs& in, const AttentionSink& sink) {
        if (selection) {
          sparse_attention(in, *selection, 0.3f, sink, nullptr);
        } else {
          dense_attention(in, 0.3f, sink, nullptr);
        }
      };
      Result whole;
      attend(p->inputs, collector(l, whole));
      for (const int parts : {1, 2, 3, 5}) {
        SCOPED_TRACE(parts);
        const std::vector<RowRange> shares = balanced_rows(p->inputs, selection, parts);
        ASSERT_EQ(shares.size(), static_cast<std::size_t>(parts));
        EXPECT_EQ(shares.front().begin, 0);
        EXPECT_EQ(shares.back().end, l.batch * l.queries);
        Result merged;
        const AttentionSink keep = collector(l, merged);
        for (int i = 0; i < parts; ++i) {
          if (i + 1 < parts) {
            EXPECT_EQ(shares[i].end, shares[i + 1].begin);
            EXPECT_EQ(shares[i].end % l.queries % 16, 0) << "a share starts at a block";
          }
          AttentionInputs share = p->inputs;
          share.rows = shares[i];
          int64_t next = shares[i].begin;
          attend(share, [&](const AttentionBlock& b) {
            EXPECT_EQ(b.batch * l.queries + b.row_begin, next) << "a row outside the share";
            next += b.rows;
            keep(b);
          });
          EXPECT_EQ(next, shares[i].end);
        }
        EXPECT_EQ(
            0, std::memcmp(whole.out.data(), merged.out.data(), whole.out.size() * sizeof(float)));
        EXPECT_EQ(
            0, std::memcmp(whole.lse.data(), merged.lse.data(), whole.lse.size() * sizeof(float)));
      }
    }
  }
  // A share of nothing computes nothing; rows outside the attention's are a usage error.
  const auto p = make_problem(layouts[0], 1);
  AttentionInputs share = p->inputs;
  share.rows = {140, 140};
  const AttentionSink none = [](const AttentionBlock&) { FAIL() << "a block of no rows"; };
  dense_attention(share, 1.0f, none, nullptr);
  share.rows = {0, 141};
  try {
    dense_attention(share, 1.0f, none, nullptr);
    FAIL();
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ExitCode::usage);
    EXPECT_EQ(std::string(e.what()), "rows [0, 141) are not within the attention's 140 rows");
  }
  EXPECT_THROW(balanced_rows(p->inputs, nullptr, 0), Error);
}

void expect_rejected(const AttentionInputs& in, const Tensor& indices,
                     const std::vector<int64_t>& positions, const std::string& fragment) {
  try {
    validate_indices(in, indices, positions);
    FAIL() << "accepted: " << fragment;
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ExitCode::bad_input);
    EXPECT_NE(std::string(e.what()).find(fragment), std::string::npos) << e.what();
  }
}

TEST(ValidateIndices, RejectsFutureRepeatedNegativeAndMisshapenIndices) {
  const Layout l = {1, 4, 10, 2, 1, 4, 4, false, true};  // decode: rows at positions 6..9
  const auto p = make_problem(l, 10);
  auto indices = [](std::vector<int32_t> v, Shape shape) {
    Tensor t = make_tensor(DType::i32, std::move(shape), "idx.npy");
    std::copy(v.begin(), v.end(), mutable_data<int32_t>(t));
    return t;
  };
  validate_indices(p->inputs, indices({6, -1, 7, 0, 8, 1, 9, 2}, {4, 2}), {});
  expect_rejected(p->inputs, indices({7, -1, 7, 0, 8, 1, 9, 2}, {4, 2}), {},
                  "selects 7");  // future
  expect_rejected(p->inputs, indices({6, 6, 7, 0, 8, 1, 9, 2}, {4, 2}), {}, "twice");
  expect_rejected(p->inputs, indices({6, -2, 7, 0, 8, 1, 9, 2}, {4, 2}), {}, "selects -2");
  expect_rejected(p->inputs, indices({6, 1, 7, 0, 8, 1}, {3, 2}), {}, "idx.npy");
  expect_rejected(p->inputs, indices({6, 1, 7, 0, 8, 1, 9, 2}, {1, 4, 2}), {}, "idx.npy");
  expect_rejected(p->inputs, indices({6, -1, 7, 0, 8, 1, 9, 2}, {4, 2}), {6, 7, 8, 8}, "t = 8");
}

TEST(DropFutureIndices, TurnsOnlyVisibleFuturePositionsIntoPadding) {
  const Layout l = {2, 3, 8, 2, 1, 4, 4, true, true};  // decode: rows at positions 5..7
  const auto p = make_problem(l, 11);
  Tensor t = make_tensor(DType::i32, {2, 3, 3}, "released.npy");
  const std::vector<int32_t> given = {5, 6, 7, 0, 7, -1, 7,  6, 1,   // batch 0
                                      8, 6, 2, 3, 9, 6,  -4, 0, 7};  // batch 1
  std::copy(given.begin(), given.end(), mutable_data<int32_t>(t));
  const DroppedIndices kept = drop_future_indices(p->inputs, t);
  EXPECT_EQ(kept.indices.dtype, DType::i64);
  EXPECT_EQ(kept.indices.shape, t.shape);
  EXPECT_EQ(kept.indices.name, "released.npy");
  // 8 and 9 are beyond Lk = 8 and -4 is negative: kept, for validate_indices to reject.
  const std::vector<int64_t> expected = {5, -1, -1, 0, -1, -1, 7,  6, 1,
                                         8, -1, 2,  3, 9,  6,  -4, 0, 7};
  std::vector<int64_t> got(expected.size());
  to_i64(kept.indices, 0, kept.indices.numel(), got.data());
  EXPECT_EQ(got, expected);
  EXPECT_EQ(kept.dropped, 4);
}

TEST(SoftmaxScale, NamedNumberedAndDefault) {
  EXPECT_EQ(resolve_softmax_scale("", 64).value, 0.125f);
  EXPECT_EQ(resolve_softmax_scale("default", 576).value, default_scale(576));
  EXPECT_EQ(resolve_softmax_scale("default", 576).rule, "d_qk^-0.5");
  // The released MLA: 192^-0.5 * (0.1 ln 40 + 1)^2, computed independently here in fp64.
  const double mscale = 0.1 * std::log(40.0) + 1.0;
  EXPECT_NEAR(deepseek_v32_softmax_scale(), mscale * mscale / std::sqrt(192.0), 1e-16);
  EXPECT_EQ(deepseek_v32_softmax_scale(), 0.1352337788608801);
  const SoftmaxScale v32 = resolve_softmax_scale("deepseek-v3.2", 576);
  EXPECT_EQ(v32.value, static_cast<float>(0.1352337788608801));
  EXPECT_EQ(v32.rule, "deepseek-v3.2");
  EXPECT_EQ(resolve_softmax_scale("0.25", 576).value, 0.25f);
  EXPECT_EQ(resolve_softmax_scale("0.25", 576).rule, "given");
  for (const char* bad : {"0", "-1", "nan", "inf", "1e400", "deepseek-v3", "0.1x", " 1"}) {
    try {
      resolve_softmax_scale(bad, 64);
      ADD_FAILURE() << "accepted " << bad;
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), ExitCode::usage) << bad;
      EXPECT_EQ(std::string(e.what()).rfind("softmax scale", 0), 0u) << e.what();
    }
  }
}

TEST(AttentionReport, ModeLayoutAndScale) {
  std::mt19937_64 rng(12);
  const Tensor q = test::random_tensor({5, 4, 8}, rng, 1, "q");
  const Tensor kv = test::random_tensor({5, 8}, rng, 1, "kv");
  const Tensor k = test::random_tensor({5, 2, 8}, rng, 1, "k");
  const Tensor v = test::random_tensor({5, 2, 6}, rng, 1, "v");
  const SoftmaxScale v32 = resolve_softmax_scale("deepseek-v3.2", 8);
  EXPECT_EQ(attention_report(make_mqa_inputs(q, kv, 4), false, v32),
            nlohmann::json({{"mode", "sparse"},
                            {"layout", "mqa"},
                            {"scale", v32.value},
                            {"scale_rule", "deepseek-v3.2"},
                            {"kv_cache", "f32"}}));
  const nlohmann::json dense = attention_report(make_mha_inputs(q, k, v), true, {0.25f, "given"});
  EXPECT_EQ(dense["mode"], "dense");
  EXPECT_EQ(dense["layout"], "mha");
  EXPECT_EQ(dense["scale"], 0.25);
  EXPECT_EQ(dense["scale_rule"], "given");
}

TEST(AttentionInputs, RejectsMismatchedShapes) {
  std::mt19937_64 rng(11);
  const Tensor q = test::random_tensor({5, 4, 8}, rng, 1, "q.npy");
  auto expect_bad = [](auto make, const std::string& name, ExitCode code = ExitCode::bad_input) {
    try {
      make();
      FAIL() << name;
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), code);
      EXPECT_NE(std::string(e.what()).find(name), std::string::npos) << e.what();
    }
  };
  const Tensor kv7 = test::random_tensor({5, 7}, rng, 1, "kv7.npy");
  expect_bad([&] { make_mqa_inputs(q, kv7, 4); }, "kv7.npy");
  const Tensor kv_short = test::random_tensor({4, 8}, rng, 1, "short.npy");
  expect_bad([&] { make_mqa_inputs(q, kv_short, 4); }, "short.npy");
  const Tensor kv = test::random_tensor({5, 8}, rng, 1, "kv.npy");
  expect_bad([&] { make_mqa_inputs(q, kv, 9); }, "d_v must be in [1, d_qk = 8], got 9",
             ExitCode::usage);
  const Tensor k3 = test::random_tensor({5, 3, 8}, rng, 1, "k3.npy"),
               v3 = test::random_tensor({5, 3, 2}, rng, 1, "v3.npy");
  expect_bad([&] { make_mha_inputs(q, k3, v3); }, "k3.npy");  // 3 kv heads do not divide 4
  const Tensor k2 = test::random_tensor({5, 2, 8}, rng, 1, "k2.npy"),
               v_bad = test::random_tensor({6, 2, 2}, rng, 1, "vbad.npy");
  expect_bad([&] { make_mha_inputs(q, k2, v_bad); }, "vbad.npy");
  const Tensor q0 = make_tensor(DType::f32, {5, 0, 8}, "q0.npy");
  expect_bad([&] { make_mqa_inputs(q0, kv, 4); }, "q0.npy");
  const Tensor v0 = make_tensor(DType::f32, {5, 2, 0}, "v0.npy");
  expect_bad([&] { make_mha_inputs(q, k2, v0); }, "v0.npy");
  const Tensor qi = make_tensor(DType::i64, {5, 4, 8}, "qi.npy");
  expect_bad([&] { make_mqa_inputs(qi, kv, 4); }, "qi.npy");
}

}  // namespace
}  // namespace dsa
