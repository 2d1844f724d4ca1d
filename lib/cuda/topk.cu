// Top-k selection on the GPU (Eq. 2): per row, the entries above a threshold estimated from a
// sample, sorted in shared memory (or, when the estimate misses, an exact radix select), in
// descending score and ascending position among equal scores. Few long rows (decode) split each
// row over several blocks instead (topk_split_kernel), to the same result.
#include <fmt/format.h>
#include <cub/block/block_scan.cuh>
#include <cuda/atomic>

#include <algorithm>
#include <cstddef>
#include <map>
#include <mutex>

#include "dsa/error.hpp"
#include "kernels.cuh"
#include "select.cuh"
#include "traits.cuh"

namespace dsa::cuda {

namespace {

constexpr int kThreads = TopkTraits::kThreads;

// Descending order of these is descending score, then ascending position; 0 is padding.
__device__ uint64_t compose(uint32_t key, uint32_t position) {
  return (static_cast<uint64_t>(key) << 32) | (0xffffffffu - position);
}

// Sorts `size` (a power of two) pairs descending, by the whole block (select.cuh).
__device__ void sort_descending(uint64_t* pairs, int size) {
  cuda::sort_descending<kThreads>(pairs, size, static_cast<int>(threadIdx.x),
                                  [] { __syncthreads(); });
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
      // The lowest bin is taken when nothing reaches `needed` (as bin 0 always holds the rest).
      uint32_t above;
      const int b = descending_bin(histogram, needed, above);
      if (lane == 0) {
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

// Few rows (decode: one query row per sequence) leave most SMs idle under one block per row.
// The split path gives each row `segments` blocks, each a contiguous segment of the row, and
// finds the row's k-th largest key exactly by a radix select over the whole row, 12, 10 and 10
// bits of the key, as far as needed: each block counts its segment's keys that match the prefix
// found so far into a histogram in shared memory, adds it into the row's histogram in global
// memory, and waits for the row's other blocks (a barrier of the row's blocks, which a
// cooperative launch keeps resident together). Every block then reads the same histogram and
// picks the same bin. Once the entries from the chosen bin up are at most `limit` (twice k's
// power of two, at most kCandidates), each block writes its entries at or above the bin's
// lowest key to the row's list in global memory; when the whole key does not get there (more
// than `limit` entries tie at the k-th largest key), the ties listed are those of lowest
// position, counted segment by segment. The row's last block to finish orders the list and
// writes the first k: the same selection and order as topk_kernel's. The first pass reads the
// segment from device memory and keeps its keys in shared memory for the later passes.
constexpr int kSplitMinKeys = 16384;  // rows shorter than this are not worth splitting
constexpr int kMinSegment = 4096;     // entries per block at least
constexpr int kMaxSegments = 64;      // blocks per row at most
constexpr int kCacheKeys = 16384;     // keys of its segment a block keeps in shared memory
constexpr int kWarps = kThreads / 32;
constexpr int kMaxBins = 4096;
// The last block orders the list by counting it into kMaxBins buckets of equal width between
// its least and greatest entry, then ranking each entry within its bucket; when a bucket holds
// more than kMaxBucket entries (a list of few distinct scores: ties), the bitonic sort instead.
constexpr int kMaxBucket = 128;
// The most dynamic shared memory a block takes: its segment's keys, or in the last block the
// list and its order (8 + 2 bytes an entry).
constexpr size_t kListEntryBytes = sizeof(uint64_t) + sizeof(uint16_t);
constexpr size_t kCacheBytes = sizeof(uint32_t) * kCacheKeys;
constexpr size_t kListBytes = kListEntryBytes * kCandidates;
constexpr size_t kSplitSmem = kCacheBytes > kListBytes ? kCacheBytes : kListBytes;

// The radix select's levels: level l's bits of the key, from bit level_shift(l) up, and where
// its histogram sits in SplitRow.
__device__ constexpr int level_bits(int level) {
  return level == 0 ? 12 : 10;
}
__device__ constexpr int level_shift(int level) {
  return level == 0 ? 20 : level == 1 ? 10 : 0;
}
__device__ constexpr int level_offset(int level) {
  return level == 0 ? 0 : level == 1 ? 4096 : 5120;
}

// One row's state in global memory: zero before a launch, and zeroed again by the row's last
// block (up to `equal`, which is written before it is read).
struct SplitRow {
  uint32_t histogram[4096 + 1024 + 1024];
  uint32_t arrived[4];           // the row's barriers: one per level, and one for the ties
  uint32_t listed;               // entries in the row's list
  uint32_t finished;             // blocks done listing
  uint32_t equal[kMaxSegments];  // each segment's entries equal to the tied key
  uint32_t padding[2];
};
static_assert(sizeof(SplitRow) % 16 == 0);
constexpr int kStateWords = offsetof(SplitRow, equal) / sizeof(uint32_t);

// Waits until `blocks` blocks of the row have arrived at this barrier; what every thread of
// these blocks wrote before it is visible to all of them after it (as cooperative groups' grid
// sync: the block's barrier, then one thread's fence and arrival).
__device__ void row_barrier(uint32_t* arrived, uint32_t blocks) {
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    ::cuda::atomic_ref<uint32_t, ::cuda::thread_scope_device> counter(*arrived);
    counter.fetch_add(1u, ::cuda::memory_order_release);
    while (counter.load(::cuda::memory_order_acquire) < blocks) __nanosleep(32);
    __threadfence();
  }
  __syncthreads();
}

// Calls visit(i, key, valid) for the entries [begin, end) of `row`, every thread the same number
// of times (valid false past the end), kUnroll loads in flight per thread.
template <typename Visit>
__device__ void for_each_key(const float* __restrict__ row, int begin, int end, Visit visit) {
  constexpr int kUnroll = 8;
  const int tid = threadIdx.x;
  for (int base = begin; base < end; base += kUnroll * kThreads) {
    uint32_t keys[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int i = base + u * kThreads + tid;
      keys[u] = i < end ? rank_key(row[i]) : 0;
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int i = base + u * kThreads + tid;
      visit(i, keys[u], i < end);
    }
  }
}

// Calls visit(i, key, valid) for the entries [begin, end), every thread the same number of
// times (valid false past the end): the first `cached` keys from cache[], four at a time, the
// rest from the row.
template <typename Visit>
__device__ void for_each_entry(const uint32_t* cache, int cached, const float* __restrict__ row,
                               int begin, int end, Visit visit) {
  const int tid = threadIdx.x, quads = cached / 4;
#pragma unroll 2
  for (int q0 = 0; q0 < quads; q0 += kThreads) {
    const int q = q0 + tid;
    const bool valid = q < quads;
    const uint4 keys = valid ? reinterpret_cast<const uint4*>(cache)[q] : make_uint4(0, 0, 0, 0);
    visit(begin + 4 * q + 0, keys.x, valid);
    visit(begin + 4 * q + 1, keys.y, valid);
    visit(begin + 4 * q + 2, keys.z, valid);
    visit(begin + 4 * q + 3, keys.w, valid);
  }
  for (int j0 = 4 * quads; j0 < cached; j0 += kThreads) {
    const int j = j0 + tid;
    const bool valid = j < cached;
    visit(begin + j, valid ? cache[j] : 0u, valid);
  }
  for (int i0 = begin + cached; i0 < end; i0 += kThreads) {
    const int i = i0 + tid;
    const bool valid = i < end;
    visit(i, valid ? rank_key(row[i]) : 0u, valid);
  }
}

// The score whose key is `key`, at `position` of the row: the key's float, read from the row
// only where a key stands for two (-inf and NaN, +0 and -0) and the bits must be the row's.
__device__ float score_of(uint32_t key, int position, const float* __restrict__ row) {
  if (key == 0x007fffffu || key == 0x80000000u) return row[position];
  return key_score(key);
}

// Where bin b of a histogram in shared memory lives: with its lowest 3 bits crossed with the next
// 3 of its 32-bin row, so that a warp reading 8 consecutive bins a thread (the scans) meets no
// bank twice.
__device__ int spread(uint32_t b) {
  return static_cast<int>(b ^ ((b >> 5) & 7u));
}

__device__ uint64_t warp_min(uint64_t x) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    x = min(x, static_cast<uint64_t>(__shfl_xor_sync(0xffffffffu, x, offset)));
  }
  return x;
}

__device__ uint64_t warp_max(uint64_t x) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    x = max(x, static_cast<uint64_t>(__shfl_xor_sync(0xffffffffu, x, offset)));
  }
  return x;
}

