// DeepSeek-V4's attention over a window and compressed entries with a sink
// (compressed_attention.hpp) against an fp64 reference, and its edge cases.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "dsa/compressed_attention.hpp"
#include "dsa/error.hpp"
#include "reference.hpp"

using namespace dsa;

namespace {

struct Result {
  std::vector<float> out, lse;
};

Result run(const CompressedAttentionInputs& in, const Tensor* indices, float scale) {
  Result r;
  compressed_attention(
      in, indices, scale,
      [&](const AttentionBlock& b) {
        EXPECT_EQ(static_cast<int64_t>(r.lse.size()),
                  (b.batch * in.queries + b.row_begin) * in.heads);
        r.out.insert(r.out.end(), b.out, b.out + b.rows * b.heads * b.d_v);
        r.lse.insert(r.lse.end(), b.lse, b.lse + b.rows * b.heads);
      },
      nullptr);
  return r;
}

// fp64: per row the window tokens and the given entries (all visible ones when `all`).
Result reference(const CompressedAttentionInputs& in, const std::vector<std::vector<int64_t>>& sel,
                 bool all, double scale) {
  const int64_t H = in.heads, d = in.dim;
  Result r;
  for (int64_t b = 0; b < in.batch; ++b) {
    for (int64_t row = 0; row < in.queries; ++row) {
      std::vector<int64_t> entries;
      if (all) {
        for (int64_t j = 0; j < in.visible_entries(row); ++j) entries.push_back(j);
      } else if (!sel.empty()) {
        entries = sel[b * in.queries + row];
      }
      for (int64_t h = 0; h < H; ++h) {
        double lse = 0;
        const std::vector<double> o = test::reference_v4_row(
            test::f32(*in.q) + ((b * in.queries + row) * H + h) * d,
            test::f32(*in.kv) + b * in.tokens * d,
            in.compressed ? test::f32(*in.compressed) + b * in.entries * d : nullptr, d,
            in.position(row), in.window, entries, in.sink ? test::f32(*in.sink)[h] : -INFINITY,
            scale, lse);
        for (double v : o) r.out.push_back(static_cast<float>(v));
        r.lse.push_back(static_cast<float>(lse));
      }
    }
  }
  return r;
}

void expect_near(const Result& got, const Result& want, double tolerance) {
  ASSERT_EQ(got.out.size(), want.out.size());
  ASSERT_EQ(got.lse.size(), want.lse.size());
  for (std::size_t i = 0; i < want.out.size(); ++i) {
    ASSERT_NEAR(got.out[i], want.out[i], tolerance * (1 + std::fabs(want.out[i]))) << i;
  }
  for (std::size_t i = 0; i < want.lse.size(); ++i) {
    ASSERT_NEAR(got.lse[i], want.lse[i], tolerance * (1 + std::fabs(want.lse[i]))) << i;
  }
}

}  // namespace

TEST(CompressedAttention, CsaHcaAndSwaMatchTheFp64Reference) {
  std::mt19937_64 rng(31);
  const int64_t B = 2, T = 300, Lq = 160, H = 4, d = 64, window = 32;
  const Tensor q = test::random_tensor({B, Lq, H, d}, rng, 0.5f, "q");
  const Tensor kv = test::random_tensor({B, T, d}, rng, 1.0f, "kv");
  const Tensor sink = test::random_tensor({H}, rng, 1.0f, "sink");
  const float scale = 1.0f / std::sqrt(float(d));
  // CSA: a random selection of up to 12 visible entries per row, -1 padded.
  const Tensor c4 = test::random_tensor({B, T / 4, d}, rng, 1.0f, "compressed");
  const CompressedAttentionInputs csa =
      make_compressed_attention_inputs(q, kv, &c4, &sink, V4Attention::csa, window);
  const int64_t k = 12;
  Tensor indices = make_tensor(DType::i32, {B, Lq, k}, "indices");
  std::vector<std::vector<int64_t>> sel;
  for (int64_t r = 0; r < B * Lq; ++r) {
    std::vector<int64_t> visible;
    for (int64_t j = 0; j < csa.visible_entries(r % Lq); ++j) visible.push_back(j);
    std::shuffle(visible.begin(), visible.end(), rng);
    visible.resize(std::min<std::size_t>(visible.size(), k));
    visible.resize(k, -1);
    sel.push_back(visible);
    for (int64_t i = 0; i < k; ++i) mutable_data<int32_t>(indices)[r * k + i] = int32_t(visible[i]);
  }
  expect_near(run(csa, &indices, scale), reference(csa, sel, false, scale), 2e-5);
  // CSA without a selection: every visible entry (the reference that loses nothing to selection).
  expect_near(run(csa, nullptr, scale), reference(csa, {}, true, scale), 2e-5);
  // HCA: ratio 128, every visible entry.
  const Tensor c128 = test::random_tensor({B, T / 128, d}, rng, 1.0f, "compressed");
  const CompressedAttentionInputs hca =
      make_compressed_attention_inputs(q, kv, &c128, &sink, V4Attention::hca, window);
  EXPECT_EQ(hca.visible_entries(0), (T - Lq + 1) / 128);
  expect_near(run(hca, nullptr, scale), reference(hca, {}, true, scale), 2e-5);
  // SWA without a sink: plain softmax over the window.
  const CompressedAttentionInputs swa =
      make_compressed_attention_inputs(q, kv, nullptr, nullptr, V4Attention::swa, window);
  expect_near(run(swa, nullptr, scale), reference(swa, {}, false, scale), 2e-5);
}

