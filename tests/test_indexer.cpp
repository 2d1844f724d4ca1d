// The lightning indexer (Eq. 1) against an fp64 reference: f32, bf16 and fp8 paths, Hadamard
// invariance, decode offsets, batches, shares of the rows and shape validation.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>

#include "dsa/error.hpp"
#include "dsa/indexer.hpp"
#include "dsa/topk.hpp"
#include "reference.hpp"

namespace dsa {
namespace {

using test::f32;
using test::random_tensor;

struct Problem {
  int64_t batch, queries, keys, heads, dim;
  bool batched;
};

struct Inputs {
  Tensor q, k, w;
};

Inputs make_inputs(const Problem& p, uint64_t seed) {
  std::mt19937_64 rng(seed);
  Shape qs = {p.queries, p.heads, p.dim}, ks = {p.keys, p.dim}, ws = {p.queries, p.heads};
  if (p.batched) {
    qs.insert(qs.begin(), p.batch);
    ks.insert(ks.begin(), p.batch);
    ws.insert(ws.begin(), p.batch);
  }
  return {random_tensor(qs, rng, 1.0f, "q"), random_tensor(ks, rng, 1.0f, "k"),
          random_tensor(ws, rng, 1.0f, "w")};
}

// Every score row of every batch element, collected from the streaming interface.
std::vector<float> all_scores(const Inputs& in, const IndexerConfig& config) {
  const IndexerInputs inputs = make_indexer_inputs(in.q, in.k, in.w, config);
  std::vector<float> out(static_cast<std::size_t>(inputs.batch * inputs.queries * inputs.keys),
                         NAN);
  int64_t next_row = 0;
  indexer_scores(
      inputs, config,
      [&](const ScoreBlock& block) {
        EXPECT_EQ(block.batch * inputs.queries + block.row_begin, next_row)
            << "blocks out of order";
        next_row += block.rows;
        std::copy_n(block.scores, block.rows * block.keys,
                    out.begin() + (block.batch * inputs.queries + block.row_begin) * inputs.keys);
      },
      nullptr);
  EXPECT_EQ(next_row, inputs.batch * inputs.queries);
  return out;
}

// The weights as the scoring applies them, without the q scales (the reference dequantizes):
// as given, or for raw weights_proj outputs bf16(w · f32(H_I^-0.5)) · f32(d_I^-0.5).
std::vector<float> reference_weights(const Tensor& w, int64_t heads, int64_t dim,
                                     const IndexerConfig& config) {
  std::vector<float> out = to_f32(w);
  if (!config.raw_weights) return out;
  const auto head_factor = static_cast<float>(1.0 / std::sqrt(double(heads)));
  const auto dim_factor = static_cast<float>(1.0 / std::sqrt(double(dim)));
  for (float& x : out) x = round_to_bf16(x * head_factor) * dim_factor;
  return out;
}

// Applies `round` to a copy of q and k (as the precision modes do) and compares the scores
// with the fp64 reference on the rounded values.
template <typename Round>
void expect_matches_reference(const Problem& p, const IndexerConfig& config, Round round,
                              uint64_t seed) {
  const Inputs in = make_inputs(p, seed);
  const std::vector<float> got = all_scores(in, config);
  std::vector<float> q = to_f32(in.q), k = to_f32(in.k);
  const std::vector<float> w = reference_weights(in.w, p.heads, p.dim, config);
  round(q.data(), p.batch * p.queries * p.heads);
  round(k.data(), p.batch * p.keys);
  for (int64_t b = 0; b < p.batch; ++b) {
    const auto ref = test::reference_scores(
        q.data() + b * p.queries * p.heads * p.dim, k.data() + b * p.keys * p.dim,
        w.data() + b * p.queries * p.heads, p.queries, p.keys, p.heads, p.dim);
    for (int64_t t = 0; t < p.queries; ++t) {
      double row_max = 0;
      for (int64_t s = 0; s < p.keys; ++s) {
        if (std::isfinite(ref[t * p.keys + s]))
          row_max = std::max(row_max, std::fabs(ref[t * p.keys + s]));
      }
      for (int64_t s = 0; s < p.keys; ++s) {
        const double expected = ref[t * p.keys + s];
        const float actual = got[(b * p.queries + t) * p.keys + s];
        if (std::isinf(expected)) {
          ASSERT_EQ(actual, -INFINITY) << "b=" << b << " t=" << t << " s=" << s;
        } else {
          ASSERT_NEAR(actual, expected, 1e-5 * std::max(row_max, 1e-3))
              << "b=" << b << " t=" << t << " s=" << s;
        }
      }
    }
  }
}

// The rows of x [rows, dim] rotated and rounded to bf16, as the fp8 and fp4 pipelines begin,
// each then handed to `quantize`.
template <typename Quantize>
void for_each_rotated_row(float* x, int64_t rows, int64_t dim, Quantize quantize) {
  for (int64_t r = 0; r < rows; ++r) {
    float* row = x + r * dim;
    hadamard_transform(row, dim);
    for (int64_t i = 0; i < dim; ++i) row[i] = round_to_bf16(row[i]);
    quantize(row);
  }
}

const Problem kShapes[] = {
    {1, 1, 1, 1, 1, false},   {1, 37, 37, 4, 16, false}, {1, 5, 50, 3, 20, false},
    {2, 19, 19, 4, 32, true}, {3, 4, 29, 2, 8, true},    {1, 70, 300, 8, 64, false},
};

TEST(Indexer, F32MatchesFp64Reference) {
  uint64_t seed = 10;
  for (const Problem& p : kShapes) {
    for (int64_t block : {1, 5, 16}) {
      IndexerConfig config;
      config.query_block = block;
      expect_matches_reference(
          p, config, [&](float*, int64_t) {}, seed++);
    }
  }
}

// H_I = 3 and 5: H_I^-0.5 is not a power of two, so its bf16 rounding shows (issue 12).
TEST(Indexer, RawWeightsFollowTheReleasedSteps) {
  for (const Problem& p : {Problem{1, 9, 12, 3, 16, false}, Problem{2, 7, 11, 5, 32, true},
                           Problem{1, 9, 12, 4, 16, false}}) {
    IndexerConfig config;
    config.raw_weights = true;
    expect_matches_reference(
        p, config, [&](float*, int64_t) {}, 20);
  }
  // A weight whose product with 3^-0.5 is not a bf16 value: the rounding is visible.
  const auto third = static_cast<float>(1.0 / std::sqrt(3.0));
  EXPECT_NE(round_to_bf16(1.1f * third), 1.1f * third);
}

TEST(Indexer, Bf16RoundsQueriesAndKeys) {
  IndexerConfig config;
  config.precision = Precision::bf16;
  for (const Problem& p : kShapes) {
    expect_matches_reference(
        p, config,
        [&](float* x, int64_t rows) {
          for (int64_t i = 0; i < rows * p.dim; ++i) x[i] = round_to_bf16(x[i]);
        },
        30);
  }
}

TEST(Indexer, Fp8QuantizesEveryBlockOfEveryRow) {
  for (bool ue8m0 : {false, true}) {
    for (int64_t block : {128, 8}) {
      IndexerConfig config;
      config.precision = Precision::fp8;
      config.ue8m0 = ue8m0;
      config.quant_block = block;
      for (const Problem& p : kShapes) {
        expect_matches_reference(
            p, config,
            [&](float* x, int64_t rows) {
              for (int64_t i = 0; i < rows * p.dim; ++i) x[i] = round_to_bf16(x[i]);
              for (int64_t r = 0; r < rows; ++r) {
                for (int64_t b0 = 0; b0 < p.dim; b0 += block) {
                  const int64_t n = std::min(block, p.dim - b0);
                  float amax = 0;
                  for (int64_t i = 0; i < n; ++i)
                    amax = std::max(amax, std::fabs(x[r * p.dim + b0 + i]));
                  const float scale = fp8_block_scale(amax, ue8m0);
                  for (int64_t i = 0; i < n; ++i) {
                    float& v = x[r * p.dim + b0 + i];
                    v = e4m3_to_f32(f32_to_e4m3(v / scale)) * scale;
                  }
                }
              }
            },
            40);
      }
    }
  }
}

// The released order (issue 12): rotate in f32, round to bf16, then quantize; raw weights.
TEST(Indexer, Fp8RotatesRoundsToBf16ThenQuantizes) {
  for (bool ue8m0 : {false, true}) {
    IndexerConfig config;
    config.precision = Precision::fp8;
    config.hadamard = config.raw_weights = true;
    config.ue8m0 = ue8m0;
    for (const Problem& p : {Problem{1, 40, 40, 6, 128, false}, Problem{2, 3, 30, 4, 64, true}}) {
      expect_matches_reference(
          p, config,
          [&](float* x, int64_t rows) {
            for_each_rotated_row(x, rows, p.dim, [&](float* row) {
              float amax = 0;
              for (int64_t i = 0; i < p.dim; ++i) amax = std::max(amax, std::fabs(row[i]));
              const float scale = fp8_block_scale(amax, ue8m0);
              for (int64_t i = 0; i < p.dim; ++i)
                row[i] = e4m3_to_f32(f32_to_e4m3(row[i] / scale)) * scale;
            });
          },
          45);
    }
  }
}

// DeepSeek-V4's fp4: the rotation, bf16, then e2m1 in blocks of 32 with power-of-two scales
// (2^ceil(log2(max(amax, 6 * 2^-126) / 6))), nearest value with ties to the even mantissa; the
// reference computes both from their definitions, by brute force.
TEST(Indexer, Fp4RotatesRoundsToBf16ThenQuantizesInBlocksOf32) {
  IndexerConfig config;
  config.precision = Precision::fp4;
  config.hadamard = config.raw_weights = true;
  const auto e2m1 = [](float x) {
    const float values[] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f};
    const bool even[] = {true, false, true, false, true, false, true, false};
    const float a = std::fabs(x);
    int best = 0;
    for (int i = 1; i < 8; ++i) {
      const float d = std::fabs(a - values[i]), d_best = std::fabs(a - values[best]);
      if (d < d_best || (d == d_best && even[i])) best = i;
    }
    return std::copysign(values[best], x);
  };
  for (const Problem& p : {Problem{1, 40, 40, 6, 128, false}, Problem{2, 3, 30, 4, 64, true}}) {
    expect_matches_reference(
        p, config,
        [&](float* x, int64_t rows) {
          for_each_rotated_row(x, rows, p.dim, [&](float* row) {
            for (int64_t b = 0; b < p.dim; b += 32) {
              float amax = 0;
              for (int64_t i = b; i < b + 32; ++i) amax = std::max(amax, std::fabs(row[i]));
              const double wanted = std::max<double>(amax, 6.0 * std::ldexp(1.0, -126)) / 6.0;
              int exponent = 0;
              const double mantissa =
                  std::frexp(wanted, &exponent);  // wanted = m 2^e, m in [.5, 1)
              const float scale =
                  static_cast<float>(std::ldexp(1.0, mantissa == 0.5 ? exponent - 1 : exponent));
              for (int64_t i = b; i < b + 32; ++i) row[i] = e2m1(row[i] / scale) * scale;
            }
          });
        },
        47);
  }
}

TEST(Indexer, HadamardLeavesF32ScoresUnchanged) {
  const Problem p = {2, 33, 40, 4, 64, true};
  const Inputs in = make_inputs(p, 50);
  IndexerConfig plain, rotated;
  rotated.hadamard = true;
  const auto a = all_scores(in, plain), b = all_scores(in, rotated);
  for (std::size_t i = 0; i < a.size(); ++i) {
    if (std::isinf(a[i])) {
      ASSERT_EQ(a[i], b[i]);
    } else {
      ASSERT_NEAR(a[i], b[i], 1e-4 * std::max(1.0f, std::fabs(a[i]))) << i;
    }
  }
}

void expect_bad_input(const Tensor& q, const Tensor& k, const Tensor& w, const std::string& name) {
  try {
    make_indexer_inputs(q, k, w, IndexerConfig{});
    FAIL() << "accepted bad shapes";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ExitCode::bad_input);
    EXPECT_NE(std::string(e.what()).find(name), std::string::npos) << e.what();
  }
}