__global__ void __launch_bounds__(kThreads, 2)
    topk_split_kernel(const __grid_constant__ TopkParams p, SplitRow* __restrict__ states,
                      uint64_t* __restrict__ lists, int limit, int cache_capacity) {
  const int k = p.k;
  extern __shared__ uint64_t dynamic[];  // the segment's keys; in the last block, the list
  uint32_t* cache = reinterpret_cast<uint32_t*>(dynamic);
  __shared__ uint32_t histogram[kMaxBins];
  __shared__ uint32_t chosen_bin, chosen_above, chosen_count, chosen_mine_above, chosen_mine;
  __shared__ uint32_t list_base, ties_before;
  __shared__ uint32_t warp_count[kWarps];
  __shared__ uint64_t warp_low[kWarps], warp_high[kWarps];
  __shared__ int tie_cutoff;
  __shared__ bool last;
  using Scan = cub::BlockScan<uint32_t, kThreads>;
  using PairScan = cub::BlockScan<uint64_t, kThreads>;
  __shared__ union {
    typename Scan::TempStorage one;
    typename PairScan::TempStorage two;
  } scan_storage;

  const int segment = blockIdx.x, segments = gridDim.x, r = blockIdx.y, tid = threadIdx.x;
  const int warp = tid / 32, lane = tid % 32;
  const uint32_t lower_lanes = (1u << lane) - 1;
  SplitRow& state = states[r];
  const float* __restrict__ row = p.scores + r * p.stride;
  const int n = static_cast<int>(
      min(static_cast<int64_t>(p.keys), visible_keys(p.first_position, r, p.ratio)));
  // Segments of whole 256-entry pieces (aligned loads where the row is), the last one shorter.
  const int64_t length =
      ((static_cast<int64_t>(n) + segments - 1) / segments + 255) & ~int64_t{255};
  const int begin = static_cast<int>(min(static_cast<int64_t>(n), segment * length));
  const int end = static_cast<int>(min(static_cast<int64_t>(n), begin + length));
  // Entries [begin, begin + cached) have their keys in cache[] once the first pass is done.
  const int cached = n > limit ? min(end - begin, cache_capacity) : 0;
  auto key_at = [&](int i) { return i - begin < cached ? cache[i - begin] : rank_key(row[i]); };
  if (tid == 0) chosen_bin = chosen_above = chosen_count = chosen_mine_above = chosen_mine = 0;

  // The list: entries with key > bound, and those equal to it up to position tie_cutoff. Rows of
  // at most `limit` entries list them all (every key is >= 0). `mine`: this block's entries of
  // it, known from its histograms.
  uint32_t bound = 0, ties_taken = 0, mine = end - begin;
  bool tied = false;
  if (n > limit) {
    uint32_t prefix = 0, mask = 0, needed = k, above = 0, mine_above = 0;
    for (int level = 0; level < 3; ++level) {
      const int shift = level_shift(level), bins = 1 << level_bits(level);
      for (int b = tid; b < bins; b += kThreads) histogram[spread(b)] = 0;
      __syncthreads();
      if (level == 0) {
        // From device memory, 16-byte loads where the segment is aligned, keeping the keys.
        int rest = begin;
        if ((reinterpret_cast<uintptr_t>(row + begin) & 15) == 0) {
          constexpr int kUnroll = 4;
          const int vectors = (end - begin) / 4;
          const auto* v = reinterpret_cast<const float4*>(row + begin);
          for (int base = 0; base < vectors; base += kUnroll * kThreads) {
            float4 x[kUnroll];
#pragma unroll
            for (int u = 0; u < kUnroll; ++u) {
              const int q = base + u * kThreads + tid;
              if (q < vectors) x[u] = v[q];
            }
#pragma unroll
            for (int u = 0; u < kUnroll; ++u) {
              const int q = base + u * kThreads + tid;
              if (q >= vectors) continue;
              const uint4 keys = make_uint4(rank_key(x[u].x), rank_key(x[u].y), rank_key(x[u].z),
                                            rank_key(x[u].w));
              if (4 * q + 3 < cached) {
                *reinterpret_cast<uint4*>(cache + 4 * q) = keys;
              } else {
                if (4 * q + 0 < cached) cache[4 * q + 0] = keys.x;
                if (4 * q + 1 < cached) cache[4 * q + 1] = keys.y;
                if (4 * q + 2 < cached) cache[4 * q + 2] = keys.z;
              }
              atomicAdd(&histogram[spread(keys.x >> shift)], 1u);
              atomicAdd(&histogram[spread(keys.y >> shift)], 1u);
              atomicAdd(&histogram[spread(keys.z >> shift)], 1u);
              atomicAdd(&histogram[spread(keys.w >> shift)], 1u);
            }
          }
          rest = begin + 4 * vectors;
        }
        for_each_key(row, rest, end, [&](int i, uint32_t key, bool valid) {
          if (!valid) return;
          if (i - begin < cached) cache[i - begin] = key;
          atomicAdd(&histogram[spread(key >> shift)], 1u);
        });
      } else {
        for_each_entry(cache, cached, row, begin, end, [&](int, uint32_t key, bool valid) {
          if (valid && (key & mask) == prefix) {
            atomicAdd(&histogram[spread((key >> shift) & (bins - 1))], 1u);
          }
        });
      }
      __syncthreads();
      uint32_t* total = state.histogram + level_offset(level);
      for (int b = tid; b < bins; b += kThreads) {
        if (histogram[spread(b)] != 0) atomicAdd(&total[b], histogram[spread(b)]);
      }
      row_barrier(&state.arrived[level], segments);
      // The bin holding the needed-th largest of the keys matching the prefix: each thread scans
      // bins / kThreads bins in descending order (the row's counts, and this block's), after the
      // sums of the bins above them (one scan of both: the row's in the upper half). Exactly one
      // thread finds it, as the keys matching the prefix are at least `needed`.
      constexpr int kMostPer = kMaxBins / kThreads;
      const int per = bins / kThreads, top = bins - 1 - tid * per;
      uint64_t chunk = 0;
#pragma unroll
      for (int t = 0; t < kMostPer; ++t) {
        if (t < per) {
          chunk +=
              static_cast<uint64_t>(__ldcg(&total[top - t])) << 32 | histogram[spread(top - t)];
        }
      }
      uint64_t before;
      PairScan(scan_storage.two).ExclusiveSum(chunk, before);
      uint32_t higher = static_cast<uint32_t>(before >> 32);
      if (higher < needed && needed <= higher + static_cast<uint32_t>(chunk >> 32)) {
        uint32_t row_counts[kMostPer];  // the loads at once, not one after another
#pragma unroll
        for (int t = 0; t < kMostPer; ++t) row_counts[t] = t < per ? __ldcg(&total[top - t]) : 0;
        uint32_t mine_higher = static_cast<uint32_t>(before);
        bool found = false;
#pragma unroll
        for (int t = 0; t < kMostPer; ++t) {
          if (found || t >= per) continue;
          const uint32_t count = row_counts[t], mine_here = histogram[spread(top - t)];
          if (higher + count >= needed) {
            found = true;
            chosen_bin = static_cast<uint32_t>(top - t);
            chosen_above = higher;
            chosen_count = count;
            chosen_mine_above = mine_higher;
            chosen_mine = mine_here;
          } else {
            higher += count;
            mine_higher += mine_here;
          }
        }
      }
      __syncthreads();
      const uint32_t bin = chosen_bin, count = chosen_count;
      higher = chosen_above;
      prefix |= bin << shift;
      mask |= static_cast<uint32_t>(bins - 1) << shift;
      above += higher;
      needed -= higher;
      mine_above += chosen_mine_above;
      bound = prefix;
      if (above + count <= static_cast<uint32_t>(limit)) {
        mine = mine_above + chosen_mine;
        break;  // this bin and up: the list
      }
      if (level == 2) {
        // More than limit entries from the k-th largest key up: all above it, and the `needed`
        // lowest positions of the keys equal to it. This block's equal keys are its last
        // histogram's bin; the segments before it hold ties_before of them.
        tied = true;
        const uint32_t ties_here = chosen_mine;
        if (tid == 0) state.equal[segment] = ties_here;
        row_barrier(&state.arrived[3], segments);
        if (tid == 0) {
          uint32_t sum = 0;
          for (int s = 0; s < segment; ++s) sum += __ldcg(&state.equal[s]);
          ties_before = sum;
        }
        __syncthreads();
        ties_taken = ties_before >= needed ? 0 : min(ties_here, needed - ties_before);
        mine = mine_above + ties_taken;
      }
      __syncthreads();  // chosen_* and the histogram are read before the next level writes them
    }
  }

  // The position of the ties_taken-th entry equal to bound in this segment (-1: none): each
  // warp counts those of a contiguous piece, and the warp whose piece holds it finds it.
  int cutoff = end;
  if (tied) {
    const int piece = (end - begin + kWarps - 1) / kWarps;
    const int from = min(end, begin + warp * piece), to = min(end, from + piece);
    uint32_t equal = 0;
    for (int i0 = from; i0 < to; i0 += 32) {
      const int i = i0 + lane;
      equal += __popc(__ballot_sync(0xffffffffu, i < to && key_at(i) == bound));
    }
    if (lane == 0) warp_count[warp] = equal;
    if (tid == 0) tie_cutoff = -1;
    __syncthreads();
    uint32_t earlier = 0;
    for (int w = 0; w < warp; ++w) earlier += warp_count[w];
    __syncthreads();  // warp_count is reused below
    if (earlier < ties_taken && ties_taken <= earlier + equal) {
      uint32_t wanted = ties_taken - earlier;  // >= 1
      for (int i0 = from; i0 < to; i0 += 32) {
        const int i = i0 + lane;
        const bool is_equal = i < to && key_at(i) == bound;
        const uint32_t lanes = __ballot_sync(0xffffffffu, is_equal);
        if (is_equal && __popc(lanes & lower_lanes) + 1 == wanted) tie_cutoff = i;
        if (static_cast<uint32_t>(__popc(lanes)) >= wanted) break;
        wanted -= __popc(lanes);
      }
    }
    __syncthreads();
    cutoff = tie_cutoff;
  }
  auto listed = [&](int i, uint32_t key, bool valid) {
    return valid && (key > bound || (key == bound && i <= cutoff));
  };

  // This block's entries of the list: a range of the row's list taken for them, then written,
  // one shared atomic per warp and step that has any (at most limit in all).
  if (tid == 0) {
    list_base = atomicAdd(&state.listed, mine);
    warp_count[0] = 0;
  }
  __syncthreads();
  uint64_t* const list = lists + static_cast<int64_t>(r) * limit;  // the row's
  for_each_entry(cache, cached, row, begin, end, [&](int i, uint32_t key, bool valid) {
    const bool take = listed(i, key, valid);
    const uint32_t lanes = __ballot_sync(0xffffffffu, take);
    if (lanes == 0) return;
    const int leader = __ffs(lanes) - 1;
    uint32_t slot = 0;
    if (lane == leader) slot = atomicAdd(&warp_count[0], static_cast<uint32_t>(__popc(lanes)));
    slot = __shfl_sync(0xffffffffu, slot, leader) + __popc(lanes & lower_lanes);
    if (take) list[list_base + slot] = compose(key, static_cast<uint32_t>(i));
  });
  __syncthreads();
  if (tid == 0) {
    __threadfence();
    last = atomicAdd(&state.finished, 1u) == static_cast<uint32_t>(segments - 1);
    if (last) __threadfence();
  }
  __syncthreads();
  if (!last) return;

  // The row's last block: the list is complete (count distinct entries). An entry's rank in
  // descending order is the count of the buckets above its own plus its rank in its bucket.
  const int count = static_cast<int>(__ldcg(&state.listed));
  uint64_t* pairs = dynamic;                                   // [limit]
  auto* order = reinterpret_cast<uint16_t*>(dynamic + limit);  // [limit]
  for (int b = tid; b < kMaxBins; b += kThreads) histogram[spread(b)] = 0;
  uint64_t low = ~0ull, high = 0;
#pragma unroll 4
  for (int j = tid; j < count; j += kThreads) {
    const uint64_t pair = __ldcg(&list[j]);
    pairs[j] = pair;
    low = min(low, pair);
    high = max(high, pair);
  }
  low = warp_min(low);
  high = warp_max(high);
  if (lane == 0) {
    warp_low[warp] = low;
    warp_high[warp] = high;
  }
  __syncthreads();
  for (int w = 0; w < kWarps; ++w) {
    low = min(low, warp_low[w]);
    high = max(high, warp_high[w]);
  }
  const uint64_t span = count > 0 ? high - low : 0;
  const int shift = span < kMaxBins ? 0 : 64 - __clzll(span) - 12;  // span >> shift < 4096
  auto bucket = [&](uint64_t pair) { return static_cast<uint32_t>((pair - low) >> shift); };
  for (int j = tid; j < count; j += kThreads) atomicAdd(&histogram[spread(bucket(pairs[j]))], 1u);
  __syncthreads();
  {
    // Each bucket's start: the entries in the buckets above it (8 buckets a thread, descending).
    constexpr int per = kMaxBins / kThreads;
    const int top = kMaxBins - 1 - tid * per;
    uint32_t chunk = 0, largest = 0;
#pragma unroll
    for (int t = 0; t < per; ++t) {
      chunk += histogram[spread(top - t)];
      largest = max(largest, histogram[spread(top - t)]);
    }
    uint32_t start;
    Scan(scan_storage.one).ExclusiveSum(chunk, start);
#pragma unroll
    for (int t = 0; t < per; ++t) {
      const uint32_t size = histogram[spread(top - t)];
      histogram[spread(top - t)] = start;
      start += size;
    }
    largest = __reduce_max_sync(0xffffffffu, largest);
    if (lane == 0) warp_count[warp] = largest;
  }
  __syncthreads();
  uint32_t largest = 0;
  for (int w = 0; w < kWarps; ++w) largest = max(largest, warp_count[w]);
  const bool bucketed = largest <= kMaxBucket;
  if (bucketed) {
    // Each bucket's entries in order[] (histogram[b] moves on to the end of bucket b, the start
    // of bucket b - 1), then each entry's rank, then order[] by rank.
    for (int j = tid; j < count; j += kThreads) {
      order[atomicAdd(&histogram[spread(bucket(pairs[j]))], 1u)] = static_cast<uint16_t>(j);
    }
    __syncthreads();
    constexpr int kMost = kCandidates / kThreads;  // entries a thread ranks at most
    uint32_t ranks[kMost];
#pragma unroll
    for (int m = 0; m < kMost; ++m) {
      const int j = tid + m * kThreads;
      if (j >= count) break;
      const uint64_t pair = pairs[j];
      const uint32_t b = bucket(pair);
      const uint32_t from = b == kMaxBins - 1 ? 0 : histogram[spread(b + 1)],
                     to = histogram[spread(b)];
      uint32_t rank = from;
      for (uint32_t e = from; e < to; ++e) rank += pairs[order[e]] > pair;
      ranks[m] = rank;
    }
    __syncthreads();
#pragma unroll
    for (int m = 0; m < kMost; ++m) {
      const int j = tid + m * kThreads;
      if (j >= count) break;
      order[ranks[m]] = static_cast<uint16_t>(j);
    }
  } else {
    int size = 2;
    while (size < count) size <<= 1;
    for (int j = count + tid; j < size; j += kThreads) pairs[j] = 0;
    sort_descending(pairs, size);  // begins and ends with a barrier
  }
  __syncthreads();
  for (int i = tid; i < k; i += kThreads) {
    const int64_t out = static_cast<int64_t>(r) * k + i;
    if (i < count) {
      const uint64_t pair = pairs[bucketed ? order[i] : i];
      const int position = static_cast<int>(0xffffffffu - static_cast<uint32_t>(pair));
      p.indices[out] = position;
      p.values[out] = score_of(static_cast<uint32_t>(pair >> 32), position, row);
    } else {
      p.indices[out] = -1;
      p.values[out] = -INFINITY;
    }
  }
  // The row's other blocks are done with its state: zero it for the next launch.
  auto* words = reinterpret_cast<uint32_t*>(&state);
  for (int j = tid; j < kStateWords; j += kThreads) words[j] = 0;
}

}  // namespace

