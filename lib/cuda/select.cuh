// Internal: what the top-k kernel (topk.cu) and the indexer's fused top-k (indexer.cu) share: the
// order-preserving key of a score, and a bitonic sort of (key, position) pairs in shared memory.
#pragma once

#include <cstdint>

namespace dsa::cuda {

// Order-preserving map of a float to uint32 (larger float, larger key); NaN ranks like -inf and
// -0 like +0, as the CPU's (src/topk.cpp) and the float comparisons of Eq. 2 have them.
__device__ __forceinline__ uint32_t rank_key(float x) {
  if (isnan(x)) x = -INFINITY;
  if (x == 0.0f) x = 0.0f;
  const uint32_t b = __float_as_uint(x);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

// The float whose rank_key is `key` (-inf for NaN's key, +0 for -0's).
__device__ __forceinline__ float key_score(uint32_t key) {
  return __uint_as_float((key & 0x80000000u) ? (key & 0x7fffffffu) : ~key);
}

// The bin of a 256-bin histogram of digits (shared memory) that holds the needed-th largest
// entry, the bins taken from 255 down, found by one warp (every lane calls it): lane l sums bins
// 255 - 8 l down to 248 - 8 l, a scan over the lanes finds the first lane whose bins reach
// `needed`, and that lane walks its bins. Returns the bin to every lane, and in `above` the
// entries in the bins before it. When no bin reaches `needed` (fewer entries than that), the
// lowest bin, 0.
__device__ __forceinline__ int descending_bin(const uint32_t* histogram, uint32_t needed,
                                              uint32_t& above) {
  const int lane = threadIdx.x % 32;
  uint32_t chunk = 0;
#pragma unroll
  for (int t = 0; t < 8; ++t) chunk += histogram[255 - 8 * lane - t];
  uint32_t inclusive = chunk;
#pragma unroll
  for (int offset = 1; offset < 32; offset <<= 1) {
    const uint32_t before = __shfl_up_sync(0xffffffffu, inclusive, offset);
    if (lane >= offset) inclusive += before;
  }
  const uint32_t reached = __ballot_sync(0xffffffffu, inclusive >= needed);
  const int first = reached ? __ffs(reached) - 1 : 31;
  uint32_t before = inclusive - chunk;
  int bin = 255 - 8 * lane;
  if (lane == first) {
    for (int t = 0; t < 7 && before + histogram[bin] < needed; ++t, --bin) before += histogram[bin];
  }
  above = __shfl_sync(0xffffffffu, before, first);
  return __shfl_sync(0xffffffffu, bin, first);
}

// Sorts `size` (a power of two) 64-bit pairs descending, bitonic, by the THREADS threads that
// call it (thread t = `tid`); `barrier()` synchronizes them all. A step whose compare distance is
// at most 32 keeps each warp within its own 64 entries: between two such steps a warp barrier
// suffices. Begins and ends with barrier().
template <int THREADS, typename Barrier>
__device__ void sort_descending(uint64_t* pairs, int size, int tid, Barrier barrier) {
  static_assert(THREADS % 32 == 0, "whole warps");
  bool crossed = true;  // the previous step (or the caller) touched other warps' entries
  for (int width = 2; width <= size; width <<= 1) {
    for (int half = width >> 1; half > 0; half >>= 1) {
      if (crossed || half > 32) {
        barrier();
      } else {
        __syncwarp();
      }
      crossed = half > 32;
      for (int i = tid; i < size / 2; i += THREADS) {
        const int lo = ((i & ~(half - 1)) << 1) | (i & (half - 1)), hi = lo + half;
        const bool descending = (lo & width) == 0;
        const uint64_t a = pairs[lo], b = pairs[hi];
        if ((a < b) == descending) {
          pairs[lo] = b;
          pairs[hi] = a;
        }
      }
    }
  }
  barrier();
}

}  // namespace dsa::cuda
