// Number formats against brute-force references: every e4m3 code, bf16/f16 rounding, block
// scales, fake quantization and the Hadamard transform.
#include <gtest/gtest.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include "dsa/error.hpp"
#include "dsa/io.hpp"
#include "dsa/precision.hpp"

namespace dsa {
namespace {

// e4m3fn decoded from its definition: bias 7, subnormals at exponent 0, S.1111.111 is NaN.
double e4m3_definition(int code) {
  const int sign = code >> 7, exponent = (code >> 3) & 15, mantissa = code & 7;
  if (exponent == 15 && mantissa == 7) return std::nan("");
  const double magnitude = exponent == 0 ? std::ldexp(mantissa / 8.0, -6)
                                         : std::ldexp(1.0 + mantissa / 8.0, exponent - 7);
  return sign ? -magnitude : magnitude;
}

// Nearest finite e4m3 code by exhaustive search, ties to the even code, saturating at 448.
uint8_t e4m3_nearest(float x) {
  if (std::isnan(x)) return std::signbit(x) ? 0xff : 0x7f;
  const double target = std::clamp<double>(x, -448.0, 448.0);
  int best = -1;
  double best_distance = INFINITY;
  for (int code = 0; code < 256; ++code) {
    const double v = e4m3_definition(code);
    if (std::isnan(v) || (v == 0 && std::signbit(v) != std::signbit(x))) continue;
    const double distance = std::fabs(v - target);
    if (distance < best_distance || (distance == best_distance && (code & 1) == 0)) {
      best = code;
      best_distance = distance;
    }
  }
  return static_cast<uint8_t>(best);
}

TEST(E4M3, DecodesEveryCodeAsDefined) {
  for (int code = 0; code < 256; ++code) {
    const double expected = e4m3_definition(code);
    const float got = e4m3_to_f32(static_cast<uint8_t>(code));
    if (std::isnan(expected)) {
      EXPECT_TRUE(std::isnan(got)) << code;
    } else {
      EXPECT_EQ(got, expected) << code;
      EXPECT_EQ(std::signbit(got), (code & 0x80) != 0) << code;
    }
  }
  EXPECT_EQ(e4m3_to_f32(0x7e), 448.0f);
  EXPECT_EQ(e4m3_to_f32(0x01), std::ldexp(1.0f, -9));
}

TEST(E4M3, EveryCodeRoundTrips) {
  for (int code = 0; code < 256; ++code) {
    if ((code & 0x7f) == 0x7f) continue;
    EXPECT_EQ(f32_to_e4m3(e4m3_to_f32(static_cast<uint8_t>(code))), code) << code;
  }
}

TEST(E4M3, MidpointsRoundToEven) {
  for (int code = 0; code < 0x7e; ++code) {
    const double lo = e4m3_definition(code), hi = e4m3_definition(code + 1);
    const auto mid = static_cast<float>((lo + hi) / 2);  // exact: few significant bits
    const int even = (code & 1) == 0 ? code : code + 1;
    EXPECT_EQ(f32_to_e4m3(mid), even) << "between codes " << code << " and " << code + 1;
    EXPECT_EQ(f32_to_e4m3(std::nextafter(mid, 1000.0f)), code + 1) << code;
    EXPECT_EQ(f32_to_e4m3(std::nextafter(mid, 0.0f)), code) << code;
    EXPECT_EQ(f32_to_e4m3(-mid), even | 0x80) << code;
  }
}

TEST(E4M3, SaturatesAndKeepsNaN) {
  for (float x : {448.0f, 449.0f, 464.0f, 470.0f, 480.0f, 1e6f, INFINITY}) {
    EXPECT_EQ(f32_to_e4m3(x), 0x7e) << x;
    EXPECT_EQ(f32_to_e4m3(-x), 0xfe) << x;
  }
  EXPECT_EQ(f32_to_e4m3(NAN), 0x7f);
  EXPECT_EQ(f32_to_e4m3(-NAN), 0xff);
  EXPECT_EQ(f32_to_e4m3(std::ldexp(1.0f, -10)), 0x00);  // half the smallest subnormal: tie to 0
  EXPECT_EQ(f32_to_e4m3(std::ldexp(1.0f, -20)), 0x00);
  EXPECT_EQ(f32_to_e4m3(-0.0f), 0x80);
  EXPECT_EQ(f32_to_e4m3(std::ldexp(7.5f, -9)), 0x08);  // largest subnormal / smallest normal tie
}

TEST(E4M3, MatchesExhaustiveNearestOnRandomValues) {
  std::mt19937_64 rng(1);
  std::uniform_real_distribution<float> exponent(-14.0f, 10.0f);
  for (int i = 0; i < 20000; ++i) {
    const float x = std::exp2(exponent(rng)) * (rng() & 1 ? 1.0f : -1.0f);
    ASSERT_EQ(f32_to_e4m3(x), e4m3_nearest(x)) << x;
  }
}

// The block quantizer rounds in f32 arithmetic; it must give exactly the value of the code.
TEST(E4M3, BlockQuantizerGivesTheValueOfTheCodeForEveryInput) {
  std::vector<float> inputs = {
      0.0f, -0.0f, 448.0f, -448.0f, std::ldexp(1.0f, -10), std::ldexp(7.5f, -9)};
  for (uint32_t bits = 0; bits <= 0x43e00000u; bits += 0x1357) {  // |x| up to 448, both signs
    inputs.push_back(std::bit_cast<float>(bits));
    inputs.push_back(-std::bit_cast<float>(bits));
  }
  for (int code = 0; code < 256; ++code) {  // the codes and the midpoints between them
    const float v = e4m3_to_f32(static_cast<uint8_t>(code));
    inputs.push_back(v);
    inputs.push_back(std::nextafter(v, INFINITY));
    inputs.push_back(std::nextafter(v, -INFINITY));
  }
  for (const float x : inputs) {
    // 448 in the block makes the scale exactly 1, so the block's values are the codes' values.
    float block[2] = {448.0f, x};
    if (!(std::fabs(x) <= 448.0f)) continue;  // would change the block's scale
    ASSERT_EQ(fp8_quantize_block(block, 2, false), 1.0f);
    const float expected = e4m3_to_f32(f32_to_e4m3(x));
    ASSERT_EQ(std::bit_cast<uint32_t>(block[1]), std::bit_cast<uint32_t>(expected)) << x;
  }
}

TEST(BF16, RoundsToNearestEven) {
  std::mt19937_64 rng(2);
  for (int i = 0; i < 100000; ++i) {
    const auto bits = static_cast<uint32_t>(rng());
    const float x = std::bit_cast<float>(bits);
    if (!std::isfinite(x) || std::fabs(x) > 3e38f) continue;
    const uint32_t lo = bits & 0xffff0000u, hi = lo + 0x10000u;
    const double dlo = std::fabs(double(std::bit_cast<float>(lo)) - x);
    const double dhi = std::fabs(double(std::bit_cast<float>(hi)) - x);
    const uint32_t expected = dlo < dhi || (dlo == dhi && ((lo >> 16) & 1) == 0) ? lo : hi;
    ASSERT_EQ(f32_to_bf16(x), expected >> 16) << x;
    ASSERT_EQ(bf16_to_f32(f32_to_bf16(x)), std::bit_cast<float>(expected));
  }
  EXPECT_TRUE(std::isnan(round_to_bf16(NAN)));
  EXPECT_EQ(round_to_bf16(INFINITY), INFINITY);
  EXPECT_EQ(f32_to_bf16(1.0f + std::ldexp(1.0f, -8)), 0x3f80);      // tie to even (down)
  EXPECT_EQ(f32_to_bf16(1.0f + 3 * std::ldexp(1.0f, -8)), 0x3f82);  // tie to even (up)
}

TEST(BF16, ToBf16RoundsEveryElementOfATensor) {
  Tensor t = make_tensor(DType::f32, {3, 70000}, "x");
  std::mt19937_64 rng(7);
  std::normal_distribution<float> normal(0.0f, 10.0f);
  float* x = mutable_data<float>(t);
  for (int64_t i = 0; i < t.numel(); ++i) x[i] = normal(rng);
  x[5] = NAN;
  const Tensor b = to_bf16(t);
  EXPECT_EQ(b.dtype, DType::bf16);
  EXPECT_EQ(b.shape, t.shape);
  EXPECT_EQ(b.name, "x");
  const auto* bits = reinterpret_cast<const uint16_t*>(b.data);
  for (int64_t i = 0; i < t.numel(); ++i) {
    if (i == 5) {
      EXPECT_TRUE(std::isnan(bf16_to_f32(bits[i])));
    } else {
      ASSERT_EQ(bits[i], f32_to_bf16(x[i])) << i;
    }
  }
}

TEST(F16, EveryCodeRoundTripsAndRandomValuesRoundToNearestEven) {
  std::vector<std::pair<double, uint16_t>> finite;  // positive finite halves, ascending
  for (uint32_t code = 0; code < 0x10000; ++code) {
    const float v = f16_to_f32(static_cast<uint16_t>(code));
    if (std::isnan(v)) continue;
    ASSERT_EQ(f32_to_f16(v), code) << code;
    if (code < 0x7c00) finite.emplace_back(v, static_cast<uint16_t>(code));
  }
  EXPECT_EQ(f16_to_f32(0x3c00), 1.0f);
  EXPECT_EQ(f16_to_f32(0x0001), std::ldexp(1.0f, -24));
  EXPECT_EQ(f16_to_f32(0x7bff), 65504.0f);
  std::mt19937_64 rng(3);
  std::uniform_real_distribution<double> exponent(-26.0, 16.5);
  for (int i = 0; i < 50000; ++i) {
    const auto x = static_cast<float>(std::exp2(exponent(rng)));
    uint16_t expected;
    if (x >= 65520.0f) {
      expected = 0x7c00;
    } else {
      auto it =
          std::lower_bound(finite.begin(), finite.end(), std::make_pair(double(x), uint16_t{0}));
      if (it == finite.end()) it = finite.end() - 1;
      auto below = it == finite.begin() ? it : it - 1;
      const double d_it = std::fabs(it->first - x), d_below = std::fabs(below->first - x);
      expected = d_below < d_it || (d_below == d_it && (below->second & 1) == 0) ? below->second
                                                                                 : it->second;
    }
    ASSERT_EQ(f32_to_f16(x), expected) << x;
    ASSERT_EQ(f32_to_f16(-x), expected | 0x8000) << x;
  }
}

TEST(Fp8Scale, ClampsAndRoundsToPowersOfTwo) {
  EXPECT_EQ(kE4M3MaxInverse, 0x1.24924ap-9f);  // 1/448 rounded to f32
  EXPECT_EQ(fp8_block_scale(0.0f, false), 1e-4f * kE4M3MaxInverse);
  EXPECT_EQ(fp8_block_scale(448.0f, false), 448.0f * kE4M3MaxInverse);
  EXPECT_EQ(fp8_block_scale(448.0f, true), 1.0f);
  EXPECT_EQ(fp8_block_scale(449.0f, true), 2.0f);
  std::mt19937_64 rng(4);
  std::uniform_real_distribution<float> exponent(-10.0f, 20.0f);
  for (int i = 0; i < 1000; ++i) {
    const float amax = std::exp2(exponent(rng));
    const float s = fp8_block_scale(amax, false);
    const float p = fp8_block_scale(amax, true);
    EXPECT_EQ(s, static_cast<float>(double(amax) * double(kE4M3MaxInverse)));
    int e;
    EXPECT_EQ(std::frexp(p, &e), 0.5f) << "not a power of two: " << p;
    EXPECT_GE(p, s);
    EXPECT_LT(p, 2 * s);
  }
}

// The released act_quant multiplies by f32(1/448); dividing by 448 differs in the last bit for
// about half of the bf16 amax values in [1, 512), and the scale follows the multiply for each.
TEST(Fp8Scale, MultipliesByTheF32InverseAsTheReleasedCodeDoes) {
  int differ = 0, total = 0;
  for (uint32_t bits = 0x3f80; bits < 0x4400; ++bits) {  // bf16 amax in [1, 512)
    const float amax = bf16_to_f32(static_cast<uint16_t>(bits));
    const float released = static_cast<float>(double(amax) * double(kE4M3MaxInverse));
    ASSERT_EQ(fp8_block_scale(amax, false), released) << amax;
    differ += released != amax / 448.0f;
    ++total;
  }
  EXPECT_GT(differ, total / 5) << "the two rules should differ often";
  EXPECT_LT(differ, total * 3 / 4);
}

TEST(Fp8FakeQuantize, QuantizesEachBlockWithItsOwnScale) {
  std::mt19937_64 rng(5);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (bool ue8m0 : {false, true}) {
    std::vector<float> x(300);
    for (float& v : x) v = normal(rng);
    x[200] = 50.0f;  // an outlier only the third block sees
    std::vector<float> out(x.size());
    fp8_fake_quantize(x.data(), 300, 128, ue8m0, out.data());
    for (int64_t begin = 0; begin < 300; begin += 128) {
      const int64_t end = std::min<int64_t>(300, begin + 128);
      double amax = 0;
      for (int64_t i = begin; i < end; ++i) amax = std::max(amax, double(std::fabs(x[i])));
      const float scale = fp8_block_scale(static_cast<float>(amax), ue8m0);
      for (int64_t i = begin; i < end; ++i) {
        const uint8_t code = e4m3_nearest(x[i] / scale);
        ASSERT_EQ(out[i], e4m3_to_f32(code) * scale) << i;
        // Within half a step of e4m3 (3 mantissa bits), or of the subnormal spacing.
        EXPECT_LE(std::fabs(out[i] - x[i]),
                  std::max(std::fabs(x[i]) / 16, std::ldexp(scale, -10)) * 1.0001);
      }
    }
  }
}

TEST(Hadamard, MatchesTheExplicitOrthonormalMatrix) {
  for (int64_t n : {1, 2, 4, 8, 64, 128}) {
    std::vector<std::vector<double>> H(n, std::vector<double>(n, 1.0));
    for (int64_t half = 1; half < n; half *= 2) {
      for (int64_t i = 0; i < half; ++i) {
        for (int64_t j = 0; j < half; ++j) {
          H[i][j + half] = H[i][j];
          H[i + half][j] = H[i][j];
          H[i + half][j + half] = -H[i][j];
        }
      }
    }
    std::mt19937_64 rng(6);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    std::vector<float> x(n), y(n);
    for (float& v : x) v = normal(rng);
    y = x;
    hadamard_transform(y.data(), n);
    for (int64_t i = 0; i < n; ++i) {
      double expected = 0;
      for (int64_t j = 0; j < n; ++j) expected += H[i][j] * x[j];
      EXPECT_NEAR(y[i], expected / std::sqrt(double(n)), 1e-5) << n << " " << i;
    }
    hadamard_transform(y.data(), n);  // orthonormal and symmetric: its own inverse
    for (int64_t i = 0; i < n; ++i) EXPECT_NEAR(y[i], x[i], 1e-5);
  }
  EXPECT_TRUE(is_power_of_two(128));
  EXPECT_FALSE(is_power_of_two(96));
  EXPECT_FALSE(is_power_of_two(0));
}

// PyTorch's own conversions, written by tests/torch_rounding_check.py (where torch is installed)
// into the folder DSA_TORCH_ROUNDING names: x.npy (f32 inputs) and per device (cpu, cuda)
// bf16_DEVICE.npy (i32: the bits of x.to(torch.bfloat16)) and e4m3_DEVICE.npy (u8: the codes of
// x.clamp(-448, 448).to(torch.float8_e4m3fn), the released act_quant's conversion).
TEST(TorchRounding, Bf16AndE4m3AgreeWithPyTorch) {
  const char* folder = std::getenv("DSA_TORCH_ROUNDING");
  if (!folder) GTEST_SKIP() << "DSA_TORCH_ROUNDING is not set (tests/torch_rounding_check.py)";
  const std::filesystem::path dir(folder);
  const Tensor x = read_tensor((dir / "x.npy").string());
  ASSERT_EQ(x.dtype, DType::f32);
  const auto* values = reinterpret_cast<const float*>(x.data);
  int devices = 0;
  for (const std::string device : {"cpu", "cuda"}) {
    if (!std::filesystem::exists(dir / ("bf16_" + device + ".npy"))) continue;
    ++devices;
    const Tensor bf16 = read_tensor((dir / ("bf16_" + device + ".npy")).string());
    const Tensor e4m3 = read_tensor((dir / ("e4m3_" + device + ".npy")).string());
    ASSERT_EQ(bf16.numel(), x.numel());
    ASSERT_EQ(e4m3.numel(), x.numel());
    std::vector<int64_t> bf16_bits(static_cast<std::size_t>(x.numel()));
    to_i64(bf16, 0, x.numel(), bf16_bits.data());
    const auto* codes = reinterpret_cast<const uint8_t*>(e4m3.data);
    int64_t bf16_differ = 0, e4m3_differ = 0;
    for (int64_t i = 0; i < x.numel(); ++i) {
      const float v = values[i];
      const auto theirs = static_cast<uint16_t>(bf16_bits[i]);
      const bool bf16_same =
          std::isnan(v) ? std::isnan(bf16_to_f32(theirs)) : f32_to_bf16(v) == theirs;
      const bool e4m3_same =
          std::isnan(v) ? std::isnan(e4m3_to_f32(codes[i])) : f32_to_e4m3(v) == codes[i];
      if (!bf16_same && bf16_differ++ < 5) {
        ADD_FAILURE() << device << " bf16 of " << v << ": ours " << f32_to_bf16(v) << ", torch "
                      << theirs;
      }
      if (!e4m3_same && e4m3_differ++ < 5) {
        ADD_FAILURE() << device << " e4m3 of " << v << ": ours " << int(f32_to_e4m3(v))
                      << ", torch " << int(codes[i]);
      }
    }
    EXPECT_EQ(bf16_differ, 0) << device << " of " << x.numel();
    EXPECT_EQ(e4m3_differ, 0) << device << " of " << x.numel();
    std::printf("TorchRounding: %s: %lld values, bf16 and e4m3 identical to torch\n",
                device.c_str(), static_cast<long long>(x.numel()));
  }
  EXPECT_GT(devices, 0) << "no bf16_*.npy in " << folder;
}

TEST(PrecisionNames, ParseAndPrint) {
  EXPECT_EQ(parse_precision("fp8"), Precision::fp8);
  EXPECT_EQ(precision_name(parse_precision("bf16")), "bf16");
  try {
    parse_precision("int4");
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ExitCode::usage);
  }
}

}  // namespace
}  // namespace dsa
