// DeepSeek-V4's compressor, RoPE and e2m1 (compressor.hpp, rope.hpp, precision.hpp) against
// fp64 references and hand-made cases.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "dsa/compressor.hpp"
#include "dsa/error.hpp"
#include "dsa/precision.hpp"
#include "dsa/rope.hpp"
#include "reference.hpp"

using namespace dsa;

namespace {

struct Layer {
  Tensor wkv, wgate, ape, norm;
  CompressorWeights weights() const { return {&wkv, &wgate, &ape, &norm}; }
};

Layer random_layer(int64_t ratio, int64_t d, int64_t D, std::mt19937_64& rng) {
  const int64_t width = (ratio == 4 ? 2 : 1) * d;
  Layer l{test::random_tensor({width, D}, rng, 0.3f, "wkv"),
          test::random_tensor({width, D}, rng, 0.5f, "wgate"),
          test::random_tensor({ratio, width}, rng, 1.0f, "ape"),
          test::random_tensor({d}, rng, 0.2f, "norm")};
  float* n = mutable_data<float>(l.norm);
  for (int64_t e = 0; e < d; ++e) n[e] += 1.0f;
  return l;
}

std::vector<float> run(const Tensor& x, const Layer& l, const CompressorConfig& config) {
  const CompressorInputs in = make_compressor_inputs(x, l.weights(), config);
  std::vector<float> out;
  compress(
      in, config,
      [&](const CompressedBlock& b) {
        EXPECT_EQ(static_cast<int64_t>(out.size()), (b.batch * in.entries + b.entry_begin) * b.dim);
        out.insert(out.end(), b.values, b.values + b.entries * b.dim);
      },
      nullptr);
  return out;
}

// The compressor in fp64 without rounding: the math the f32 numerics approximate. RoPE uses the
// library's f32 frequencies (their computation is tested on its own below).
std::vector<double> reference(const Tensor& x, const Layer& l, const CompressorConfig& config) {
  const int64_t m = config.ratio, T = x.dim(0), D = x.dim(1), d = l.norm.dim(0);
  const bool overlap = m == 4;
  const int64_t width = (overlap ? 2 : 1) * d, n = T / m;
  const float *X = test::f32(x), *wkv = test::f32(l.wkv), *wg = test::f32(l.wgate);
  const float *ape = test::f32(l.ape), *norm = test::f32(l.norm);
  const auto project = [&](const float* w, int64_t s, int64_t c) {
    double sum = 0;
    for (int64_t i = 0; i < D; ++i) sum += double(X[s * D + i]) * w[c * D + i];
    return sum;
  };
  const Rope rope(config.rope);
  std::vector<double> out(static_cast<std::size_t>(n * d));
  for (int64_t j = 0; j < n; ++j) {
    double* entry = out.data() + j * d;
    for (int64_t e = 0; e < d; ++e) {
      std::vector<double> logit, value;
      for (int64_t r = 0; overlap && j > 0 && r < m; ++r) {
        value.push_back(project(wkv, m * (j - 1) + r, e));
        logit.push_back(project(wg, m * (j - 1) + r, e) + ape[r * width + e]);
      }
      const int64_t half = overlap ? d : 0;
      for (int64_t r = 0; r < m; ++r) {
        value.push_back(project(wkv, m * j + r, half + e));
        logit.push_back(project(wg, m * j + r, half + e) + ape[r * width + half + e]);
      }
      const double top = *std::max_element(logit.begin(), logit.end());
      double total = 0, pooled = 0;
      for (double& v : logit) total += (v = std::exp(v - top));
      for (std::size_t i = 0; i < logit.size(); ++i) pooled += value[i] * logit[i] / total;
      entry[e] = pooled;
    }
    double squares = 0;
    for (int64_t e = 0; e < d; ++e) squares += entry[e] * entry[e];
    const double inverse = 1 / std::sqrt(squares / d + config.eps);
    for (int64_t e = 0; e < d; ++e) entry[e] *= inverse * norm[e];
    double* rotated = entry + d - rope.dims();
    for (int64_t i = 0; i < rope.dims() / 2; ++i) {
      const double angle = double(float(m * j) * rope.frequencies()[i]);
      const double a = rotated[2 * i], b = rotated[2 * i + 1];
      rotated[2 * i] = a * std::cos(angle) - b * std::sin(angle);
      rotated[2 * i + 1] = a * std::sin(angle) + b * std::cos(angle);
    }
  }
  return out;
}

CompressorConfig config_for(int64_t ratio, V4Numerics numerics, bool indexer = false) {
  CompressorConfig c;
  c.ratio = ratio;
  c.numerics = numerics;
  c.indexer = indexer;
  c.rope = deepseek_v4_rope(ratio);
  return c;
}

}  // namespace

