// dsa-compare's dense probabilities on the GPU (kernels.cuh: launch_dense_probabilities), apart
// from the attention kernels: only the comparison's reference distribution p needs them.
#include <fmt/format.h>

#include "dsa/error.hpp"
#include "kernels.cuh"
#include "mla_tiles.cuh"
#include "online_softmax.cuh"
#include "traits.cuh"
#include "wgmma.cuh"

namespace dsa::cuda {

namespace {

// Head-summed dense probabilities (Eq. 3's target before the 1 / H): for one query row and 64
// of its heads per block, sum_h exp(scale q_h . k_s - lse_h) for every visible s, with lse the
// dense attention's. The keys of a tile are the A operand of score_tile and the 64 heads'
// queries the B operand, so an accumulator row is a key and the sum over heads stays in
// registers (16 heads per thread, then two shuffles), as in the fp8 indexer.
template <int D_QK>
__global__ void __launch_bounds__(DenseProbabilityTraits<D_QK>::kThreads, 1)
    dense_probability_kernel(const __grid_constant__ DenseProbabilityParams p) {
  namespace wg = wgmma;
  using Traits = DenseProbabilityTraits<D_QK>;
  using Tile = typename Traits::Tile;
  constexpr int kHeads = Tile::kHeads, kKeys = Tile::kKeys;
  extern __shared__ unsigned char smem_raw[];
  const uint32_t raw = wg::shared_address(smem_raw);
  const uint32_t q_s = raw + (1024 - raw % 1024) % 1024;
  const uint32_t k_s = q_s + Tile::kQueryBytes;  // two tiles
  const int heads = p.heads;
  const int groups = (heads + kHeads - 1) / kHeads;
  const int r = blockIdx.x / groups, group = blockIdx.x % groups, h0 = group * kHeads;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, pair = 2 * (lane % 4);
  const int key0 = warp * 16 + lane / 4, key1 = key0 + 8;
  const int64_t position = p.first_position + r;
  const int64_t tiles = (position + kKeys) / kKeys;

  fetch_query_heads<Tile, Traits::kThreads>(q_s, p.q, r, heads, h0);
  auto fetch = [&](int64_t tile) {
    const int64_t s = tile * kKeys + gathered_key<Traits::kThreads>();
    fetch_key_row<Tile, Traits::kThreads>(k_s + static_cast<uint32_t>(tile % 2) * Tile::kTileBytes,
                                          p.kv, s <= position ? static_cast<int>(s) : -1);
    wg::copy_async_commit();
  };
  fetch(0);
  const float scale2 = p.scale * kLog2e;
  float lse2[kHeads / 8][2];  // this thread's heads; +inf past the last head: p = 0
#pragma unroll
  for (int n = 0; n < kHeads / 8; ++n) {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int h = h0 + n * 8 + pair + e;
      lse2[n][e] = h < heads ? p.lse[static_cast<int64_t>(r) * heads + h] * kLog2e : INFINITY;
    }
  }
  float* out = p.partial + (static_cast<int64_t>(group) * p.rows + r) * p.stride;
  for (int64_t tile = 0; tile < tiles; ++tile) {
    wg::copy_async_wait_all();
    wg::fence_shared_for_tensor_cores();
    __syncthreads();
    if (tile + 1 < tiles) fetch(tile + 1);
    float logit[32];
    score_tile<Tile, 64>(logit, k_s + static_cast<uint32_t>(tile % 2) * Tile::kTileBytes, q_s);
    float sum0 = 0.0f, sum1 = 0.0f;
#pragma unroll
    for (int n = 0; n < kHeads / 8; ++n) {
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
    const int64_t s = tile * kKeys + (lane % 4 == 0 ? key0 : key1);
    if (lane % 4 < 2 && s <= position) out[s] = lane % 4 == 0 ? sum0 : sum1;
  }
}

}  // namespace

std::string dense_probabilities_limit(int d_qk) {
  if (d_qk != 512 && d_qk != 576) {
    return fmt::format("the CUDA dense probabilities need d_qk 512 or 576 (MLA's), got d_qk {}",
                       d_qk);
  }
  return "";
}

void launch_dense_probabilities(const DenseProbabilityParams& p) {
  if (p.rows == 0) return;
  require(dense_probabilities_limit(p.d_qk));
  auto launch = [&](auto kernel, auto traits) {
    using Traits = decltype(traits);
    check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               static_cast<int>(Traits::kSmem)),
          "cudaFuncSetAttribute(dense probabilities)");
    const int groups = (p.heads + Traits::kHeads - 1) / Traits::kHeads;
    kernel<<<p.rows * groups, Traits::kThreads, Traits::kSmem, p.stream>>>(p);
  };
  if (p.d_qk == 576) {
    launch(dense_probability_kernel<576>, DenseProbabilityTraits<576>{});
  } else {
    launch(dense_probability_kernel<512>, DenseProbabilityTraits<512>{});
  }
  check(cudaGetLastError(), "dense probability kernel launch");
}

}  // namespace dsa::cuda
