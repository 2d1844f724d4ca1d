// The lightning indexer on the GPU (Eq. 1).
#include <cuda_pipeline.h>
#include <mma.h>

#include <algorithm>

#include "dsa/error.hpp"
#include "kernels.cuh"

namespace dsa::cuda {

namespace {

using namespace nvcuda;

constexpr int kRows = 128;     // (query, head) rows per block: 128 / H queries
constexpr int kKeyTile = 64;   // keys per step
constexpr int kThreads = 128;  // 4 warps, 32 rows each
constexpr int kLogitStride = kKeyTile + 4;

__global__ void __launch_bounds__(kThreads)
    indexer_bf16_kernel(const __nv_bfloat16* __restrict__ q, const float* __restrict__ w,
                        const __nv_bfloat16* __restrict__ k, const float* __restrict__ k_scale,
                        int rows, int heads, int dim, int keys, int64_t first_position,
                        float* __restrict__ scores, int64_t stride, IndexerBatch batch,
                        int key_span) {
  q += blockIdx.z * batch.q;
  w += blockIdx.z * batch.w;
  k += blockIdx.z * batch.k;
  k_scale += blockIdx.z * batch.k_scale;
  scores += blockIdx.z * batch.scores;
  extern __shared__ __align__(128) unsigned char smem[];
  const int ld = dim + 8;  // bf16 row stride in shared memory (a multiple of 8, off the banks)
  auto* q_s = reinterpret_cast<__nv_bfloat16*>(smem);
  auto* k_buffers = q_s + kRows * ld;  // two key tiles: one computed on, one arriving
  auto* logits = reinterpret_cast<float*>(k_buffers + 2 * kKeyTile * ld);
  auto* w_s = logits + kRows * kLogitStride;
  auto* scale_buffers = w_s + kRows;

  const int queries_per_block = kRows / heads;
  const int q0 = blockIdx.x * queries_per_block;
  const int q_end = min(rows, q0 + queries_per_block);
  const int tid = threadIdx.x, warp = tid / 32;
  const int chunks = dim / 8;  // 16-byte pieces of a row

  for (int i = tid; i < kRows * chunks; i += kThreads) {
    const int row = i / chunks, c = i % chunks;
    const int query = q0 + row / heads;
    uint4 v = make_uint4(0, 0, 0, 0);
    if (query < q_end) {
      v = reinterpret_cast<const uint4*>(q + (static_cast<int64_t>(query) * heads + row % heads) *
                                                 dim)[c];
    }
    reinterpret_cast<uint4*>(q_s + row * ld)[c] = v;
  }
  for (int row = tid; row < kRows; row += kThreads) {
    const int query = q0 + row / heads;
    w_s[row] = query < q_end ? w[static_cast<int64_t>(query) * heads + row % heads] : 0.0f;
  }
  // This block's share of the keys: [key_begin, key_end).
  const int64_t key_begin = static_cast<int64_t>(blockIdx.y) * key_span;
  const int64_t key_end = min(static_cast<int64_t>(keys), key_begin + key_span);
  const int64_t visible_end = min(key_end, first_position + q_end);
  // Starts copying key tile s0 into buffer `buffer` (cp.async; zeros past the last key).
  auto fetch = [&](int64_t s0, int buffer) {
    __nv_bfloat16* k_s = k_buffers + buffer * kKeyTile * ld;
    for (int i = tid; i < kKeyTile * chunks; i += kThreads) {
      const int row = i / chunks, c = i % chunks;
      const int64_t s = s0 + row;
      if (s < keys) {
        __pipeline_memcpy_async(reinterpret_cast<uint4*>(k_s + row * ld) + c,
                                reinterpret_cast<const uint4*>(k + s * dim) + c, 16);
      } else {
        reinterpret_cast<uint4*>(k_s + row * ld)[c] = make_uint4(0, 0, 0, 0);
      }
    }
    for (int j = tid; j < kKeyTile; j += kThreads) {
      scale_buffers[buffer * kKeyTile + j] = s0 + j < keys ? k_scale[s0 + j] : 0.0f;
    }
    __pipeline_commit();
  };
  if (key_begin < visible_end) fetch(key_begin, 0);
  for (int64_t s0 = key_begin, tile = 0; s0 < visible_end; s0 += kKeyTile, ++tile) {
    const int buffer = tile % 2;
    const __nv_bfloat16* k_s = k_buffers + buffer * kKeyTile * ld;
    const float* scale_s = scale_buffers + buffer * kKeyTile;
    // The other buffer was last read before the previous iteration's final barrier.
    if (s0 + kKeyTile < visible_end) {
      fetch(s0 + kKeyTile, 1 - buffer);
      __pipeline_wait_prior(1);
    } else {
      __pipeline_wait_prior(0);
    }
    __syncthreads();
    // logits [128 rows, 64 keys] = q_s . k_s^T; warp w owns rows 32w .. 32w + 31.
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][4];
    for (int a = 0; a < 2; ++a)
      for (int b = 0; b < 4; ++b) wmma::fill_fragment(acc[a][b], 0.0f);
    for (int kk = 0; kk < dim; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> fa[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major> fb[4];
      for (int a = 0; a < 2; ++a)
        wmma::load_matrix_sync(fa[a], q_s + (warp * 32 + a * 16) * ld + kk, ld);
      for (int b = 0; b < 4; ++b) wmma::load_matrix_sync(fb[b], k_s + (b * 16) * ld + kk, ld);
      for (int a = 0; a < 2; ++a)
        for (int b = 0; b < 4; ++b) wmma::mma_sync(acc[a][b], fa[a], fb[b], acc[a][b]);
    }
    for (int a = 0; a < 2; ++a)
      for (int b = 0; b < 4; ++b)
        wmma::store_matrix_sync(logits + (warp * 32 + a * 16) * kLogitStride + b * 16, acc[a][b],
                                kLogitStride, wmma::mem_row_major);
    __syncthreads();
    // Weighted ReLU sum over the heads of each query.
    for (int i = tid; i < (q_end - q0) * kKeyTile; i += kThreads) {
      const int local = i / kKeyTile, key = i % kKeyTile;
      const int64_t s = s0 + key;
      if (s >= visible_end) continue;
      const int64_t position = first_position + q0 + local;
      float sum = 0.0f;
      for (int j = 0; j < heads; ++j) {
        const int row = local * heads + j;
        sum += w_s[row] * fmaxf(logits[row * kLogitStride + key], 0.0f);
      }
      scores[(q0 + local) * stride + s] = s <= position ? sum * scale_s[key] : -INFINITY;
    }
    __syncthreads();
  }
  for (int local = 0; local < q_end - q0; ++local) {
    for (int64_t s = max(visible_end, key_begin) + tid; s < key_end; s += kThreads)
      scores[(q0 + local) * stride + s] = -INFINITY;
  }
}

__global__ void indexer_f32_kernel(const float* __restrict__ q, const float* __restrict__ w,
                                   const float* __restrict__ k, int heads, int dim, int keys,
                                   int64_t first_position, float* __restrict__ scores,
                                   int64_t stride) {
  extern __shared__ float q_row[];  // [H, d] of this query
  const int r = blockIdx.x;
  for (int i = threadIdx.x; i < heads * dim; i += blockDim.x)
    q_row[i] = q[static_cast<int64_t>(r) * heads * dim + i];
  __syncthreads();
  const int64_t s = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  if (s >= keys) return;
  if (s > first_position + r) {
    scores[r * stride + s] = -INFINITY;
    return;
  }
  float sum = 0.0f;
  for (int j = 0; j < heads; ++j) {
    float dot = 0.0f;
    for (int c = 0; c < dim; ++c) dot += q_row[j * dim + c] * k[s * dim + c];
    sum += w[static_cast<int64_t>(r) * heads + j] * fmaxf(dot, 0.0f);
  }
  scores[r * stride + s] = sum;
}

}  // namespace

void launch_indexer_bf16(const __nv_bfloat16* q, const float* w, const __nv_bfloat16* k,
                         const float* k_scale, int rows, int heads, int dim, int keys,
                         int64_t first_position, float* scores, int64_t stride, cudaStream_t stream,
                         const IndexerBatch& batch) {
  if (rows == 0 || batch.count == 0) return;
  const int ld = dim + 8;
  const size_t smem = (kRows + 2 * kKeyTile) * ld * sizeof(__nv_bfloat16) +
                      (kRows * kLogitStride + kRows + 2 * kKeyTile) * sizeof(float);
  check(cudaFuncSetAttribute(indexer_bf16_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(smem)),
        "cudaFuncSetAttribute(indexer)");
  const int per_block = kRows / heads;
  const int query_blocks = (rows + per_block - 1) / per_block;
  // Few query blocks (decode): split the keys too, so that every SM has work.
  int device = 0, sms = 0;
  check(cudaGetDevice(&device), "cudaGetDevice");
  check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device),
        "cudaDeviceGetAttribute");
  const int key_tiles = std::max(1, (keys + kKeyTile - 1) / kKeyTile);
  const int splits = std::clamp(2 * sms / std::max(1, query_blocks * batch.count), 1, key_tiles);
  const int key_span = (key_tiles + splits - 1) / splits * kKeyTile;
  const dim3 grid(query_blocks, (std::max(keys, 1) + key_span - 1) / key_span, batch.count);
  indexer_bf16_kernel<<<grid, kThreads, smem, stream>>>(
      q, w, k, k_scale, rows, heads, dim, keys, first_position, scores, stride, batch, key_span);
  check(cudaGetLastError(), "indexer kernel launch");
}

void launch_indexer_f32(const float* q, const float* w, const float* k, int rows, int heads,
                        int dim, int keys, int64_t first_position, float* scores, int64_t stride,
                        cudaStream_t stream) {
  if (rows == 0 || keys == 0) return;
  const size_t smem = static_cast<size_t>(heads) * dim * sizeof(float);
  check(cudaFuncSetAttribute(indexer_f32_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(smem)),
        "cudaFuncSetAttribute(indexer f32)");
  const dim3 grid(rows, (keys + 255) / 256);
  indexer_f32_kernel<<<grid, 256, smem, stream>>>(q, w, k, heads, dim, keys, first_position, scores,
                                                  stride);
  check(cudaGetLastError(), "indexer f32 kernel launch");
}

}  // namespace dsa::cuda