TEST(Rope, FrequenciesAndYarnBlendAsTheReleasedTable) {
  const Rope plain(deepseek_v4_rope(0));
  ASSERT_EQ(plain.frequencies().size(), 32u);
  for (int i = 0; i < 32; ++i) {
    EXPECT_NEAR(plain.frequencies()[i], std::pow(10000.0, -2.0 * i / 64),
                1e-7 * plain.frequencies()[i]);
  }
  // theta 160000, YaRN 16 over 65536: pairs up to 15 keep f_i, from 25 on f_i / 16, a linear
  // blend between (low = floor(15.45) = 15, high = ceil(24.71) = 25).
  const Rope yarn(deepseek_v4_rope(4));
  for (int i = 0; i < 32; ++i) {
    const double f = std::pow(160000.0, -2.0 * i / 64);
    const double ramp = std::clamp((i - 15.0) / 10.0, 0.0, 1.0);
    EXPECT_NEAR(yarn.frequencies()[i], f / 16 * ramp + f * (1 - ramp), 2e-7 * f) << i;
  }
  // apply: a rotation by f32(t) f_i, undone by the inverse.
  std::mt19937_64 rng(3);
  std::vector<float> x(64), y;
  std::normal_distribution<float> normal;
  for (float& v : x) v = normal(rng);
  y = x;
  yarn.apply(y.data(), 1000);
  for (int i = 0; i < 32; ++i) {
    const double angle = double(1000.0f * yarn.frequencies()[i]);
    EXPECT_NEAR(y[2 * i], x[2 * i] * std::cos(angle) - x[2 * i + 1] * std::sin(angle), 1e-5);
    EXPECT_NEAR(y[2 * i + 1], x[2 * i] * std::sin(angle) + x[2 * i + 1] * std::cos(angle), 1e-5);
  }
  yarn.apply(y.data(), 1000, true);
  for (int i = 0; i < 64; ++i) EXPECT_NEAR(y[i], x[i], 1e-5);
  EXPECT_THROW(Rope(RopeConfig{3}), Error);
}

TEST(E2M1, RoundsToNearestEvenAndSaturates) {
  const std::vector<std::pair<float, float>> cases = {
      {0.0f, 0.0f},  {0.25f, 0.0f}, {0.26f, 0.5f},   {0.75f, 1.0f},  {1.25f, 1.0f}, {1.3f, 1.5f},
      {1.75f, 2.0f}, {2.5f, 2.0f},  {2.6f, 3.0f},    {3.5f, 4.0f},   {5.0f, 4.0f},  {5.1f, 6.0f},
      {7.0f, 6.0f},  {1e30f, 6.0f}, {-0.75f, -1.0f}, {-5.0f, -4.0f}, {-9.0f, -6.0f}};
  for (auto [x, r] : cases) EXPECT_EQ(e2m1_round(x), r) << x;
  EXPECT_TRUE(std::isnan(e2m1_round(NAN)));
  // The scale: 2^ceil(log2(amax / 6)), floored at 6 * 2^-126.
  EXPECT_EQ(fp4_block_scale(6.0f), 1.0f);
  EXPECT_EQ(fp4_block_scale(6.1f), 2.0f);
  EXPECT_EQ(fp4_block_scale(3.0f), 0.5f);
  EXPECT_EQ(fp4_block_scale(0.0f), 0x1p-126f);
  // A block: every value is an e2m1 value times the block's power-of-two scale.
  std::mt19937_64 rng(8);
  std::vector<float> x(64), out(64);
  std::normal_distribution<float> normal;
  for (float& v : x) v = normal(rng);
  fp4_fake_quantize(x.data(), 64, 32, out.data());
  for (int b = 0; b < 2; ++b) {
    float amax = 0;
    for (int i = 0; i < 32; ++i) amax = std::max(amax, std::fabs(x[32 * b + i]));
    const float scale = fp4_block_scale(amax);
    for (int i = 0; i < 32; ++i) {
      EXPECT_EQ(out[32 * b + i], e2m1_round(x[32 * b + i] / scale) * scale);
      EXPECT_LE(std::fabs(out[32 * b + i] - x[32 * b + i]), scale * 1.0f + 1e-7f);
    }
  }
}

