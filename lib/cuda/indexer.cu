// The lightning indexer on the GPU (Eq. 1).
#include <cuda_pipeline.h>
#include <mma.h>

#include <algorithm>
#include <type_traits>

#include <fmt/format.h>

#include "dsa/error.hpp"
#include "kernels.cuh"
#include "traits.cuh"
#include "wgmma.cuh"

namespace dsa::cuda {

namespace {

using namespace nvcuda;

using Bf16 = IndexerBf16Traits;
constexpr int kRows = Bf16::kRows;  // (query, head) rows per block: 128 / H queries
constexpr int kKeyTile = Bf16::kKeyTile;
constexpr int kThreads = Bf16::kThreads;  // 4 warps, 32 rows each
constexpr int kLogitStride = Bf16::kLogitStride;

// The pointers of sequence z = blockIdx.z of a batched launch, read from the kernel's
// parameters in place (__grid_constant__): no copy of the struct in registers or the stack.
#define DSA_INDEXER_SEQUENCE(T, p)                                    \
  const int64_t z = blockIdx.z;                                       \
  const T* __restrict__ q = p.q + z * p.q_step;                       \
  const float* __restrict__ w = p.w + z * p.w_step;                   \
  const T* __restrict__ k = p.k + z * p.k_step;                       \
  const float* __restrict__ k_scale = p.k_scale + z * p.k_scale_step; \
  float* __restrict__ scores = p.scores + z * p.scores_step

__global__ void __launch_bounds__(kThreads)
    indexer_bf16_kernel(const __grid_constant__ IndexerParams<__nv_bfloat16> p, int key_span) {
  DSA_INDEXER_SEQUENCE(__nv_bfloat16, p);
  const int rows = p.rows, heads = p.heads, dim = p.dim, keys = p.keys;
  const int64_t first_position = p.first_position, stride = p.stride;
  extern __shared__ __align__(128) unsigned char smem[];
  const int ld = Bf16::row_stride(dim);
  auto* q_s = reinterpret_cast<__nv_bfloat16*>(smem);
  auto* k_buffers = q_s + kRows * ld;  // two key tiles: one computed on, one arriving
  auto* logits = reinterpret_cast<float*>(k_buffers + 2 * kKeyTile * ld);
  auto* w_s = logits + kRows * kLogitStride;
  auto* scale_buffers = w_s + kRows;

  const int queries_per_block = kRows / heads;
  const int q0 = blockIdx.x * queries_per_block;
  const int q_end = min(rows, q0 + queries_per_block);
  const int tid = threadIdx.x, warp = tid / 32;
  const int chunks = dim / 8;  // 16-byte pieces of a row

  for (int i = tid; i < kRows * chunks; i += kThreads) {
    const int row = i / chunks, c = i % chunks;
    const int query = q0 + row / heads;
    uint4 v = make_uint4(0, 0, 0, 0);
    if (query < q_end) {
      v = reinterpret_cast<const uint4*>(q + (static_cast<int64_t>(query) * heads + row % heads) *
                                                 dim)[c];
    }
    reinterpret_cast<uint4*>(q_s + row * ld)[c] = v;
  }
  for (int row = tid; row < kRows; row += kThreads) {
    const int query = q0 + row / heads;
    w_s[row] = query < q_end ? w[static_cast<int64_t>(query) * heads + row % heads] : 0.0f;
  }
  // This block's share of the keys: [key_begin, key_end).
  const int64_t key_begin = static_cast<int64_t>(blockIdx.y) * key_span;
  const int64_t key_end = min(static_cast<int64_t>(keys), key_begin + key_span);
  const int64_t visible_end = min(key_end, visible_keys(first_position, q_end - 1, p.ratio));
  // Starts copying key tile s0 into buffer `buffer` (cp.async; zeros past the last key).
  auto fetch = [&](int64_t s0, int buffer) {
    __nv_bfloat16* k_s = k_buffers + buffer * kKeyTile * ld;
    for (int i = tid; i < kKeyTile * chunks; i += kThreads) {
      const int row = i / chunks, c = i % chunks;
      const int64_t s = s0 + row;
      if (s < keys) {
        __pipeline_memcpy_async(reinterpret_cast<uint4*>(k_s + row * ld) + c,
                                reinterpret_cast<const uint4*>(k + s * dim) + c, 16);
      } else {
        reinterpret_cast<uint4*>(k_s + row * ld)[c] = make_uint4(0, 0, 0, 0);
      }
    }
    for (int j = tid; j < kKeyTile; j += kThreads) {
      scale_buffers[buffer * kKeyTile + j] = s0 + j < keys ? k_scale[s0 + j] : 0.0f;
    }
    __pipeline_commit();
  };
  if (key_begin < visible_end) fetch(key_begin, 0);
  for (int64_t s0 = key_begin, tile = 0; s0 < visible_end; s0 += kKeyTile, ++tile) {
    const int buffer = tile % 2;
    const __nv_bfloat16* k_s = k_buffers + buffer * kKeyTile * ld;
    const float* scale_s = scale_buffers + buffer * kKeyTile;
    // The other buffer was last read before the previous iteration's final barrier.
    if (s0 + kKeyTile < visible_end) {
      fetch(s0 + kKeyTile, 1 - buffer);
      __pipeline_wait_prior(1);
    } else {
      __pipeline_wait_prior(0);
    }
    __syncthreads();
    // logits [128 rows, 64 keys] = q_s . k_s^T; warp w owns rows 32w .. 32w + 31.
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][4];
    for (int a = 0; a < 2; ++a)
      for (int b = 0; b < 4; ++b) wmma::fill_fragment(acc[a][b], 0.0f);
    for (int kk = 0; kk < dim; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> fa[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major> fb[4];
      for (int a = 0; a < 2; ++a)
        wmma::load_matrix_sync(fa[a], q_s + (warp * 32 + a * 16) * ld + kk, ld);
      for (int b = 0; b < 4; ++b) wmma::load_matrix_sync(fb[b], k_s + (b * 16) * ld + kk, ld);
      for (int a = 0; a < 2; ++a)
        for (int b = 0; b < 4; ++b) wmma::mma_sync(acc[a][b], fa[a], fb[b], acc[a][b]);
    }
    for (int a = 0; a < 2; ++a)
      for (int b = 0; b < 4; ++b)
        wmma::store_matrix_sync(logits + (warp * 32 + a * 16) * kLogitStride + b * 16, acc[a][b],
                                kLogitStride, wmma::mem_row_major);
    __syncthreads();
    // Weighted ReLU sum over the heads of each query.
    for (int i = tid; i < (q_end - q0) * kKeyTile; i += kThreads) {
      const int local = i / kKeyTile, key = i % kKeyTile;
      const int64_t s = s0 + key;
      if (s >= visible_end) continue;
      const int64_t visible = visible_keys(first_position, q0 + local, p.ratio);
      float sum = 0.0f;
      for (int j = 0; j < heads; ++j) {
        const int row = local * heads + j;
        sum += w_s[row] * fmaxf(logits[row * kLogitStride + key], 0.0f);
      }
      scores[(q0 + local) * stride + s] = s < visible ? sum * scale_s[key] : -INFINITY;
    }
    __syncthreads();
  }
  for (int local = 0; local < q_end - q0; ++local) {
    for (int64_t s = max(visible_end, key_begin) + tid; s < key_end; s += kThreads)
      scores[(q0 + local) * stride + s] = -INFINITY;
  }
}

// The fp8 indexer on Hopper (H_I = 64, d_I = 128): per block, GROUPS warpgroups of 2 queries
// each, whose 128 (query, head) rows are the B operand of wgmma (e4m3, in shared memory); each
// tile of 64 keys is the A operand, shared by the warpgroups of the block (one copy of the keys
// from L2 feeds 2 GROUPS queries), so the logits come out transposed, a key per accumulator row
// and a (query, head) per column. A thread holds 16 heads of each query for two keys: the
// weighted ReLU sum over the heads is 16 fused multiply-adds and two shuffles across the lane
// quad, in registers. Key tiles arrive through cp.async, kKeyStages deep.
// COMPRESSED: keys are entries of p.ratio tokens (visible_keys); a separate instantiation, so
// that V3.2's path keeps its registers (the general form cost it 7 % at 128K).
template <int GROUPS, int QUERIES, bool COMPRESSED>
__global__ void __launch_bounds__(IndexerFp8Traits<GROUPS, QUERIES>::kThreads, GROUPS == 1 ? 3 : 2)
    indexer_fp8_kernel(const __grid_constant__ IndexerParams<uint8_t> p, int key_span) {
  namespace wg = wgmma;
  using Traits = IndexerFp8Traits<GROUPS, QUERIES>;
  constexpr int threads = Traits::kThreads;
  constexpr int kFp8Heads = Traits::kHeads, kFp8Dim = Traits::kDim, kFp8Rows = Traits::kRows;
  constexpr int kFp8Queries = Traits::kQueries, kKeyStages = Traits::kStages;
  constexpr uint32_t kFp8TileBytes = Traits::kTileBytes;
  static_assert(Traits::kKeyTile == kKeyTile, "the fp8 and bf16 indexers split keys alike");
  DSA_INDEXER_SEQUENCE(uint8_t, p);
  const int rows = p.rows, keys = p.keys;
  const int64_t first_position = p.first_position, stride = p.stride;
  extern __shared__ unsigned char smem_raw[];
  const uint32_t raw = wg::shared_address(smem_raw);
  // GROUPS query tiles of 128 rows x 128 bytes, swizzled, then kKeyStages tiles of 64 x 128.
  const uint32_t q_s = raw + (1024 - raw % 1024) % 1024;
  const uint32_t k_s = q_s + GROUPS * kFp8Rows * kFp8Dim;

  // The longest rows (the last queries of a causal prefill) first, so the short ones fill the
  // tail of the launch.
  const int block_q0 = (gridDim.x - 1 - blockIdx.x) * GROUPS * kFp8Queries;
  const int block_end = min(rows, block_q0 + GROUPS * kFp8Queries);
  const int tid = threadIdx.x, group = tid / 128, warp = tid % 128 / 32, lane = tid % 32;
  const int q0 = block_q0 + group * kFp8Queries;  // this warpgroup's queries
  const int q_end = min(rows, q0 + kFp8Queries);
  const int pair = 2 * (lane % 4);
  const int key0 = warp * 16 + lane / 4, key1 = key0 + 8;  // this thread's rows of a tile
  // Lane 4i + c of the quad writes query c / 2, key row c % 2 of each tile.
  const int query = (lane % 4) / 2, which = lane % 2;

  for (int i = tid; i < GROUPS * kFp8Rows * 8; i += threads) {
    const int row = i / 8, c = i % 8;  // row of the block's query tiles
    const bool valid = block_q0 + row / kFp8Heads < block_end;
    const uint8_t* source =
        valid ? q + (static_cast<int64_t>(block_q0) * kFp8Heads + row) * kFp8Dim + c * 16 : q;
    wg::copy_async_16(q_s + row * 128 + ((c ^ (row % 8)) * 16), source, valid);
  }
  // The weight of each (query, head) column this thread holds: n-group n, element e.
  float weight[kFp8Rows / 8][2];
#pragma unroll
  for (int n = 0; n < kFp8Rows / 8; ++n) {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int column = n * 8 + pair + e, query = q0 + column / kFp8Heads;
      weight[n][e] = query < q_end ? w[static_cast<int64_t>(q0) * kFp8Heads + column] : 0.0f;
    }
  }
  const int64_t key_begin = static_cast<int64_t>(blockIdx.y) * key_span;
  const int64_t key_end = min(static_cast<int64_t>(keys), key_begin + key_span);
  // Keys visible to the block's last query, and to this warpgroup's last.
  // Keys [0, visible(row)) are visible to query row `row`.
  const auto visible = [&](int64_t row) {
    if constexpr (COMPRESSED) {
      return visible_keys(first_position, row, p.ratio);
    } else {
      return first_position + row + 1;
    }
  };
  const int64_t visible_end = min(key_end, visible(block_end - 1));
  const int64_t group_visible_end = min(key_end, visible(max(q_end, q0) - 1));
  const int64_t tiles =
      visible_end > key_begin ? (visible_end - key_begin + kKeyTile - 1) / kKeyTile : 0;
  // Starts copying tile `tile` into its stage (zeros past the last key); always commits a group
  // so that the wait counts below stay uniform.
  auto fetch = [&](int64_t tile) {
    if (tile < tiles) {
      const uint32_t base = k_s + static_cast<uint32_t>(tile % kKeyStages) * kFp8TileBytes;
      for (int i = tid; i < kKeyTile * 8; i += threads) {
        const int j = i / 8, c = i % 8;
        const int64_t s = key_begin + tile * kKeyTile + j;
        wg::copy_async_16(base + j * 128 + ((c ^ (j % 8)) * 16),
                          k + (s < keys ? s : 0) * kFp8Dim + c * 16, s < keys);
      }
    }
    wg::copy_async_commit();
  };
#pragma unroll
  for (int t = 0; t < kKeyStages - 1; ++t) fetch(t);

