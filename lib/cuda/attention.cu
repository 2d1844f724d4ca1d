// MQA attention (MLA's latent cache) on the GPU, over selected entries or every visible one:
// tiles of keys gathered into shared memory, q . k and p . v on the tensor cores, the softmax
// statistics in f32.
#include <mma.h>

#include "dsa/error.hpp"
#include "kernels.cuh"
#include "mla_tiles.cuh"
#include "wgmma.cuh"

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

// The Hopper kernel for MLA's shapes (d_qk a multiple of 64 up to 576, d_v = 512): 64 heads of
// one query row per block, two warpgroups, tiles of 64 selected keys gathered with cp.async
// into two swizzled buffers (the next tile arrives while this one is computed on). Per tile,
// warpgroup g computes the scores of keys 32g .. 32g + 31 for all 64 heads (wgmma, Q and the
// keys from shared memory), the two exchange their row maxima (online softmax, f32, base 2),
// write P in bf16 to shared memory, and each accumulates P . V for its half of the 512 value
// columns (wgmma, V read N-major from the same tile): 64 x 256 f32 in registers.
struct TileLayout {
  uint32_t q, kv, tile, p, max, sum, slot, bytes;  // kv + b * tile: buffer b of the keys
  __host__ __device__ explicit TileLayout(int d_qk) {
    tile = sizeof(__nv_bfloat16) * kTileKeys * d_qk;  // a multiple of 1024
    q = 0;
    kv = q + sizeof(__nv_bfloat16) * kTileHeads * d_qk;
    p = kv + 2 * tile;
    max = p + sizeof(__nv_bfloat16) * kTileHeads * kTileKeys;
    sum = max + sizeof(float) * 2 * kTileHeads;
    slot = sum + sizeof(float) * 2 * kTileHeads;
    bytes = slot + sizeof(int) * 2 * kTileKeys + 1024;  // + the slack to align the base
  }
};

