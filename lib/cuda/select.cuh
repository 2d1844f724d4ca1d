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
