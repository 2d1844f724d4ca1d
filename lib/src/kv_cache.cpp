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
  // The first row with a value that is not finite in bf16 (rows when none).
  std::atomic<int64_t> bad_row{rows};
  auto flag = [&](int64_t r) {
    int64_t seen = bad_row.load();
    while (r < seen && !bad_row.compare_exchange_weak(seen, r)) {
    }
  };
  detail::parallel_ranges(rows, kRowsPerRange, [&](int64_t begin, int64_t end) {
    std::vector<float> row(static_cast<std::size_t>(kFp8CacheDim));
    for (int64_t r = begin; r < end; ++r) {
      to_f32(kv, r * kFp8CacheDim, kFp8CacheDim, row.data());
      uint8_t* dst = packed + r * kFp8CacheBytes;
      for (int64_t tile = 0; tile < kFp8CacheTiles; ++tile) {
        float amax = 0;
        float* x = row.data() + tile * kFp8CacheTile;
        for (int64_t i = 0; i < kFp8CacheTile; ++i) {
          x[i] = round_to_bf16(x[i]);
          amax = std::max(amax, std::fabs(x[i]));
        }
        if (!std::isfinite(amax)) {
          flag(r);
          continue;
        }
        const float scale = fp8_cache_scale(amax);
        for (int64_t i = 0; i < kFp8CacheTile; ++i)
          dst[tile * kFp8CacheTile + i] = f32_to_e4m3(x[i] / scale);
        std::memcpy(dst + kFp8CacheScales + 4 * tile, &scale, 4);
      }
      for (int64_t i = 0; i < kFp8CacheRope; ++i) {
        const float x = row[kFp8CacheLatent + i];
        if (!std::isfinite(round_to_bf16(x))) flag(r);
        const uint16_t bits = f32_to_bf16(x);
        std::memcpy(dst + kFp8CacheRopeOffset + 2 * i, &bits, 2);
      }
    }
  });
  if (bad_row.load() < rows) {
    bad_input(
        "{} (kv): row {} has a value that is not finite in bf16; the fp8 cache needs finite "
        "values",
        kv.name, bad_row.load());
  }
  return out;
}

void dequantize_kv_cache_fp8(const Tensor& t, int64_t row, int64_t rows, float* out) {
  const auto* packed = reinterpret_cast<const uint8_t*>(t.data) + row * kFp8CacheBytes;
  detail::parallel_ranges(rows, kRowsPerRange, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const uint8_t* src = packed + r * kFp8CacheBytes;
      float* dst = out + r * kFp8CacheDim;
      for (int64_t tile = 0; tile < kFp8CacheTiles; ++tile) {
        float scale;
        std::memcpy(&scale, src + kFp8CacheScales + 4 * tile, 4);
        for (int64_t i = tile * kFp8CacheTile; i < (tile + 1) * kFp8CacheTile; ++i)
          dst[i] = round_to_bf16(e4m3_to_f32(src[i]) * scale);
      }
      for (int64_t i = 0; i < kFp8CacheRope; ++i) {
        uint16_t bits;
        std::memcpy(&bits, src + kFp8CacheRopeOffset + 2 * i, 2);
        dst[kFp8CacheLatent + i] = bf16_to_f32(bits);
      }
    }
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
