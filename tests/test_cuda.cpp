// The CUDA backend against the CPU library on fresh random inputs (DESIGN.md tolerances for
// bf16 operands). Without a usable GPU every test skips, saying why.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <optional>
#include <random>
#include <tuple>
#include <vector>

#include <fmt/format.h>

#include "dsa/attention.hpp"
#include "dsa/calibrate.hpp"
#include "dsa/compressed_attention.hpp"
#include "dsa/compressor.hpp"
#include "dsa/device.hpp"
#include "dsa/error.hpp"
#include "dsa/indexer.hpp"
#include "dsa/kv_cache.hpp"
#include "dsa/metrics.hpp"
#include "dsa/precision.hpp"
#include "dsa/topk.hpp"
#include "reference.hpp"
#include "skip_without_gpu.hpp"

namespace dsa {
namespace {

struct IndexerCase {
  int64_t queries, keys, heads, dim, k;
  Precision precision;
  bool hadamard;
};

// The GPU's scores against the CPU's: the invisible (-inf) entries exactly, the others within
// `tolerance` relative L2 error (written to *error).
void expect_scores_close(const std::vector<float>& cpu, const std::vector<float>& gpu,
                         double tolerance, double* error) {
  ASSERT_EQ(cpu.size(), gpu.size());
  double err = 0, norm = 0;
  for (std::size_t i = 0; i < cpu.size(); ++i) {
    if (std::isinf(cpu[i])) {
      ASSERT_EQ(gpu[i], cpu[i]) << i;
      continue;
    }
    err += std::pow(double(gpu[i]) - cpu[i], 2);
    norm += std::pow(double(cpu[i]), 2);
  }
  *error = std::sqrt(err / norm);
  EXPECT_LT(*error, tolerance);
}

std::vector<float> scores_on(const IndexerInputs& in, const IndexerConfig& config, Device device) {
  std::vector<float> out(static_cast<std::size_t>(in.batch * in.queries * in.keys));
  indexer_scores(
      in, config,
      [&](const ScoreBlock& b) {
        std::copy_n(b.scores, b.rows * b.keys,
                    out.begin() + (b.batch * in.queries + b.row_begin) * in.keys);
      },
      nullptr, device);
  return out;
}

std::vector<int32_t> selection_on(const IndexerInputs& in, const IndexerConfig& config, int64_t k,
                                  Device device) {
  std::vector<int32_t> out(static_cast<std::size_t>(in.batch * in.queries * k));
  select_from_indexer(
      in, config, k,
      [&](const SelectionBlock& b) {
        std::copy_n(b.indices, b.rows * k, out.begin() + (b.batch * in.queries + b.row_begin) * k);
      },
      nullptr, device);
  return out;
}

TEST(Cuda, IndexerScoresMatchTheCpu) {
  SKIP_WITHOUT_GPU();
  std::mt19937_64 rng(1);
  for (const IndexerCase& c : {IndexerCase{37, 37, 4, 32, 8, Precision::bf16, false},
                               IndexerCase{300, 700, 64, 128, 64, Precision::fp8, true},
                               IndexerCase{129, 129, 8, 64, 16, Precision::fp8, false},
                               IndexerCase{50, 80, 3, 20, 8, Precision::f32, false},
                               IndexerCase{1, 5000, 64, 128, 64, Precision::fp8, false},
                               IndexerCase{77, 3000, 64, 128, 64, Precision::fp8, true},
                               IndexerCase{130, 130, 64, 128, 64, Precision::fp8, false},
                               IndexerCase{131, 131, 64, 128, 64, Precision::fp8, true}}) {
    const Tensor q = test::random_tensor({c.queries, c.heads, c.dim}, rng);
    const Tensor k = test::random_tensor({c.keys, c.dim}, rng);
    const Tensor w = test::random_tensor({c.queries, c.heads}, rng);
    IndexerConfig config;
    config.precision = c.precision;
    config.hadamard = c.hadamard;
    const IndexerInputs in = make_indexer_inputs(q, k, w, config);
    const auto cpu = scores_on(in, config, Device::cpu), gpu = scores_on(in, config, Device::cuda);
    // The fp8 tensor cores (H 64, d 128) sum the products of a dot with about 14 bits of
    // mantissa (as DeepSeek-V3's report measured on Hopper; 1.3e-4 here); every other path
    // sums exact products in f32.
    const bool fp8_cores = c.precision == Precision::fp8 && c.heads == 64 && c.dim == 128;
    SCOPED_TRACE(testing::Message() << "H " << c.heads << " d " << c.dim);
    double error = 0;
    ASSERT_NO_FATAL_FAILURE(expect_scores_close(cpu, gpu, fp8_cores ? 5e-4 : 1e-5, &error));
    std::printf("indexer H %lld d %lld %s: relative error %.3g\n", static_cast<long long>(c.heads),
                static_cast<long long>(c.dim), precision_name(c.precision).c_str(), error);
  }
}

// The fp8 tensor-core indexer launches a one-query kernel (N 64) for a decode step, the
// two-query one (N 128) otherwise: a row's scores must be the same bits either way, so that
// chunks and MPI shares of the rows do not change a selection.
TEST(Cuda, Fp8IndexerRowDoesNotDependOnTheRowsBesideIt) {
  SKIP_WITHOUT_GPU();
  std::mt19937_64 rng(21);
  const int64_t keys = 3000, heads = 64, dim = 128;
  const Tensor k = test::random_tensor({keys, dim}, rng);
  IndexerConfig config;
  config.precision = Precision::fp8;
  config.hadamard = true;
  for (const int64_t queries : {2, 3, 5}) {
    const Tensor q = test::random_tensor({queries, heads, dim}, rng);
    const Tensor w = test::random_tensor({queries, heads}, rng);
    Tensor q1 = make_tensor(DType::f32, {1, heads, dim}, "q"),
           w1 = make_tensor(DType::f32, {1, heads}, "w");
    const auto* qp = reinterpret_cast<const float*>(q.data);
    const auto* wp = reinterpret_cast<const float*>(w.data);
    std::copy_n(qp + (queries - 1) * heads * dim, heads * dim, mutable_data<float>(q1));
    std::copy_n(wp + (queries - 1) * heads, heads, mutable_data<float>(w1));
    const auto all = scores_on(make_indexer_inputs(q, k, w, config), config, Device::cuda);
    const auto last = scores_on(make_indexer_inputs(q1, k, w1, config), config, Device::cuda);
    for (int64_t s = 0; s < keys; ++s)
      ASSERT_EQ(last[s], all[(queries - 1) * keys + s]) << "queries " << queries << " key " << s;
  }
}

TEST(Cuda, SelectionMatchesTheCpuExceptAmongNearTies) {
  SKIP_WITHOUT_GPU();
  std::mt19937_64 rng(2);
  // Rows of at most 8192 entries, all candidates; longer ones, a threshold from a sample.
  for (const auto& [Lq, Lk] : {std::pair<int64_t, int64_t>{1024, 4096}, {256, 24576}}) {
    const int64_t H = 64, d = 128, k = 2048;
    const Tensor q = test::random_tensor({Lq, H, d}, rng);
    const Tensor kk = test::random_tensor({Lk, d}, rng);
    const Tensor w = test::random_tensor({Lq, H}, rng);
    IndexerConfig config;
    config.precision = Precision::fp8;
    config.ue8m0 = true;
    const IndexerInputs in = make_indexer_inputs(q, kk, w, config);
    const auto cpu_scores = scores_on(in, config, Device::cpu),
               gpu_scores = scores_on(in, config, Device::cuda);
    const auto cpu = selection_on(in, config, k, Device::cpu),
               gpu = selection_on(in, config, k, Device::cuda);
    int64_t differing = 0;
    for (int64_t r = 0; r < Lq; ++r) {
      const float* row = cpu_scores.data() + r * Lk;
      const float* gpu_row = gpu_scores.data() + r * Lk;
      // The GPU's rounding in this row: small against the row's scores, and the bound on how far
      // apart two entries can be that the GPU orders the other way.
      double rounding = 0, scale = 0;
      for (int64_t s = 0; s <= in.position(r); ++s) {
        rounding = std::max(rounding, std::fabs(double(gpu_row[s]) - row[s]));
        scale = std::max(scale, std::fabs(double(row[s])));
      }
      ASSERT_LT(rounding, 1e-3 * scale) << "row " << r;
      std::vector<int32_t> a(cpu.begin() + r * k, cpu.begin() + (r + 1) * k),
          b(gpu.begin() + r * k, gpu.begin() + (r + 1) * k);
      const float kth = row[a.back()];
      std::sort(a.begin(), a.end());
      std::sort(b.begin(), b.end());
      std::vector<int32_t> only_gpu;
      std::set_difference(b.begin(), b.end(), a.begin(), a.end(), std::back_inserter(only_gpu));
      for (int32_t s : only_gpu) {
        ASSERT_GE(s, 0);
        EXPECT_NEAR(row[s], kth, 2 * rounding + 1e-6)
            << "row " << r << " position " << s << " is no near-tie";
        ++differing;
      }
    }
    std::printf("selections: %lld of %lld entries differ, all near-ties\n",
                static_cast<long long>(differing), static_cast<long long>(Lq * k));
    EXPECT_LT(differing, Lq * k / 200) << "near-ties should be rare";
  }
}

// Small integers: exact in bf16, so scores tie exactly and often. With `crowded`, nine keys in
// ten are all ones and tie in every row.
void expect_ties_like_the_cpu(int64_t L, int64_t k, bool crowded, uint64_t seed) {
  std::mt19937_64 rng(seed);
  const int64_t H = 4, d = 16;
  Tensor q = make_tensor(DType::f32, {L, H, d}), kk = make_tensor(DType::f32, {L, d}),
         w = make_tensor(DType::f32, {L, H});
  for (int64_t i = 0; i < q.numel(); ++i) mutable_data<float>(q)[i] = static_cast<float>(rng() % 3);
  for (int64_t s = 0; s < L; ++s) {
    const bool ones = crowded && rng() % 10 != 0;
    for (int64_t c = 0; c < d; ++c)
      mutable_data<float>(kk)[s * d + c] = ones ? 1.0f : static_cast<float>(rng() % 2);
  }
  for (int64_t i = 0; i < w.numel(); ++i) mutable_data<float>(w)[i] = 1.0f;
  IndexerConfig config;
  config.precision = Precision::bf16;
  const IndexerInputs in = make_indexer_inputs(q, kk, w, config);
  EXPECT_EQ(selection_on(in, config, k, Device::cuda), selection_on(in, config, k, Device::cpu));
}

TEST(Cuda, ExactTiesAreBrokenByPositionLikeTheCpu) {
  SKIP_WITHOUT_GPU();
  expect_ties_like_the_cpu(300, 32, false, 3);
}

TEST(Cuda, CrowdedTiesTakeTheRadixFallback) {
  SKIP_WITHOUT_GPU();
  // More entries tie at the threshold than the top-k keeps in shared memory.
  expect_ties_like_the_cpu(12000, 2048, true, 4);
}

struct Result {
  std::vector<float> out, lse;
};

Result attend(const AttentionInputs& in, const Tensor* indices, float scale, Device device) {
  Result r;
  r.out.assign(static_cast<std::size_t>(in.batch * in.queries * in.heads * in.d_v), NAN);
  r.lse.assign(static_cast<std::size_t>(in.batch * in.queries * in.heads), NAN);
  auto sink = [&](const AttentionBlock& b) {
    const int64_t row = b.batch * in.queries + b.row_begin;
    std::copy_n(b.out, b.rows * in.heads * in.d_v, r.out.begin() + row * in.heads * in.d_v);
    std::copy_n(b.lse, b.rows * in.heads, r.lse.begin() + row * in.heads);
  };
  if (indices) {
    sparse_attention(in, *indices, scale, sink, nullptr, device);
  } else {
    dense_attention(in, scale, sink, nullptr, device);
  }
  return r;
}

double relative_error(const std::vector<float>& a, const std::vector<float>& b) {
  double err = 0, norm = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    err += std::pow(double(a[i]) - b[i], 2);
    norm += std::pow(double(b[i]), 2);
  }
  return std::sqrt(err / norm);
}

// A selection [rows, k] for `in`'s query rows (row r is query r % queries): per row, at most
// `keep` of its visible positions in random order, then -1; with `shuffle_padding` the -1
// entries are shuffled in among them.
Tensor random_selection(const AttentionInputs& in, int64_t rows, int64_t queries, int64_t k,
                        int64_t keep, bool shuffle_padding, const Shape& shape,
                        std::mt19937_64& rng) {
  Tensor indices = make_tensor(DType::i32, shape, "idx");
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t visible = in.position(r % queries) + 1;
    std::vector<int32_t> all(static_cast<std::size_t>(visible));
    for (int64_t s = 0; s < visible; ++s) all[s] = static_cast<int32_t>(s);
    std::shuffle(all.begin(), all.end(), rng);
    all.resize(static_cast<std::size_t>(std::min(k, visible)));
    if (keep < k) all.resize(std::min(all.size(), static_cast<std::size_t>(keep)));
    all.resize(static_cast<std::size_t>(k), -1);
    if (shuffle_padding) std::shuffle(all.begin(), all.end(), rng);
    std::copy(all.begin(), all.end(), mutable_data<int32_t>(indices) + r * k);
  }
  return indices;
}