  const uint32_t b = q_s + group * kFp8Rows * kFp8Dim;
  // One warpgroup (decode) issues the next fetch while its MMAs run, as nothing else on the
  // block would fill that wait; two fetch before them: under the launch bound of two blocks
  // per SM, the fetch's registers beside the live logits would spill (104 bytes).
  constexpr bool kFetchUnderMma = GROUPS == 1;
  for (int64_t tile = 0; tile < tiles; ++tile) {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(kKeyStages - 2) : "memory");
    wg::fence_shared_for_tensor_cores();
    __syncthreads();  // the tile is in; every thread is done with the stage fetched next
    if (!kFetchUnderMma) fetch(tile + kKeyStages - 1);
    const int64_t tile_begin = key_begin + tile * kKeyTile;
    // A warpgroup whose queries see none of this tile (the block's first queries near the
    // diagonal, or no queries at all) skips it; it still takes its share of the next fetch.
    if (tile_begin >= group_visible_end) {
      if (kFetchUnderMma) fetch(tile + kKeyStages - 1);
      continue;
    }
    // The key's scale is loaded while the tensor cores run.
    const int64_t s = tile_begin + (which ? key1 : key0);
    const float key_scale = s < visible_end ? k_scale[s] : 0.0f;
    float logit[kFp8Rows / 2];
    const uint32_t a = k_s + static_cast<uint32_t>(tile % kKeyStages) * kFp8TileBytes;
    wg::fence();
#pragma unroll
    for (int step = 0; step < kFp8Dim / 32; ++step) {
      if constexpr (kFp8Queries == 2) {
        wg::wgmma_m64n128_e4m3(logit, wg::descriptor(a + step * 32, 16, 1024),
                               wg::descriptor(b + step * 32, 16, 1024), step > 0);
      } else {
        wg::wgmma_m64n64_e4m3(logit, wg::descriptor(a + step * 32, 16, 1024),
                              wg::descriptor(b + step * 32, 16, 1024), step > 0);
      }
    }
    wg::commit();
    if (kFetchUnderMma) fetch(tile + kKeyStages - 1);  // issued while the tensor cores run
    wg::wait<0>();
    if (kFetchUnderMma) wg::fence_operands(logit);
    // Eq. 1: sum over the heads of w . ReLU(logit), per (query, key).
    float sum[kFp8Queries][2] = {};
#pragma unroll
    for (int n = 0; n < kFp8Rows / 8; ++n) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        sum[n * 8 / kFp8Heads][0] += weight[n][e] * fmaxf(logit[4 * n + e], 0.0f);
        sum[n * 8 / kFp8Heads][1] += weight[n][e] * fmaxf(logit[4 * n + 2 + e], 0.0f);
      }
    }
