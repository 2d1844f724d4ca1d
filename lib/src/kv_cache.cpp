#include "dsa/kv_cache.hpp"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <vector>

#include "chunks.hpp"
#include "dsa/error.hpp"
#include "dsa/precision.hpp"

namespace dsa {

namespace {

// Rows per parallel range of the conversions.
constexpr int64_t kRowsPerRange = 1024;

}  // namespace

KvCache parse_kv_cache(const std::string& text) {
  if (text == "bf16") return KvCache::bf16;
  if (text == "fp8") return KvCache::fp8;
  bad_usage("kv cache: expected bf16 or fp8, got '{}'", text);
}

std::string kv_cache_name(KvCache cache) {
  return cache == KvCache::fp8 ? "fp8" : "bf16";
}

float fp8_cache_scale(float amax) {
  return round_up_to_power_of_two(std::max(amax / kE4M3Max, 1e-4f));
}

bool is_fp8_kv_cache(const Tensor& t) {
  return t.dtype == DType::u8 && t.rank() >= 1 && t.shape.back() == kFp8CacheBytes;
}

bool is_v4_fp8_cache(const Tensor& t) {
  return t.dtype == DType::u8 && t.rank() >= 1 && t.shape.back() == kV4CacheBytes;
}

namespace {

// The first row with a value that is not finite in bf16, kept across a parallel loop.
class BadRow {
 public:
  explicit BadRow(int64_t rows) : rows_(rows), row_(rows) {}
  void flag(int64_t r) {
    int64_t seen = row_.load();
    while (r < seen && !row_.compare_exchange_weak(seen, r)) {
    }
  }
  // Error(bad_input) naming the row, when one was flagged.
  void check(const Tensor& t, const char* what) const {
    if (row_.load() < rows_) {
      bad_input(
          "{} ({}): row {} has a value that is not finite in bf16; the fp8 cache needs "
          "finite values",
          t.name, what, row_.load());
    }
  }

