// FlashMLA's fp8 latent cache (kv_cache.hpp): the layout and scales byte for byte on hand-made
// rows, the codes against an fp64 nearest-value search over every e4m3 code, attention over the
// cache against attention over its dequantized rows and the fp64 reference, and dsa-compare's
// report of what the cache loses against bf16. DeepSeek-V4's (584-byte rows): the same checks of
// its layout and codes, the released model's quantized values kept exactly, and the V4 attention
// over the caches against its dequantized rows and the fp64 reference.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>

#include "dsa/attention.hpp"
#include "dsa/compressed_attention.hpp"
#include "dsa/device.hpp"
#include "dsa/error.hpp"
#include "dsa/kv_cache.hpp"
#include "dsa/metrics.hpp"
#include "dsa/precision.hpp"
#include "reference.hpp"

namespace dsa {
namespace {

using test::f32;

float scale_of(const Tensor& cache, int64_t row, int64_t tile) {
  float s;
  std::memcpy(&s,
              reinterpret_cast<const uint8_t*>(cache.data) + row * kFp8CacheBytes +
                  kFp8CacheScales + 4 * tile,
              4);
  return s;
}

const uint8_t* bytes_of(const Tensor& cache, int64_t row) {
  return reinterpret_cast<const uint8_t*>(cache.data) + row * kFp8CacheBytes;
}

// The e4m3 value nearest x in fp64 over every finite code, ties to the even code (the one whose
// lowest mantissa bit is 0); beyond 448 the largest. Independent of precision.cpp's bit tricks.
double nearest_e4m3(double x) {
  double best = 0, best_err = INFINITY;
  int best_code = 0;
  for (int code = 0; code < 256; ++code) {
    const int exponent = (code >> 3) & 15, mantissa = code & 7;
    if (exponent == 15 && mantissa == 7) continue;  // NaN
    double v = exponent == 0 ? mantissa / 8.0 * std::ldexp(1.0, -6)
                             : (1 + mantissa / 8.0) * std::ldexp(1.0, exponent - 7);
    if (code & 128) v = -v;
    const double err = std::fabs(v - x);
    if (err < best_err || (err == best_err && (code & 1) == 0 && (best_code & 1) == 1)) {
      best = v, best_err = err, best_code = code;
    }
  }
  return best;
}

TEST(Fp8Cache, ScaleIsFlashMlasPowerOfTwo) {
  EXPECT_EQ(fp8_cache_scale(448.0f), 1.0f);
  EXPECT_EQ(fp8_cache_scale(449.0f), 2.0f);
  EXPECT_EQ(fp8_cache_scale(1.0f), std::ldexp(1.0f, -8));   // 1/448 = 2^-8.8
  EXPECT_EQ(fp8_cache_scale(0.0f), std::ldexp(1.0f, -13));  // clamped at 1e-4 = 2^-13.3
  EXPECT_EQ(fp8_cache_scale(224.0f), 0.5f);
}

TEST(Fp8Cache, LayoutAndValuesOfHandMadeRows) {
  Tensor kv = make_tensor(DType::f32, {2, kFp8CacheDim}, "kv");
  float* x = mutable_data<float>(kv);
  for (int64_t i = 0; i < 2 * kFp8CacheDim; ++i) x[i] = 0.0f;
  x[0] = 448.0f;  // tile 0: scale 1, codes are the values themselves
  x[1] = -1.5f;
  x[2] = 0.30078125f;  // bf16-exact, between e4m3 0.28125 and 0.3125: nearer 0.3125
  x[128] = 3.0f;       // tile 1: amax 3, scale 2^-7 (3/448 = 2^-7.2)
  x[129] = 1.0f / 3;
  x[512] = 1.0f / 3;  // rope: kept in bf16
  x[575] = -2.5f;
  x[kFp8CacheDim + 5] = 7.0f;  // row 1
  const Tensor cache = quantize_kv_cache_fp8(kv);
  ASSERT_EQ(cache.dtype, DType::u8);
  ASSERT_EQ(cache.shape, (Shape{2, kFp8CacheBytes}));
  EXPECT_EQ(kFp8CacheBytes, 656);
  EXPECT_TRUE(is_fp8_kv_cache(cache));
  EXPECT_EQ(scale_of(cache, 0, 0), 1.0f);
  EXPECT_EQ(scale_of(cache, 0, 1), std::ldexp(1.0f, -7));
  EXPECT_EQ(scale_of(cache, 0, 2), std::ldexp(1.0f, -13));
  EXPECT_EQ(scale_of(cache, 1, 0), std::ldexp(1.0f, -6));  // 7/448 = 2^-6 exactly
  const uint8_t* row = bytes_of(cache, 0);
  EXPECT_EQ(row[0], 0x7e);  // 448 = 1.75 x 2^8
  EXPECT_EQ(row[1], 0xbc);  // -1.5 = -(1.5 x 2^0)
  EXPECT_EQ(e4m3_to_f32(row[2]), 0.3125f);
  EXPECT_EQ(row[128], 0x7c);  // 3 / 2^-7 = 384 = 1.5 x 2^8
  uint16_t rope;
  std::memcpy(&rope, row + kFp8CacheRopeOffset, 2);
  EXPECT_EQ(rope, f32_to_bf16(1.0f / 3));
  std::memcpy(&rope, row + kFp8CacheRopeOffset + 2 * 63, 2);
  EXPECT_EQ(bf16_to_f32(rope), -2.5f);

  std::vector<float> back(2 * kFp8CacheDim);
  dequantize_kv_cache_fp8(cache, 0, 2, back.data());
  EXPECT_EQ(back[0], 448.0f);
  EXPECT_EQ(back[1], -1.5f);
  EXPECT_EQ(back[128], 3.0f);
  EXPECT_EQ(back[512], round_to_bf16(1.0f / 3));
  EXPECT_EQ(back[kFp8CacheDim + 5], 7.0f);
  EXPECT_EQ(back[kFp8CacheDim + 6], 0.0f);
}

TEST(Fp8Cache, CodesAreTheNearestE4m3OnRandomRows) {
  std::mt19937_64 rng(11);
  const int64_t L = 64;
  Tensor kv = test::random_tensor({1, L, kFp8CacheDim}, rng, 1.0f, "kv");
  float* x = mutable_data<float>(kv);
  // Tiles of very different amplitudes, down to the clamp (subnormal codes) and up.
  for (int64_t r = 0; r < L; ++r)
    for (int64_t i = 0; i < kFp8CacheLatent; ++i)
      x[r * kFp8CacheDim + i] *= std::ldexp(1.0f, static_cast<int>(r % 24) - 16);
  const Tensor cache = quantize_kv_cache_fp8(kv);
  ASSERT_EQ(cache.shape, (Shape{1, L, kFp8CacheBytes}));
  std::vector<float> back(static_cast<std::size_t>(L * kFp8CacheDim));
  dequantize_kv_cache_fp8(cache, 0, L, back.data());
  for (int64_t r = 0; r < L; ++r) {
    for (int64_t tile = 0; tile < kFp8CacheTiles; ++tile) {
      double amax = 0;
      for (int64_t i = 0; i < kFp8CacheTile; ++i)
        amax =
            std::max(amax, std::fabs(double(round_to_bf16(x[r * kFp8CacheDim + tile * 128 + i]))));
      // 2^ceil(log2(max(amax / 448, 1e-4))), in fp64 (amax / 448 is exact enough here: no random
      // amax lies within f32 rounding of a power of two times 448).
      const double want = std::exp2(std::ceil(std::log2(std::max(amax / 448.0, 1e-4))));
      const float scale = scale_of(cache, r, tile);
      ASSERT_EQ(scale, want) << "row " << r << " tile " << tile;
      for (int64_t i = tile * 128; i < (tile + 1) * 128; ++i) {
        const double v = round_to_bf16(x[r * kFp8CacheDim + i]);
        ASSERT_EQ(back[r * kFp8CacheDim + i], nearest_e4m3(v / scale) * scale)
            << "row " << r << " column " << i;
      }
    }
    for (int64_t i = kFp8CacheLatent; i < kFp8CacheDim; ++i)
      ASSERT_EQ(back[r * kFp8CacheDim + i], round_to_bf16(x[r * kFp8CacheDim + i]));
  }
}

TEST(Fp8Cache, RejectsWhatIsNotALatentCache) {
  std::mt19937_64 rng(3);
  const Tensor wrong = test::random_tensor({4, 512}, rng, 1.0f, "kv");
  EXPECT_THROW(quantize_kv_cache_fp8(wrong), Error);
  Tensor inf = test::random_tensor({2, kFp8CacheDim}, rng, 1.0f, "kv");
  mutable_data<float>(inf)[kFp8CacheDim + 7] = INFINITY;
  try {
    quantize_kv_cache_fp8(inf);
    FAIL() << "a non-finite value was quantized";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ExitCode::bad_input);
    EXPECT_NE(std::string(e.what()).find("row 1"), std::string::npos) << e.what();
  }
  // A u8 kv must be the 656-byte cache beside 576-wide queries.
  const Tensor q = test::random_tensor({3, 2, kFp8CacheDim}, rng, 1.0f, "q");
  const Tensor bytes = make_tensor(DType::u8, {5, 600}, "kv");
  EXPECT_THROW(make_mqa_inputs(q, bytes, 512), Error);
  const Tensor narrow_q = test::random_tensor({3, 2, 512}, rng, 1.0f, "q");
  const Tensor cache = make_tensor(DType::u8, {5, kFp8CacheBytes}, "kv");
  EXPECT_THROW(make_mqa_inputs(narrow_q, cache, 512), Error);
  EXPECT_TRUE(make_mqa_inputs(q, cache, 512).fp8_cache);
  EXPECT_THROW(parse_kv_cache("fp4"), Error);
}

struct CacheProblem {
  Tensor q, kv, cache, dequantized, indices;
  AttentionInputs bf16, fp8, plain;
};

std::unique_ptr<CacheProblem> make_cache_problem(int64_t Lq, int64_t Lk, int64_t H, int64_t k,
                                                 uint64_t seed) {
  std::mt19937_64 rng(seed);
  auto p = std::make_unique<CacheProblem>();
  p->q = test::random_tensor({Lq, H, kFp8CacheDim}, rng, 0.05f, "q");
  p->kv = test::random_tensor({Lk, kFp8CacheDim}, rng, 1.0f, "kv");
  p->cache = quantize_kv_cache_fp8(p->kv);
  p->dequantized = make_tensor(DType::f32, {Lk, kFp8CacheDim}, "dequantized");
  dequantize_kv_cache_fp8(p->cache, 0, Lk, mutable_data<float>(p->dequantized));
  p->bf16 = make_mqa_inputs(p->q, p->kv, 512);
  p->fp8 = make_mqa_inputs(p->q, p->cache, 512);
  p->plain = make_mqa_inputs(p->q, p->dequantized, 512);
  p->indices = make_tensor(DType::i32, {Lq, k}, "idx");
  int32_t* idx = mutable_data<int32_t>(p->indices);
  for (int64_t t = 0; t < Lq; ++t) {
    const int64_t visible = Lk - Lq + t + 1;
    std::vector<int32_t> all(static_cast<std::size_t>(visible));
    for (int64_t s = 0; s < visible; ++s) all[s] = static_cast<int32_t>(s);
    std::shuffle(all.begin(), all.end(), rng);
    all.resize(static_cast<std::size_t>(k), -1);
    std::copy(all.begin(), all.end(), idx + t * k);
  }
  return p;
}

std::vector<float> attend(const AttentionInputs& in, const Tensor* indices, float scale,
                          std::vector<float>* lse = nullptr) {
  std::vector<float> out(static_cast<std::size_t>(in.queries * in.heads * in.d_v));
  if (lse) lse->resize(static_cast<std::size_t>(in.queries * in.heads));
  auto sink = [&](const AttentionBlock& b) {
    std::copy_n(b.out, b.rows * b.heads * b.d_v, out.begin() + b.row_begin * b.heads * b.d_v);
    if (lse) std::copy_n(b.lse, b.rows * b.heads, lse->begin() + b.row_begin * b.heads);
  };
  if (indices) {
    sparse_attention(in, *indices, scale, sink, nullptr);
  } else {
    dense_attention(in, scale, sink, nullptr);
  }
  return out;
}

TEST(Fp8Cache, AttentionReadsTheDequantizedRows) {
  const auto p = make_cache_problem(12, 40, 4, 16, 5);
  const float scale = default_scale(kFp8CacheDim);
  for (const Tensor* indices : std::vector<const Tensor*>{&p->indices, nullptr}) {
    std::vector<float> lse_fp8, lse_plain;
    const std::vector<float> fp8 = attend(p->fp8, indices, scale, &lse_fp8);
    EXPECT_EQ(fp8, attend(p->plain, indices, scale, &lse_plain));
    EXPECT_EQ(lse_fp8, lse_plain);
    // And the fp64 reference over the dequantized values.
    double err = 0, norm = 0;
    for (int64_t t = 0; t < 12; ++t) {
      std::vector<int64_t> selected;
      if (indices) {
        for (int64_t i = 0; i < 16; ++i) {
          const int32_t s = reinterpret_cast<const int32_t*>(indices->data)[t * 16 + i];
          if (s >= 0) selected.push_back(s);
        }
      } else {
        for (int64_t s = 0; s <= 40 - 12 + t; ++s) selected.push_back(s);
      }
      auto row = [&](int64_t s, int64_t) { return f32(p->dequantized) + s * kFp8CacheDim; };
      std::vector<double> out, lse;
      test::reference_attention_row(f32(p->q) + t * 4 * kFp8CacheDim, 4, 1, kFp8CacheDim, 512,
                                    selected, scale, row, row, out, lse);
      for (int64_t i = 0; i < 4 * 512; ++i) {
        err += std::pow(fp8[t * 4 * 512 + i] - out[i], 2);
        norm += out[i] * out[i];
      }
    }
    EXPECT_LE(std::sqrt(err), 1e-5 * std::sqrt(norm));
  }
  EXPECT_EQ(attention_report(p->fp8, false, {scale, "d_qk^-0.5"})["kv_cache"], "fp8");
  // Nothing of this ran on a GPU: no device memory to report.
  EXPECT_EQ(peak_device_bytes(), 0);
  EXPECT_EQ(attention_report(p->bf16, false, {scale, "d_qk^-0.5"})["kv_cache"], "f32");
}

TEST(Fp8Cache, CompareReportsTheLossAgainstBf16) {
  const auto p = make_cache_problem(24, 64, 4, 32, 9);
  const float scale = default_scale(kFp8CacheDim);
  CompareInputs in;
  in.attention = p->bf16;
  in.fp8_cache = &p->fp8;
  in.scale = scale;
  in.indices = &p->indices;
  in.topk = {32};
  const Comparison c = compare_attention(in, nullptr);
  ASSERT_EQ(c.per_k.size(), 1u);
  const Fidelity& f = c.per_k[0];
  ASSERT_EQ(f.cache_rel_err.size(), static_cast<std::size_t>(24 * 4));
  // The loss against bf16: the fp8 cache's sparse output against the kv's own.
  const std::vector<float> fp8 = attend(p->fp8, &p->indices, scale);
  const std::vector<float> bf16 = attend(p->bf16, &p->indices, scale);
  const std::vector<float> dense = attend(p->bf16, nullptr, scale);
  double err = 0, norm = 0;
  for (int64_t r = 0; r < 24 * 4; ++r) {
    double e = 0, n = 0, d = 0, m = 0;
    for (int64_t c = 0; c < 512; ++c) {
      e += std::pow(double(fp8[r * 512 + c]) - bf16[r * 512 + c], 2);
      n += std::pow(double(bf16[r * 512 + c]), 2);
      d += std::pow(double(fp8[r * 512 + c]) - dense[r * 512 + c], 2);
      m += std::pow(double(dense[r * 512 + c]), 2);
    }
    EXPECT_NEAR(f.cache_rel_err[r], std::sqrt(e / n), 1e-6 * std::sqrt(e / n) + 1e-12) << r;
    // The main metrics are the fp8 cache's against the dense reference over kv.
    EXPECT_NEAR(f.out_rel_err[r], std::sqrt(d / m), 1e-6 * std::sqrt(d / m) + 1e-12) << r;
    err += e;
    norm += n;
  }
  EXPECT_NEAR(f.cache_error_squares / f.cache_reference_squares, err / norm, 1e-9 * err / norm);
  // e4m3 keeps 3 mantissa bits: a few percent of error, never zero.
  EXPECT_GT(std::sqrt(err / norm), 1e-3);
  EXPECT_LT(std::sqrt(err / norm), 0.1);
  const nlohmann::json report = comparison_report(in, c);
  EXPECT_EQ(report["kv_cache"], "fp8");
  const nlohmann::json& loss = report["results"][0]["kv_cache_loss"];
  EXPECT_EQ(loss["cache"], "fp8");
  EXPECT_EQ(loss["against"], "bf16");
  EXPECT_NEAR(loss["out_rel_err_global"].get<double>(), std::sqrt(err / norm), 1e-9);
  // Without the fp8 cache, no loss block and the kv's own dtype.
  CompareInputs plain = in;
  plain.fp8_cache = nullptr;
  const nlohmann::json plain_report = comparison_report(plain, compare_attention(plain, nullptr));
  EXPECT_FALSE(plain_report["results"][0].contains("kv_cache_loss"));
  EXPECT_EQ(plain_report["kv_cache"], "f32");
  // The fp8 cache of other inputs is refused.
  const auto other = make_cache_problem(24, 64, 4, 32, 10);
  in.fp8_cache = &other->bf16;
  EXPECT_THROW(compare_attention(in, nullptr), Error);
}

// ---- DeepSeek-V4's cache ---------------------------------------------------------------------

// Tile `tile`'s scale of row `row`: 2^(byte - 127).
double v4_scale_of(const Tensor& cache, int64_t row, int64_t tile) {
  const uint8_t* b = reinterpret_cast<const uint8_t*>(cache.data) + row * kV4CacheBytes;
  return std::ldexp(1.0, static_cast<int>(b[kV4CacheScales + tile]) - 127);
}

TEST(V4Fp8Cache, LayoutOfAHandMadeRow) {
  Tensor row = make_tensor(DType::f32, {1, kV4CacheDim}, "entries");
  float* x = mutable_data<float>(row);
  for (int64_t i = 0; i < kV4CacheDim; ++i) x[i] = 0;
  x[0] = 448.0f;     // tile 0: scale 1, code of 448 is 0x7e
  x[1] = -1.0f;      // code 0xb8
  x[64] = 3.0f;      // tile 1: amax 3, 3/448 = 2^-7.2: scale 2^-7, 3 / 2^-7 = 384
  x[130] = 0.01f;    // tile 2: 0.01/448 < 1e-4: clamped, scale 2^-13
  x[448] = 1.5f;     // the first RoPE value, bf16 0x3fc0
  x[511] = -0.375f;  // the last, 0xbec0
  const Tensor cache = quantize_v4_cache_fp8(row);
  ASSERT_EQ(cache.shape, (Shape{1, kV4CacheBytes}));
  EXPECT_EQ(cache.name, "entries:fp8");
  EXPECT_TRUE(is_v4_fp8_cache(cache));
  EXPECT_FALSE(is_fp8_kv_cache(cache));
  const uint8_t* b = reinterpret_cast<const uint8_t*>(cache.data);
  EXPECT_EQ(b[0], 0x7e);
  EXPECT_EQ(b[1], 0xb8);
  EXPECT_EQ(b[2], 0x00);
  EXPECT_EQ(b[kV4CacheScales + 0], 127);
  EXPECT_EQ(b[kV4CacheScales + 1], 127 - 7);
  EXPECT_EQ(b[64], 0x7c);  // 384 = 1.5 * 2^8: exponent field 15, mantissa 4
  EXPECT_EQ(b[kV4CacheScales + 2], 127 - 13);
  EXPECT_EQ(b[kV4CacheScales + 3], 127 - 13);  // an all-zero tile: the clamp too
  EXPECT_EQ(b[kV4CacheRopeOffset], 0xc0);
  EXPECT_EQ(b[kV4CacheRopeOffset + 1], 0x3f);
  EXPECT_EQ(b[kV4CacheRopeOffset + 126], 0xc0);
  EXPECT_EQ(b[kV4CacheRopeOffset + 127], 0xbe);
  EXPECT_EQ(b[kV4CacheBytes - 1], 0);
  std::vector<float> back(static_cast<std::size_t>(kV4CacheDim));
  dequantize_v4_cache_fp8(cache, 0, 1, back.data());
  EXPECT_EQ(back[0], 448.0f);
  EXPECT_EQ(back[64], 3.0f);
  EXPECT_EQ(back[130], static_cast<float>(nearest_e4m3(0.01 * 8192) / 8192));  // 0.01 rounds
  EXPECT_EQ(back[448], 1.5f);
  EXPECT_EQ(back[511], -0.375f);
}

TEST(V4Fp8Cache, CodesAreTheNearestE4m3OfFlashMlasScales) {
  std::mt19937_64 rng(21);
  Tensor rows = test::random_tensor({2, 33, kV4CacheDim}, rng, 2.0f, "entries");
  float* x = mutable_data<float>(rows);
  for (int64_t i = 0; i < kV4CacheDim; ++i) x[i] *= 1e-3f;  // a row whose tiles clamp
  const Tensor cache = quantize_v4_cache_fp8(rows);
  ASSERT_EQ(cache.shape, (Shape{2, 33, kV4CacheBytes}));
  std::vector<float> back(static_cast<std::size_t>(66 * kV4CacheDim));
  dequantize_v4_cache_fp8(cache, 0, 66, back.data());
  for (int64_t r = 0; r < 66; ++r) {
    const float* v = x + r * kV4CacheDim;
    for (int64_t tile = 0; tile < kV4CacheTiles; ++tile) {
      double amax = 0;
      for (int64_t i = tile * 64; i < tile * 64 + 64; ++i)
        amax = std::max(amax, std::fabs(static_cast<double>(round_to_bf16(v[i]))));
      // FlashMLA's quantize_k_cache: 2^ceil(log2(max(amax / 448, 1e-4))).
      const double scale = std::exp2(std::ceil(std::log2(std::max(amax / 448.0, 1e-4))));
      ASSERT_EQ(v4_scale_of(cache, r, tile), scale) << r << " " << tile;
      for (int64_t i = tile * 64; i < tile * 64 + 64; ++i) {
        const double want = nearest_e4m3(round_to_bf16(v[i]) / scale) * scale;
        ASSERT_EQ(back[r * kV4CacheDim + i], static_cast<float>(want)) << r << " " << i;
      }
    }
    for (int64_t i = kV4CacheNope; i < kV4CacheDim; ++i)
      ASSERT_EQ(back[r * kV4CacheDim + i], round_to_bf16(v[i]));
  }
}

TEST(V4Fp8Cache, KeepsTheReleasedModelsQuantizedValues) {
  // The released model's act_quant (e4m3 in blocks of 64, ue8m0 scales) over the non-RoPE
  // dims: those values are code x power of two already, and the cache keeps them exactly.
  std::mt19937_64 rng(22);
  Tensor rows = test::random_tensor({40, kV4CacheDim}, rng, 1.0f, "entries");
  float* x = mutable_data<float>(rows);
  for (int64_t r = 0; r < 40; ++r) {
    float* v = x + r * kV4CacheDim;
    for (int64_t i = 0; i < kV4CacheDim; ++i) v[i] = round_to_bf16(v[i]);
    fp8_fake_quantize(v, kV4CacheNope, kV4CacheTile, true, v);
  }
  const Tensor cache = quantize_v4_cache_fp8(rows);
  std::vector<float> back(static_cast<std::size_t>(40 * kV4CacheDim));
  dequantize_v4_cache_fp8(cache, 0, 40, back.data());
  for (int64_t i = 0; i < 40 * kV4CacheDim; ++i) ASSERT_EQ(back[i], x[i]) << i;
}

TEST(V4Fp8Cache, RejectsWhatItCannotHold) {
  std::mt19937_64 rng(23);
  EXPECT_THROW(quantize_v4_cache_fp8(test::random_tensor({4, 576}, rng, 1.0f, "entries")), Error);
  Tensor nan = test::random_tensor({3, kV4CacheDim}, rng, 1.0f, "entries");
  mutable_data<float>(nan)[2 * kV4CacheDim + 500] = NAN;  // a RoPE value
  try {
    quantize_v4_cache_fp8(nan);
    FAIL() << "a NaN was quantized";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ExitCode::bad_input);
    EXPECT_NE(std::string(e.what()).find("row 2"), std::string::npos) << e.what();
  }
  // The attention takes both caches in the format or neither, beside 512-wide queries.
  const Tensor q = test::random_tensor({2, 4, kV4CacheDim}, rng, 1.0f, "q");
  const Tensor kv = quantize_v4_cache_fp8(test::random_tensor({8, kV4CacheDim}, rng, 1.0f, "kv"));
  const Tensor entries = test::random_tensor({2, kV4CacheDim}, rng, 1.0f, "compressed");
  EXPECT_THROW(make_compressed_attention_inputs(q, kv, &entries, nullptr, V4Attention::csa, 4),
               Error);
  const Tensor q64 = test::random_tensor({2, 4, 64}, rng, 1.0f, "q");
  EXPECT_THROW(make_compressed_attention_inputs(q64, kv, nullptr, nullptr, V4Attention::swa, 4),
               Error);
  EXPECT_TRUE(
      make_compressed_attention_inputs(q, kv, nullptr, nullptr, V4Attention::swa, 4).fp8_cache);
}