TEST(CompressedAttention, ReportModeAndLayout) {
  std::mt19937_64 rng(32);
  const int64_t T = 64, Lq = 8, H = 2, d = 16;
  const Tensor q = test::random_tensor({Lq, H, d}, rng, 1.0f, "q");
  const Tensor kv = test::random_tensor({T, d}, rng, 1.0f, "kv");
  const Tensor c4 = test::random_tensor({T / 4, d}, rng, 1.0f, "compressed");
  const Tensor sink = test::random_tensor({H}, rng, 1.0f, "sink");
  const SoftmaxScale scale = resolve_softmax_scale("", d);
  const auto csa = make_compressed_attention_inputs(q, kv, &c4, &sink, V4Attention::csa, 16);
  EXPECT_EQ(compressed_attention_report(csa, false, scale),
            nlohmann::json({{"mode", "csa"},
                            {"layout", "v4"},
                            {"window", 16},
                            {"compress_ratio", 4},
                            {"sink", true},
                            {"kv_cache", "f32"},
                            {"scale", scale.value},
                            {"scale_rule", "d_qk^-0.5"}}));
  EXPECT_EQ(compressed_attention_report(csa, true, scale)["mode"], "csa-every-visible-entry");
  const auto swa = make_compressed_attention_inputs(q, kv, nullptr, nullptr, V4Attention::swa, 8);
  const nlohmann::json window = compressed_attention_report(swa, true, scale);
  EXPECT_EQ(window["mode"], "swa");  // every_entry is CSA's
  EXPECT_EQ(window["sink"], false);
  EXPECT_EQ(window["window"], 8);
}

TEST(CompressedAttention, TheSinkOnlyEnlargesTheDenominator) {
  // One token, one entry-free row: with sink a, o = v e^l / (e^a + e^l), lse = log(e^a + e^l).
  Tensor q = make_tensor(DType::f32, {1, 1, 2}, "q"), kv = make_tensor(DType::f32, {1, 2}, "kv");
  Tensor sink = make_tensor(DType::f32, {1}, "sink");
  mutable_data<float>(q)[0] = 1.0f;
  mutable_data<float>(kv)[0] = 2.0f;
  mutable_data<float>(kv)[1] = 3.0f;
  mutable_data<float>(sink)[0] = 0.5f;
  const CompressedAttentionInputs in =
      make_compressed_attention_inputs(q, kv, nullptr, &sink, V4Attention::swa, 128);
  const Result r = run(in, nullptr, 1.0f);
  const double l = 2.0, a = 0.5, p = std::exp(l) / (std::exp(a) + std::exp(l));
  EXPECT_NEAR(r.out[0], p * 2, 1e-6);
  EXPECT_NEAR(r.out[1], p * 3, 1e-6);
  EXPECT_NEAR(r.lse[0], std::log(std::exp(a) + std::exp(l)), 1e-6);
}

