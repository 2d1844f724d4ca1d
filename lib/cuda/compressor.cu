// DeepSeek-V4's compressor on the GPU after its projections (compressor.hpp, DESIGN.md section 6):
// one block per entry, one thread per channel: the gated softmax over the entry's slots, RMSNorm,
// RoPE at the entry's first token and the cache's quantization in one kernel, each step the CPU's
// arithmetic in the CPU's order (no fused multiply-adds, the shared roundings of rounding.hpp), so
// that the two differ only where their f32 projections do.
#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <fmt/format.h>

#include "kernels.cuh"
#include "rounding.hpp"

namespace dsa::cuda {

namespace {

// exp and the RoPE angles through double, rounded once to f32: what the host's libm gives.
__device__ __forceinline__ float exp_f32(float x) {
  return static_cast<float>(exp(static_cast<double>(x)));
}

// The sum over the block of one double per thread (blockDim.x a multiple of 32, at most 1024).
__device__ double block_sum(double v, double* scratch) {
  for (int m = 16; m > 0; m /= 2) v += __shfl_xor_sync(0xffffffffu, v, m);
  const int warp = threadIdx.x / 32, warps = blockDim.x / 32;
  __syncthreads();  // scratch is free
  if (threadIdx.x % 32 == 0) scratch[warp] = v;
  __syncthreads();
  double total = 0;
  for (int w = 0; w < warps; ++w) total += scratch[w];  // the same order in every thread
  return total;
}

__global__ void __launch_bounds__(1024)
    compressor_kernel(const __grid_constant__ CompressorParams p) {
  extern __shared__ float x_s[];  // [dim]
  __shared__ double scratch[32];
  __shared__ float amax_s[32];
  const int e = threadIdx.x, d = p.dim, m = p.ratio;
  const int width = p.overlap ? 2 * d : d, half = p.overlap ? d : 0;
  const int64_t j = p.first_entry + blockIdx.x;
  // The entry's slots: with overlap (and j > 0) the previous window's first halves, ape rows
  // 0 .. m-1, then its own window's second halves (its only slots without overlap).
  const bool previous = p.overlap && j > 0;
  auto slot = [&](int i, float& value) {
    const bool own = !previous || i >= m;
    const int r = own ? i - (previous ? m : 0) : i;
    const int64_t s = (own ? m * j : m * (j - 1)) + r - p.token0;
    const int c = (own ? half : 0) + e;
    value = p.kv[s * width + c];
    return __fadd_rn(p.score[s * width + c], p.ape[r * width + c]);
  };
  const int slots = (previous ? 2 : 1) * m;
  float top = -INFINITY, value;
  for (int i = 0; i < slots; ++i) top = fmaxf(top, slot(i, value));
  float total = 0.0f;
  for (int i = 0; i < slots; ++i) total = __fadd_rn(total, exp_f32(__fsub_rn(slot(i, value), top)));
  float pooled = 0.0f;
  for (int i = 0; i < slots; ++i) {
    const float weight = exp_f32(__fsub_rn(slot(i, value), top));
    pooled = __fadd_rn(pooled, __fmul_rn(value, __fdiv_rn(weight, total)));
  }
  float x = p.rounds ? detail::bf16_round(pooled) : pooled;  // kv.to(dtype)
  // RMSNorm in f32 with the mean of squares summed in double, as the CPU does.
  const double squares = block_sum(static_cast<double>(x) * x, scratch);
  const float mean = static_cast<float>(squares / static_cast<double>(d));
  const float inverse = __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(mean, p.eps)));
  x = __fmul_rn(p.norm[e], __fmul_rn(x, inverse));
  if (p.rounds) x = detail::bf16_round(x);
  x_s[e] = x;
  __syncthreads();
  // RoPE at the window's first token m j, in interleaved pairs over the last rope_dims dims.
  const int rope0 = d - p.rope_dims;
  if (e >= rope0 && (e - rope0) % 2 == 0) {
    const float angle = __fmul_rn(static_cast<float>(m * j), p.frequencies[(e - rope0) / 2]);
    const float c = static_cast<float>(cos(static_cast<double>(angle)));
    const float s = static_cast<float>(sin(static_cast<double>(angle)));
    const float a = x_s[e], b = x_s[e + 1];
    float r0 = __fsub_rn(__fmul_rn(a, c), __fmul_rn(b, s));
    float r1 = __fadd_rn(__fmul_rn(a, s), __fmul_rn(b, c));
    if (p.rounds) r0 = detail::bf16_round(r0), r1 = detail::bf16_round(r1);
    x_s[e] = r0, x_s[e + 1] = r1;
  }
  __syncthreads();
  x = x_s[e];
  if (p.quantizes && p.indexer) {
    __syncthreads();  // every thread has read its x before the butterflies overwrite them
    // rotate_activation: radix-2 butterflies in f32, strides 1, 2, 4, ..., then f32(d^-1/2),
    // bf16; then e2m1 in blocks of 32 (one warp each) with ue8m0 scales.
    for (int stride = 1; stride < d; stride *= 2) {
      if ((e & stride) == 0) {
        const float a = x_s[e], b = x_s[e + stride];
        x_s[e] = __fadd_rn(a, b);
        x_s[e + stride] = __fsub_rn(a, b);
      }
      __syncthreads();
    }
    const float scale = static_cast<float>(1.0 / sqrt(static_cast<double>(d)));
    x = detail::bf16_round(__fmul_rn(x_s[e], scale));
    float amax = x == x ? ::fabsf(x) : 0.0f;  // the CPU's std::max passes NaN over
    for (int w = 16; w > 0; w /= 2) {
      const float other = __shfl_xor_sync(0xffffffffu, amax, w);
      amax = amax < other ? other : amax;
    }
    const float block_scale = detail::e2m1_block_scale(amax);
    x = __fmul_rn(detail::e2m1_nearest(__fdiv_rn(x, block_scale)), block_scale);
  } else if (p.quantizes) {
    // act_quant of the non-RoPE dims: e4m3 in blocks of 64 (two warps, rope0 a multiple of 64)
    // with ue8m0 scales; the RoPE dims stay bf16.
    float amax = e < rope0 ? ::fabsf(x) : 0.0f;
    for (int w = 16; w > 0; w /= 2) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, w));
    if (e % 32 == 0) amax_s[e / 32] = amax;
    __syncthreads();
    if (e < rope0) {
      const float block_scale =
          detail::e4m3_block_scale(fmaxf(amax_s[e / 64 * 2], amax_s[e / 64 * 2 + 1]), true);
      x = __fmul_rn(detail::e4m3_round(__fdiv_rn(x, block_scale)), block_scale);
    }
  }
  const int64_t at = static_cast<int64_t>(blockIdx.x) * d + e;
  if (p.out) p.out[at] = x;
  if (p.out_bf16) p.out_bf16[at] = __float2bfloat16_rn(x);
  if (p.out_codes) {
    // The entry as the fp8 indexer's key: e4m3 codes of one power-of-two scale for the whole
    // entry (fp8_quantize_block's ue8m0 scale, amax over every channel).
    float amax = ::fabsf(x);
    for (int w = 16; w > 0; w /= 2) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, w));
    __syncthreads();  // amax_s is free
    if (e % 32 == 0) amax_s[e / 32] = amax;
    __syncthreads();
    amax = 0.0f;
    for (int w = 0; w < d / 32; ++w) amax = fmaxf(amax, amax_s[w]);
    const float scale = detail::e4m3_block_scale(amax, true);
    p.out_codes[at] = __nv_cvt_float_to_fp8(__fdiv_rn(x, scale), __NV_SATFINITE, __NV_E4M3);
    if (e == 0) p.out_scales[blockIdx.x] = scale;
  }
}

}  // namespace

std::string compressor_limit(int dim, int rope_dims, bool hadamard) {
  if (dim < 32 || dim > 1024 || dim % 64 != 0) {
    return fmt::format("the CUDA compressor needs d a multiple of 64 from 64 to 1024, got {}", dim);
  }
  if (rope_dims % 2 != 0 || rope_dims > dim) {
    return fmt::format("the CUDA compressor needs an even RoPE width up to d, got {}", rope_dims);
  }
  if (hadamard && (dim & (dim - 1)) != 0) {
    return fmt::format("the CUDA indexer compressor's Hadamard needs d a power of two, got {}",
                       dim);
  }
  return "";
}

void launch_compressor(const CompressorParams& p) {
  if (p.entries == 0) return;
  require(compressor_limit(p.dim, p.rope_dims, p.indexer && p.quantizes));
  compressor_kernel<<<p.entries, p.dim, p.dim * sizeof(float), p.stream>>>(p);
  check(cudaGetLastError(), "compressor kernel launch");
}

}  // namespace dsa::cuda