TEST(Cuda, SparseAndDenseMqaAttentionMatchTheCpu) {
  SKIP_WITHOUT_GPU();
  std::mt19937_64 rng(4);
  struct Case {
    int64_t batch, queries, keys, heads, d_qk, d_v, k;
    float amplitude = 1.0f;     // of q: 4 makes the softmax sharp, the online maximum moves late
    bool padding_last = false;  // the -1 entries after the selected ones, not shuffled in
  };
  // The first two and the last six run the Hopper kernel (d_qk 512 or 576, d_v 512): head
  // counts below, at and above a block of 64, selections shorter than a tile, padded with -1,
  // and longer than several tiles. Few rows split their selection over blocks (split
  // decoding, kernels.cuh): the three cases before the last, the third of them with the later
  // splits seeing only -1 (partials of lse -inf) and dense rows of 47 tiles. The last has more
  // (row, head group) items than the GPU has SMs, so each persistent block takes several. The
  // two after it do the same at d_qk 512: an odd count of tiles (5, and 17 split over decode
  // blocks), items on every block, and rows whose dense tiles are odd and even in turn.
  for (const Case& c :
       {Case{1, 64, 64, 16, 64, 48, 16}, Case{2, 9, 300, 128, 576, 512, 128},
        Case{1, 200, 200, 40, 96, 64, 64}, Case{1, 70, 700, 40, 576, 512, 200, 4.0f},
        Case{1, 5, 5, 64, 512, 512, 3}, Case{3, 2, 1000, 96, 576, 512, 640, 2.0f},
        Case{4, 1, 5000, 128, 576, 512, 2048, 4.0f},
        Case{2, 1, 3000, 64, 576, 512, 2048, 2.0f, true}, Case{1, 300, 1200, 128, 576, 512, 256},
        Case{1, 150, 700, 128, 512, 512, 320, 2.0f}, Case{3, 1, 4000, 64, 512, 512, 1088}}) {
    const bool batched = c.batch > 1;
    Shape qs = {c.queries, c.heads, c.d_qk}, ks = {c.keys, c.d_qk}, is = {c.queries, c.k};
    if (batched) {
      qs.insert(qs.begin(), c.batch);
      ks.insert(ks.begin(), c.batch);
      is.insert(is.begin(), c.batch);
    }
    // Values exact in bf16, the GPU's operand type: what remains is the kernel's own rounding
    // (P in bf16, f32 sums in another order).
    Tensor q = test::random_tensor(qs, rng, c.amplitude, "q"),
           kv = test::random_tensor(ks, rng, 1.0f, "kv");
    for (Tensor* t : {&q, &kv}) {
      float* p = mutable_data<float>(*t);
      for (int64_t i = 0; i < t->numel(); ++i) p[i] = round_to_bf16(p[i]);
    }
    const AttentionInputs in = make_mqa_inputs(q, kv, c.d_v);
    const Tensor indices = random_selection(in, c.batch * c.queries, c.queries, c.k,
                                            c.padding_last ? std::min<int64_t>(c.k, 300) : c.k,
                                            !c.padding_last, is, rng);
    const float scale = default_scale(c.d_qk);
    for (const Tensor* sel :
         {static_cast<const Tensor*>(&indices), static_cast<const Tensor*>(nullptr)}) {
      const Result cpu = attend(in, sel, scale, Device::cpu),
                   gpu = attend(in, sel, scale, Device::cuda);
      EXPECT_LT(relative_error(gpu.out, cpu.out), 1e-2)
          << (sel ? "sparse" : "dense") << " H " << c.heads;
      // The backend counts its buffers: at least the bf16 latent rows were on the GPU.
      EXPECT_GE(peak_device_bytes(), c.keys * c.d_qk * 2);
      for (std::size_t i = 0; i < cpu.lse.size(); ++i)
        ASSERT_NEAR(gpu.lse[i], cpu.lse[i], 2e-2) << i;
    }
  }
}