#pragma unroll
    for (int m = 1; m <= 2; m *= 2) {
#pragma unroll
      for (int i = 0; i < kFp8Queries; ++i) {
        sum[i][0] += __shfl_xor_sync(0xffffffffu, sum[i][0], m);
        sum[i][1] += __shfl_xor_sync(0xffffffffu, sum[i][1], m);
      }
    }
    // With one query, lanes of query 1 hold copies and write nothing (q0 + 1 >= q_end).
    float value;
    if constexpr (kFp8Queries == 2) {
      value = query == 0 ? (which ? sum[0][1] : sum[0][0]) : (which ? sum[1][1] : sum[1][0]);
    } else {
      value = which ? sum[0][1] : sum[0][0];
    }
    if (q0 + query < q_end && s < visible_end) {
      scores[static_cast<int64_t>(q0 + query) * stride + s] =
          s < visible(q0 + query) ? value * key_scale : -INFINITY;
    }
  }
  asm volatile("cp.async.wait_group 0;\n" ::: "memory");
  // -inf past what this warpgroup wrote: keys its queries do not see (the tiles it skipped,
  // the block's tiles past the visible keys, and any keys the block never read).
  const int64_t written_end =
      group_visible_end > key_begin
          ? key_begin + (group_visible_end - key_begin + kKeyTile - 1) / kKeyTile * kKeyTile
          : key_begin;
  const int64_t tail = max(key_begin, min(written_end, visible_end));
  for (int local = 0; local < q_end - q0; ++local) {
    for (int64_t s = tail + tid % 128; s < key_end; s += 128)
      scores[(q0 + local) * stride + s] = -INFINITY;
  }
}