TEST(V4Fp8Cache, AttentionReadsTheDequantizedRows) {
  std::mt19937_64 rng(24);
  const int64_t T = 300, Lq = 40, H = 4, k = 16, window = 32;
  for (const V4Attention kind : {V4Attention::csa, V4Attention::hca, V4Attention::swa}) {
    SCOPED_TRACE(v4_attention_name(kind));
    const int64_t ratio = v4_compress_ratio(kind);
    const int64_t N = ratio ? T / ratio : 0;
    const Tensor q = test::random_tensor({Lq, H, kV4CacheDim}, rng, 0.05f, "q");
    const Tensor kv = test::random_tensor({T, kV4CacheDim}, rng, 1.0f, "kv");
    const Tensor cmp = test::random_tensor({N, kV4CacheDim}, rng, 1.0f, "compressed");
    const Tensor sink = test::random_tensor({H}, rng, 1.0f, "sink");
    const CompressedAttentionInputs bf16 =
        make_compressed_attention_inputs(q, kv, ratio ? &cmp : nullptr, &sink, kind, window);
    const auto fp8 = fp8_v4_cache_attention(bf16);
    ASSERT_TRUE(fp8->inputs.fp8_cache);
    // The dequantized rows as plain f32 caches.
    Tensor kv_back = make_tensor(DType::f32, {T, kV4CacheDim}, "kv back");
    Tensor cmp_back = make_tensor(DType::f32, {N, kV4CacheDim}, "compressed back");
    dequantize_v4_cache_fp8(fp8->kv, 0, T, mutable_data<float>(kv_back));
    if (ratio) dequantize_v4_cache_fp8(fp8->compressed, 0, N, mutable_data<float>(cmp_back));
    const CompressedAttentionInputs plain = make_compressed_attention_inputs(
        q, kv_back, ratio ? &cmp_back : nullptr, &sink, kind, window);
    Tensor indices = make_tensor(DType::i32, {Lq, k}, "indices");
    std::vector<std::vector<int64_t>> selected(static_cast<std::size_t>(Lq));
    for (int64_t r = 0; r < Lq; ++r) {
      std::vector<int64_t> all;
      for (int64_t j = 0; j < plain.visible_entries(r); ++j) all.push_back(j);
      std::shuffle(all.begin(), all.end(), rng);
      all.resize(static_cast<std::size_t>(k), -1);
      for (int64_t i = 0; i < k; ++i) {
        mutable_data<int32_t>(indices)[r * k + i] = static_cast<int32_t>(all[i]);
        if (all[i] >= 0) selected[r].push_back(all[i]);
      }
      if (kind == V4Attention::hca) {
        selected[r].clear();
        for (int64_t j = 0; j < plain.visible_entries(r); ++j) selected[r].push_back(j);
      }
      if (kind == V4Attention::swa) selected[r].clear();
    }
    const Tensor* sel = kind == V4Attention::csa ? &indices : nullptr;
    const float scale = default_scale(kV4CacheDim);
    const auto run = [&](const CompressedAttentionInputs& in, std::vector<float>& lse) {
      std::vector<float> out(static_cast<std::size_t>(Lq * H * kV4CacheDim));
      lse.resize(static_cast<std::size_t>(Lq * H));
      compressed_attention(
          in, sel, scale,
          [&](const AttentionBlock& b) {
            std::copy_n(b.out, b.rows * H * kV4CacheDim,
                        out.begin() + b.row_begin * H * kV4CacheDim);
            std::copy_n(b.lse, b.rows * H, lse.begin() + b.row_begin * H);
          },
          nullptr);
      return out;
    };
    std::vector<float> lse8, lse_plain;
    const std::vector<float> out8 = run(fp8->inputs, lse8);
    EXPECT_EQ(out8, run(plain, lse_plain));
    EXPECT_EQ(lse8, lse_plain);
    double worst = 0;
    for (int64_t r = 0; r < Lq; ++r) {
      for (int64_t h = 0; h < H; ++h) {
        double lse = 0;
        const std::vector<double> want = test::reference_v4_row(
            f32(q) + (r * H + h) * kV4CacheDim, f32(kv_back), f32(cmp_back), kV4CacheDim,
            plain.position(r), window, selected[r], f32(sink)[h], scale, lse);
        for (int64_t e = 0; e < kV4CacheDim; ++e)
          worst = std::max(worst, std::fabs(out8[(r * H + h) * kV4CacheDim + e] - want[e]));
      }
    }
    EXPECT_LT(worst, 1e-5);
    EXPECT_EQ(compressed_attention_report(fp8->inputs, false, {scale, "d_qk^-0.5"})["kv_cache"],
              "fp8");
  }
}

}  // namespace
}  // namespace dsa
