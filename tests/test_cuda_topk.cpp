// The CUDA top-k against the CPU's select_topk_row, bit for bit, at the shapes where it splits
// each row over several blocks (decode: few query rows, long key lists; lib/cuda/topk.cu) and
// at one where it does not. The indexer (f32, two heads) is made to score key s exactly x[s]:
// head 0 has q = e0 and weight 1, head 1 q = -e0 and weight -1, and k[s] = x[s] e0, so that
// relu(x) - relu(-x) = x. The selection on the GPU is compared with the CPU's selection of the
// GPU's own scores (and, where x is finite, with the CPU's whole pipeline). Without a usable GPU
// every test skips, saying why.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <optional>
#include <random>
#include <tuple>
#include <vector>

#include "dsa/device.hpp"
#include "dsa/indexer.hpp"
#include "dsa/report.hpp"
#include "dsa/topk.hpp"
#include "skip_without_gpu.hpp"

namespace dsa {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr int64_t kHeads = 2, kDim = 16;

// Indexer inputs of `batch` sequences, `queries` query rows each, whose score of key s is
// x[b * keys + s] (keys = x.size() / batch entries per sequence; compressed entries of `ratio`
// tokens out of `tokens` when ratio > 1).
struct Scored {
  Tensor q, k, w;
  IndexerConfig config;
  IndexerInputs in;