__global__ void __launch_bounds__(IndexerF32Traits::kThreads)
    indexer_f32_kernel(const __grid_constant__ IndexerParams<float> p) {
  const float* __restrict__ q = p.q;
  const float* __restrict__ w = p.w;
  const float* __restrict__ k = p.k;
  float* __restrict__ scores = p.scores;
  const int heads = p.heads, dim = p.dim, keys = p.keys;
  const int64_t first_position = p.first_position, stride = p.stride;
  extern __shared__ float q_row[];  // [H, d] of this query
  const int r = blockIdx.x;
  for (int i = threadIdx.x; i < heads * dim; i += blockDim.x)
    q_row[i] = q[static_cast<int64_t>(r) * heads * dim + i];
  __syncthreads();
  const int64_t s = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  if (s >= keys) return;
  if (s >= visible_keys(first_position, r, p.ratio)) {
    scores[r * stride + s] = -INFINITY;
    return;
  }
  float sum = 0.0f;
  for (int j = 0; j < heads; ++j) {
    float dot = 0.0f;
    for (int c = 0; c < dim; ++c) dot += q_row[j * dim + c] * k[s * dim + c];
    sum += w[static_cast<int64_t>(r) * heads + j] * fmaxf(dot, 0.0f);
  }
  scores[r * stride + s] = sum;
}