 private:
  int64_t rows_;
  std::atomic<int64_t> row_;
};

// Tiles of `tile` values of one row, rounded to bf16 in place, to e4m3 codes of FlashMLA's
// power-of-two scales: the scale of each tile to `scale_out`. False for a non-finite value.
template <typename Store>
bool quantize_tiles(float* x, int64_t tiles, int64_t tile, uint8_t* codes, Store store_scale) {
  bool finite = true;
  for (int64_t t = 0; t < tiles; ++t) {
    float amax = 0;
    float* v = x + t * tile;
    for (int64_t i = 0; i < tile; ++i) {
      v[i] = round_to_bf16(v[i]);
      amax = std::max(amax, std::fabs(v[i]));
    }
    if (!std::isfinite(amax)) {
      finite = false;
      continue;
    }
    const float scale = fp8_cache_scale(amax);
    for (int64_t i = 0; i < tile; ++i) codes[t * tile + i] = f32_to_e4m3(v[i] / scale);
    store_scale(t, scale);
  }
  return finite;
}

// The RoPE values of a row as bf16 bits at dst; false for one not finite in bf16.
bool store_rope(const float* x, int64_t n, uint8_t* dst) {
  bool finite = true;
  for (int64_t i = 0; i < n; ++i) {
    if (!std::isfinite(round_to_bf16(x[i]))) finite = false;
    const uint16_t bits = f32_to_bf16(x[i]);
    std::memcpy(dst + 2 * i, &bits, 2);
  }
  return finite;
}

// A ue8m0 scale byte: 2^(byte - 127); 255 is NaN.
float ue8m0_to_f32(uint8_t byte) {
  return byte == 255 ? std::nanf("") : std::ldexp(1.0f, static_cast<int>(byte) - 127);
}

float rope_value(const uint8_t* src, int64_t i) {
  uint16_t bits;
  std::memcpy(&bits, src + 2 * i, 2);
  return bf16_to_f32(bits);
}

}  // namespace

Tensor quantize_kv_cache_fp8(const Tensor& kv) {
  if (!is_floating(kv.dtype) || kv.rank() < 2 || kv.shape.back() != kFp8CacheDim) {
    bad_input("{} (kv): the fp8 cache quantizes a floating latent cache [B?, L, {}], got {} {}",
              kv.name, kFp8CacheDim, dtype_name(kv.dtype), shape_string(kv.shape));
  }
  Shape shape = kv.shape;
  shape.back() = kFp8CacheBytes;
  Tensor out = make_tensor(DType::u8, shape, kv.name + ":fp8");
  const int64_t rows = kv.numel() / kFp8CacheDim;
  uint8_t* packed = mutable_data<uint8_t>(out);
  BadRow bad(rows);
  detail::parallel_ranges(rows, kRowsPerRange, [&](int64_t begin, int64_t end) {
    std::vector<float> row(static_cast<std::size_t>(kFp8CacheDim));
    for (int64_t r = begin; r < end; ++r) {
      to_f32(kv, r * kFp8CacheDim, kFp8CacheDim, row.data());
      uint8_t* dst = packed + r * kFp8CacheBytes;
      const bool finite = quantize_tiles(row.data(), kFp8CacheTiles, kFp8CacheTile, dst,
                                         [&](int64_t tile, float scale) {
                                           std::memcpy(dst + kFp8CacheScales + 4 * tile, &scale, 4);
                                         });
      if (!store_rope(row.data() + kFp8CacheLatent, kFp8CacheRope, dst + kFp8CacheRopeOffset) ||
          !finite) {
        bad.flag(r);
      }
    }
  });
  bad.check(kv, "kv");
  return out;
}

Tensor quantize_v4_cache_fp8(const Tensor& t) {
  if (!is_floating(t.dtype) || t.rank() < 2 || t.shape.back() != kV4CacheDim) {
    bad_input("{}: the V4 fp8 cache quantizes floating entries [B?, N, {}], got {} {}", t.name,
              kV4CacheDim, dtype_name(t.dtype), shape_string(t.shape));
  }
  Shape shape = t.shape;
  shape.back() = kV4CacheBytes;
  Tensor out = make_tensor(DType::u8, shape, t.name + ":fp8");
  const int64_t rows = t.numel() / kV4CacheDim;
  uint8_t* packed = mutable_data<uint8_t>(out);
  BadRow bad(rows);
  detail::parallel_ranges(rows, kRowsPerRange, [&](int64_t begin, int64_t end) {
    std::vector<float> row(static_cast<std::size_t>(kV4CacheDim));
    for (int64_t r = begin; r < end; ++r) {
      to_f32(t, r * kV4CacheDim, kV4CacheDim, row.data());
      uint8_t* dst = packed + r * kV4CacheBytes;
      const bool finite = quantize_tiles(
          row.data(), kV4CacheTiles, kV4CacheTile, dst, [&](int64_t tile, float scale) {
            dst[kV4CacheScales + tile] = static_cast<uint8_t>(std::ilogb(scale) + 127);
          });
      dst[kV4CacheBytes - 1] = 0;
      if (!store_rope(row.data() + kV4CacheNope, kV4CacheRope, dst + kV4CacheRopeOffset) ||
          !finite) {
        bad.flag(r);
      }
    }
  });
  bad.check(t, "entries");
  return out;
}

namespace {

// An fp8 cache format's row, as the shared dequantization reads it: `tiles` tiles of `tile` e4m3
// codes from byte 0, each times its scale (scale(src, tile)), then `rope` bf16 values at byte
// rope_offset, the values `dim` floats a row.
struct Fp8RowFormat {
  int64_t bytes, dim, tiles, tile, rope, rope_offset;
};

// Rows [row, row + rows) of t in `format` into out (rows x dim floats): codes times their tile's
// scale, rounded to bf16 as the kernels' tiles hold them, and the rope values as stored.
template <typename Scale>
void dequantize_fp8_rows(const Fp8RowFormat& format, const Tensor& t, int64_t row, int64_t rows,
                         float* out, Scale scale) {
  const auto* packed = reinterpret_cast<const uint8_t*>(t.data) + row * format.bytes;
  const int64_t latent = format.tiles * format.tile;
  detail::parallel_ranges(rows, kRowsPerRange, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const uint8_t* src = packed + r * format.bytes;
      float* dst = out + r * format.dim;
      for (int64_t tile = 0; tile < format.tiles; ++tile) {
        const float s = scale(src, tile);
        for (int64_t i = tile * format.tile; i < (tile + 1) * format.tile; ++i)
          dst[i] = round_to_bf16(e4m3_to_f32(src[i]) * s);
      }
      for (int64_t i = 0; i < format.rope; ++i) {
        dst[latent + i] = rope_value(src + format.rope_offset, i);
      }
    }
  });
}

}  // namespace

void dequantize_v4_cache_fp8(const Tensor& t, int64_t row, int64_t rows, float* out) {
  constexpr Fp8RowFormat kV4{kV4CacheBytes, kV4CacheDim,  kV4CacheTiles,
                             kV4CacheTile,  kV4CacheRope, kV4CacheRopeOffset};
  static_assert(kV4CacheTiles * kV4CacheTile == kV4CacheNope, "the rope values follow the codes");
  dequantize_fp8_rows(kV4, t, row, rows, out, [](const uint8_t* src, int64_t tile) {
    return ue8m0_to_f32(src[kV4CacheScales + tile]);
  });
}

void dequantize_kv_cache_fp8(const Tensor& t, int64_t row, int64_t rows, float* out) {
  constexpr Fp8RowFormat kV32{kFp8CacheBytes, kFp8CacheDim,  kFp8CacheTiles,
                              kFp8CacheTile,  kFp8CacheRope, kFp8CacheRopeOffset};
  dequantize_fp8_rows(kV32, t, row, rows, out, [](const uint8_t* src, int64_t tile) {
    float scale;
    std::memcpy(&scale, src + kFp8CacheScales + 4 * tile, 4);
    return scale;
  });
}

std::unique_ptr<Fp8CacheAttention> fp8_cache_attention(const AttentionInputs& in, KvCache cache) {
  if (cache != KvCache::fp8 || in.fp8_cache) return nullptr;
  if (!in.latent) bad_usage("the fp8 cache quantizes MLA's latent kv, not MHA's k and v");
  auto out = std::make_unique<Fp8CacheAttention>();
  out->cache = quantize_kv_cache_fp8(*in.k);
  out->inputs = make_mqa_inputs(*in.q, out->cache, in.d_v);
  return out;
}

}  // namespace dsa