TEST(Indexer, RejectsMismatchedShapesNamingTheTensor) {
  std::mt19937_64 rng(70);
  const Tensor q = random_tensor({8, 4, 16}, rng, 1, "q.npy");
  const Tensor k = random_tensor({8, 16}, rng, 1, "k.npy");
  const Tensor w = random_tensor({8, 4}, rng, 1, "w.npy");
  expect_bad_input(q, random_tensor({8, 15}, rng, 1, "k15.npy"), w, "k15.npy");
  expect_bad_input(q, k, random_tensor({8, 3}, rng, 1, "w3.npy"), "w3.npy");
  expect_bad_input(random_tensor({8, 64}, rng, 1, "q2d.npy"), k, w, "q2d.npy");
  expect_bad_input(random_tensor({9, 4, 16}, rng, 1, "q9.npy"), k, random_tensor({9, 4}, rng),
                   "q9.npy");
  expect_bad_input(q, random_tensor({2, 8, 16}, rng, 1, "kb.npy"), w, "kb.npy");
  expect_bad_input(q, make_tensor(DType::i32, {8, 16}, "ki.npy"), w, "ki.npy");
  expect_bad_input(make_tensor(DType::f32, {8, 0, 16}, "q0.npy"), k,
                   make_tensor(DType::f32, {8, 0}), "q0.npy");
  IndexerConfig hadamard;
  hadamard.hadamard = true;
  const Tensor q12 = random_tensor({8, 4, 12}, rng), k12 = random_tensor({8, 12}, rng);
  try {
    make_indexer_inputs(q12, k12, w, hadamard);
    FAIL();
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ExitCode::usage);
    EXPECT_EQ(std::string(e.what()),
              "the Hadamard rotation needs d_I to be a power of two, got 12");
  }
}

