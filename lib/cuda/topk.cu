// Top-k selection on the GPU (Eq. 2): per row, the entries above a threshold estimated from a
// sample, sorted in shared memory (or, when the estimate misses, an exact radix select), in
// descending score and ascending position among equal scores.
#include <fmt/format.h>
#include <cub/block/block_scan.cuh>

#include "dsa/error.hpp"
#include "kernels.cuh"
#include "traits.cuh"

namespace dsa::cuda {

namespace {

constexpr int kThreads = TopkTraits::kThreads;

// Order-preserving map of a float to uint32 (larger float, larger key); NaN ranks like -inf.
__device__ uint32_t rank_key(float x) {
  if (isnan(x)) x = -INFINITY;
  const uint32_t b = __float_as_uint(x);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

// Descending order of these is descending score, then ascending position; 0 is padding.
__device__ uint64_t compose(uint32_t key, uint32_t position) {
  return (static_cast<uint64_t>(key) << 32) | (0xffffffffu - position);
}

// Sorts `size` (a power of two) pairs descending, bitonic, by the whole block. A step whose
// compare distance is at most 32 keeps each warp within its own 64 entries: between two such
// steps a warp barrier suffices.
__device__ void sort_descending(uint64_t* pairs, int size) {
  bool crossed = true;  // the previous step (or the caller) touched other warps' entries
  for (int width = 2; width <= size; width <<= 1) {
    for (int half = width >> 1; half > 0; half >>= 1) {
      if (crossed || half > 32) {
        __syncthreads();
      } else {
        __syncwarp();
      }
      crossed = half > 32;
      for (int i = threadIdx.x; i < size / 2; i += kThreads) {
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
  __syncthreads();
}

// One pass over the row in the common case. A sample of the row's scores (kSample entries,
// evenly spaced; its key of the right rank found by a radix select, kth_largest_key) gives a
// threshold expected to pass about 1.5k entries: 2.3 standard
// deviations of the sample's error above k at L = 128K, 4.6 at 32K, so nearly every row sorts
// at most 4096 candidates and about 1 % of rows at 128K take the fallback. The entries at or
// above the threshold go to shared memory, are sorted (descending score, then ascending
// position), and the first k are the selection. Rows of at most 2k entries take them all.
// When the threshold passed fewer than k entries or more than kCandidates (a crowded score:
// many ties), the row falls back to an exact radix select, 8 bits per pass over the row.
constexpr int kCandidates = TopkTraits::kCandidates;
constexpr int kSample = TopkTraits::kSample;

// The needed-th largest of `count` keys (key_of(i), i < count), 8 bits at a time from the top:
// returns it, and sets `needed` to how many keys equal to it are among the needed largest. A
// histogram of the keys that match the prefix found so far per pass, whose bin warp 0 picks with
// a scan over its lanes (8 bins each). Every thread calls it; histogram [256], chosen_prefix and
// still_needed are shared.
template <typename KeyOf>
__device__ uint32_t kth_largest_key(const KeyOf& key_of, int count, uint32_t& needed,
                                    uint32_t* histogram, uint32_t& chosen_prefix,
                                    uint32_t& still_needed) {
  const int tid = threadIdx.x, lane = tid % 32;
  uint32_t prefix = 0, mask = 0;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int b = tid; b < 256; b += kThreads) histogram[b] = 0;
    __syncthreads();
    for (int i = tid; i < count; i += kThreads) {
      const uint32_t key = key_of(i);
      if ((key & mask) == prefix) atomicAdd(&histogram[(key >> shift) & 255u], 1u);
    }
    __syncthreads();
    if (tid < 32) {
      // Lane l holds bins 255 - 8 l down to 248 - 8 l: the bins in descending order.
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
      // The lowest bin is taken when nothing reaches `needed` (as bin 0 always holds the rest).
      const int first = reached ? __ffs(reached) - 1 : 31;
      if (lane == first) {
        uint32_t above = inclusive - chunk;
        int b = 255 - 8 * lane;
        for (int t = 0; t < 7 && above + histogram[b] < needed; ++t, --b) above += histogram[b];
        chosen_prefix = prefix | (static_cast<uint32_t>(b) << shift);
        still_needed = needed - above;
      }
    }
    __syncthreads();
    prefix = chosen_prefix;
    needed = still_needed;
    mask |= 255u << shift;
    __syncthreads();
  }
  return prefix;
}

__global__ void __launch_bounds__(kThreads, 3) topk_kernel(const __grid_constant__ TopkParams p) {
  const int k = p.k;
  int32_t* __restrict__ indices = p.indices;
  float* __restrict__ values = p.values;
  extern __shared__ uint64_t pairs[];  // [kCandidates]: the sample, the candidates, or the k
  __shared__ uint32_t histogram[256];
  __shared__ uint32_t threshold, candidate_count, chosen_prefix, still_needed, taken_above;
  using Scan = cub::BlockScan<int, kThreads>;
  __shared__ typename Scan::TempStorage scan_storage;

  const int r = blockIdx.x, tid = threadIdx.x;
  const float* __restrict__ row = p.scores + r * p.stride;
  const int n = static_cast<int>(
      min(static_cast<int64_t>(p.keys), visible_keys(p.first_position, r, p.ratio)));
  if (tid == 0) threshold = candidate_count = taken_above = 0;
  if (n > 2 * k) {
    // The sample's keys in the candidates' space, which they leave before the scan fills it.
    auto* sample = reinterpret_cast<uint32_t*>(pairs);
    for (int j = tid; j < kSample; j += kThreads) {
      sample[j] = rank_key(row[static_cast<int>(static_cast<int64_t>(j) * n / kSample)]);
    }
    __syncthreads();
    // The threshold: the sample's key of descending rank 1.5 k kSample / n (0-based).
    uint32_t needed =
        1 + static_cast<uint32_t>(min(static_cast<int64_t>(kSample - 1),
                                      3 * static_cast<int64_t>(k) * kSample / (2 * n)));
    const uint32_t key = kth_largest_key([&](int j) { return sample[j]; }, kSample, needed,
                                         histogram, chosen_prefix, still_needed);
    if (tid == 0) threshold = key;
  }
  __syncthreads();
  const uint32_t bound = threshold;
  constexpr int kUnroll = 4;  // loads in flight per thread
  for (int base = 0; base < n; base += kUnroll * kThreads) {
    uint32_t keys_here[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int i = base + u * kThreads + tid;
      keys_here[u] = i < n ? rank_key(row[i]) : 0;
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int i = base + u * kThreads + tid;
      const bool take = i < n && keys_here[u] >= bound;
      const uint32_t lanes = __ballot_sync(0xffffffffu, take);
      if (lanes == 0) continue;
      const int lane = tid % 32, leader = __ffs(lanes) - 1;
      uint32_t slot = 0;
      if (lane == leader) slot = atomicAdd(&candidate_count, static_cast<uint32_t>(__popc(lanes)));
      slot = __shfl_sync(0xffffffffu, slot, leader) + __popc(lanes & ((1u << lane) - 1));
      if (take && slot < kCandidates) pairs[slot] = compose(keys_here[u], i);
    }
  }
  __syncthreads();
  const int count = static_cast<int>(candidate_count);
  int sorted = 0;  // entries of pairs[] in order; the rest of the k are padding
  if (count >= min(k, n) && count <= kCandidates) {
    int size = 2;
    while (size < count) size <<= 1;
    for (int i = count + tid; i < size; i += kThreads) pairs[i] = 0;
    __syncthreads();
    sort_descending(pairs, size);
    sorted = min(k, count);
  } else {
    // The k-th largest key of the row.
    uint32_t needed = k;
    const uint32_t prefix = kth_largest_key([&](int i) { return rank_key(row[i]); }, n, needed,
                                            histogram, chosen_prefix, still_needed);
    // prefix is the threshold key; `needed` entries equal to it are taken, lowest positions first.
    const int above_count = k - static_cast<int>(needed);
    int equal_taken = 0;
    for (int base = 0; base < n; base += kThreads) {
      const int i = base + tid;
      const uint32_t key = i < n ? rank_key(row[i]) : 0;
      if (i < n && key > prefix) pairs[atomicAdd(&taken_above, 1u)] = compose(key, i);
      const int equal = i < n && key == prefix;
      int rank, total;
      Scan(scan_storage).ExclusiveSum(equal, rank, total);
      if (equal && equal_taken + rank < static_cast<int>(needed)) {
        pairs[above_count + equal_taken + rank] = compose(key, i);
      }
      equal_taken += total;
      __syncthreads();
    }
    int size = 2;
    while (size < k) size <<= 1;
    for (int i = k + tid; i < size; i += kThreads) pairs[i] = 0;
    __syncthreads();
    sort_descending(pairs, size);
    sorted = k;
  }
  for (int i = tid; i < k; i += kThreads) {
    const int64_t out = static_cast<int64_t>(r) * k + i;
    if (i >= sorted) {
      indices[out] = -1;
      values[out] = -INFINITY;
    } else {
      const int position = static_cast<int>(0xffffffffu - static_cast<uint32_t>(pairs[i]));
      indices[out] = position;
      values[out] = row[position];
    }
  }
}

}  // namespace

std::string topk_limit(int64_t k) {
  if (k > TopkTraits::kMaxK) {
    return fmt::format("the CUDA top-k handles k <= {}, got {}", TopkTraits::kMaxK, k);
  }
  return "";
}

void launch_topk(const TopkParams& p) {
  if (p.rows == 0) return;
  require(topk_limit(p.k));
  check(cudaFuncSetAttribute(topk_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(TopkTraits::kSmem)),
        "cudaFuncSetAttribute(topk)");
  check(cudaFuncSetAttribute(topk_kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                             cudaSharedmemCarveoutMaxShared),
        "cudaFuncSetAttribute(topk carveout)");
  topk_kernel<<<p.rows, kThreads, TopkTraits::kSmem, p.stream>>>(p);
  check(cudaGetLastError(), "top-k kernel launch");
}

}  // namespace dsa::cuda