// FlashMLA's fp8 cache: the kernel dequantizes the staged rows into the bf16 tile, so the GPU
// over the cache must agree with the CPU over the cache (whose keys are the same dequantized
// rows) as closely as the bf16 path agrees with it; batched (decode: one query per sequence)
// and prefill rows, sparse and dense; and dsa-compare's fp8 loss on the GPU is the CPU's.
TEST(Cuda, Fp8CacheAttentionMatchesTheCpu) {
  SKIP_WITHOUT_GPU();
  std::mt19937_64 rng(12);
  struct Case {
    int64_t batch, queries, keys, heads, k;
  };
  for (const Case& c :
       {Case{1, 70, 700, 128, 200}, Case{8, 1, 3000, 128, 2048}, Case{2, 9, 300, 40, 128}}) {
    Shape qs = {c.queries, c.heads, kFp8CacheDim}, ks = {c.keys, kFp8CacheDim},
          is = {c.queries, c.k};
    if (c.batch > 1) {
      for (Shape* s : {&qs, &ks, &is}) s->insert(s->begin(), c.batch);
    }
    Tensor q = test::random_tensor(qs, rng, 2.0f, "q"),
           kv = test::random_tensor(ks, rng, 1.0f, "kv");
    float* qp = mutable_data<float>(q);
    for (int64_t i = 0; i < q.numel(); ++i) qp[i] = round_to_bf16(qp[i]);
    // Tiles of different amplitudes, so that the four scales of a row differ.
    float* kp = mutable_data<float>(kv);
    for (int64_t i = 0; i < kv.numel(); ++i)
      kp[i] *= std::ldexp(1.0f, static_cast<int>(i / 128 % 5) - 2);
    const Tensor cache = quantize_kv_cache_fp8(kv);
    const AttentionInputs in = make_mqa_inputs(q, cache, 512);
    ASSERT_TRUE(in.fp8_cache);
    const int64_t cache_bytes = cache.numel() / c.batch;  // one sequence's rows on the GPU
    const Tensor indices =
        random_selection(in, c.batch * c.queries, c.queries, c.k, c.k, false, is, rng);
    const float scale = default_scale(kFp8CacheDim);
    for (const Tensor* sel :
         {static_cast<const Tensor*>(&indices), static_cast<const Tensor*>(nullptr)}) {
      const Result cpu = attend(in, sel, scale, Device::cpu),
                   gpu = attend(in, sel, scale, Device::cuda);
      EXPECT_LT(relative_error(gpu.out, cpu.out), 1e-2)
          << (sel ? "sparse" : "dense") << " B " << c.batch << " H " << c.heads;
      for (std::size_t i = 0; i < cpu.lse.size(); ++i)
        ASSERT_NEAR(gpu.lse[i], cpu.lse[i], 2e-2) << i;
    }
    EXPECT_GE(peak_device_bytes(), cache_bytes);  // counted by the backend's buffers
  }
  // dsa-compare with the fp8 cache on the GPU reports the CPU's loss.
  const int64_t L = 300, H = 64;
  Tensor q = test::random_tensor({L, H, kFp8CacheDim}, rng, 2.0f, "q"),
         kv = test::random_tensor({L, kFp8CacheDim}, rng, 1.0f, "kv");
  for (Tensor* t : {&q, &kv}) {
    float* p = mutable_data<float>(*t);
    for (int64_t i = 0; i < t->numel(); ++i) p[i] = round_to_bf16(p[i]);
  }
  const Tensor cache = quantize_kv_cache_fp8(kv);
  const AttentionInputs fp8 = make_mqa_inputs(q, cache, 512);
  Tensor indices = make_tensor(DType::i32, {L, 64}, "idx");
  for (int64_t t = 0; t < L; ++t)
    for (int64_t j = 0; j < 64; ++j)
      mutable_data<int32_t>(indices)[t * 64 + j] = j <= t ? static_cast<int32_t>(t - j) : -1;
  CompareInputs in;
  in.attention = make_mqa_inputs(q, kv, 512);
  in.fp8_cache = &fp8;
  in.scale = default_scale(kFp8CacheDim);
  in.indices = &indices;
  in.topk = {64};
  const Comparison cpu = compare_attention(in, nullptr);
  const Comparison gpu = compare_attention(in, nullptr, Device::cuda);
  const Fidelity &c = cpu.per_k[0], &g = gpu.per_k[0];
  ASSERT_EQ(g.cache_rel_err.size(), c.cache_rel_err.size());
  for (std::size_t i = 0; i < c.cache_rel_err.size(); ++i)
    ASSERT_NEAR(g.cache_rel_err[i], c.cache_rel_err[i], 5e-3 + 5e-2 * c.cache_rel_err[i]) << i;
  EXPECT_NEAR(std::sqrt(g.cache_error_squares / g.cache_reference_squares),
              std::sqrt(c.cache_error_squares / c.cache_reference_squares),
              0.05 * std::sqrt(c.cache_error_squares / c.cache_reference_squares));
}

