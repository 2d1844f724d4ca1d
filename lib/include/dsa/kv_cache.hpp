// FlashMLA's fp8 caches (docs/DESIGN.md section 7). DeepSeek-V3.2's sparse attention
// ("V32_FP8Sparse"): per token 656 bytes, the 512 latent values as e4m3 codes in 4 tiles of 128
// with one f32 power-of-two scale per tile, then the 64 rope values in bf16; the attention reads it
// in place of a bf16 latent cache (1152 bytes a token). DeepSeek-V4's ("MODEL1_FP8Sparse"): per
// token 584 bytes, the 448 non-RoPE values of a 512-wide entry as e4m3 codes in 7 tiles of 64 with
// one ue8m0 scale byte per tile, the 64 RoPE values in bf16; the V4 attention reads its window and
// its compressed entries from it (1024 bytes a token in bf16). Keys and values are the
// dequantized rows, code x scale, exact in bf16.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "dsa/attention.hpp"
#include "dsa/tensor.hpp"

namespace dsa {

inline constexpr int64_t kFp8CacheLatent = 512;  // e4m3 values, bytes [0, 512)
inline constexpr int64_t kFp8CacheTile = 128;    // values per scale
inline constexpr int64_t kFp8CacheTiles = kFp8CacheLatent / kFp8CacheTile;
inline constexpr int64_t kFp8CacheRope = 64;                 // bf16 values, bytes [528, 656)
inline constexpr int64_t kFp8CacheScales = kFp8CacheLatent;  // 4 f32 scales, bytes [512, 528)
inline constexpr int64_t kFp8CacheRopeOffset = kFp8CacheScales + 4 * kFp8CacheTiles;
inline constexpr int64_t kFp8CacheBytes = kFp8CacheRopeOffset + 2 * kFp8CacheRope;  // 656
inline constexpr int64_t kFp8CacheDim = kFp8CacheLatent + kFp8CacheRope;            // 576

// The latent cache an attention reads: bf16 rows (the model's own cache) or FlashMLA's fp8.
enum class KvCache { bf16, fp8 };
KvCache parse_kv_cache(const std::string& text);  // "bf16", "fp8"; else Error(usage)
std::string kv_cache_name(KvCache cache);

// A tile's scale as FlashMLA's quantize_k_cache computes it: amax / 448 in f32, clamped below
// at 1e-4, rounded up to a power of two (2^ceil(log2), here read off the bits, exactly).
float fp8_cache_scale(float amax);

// kv [B?, L, 576] (any floating dtype) to the fp8 cache u8 [B?, L, 656], named `<kv>:fp8`: each
// value first rounded to bf16 (the cache FlashMLA quantizes is bf16), each latent tile as e4m3
// codes of value / scale (round to nearest even), the rope values kept in bf16. Error(bad_input)
// for another shape.
Tensor quantize_kv_cache_fp8(const Tensor& kv);

// Whether t is an fp8 cache: u8 with a last dimension of 656.
bool is_fp8_kv_cache(const Tensor& t);

// Rows [row, row + rows) of an fp8 cache t (counted over all of its leading dimensions)
// dequantized into out [rows, 576]: code x scale rounded to bf16 (exact for the power-of-two
// scales this library writes), then the rope values.
void dequantize_kv_cache_fp8(const Tensor& t, int64_t row, int64_t rows, float* out);

// DeepSeek-V4's cache, as this library stores it: a u8 row of 584 bytes per token or entry,
// [0, 448) the e4m3 codes, [448, 576) the 64 RoPE values in bf16, [576, 583) the 7 tiles'
// ue8m0 scales (2^(byte - 127)), [583] zero. These are the bytes FlashMLA keeps for a token of
// its MODEL1_FP8Sparse layout, whose pages of 64 tokens group the tokens' [0, 576) first and
// their 8 scale bytes after them; here a token's bytes are contiguous, [B?, N, 584].
inline constexpr int64_t kV4CacheDim = 512;   // values of an entry (K = V)
inline constexpr int64_t kV4CacheNope = 448;  // e4m3 values, bytes [0, 448)
inline constexpr int64_t kV4CacheTile = 64;   // values per scale
inline constexpr int64_t kV4CacheTiles = kV4CacheNope / kV4CacheTile;  // 7
inline constexpr int64_t kV4CacheRope = 64;                            // bf16, bytes [448, 576)
inline constexpr int64_t kV4CacheRopeOffset = kV4CacheNope;
inline constexpr int64_t kV4CacheScales = kV4CacheRopeOffset + 2 * kV4CacheRope;  // 576
inline constexpr int64_t kV4CacheBytes = kV4CacheScales + kV4CacheTiles + 1;      // 584

// rows [B?, N, 512] (any floating dtype) to the V4 cache u8 [B?, N, 584], named `<rows>:fp8`,
// as FlashMLA's quantize_k_cache does for MODEL1: each value rounded to bf16, each tile of 64
// non-RoPE values as e4m3 codes of value / scale with scale = fp8_cache_scale(tile amax) (a power
// of two), the RoPE values kept in bf16. Values the released model already quantized (its
// act_quant in blocks of 64 with ue8m0 scales) come back unchanged, but for a tile whose amax is
// below 448e-4, where the clamp gives a larger scale. Error(bad_input) for another shape or a
// value not finite in bf16.
Tensor quantize_v4_cache_fp8(const Tensor& rows);

// Whether t is a V4 fp8 cache: u8 with a last dimension of 584.
bool is_v4_fp8_cache(const Tensor& t);

// Rows [row, row + rows) of a V4 cache (counted over all of its leading dimensions) dequantized
// into out [rows, 512]: code x scale rounded to bf16, then the RoPE values.
void dequantize_v4_cache_fp8(const Tensor& t, int64_t row, int64_t rows, float* out);

// The fp8 cache of an attention's latent kv and the same queries over it (`inputs` points into
// `cache`, so the pair lives on the heap).
struct Fp8CacheAttention {
  Tensor cache;
  AttentionInputs inputs;
};
// With `cache` fp8 and inputs that read a floating latent kv: its fp8 cache and the attention
// over it; null with bf16, or when the inputs read an fp8 cache already. Error(usage) for MHA
// inputs (the cache holds MLA's latent rows).
std::unique_ptr<Fp8CacheAttention> fp8_cache_attention(const AttentionInputs& in, KvCache cache);

}  // namespace dsa