TEST(CompressedAttention, VisibilityWindowsAndBadSelections) {
  std::mt19937_64 rng(2);
  const int64_t T = 12, H = 1, d = 8;
  const Tensor q = test::random_tensor({T, H, d}, rng, 1.0f, "q.npy");
  const Tensor kv = test::random_tensor({T, d}, rng, 1.0f, "kv.npy");
  const Tensor c = test::random_tensor({T / 4, d}, rng, 1.0f, "c.npy");
  const CompressedAttentionInputs in =
      make_compressed_attention_inputs(q, kv, &c, nullptr, V4Attention::csa, 4);
  // Entry j is visible once its window is complete: t >= 4 j + 3.
  EXPECT_EQ(in.visible_entries(2), 0);
  EXPECT_EQ(in.visible_entries(3), 1);
  EXPECT_EQ(in.visible_entries(6), 1);
  EXPECT_EQ(in.visible_entries(7), 2);
  const auto message = [&](const std::vector<int32_t>& row_values, int64_t row) {
    Tensor idx = make_tensor(DType::i32, {T, 2}, "sel.npy");
    for (int64_t i = 0; i < 2 * T; ++i) mutable_data<int32_t>(idx)[i] = -1;
    for (int i = 0; i < 2; ++i) mutable_data<int32_t>(idx)[row * 2 + i] = row_values[i];
    try {
      run(in, &idx, 1.0f);
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), ExitCode::bad_input);
      return std::string(e.what());
    }
    return std::string("accepted");
  };
  EXPECT_EQ(message({0, -1}, 3), "accepted");
  EXPECT_NE(message({1, -1}, 6).find("selects entry 1: entries must be -1 or in [0, 1)"),
            std::string::npos);
  EXPECT_NE(message({0, 0}, 9).find("selects entry 0 twice"), std::string::npos);
  // Shapes name the tensor.
  const Tensor c_bad = test::random_tensor({T / 4 + 1, d}, rng, 1.0f, "c.npy");
  try {
    make_compressed_attention_inputs(q, kv, &c_bad, nullptr, V4Attention::csa, 4);
    ADD_FAILURE() << "accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("c.npy (compressed): expected shape [3, 8]"),
              std::string::npos)
        << e.what();
  }
  EXPECT_THROW(make_compressed_attention_inputs(q, kv, nullptr, nullptr, V4Attention::hca, 4),
               Error);
  const Tensor sink3 = test::random_tensor({3}, rng, 1.0f, "sink.npy");
  EXPECT_THROW(make_compressed_attention_inputs(q, kv, nullptr, &sink3, V4Attention::swa, 4),
               Error);
  EXPECT_THROW(parse_v4_attention("dense"), Error);
}