TEST(Cuda, CompareOnTheGpuAgreesWithTheCpu) {
  SKIP_WITHOUT_GPU();
  std::mt19937_64 rng(5);
  const int64_t B = 2, L = 400, H = 40, d_qk = 576, d_v = 512, HI = 8, dI = 64;
  Tensor q = test::random_tensor({B, L, H, d_qk}, rng, 2.0f, "q"),
         kv = test::random_tensor({B, L, d_qk}, rng, 1.0f, "kv");
  for (Tensor* t : {&q, &kv}) {
    float* p = mutable_data<float>(*t);
    for (int64_t i = 0; i < t->numel(); ++i) p[i] = round_to_bf16(p[i]);
  }
  const Tensor q_index = test::random_tensor({B, L, HI, dI}, rng, 1.0f, "q_index"),
               k_index = test::random_tensor({B, L, dI}, rng, 1.0f, "k_index"),
               weights = test::random_tensor({B, L, HI}, rng, 1.0f, "weights");
  Tensor needles = make_tensor(DType::i64, {3, 2}, "needles");
  for (int64_t i = 0; i < 3; ++i) {
    mutable_data<int64_t>(needles)[2 * i] = 300 + 40 * i;
    mutable_data<int64_t>(needles)[2 * i + 1] = 7 * i;
  }
  CompareInputs in;
  in.attention = make_mqa_inputs(q, kv, d_v);
  in.scale = default_scale(d_qk);
  in.indexer_config.precision = Precision::bf16;
  in.indexer = make_indexer_inputs(q_index, k_index, weights, in.indexer_config);
  in.needles = &needles;
  in.topk = {64, 150};
  // The GPU's comparison agrees with the CPU's: on MLA's shape (the wgmma attention) and with
  // d_v 256 (the wmma attention; the dense probabilities need only d_qk 512 or 576).
  for (const int64_t values : {d_v, int64_t{256}}) {
    SCOPED_TRACE(values);
    in.attention = make_mqa_inputs(q, kv, values);
    const Comparison cpu = compare_attention(in, nullptr);
    const Comparison gpu = compare_attention(in, nullptr, Device::cuda);
    ASSERT_EQ(gpu.kl_dense.size(), cpu.kl_dense.size());
    for (std::size_t r = 0; r < cpu.kl_dense.size(); ++r)
      ASSERT_NEAR(gpu.kl_dense[r], cpu.kl_dense[r], 1e-3 + 1e-2 * std::fabs(cpu.kl_dense[r])) << r;
    for (std::size_t ki = 0; ki < in.topk.size(); ++ki) {
      const Fidelity &c = cpu.per_k[ki], &g = gpu.per_k[ki];
      const double k = static_cast<double>(in.topk[ki]);
      for (std::size_t r = 0; r < c.mass_recall.size(); ++r) {
        ASSERT_NEAR(g.mass_recall[r], c.mass_recall[r], 5e-3) << "k " << k << " row " << r;
        ASSERT_NEAR(g.topk_recall[r], c.topk_recall[r], 2.5 / k) << "k " << k << " row " << r;
        ASSERT_NEAR(g.kl_sparse[r], c.kl_sparse[r], 1e-3 + 1e-2 * std::fabs(c.kl_sparse[r])) << r;
      }
      for (std::size_t i = 0; i < c.out_rel_err.size(); ++i) {
        ASSERT_NEAR(g.mass_recall_head[i], c.mass_recall_head[i], 5e-3) << i;
        ASSERT_NEAR(g.out_cosine[i], c.out_cosine[i], 2e-3) << i;
        ASSERT_NEAR(g.out_rel_err[i], c.out_rel_err[i], 5e-3 + 5e-2 * c.out_rel_err[i]) << i;
      }
      EXPECT_EQ(g.needles, c.needles);
      EXPECT_EQ(g.needles_selected, c.needles_selected);
      EXPECT_EQ(g.sparse_flops, c.sparse_flops);
    }
  }
  // A d_qk the dense probabilities cannot take (the attention can): a usage error before any
  // work, not a wrong answer.
  const Tensor q_small = test::random_tensor({B, L, H, 192}, rng, 1.0f, "q"),
               kv_small = test::random_tensor({B, L, 192}, rng, 1.0f, "kv");
  in.attention = make_mqa_inputs(q_small, kv_small, 128);
  try {
    compare_attention(in, nullptr, Device::cuda);
    ADD_FAILURE() << "d_qk 192 ran on the GPU";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ExitCode::usage) << e.what();
    EXPECT_NE(std::string(e.what()).find("d_qk 512 or 576"), std::string::npos) << e.what();
  }
}

// DeepSeek-V4's fp8 caches in dsa-compare on the GPU (the V4 kernel over the caches and over
// the values, the dense reference on it too): the caches' loss and every output metric agree
// with the CPU's, whose P is f32 where the GPU's is bf16.
TEST(Cuda, V4Fp8CacheCompareOnTheGpuAgreesWithTheCpu) {
  SKIP_WITHOUT_GPU();
  std::mt19937_64 rng(9);
  const int64_t T = 700, Lq = 64, H = 64, d = 512, k = 64;
  Tensor q = test::random_tensor({Lq, H, d}, rng, 0.05f, "q"),
         kv = test::random_tensor({T, d}, rng, 1.0f, "kv"),
         c4 = test::random_tensor({T / 4, d}, rng, 1.0f, "compressed");
  for (Tensor* t : {&q, &kv, &c4}) {
    float* p = mutable_data<float>(*t);
    for (int64_t i = 0; i < t->numel(); ++i) p[i] = round_to_bf16(p[i]);
  }
  const Tensor sink = test::random_tensor({H}, rng, 1.0f, "sink");
  CompressedCompareInputs ci;
  ci.attention = make_compressed_attention_inputs(q, kv, &c4, &sink, V4Attention::csa, 128);
  Tensor indices = make_tensor(DType::i32, {Lq, k}, "indices");
  for (int64_t r = 0; r < Lq; ++r) {  // the last entries first, -1 past the visible ones
    const int64_t visible = ci.attention.visible_entries(r);
    for (int64_t i = 0; i < k; ++i) {
      mutable_data<int32_t>(indices)[r * k + i] =
          static_cast<int32_t>(i < visible ? visible - 1 - i : -1);
    }
  }
  ci.indices = &indices;
  ci.scale = 1.0f / std::sqrt(float(d));
  ci.reference = V4Reference::dense;
  const auto fp8 = fp8_v4_cache_attention(ci.attention);
  ci.fp8_cache = &fp8->inputs;
  const Comparison cpu = compare_compressed_attention(ci, nullptr);
  const Comparison gpu = compare_compressed_attention(ci, nullptr, Device::cuda);
  ASSERT_EQ(gpu.kv_cache, "fp8");
  const Fidelity &c = cpu.per_k[0], &g = gpu.per_k[0];
  const double loss_cpu = std::sqrt(c.cache_error_squares / c.cache_reference_squares);
  const double loss_gpu = std::sqrt(g.cache_error_squares / g.cache_reference_squares);
  EXPECT_GT(loss_cpu, 1e-3);
  EXPECT_NEAR(loss_gpu, loss_cpu, 0.1 * loss_cpu);
  for (std::size_t i = 0; i < c.out_rel_err.size(); ++i) {
    ASSERT_NEAR(g.out_rel_err[i], c.out_rel_err[i], 5e-3 + 5e-2 * c.out_rel_err[i]) << i;
    ASSERT_NEAR(g.cache_rel_err[i], c.cache_rel_err[i], 5e-3 + 0.2 * c.cache_rel_err[i]) << i;
  }
}