// Keys per block along gridDim.y: all of them, unless few blocks of queries (decode) would
// leave SMs idle; then the keys are split too, into as many blocks as the GPU holds at once
// (`per_sm` resident blocks of the kernel on each SM, from the occupancy calculator), so that
// one wave covers the launch. Each key's score is computed alike whatever the split.
int key_span_for(int query_blocks, int keys, int per_sm) {
  int device = 0, sms = 0;
  check(cudaGetDevice(&device), "cudaGetDevice");
  check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device),
        "cudaDeviceGetAttribute");
  const int key_tiles = std::max(1, (keys + kKeyTile - 1) / kKeyTile);
  const int splits =
      std::clamp(std::max(2, per_sm) * sms / std::max(1, query_blocks), 1, key_tiles);
  return (key_tiles + splits - 1) / splits * kKeyTile;
}

// Resident blocks per SM of `kernel` at `threads` threads and `smem` bytes of shared memory.
template <typename Kernel>
int blocks_per_sm(Kernel kernel, int threads, size_t smem) {
  int blocks = 0;
  check(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, threads, smem),
        "cudaOccupancyMaxActiveBlocksPerMultiprocessor(indexer)");
  return blocks;
}

}  // namespace

std::string indexer_limit(int heads, int dim) {
  if (heads < 1 || Bf16::kRows % heads != 0 || dim % 16 != 0 || dim > 256) {
    return fmt::format(
        "the CUDA indexer needs H_I dividing {} and d_I a multiple of 16 up to 256, got H_I = {}, "
        "d_I = {}",
        Bf16::kRows, heads, dim);
  }
  return "";
}