  Scored(const std::vector<float>& x, int64_t batch, int64_t queries, int64_t ratio = 1,
         std::optional<int64_t> tokens = std::nullopt) {
    const auto keys = static_cast<int64_t>(x.size()) / batch;
    q = make_tensor(DType::f32, {batch, queries, kHeads, kDim}, "q_index");
    k = make_tensor(DType::f32, {batch, keys, kDim}, "k_index");
    w = make_tensor(DType::f32, {batch, queries, kHeads}, "weights");
    std::fill_n(mutable_data<float>(q), q.numel(), 0.0f);
    std::fill_n(mutable_data<float>(k), k.numel(), 0.0f);
    for (int64_t t = 0; t < batch * queries; ++t) {
      mutable_data<float>(q)[(t * kHeads + 0) * kDim] = 1.0f;
      mutable_data<float>(q)[(t * kHeads + 1) * kDim] = -1.0f;
      mutable_data<float>(w)[t * kHeads + 0] = 1.0f;
      mutable_data<float>(w)[t * kHeads + 1] = -1.0f;
    }
    for (int64_t s = 0; s < batch * keys; ++s) mutable_data<float>(k)[s * kDim] = x[s];
    config.precision = Precision::f32;
    in = make_indexer_inputs(q, k, w, config, ratio, tokens);
  }
};

struct Selection {
  std::vector<int32_t> indices;
  std::vector<float> values;
};

Selection select_on(const IndexerInputs& in, const IndexerConfig& config, int64_t k,
                    Device device) {
  Selection out;
  const auto size = static_cast<std::size_t>(in.batch * in.queries * k);
  out.indices.assign(size, -2);
  out.values.assign(size, 0.0f);
  select_from_indexer(
      in, config, k,
      [&](const SelectionBlock& b) {
        const int64_t at = (b.batch * in.queries + b.row_begin) * k;
        std::copy_n(b.indices, b.rows * k, out.indices.begin() + at);
        std::copy_n(b.scores, b.rows * k, out.values.begin() + at);
      },
      nullptr, device);
  return out;
}

// The CPU's top-k of the GPU's own scores, row by row.
Selection select_gpu_scores_on_cpu(const IndexerInputs& in, const IndexerConfig& config,
                                   int64_t k) {
  std::vector<float> scores(static_cast<std::size_t>(in.batch * in.queries * in.keys));
  indexer_scores(
      in, config,
      [&](const ScoreBlock& b) {
        std::copy_n(b.scores, b.rows * b.keys,
                    scores.begin() + (b.batch * in.queries + b.row_begin) * in.keys);
      },
      nullptr, Device::cuda);
  Selection out;
  out.indices.resize(static_cast<std::size_t>(in.batch * in.queries * k));
  out.values.resize(out.indices.size());
  TopkScratch scratch;
  for (int64_t row = 0; row < in.batch * in.queries; ++row) {
    select_topk_row(scores.data() + row * in.keys, in.visible(row % in.queries), k,
                    out.indices.data() + row * k, out.values.data() + row * k, scratch);
  }
  return out;
}

// Indices equal, and the selected scores equal to the bit (NaN and -0 as the row holds them).
void expect_identical(const Selection& got, const Selection& want, int64_t k) {
  ASSERT_EQ(got.indices.size(), want.indices.size());
  for (std::size_t i = 0; i < got.indices.size(); ++i) {
    ASSERT_EQ(got.indices[i], want.indices[i]) << "row " << i / k << " slot " << i % k;
    uint32_t a, b;
    std::memcpy(&a, &got.values[i], 4);
    std::memcpy(&b, &want.values[i], 4);
    ASSERT_EQ(a, b) << "row " << i / k << " slot " << i % k << ": " << got.values[i] << " vs "
                    << want.values[i];
  }
}

// The GPU's selection against the CPU's of the GPU's scores; with `exact` (every x finite, so
// that the scores are x on both) against the CPU's pipeline as well.
void expect_like_the_cpu(const Scored& scored, int64_t k, bool exact) {
  const Selection gpu = select_on(scored.in, scored.config, k, Device::cuda);
  ASSERT_NO_FATAL_FAILURE(
      expect_identical(gpu, select_gpu_scores_on_cpu(scored.in, scored.config, k), k));
  if (exact) {
    ASSERT_NO_FATAL_FAILURE(
        expect_identical(gpu, select_on(scored.in, scored.config, k, Device::cpu), k));
  }
}

std::vector<float> scores_of(int64_t count, uint64_t seed,
                             const std::function<float(std::mt19937_64&)>& draw) {
  std::mt19937_64 rng(seed);
  std::vector<float> x(static_cast<std::size_t>(count));
  for (float& v : x) v = draw(rng);
  return x;
}

float normal(std::mt19937_64& rng) {
  return std::normal_distribution<float>()(rng);
}

// A sum of 64 half-normal terms over 64: bunched like real indexer scores (about 0.4 +- 0.07).
float bunched(std::mt19937_64& rng) {
  std::normal_distribution<float> z;
  float sum = 0;
  for (int j = 0; j < 64; ++j) sum += std::max(0.0f, z(rng));
  return sum / 64;
}

TEST(CudaTopk, DecodeBatchMatchesTheCpu) {
  SKIP_WITHOUT_GPU();
  // One query row per sequence against 128K keys, as DeepSeek's decode: each row on many blocks.
  const int64_t batch = 4, keys = 131072;
  for (const auto& [name, draw] :
       std::vector<std::pair<const char*, std::function<float(std::mt19937_64&)>>>{
           {"normal", normal}, {"bunched", bunched}}) {
    SCOPED_TRACE(name);
    const Scored scored(scores_of(batch * keys, 1, draw), batch, 1);
    for (const int64_t k : {int64_t{1}, int64_t{2048}, int64_t{2049}, int64_t{8192}}) {
      SCOPED_TRACE(testing::Message() << "k " << k);
      ASSERT_NO_FATAL_FAILURE(expect_like_the_cpu(scored, k, true));
    }
  }
}

TEST(CudaTopk, FewQueryRowsOfLongRowsMatchTheCpu) {
  SKIP_WITHOUT_GPU();
  // A few query rows at the end of a long context (speculative decode, chunked prefill's tail):
  // the rows see different numbers of keys; 300 rows take the one-block-per-row kernel.
  for (const auto& [queries, keys] :
       {std::pair<int64_t, int64_t>{7, 50000}, {40, 40000}, {300, 20000}}) {
    SCOPED_TRACE(testing::Message() << queries << " rows, " << keys << " keys");
    const Scored scored(scores_of(keys, 2, bunched), 1, queries);
    ASSERT_NO_FATAL_FAILURE(expect_like_the_cpu(scored, 2048, true));
  }
}

TEST(CudaTopk, TiesAreBrokenByPositionLikeTheCpu) {
  SKIP_WITHOUT_GPU();
  const int64_t keys = 131072;
  // Ten distinct scores: the k-th largest ties with thousands of entries, and only the whole
  // key (with the positions) tells them apart.
  const Scored few(scores_of(2 * keys, 3, [](auto& rng) { return float(rng() % 10); }), 2, 1);
  for (const int64_t k : {int64_t{1}, int64_t{2048}, int64_t{8192}}) {
    SCOPED_TRACE(testing::Message() << "k " << k);
    ASSERT_NO_FATAL_FAILURE(expect_like_the_cpu(few, k, true));
  }
  // Every score equal: the selection is positions 0 .. k-1, in order.
  const Scored equal(std::vector<float>(keys, 0.5f), 1, 1);
  const Selection gpu = select_on(equal.in, equal.config, 2048, Device::cuda);
  for (int32_t i = 0; i < 2048; ++i) {
    ASSERT_EQ(gpu.indices[i], i);
    ASSERT_EQ(gpu.values[i], 0.5f);
  }
  ASSERT_NO_FATAL_FAILURE(expect_like_the_cpu(equal, 2048, true));
}

TEST(CudaTopk, InfinitiesLikeTheCpu) {
  SKIP_WITHOUT_GPU();
  const int64_t keys = 100000;
  // More +inf than k, some -inf, and rows mostly of -inf (fewer than k finite entries: the rest
  // of the selection is -inf entries, lowest positions first).
  const Scored some(scores_of(keys, 4,
                              [](auto& rng) {
                                const int c = static_cast<int>(rng() % 16);
                                return c == 0 ? kInf : c == 1 ? -kInf : normal(rng);
                              }),
                    1, 3);
  ASSERT_NO_FATAL_FAILURE(expect_like_the_cpu(some, 4096, false));
  const Scored mostly(
      scores_of(keys, 5, [](auto& rng) { return rng() % 100 == 0 ? normal(rng) : -kInf; }), 1, 2);
  ASSERT_NO_FATAL_FAILURE(expect_like_the_cpu(mostly, 2048, false));
}

TEST(CudaTopk, CompressedKeysMatchTheCpu) {
  SKIP_WITHOUT_GPU();
  // DeepSeek-V4's compressed entries (ratio 4): query row t sees floor((T - Lq + t + 1) / 4).
  const int64_t ratio = 4, tokens = 4 * 40000 + 3, queries = 12;
  const Scored scored(scores_of(tokens / ratio, 6, bunched), 1, queries, ratio, tokens);
  ASSERT_NO_FATAL_FAILURE(expect_like_the_cpu(scored, 2048, true));
}

TEST(CudaTopk, RepeatedLaunchesAgree) {
  SKIP_WITHOUT_GPU();
  // The split path keeps its scratch from launch to launch: a different row after a crowded one,
  // and the first again, select the same as on their own.
  const int64_t keys = 65536;
  const Scored a(scores_of(keys, 7, bunched), 1, 2);
  const Scored b(scores_of(keys, 8, [](auto& rng) { return float(rng() % 3); }), 1, 5);
  const Selection first = select_on(a.in, a.config, 2048, Device::cuda);
  ASSERT_NO_FATAL_FAILURE(expect_like_the_cpu(b, 2048, true));
  ASSERT_NO_FATAL_FAILURE(
      expect_identical(select_on(a.in, a.config, 2048, Device::cuda), first, 2048));
  ASSERT_NO_FATAL_FAILURE(expect_like_the_cpu(a, 2048, true));
}

// The fp8 tensor-core indexer (H_I 64, d_I 128), whose launches of enough query rows (4 a SM:
// 528 on an H200) fuse the top-k and never store the scores (lib/cuda/indexer.cu). `fill(x,
// what, rng)` writes tensor `what` ('q', 'k' or 'w') of shape [B?, ...] as x.
struct Fp8Scored {
  Tensor q, k, w;
  IndexerConfig config;
  IndexerInputs in;