TEST(Cuda, DeviceSelection) {
  EXPECT_EQ(resolve_device("cpu"), Device::cpu);
  EXPECT_EQ(resolve_device("auto"), cuda_available() ? Device::cuda : Device::cpu);
  EXPECT_EQ(device_description(Device::cpu), "cpu");
  if (!cuda_available()) EXPECT_THROW(resolve_device("cuda"), Error);
  // A rank's GPU: the host's GPUs in turn (every one of them on a host of one GPU); none
  // without a GPU, and the CPU still computes.
  if (cuda_available()) {
    const int chosen = use_local_gpu(5);
    EXPECT_GE(chosen, 0);
    EXPECT_NE(device_description(Device::cuda).find("cuda:" + std::to_string(chosen)),
              std::string::npos);
    EXPECT_EQ(use_local_gpu(0), 0);
  } else {
    EXPECT_EQ(use_local_gpu(1), -1);
  }
}

// Per operation: "auto" takes the GPU only where the CUDA backend accepts the inputs, "cuda"
// on inputs it cannot take fails before any work, naming the limit (issue 13).
TEST(Cuda, EachOperationAsksTheBackendFirst) {
  std::mt19937_64 rng(90);
  const Tensor q = test::random_tensor({8, 4, 32}, rng, 1, "q.npy");
  const Tensor k = test::random_tensor({8, 2, 32}, rng, 1, "k.npy");
  const Tensor v = test::random_tensor({8, 2, 32}, rng, 1, "v.npy");
  const AttentionInputs mha = make_mha_inputs(q, k, v);
  const DeviceChoice cpu = choose_device("cpu", mha);
  EXPECT_EQ(cpu.device, Device::cpu);
  EXPECT_EQ(cpu.note, "");
  const DeviceChoice automatic = choose_device("auto", mha);
  EXPECT_EQ(automatic.device, Device::cpu);
  EXPECT_NE(automatic.note.find("ran on the CPU"), std::string::npos) << automatic.note;
  try {
    choose_device("cuda", mha);
    ADD_FAILURE() << "accepted";
  } catch (const Error& e) {
    // Without a GPU: runtime, saying why; with one: usage, naming the limit.
    EXPECT_EQ(e.code(), cuda_available() ? ExitCode::usage : ExitCode::runtime) << e.what();
    if (cuda_available())
      EXPECT_NE(std::string(e.what()).find("latent layout"), std::string::npos) << e.what();
  }
  SKIP_WITHOUT_GPU();
  // MLA's latent layout is taken; an indexer shape the kernels do not cover is not.
  const Tensor kv = test::random_tensor({8, 32}, rng, 1, "kv.npy");
  EXPECT_EQ(choose_device("auto", make_mqa_inputs(q, kv, 16)).device, Device::cuda);
  const Tensor qi = test::random_tensor({8, 3, 24}, rng, 1, "qi.npy");
  const Tensor ki = test::random_tensor({8, 24}, rng, 1, "ki.npy");
  const Tensor wi = test::random_tensor({8, 3}, rng, 1, "wi.npy");
  IndexerConfig bf16;
  bf16.precision = Precision::bf16;
  const IndexerInputs odd = make_indexer_inputs(qi, ki, wi, bf16);
  const DeviceChoice fallback = choose_device("auto", odd, bf16, 4);
  EXPECT_EQ(fallback.device, Device::cpu);
  EXPECT_NE(fallback.note.find("H_I dividing 128"), std::string::npos) << fallback.note;
  EXPECT_THROW(choose_device("cuda", odd, bf16, 4), Error);
  IndexerConfig f32;
  EXPECT_EQ(choose_device("auto", make_indexer_inputs(qi, ki, wi, f32), f32, 9000)
                    .note.find("k <= 8192") != std::string::npos,
            true);
  // The public functions ask too: a shape the GPU cannot take fails before any work.
  EXPECT_THROW(indexer_scores(
                   odd, bf16, [](const ScoreBlock&) { FAIL() << "ran"; }, nullptr, Device::cuda),
               Error);
}

}  // namespace
// DeepSeek-V4's attention on the GPU (d = 512: the wgmma kernel over the gathered window and
// entries, the sink applied after) against the CPU, CSA with a selection and HCA.
TEST(Cuda, CompressedAttentionMatchesTheCpu) {
  SKIP_WITHOUT_GPU();
  std::mt19937_64 rng(12);
  const int64_t T = 700, Lq = 40, H = 64, d = 512;
  Tensor q = test::random_tensor({Lq, H, d}, rng, 0.05f, "q");
  Tensor kv = test::random_tensor({T, d}, rng, 1.0f, "kv");
  Tensor c4 = test::random_tensor({T / 4, d}, rng, 1.0f, "c4");
  Tensor c128 = test::random_tensor({T / 128, d}, rng, 1.0f, "c128");
  const Tensor sink = test::random_tensor({H}, rng, 1.0f, "sink");
  for (Tensor* t : {&q, &kv, &c4, &c128}) {  // the GPU reads bf16
    float* p = mutable_data<float>(*t);
    for (int64_t i = 0; i < t->numel(); ++i) p[i] = round_to_bf16(p[i]);
  }
  Tensor sel = make_tensor(DType::i32, {Lq, 32}, "sel");
  for (int64_t r = 0; r < Lq; ++r) {
    const int64_t visible = (T - Lq + r + 1) / 4;
    for (int64_t i = 0; i < 32; ++i)
      mutable_data<int32_t>(sel)[r * 32 + i] = int32_t((i * 5 + r) % visible);
  }
  for (int64_t r = 0; r < Lq; ++r) {  // distinct entries: a stride of 5 over >= 165 entries
    std::vector<int32_t> row(mutable_data<int32_t>(sel) + r * 32,
                             mutable_data<int32_t>(sel) + (r + 1) * 32);
    std::sort(row.begin(), row.end());
    ASSERT_EQ(std::unique(row.begin(), row.end()), row.end());
  }
  const float scale = 1.0f / std::sqrt(float(d));
  for (const V4Attention kind : {V4Attention::csa, V4Attention::hca}) {
    SCOPED_TRACE(v4_attention_name(kind));
    const CompressedAttentionInputs in = make_compressed_attention_inputs(
        q, kv, kind == V4Attention::csa ? &c4 : &c128, &sink, kind, 128);
    ASSERT_EQ(choose_device("cuda", in).device, Device::cuda);
    std::vector<float> out[2], lse[2];
    for (int device = 0; device < 2; ++device) {
      compressed_attention(
          in, kind == V4Attention::csa ? &sel : nullptr, scale,
          [&](const AttentionBlock& b) {
            out[device].insert(out[device].end(), b.out, b.out + b.rows * b.heads * b.d_v);
            lse[device].insert(lse[device].end(), b.lse, b.lse + b.rows * b.heads);
          },
          nullptr, device ? Device::cuda : Device::cpu);
    }
    ASSERT_EQ(out[0].size(), out[1].size());
    for (std::size_t i = 0; i < out[0].size(); ++i) ASSERT_NEAR(out[1][i], out[0][i], 5e-3) << i;
    for (std::size_t i = 0; i < lse[0].size(); ++i) ASSERT_NEAR(lse[1][i], lse[0][i], 1e-3) << i;
  }
}

