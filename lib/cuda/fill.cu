// Device buffers filled with random-looking values, the same on every run: the inputs of the
// timed layers (layer_timing.cu) and of bench/'s rows. Declared in kernels.cuh.
#include <cuda_bf16.h>
#include <cuda_fp8.h>

#include "kernels.cuh"

namespace dsa::cuda {

namespace {

constexpr int kFillBlocks = 1024, kFillThreads = 256;

// A hash of (i, seed) mapped to [-1, 1): random-looking inputs, the same on every run.
__device__ float uniform(int64_t i, uint32_t seed) {
  uint32_t h = static_cast<uint32_t>(i) * 2654435761u ^ seed;
  h ^= h >> 15;
  h *= 2246822519u;
  h ^= h >> 13;
  return (h & 0xffff) / 32768.0f - 1.0f;
}

__global__ void fill_bf16_kernel(__nv_bfloat16* x, int64_t n, uint32_t seed, float amplitude) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    x[i] = __float2bfloat16(amplitude * uniform(i, seed));
}

// e4m3 codes of amplitude * uniform(-1, 1): what fp8 block quantization gives for amplitude 448.
__global__ void fill_e4m3_kernel(uint8_t* x, int64_t n, uint32_t seed, float amplitude) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    x[i] = __nv_fp8_e4m3(amplitude * uniform(i, seed)).__x;
}

// bf16 values uniform(-1, 1) held in f32: an activation as the compressor's f32 projection reads
// it.
__global__ void fill_bf16_as_f32_kernel(float* x, int64_t n, uint32_t seed) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    x[i] = __bfloat162float(__float2bfloat16(uniform(i, seed)));
}

__global__ void fill_f32_kernel(float* x, int64_t n, float value) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    x[i] = value;
}

// n rows of FlashMLA's fp8 cache (dsa/kv_cache.hpp, 656 bytes each): e4m3 codes of 448 *
// uniform(-1, 1), the four scales 2^-8 (so values of about the bf16 rows' amplitude, 1.75), the
// 64 rope values bf16 uniform(-1, 1).
__global__ void fill_fp8_cache_kernel(uint8_t* x, int64_t n, uint32_t seed) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n * 656;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = i / 656;
    const int b = static_cast<int>(i % 656);
    if (b < 512) {
      x[i] = __nv_fp8_e4m3(448.0f * uniform(i, seed)).__x;
    } else if (b < 528) {
      x[i] = static_cast<uint8_t>(0x3b800000u >> (8 * ((b - 512) % 4)));  // 2^-8, little-endian
    } else {
      const int e = (b - 528) / 2;
      const __nv_bfloat16 v = __float2bfloat16(uniform(row * 64 + e, seed + 1));
      x[i] = static_cast<uint8_t>(*reinterpret_cast<const uint16_t*>(&v) >> (8 * ((b - 528) % 2)));
    }
  }
}

// n rows of DeepSeek-V4's fp8 cache (dsa/kv_cache.hpp, 584 bytes each): e4m3 codes of 448 *
// uniform(-1, 1), the 64 rope values bf16 uniform(-1, 1), the seven scale bytes 2^-8, a zero.
__global__ void fill_v4_fp8_cache_kernel(uint8_t* x, int64_t n, uint32_t seed) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n * 584;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = i / 584;
    const int b = static_cast<int>(i % 584);
    if (b < 448) {
      x[i] = __nv_fp8_e4m3(448.0f * uniform(i, seed)).__x;
    } else if (b < 576) {
      const int e = (b - 448) / 2;
      const __nv_bfloat16 v = __float2bfloat16(uniform(row * 64 + e, seed + 1));
      x[i] = static_cast<uint8_t>(*reinterpret_cast<const uint16_t*>(&v) >> (8 * ((b - 448) % 2)));
    } else {
      x[i] = b < 583 ? 127 - 8 : 0;
    }
  }
}

}  // namespace

void fill_bf16(__nv_bfloat16* x, int64_t n, uint32_t seed, float amplitude, cudaStream_t stream) {
  fill_bf16_kernel<<<kFillBlocks, kFillThreads, 0, stream>>>(x, n, seed, amplitude);
}
void fill_e4m3(uint8_t* x, int64_t n, uint32_t seed, float amplitude, cudaStream_t stream) {
  fill_e4m3_kernel<<<kFillBlocks, kFillThreads, 0, stream>>>(x, n, seed, amplitude);
}
void fill_bf16_as_f32(float* x, int64_t n, uint32_t seed, cudaStream_t stream) {
  fill_bf16_as_f32_kernel<<<kFillBlocks, kFillThreads, 0, stream>>>(x, n, seed);
}
void fill_f32(float* x, int64_t n, float value, cudaStream_t stream) {
  fill_f32_kernel<<<kFillBlocks, kFillThreads, 0, stream>>>(x, n, value);
}
void fill_fp8_cache(uint8_t* x, int64_t n, uint32_t seed, cudaStream_t stream) {
  fill_fp8_cache_kernel<<<kFillBlocks, kFillThreads, 0, stream>>>(x, n, seed);
}

void fill_v4_fp8_cache(uint8_t* x, int64_t n, uint32_t seed, cudaStream_t stream) {
  fill_v4_fp8_cache_kernel<<<kFillBlocks, kFillThreads, 0, stream>>>(x, n, seed);
}

}  // namespace dsa::cuda