TEST(Compressor, F32MatchesTheFp64ReferenceForBothRatios) {
  std::mt19937_64 rng(21);
  for (const int64_t ratio : {int64_t{4}, int64_t{128}}) {
    SCOPED_TRACE(ratio);
    const int64_t d = 128, D = 48, T = ratio == 4 ? 37 : 300;  // tails that make no entry
    const Layer l = random_layer(ratio, d, D, rng);
    const Tensor x = test::random_tensor({T, D}, rng, 1.0f, "x");
    const CompressorConfig config = config_for(ratio, V4Numerics::f32);
    const std::vector<float> got = run(x, l, config);
    const std::vector<double> want = reference(x, l, config);
    ASSERT_EQ(got.size(), want.size());
    ASSERT_EQ(static_cast<int64_t>(got.size()), T / ratio * d);
    for (std::size_t i = 0; i < got.size(); ++i) {
      ASSERT_NEAR(got[i], want[i], 2e-5 * (1 + std::fabs(want[i]))) << i;
    }
  }
}

TEST(Compressor, OverlapTakesThePreviousWindowsFirstHalfAndEntryZeroHasNone) {
  // One channel, d = 64 of which the RoPE takes all but... use RoPE dims 2 on d = 4 so the pooled
  // values are readable: a gate that is huge for one slot makes the entry that slot's value.
  const int64_t d = 4, D = 8, T = 8;
  Layer l{make_tensor(DType::f32, {2 * d, D}, "wkv"), make_tensor(DType::f32, {2 * d, D}, "wgate"),
          make_tensor(DType::f32, {4, 2 * d}, "ape"), make_tensor(DType::f32, {d}, "norm")};
  Tensor x = make_tensor(DType::f32, {T, D}, "x");
  for (int64_t s = 0; s < T; ++s) mutable_data<float>(x)[s * D + s] = 1.0f;  // x_s = e_s
  // Value channel c of token s: 10 s + c (first half) and 100 + 10 s + c (second half).
  for (int64_t c = 0; c < 2 * d; ++c) {
    for (int64_t s = 0; s < T; ++s) {
      mutable_data<float>(l.wkv)[c * D + s] = c < d ? 10.0f * s + c : 100.0f + 10.0f * s + (c - d);
    }
  }
  // The gate picks token 4j - 3 (previous window, first half) where there is one, else token
  // 4j + 2 (own window): ape row 1 of the first half +50, row 2 of the second half +20.
  for (int64_t c = 0; c < d; ++c) {
    mutable_data<float>(l.ape)[1 * 2 * d + c] = 50.0f;
    mutable_data<float>(l.ape)[2 * 2 * d + d + c] = 20.0f;
  }
  for (int64_t e = 0; e < d; ++e) mutable_data<float>(l.norm)[e] = 1.0f;
  CompressorConfig config = config_for(4, V4Numerics::f32);
  config.rope.dims = 2;
  const std::vector<float> out = run(x, l, config);
  ASSERT_EQ(out.size(), 2u * d);
  // Entry 0: no previous window, so token 2's second half: 100 + 20 + e, then RMS-normalized.
  // Entry 1: token 1's first half: 10 + e.
  const auto normalized = [&](std::vector<double> v) {
    double sq = 0;
    for (double a : v) sq += a * a;
    for (double& a : v) a /= std::sqrt(sq / v.size() + 1e-6);
    return v;
  };
  const std::vector<double> e0 = normalized({120, 121, 122, 123}),
                            e1 = normalized({10, 11, 12, 13});
  for (int64_t e = 0; e < d - 2; ++e) {  // the RoPE dims are rotated: compare the others
    EXPECT_NEAR(out[e], e0[e], 1e-4);
    EXPECT_NEAR(out[d + e], e1[e], 1e-4);
  }
  // RoPE at position 4 j: entry 0 is not rotated at all.
  EXPECT_NEAR(out[2], e0[2], 1e-4);
  EXPECT_NEAR(out[3], e0[3], 1e-4);
  EXPECT_NEAR(std::hypot(out[d + 2], out[d + 3]), std::hypot(e1[2], e1[3]), 1e-4);
}