// DeepSeek-V4's attention on the V4 kernel (entries of 512 dims, read from the raw and the
// compressed caches on the device) against the fp64 reference on the same bf16 values: CSA with
// shuffled, -1 padded selections, CSA over every visible entry, HCA, SWA without a sink; 16, 64
// and 128 heads (a partial head group, V4-Flash, V4-Pro); rows whose window is cut by t < 127;
// sinks that dominate a row and that vanish; decode batches whose split decoding joins the sink
// once; V4's fp8 caches, dequantized by the kernel, against the reference on their dequantized
// values. 64 dims take the gathered cache on the MQA kernels instead.
TEST(Cuda, V4AttentionMatchesTheFp64Reference) {
  SKIP_WITHOUT_GPU();
  std::mt19937_64 rng(41);
  struct Case {
    V4Attention kind;
    int64_t batch, tokens, queries, heads, dim, k;
    bool sink;
    bool fp8 = false;  // both caches in V4's fp8 format (the reference: their dequantized rows)
  };
  const std::vector<Case> cases = {
      {V4Attention::csa, 1, 700, 300, 64, 512, 64, true},          // prefill tail, early rows cut
      {V4Attention::csa, 1, 400, 400, 16, 512, 0, true},           // every visible entry, 16 heads
      {V4Attention::hca, 1, 700, 260, 128, 512, 0, true},          // V4-Pro's heads
      {V4Attention::swa, 1, 300, 200, 64, 512, 0, false},          // the window alone, no sink
      {V4Attention::csa, 3, 20000, 1, 64, 512, 1024, true},        // decode: 18 tiles, split
      {V4Attention::hca, 2, 70000, 1, 64, 512, 0, true},           // decode: 674 keys, split
      {V4Attention::csa, 1, 500, 100, 8, 64, 16, true},            // gathered cache, MQA kernels
      {V4Attention::csa, 1, 700, 300, 64, 512, 64, true, true},    // the fp8 caches: prefill,
      {V4Attention::hca, 1, 700, 260, 128, 512, 0, true, true},    // 128 heads,
      {V4Attention::swa, 1, 300, 200, 64, 512, 0, false, true},    // the window alone,
      {V4Attention::csa, 3, 20000, 1, 64, 512, 1024, true, true},  // split decodes
      {V4Attention::hca, 2, 70000, 1, 64, 512, 0, true, true},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(fmt::format("{} B {} T {} Lq {} H {} d {} k {}{}", v4_attention_name(c.kind),
                             c.batch, c.tokens, c.queries, c.heads, c.dim, c.k,
                             c.fp8 ? " fp8" : ""));
    const int64_t ratio = v4_compress_ratio(c.kind), window = 128;
    const int64_t entries = ratio ? c.tokens / ratio : 0;
    Tensor q = test::random_tensor({c.batch, c.queries, c.heads, c.dim}, rng, 0.08f, "q");
    Tensor kv = test::random_tensor({c.batch, c.tokens, c.dim}, rng, 1.0f, "kv");
    Tensor cmp = test::random_tensor({c.batch, entries, c.dim}, rng, 1.0f, "compressed");
    Tensor sink = test::random_tensor({c.heads}, rng, 1.0f, "sink");
    mutable_data<float>(sink)[0] = 12.0f;   // outweighs the row: most of its mass
    mutable_data<float>(sink)[1] = -40.0f;  // next to nothing
    for (Tensor* t : {&q, &kv, &cmp}) {     // the GPU reads bf16
      float* v = mutable_data<float>(*t);
      for (int64_t i = 0; i < t->numel(); ++i) v[i] = round_to_bf16(v[i]);
    }
    // fp8: the caches quantized, and the reference's rows their dequantized values.
    std::optional<Tensor> kv8, cmp8;
    if (c.fp8) {
      kv8 = quantize_v4_cache_fp8(kv);
      dequantize_v4_cache_fp8(*kv8, 0, c.batch * c.tokens, mutable_data<float>(kv));
      cmp8 = quantize_v4_cache_fp8(cmp);
      dequantize_v4_cache_fp8(*cmp8, 0, c.batch * entries, mutable_data<float>(cmp));
    }
    const CompressedAttentionInputs in = make_compressed_attention_inputs(
        q, c.fp8 ? *kv8 : kv, ratio ? (c.fp8 ? &*cmp8 : &cmp) : nullptr, c.sink ? &sink : nullptr,
        c.kind, window);
    ASSERT_EQ(in.fp8_cache, c.fp8);
    ASSERT_EQ(choose_device("cuda", in).device, Device::cuda);
    // CSA's selections: the visible entries shuffled, the first k of them, -1 padded.
    Tensor indices =
        make_tensor(DType::i32, {c.batch, c.queries, std::max<int64_t>(c.k, 1)}, "indices");
    std::vector<std::vector<int64_t>> selected(static_cast<size_t>(c.batch * c.queries));
    for (int64_t r = 0; r < c.batch * c.queries; ++r) {
      std::vector<int64_t>& row = selected[r];
      for (int64_t j = 0; j < in.visible_entries(r % c.queries); ++j) row.push_back(j);
      if (c.k == 0) continue;
      std::shuffle(row.begin(), row.end(), rng);
      row.resize(static_cast<size_t>(std::min<int64_t>(c.k, static_cast<int64_t>(row.size()))));
      row.resize(static_cast<size_t>(c.k), -1);
      std::shuffle(row.begin(), row.end(), rng);  // padding anywhere in the row
      for (int64_t i = 0; i < c.k; ++i)
        mutable_data<int32_t>(indices)[r * c.k + i] = static_cast<int32_t>(row[i]);
    }
    std::vector<float> out, lse;
    StageTimes times;
    compressed_attention(
        in, c.k ? &indices : nullptr, 1.0f / std::sqrt(512.0f),
        [&](const AttentionBlock& b) {
          out.insert(out.end(), b.out, b.out + b.rows * b.heads * b.d_v);
          lse.insert(lse.end(), b.lse, b.lse + b.rows * b.heads);
        },
        &times, Device::cuda);
    // The V4 kernel gathers nothing on the host, from either cache format.
    EXPECT_EQ(times.get("cache") > 0, c.dim != 512);
    ASSERT_EQ(out.size(), static_cast<size_t>(c.batch * c.queries * c.heads * c.dim));
    double worst_out = 0, worst_lse = 0;
    for (int64_t r = 0; r < c.batch * c.queries; ++r) {
      const int64_t b = r / c.queries, t = in.position(r % c.queries);
      for (int64_t h = 0; h < c.heads; ++h) {
        double want_lse = 0;
        const std::vector<double> want = test::reference_v4_row(
            test::f32(q) + (r * c.heads + h) * c.dim, test::f32(kv) + b * c.tokens * c.dim,
            test::f32(cmp) + b * entries * c.dim, c.dim, t, window, selected[r],
            c.sink ? test::f32(sink)[h] : -INFINITY, 1.0 / std::sqrt(512.0), want_lse);
        for (int64_t e = 0; e < c.dim; ++e) {
          worst_out = std::max(worst_out, std::fabs(out[(r * c.heads + h) * c.dim + e] - want[e]));
        }
        worst_lse = std::max(worst_lse, std::fabs(lse[r * c.heads + h] - want_lse));
      }
    }
    // P in bf16 for P . V (2^-9 relative per probability), logits from bf16 values in f32.
    EXPECT_LT(worst_out, 4e-3);
    EXPECT_LT(worst_lse, 1e-3);
  }
}