std::string topk_limit(int64_t k) {
  if (k > TopkTraits::kMaxK) {
    return fmt::format("the CUDA top-k handles k <= {}, got {}", TopkTraits::kMaxK, k);
  }
  return "";
}

namespace {

// What the split path needs of a device, found once: its SMs and how many blocks of each kernel
// an SM holds; and its scratch, rows' states and lists for as many rows as the split path takes,
// kept from launch to launch (the kernel leaves the states zeroed), with the event after its
// last use, which every launch on any stream waits for.
struct SplitDevice {
  int sms = 0, single_blocks = 0, split_blocks = 0;  // split_blocks 0: no split path
  int max_rows = 0;
  void* scratch = nullptr;
  cudaEvent_t used = nullptr;
};

SplitDevice find_split_device(int device) {
  SplitDevice d;
  int cooperative = 0;
  check(cudaDeviceGetAttribute(&d.sms, cudaDevAttrMultiProcessorCount, device), "SM count");
  check(cudaDeviceGetAttribute(&cooperative, cudaDevAttrCooperativeLaunch, device),
        "cooperative launch attribute");
  check(cudaFuncSetAttribute(topk_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(TopkTraits::kSmem)),
        "cudaFuncSetAttribute(topk)");
  check(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&d.single_blocks, topk_kernel, kThreads,
                                                      TopkTraits::kSmem),
        "top-k occupancy");
  if (!cooperative || d.single_blocks == 0) return d;
  check(cudaFuncSetAttribute(topk_split_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(kSplitSmem)),
        "cudaFuncSetAttribute(topk split)");
  check(cudaFuncSetAttribute(topk_split_kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                             cudaSharedmemCarveoutMaxShared),
        "cudaFuncSetAttribute(topk split carveout)");
  // At the most shared memory a launch asks for, so that every launch's blocks fit at once.
  check(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&d.split_blocks, topk_split_kernel, kThreads,
                                                      kSplitSmem),
        "top-k split occupancy");
  d.max_rows = (2 * d.sms - 1) / d.single_blocks;
  check(cudaEventCreateWithFlags(&d.used, cudaEventDisableTiming), "cudaEventCreate(top-k)");
  return d;
}

