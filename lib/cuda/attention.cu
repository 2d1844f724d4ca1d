// MQA attention (MLA's latent cache) on the GPU, over selected entries or every visible one:
// tiles of keys gathered into shared memory, q . k and p . v on the tensor cores, the softmax
// statistics in f32.
#include <mma.h>

#include "dsa/error.hpp"
#include "kernels.cuh"

namespace dsa::cuda {

namespace {

using namespace nvcuda;

// 64 query heads per block in 8 warps; keys in tiles of 32. Two passes over the selection:
// the first finds each head's softmax max and sum, the second accumulates p . v with the final
// max, so the 64 x d_v output stays in registers (16 accumulator tiles per warp) with no
// rescaling. q . k is computed twice: 1.5x the arithmetic, none of the shared-memory traffic
// of an accumulator that lives in shared memory.
constexpr int kHeads = 64;
constexpr int kKeyTile = 32;
constexpr int kWarps = 8;
constexpr int kThreads = 32 * kWarps;
constexpr int kScoreStride = kKeyTile + 4;
constexpr int kProbStride = kKeyTile + 8;
constexpr int kMaxOutputTiles = 16;  // per warp: 64 heads x 512 values / 8 warps / 256

struct Layout {
  int ld_qk;
  size_t q, kv, score, prob, stage, bytes;
  __host__ __device__ Layout(int d_qk) : ld_qk(d_qk + 8) {
    q = 0;
    kv = q + sizeof(__nv_bfloat16) * kHeads * ld_qk;
    score = kv + sizeof(__nv_bfloat16) * kKeyTile * ld_qk;
    prob = score + sizeof(float) * kHeads * kScoreStride;
    stage = prob + sizeof(__nv_bfloat16) * kHeads * kProbStride;
    bytes = stage + sizeof(float) * (kWarps * 16 * 16 + 2 * kHeads) + sizeof(int) * kKeyTile;
  }
};

__global__ void __launch_bounds__(kThreads)
    mqa_kernel(const __nv_bfloat16* __restrict__ q, const __nv_bfloat16* __restrict__ kv,
               const int32_t* __restrict__ indices, int k, int heads, int d_qk, int d_v, int keys,
               int64_t first_position, float scale, float* __restrict__ out,
               float* __restrict__ lse, AttentionBatch batch) {
  q += blockIdx.z * batch.q;
  kv += blockIdx.z * batch.kv;
  if (indices) indices += blockIdx.z * batch.indices;
  out += blockIdx.z * batch.out;
  lse += blockIdx.z * batch.lse;
  extern __shared__ __align__(128) unsigned char smem[];
  const Layout layout(d_qk);
  auto* q_s = reinterpret_cast<__nv_bfloat16*>(smem + layout.q);
  auto* kv_s = reinterpret_cast<__nv_bfloat16*>(smem + layout.kv);
  auto* score_s = reinterpret_cast<float*>(smem + layout.score);
  auto* prob_s = reinterpret_cast<__nv_bfloat16*>(smem + layout.prob);
  auto* stage = reinterpret_cast<float*>(smem + layout.stage);  // [warp][16 x 16]
  float* row_max = stage + kWarps * 256;
  float* row_sum = row_max + kHeads;
  auto* slot = reinterpret_cast<int*>(row_sum + kHeads);

  const int r = blockIdx.x, h0 = blockIdx.y * kHeads;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int ld = layout.ld_qk;
  const int chunks = d_qk / 8;
  const int64_t position = first_position + r;
  const int64_t entries = indices ? k : position + 1;

  for (int i = tid; i < kHeads * chunks; i += kThreads) {
    const int h = i / chunks, c = i % chunks;
    uint4 v = make_uint4(0, 0, 0, 0);
    if (h0 + h < heads) {
      v = reinterpret_cast<const uint4*>(q + (static_cast<int64_t>(r) * heads + h0 + h) * d_qk)[c];
    }
    reinterpret_cast<uint4*>(q_s + h * ld)[c] = v;
  }
  for (int h = tid; h < kHeads; h += kThreads) {
    row_max[h] = -INFINITY;
    row_sum[h] = 0.0f;
  }

  // Gathers tile e0 of the selection into kv_s and computes score_s = q_s . kv_s^T.
  auto load_and_score = [&](int64_t e0) {
    __syncthreads();
    for (int j = tid; j < kKeyTile; j += kThreads) {
      const int64_t e = e0 + j;
      int s = -1;
      if (e < entries) s = indices ? indices[static_cast<int64_t>(r) * k + e] : static_cast<int>(e);
      slot[j] = s;
    }
    __syncthreads();
    for (int i = tid; i < kKeyTile * chunks; i += kThreads) {
      const int j = i / chunks, c = i % chunks;
      uint4 v = make_uint4(0, 0, 0, 0);
      if (slot[j] >= 0)
        v = reinterpret_cast<const uint4*>(kv + static_cast<int64_t>(slot[j]) * d_qk)[c];
      reinterpret_cast<uint4*>(kv_s + j * ld)[c] = v;
    }
    __syncthreads();
    const int a = warp / 2, b = warp % 2;  // 4 x 2 tiles of 16 x 16, one per warp
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
    wmma::fill_fragment(acc, 0.0f);
    for (int kk = 0; kk < d_qk; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> fa;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major> fb;
      wmma::load_matrix_sync(fa, q_s + a * 16 * ld + kk, ld);
      wmma::load_matrix_sync(fb, kv_s + b * 16 * ld + kk, ld);
      wmma::mma_sync(acc, fa, fb, acc);
    }
    wmma::store_matrix_sync(score_s + a * 16 * kScoreStride + b * 16, acc, kScoreStride,
                            wmma::mem_row_major);
    __syncthreads();
  };

  // Pass 1: each head's max and sum of exp over the selection.
  for (int64_t e0 = 0; e0 < entries; e0 += kKeyTile) {
    load_and_score(e0);
    if (tid < kHeads) {
      const int h = tid;
      float m = row_max[h];
      for (int j = 0; j < kKeyTile; ++j) {
        if (slot[j] >= 0) m = fmaxf(m, score_s[h * kScoreStride + j] * scale);
      }
      if (m != -INFINITY) {
        float sum = row_sum[h] * __expf(row_max[h] - m);
        for (int j = 0; j < kKeyTile; ++j) {
          if (slot[j] >= 0) sum += __expf(score_s[h * kScoreStride + j] * scale - m);
        }
        row_sum[h] = sum;
        row_max[h] = m;
      }
    }
  }
  // Pass 2: out = sum_s exp(score - max) v_s, in registers. Warp w owns head tile w % 4 and
  // one half of the value columns (warps 0-3 the first, 4-7 the second).
  const int head_tile = warp % 4;
  const int first_half = (d_v / 16 + 1) / 2;
  const int col0 = warp < 4 ? 0 : first_half;
  const int col_tiles = warp < 4 ? first_half : d_v / 16 - first_half;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[kMaxOutputTiles];
#pragma unroll
  for (int t = 0; t < kMaxOutputTiles; ++t) wmma::fill_fragment(acc[t], 0.0f);
  for (int64_t e0 = 0; e0 < entries; e0 += kKeyTile) {
    load_and_score(e0);
    for (int i = tid; i < kHeads * kKeyTile; i += kThreads) {
      const int h = i / kKeyTile, j = i % kKeyTile;
      const float p = slot[j] >= 0 && row_max[h] != -INFINITY
                          ? __expf(score_s[h * kScoreStride + j] * scale - row_max[h])
                          : 0.0f;
      prob_s[h * kProbStride + j] = __float2bfloat16(p);
    }
    __syncthreads();
    wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> fa[kKeyTile / 16];
#pragma unroll
    for (int kk = 0; kk < kKeyTile / 16; ++kk) {
      wmma::load_matrix_sync(fa[kk], prob_s + head_tile * 16 * kProbStride + kk * 16, kProbStride);
    }
#pragma unroll
    for (int t = 0; t < kMaxOutputTiles; ++t) {
      if (t < col_tiles) {
#pragma unroll
        for (int kk = 0; kk < kKeyTile / 16; ++kk) {
          wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::row_major> fb;
          wmma::load_matrix_sync(fb, kv_s + kk * 16 * ld + (col0 + t) * 16, ld);
          wmma::mma_sync(acc[t], fa[kk], fb, acc[t]);
        }
      }
    }
  }
  // Normalize and write, one 16 x 16 tile at a time through this warp's staging area.
  float* my_stage = stage + warp * 256;
#pragma unroll
  for (int t = 0; t < kMaxOutputTiles; ++t) {
    if (t < col_tiles) {
      wmma::store_matrix_sync(my_stage, acc[t], 16, wmma::mem_row_major);
      __syncwarp();
      for (int i = lane; i < 256; i += 32) {
        const int hl = i / 16, c = i % 16;
        const int h = head_tile * 16 + hl;
        if (h0 + h < heads) {
          const float sum = row_sum[h];
          out[(static_cast<int64_t>(r) * heads + h0 + h) * d_v + (col0 + t) * 16 + c] =
              sum > 0 ? my_stage[i] / sum : 0.0f;
        }
      }
      __syncwarp();
    }
  }
  for (int h = tid; h < kHeads; h += kThreads) {
    if (h0 + h >= heads) continue;
    lse[static_cast<int64_t>(r) * heads + h0 + h] =
        row_sum[h] > 0 ? row_max[h] + __logf(row_sum[h]) : -INFINITY;
  }
}

}  // namespace

void launch_mqa_attention(const __nv_bfloat16* q, const __nv_bfloat16* kv, const int32_t* indices,
                          int k, int rows, int heads, int d_qk, int d_v, int keys,
                          int64_t first_position, float scale, float* out, float* lse,
                          cudaStream_t stream, const AttentionBatch& batch) {
  if (rows == 0 || batch.count == 0) return;
  if (d_qk % 16 != 0 || d_v % 16 != 0 || d_v > d_qk || d_qk > 576 || d_v > 512) {
    fail(ExitCode::usage,
         "the CUDA attention needs d_qk and d_v multiples of 16 with d_v <= d_qk <= 576 and d_v <= "
         "512, got {} "
         "and {}",
         d_qk, d_v);
  }
  const Layout layout(d_qk);
  check(cudaFuncSetAttribute(mqa_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(layout.bytes)),
        "cudaFuncSetAttribute(attention)");
  const dim3 grid(rows, (heads + kHeads - 1) / kHeads, batch.count);
  mqa_kernel<<<grid, kThreads, layout.bytes, stream>>>(q, kv, indices, k, heads, d_qk, d_v, keys,
                                                       first_position, scale, out, lse, batch);
  check(cudaGetLastError(), "attention kernel launch");
}

}  // namespace dsa::cuda
