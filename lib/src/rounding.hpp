// Internal: the roundings of the block formats (precision.hpp) as inline functions that compile
// for the host and, under nvcc, for the GPU too, so that the CPU's quantization (precision.cpp)
// and the CUDA kernels that quantize (compressor.cu) do the same arithmetic, bit for bit.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "dsa/precision.hpp"

#ifdef __CUDACC__
#define DSA_HOST_DEVICE __host__ __device__
#else
#define DSA_HOST_DEVICE
#endif

namespace dsa::detail {

DSA_HOST_DEVICE inline uint32_t bits_of(float x) {
  uint32_t b;
  std::memcpy(&b, &x, 4);
  return b;
}

DSA_HOST_DEVICE inline float float_of(uint32_t b) {
  float x;
  std::memcpy(&x, &b, 4);
  return x;
}

// bf16 round to nearest even; NaN stays NaN (quiet).
DSA_HOST_DEVICE inline uint16_t bf16_bits(float x) {
  const uint32_t b = bits_of(x);
  if (x != x) return static_cast<uint16_t>((b >> 16) | 0x40);
  const uint32_t rounding = 0x7fff + ((b >> 16) & 1);
  return static_cast<uint16_t>((b + rounding) >> 16);
}

DSA_HOST_DEVICE inline float bf16_round(float x) {
  return float_of(static_cast<uint32_t>(bf16_bits(x)) << 16);
}

// The least power of two >= x, read off its bits (x positive, finite and normal).
DSA_HOST_DEVICE inline float power_of_two_at_least(float x) {
  uint32_t b = bits_of(x);
  if (b & 0x7fffff) b = (b & 0xff800000) + 0x800000;  // a mantissa: up to the next exponent
  return float_of(b);
}

// e4m3_to_f32(f32_to_e4m3(x)) without the code: the same rounding done in f32 arithmetic.
DSA_HOST_DEVICE inline float e4m3_round(float x) {
  const float a = ::fabsf(x);
  if (!(a <= kE4M3Max)) return x != x ? x : ::copysignf(kE4M3Max, x);
  float rounded;
  if (a < 0.015625f) {
    rounded = (a + 16384.0f) - 16384.0f;  // to a multiple of 2^-9 (the subnormals), ties to even
  } else {
    uint32_t b = bits_of(a);  // keep 3 mantissa bits, ties to even; a carry bumps the exponent
    b = (b + 0x7ffff + ((b >> 20) & 1)) & 0xfff00000u;
    rounded = float_of(b);
  }
  return ::copysignf(rounded, x);
}

// The scale of one e4m3 block: amax clamped below at 1e-4, times f32(1/448), optionally to a
// power of two (ue8m0).
DSA_HOST_DEVICE inline float e4m3_block_scale(float amax, bool ue8m0) {
  const float scale = (amax < 1e-4f ? 1e-4f : amax) * kE4M3MaxInverse;
  return ue8m0 ? power_of_two_at_least(scale) : scale;
}

// The e2m1 value nearest x: ties to the even mantissa, saturating at +-6, NaN kept.
DSA_HOST_DEVICE inline float e2m1_nearest(float x) {
  if (x != x) return x;
  const float a = ::fabsf(x);
  // Midpoints between neighbours; at a tie the neighbour with an even mantissa wins (0, 1, 2, 4
  // are even; 0.5, 1.5, 3, 6 odd), so ties at 0.25, 1.25, 2.5, 5 go down, at 0.75, 1.75, 3.5 up.
  float r;
  if (a <= 0.25f) {
    r = 0.0f;
  } else if (a < 0.75f) {
    r = 0.5f;
  } else if (a <= 1.25f) {
    r = 1.0f;
  } else if (a < 1.75f) {
    r = 1.5f;
  } else if (a <= 2.5f) {
    r = 2.0f;
  } else if (a < 3.5f) {
    r = 3.0f;
  } else if (a <= 5.0f) {
    r = 4.0f;
  } else {
    r = kE2M1Max;
  }
  return ::copysignf(r, x);
}

// The released fp4_act_quant's block scale: amax clamped below at 6 * 2^-126, times f32(1/6),
// up to a power of two.
DSA_HOST_DEVICE inline float e2m1_block_scale(float amax) {
  constexpr float kFloor = 6.0f * 0x1p-126f;
  constexpr float kInverse = static_cast<float>(1.0 / 6.0);
  return power_of_two_at_least((amax < kFloor ? kFloor : amax) * kInverse);
}

}  // namespace dsa::detail