// DeepSeek-V4's compressor on the GPU (cuBLAS f32 projections, then one kernel for the pooling,
// RMSNorm, RoPE and quantization) against the CPU's compress: the main CSA compressor (ratio 4,
// overlap) in every numerics, across a chunk boundary of the GPU's loop, in a batch; the indexer's
// (Hadamard, e2m1); HCA's (ratio 128). The two differ only where their f32 projections round
// apart, which moves an element to a neighbouring bf16 value or code now and then.
TEST(Cuda, CompressorMatchesTheCpu) {
  SKIP_WITHOUT_GPU();
  std::mt19937_64 rng(53);
  struct Case {
    int64_t ratio, batch, tokens, model_dim, dim;
    bool indexer;
    V4Numerics numerics;
  };
  const std::vector<Case> cases = {
      {4, 2, 203, 256, 512, false, V4Numerics::released},
      {4, 1, 203, 256, 512, false, V4Numerics::bf16},
      {4, 1, 203, 256, 512, false, V4Numerics::f32},
      {4, 1, 4 * 8192 + 44, 64, 128, true, V4Numerics::released},  // past the 8192-entry chunk
      {4, 1, 301, 256, 128, true, V4Numerics::bf16},
      {128, 2, 700, 256, 512, false, V4Numerics::released},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(fmt::format("ratio {} B {} T {} D {} d {} indexer {} {}", c.ratio, c.batch,
                             c.tokens, c.model_dim, c.dim, c.indexer,
                             v4_numerics_name(c.numerics)));
    const int64_t width = (c.ratio == 4 ? 2 : 1) * c.dim;
    const Tensor x = test::random_tensor({c.batch, c.tokens, c.model_dim}, rng, 1.0f, "x");
    const float spread = 1.0f / std::sqrt(static_cast<float>(c.model_dim));
    const Tensor wkv = test::random_tensor({width, c.model_dim}, rng, spread, "wkv");
    const Tensor wgate = test::random_tensor({width, c.model_dim}, rng, spread, "wgate");
    const Tensor ape = test::random_tensor({c.ratio, width}, rng, 1.0f, "ape");
    Tensor norm = test::random_tensor({c.dim}, rng, 0.1f, "norm");
    for (int64_t e = 0; e < c.dim; ++e) mutable_data<float>(norm)[e] += 1.0f;
    CompressorConfig config;
    config.ratio = c.ratio;
    config.indexer = c.indexer;
    config.numerics = c.numerics;
    config.rope = deepseek_v4_rope(c.ratio);
    const CompressorInputs in = make_compressor_inputs(x, {&wkv, &wgate, &ape, &norm}, config);
    ASSERT_EQ(choose_device("cuda", in, config).device, Device::cuda);
    std::vector<float> got[2];
    for (int device = 0; device < 2; ++device) {
      int64_t next = 0;  // blocks arrive in order, batch by batch
      compress(
          in, config,
          [&](const CompressedBlock& b) {
            EXPECT_EQ(b.batch * in.entries + b.entry_begin, next);
            next += b.entries;
            got[device].insert(got[device].end(), b.values, b.values + b.entries * b.dim);
          },
          nullptr, device ? Device::cuda : Device::cpu);
    }
    ASSERT_EQ(got[0].size(), static_cast<size_t>(c.batch * in.entries * c.dim));
    ASSERT_EQ(got[1].size(), got[0].size());
    // The largest step a differing element may take: f32 rounding; one bf16 ulp (2^-8 relative)
    // carried through the norm and RoPE; one e4m3 code (2^-3 relative, or a subnormal step of
    // the block's scale); one e2m1 step (two scale units at 4 -> 6).
    int64_t differ = 0;
    double worst = 0;
    for (size_t i = 0; i < got[0].size(); ++i) {
      const double want = got[0][i], diff = std::fabs(got[1][i] - want);
      if (got[1][i] != got[0][i]) ++differ;
      const double rms = 1.0;  // entries are RMS-normalized (times norm ~ 1)
      const double allowed = c.numerics == V4Numerics::f32    ? 2e-5 * (1 + std::fabs(want))
                             : c.numerics == V4Numerics::bf16 ? 2e-2 * (std::fabs(want) + 0.01)
                             : c.indexer                      ? 0.6 * rms
                                                              : 0.15 * std::fabs(want) + 0.01;
      ASSERT_LE(diff, allowed) << "element " << i << ": cpu " << want << ", gpu " << got[1][i];
      worst = std::max(worst, diff);
    }
    std::printf("  %s: %lld of %zu elements differ, worst %.3g\n",
                v4_numerics_name(c.numerics).c_str(), static_cast<long long>(differ), got[0].size(),
                worst);
    if (c.numerics != V4Numerics::f32) {
      EXPECT_LE(differ, static_cast<int64_t>(got[0].size() / 200));  // rare: <= 0.5 %
    }
  }
}

// DeepSeek-V4's CSA indexer: keys are compressed entries of 4 tokens, visible once complete.
// The GPU's scores (-inf past floor((t + 1) / 4)) and its top-k agree with the CPU's: bf16 and
// the fp8 tensor cores, a prefill (T = Lq) and the last rows of a longer context.
TEST(Cuda, CompressedIndexerMatchesTheCpu) {
  SKIP_WITHOUT_GPU();
  std::mt19937_64 rng(19);
  for (const auto& [tokens, queries, precision] :
       {std::tuple{int64_t{600}, int64_t{600}, Precision::bf16},
        {int64_t{4000}, int64_t{70}, Precision::fp8},
        {int64_t{803}, int64_t{803}, Precision::fp8},
        // V4's own quantization: rotated, e2m1 in blocks of 32, on the fp8 tensor cores as
        // exact e4m3 codes; 600 rows take the fused indexer and top-k.
        {int64_t{4000}, int64_t{70}, Precision::fp4},
        {int64_t{2400}, int64_t{600}, Precision::fp4}}) {
    SCOPED_TRACE(tokens);
    const int64_t H = 64, d = 128, keys = tokens / 4;
    const Tensor q = test::random_tensor({queries, H, d}, rng);
    const Tensor k = test::random_tensor({keys, d}, rng);
    const Tensor w = test::random_tensor({queries, H}, rng);
    IndexerConfig config;
    config.precision = precision;
    config.hadamard = precision == Precision::fp4;
    const IndexerInputs in = make_compressed_indexer_inputs(q, k, w, config, 4, tokens);
    ASSERT_EQ(choose_device("cuda", in, config, 64).device, Device::cuda);
    const auto cpu = scores_on(in, config, Device::cpu), gpu = scores_on(in, config, Device::cuda);
    double error = 0;
    ASSERT_NO_FATAL_FAILURE(
        expect_scores_close(cpu, gpu, precision == Precision::bf16 ? 1e-5 : 5e-4, &error));
    // The selection: only visible entries, and the same as the CPU's but among near-ties.
    std::vector<int32_t> picked[2];
    for (int device = 0; device < 2; ++device) {
      select_from_indexer(
          in, config, 64,
          [&](const SelectionBlock& b) {
            picked[device].insert(picked[device].end(), b.indices, b.indices + b.rows * b.k);
          },
          nullptr, device ? Device::cuda : Device::cpu);
    }
    int64_t differ = 0;
    for (int64_t r = 0; r < queries; ++r) {
      const int64_t visible = in.visible(r);
      for (int64_t i = 0; i < 64; ++i) {
        const int32_t j = picked[1][r * 64 + i];
        EXPECT_TRUE(j == -1 ? i >= visible : j < visible) << r << " " << j;
        const int32_t* cpu_row = picked[0].data() + r * 64;
        differ += std::find(cpu_row, cpu_row + 64, j) == cpu_row + 64;
      }
    }
    // As sets, apart from near-ties at the 64th score (the fp8 sums differ in the last bits).
    EXPECT_LT(differ, queries * 64 / 50);
  }
}

