// MQA attention (MLA's latent cache) on the GPU, over selected entries or every visible one:
// tiles of keys gathered into shared memory, q . k and p . v on the tensor cores, an online
// softmax in f32.
#include <mma.h>

#include "dsa/error.hpp"
#include "kernels.cuh"

namespace dsa::cuda {

namespace {

using namespace nvcuda;

constexpr int kHeads = 32;     // query heads per block
constexpr int kKeyTile = 32;   // keys per step
constexpr int kThreads = 128;  // 4 warps
constexpr int kScoreStride = kKeyTile + 4;
constexpr int kProbStride = kKeyTile + 8;

struct Layout {
  int ld_qk, ld_o;
  size_t q, kv, score, prob, out, bytes;
  __host__ __device__ Layout(int d_qk, int d_v) : ld_qk(d_qk + 8), ld_o(d_v + 4) {
    q = 0;
    kv = q + sizeof(__nv_bfloat16) * kHeads * ld_qk;
    score = kv + sizeof(__nv_bfloat16) * kKeyTile * ld_qk;
    prob = score + sizeof(float) * kHeads * kScoreStride;
    out = prob + sizeof(__nv_bfloat16) * kHeads * kProbStride;
    bytes =
        out + sizeof(float) * kHeads * ld_o + sizeof(float) * 3 * kHeads + sizeof(int) * kKeyTile;
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
  const Layout layout(d_qk, d_v);
  auto* q_s = reinterpret_cast<__nv_bfloat16*>(smem + layout.q);
  auto* kv_s = reinterpret_cast<__nv_bfloat16*>(smem + layout.kv);
  auto* score_s = reinterpret_cast<float*>(smem + layout.score);
  auto* prob_s = reinterpret_cast<__nv_bfloat16*>(smem + layout.prob);
  auto* out_s = reinterpret_cast<float*>(smem + layout.out);
  float* row_max = out_s + kHeads * layout.ld_o;
  float* row_sum = row_max + kHeads;
  float* correction = row_sum + kHeads;
  auto* slot = reinterpret_cast<int*>(correction + kHeads);

  const int r = blockIdx.x, h0 = blockIdx.y * kHeads;
  const int tid = threadIdx.x, warp = tid / 32;
  const int ld = layout.ld_qk, ld_o = layout.ld_o;
  const int chunks = d_qk / 8;
  const int64_t position = first_position + r;

  for (int i = tid; i < kHeads * chunks; i += kThreads) {
    const int h = i / chunks, c = i % chunks;
    uint4 v = make_uint4(0, 0, 0, 0);
    if (h0 + h < heads)
      v = reinterpret_cast<const uint4*>(q + (static_cast<int64_t>(r) * heads + h0 + h) * d_qk)[c];
    reinterpret_cast<uint4*>(q_s + h * ld)[c] = v;
  }
  for (int i = tid; i < kHeads * ld_o; i += kThreads) out_s[i] = 0.0f;
  for (int h = tid; h < kHeads; h += kThreads) {
    row_max[h] = -INFINITY;
    row_sum[h] = 0.0f;
  }
  const int64_t entries = indices ? k : position + 1;
  for (int64_t e0 = 0; e0 < entries; e0 += kKeyTile) {
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
    {  // scores [32 heads, 32 keys]: one 16 x 16 tile per warp
      const int a = warp / 2, b = warp % 2;
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
    }
    __syncthreads();
    if (tid < kHeads) {  // online softmax, one head per thread
      const int h = tid;
      float m = row_max[h];
      for (int j = 0; j < kKeyTile; ++j) {
        if (slot[j] >= 0) m = fmaxf(m, score_s[h * kScoreStride + j] * scale);
      }
      const float c = m == -INFINITY ? 1.0f : __expf(row_max[h] - m);
      float sum = 0.0f;
      for (int j = 0; j < kKeyTile; ++j) {
        const float p = slot[j] >= 0 ? __expf(score_s[h * kScoreStride + j] * scale - m) : 0.0f;
        prob_s[h * kProbStride + j] = __float2bfloat16(p);
        sum += p;
      }
      row_sum[h] = row_sum[h] * c + sum;
      row_max[h] = m;
      correction[h] = c;
    }
    __syncthreads();
    for (int i = tid; i < kHeads * d_v; i += kThreads) {
      const int h = i / d_v, c = i % d_v;
      out_s[h * ld_o + c] *= correction[h];
    }
    __syncthreads();
    // out [32, d_v] += p [32, 32] . v [32, d_v]
    for (int tile = warp; tile < 2 * (d_v / 16); tile += kThreads / 32) {
      const int a = tile % 2, b = tile / 2;
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::load_matrix_sync(acc, out_s + a * 16 * ld_o + b * 16, ld_o, wmma::mem_row_major);
      for (int kk = 0; kk < kKeyTile; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> fa;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::row_major> fb;
        wmma::load_matrix_sync(fa, prob_s + a * 16 * kProbStride + kk, kProbStride);
        wmma::load_matrix_sync(fb, kv_s + kk * ld + b * 16, ld);
        wmma::mma_sync(acc, fa, fb, acc);
      }
      wmma::store_matrix_sync(out_s + a * 16 * ld_o + b * 16, acc, ld_o, wmma::mem_row_major);
    }
  }
  __syncthreads();
  for (int i = tid; i < kHeads * d_v; i += kThreads) {
    const int h = i / d_v, c = i % d_v;
    if (h0 + h >= heads) continue;
    const float sum = row_sum[h];
    out[(static_cast<int64_t>(r) * heads + h0 + h) * d_v + c] =
        sum > 0 ? out_s[h * ld_o + c] / sum : 0.0f;
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
  if (d_qk % 16 != 0 || d_v % 16 != 0 || d_v > d_qk || d_qk > 576) {
    fail(ExitCode::usage,
         "the CUDA attention needs d_qk and d_v multiples of 16 with d_v <= d_qk <= 576, got {} "
         "and {}",
         d_qk, d_v);
  }
  const Layout layout(d_qk, d_v);
  check(cudaFuncSetAttribute(mqa_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(layout.bytes)),
        "cudaFuncSetAttribute(attention)");
  const dim3 grid(rows, (heads + kHeads - 1) / kHeads, batch.count);
  mqa_kernel<<<grid, kThreads, layout.bytes, stream>>>(q, kv, indices, k, heads, d_qk, d_v, keys,
                                                       first_position, scale, out, lse, batch);
  check(cudaGetLastError(), "attention kernel launch");
}

}  // namespace dsa::cuda