std::string indexer_fp8_limit(int heads, int dim) {
  using Traits = IndexerFp8Traits<1>;
  if (heads != Traits::kHeads || dim != Traits::kDim) {
    return fmt::format(
        "the CUDA fp8 tensor-core indexer needs H_I = {} and d_I = {}, got {} and {}",
        Traits::kHeads, Traits::kDim, heads, dim);
  }
  return "";
}

void launch_indexer(const IndexerParams<__nv_bfloat16>& p) {
  if (p.rows == 0 || p.sequences == 0) return;
  require(indexer_limit(p.heads, p.dim));
  const size_t smem = Bf16::smem(p.dim);
  check(cudaFuncSetAttribute(indexer_bf16_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(smem)),
        "cudaFuncSetAttribute(indexer)");
  const int per_block = kRows / p.heads;
  const int query_blocks = (p.rows + per_block - 1) / per_block;
  const int key_span = key_span_for(query_blocks * p.sequences, p.keys,
                                    blocks_per_sm(indexer_bf16_kernel, kThreads, smem));
  const dim3 grid(query_blocks, (std::max(p.keys, 1) + key_span - 1) / key_span, p.sequences);
  indexer_bf16_kernel<<<grid, kThreads, smem, p.stream>>>(p, key_span);
  check(cudaGetLastError(), "indexer kernel launch");
}

void launch_indexer(const IndexerParams<uint8_t>& p) {
  if (p.rows == 0 || p.sequences == 0) return;
  require(indexer_fp8_limit(p.heads, p.dim));
  // Two warpgroups (4 queries) share each key tile, unless there are too few queries (decode).
  auto launch = [&](auto traits) {
    using Traits = decltype(traits);
    constexpr int queries = Traits::kQueries;
    const auto kernel = p.ratio == 1 ? indexer_fp8_kernel<Traits::kGroups, queries, false>
                                     : indexer_fp8_kernel<Traits::kGroups, queries, true>;
    check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               static_cast<int>(Traits::kSmem)),
          "cudaFuncSetAttribute(indexer fp8)");
    const int per_block = Traits::kGroups * Traits::kQueries;
    const int query_blocks = (p.rows + per_block - 1) / per_block;
    const int key_span = key_span_for(query_blocks * p.sequences, p.keys,
                                      blocks_per_sm(kernel, Traits::kThreads, Traits::kSmem));
    const dim3 grid(query_blocks, (std::max(p.keys, 1) + key_span - 1) / key_span, p.sequences);
    kernel<<<grid, Traits::kThreads, Traits::kSmem, p.stream>>>(p, key_span);
  };
  if (p.rows > IndexerFp8Traits<1>::kQueries) {
    launch(IndexerFp8Traits<2>{});
  } else if (p.rows == 2) {
    launch(IndexerFp8Traits<1>{});
  } else {  // a decode step: one query per sequence
    launch(IndexerFp8Traits<1, 1>{});
  }
  check(cudaGetLastError(), "indexer fp8 kernel launch");
}

void launch_indexer(const IndexerParams<float>& p) {
  if (p.rows == 0 || p.keys == 0) return;
  if (p.sequences != 1) fail(ExitCode::usage, "the CUDA f32 indexer takes one sequence a launch");
  const size_t smem = static_cast<size_t>(p.heads) * p.dim * sizeof(float);
  check(cudaFuncSetAttribute(indexer_f32_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(smem)),
        "cudaFuncSetAttribute(indexer f32)");
  constexpr int threads = IndexerF32Traits::kThreads;
  const dim3 grid(p.rows, (p.keys + threads - 1) / threads);
  indexer_f32_kernel<<<grid, threads, smem, p.stream>>>(p);
  check(cudaGetLastError(), "indexer f32 kernel launch");
}

}  // namespace dsa::cuda