  Fp8Scored(int64_t queries, int64_t keys, uint64_t seed,
            const std::function<float(char, int64_t, std::mt19937_64&)>& draw, int64_t ratio = 1,
            std::optional<int64_t> tokens = std::nullopt) {
    std::mt19937_64 rng(seed);
    q = make_tensor(DType::f32, {queries, 64, 128}, "q_index");
    k = make_tensor(DType::f32, {keys, 128}, "k_index");
    w = make_tensor(DType::f32, {queries, 64}, "weights");
    for (int64_t i = 0; i < q.numel(); ++i) mutable_data<float>(q)[i] = draw('q', i, rng);
    for (int64_t i = 0; i < k.numel(); ++i) mutable_data<float>(k)[i] = draw('k', i, rng);
    for (int64_t i = 0; i < w.numel(); ++i) mutable_data<float>(w)[i] = draw('w', i, rng);
    config.precision = Precision::fp8;
    in = make_indexer_inputs(q, k, w, config, ratio, tokens);
  }
};

// The selection of every row on the GPU (fused), against the CPU's selection of the GPU's own
// scores (which the unfused path stores), bit for bit; and that the fused path ran: it scores
// within the select stage, so the call records no score stage.
void expect_fused_like_the_cpu(const Fp8Scored& scored, int64_t k) {
  StageTimes times;
  Selection gpu;
  const auto size = static_cast<std::size_t>(scored.in.batch * scored.in.queries * k);
  gpu.indices.assign(size, -2);
  gpu.values.assign(size, 0.0f);
  select_from_indexer(
      scored.in, scored.config, k,
      [&](const SelectionBlock& b) {
        const int64_t at = (b.batch * scored.in.queries + b.row_begin) * k;
        std::copy_n(b.indices, b.rows * k, gpu.indices.begin() + at);
        std::copy_n(b.scores, b.rows * k, gpu.values.begin() + at);
      },
      &times, Device::cuda);
  EXPECT_EQ(times.get("score"), 0.0) << "the unfused path ran";
  EXPECT_GT(times.get("select"), 0.0);
  ASSERT_NO_FATAL_FAILURE(
      expect_identical(gpu, select_gpu_scores_on_cpu(scored.in, scored.config, k), k));
}

float standard(char, int64_t, std::mt19937_64& rng) {
  return normal(rng);
}

TEST(CudaTopk, FusedWithTheFp8IndexerMatchesTheCpu) {
  SKIP_WITHOUT_GPU();
  // A causal prefill, the tail of a longer context (the rows see 3977 to 5000 keys), k from 1
  // up to the fused path's most, and ranks that need several compactions of a list (k 64: lists
  // of 512) or none (k 2048 over at most 4096 keys).
  for (const auto& [queries, keys, k] : {std::tuple<int64_t, int64_t, int64_t>{1024, 1024, 64},
                                         {1024, 5000, 2048},
                                         {1100, 3000, 1},
                                         {1030, 2500, 300},
                                         {1024, 4096, 2048},
                                         {1024, 12000, 2048}}) {
    SCOPED_TRACE(testing::Message() << queries << " rows, " << keys << " keys, k " << k);
    const Fp8Scored scored(queries, keys, 10 + k, standard);
    ASSERT_NO_FATAL_FAILURE(expect_fused_like_the_cpu(scored, k));
  }
}

// Rows longer than a list (k 2048: lists of 8192) take a bound from a sample of their keys that
// about half a list passes. A bound aimed far below k passes too few keys in most rows, which
// the kernel scores again with no bound; one aimed at the list's size overflows it, which a
// compaction absorbs. DSA_FUSED_TOPK_TARGET (lib/cuda/indexer.cu) aims it.
TEST(CudaTopk, FusedSampledBoundsThatMissLikeTheCpu) {
  SKIP_WITHOUT_GPU();
  const Fp8Scored scored(1024, 12000, 34, standard);
  for (const char* target : {"300", "8100"}) {
    SCOPED_TRACE(testing::Message() << "target " << target);
    ASSERT_EQ(setenv("DSA_FUSED_TOPK_TARGET", target, 1), 0);
    for (const int64_t k : {int64_t{1024}, int64_t{2048}}) {
      SCOPED_TRACE(testing::Message() << "k " << k);
      ASSERT_NO_FATAL_FAILURE(expect_fused_like_the_cpu(scored, k));
    }
  }
  unsetenv("DSA_FUSED_TOPK_TARGET");
}

TEST(CudaTopk, FusedTiesAreBrokenByPositionLikeTheCpu) {
  SKIP_WITHOUT_GPU();
  // Small integers, exact in e4m3 under their rows' scales: the scores are sums of small
  // integers that tie exactly and often; with `crowded` nine keys in ten are one vector, so that
  // more entries tie at the k-th than a list holds, and only the positions break them.
  for (const bool crowded : {false, true}) {
    SCOPED_TRACE(crowded ? "crowded" : "ties");
    const Fp8Scored scored(1024, 3000, crowded ? 31 : 30,
                           [&](char what, int64_t i, std::mt19937_64& rng) {
                             if (what == 'w') return 1.0f;
                             if (what == 'q') return float(rng() % 3);
                             const bool ones = crowded && (i / 128) % 10 != 0;
                             return ones ? 1.0f : float(rng() % 2);
                           });
    for (const int64_t k : {int64_t{64}, int64_t{512}, int64_t{2048}}) {
      SCOPED_TRACE(testing::Message() << "k " << k);
      ASSERT_NO_FATAL_FAILURE(expect_fused_like_the_cpu(scored, k));
    }
  }
}

TEST(CudaTopk, FusedNonFiniteScoresLikeTheCpu) {
  SKIP_WITHOUT_GPU();
  // A key of NaN and one of +inf: NaN scores rank like -inf (and keep their bits as selected
  // values), the infinite key's scores are +inf or NaN.
  const Fp8Scored scored(1024, 1024, 32, [](char what, int64_t i, std::mt19937_64& rng) {
    if (what == 'k' && i / 128 == 5) return std::numeric_limits<float>::quiet_NaN();
    if (what == 'k' && i / 128 == 9 && i % 128 == 0) return kInf;
    return normal(rng);
  });
  ASSERT_NO_FATAL_FAILURE(expect_fused_like_the_cpu(scored, 64));
}

TEST(CudaTopk, FusedOverCompressedKeysLikeTheCpu) {
  SKIP_WITHOUT_GPU();
  // DeepSeek-V4's CSA: entries of 4 tokens, the queries the last 1024 of 4099 tokens, k 512.
  const int64_t ratio = 4, tokens = 4099;
  const Fp8Scored scored(1024, tokens / ratio, 33, standard, ratio, tokens);
  ASSERT_NO_FATAL_FAILURE(expect_fused_like_the_cpu(scored, 512));
}

}  // namespace
}  // namespace dsa