TEST(Indexer, AcceptsEveryFloatingInputDtype) {
  // bf16 and f16 inputs are widened exactly; the scores equal those of the widened f32 copy.
  const Problem p = {1, 6, 9, 2, 8, false};
  const Inputs in = make_inputs(p, 80);
  Tensor q16 = make_tensor(DType::bf16, in.q.shape, "q16");
  for (int64_t i = 0; i < in.q.numel(); ++i)
    mutable_data<uint16_t>(q16)[i] = f32_to_bf16(f32(in.q)[i]);
  Tensor q_widened = make_tensor(DType::f32, in.q.shape);
  to_f32(q16, 0, q16.numel(), mutable_data<float>(q_widened));
  EXPECT_EQ(all_scores({q16, in.k, in.w}, {}), all_scores({q_widened, in.k, in.w}, {}));
}

// DeepSeek-V4's CSA: the keys are compressed entries of 4 tokens, entry j visible from token
// 4j + 3 on; the scores of invisible entries are -inf and the selection takes visible ones only.
TEST(Indexer, ConfigCheckAndReportFields) {
  IndexerConfig config;
  config.ue8m0 = true;
  try {
    validate_indexer_config(config);
    ADD_FAILURE() << "ue8m0 without fp8 accepted";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ExitCode::usage);
    // The parameter first: the apps put their flag in front of it.
    EXPECT_EQ(std::string(e.what()), "ue8m0 applies to precision fp8 only (precision is f32)");
  }
  config.precision = Precision::fp8;
  EXPECT_NO_THROW(validate_indexer_config(config));
  config.query_block = 8;
  EXPECT_EQ(indexer_config_json(config), nlohmann::json({{"precision", "fp8"},
                                                         {"hadamard", false},
                                                         {"ue8m0", true},
                                                         {"quant_block", 128},
                                                         {"raw_weights", false},
                                                         {"query_block", 8}}));
  std::mt19937_64 rng(78);
  const Tensor q = test::random_tensor({6, 2, 8}, rng, 1.0f, "q_index");
  const Tensor k = test::random_tensor({6, 8}, rng, 1.0f, "k_index");
  const Tensor w = test::random_tensor({6, 2}, rng, 1.0f, "weights");
  EXPECT_EQ(indexer_report(make_indexer_inputs(q, k, w, config), config),
            nlohmann::json({{"indexer", indexer_config_json(config)}}));
  const Tensor entries = test::random_tensor({3, 8}, rng, 1.0f, "k_index");
  const nlohmann::json compressed =
      indexer_report(make_compressed_indexer_inputs(q, entries, w, config, 4, 12), config);
  EXPECT_EQ(compressed["compressed_keys"], nlohmann::json({{"compress_ratio", 4}, {"tokens", 12}}));
}

