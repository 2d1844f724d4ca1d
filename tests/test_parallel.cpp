// The CPU backend's settings: every kernel set this CPU runs (AVX-512, AVX2, the portable one)
// against the fp64 references, on shapes that fill none of the kernels' register tiles, and the
// same bits at one and two threads within each set.
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <numeric>
#include <random>

#include "../lib/src/chunks.hpp"
#include "dsa/attention.hpp"
#include "dsa/error.hpp"
#include "dsa/indexer.hpp"
#include "dsa/parallel.hpp"
#include "reference.hpp"

namespace dsa {
namespace {

using test::f32;

// Restores the kernels and thread count this process started with.
class CpuKernels : public testing::Test {
 protected:
  void TearDown() override {
    set_cpu_kernels(initial_);
    set_threads(threads_);
  }
  const std::string initial_ = cpu_kernels_name();
  const int threads_ = max_threads();
};

TEST_F(CpuKernels, ListsTheWidestFirstEndingWithTheGenericSet) {
  const std::vector<std::string> sets = available_cpu_kernels();
  ASSERT_FALSE(sets.empty());
  EXPECT_EQ(sets.back(), "generic");
  if (!std::getenv("DSA_CPU_KERNELS")) EXPECT_EQ(cpu_kernels_name(), sets.front());
  set_cpu_kernels("generic");
  EXPECT_EQ(cpu_kernels_name(), "generic");
  EXPECT_THROW(set_cpu_kernels("sse9"), Error);
}

struct IndexerProblem {
  Tensor q, k, w;
  IndexerInputs inputs;
};

// Decode offset (Lq < Lk), heads not a multiple of any register tile, keys not of a panel.
IndexerProblem indexer_problem(uint64_t seed) {
  std::mt19937_64 rng(seed);
  const int64_t Lq = 45, Lk = 53, H = 11, d = 19;
  IndexerProblem p{test::random_tensor({Lq, H, d}, rng, 1.0f, "q_index"),
                   test::random_tensor({Lk, d}, rng, 1.0f, "k_index"),
                   test::random_tensor({Lq, H}, rng, 1.0f, "weights"),
                   {}};
  p.inputs = make_indexer_inputs(p.q, p.k, p.w, {});
  return p;
}

std::vector<float> indexer_scores(const IndexerProblem& p, int64_t query_block) {
  IndexerConfig config;
  config.query_block = query_block;
  std::vector<float> scores;
  indexer_scores(
      p.inputs, config,
      [&](const ScoreBlock& b) {
        scores.insert(scores.end(), b.scores, b.scores + b.rows * b.keys);
      },
      nullptr);
  return scores;
}

TEST_F(CpuKernels, EverySetMatchesTheFp64IndexerWhateverTheThreadsAndBlocks) {
  const IndexerProblem p = indexer_problem(3);
  const IndexerInputs& in = p.inputs;
  const auto ref =
      test::reference_scores(f32(p.q), f32(p.k), f32(p.w), in.queries, in.keys, in.heads, in.dim);
  for (const std::string& set : available_cpu_kernels()) {
    SCOPED_TRACE(set);
    set_cpu_kernels(set);
    set_threads(1);
    const std::vector<float> one = indexer_scores(p, 16);
    set_threads(2);
    EXPECT_EQ(indexer_scores(p, 16), one) << "threads changed the bits";
    EXPECT_EQ(indexer_scores(p, 7), one) << "query blocks changed the bits";
    for (int64_t t = 0; t < in.queries; ++t) {
      double row_max = 1e-3;
      for (int64_t s = 0; s <= in.position(t); ++s)
        row_max = std::max(row_max, std::fabs(ref[t * in.keys + s]));
      for (int64_t s = 0; s < in.keys; ++s) {
        const double expected = ref[t * in.keys + s];
        if (std::isinf(expected)) {
          ASSERT_EQ(one[t * in.keys + s], -INFINITY) << t << " " << s;
        } else {
          ASSERT_NEAR(one[t * in.keys + s], expected, 1e-5 * row_max) << t << " " << s;
        }
      }
    }
  }
}

struct AttentionProblem {
  Tensor q, k, v, indices;
  AttentionInputs inputs;
};

// More keys than a tile, heads beyond one vector (MQA) or groups of GQA, value columns not a
// multiple of a vector; rows with fewer visible positions than k are padded with -1.
AttentionProblem attention_problem(bool latent, uint64_t seed) {
  std::mt19937_64 rng(seed);
  const int64_t L = 83, k = 70;
  AttentionProblem p;
  if (latent) {
    p.q = test::random_tensor({L, 19, 37}, rng, 0.5f, "q");
    p.k = test::random_tensor({L, 37}, rng, 1.0f, "kv");
    p.inputs = make_mqa_inputs(p.q, p.k, 35);
  } else {
    p.q = test::random_tensor({L, 6, 20}, rng, 0.5f, "q");
    p.k = test::random_tensor({L, 2, 20}, rng, 1.0f, "k");
    p.v = test::random_tensor({L, 2, 17}, rng, 1.0f, "v");
    p.inputs = make_mha_inputs(p.q, p.k, p.v);
  }
  p.indices = make_tensor(DType::i32, {L, k}, "indices");
  int32_t* idx = mutable_data<int32_t>(p.indices);
  for (int64_t t = 0; t < L; ++t) {
    std::vector<int32_t> order(static_cast<std::size_t>(t + 1));
    std::iota(order.begin(), order.end(), 0);
    std::shuffle(order.begin(), order.end(), rng);
    order.resize(static_cast<std::size_t>(k), -1);
    std::copy(order.begin(), order.end(), idx + t * k);
  }
  return p;
}

struct Output {
  std::vector<float> out, lse;
  bool operator==(const Output&) const = default;
};

Output attend(const AttentionProblem& p, bool dense) {
  const AttentionInputs& in = p.inputs;
  Output o{std::vector<float>(static_cast<std::size_t>(in.queries * in.heads * in.d_v)),
           std::vector<float>(static_cast<std::size_t>(in.queries * in.heads))};
  const AttentionSink sink = [&](const AttentionBlock& b) {
    std::copy_n(b.out, b.rows * in.heads * in.d_v, o.out.begin() + b.row_begin * in.heads * in.d_v);
    std::copy_n(b.lse, b.rows * in.heads, o.lse.begin() + b.row_begin * in.heads);
  };
  const float scale = default_scale(in.d_qk);
  if (dense) {
    dense_attention(in, scale, sink, nullptr);
  } else {
    sparse_attention(in, p.indices, scale, sink, nullptr);
  }
  return o;
}

void expect_matches_reference(const AttentionProblem& p, const Output& got, bool dense) {
  const AttentionInputs& in = p.inputs;
  const int64_t k = p.indices.shape.back();
  const float* kv = f32(p.k);
  const float* values = in.latent ? kv : f32(p.v);
  const int64_t k_stride = in.kv_heads * in.d_qk,
                v_stride = in.latent ? in.d_qk : in.kv_heads * in.d_v;
  auto key = [&](int64_t s, int64_t g) { return kv + s * k_stride + g * in.d_qk; };
  auto value = [&](int64_t s, int64_t g) { return values + s * v_stride + g * in.d_v; };
  const auto* indices = reinterpret_cast<const int32_t*>(p.indices.data);
  std::vector<double> out, lse;
  for (int64_t t = 0; t < in.queries; ++t) {
    std::vector<int64_t> selected;
    for (int64_t i = 0; i < (dense ? t + 1 : k); ++i) {
      const int64_t s = dense ? i : indices[t * k + i];
      if (s >= 0) selected.push_back(s);
    }
    test::reference_attention_row(f32(p.q) + t * in.heads * in.d_qk, in.heads, in.kv_heads, in.d_qk,
                                  in.d_v, selected, default_scale(in.d_qk), key, value, out, lse);
    for (int64_t h = 0; h < in.heads; ++h) {
      ASSERT_NEAR(got.lse[t * in.heads + h], lse[h], 1e-5 * std::max(1.0, std::fabs(lse[h])));
      for (int64_t c = 0; c < in.d_v; ++c) {
        ASSERT_NEAR(got.out[(t * in.heads + h) * in.d_v + c], out[h * in.d_v + c], 1e-5)
            << "t=" << t << " h=" << h << " c=" << c;
      }
    }
  }
}

TEST_F(CpuKernels, EverySetMatchesTheFp64AttentionWhateverTheThreads) {
  for (const bool latent : {true, false}) {
    const AttentionProblem p = attention_problem(latent, latent ? 5 : 6);
    for (const std::string& set : available_cpu_kernels()) {
      for (const bool dense : {false, true}) {
        SCOPED_TRACE(set + (latent ? " MQA" : " GQA") + (dense ? " dense" : " sparse"));
        set_cpu_kernels(set);
        set_threads(1);
        const Output one = attend(p, dense);
        set_threads(2);
        EXPECT_TRUE(attend(p, dense) == one) << "threads changed the bits";
        expect_matches_reference(p, one, dense);
      }
    }
  }
}

// The host-side helper of the CUDA backend: every item exactly once, in ranges of the grain,
// for ranges that do and do not divide n, and a range's exception reaches the caller.
TEST_F(CpuKernels, ParallelRangesCoverEveryItemOnceAndRethrow) {
  set_threads(2);
  for (const int64_t n : {0, 1, 7, 256, 1000}) {
    for (const int64_t grain : {1, 3, 256, 5000}) {
      SCOPED_TRACE("n " + std::to_string(n) + " grain " + std::to_string(grain));
      std::vector<std::atomic<int>> seen(static_cast<std::size_t>(n));
      std::atomic<int> calls{0};
      detail::parallel_ranges(n, grain, [&](int64_t begin, int64_t end) {
        EXPECT_LT(begin, end);
        EXPECT_LE(end - begin, grain);
        EXPECT_EQ(begin % grain, 0);
        for (int64_t i = begin; i < end; ++i) ++seen[i];
        ++calls;
      });
      for (int64_t i = 0; i < n; ++i) EXPECT_EQ(seen[i], 1) << i;
      EXPECT_EQ(calls, (n + grain - 1) / grain);
    }
  }
  EXPECT_THROW(detail::parallel_ranges(100, 10,
                                       [](int64_t begin, int64_t) {
                                         if (begin == 50)
                                           throw Error(ExitCode::bad_input, "range 50");
                                       }),
               Error);
}

}  // namespace
}  // namespace dsa
