// Number formats: bf16, f16, float8 e4m3 (fn: no infinities, max 448), block quantization and
// the Hadamard rotation the indexer applies before quantizing.
#pragma once

#include <cstdint>
#include <string>

namespace dsa {

// fp4: DeepSeek-V4's indexer (the released fp4_act_quant): e2m1 in blocks of 32 with ue8m0 scales.
enum class Precision { f32, bf16, fp8, fp4 };
inline constexpr int64_t kFp4IndexerBlock = 32;      // the released indexer's e2m1 blocks
Precision parse_precision(const std::string& text);  // throws Error(usage)
std::string precision_name(Precision precision);

// bf16: round to nearest even; NaN stays NaN (quiet).
uint16_t f32_to_bf16(float x);
float bf16_to_f32(uint16_t bits);
float round_to_bf16(float x);

// IEEE binary16.
uint16_t f32_to_f16(float x);
float f16_to_f32(uint16_t bits);

// float8 e4m3fn (torch.float8_e4m3fn): bias 7, no infinities, 0x7f/0xff are NaN, max 448.
// Conversion rounds to nearest even; finite values beyond the range and +-inf saturate to
// +-448 (CUDA's __NV_SATFINITE behaviour, and what a clamp to [-448, 448] before
// `.to(torch.float8_e4m3fn)` gives); NaN maps to NaN.
inline constexpr float kE4M3Max = 448.0f;
uint8_t f32_to_e4m3(float x);
float e4m3_to_f32(uint8_t bits);

// 1/448 rounded to f32: the released act_quant multiplies by this constant rather than divide by
// 448 (the two differ in the last bit for about half of the bf16 amax values).
inline constexpr float kE4M3MaxInverse = static_cast<float>(1.0 / 448.0);

// The least power of two >= x, read off its bits (2^ceil(log2 x), exact where a float log2 could
// round): the ue8m0 scale of every block format here. x positive, finite and normal.
float round_up_to_power_of_two(float x);

// Quantization scale of one block, as the released act_quant computes it: amax clamped below at
// 1e-4, times kE4M3MaxInverse in f32, optionally rounded up to a power of two (`ue8m0`, the
// released model's scale_fmt: 2^ceil(log2) of that product, read off its bits).
float fp8_block_scale(float amax, bool ue8m0);

// Quantizes one block x[0..n) in place: each element becomes the value of its e4m3 code (of
// x / scale, exact in bf16); returns the block's scale. The GPU path consumes codes and scales.
float fp8_quantize_block(float* x, int64_t n, bool ue8m0);

// Quantizes x[0..n) to e4m3 in blocks of `block` elements and writes the dequantized values
// (code * scale, f32) to out; x and out may alias. Returns nothing: the scales are implied.
void fp8_fake_quantize(const float* x, int64_t n, int64_t block, bool ue8m0, float* out);

// float4 e2m1 (DeepSeek-V4's indexer cache): values 0, 0.5, 1, 1.5, 2, 3, 4, 6 and their
// negatives. Conversion rounds to nearest even (0.25 -> 0, 0.75 -> 1, 2.5 -> 2, 5 -> 4) and
// saturates at +-6 (PTX cvt.rn.satfinite.e2m1x2.f32); NaN stays NaN in e2m1_round.
inline constexpr float kE2M1Max = 6.0f;
float e2m1_round(float x);  // the e2m1 value nearest x

// The released fp4_act_quant's scale of one block (DeepSeek-V4 inference/kernel.py): amax clamped
// below at 6 * 2^-126, times f32(1/6), rounded up to a power of two (ue8m0).
float fp4_block_scale(float amax);

// x[0..n) through e2m1 in blocks of `block` elements (the released code uses 32), written back
// dequantized (e2m1 value * scale, exact in bf16) to out; x and out may alias.
void fp4_fake_quantize(const float* x, int64_t n, int64_t block, float* out);

// In-place orthonormal Walsh-Hadamard transform (Sylvester order, scaled by n^-0.5);
// n must be a power of two. Dot products are unchanged in exact arithmetic. As the released
// rotate_activation (fast_hadamard_transform) does: radix-2 butterflies in f32, strides 1, 2, 4,
// ..., then one multiply by f32(n^-0.5); its bf16 rounding is the caller's (indexer.hpp).
void hadamard_transform(float* x, int64_t n);
bool is_power_of_two(int64_t n);

}  // namespace dsa
