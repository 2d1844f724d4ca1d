// dsa-compare's dense probabilities on the GPU (kernels.cuh: launch_dense_probabilities), apart
// from the attention kernels: only the comparison's reference distribution p needs them.
#include "dsa/error.hpp"
#include "kernels.cuh"
#include "mla_tiles.cuh"
#include "wgmma.cuh"

namespace dsa::cuda {

namespace {

// Head-summed dense probabilities (Eq. 3's target before the 1 / H): for one query row and 64
// of its heads per block, sum_h exp(scale q_h . k_s - lse_h) for every visible s, with lse the
// dense attention's. The keys of a tile are the A operand of wgmma and the 64 heads' queries
// the B operand, so an accumulator row is a key and the sum over heads stays in registers (16
// heads per thread, then two shuffles), as in the fp8 indexer.
template <int D_QK>
__global__ void __launch_bounds__(128, 1)
    dense_probability_kernel(const __nv_bfloat16* __restrict__ q,
                             const __nv_bfloat16* __restrict__ kv, int heads,
                             int64_t first_position, float scale, const float* __restrict__ lse,
                             float* __restrict__ partial, int64_t stride, int rows) {
  namespace wg = wgmma;
  extern __shared__ unsigned char smem_raw[];
  const uint32_t raw = wg::shared_address(smem_raw);
  const uint32_t q_s = raw + (1024 - raw % 1024) % 1024;
  constexpr uint32_t kTileBytes = kTileKeys * D_QK * 2;
  const uint32_t k_s = q_s + kTileHeads * D_QK * 2;  // two tiles
  const int groups = (heads + kTileHeads - 1) / kTileHeads;
  const int r = blockIdx.x / groups, group = blockIdx.x % groups, h0 = group * kTileHeads;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, pair = 2 * (lane % 4);
  const int key0 = warp * 16 + lane / 4, key1 = key0 + 8;
  constexpr int chunks = D_QK / 8;
  const int64_t position = first_position + r;
  const int64_t tiles = (position + kTileKeys) / kTileKeys;

  fetch_query_heads(q_s, q, r, heads, h0, D_QK, 128);
  auto fetch = [&](int64_t tile) {
    const uint32_t base = k_s + static_cast<uint32_t>(tile % 2) * kTileBytes;
    for (int i = tid; i < kTileKeys * chunks; i += 128) {
      const int j = i / chunks, c = i % chunks;
      const int64_t s = tile * kTileKeys + j;
      wg::copy_async_16(base + wg::swizzled_offset(kTileKeys, j, c * 8),
                        kv + (s <= position ? s : 0) * D_QK + c * 8, s <= position);
    }
    wg::copy_async_commit();
  };
  fetch(0);
  constexpr float kLog2e = 1.4426950408889634f;
  const float scale2 = scale * kLog2e;
  float lse2[kTileHeads / 8][2];  // this thread's heads; +inf past the last head: p = 0
#pragma unroll
  for (int n = 0; n < kTileHeads / 8; ++n) {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int h = h0 + n * 8 + pair + e;
      lse2[n][e] = h < heads ? lse[static_cast<int64_t>(r) * heads + h] * kLog2e : INFINITY;
    }
  }
  float* out = partial + (static_cast<int64_t>(group) * rows + r) * stride;
  for (int64_t tile = 0; tile < tiles; ++tile) {
    wg::copy_async_wait_all();
    wg::fence_shared_for_tensor_cores();
    __syncthreads();
    if (tile + 1 < tiles) fetch(tile + 1);
    float logit[32];
    const uint32_t a = k_s + static_cast<uint32_t>(tile % 2) * kTileBytes;
    wg::fence();
#pragma unroll
    for (int step = 0; step < D_QK / 16; ++step) {
      // Columns 16 step .. 16 step + 15 of a 64-row tile, the queries' and the keys' alike.
      const uint32_t offset = wg::swizzled_offset(kTileKeys, 0, step * 16);
      wg::wgmma_m64n64_kmajor(logit, wg::descriptor(a + offset, 16, 1024),
                              wg::descriptor(q_s + offset, 16, 1024), step > 0);
    }
    wg::commit();
    wg::wait<0>();
    float sum0 = 0.0f, sum1 = 0.0f;
#pragma unroll
    for (int n = 0; n < kTileHeads / 8; ++n) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        sum0 += exp2f(logit[4 * n + e] * scale2 - lse2[n][e]);
        sum1 += exp2f(logit[4 * n + 2 + e] * scale2 - lse2[n][e]);
      }
    }
#pragma unroll
    for (int m = 1; m <= 2; m *= 2) {
      sum0 += __shfl_xor_sync(0xffffffffu, sum0, m);
      sum1 += __shfl_xor_sync(0xffffffffu, sum1, m);
    }
    const int64_t s = tile * kTileKeys + (lane % 4 == 0 ? key0 : key1);
    if (lane % 4 < 2 && s <= position) out[s] = lane % 4 == 0 ? sum0 : sum1;
  }
}

}  // namespace

void launch_dense_probabilities(const __nv_bfloat16* q, const __nv_bfloat16* kv, int rows,
                                int heads, int d_qk, int64_t first_position, float scale,
                                const float* lse, float* partial, int64_t stride,
                                cudaStream_t stream) {
  if (rows == 0) return;
  if (d_qk != 512 && d_qk != 576) {
    fail(ExitCode::usage, "the CUDA dense probabilities need d_qk 512 or 576, got {}", d_qk);
  }
  const auto kernel = d_qk == 576 ? dense_probability_kernel<576> : dense_probability_kernel<512>;
  const size_t smem = 1024 + static_cast<size_t>(kTileHeads + 2 * kTileKeys) * d_qk * 2;
  check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(smem)),
        "cudaFuncSetAttribute(dense probabilities)");
  const int groups = (heads + kTileHeads - 1) / kTileHeads;
  kernel<<<rows * groups, 128, smem, stream>>>(q, kv, heads, first_position, scale, lse, partial,
                                               stride, rows);
  check(cudaGetLastError(), "dense probability kernel launch");
}

}  // namespace dsa::cuda