// The split path's scratch of the current device: the states, then the lists.
size_t split_state_bytes(const SplitDevice& d) {
  return sizeof(SplitRow) * d.max_rows;
}
size_t split_bytes(const SplitDevice& d) {
  return split_state_bytes(d) + sizeof(uint64_t) * kCandidates * d.max_rows;
}

std::mutex split_mutex;  // guards every SplitDevice, and orders the launches on its scratch

SplitDevice& split_device() {
  static std::map<int, SplitDevice> devices;
  int device = 0;
  check(cudaGetDevice(&device), "cudaGetDevice");
  auto found = devices.find(device);
  if (found == devices.end()) found = devices.emplace(device, find_split_device(device)).first;
  return found->second;
}

// The split path, where it applies: rows too few to fill the GPU one block each (fewer than
// twice the SMs' worth of blocks), the longest at least kSplitMinKeys entries. False when it
// does not (or the cooperative launch does not fit), and nothing was launched.
bool launch_split(const TopkParams& p) {
  const int64_t longest = std::min<int64_t>(
      p.keys, visible_keys(p.first_position, static_cast<int64_t>(p.rows) - 1, p.ratio));
  if (longest < kSplitMinKeys) return false;
  const std::lock_guard<std::mutex> lock(split_mutex);
  SplitDevice& d = split_device();
  if (d.split_blocks == 0 || p.rows > d.max_rows) return false;
  const int segments = static_cast<int>(
      std::min({static_cast<int64_t>(d.split_blocks) * d.sms / p.rows,
                (longest + kMinSegment - 1) / kMinSegment, static_cast<int64_t>(kMaxSegments)}));
  if (segments < 2) return false;
  // The list's size: twice k's power of two, so that a smooth row's second level nearly always
  // gets there (the chosen bin of 12 + 10 bits holding a few of the row's entries).
  int limit = 2;
  while (limit < p.k) limit <<= 1;
  limit = std::min(2 * limit, kCandidates);
  const int64_t length = (longest + segments - 1) / segments;
  const int cache_capacity = static_cast<int>(std::min<int64_t>(length + 255, kCacheKeys));
  // Under stream capture (a CUDA graph) the scratch is the graph's own, and zeroed in it.
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  check(cudaStreamIsCapturing(p.stream, &capture), "cudaStreamIsCapturing(top-k)");
  const bool captured = capture != cudaStreamCaptureStatusNone;
  void* scratch = d.scratch;
  if (captured) {
    check(cudaMallocAsync(&scratch, split_bytes(d), p.stream), "cudaMallocAsync(top-k)");
    check(cudaMemsetAsync(scratch, 0, split_state_bytes(d), p.stream), "cudaMemsetAsync(top-k)");
  } else {
    check(cudaStreamWaitEvent(p.stream, d.used, 0), "cudaStreamWaitEvent(top-k)");
    if (!scratch) {
      check(cudaMallocAsync(&scratch, split_bytes(d), p.stream), "cudaMallocAsync(top-k)");
      check(cudaMemsetAsync(scratch, 0, split_state_bytes(d), p.stream), "cudaMemsetAsync(top-k)");
      d.scratch = scratch;
    }
  }
  auto* states = static_cast<SplitRow*>(scratch);
  auto* lists = reinterpret_cast<uint64_t*>(static_cast<char*>(scratch) + split_state_bytes(d));
  cudaLaunchAttribute cooperative{};
  cooperative.id = cudaLaunchAttributeCooperative;
  cooperative.val.cooperative = 1;
  const cudaError_t launched =
      launch_with(cooperative, dim3(segments, p.rows), dim3(kThreads),
                  std::max(sizeof(uint32_t) * cache_capacity, kListEntryBytes * limit), p.stream,
                  topk_split_kernel, p, states, lists, limit, cache_capacity);
  if (captured) {
    check(cudaFreeAsync(scratch, p.stream), "cudaFreeAsync(top-k)");
  } else {
    check(cudaEventRecord(d.used, p.stream), "cudaEventRecord(top-k)");
  }
  if (launched == cudaErrorCooperativeLaunchTooLarge) {
    (void)cudaGetLastError();  // the one-block kernel instead
    return false;
  }
  check(launched, "top-k (split) kernel launch");
  return true;
}

}  // namespace

void launch_topk(const TopkParams& p) {
  if (p.rows == 0) return;
  require(topk_limit(p.k));
  if (launch_split(p)) return;
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
