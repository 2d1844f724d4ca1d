// Internal: what the MLA kernels on 64-head tiles share (attention.cu's wgmma attention and
// dense_probabilities.cu): the tile sizes and the query-tile loader.
#pragma once

#include <cuda_bf16.h>

#include <cstdint>

#include "wgmma.cuh"

namespace dsa::cuda {

constexpr int kTileHeads = 64;
constexpr int kTileKeys = 64;
constexpr int kTileThreads = 256;
constexpr int kHalfValues = 256;

// Starts copying query row r's heads h0 .. h0 + 63 (zeros past the last head) into the
// swizzled tile at shared address q_s, `threads` threads sharing the work.
inline __device__ void fetch_query_heads(uint32_t q_s, const __nv_bfloat16* q, int64_t r, int heads,
                                         int h0, int d_qk, int threads) {
  const int chunks = d_qk / 8;
  for (int i = threadIdx.x; i < kTileHeads * chunks; i += threads) {
    const int h = i / chunks, c = i % chunks;
    const bool valid = h0 + h < heads;
    const __nv_bfloat16* source = valid ? q + (r * heads + h0 + h) * d_qk + c * 8 : q;
    wgmma::copy_async_16(q_s + wgmma::swizzled_offset(kTileHeads, h, c * 8), source, valid);
  }
}

}  // namespace dsa::cuda