TEST(CompressedAttention, SharesOfTheRowsPutTogetherAreTheWhole) {
  std::mt19937_64 rng(33);
  const int64_t B = 2, T = 300, Lq = 104, H = 2, d = 16, k = 6;
  const Tensor q = test::random_tensor({B, Lq, H, d}, rng, 0.5f, "q");
  const Tensor kv = test::random_tensor({B, T, d}, rng, 1.0f, "kv");
  const Tensor sink = test::random_tensor({H}, rng, 1.0f, "sink");
  const Tensor c4 = test::random_tensor({B, T / 4, d}, rng, 1.0f, "compressed");
  const Tensor c128 = test::random_tensor({B, T / 128, d}, rng, 1.0f, "compressed");
  const auto collect = [](Result& r) {
    return [&r](const AttentionBlock& b) {
      r.out.insert(r.out.end(), b.out, b.out + b.rows * b.heads * b.d_v);
      r.lse.insert(r.lse.end(), b.lse, b.lse + b.rows * b.heads);
    };
  };
  const auto same = [](const std::vector<float>& a, const float* b) {
    return std::memcmp(a.data(), b, a.size() * sizeof(float)) == 0;
  };
  // A window of 32 chunks every batch element whole (shares start at a batch element); one of
  // 40000 tokens makes a row's gathered list so long that a chunk is 16 rows, and shares start
  // inside a batch element.
  for (const int64_t window : {int64_t{32}, int64_t{40000}}) {
    for (const V4Attention kind : {V4Attention::csa, V4Attention::hca, V4Attention::swa}) {
      SCOPED_TRACE(v4_attention_name(kind) + " window " + std::to_string(window));
      const Tensor* compressed = kind == V4Attention::csa   ? &c4
                                 : kind == V4Attention::hca ? &c128
                                                            : nullptr;
      const CompressedAttentionInputs in =
          make_compressed_attention_inputs(q, kv, compressed, &sink, kind, window);
      Tensor indices = make_tensor(DType::i32, {B, Lq, k}, "indices");
      for (int64_t r = 0; r < B * Lq; ++r) {
        std::vector<int64_t> visible;
        for (int64_t j = 0; j < in.visible_entries(r % Lq); ++j) visible.push_back(j);
        std::shuffle(visible.begin(), visible.end(), rng);
        visible.resize(k, -1);
        for (int64_t i = 0; i < k; ++i) mutable_data<int32_t>(indices)[r * k + i] = visible[i];
      }
      const Tensor* selection = kind == V4Attention::csa ? &indices : nullptr;
      Result whole;
      compressed_attention(in, selection, 0.3f, collect(whole), nullptr);
      bool inside = false;  // a share that starts inside a batch element
      for (const int parts : {1, 2, 3, 5}) {
        SCOPED_TRACE(parts);
        const std::vector<RowRange> shares = balanced_rows(in, selection, parts);
        ASSERT_EQ(shares.size(), static_cast<std::size_t>(parts));
        EXPECT_EQ(shares.front().begin, 0);
        EXPECT_EQ(shares.back().end, B * Lq);
        Result merged;
        for (int i = 0; i < parts; ++i) {
          if (i + 1 < parts) {
            EXPECT_EQ(shares[i].end, shares[i + 1].begin);
            EXPECT_EQ(shares[i].end % Lq % (window == 32 ? Lq : 16), 0) << "a share at a chunk";
            inside |= shares[i].end % Lq != 0;
          }
          CompressedAttentionInputs share = in;
          share.rows = shares[i];
          int64_t next = shares[i].begin;
          const AttentionSink keep = collect(merged);
          compressed_attention(
              share, selection, 0.3f,
              [&](const AttentionBlock& b) {
                EXPECT_EQ(b.batch * Lq + b.row_begin, next) << "a row outside the share";
                next += b.rows;
                keep(b);
              },
              nullptr);
          EXPECT_EQ(next, shares[i].end);
        }
        ASSERT_EQ(merged.out.size(), whole.out.size());
        EXPECT_TRUE(same(whole.out, merged.out.data()));
        EXPECT_TRUE(same(whole.lse, merged.lse.data()));
      }
      EXPECT_EQ(inside, window != 32);
      // Rows that start and end inside chunks: on the CPU a row's arithmetic is its own.
      CompressedAttentionInputs part = in;
      part.rows = {Lq - 13, Lq + 21};
      Result rows;
      compressed_attention(part, selection, 0.3f, collect(rows), nullptr);
      ASSERT_EQ(rows.out.size(), static_cast<std::size_t>(34 * H * d));
      EXPECT_TRUE(same(rows.out, whole.out.data() + (Lq - 13) * H * d));
      EXPECT_TRUE(same(rows.lse, whole.lse.data() + (Lq - 13) * H));
    }
  }
  // A share of nothing computes nothing; rows outside the attention's are a usage error.
  CompressedAttentionInputs share =
      make_compressed_attention_inputs(q, kv, nullptr, &sink, V4Attention::swa, 32);
  share.rows = {B * Lq, B * Lq};
  const AttentionSink none = [](const AttentionBlock&) { FAIL() << "a block of no rows"; };
  compressed_attention(share, nullptr, 1.0f, none, nullptr);
  for (const RowRange bad : {RowRange{0, B * Lq + 1}, RowRange{-1, 4}, RowRange{9, 3}}) {
    share.rows = bad;
    try {
      compressed_attention(share, nullptr, 1.0f, none, nullptr);
      ADD_FAILURE() << "accepted rows [" << bad.begin << ", " << bad.end << ")";
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), ExitCode::usage);
      EXPECT_NE(std::string(e.what()).find("not within the attention's " + std::to_string(B * Lq) +
                                           " rows"),
                std::string::npos)
          << e.what();
    }
  }
  EXPECT_THROW(balanced_rows(share, nullptr, 0), Error);
}
