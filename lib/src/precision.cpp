#include "dsa/precision.hpp"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <limits>

#include "dsa/error.hpp"
#include "rounding.hpp"

namespace dsa {

using detail::bits_of;
using detail::float_of;

Precision parse_precision(const std::string& text) {
  if (text == "f32") return Precision::f32;
  if (text == "bf16") return Precision::bf16;
  if (text == "fp8") return Precision::fp8;
  if (text == "fp4") return Precision::fp4;
  bad_usage("unknown precision '{}': expected f32, bf16, fp8 or fp4", text);
}

std::string precision_name(Precision precision) {
  switch (precision) {
    case Precision::f32:
      return "f32";
    case Precision::bf16:
      return "bf16";
    case Precision::fp8:
      return "fp8";
    case Precision::fp4:
      return "fp4";
  }
  return "?";
}

uint16_t f32_to_bf16(float x) {
  return detail::bf16_bits(x);
}

float bf16_to_f32(uint16_t bits) {
  return float_of(static_cast<uint32_t>(bits) << 16);
}

float round_to_bf16(float x) {
  return bf16_to_f32(f32_to_bf16(x));
}

uint16_t f32_to_f16(float x) {
  uint32_t b = bits_of(x);
  const auto sign = static_cast<uint16_t>((b >> 16) & 0x8000);
  b &= 0x7fffffff;
  if (b >= 0x7f800000) return sign | (b > 0x7f800000 ? 0x7e00 : 0x7c00);
  if (b >= 0x477ff000) return sign | 0x7c00;  // >= 65520 rounds to infinity
  if (b < 0x38800000) {
    // Below 2^-14: a multiple of 2^-24; scaling by 2^24 is exact, nearbyint rounds to even.
    return sign | static_cast<uint16_t>(std::nearbyint(float_of(b) * 16777216.0f));
  }
  uint32_t h = ((b >> 23) - 112) << 10 | ((b >> 13) & 0x3ff);
  const uint32_t rest = b & 0x1fff;
  if (rest > 0x1000 || (rest == 0x1000 && (h & 1))) ++h;  // a carry moves into the exponent
  return sign | static_cast<uint16_t>(h);
}

float f16_to_f32(uint16_t bits) {
  const uint32_t sign = static_cast<uint32_t>(bits & 0x8000) << 16;
  const uint32_t exponent = (bits >> 10) & 0x1f;
  const uint32_t mantissa = bits & 0x3ff;
  if (exponent == 0) {
    const float magnitude = std::ldexp(static_cast<float>(mantissa), -24);
    return sign ? -magnitude : magnitude;
  }
  if (exponent == 31) return float_of(sign | 0x7f800000 | (mantissa << 13));
  return float_of(sign | ((exponent + 112) << 23) | (mantissa << 13));
}

uint8_t f32_to_e4m3(float x) {
  const auto sign = static_cast<uint8_t>((bits_of(x) >> 24) & 0x80);
  if (std::isnan(x)) return sign | 0x7f;
  const float a = std::fabs(x);
  if (a > kE4M3Max) return sign | 0x7e;  // saturate, infinities included
  if (a < 0.015625f) {
    // Subnormal range (below 2^-6): multiples of 2^-9; 8 * 2^-9 is the smallest normal.
    return sign | static_cast<uint8_t>(std::nearbyint(a * 512.0f));
  }
  const uint32_t b = bits_of(a);
  uint32_t code = (((b >> 23) - 120) << 3) | ((b >> 20) & 7);
  const uint32_t rest = b & 0xfffff;
  if (rest > 0x80000 || (rest == 0x80000 && (code & 1))) ++code;
  return sign | static_cast<uint8_t>(code);
}

namespace {

float decode_e4m3(uint8_t bits) {
  const bool negative = bits & 0x80;
  const int exponent = (bits >> 3) & 0xf;
  const int mantissa = bits & 7;
  float magnitude;
  if (exponent == 15 && mantissa == 7) {
    magnitude = std::numeric_limits<float>::quiet_NaN();
  } else if (exponent == 0) {
    magnitude = std::ldexp(static_cast<float>(mantissa), -9);
  } else {
    magnitude = std::ldexp(static_cast<float>(8 + mantissa), exponent - 10);
  }
  return negative ? -magnitude : magnitude;
}

// All 256 values, decoded once: the fp8 indexer converts every element of every row.
const std::array<float, 256>& e4m3_values() {
  static const std::array<float, 256> values = [] {
    std::array<float, 256> v;
    for (int bits = 0; bits < 256; ++bits) v[bits] = decode_e4m3(static_cast<uint8_t>(bits));
    return v;
  }();
  return values;
}

}  // namespace

float e4m3_to_f32(uint8_t bits) {
  return e4m3_values()[bits];
}

float round_up_to_power_of_two(float x) {
  return detail::power_of_two_at_least(x);
}

float fp8_block_scale(float amax, bool ue8m0) {
  return detail::e4m3_block_scale(amax, ue8m0);
}

float fp8_quantize_block(float* x, int64_t n, bool ue8m0) {
  float amax = 0.0f;
  for (int64_t i = 0; i < n; ++i) amax = std::fmax(amax, std::fabs(x[i]));
  const float scale = fp8_block_scale(amax, ue8m0);
  for (int64_t i = 0; i < n; ++i) x[i] = detail::e4m3_round(x[i] / scale);
  return scale;
}

void fp8_fake_quantize(const float* x, int64_t n, int64_t block, bool ue8m0, float* out) {
  if (out != x) std::copy(x, x + n, out);
  for (int64_t begin = 0; begin < n; begin += block) {
    const int64_t end = std::min(n, begin + block);
    const float scale = fp8_quantize_block(out + begin, end - begin, ue8m0);
    for (int64_t i = begin; i < end; ++i) out[i] *= scale;
  }
}

float e2m1_round(float x) {
  return detail::e2m1_nearest(x);
}

float fp4_block_scale(float amax) {
  return detail::e2m1_block_scale(amax);
}

void fp4_fake_quantize(const float* x, int64_t n, int64_t block, float* out) {
  for (int64_t begin = 0; begin < n; begin += block) {
    const int64_t end = std::min(n, begin + block);
    float amax = 0.0f;
    for (int64_t i = begin; i < end; ++i) amax = std::max(amax, std::fabs(x[i]));
    const float scale = fp4_block_scale(amax);
    for (int64_t i = begin; i < end; ++i) out[i] = e2m1_round(x[i] / scale) * scale;
  }
}

bool is_power_of_two(int64_t n) {
  return n > 0 && (n & (n - 1)) == 0;
}

void hadamard_transform(float* x, int64_t n) {
  for (int64_t half = 1; half < n; half *= 2) {
    for (int64_t i = 0; i < n; i += 2 * half) {
      for (int64_t j = i; j < i + half; ++j) {
        const float a = x[j];
        const float b = x[j + half];
        x[j] = a + b;
        x[j + half] = a - b;
      }
    }
  }
  const auto scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(n)));
  for (int64_t i = 0; i < n; ++i) x[i] *= scale;
}

}  // namespace dsa
