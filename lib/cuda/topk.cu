// Top-k selection on the GPU (Eq. 2): a radix select of the k-th largest score per row, the
// entries above it, the lowest positions among those equal to it, then a bitonic sort.
#include <cub/block/block_scan.cuh>

#include "dsa/error.hpp"
#include "kernels.cuh"

namespace dsa::cuda {

namespace {

constexpr int kThreads = 1024;

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

__global__ void __launch_bounds__(kThreads)
    topk_kernel(const float* __restrict__ scores, int64_t stride, int64_t first_position, int keys,
                int k, int sort_size, int32_t* __restrict__ indices, float* __restrict__ values) {
  extern __shared__ uint64_t pairs[];  // [sort_size]
  __shared__ uint32_t histogram[256];
  __shared__ uint32_t chosen_prefix, still_needed, taken_above;
  using Scan = cub::BlockScan<int, kThreads>;
  __shared__ typename Scan::TempStorage scan_storage;

  const int r = blockIdx.x, tid = threadIdx.x;
  const float* row = scores + r * stride;
  const int n = static_cast<int>(min(static_cast<int64_t>(keys), first_position + r + 1));
  for (int i = tid; i < sort_size; i += kThreads) pairs[i] = 0;
  __syncthreads();
  if (n <= k) {
    for (int i = tid; i < n; i += kThreads) pairs[i] = compose(rank_key(row[i]), i);
  } else {
    // The k-th largest key, 8 bits at a time from the top.
    uint32_t prefix = 0, mask = 0, needed = k;
    for (int shift = 24; shift >= 0; shift -= 8) {
      for (int b = tid; b < 256; b += kThreads) histogram[b] = 0;
      __syncthreads();
      for (int i = tid; i < n; i += kThreads) {
        const uint32_t key = rank_key(row[i]);
        if ((key & mask) == prefix) atomicAdd(&histogram[(key >> shift) & 255u], 1u);
      }
      __syncthreads();
      if (tid == 0) {
        uint32_t above = 0;
        int b = 255;
        for (; b > 0 && above + histogram[b] < needed; --b) above += histogram[b];
        chosen_prefix = prefix | (static_cast<uint32_t>(b) << shift);
        still_needed = needed - above;
      }
      __syncthreads();
      prefix = chosen_prefix;
      needed = still_needed;
      mask |= 255u << shift;
      __syncthreads();
    }
    // prefix is the threshold key; `needed` entries equal to it are taken, lowest positions first.
    if (tid == 0) taken_above = 0;
    __syncthreads();
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
  }
  __syncthreads();
  // Bitonic sort, descending.
  for (int size = 2; size <= sort_size; size <<= 1) {
    for (int half = size >> 1; half > 0; half >>= 1) {
      for (int i = tid; i < sort_size / 2; i += kThreads) {
        const int lo = 2 * half * (i / half) + (i % half), hi = lo + half;
        const bool descending = (lo & size) == 0;
        const uint64_t a = pairs[lo], b = pairs[hi];
        if ((a < b) == descending) {
          pairs[lo] = b;
          pairs[hi] = a;
        }
      }
      __syncthreads();
    }
  }
  for (int i = tid; i < k; i += kThreads) {
    const uint64_t p = pairs[i];
    const int64_t out = static_cast<int64_t>(r) * k + i;
    if (p == 0) {
      indices[out] = -1;
      values[out] = -INFINITY;
    } else {
      const int position = static_cast<int>(0xffffffffu - static_cast<uint32_t>(p));
      indices[out] = position;
      values[out] = row[position];
    }
  }
}

}  // namespace

void launch_topk(const float* scores, int64_t stride, int rows, int64_t first_position, int keys,
                 int k, int32_t* indices, float* values, cudaStream_t stream) {
  if (rows == 0) return;
  if (k > 8192) fail(ExitCode::usage, "the CUDA top-k handles k <= 8192, got {}", k);
  int sort_size = 2;
  while (sort_size < k) sort_size <<= 1;
  const size_t smem = static_cast<size_t>(sort_size) * sizeof(uint64_t);
  check(cudaFuncSetAttribute(topk_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(smem)),
        "cudaFuncSetAttribute(topk)");
  topk_kernel<<<rows, kThreads, smem, stream>>>(scores, stride, first_position, keys, k, sort_size,
                                                indices, values);
  check(cudaGetLastError(), "top-k kernel launch");
}

}  // namespace dsa::cuda