template <int D_QK>
__global__ void __launch_bounds__(kTileThreads, 1)
    mla_wgmma_kernel(const __nv_bfloat16* __restrict__ q, const __nv_bfloat16* __restrict__ kv,
                     const int32_t* __restrict__ indices, int k, int heads, int64_t first_position,
                     float scale, float* __restrict__ out, float* __restrict__ lse,
                     AttentionBatch batch) {
  namespace wg = wgmma;
  q += blockIdx.z * batch.q;
  kv += blockIdx.z * batch.kv;
  if (indices) indices += blockIdx.z * batch.indices;
  out += blockIdx.z * batch.out;
  lse += blockIdx.z * batch.lse;
  extern __shared__ unsigned char smem_raw[];
  const uint32_t raw = wg::shared_address(smem_raw);
  unsigned char* smem = smem_raw + ((1024 - raw % 1024) % 1024);
  constexpr int d_qk = D_QK;
  const TileLayout layout(d_qk);
  auto* q_s = reinterpret_cast<__nv_bfloat16*>(smem + layout.q);
  unsigned char* p_s = smem + layout.p;
  auto* max_s = reinterpret_cast<float*>(smem + layout.max);  // [warpgroup][head]
  auto* sum_s = reinterpret_cast<float*>(smem + layout.sum);  // [warpgroup][head]
  auto* slot_s = reinterpret_cast<int*>(smem + layout.slot);  // [buffer][key]

  // The head groups of one row are neighbours in launch order: the second gathers from L2.
  const int groups = (heads + kTileHeads - 1) / kTileHeads;
  const int r = blockIdx.x / groups, h0 = blockIdx.x % groups * kTileHeads;
  const int tid = threadIdx.x, group = tid / 128, lane = tid % 32;
  const int row0 = (tid % 128) / 32 * 16 + lane / 4, row1 = row0 + 8;  // this thread's heads
  const int pair = 2 * (lane % 4);  // the first of this thread's two columns in each 8
  const int chunks = d_qk / 8;
  const int64_t position = first_position + r;
  const int64_t entries = indices ? k : position + 1;
  const int64_t tiles = (entries + kTileKeys - 1) / kTileKeys;

  fetch_query_heads(wg::shared_address(q_s), q, r, heads, h0, d_qk, kTileThreads);
  // Starts gathering tile `tile` of the selection into buffer `buffer`: 4 threads per key.
  auto fetch = [&](int64_t tile, int buffer) {
    const int j = tid / 4;
    const int64_t e = tile * kTileKeys + j;
    int s = -1;
    if (e < entries) s = indices ? indices[static_cast<int64_t>(r) * k + e] : static_cast<int>(e);
    if (tid % 4 == 0) slot_s[buffer * kTileKeys + j] = s;
    const __nv_bfloat16* row = kv + static_cast<int64_t>(s >= 0 ? s : 0) * d_qk;
    const uint32_t base = wg::shared_address(smem + layout.kv + buffer * layout.tile);
    for (int c = tid % 4; c < chunks; c += 4) {
      wg::copy_async_16(base + wg::swizzled_offset(kTileKeys, j, c * 8), row + c * 8, s >= 0);
    }
    wg::copy_async_commit();
  };
  if (tiles > 0) fetch(0, 0);

  constexpr float kLog2e = 1.4426950408889634f;
  const float scale2 = scale * kLog2e;
  float max0 = -INFINITY, max1 = -INFINITY, sum0 = 0.0f, sum1 = 0.0f;  // base-2 running stats
  float o[2 * kHalfValues / 4];
#pragma unroll
  for (int i = 0; i < 2 * kHalfValues / 4; ++i) o[i] = 0.0f;

  for (int64_t tile = 0; tile < tiles; ++tile) {
    const int buffer = static_cast<int>(tile % 2);
    wg::copy_async_wait_all();
    wg::fence_shared_for_tensor_cores();
    __syncthreads();
    if (tile + 1 < tiles) fetch(tile + 1, buffer ^ 1);

    // S = Q . K^T for this warpgroup's 32 keys.
    float s[16];
    const uint32_t q_base = wg::shared_address(q_s);
    const uint32_t k_base =
        wg::shared_address(smem + layout.kv + buffer * layout.tile) + group * 32 * 128;
    wg::fence();
#pragma unroll
    for (int step = 0; step < d_qk / 16; ++step) {
      // Columns 16 step .. 16 step + 15 of a 64-row tile, the queries' and the keys' alike.
      const uint32_t offset = wg::swizzled_offset(kTileKeys, 0, step * 16);
      wg::wgmma_m64n32_kmajor(s, wg::descriptor(q_base + offset, 16, 1024),
                              wg::descriptor(k_base + offset, 16, 1024), step > 0);
    }
    wg::commit();
    wg::wait<0>();

    const int* slot = slot_s + buffer * kTileKeys + group * 32;
    float tile_max0 = -INFINITY, tile_max1 = -INFINITY;
#pragma unroll
    for (int n = 0; n < 4; ++n) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const bool valid = slot[n * 8 + pair + e] >= 0;
        s[4 * n + e] = valid ? s[4 * n + e] * scale2 : -INFINITY;
        s[4 * n + 2 + e] = valid ? s[4 * n + 2 + e] * scale2 : -INFINITY;
        tile_max0 = fmaxf(tile_max0, s[4 * n + e]);
        tile_max1 = fmaxf(tile_max1, s[4 * n + 2 + e]);
      }
    }
#pragma unroll
    for (int m = 1; m <= 2; m *= 2) {
      tile_max0 = fmaxf(tile_max0, __shfl_xor_sync(0xffffffffu, tile_max0, m));
      tile_max1 = fmaxf(tile_max1, __shfl_xor_sync(0xffffffffu, tile_max1, m));
    }
    if (lane % 4 == 0) {
      max_s[group * kTileHeads + row0] = tile_max0;
      max_s[group * kTileHeads + row1] = tile_max1;
    }
    __syncthreads();
    const float new_max0 = fmaxf(max0, fmaxf(max_s[row0], max_s[kTileHeads + row0]));
    const float new_max1 = fmaxf(max1, fmaxf(max_s[row1], max_s[kTileHeads + row1]));
    const float base0 = new_max0 == -INFINITY ? 0.0f : new_max0;
    const float base1 = new_max1 == -INFINITY ? 0.0f : new_max1;
    const float alpha0 = exp2f(max0 - base0), alpha1 = exp2f(max1 - base1);
    max0 = new_max0;
    max1 = new_max1;
    sum0 *= alpha0;
    sum1 *= alpha1;