// dsa-cost's measured layers on the GPU (calibrate.hpp time_layer): each layer kind at DeepSeek's
// shapes, prefill and decode, runs the kernels it names (V3.2's or V4's fp8 cache where the model
// stores it, else bf16; the fp8 or bf16 indexer), every row of every sequence, with a time for each
// stage; the curves name the GPU. compute-sanitizer runs this test on the H200 (bench/NOTES.md).
TEST(Cuda, TimeLayerRunsEachLayerKindOnTheGpu) {
  SKIP_WITHOUT_GPU();
  ModelSpec v32;
  v32.name = "v3.2-like";
  v32.layers = 2;
  v32.activated_params = 1e9;
  v32.weight_precision = "fp8";
  v32.heads = 16;
  v32.d_qk_mha = 192;
  v32.d_v_mha = 128;
  v32.d_qk = 576;
  v32.d_v = 512;
  v32.kv_bytes = 656.0 / 576.0;
  v32.indexer_heads = 64;
  v32.indexer_dim = 128;
  v32.indexer_key_bytes = 132;
  v32.indexer_precision = "fp8";
  v32.score_bytes = 4;
  v32.topk = 256;
  ModelSpec dense = v32;
  dense.name = "dense-like";
  dense.kv_bytes = 2;
  dense.topk = 0;
  dense.indexer_heads = dense.indexer_dim = 0;
  ModelSpec bf16_indexer = v32;
  bf16_indexer.indexer_heads = 32;  // not the fp8 kernel's 64: the bf16 kernel
  bf16_indexer.indexer_precision = "bf16";
  ModelSpec v4 = v32;
  v4.name = "v4-like";
  v4.layers = 3;
  v4.heads = 64;
  v4.d_qk = v4.d_v = 512;
  v4.topk = 128;
  v4.compress_ratios = {0, 4, 128};
  v4.window = 128;
  v4.csa_ratio = 4;
  ModelSpec v4_bf16 = v4;  // its caches in bf16
  v4_bf16.kv_bytes = 2;
  struct Case {
    ModelSpec model;
    LayerGroup group;
    const char *attention, *cache, *indexer;
  };
  const std::vector<Case> cases = {
      {dense, {LayerKind::mla, 0, 2}, "dense", "bf16", ""},
      {v32, {LayerKind::mla, 0, 2}, "sparse", "fp8", "fp8"},
      {bf16_indexer, {LayerKind::mla, 0, 2}, "sparse", "fp8", "bf16"},
      {v4, {LayerKind::swa, 0, 1}, "window", "fp8", ""},
      {v4, {LayerKind::csa, 4, 1}, "window+selected", "fp8", "fp8"},
      {v4, {LayerKind::hca, 128, 1}, "window+all", "fp8", ""},
      {v4_bf16, {LayerKind::csa, 4, 1}, "window+selected", "bf16", "fp8"},
      {v4_bf16, {LayerKind::hca, 128, 1}, "window+all", "bf16", ""}};
  for (const Case& c : cases) {
    for (const Phase phase : {Phase::prefill, Phase::decode}) {
      SCOPED_TRACE(
          fmt::format("{} {} {}", c.model.name, layer_kind_name(c.group.kind), phase_name(phase)));
      const bool prefill = phase == Phase::prefill;
      const LayerTiming t =
          time_layer(layer_timing_request(c.model, c.group, phase, 3000, prefill ? 300 : 5, 0.002),
                     Device::cuda);
      EXPECT_EQ(t.first_position, prefill ? 2850 : 3000);
      EXPECT_EQ(t.rows, prefill ? 300 : 1);
      EXPECT_EQ(t.sequences, prefill ? 1 : 5);
      EXPECT_EQ(t.attention, c.attention);
      EXPECT_EQ(t.cache, c.cache);
      EXPECT_EQ(t.indexer, c.indexer);
      std::vector<std::string> names;
      for (const auto& s : t.stages) names.push_back(s.stage);
      const std::vector<std::string> expected =
          *c.indexer ? std::vector<std::string>{"indexer", "topk", "attention"}
                     : std::vector<std::string>{"attention"};
      EXPECT_EQ(names, expected);
      for (const auto& s : t.stages) {
        // The fused top-k's time is the indexer's.
        if (s.stage == "topk" && t.fused_topk) {
          EXPECT_EQ(s.seconds, 0);
        } else {
          EXPECT_GT(s.seconds, 0) << s.stage;
        }
      }
      if (!prefill) EXPECT_FALSE(t.fused_topk);
      EXPECT_GE(t.repeats, 1);
      EXPECT_GT(t.bytes, 0);
    }
  }
  // A shape the kernels do not take is a usage error before any work.
  LayerTimingRequest wide =
      layer_timing_request(v32, {LayerKind::mla, 0, 2}, Phase::decode, 100, 1, 0.001);
  wide.d_qk = 640;
  EXPECT_THROW(
      {
        try {
          time_layer(wide, Device::cuda);
        } catch (const Error& e) {
          EXPECT_EQ(e.code(), ExitCode::usage);
          throw;
        }
      },
      Error);
  Workload workload;
  workload.decode_batch = 4;
  workload.prefill_chunk = 256;
  const MeasuredCurves curves =
      measure_curves({v32, v4}, HardwareSpec{}, workload, {1024, 4096}, Device::cuda, 256, 0.002);
  EXPECT_EQ(curves.device.rfind("cuda:", 0), 0u) << curves.device;
  EXPECT_EQ(curves.prefill_rows, 256);
  EXPECT_EQ(curves.decode_sequences, 4);
  for (const MeasuredModel& m : curves.models) {
    for (const MeasuredPoint& p : m.points) {
      EXPECT_GT(p.prefill.seconds, 0);
      EXPECT_GT(p.decode.seconds, 0);
    }
  }
}

}  // namespace dsa