TEST(Indexer, CompressedKeysAreVisibleOnceTheirWindowIsComplete) {
  std::mt19937_64 rng(77);
  const int64_t T = 50, Lq = 20, H = 4, d = 32, m = 4, N = T / m;
  const Tensor q = test::random_tensor({Lq, H, d}, rng, 1.0f, "q_index");
  const Tensor k = test::random_tensor({N, d}, rng, 1.0f, "k_index");
  const Tensor w = test::random_tensor({Lq, H}, rng, 1.0f, "weights");
  const IndexerConfig config;
  const IndexerInputs in = make_compressed_indexer_inputs(q, k, w, config, m, T);
  EXPECT_EQ(in.position(0), T - Lq);
  EXPECT_EQ(in.visible(0), (T - Lq + 1) / m);
  std::vector<float> scores;
  indexer_scores(
      in, config,
      [&](const ScoreBlock& b) {
        scores.insert(scores.end(), b.scores, b.scores + b.rows * b.keys);
      },
      nullptr);
  ASSERT_EQ(static_cast<int64_t>(scores.size()), Lq * N);
  const int64_t topk = 5;
  std::vector<int32_t> picked;
  select_from_indexer(
      in, config, topk,
      [&](const SelectionBlock& b) {
        EXPECT_EQ(b.first_position, in.position(b.row_begin));
        picked.insert(picked.end(), b.indices, b.indices + b.rows * b.k);
      },
      nullptr);
  for (int64_t r = 0; r < Lq; ++r) {
    const int64_t t = T - Lq + r, visible = (t + 1) / m;
    std::vector<double> want(static_cast<std::size_t>(N));
    for (int64_t j = 0; j < N; ++j) {
      double sum = 0;
      for (int64_t h = 0; h < H; ++h) {
        double dot = 0;
        for (int64_t c = 0; c < d; ++c)
          dot += double(test::f32(q)[(r * H + h) * d + c]) * test::f32(k)[j * d + c];
        sum += test::f32(w)[r * H + h] * std::max(dot, 0.0);
      }
      want[j] = j < visible ? sum : -INFINITY;
      if (j < visible) {
        EXPECT_NEAR(scores[r * N + j], sum, 1e-4 * (1 + std::fabs(sum))) << r << " " << j;
      } else {
        EXPECT_EQ(scores[r * N + j], -INFINITY) << r << " " << j;
      }
    }
    const std::vector<int32_t> expect = test::reference_topk(want.data(), visible, topk);
    EXPECT_EQ(std::vector<int32_t>(picked.begin() + r * topk, picked.begin() + (r + 1) * topk),
              expect)
        << r;
  }
  // The key count must be what the tokens make.
  EXPECT_THROW(make_compressed_indexer_inputs(q, k, w, config, m, T + 4), Error);
  EXPECT_THROW(make_compressed_indexer_inputs(q, k, w, config, m, Lq - 1), Error);
}