#pragma unroll
    for (int n = 0; n < 4; ++n) {
      const float p00 = exp2f(s[4 * n] - base0), p01 = exp2f(s[4 * n + 1] - base0);
      const float p10 = exp2f(s[4 * n + 2] - base1), p11 = exp2f(s[4 * n + 3] - base1);
      sum0 += p00 + p01;
      sum1 += p10 + p11;
      const int column = group * 32 + n * 8 + pair;
      *reinterpret_cast<__nv_bfloat162*>(p_s + wg::swizzled_offset(kTileHeads, row0, column)) =
          __floats2bfloat162_rn(p00, p01);
      *reinterpret_cast<__nv_bfloat162*>(p_s + wg::swizzled_offset(kTileHeads, row1, column)) =
          __floats2bfloat162_rn(p10, p11);
    }
#pragma unroll
    for (int n = 0; n < kHalfValues / 8; ++n) {
      o[4 * n] *= alpha0;
      o[4 * n + 1] *= alpha0;
      o[4 * n + 2] *= alpha1;
      o[4 * n + 3] *= alpha1;
    }
    wg::fence_shared_for_tensor_cores();
    __syncthreads();

    // O += P . V for this warpgroup's 256 value columns.
    const uint32_t p_base = wg::shared_address(p_s);
    const uint32_t v_base =
        wg::shared_address(smem + layout.kv + buffer * layout.tile) + group * 4 * (kTileKeys * 128);
    wg::fence();
#pragma unroll
    for (int step = 0; step < kTileKeys / 16; ++step) {
      wg::wgmma_m64n256_nmajor(o, wg::descriptor(p_base + step * 32, 16, 1024),
                               wg::descriptor(v_base + step * 16 * 128, kTileKeys * 128, 1024),
                               true);
    }
    wg::commit();
    wg::wait<0>();
  }

#pragma unroll
  for (int m = 1; m <= 2; m *= 2) {
    sum0 += __shfl_xor_sync(0xffffffffu, sum0, m);
    sum1 += __shfl_xor_sync(0xffffffffu, sum1, m);
  }
  if (lane % 4 == 0) {
    sum_s[group * kTileHeads + row0] = sum0;
    sum_s[group * kTileHeads + row1] = sum1;
  }
  __syncthreads();
  const float total0 = sum_s[row0] + sum_s[kTileHeads + row0];
  const float total1 = sum_s[row1] + sum_s[kTileHeads + row1];
  const float inverse0 = total0 > 0 ? 1.0f / total0 : 0.0f;
  const float inverse1 = total1 > 0 ? 1.0f / total1 : 0.0f;
  const int d_v = 2 * kHalfValues;
  float* out0 = out + (static_cast<int64_t>(r) * heads + h0 + row0) * d_v + group * kHalfValues;
  float* out1 = out + (static_cast<int64_t>(r) * heads + h0 + row1) * d_v + group * kHalfValues;
#pragma unroll
  for (int n = 0; n < kHalfValues / 8; ++n) {
    if (h0 + row0 < heads) {
      *reinterpret_cast<float2*>(out0 + n * 8 + pair) =
          make_float2(o[4 * n] * inverse0, o[4 * n + 1] * inverse0);
    }
    if (h0 + row1 < heads) {
      *reinterpret_cast<float2*>(out1 + n * 8 + pair) =
          make_float2(o[4 * n + 2] * inverse1, o[4 * n + 3] * inverse1);
    }
  }
  if (group == 0 && lane % 4 == 0) {
    constexpr float kLn2 = 0.6931471805599453f;
    if (h0 + row0 < heads) {
      lse[static_cast<int64_t>(r) * heads + h0 + row0] =
          total0 > 0 ? max0 * kLn2 + __logf(total0) : -INFINITY;
    }
    if (h0 + row1 < heads) {
      lse[static_cast<int64_t>(r) * heads + h0 + row1] =
          total1 > 0 ? max1 * kLn2 + __logf(total1) : -INFINITY;
    }
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
  if ((d_qk == 512 || d_qk == 576) && d_v == 2 * kHalfValues) {
    const auto kernel = d_qk == 576 ? mla_wgmma_kernel<576> : mla_wgmma_kernel<512>;
    const TileLayout layout(d_qk);
    check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               static_cast<int>(layout.bytes)),
          "cudaFuncSetAttribute(attention)");
    const dim3 grid(rows * ((heads + kTileHeads - 1) / kTileHeads), 1, batch.count);
    kernel<<<grid, kTileThreads, layout.bytes, stream>>>(q, kv, indices, k, heads, first_position,
                                                         scale, out, lse, batch);
    check(cudaGetLastError(), "attention kernel launch");
    return;
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