TEST(Compressor, ReleasedNumericsQuantizeTheCaches) {
  std::mt19937_64 rng(5);
  const int64_t D = 32, T = 64;
  const Tensor x = test::random_tensor({T, D}, rng, 1.0f, "x");
  // Main entries (d 512 like the model): the 448 non-RoPE dims on e4m3 grids of 64, RoPE dims bf16.
  {
    const Layer l = random_layer(4, 512, D, rng);
    const std::vector<float> bf16 = run(x, l, config_for(4, V4Numerics::bf16));
    const std::vector<float> released = run(x, l, config_for(4, V4Numerics::released));
    ASSERT_EQ(bf16.size(), released.size());
    for (int64_t j = 0; j < T / 4; ++j) {
      std::vector<float> expect(bf16.begin() + j * 512, bf16.begin() + (j + 1) * 512);
      for (float v : expect) EXPECT_EQ(v, round_to_bf16(v));
      fp8_fake_quantize(expect.data(), 448, 64, true, expect.data());
      for (int64_t e = 0; e < 512; ++e)
        ASSERT_EQ(released[j * 512 + e], expect[e]) << j << " " << e;
    }
  }
  // Indexer keys (d 128): Hadamard of the bf16 entry, rounded to bf16, then e2m1 in blocks of 32.
  {
    const Layer l = random_layer(4, 128, D, rng);
    const std::vector<float> bf16 = run(x, l, config_for(4, V4Numerics::bf16, true));
    const std::vector<float> released = run(x, l, config_for(4, V4Numerics::released, true));
    for (int64_t j = 0; j < T / 4; ++j) {
      std::vector<float> expect(bf16.begin() + j * 128, bf16.begin() + (j + 1) * 128);
      hadamard_transform(expect.data(), 128);
      for (float& v : expect) v = round_to_bf16(v);
      fp4_fake_quantize(expect.data(), 128, 32, expect.data());
      for (int64_t e = 0; e < 128; ++e)
        ASSERT_EQ(released[j * 128 + e], expect[e]) << j << " " << e;
    }
  }
}

TEST(Compressor, BatchesAreIndependentAndBadInputsNameTheTensor) {
  std::mt19937_64 rng(9);
  const int64_t d = 128, D = 16, T = 20;
  const Layer l = random_layer(4, d, D, rng);
  const Tensor x0 = test::random_tensor({T, D}, rng), x1 = test::random_tensor({T, D}, rng);
  Tensor both = make_tensor(DType::f32, {2, T, D}, "x");
  std::copy(test::f32(x0), test::f32(x0) + T * D, mutable_data<float>(both));
  std::copy(test::f32(x1), test::f32(x1) + T * D, mutable_data<float>(both) + T * D);
  const CompressorConfig config = config_for(4, V4Numerics::released);
  std::vector<float> a = run(x0, l, config), b = run(x1, l, config), ab = run(both, l, config);
  a.insert(a.end(), b.begin(), b.end());
  EXPECT_EQ(a, ab);
  EXPECT_EQ(compressed_shape(make_compressor_inputs(both, l.weights(), config)),
            (Shape{2, T / 4, d}));
  const auto message = [&](const Tensor& xx, const CompressorWeights& w,
                           const CompressorConfig& c) {
    try {
      make_compressor_inputs(xx, w, c);
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string("accepted");
  };
  CompressorWeights w = l.weights();
  const Tensor short_ape = test::random_tensor({3, 2 * d}, rng, 1.0f, "ape.npy");
  w.ape = &short_ape;
  EXPECT_NE(message(x0, w, config).find("ape.npy (ape): expected shape [4, 256]"),
            std::string::npos)
      << message(x0, w, config);
  const Tensor wide_x = test::random_tensor({T, D + 1}, rng, 1.0f, "x.npy");
  EXPECT_NE(message(wide_x, l.weights(), config).find("(wkv): expected shape [256, 17]"),
            std::string::npos);
  CompressorConfig hca = config;
  hca.ratio = 128;  // the same weights are shaped for overlap
  EXPECT_NE(message(x0, l.weights(), hca).find("(wkv): expected shape [128, 16]"),
            std::string::npos);
  CompressorConfig odd = config;
  odd.indexer = true;
  const Tensor norm96 = test::random_tensor({96}, rng, 1.0f, "norm");
  const Tensor wkv96 = test::random_tensor({192, D}, rng),
               ape96 = test::random_tensor({4, 192}, rng);
  EXPECT_NE(message(x0, {&wkv96, &wkv96, &ape96, &norm96}, odd).find("power of two"),
            std::string::npos);
}