// What MPI ranks do (DESIGN.md section 8), in one process: each share of the rows scored alone
// hands the sink only its rows, in order, and the shares put together are the whole score matrix
// to the bit, for query blocks that do not divide the rows, the fp8 path, a batch with decode
// rows and compressed keys.
TEST(Indexer, SharesOfTheRowsPutTogetherAreTheWhole) {
  std::mt19937_64 rng(91);
  struct Case {
    Problem problem;
    int64_t block, ratio;
    Precision precision;
  };
  for (const Case& c : {Case{{2, 37, 60, 4, 32, true}, 5, 1, Precision::fp8},
                        Case{{1, 100, 100, 2, 16, false}, 16, 1, Precision::f32},
                        Case{{1, 50, 12, 4, 32, false}, 7, 4, Precision::bf16}}) {
    const Problem& p = c.problem;
    SCOPED_TRACE(::testing::Message() << p.batch << "x" << p.queries << " block " << c.block);
    const Inputs in = make_inputs(p, rng());
    IndexerConfig config;
    config.query_block = c.block;
    config.precision = c.precision;
    config.hadamard = c.precision == Precision::fp8;
    const IndexerInputs inputs =
        c.ratio > 1 ? make_compressed_indexer_inputs(in.q, in.k, in.w, config, c.ratio, p.queries)
                    : make_indexer_inputs(in.q, in.k, in.w, config);
    const int64_t rows = p.batch * p.queries;
    auto scores_of = [&](RowRange share, std::vector<float>& out) {
      IndexerInputs part = inputs;
      part.rows = share;
      int64_t next = share.begin;
      indexer_scores(
          part, config,
          [&](const ScoreBlock& b) {
            EXPECT_EQ(b.batch * p.queries + b.row_begin, next) << "a row outside the share";
            next += b.rows;
            std::copy_n(b.scores, b.rows * b.keys,
                        out.begin() + (b.batch * p.queries + b.row_begin) * p.keys);
          },
          nullptr);
      EXPECT_EQ(next, share.end < 0 ? rows : share.end);
    };
    std::vector<float> whole(static_cast<std::size_t>(rows * p.keys), NAN);
    scores_of({}, whole);
    for (const int parts : {1, 2, 3, 4}) {
      SCOPED_TRACE(parts);
      const std::vector<RowRange> shares = balanced_rows(inputs, config, parts);
      ASSERT_EQ(shares.size(), static_cast<std::size_t>(parts));
      EXPECT_EQ(shares.front().begin, 0);
      EXPECT_EQ(shares.back().end, rows);
      std::vector<float> merged(whole.size(), NAN);
      for (int i = 0; i < parts; ++i) {
        if (i + 1 < parts) {
          EXPECT_EQ(shares[i].end, shares[i + 1].begin);
          EXPECT_EQ(shares[i].end % p.queries % c.block, 0) << "a share starts at a query block";
        }
        scores_of(shares[i], merged);
      }
      EXPECT_EQ(0, std::memcmp(whole.data(), merged.data(), whole.size() * sizeof(float)));
    }
    IndexerInputs outside = inputs;
    outside.rows = {0, rows + 1};
    const auto ignore = [](const ScoreBlock&) {};
    EXPECT_THROW(indexer_scores(outside, config, ignore, nullptr), Error);
  }
}

}  // namespace
}  // namespace dsa
