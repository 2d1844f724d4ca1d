// The lightning indexer on the GPU (Eq. 1).
#include <cuda_pipeline.h>
#include <mma.h>

#include <algorithm>
#include <cstdlib>
#include <type_traits>

#include <fmt/format.h>

#include "dsa/error.hpp"
#include "kernels.cuh"
#include "select.cuh"
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

// The fused top-k (indexer_fp8_kernel with TOPK, docs/DESIGN.md §5): each query keeps a list
// of candidates in global memory that always holds its top-k of the keys scored so far. A key
// joins the list (through its warp's staging in shared memory) when its score is not below the
// query's bound; the bound starts from a sample of the row's keys (indexer_topk_sample), and when
// the list could overflow, the query's team selects the list's k largest into its other list (a
// radix select, 8 bits a pass, over the candidates' 64 bits, as far as needed) and makes the
// k-th the bound. A row whose sampled bound passed fewer keys than it selects is flagged for a
// rerun. The scores are never stored. A candidate is (rank_key(score) << 32) | (2^31 - 1 -
// position) << 1 | raw: its order is Eq. 2's (descending score, then ascending position), raw
// marks the two scores whose key stands for two (NaN, -0), so the selected value keeps its bits.
// Here rank_key in integer steps: the sign flips the other bits, then NaN and -0 take their keys.
__device__ __forceinline__ uint64_t candidate(float score, int64_t position) {
  const uint32_t b = __float_as_uint(score);
  const bool nan = (b & 0x7fffffffu) > 0x7f800000u, negative_zero = b == 0x80000000u;
  uint32_t key = b ^ (static_cast<uint32_t>(static_cast<int32_t>(b) >> 31) | 0x80000000u);
  key = nan ? 0x007fffffu : negative_zero ? 0x80000000u : key;
  return (static_cast<uint64_t>(key) << 32) |
         ((0x7fffffffu - static_cast<uint32_t>(position)) << 1) | (nan || negative_zero);
}
__device__ __forceinline__ int candidate_position(uint64_t c) {
  return static_cast<int>(0x7fffffffu - (static_cast<uint32_t>(c) >> 1));
}
__device__ __forceinline__ float candidate_score(uint64_t c) {
  const float score = key_score(static_cast<uint32_t>(c >> 32));
  if ((c & 1) == 0) return score;
  return score == 0.0f ? -0.0f : __uint_as_float(0x7fffffffu);  // NaN ranks as -inf
}

// The rank of the sampled bound: about kSampleRank samples are at or above it. A row is rerun
// when its bound passes fewer than half of the capacity / 2 keys aimed at, about
// P(Poisson(r / 2) >= r) of rows: 2.8e-4 for r = 32, 1.0e-5 for r = 48 (bench/NOTES.md, "The
// sampled bound's rank").
constexpr int kSampleRank = 48;

// Keys of the sample that sets each query's bound before a block scores its keys (a multiple of
// 64; 0 for none): none when the block's last query's keys fit a list, or when a sample would be
// half of them; else about 2 kSampleRank n / capacity of the first query's n keys, at most the
// query's two lists (where they hold it), so that about kSampleRank of them are at or above the
// bound that passes capacity / 2 of the query's keys.
__device__ __forceinline__ int indexer_topk_sample(int64_t n_first, int64_t n_last, int capacity) {
  if (n_last + kKeyTile <= capacity) return 0;
  const int64_t tiles = (2 * kSampleRank * n_first / capacity + kKeyTile - 1) / kKeyTile;
  const int64_t samples = min(tiles * kKeyTile, 2 * static_cast<int64_t>(capacity));
  return 2 * samples > n_first ? 0 : static_cast<int>(samples);
}

// One query's state of the fused top-k in shared memory, kept by the query's team: the two warps
// of its warpgroup that serve it (64 threads; query j of warpgroup g: warps 2j, 2j + 1).
struct QueryTopk {
  uint64_t bound;   // no key below it can be in the query's top-k
  uint64_t prefix;  // the radix select's, shared by the team
  float floor;      // bound's score: no lower score can be taken (-inf with bound 0)
  uint32_t count;   // entries in the current list
  uint32_t list;    // which of the query's two lists is current
  uint32_t needed, done, taken;
  uint32_t histogram[256];
};
constexpr int kTeam = 64;  // threads of a query's team
// Entries a warp stages per query in shared memory before it appends them to the query's list
// (a tile adds at most 16 a warp, so a warp flushes when more than kStaged - 16 wait).
constexpr int kStaged = 64;

// Warpgroup `group`'s barrier (named barrier 5 + group, 128 threads).
__device__ __forceinline__ void group_barrier(int group) {
  if (group == 0) {
    asm volatile("bar.sync 5, 128;\n" ::: "memory");
  } else {
    asm volatile("bar.sync 6, 128;\n" ::: "memory");
  }
}

// Team `id`'s barrier (named barrier id of 64 threads, 1 <= id <= 4; immediate ids, so that the
// kernel holds seven barriers with group_barrier's, not all sixteen).
__device__ __forceinline__ void team_barrier(int id) {
  switch (id) {
    case 1:
      asm volatile("bar.sync 1, 64;\n" ::: "memory");
      break;
    case 2:
      asm volatile("bar.sync 2, 64;\n" ::: "memory");
      break;
    case 3:
      asm volatile("bar.sync 3, 64;\n" ::: "memory");
      break;
    default:
      asm volatile("bar.sync 4, 64;\n" ::: "memory");
      break;
  }
}

// The needed-th largest of list[0, count) (1 <= needed <= count; the entries are distinct), by a
// team (thread t, barrier id): returns T with exactly `needed` entries >= T. Each pass counts the
// digits of the entries that match the prefix found so far (a thread adds a run of equal digits
// with one atomic: the high digits of a list are mostly one value); warp 0 picks the bin that
// holds the needed-th, and the select stops early when that whole bin is needed.
__device__ uint64_t team_kth(const uint64_t* list, int count, uint32_t needed, QueryTopk& st, int t,
                             int id) {
  const int lane = t % 32;
  uint64_t prefix = 0, mask = 0;
  for (int shift = 56; shift >= 0; shift -= 8) {
#pragma unroll
    for (int b = 0; b < 256 / kTeam; ++b) st.histogram[t + b * kTeam] = 0;
    team_barrier(id);
    uint32_t run_bin = 0, run = 0;
    constexpr int kUnroll = 8;  // loads in flight per thread
    for (int base = 0; base < count; base += kUnroll * kTeam) {
      uint64_t c[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int i = base + u * kTeam + t;
        c[u] = i < count ? list[i] : 0;
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int i = base + u * kTeam + t;
        if (i >= count || (c[u] & mask) != prefix) continue;
        const uint32_t bin = static_cast<uint32_t>(c[u] >> shift) & 255u;
        if (run > 0 && bin != run_bin) atomicAdd(&st.histogram[run_bin], run), run = 0;
        run_bin = bin;
        ++run;
      }
    }
    if (run > 0) atomicAdd(&st.histogram[run_bin], run);
    team_barrier(id);
    if (t < 32) {
      uint32_t above;  // some bin reaches `needed`: needed <= count
      const int b = descending_bin(st.histogram, needed, above);
      if (lane == 0) {
        st.prefix = prefix | (static_cast<uint64_t>(b) << shift);
        st.needed = needed - above;
        st.done = st.histogram[b] == needed - above;
      }
    }
    team_barrier(id);
    prefix = st.prefix;
    needed = st.needed;
    mask |= 0xffull << shift;
    if (st.done) break;  // every entry of the bin is taken: none below it
  }
  return prefix;
}

// Copies the entries >= bound of list[0, count) to out (in no particular order) by a team, and
// returns how many there were.
__device__ uint32_t team_copy_from(const uint64_t* list, int count, uint64_t bound, uint64_t* out,
                                   QueryTopk& st, int t, int id) {
  if (t == 0) st.taken = 0;
  team_barrier(id);
  const int lane = t % 32;
  constexpr int kUnroll = 4;  // loads in flight per thread
  for (int base = 0; base < count; base += kUnroll * kTeam) {
    uint64_t c[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int i = base + u * kTeam + t;
      c[u] = i < count ? list[i] : 0;
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const bool take = base + u * kTeam + t < count && c[u] >= bound;
      const uint32_t lanes = __ballot_sync(0xffffffffu, take);
      if (lanes == 0) continue;
      const int leader = __ffs(lanes) - 1;
      uint32_t slot = 0;
      if (lane == leader) slot = atomicAdd(&st.taken, static_cast<uint32_t>(__popc(lanes)));
      slot = __shfl_sync(0xffffffffu, slot, leader) + __popc(lanes & ((1u << lane) - 1));
      if (take) out[slot] = c[u];
    }
  }
  team_barrier(id);
  return st.taken;
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
// TOPK: the scores are not stored; each query's top-k is (the fused top-k above; one block
// along y, so that a block sees its queries' every key).
template <int GROUPS, int QUERIES, bool COMPRESSED, bool TOPK = false>
__global__ void __launch_bounds__(IndexerFp8Traits<GROUPS, QUERIES>::kThreads, GROUPS == 1 ? 3 : 2)
    indexer_fp8_kernel(const __grid_constant__ IndexerParams<uint8_t> p, int key_span,
                       const __grid_constant__ IndexerTopkOutputs top) {
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
  // The fused top-k's rerun scores again only the rows flagged (this thread's team's: redo_mine);
  // a block with none leaves at once, before any copy.
  bool redo_mine = false;
  if constexpr (TOPK) {
    if (top.rerun) {
      const bool flagged0 = q0 < q_end && top.redo[q0] != 0;
      const bool flagged1 = q0 + 1 < q_end && top.redo[q0 + 1] != 0;
      redo_mine = warp / 2 == 0 ? flagged0 : flagged1;
      if (!__syncthreads_or(flagged0 || flagged1)) return;  // the whole block agrees
    }
  }

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
  const int tiles = visible_end > key_begin
                        ? static_cast<int>((visible_end - key_begin + kKeyTile - 1) / kKeyTile)
                        : 0;
  // This thread's share of a key tile: 16-byte chunk fetch_chunk of rows fetch_row + r *
  // kFetchRows, r < kFetchChunks, whose swizzled places differ by r * kFetchRows rows
  // (kFetchRows a multiple of the swizzle's 8), so that a fetch is kFetchChunks copies from one
  // address and one offset.
  constexpr int kFetchChunks = kKeyTile * 8 / threads, kFetchRows = threads / 8;
  static_assert(kFetchRows % 8 == 0 && kFetchChunks * kFetchRows == kKeyTile,
                "a thread's chunks share one swizzle");
  const int fetch_row = tid / 8, fetch_chunk = tid % 8;
  const uint32_t fetch_to = k_s + fetch_row * 128 + ((fetch_chunk ^ (fetch_row % 8)) * 16);
  const uint8_t* const fetch_from = k + (key_begin + fetch_row) * kFp8Dim + fetch_chunk * 16;
  // The rows of the block's keys from this thread's first onwards: those it may copy.
  const int fetch_keys = static_cast<int>(keys - key_begin) - fetch_row;
  // Starts copying tile `tile` into its stage (zeros past the last key); always commits a group
  // so that the wait counts below stay uniform.
  auto fetch = [&](int tile) {
    if (tile < tiles) {
      const uint32_t to = fetch_to + static_cast<uint32_t>(tile) % kKeyStages * kFp8TileBytes;
      const uint8_t* from = fetch_from + static_cast<int64_t>(tile) * kFp8TileBytes;
#pragma unroll
      for (int r = 0; r < kFetchChunks; ++r) {
        const bool valid = tile * kKeyTile + r * kFetchRows < fetch_keys;
        wg::copy_async_16(to + r * kFetchRows * 128, valid ? from + r * kFetchRows * kFp8Dim : k,
                          valid);
      }
    }
    wg::copy_async_commit();
  };
#pragma unroll
  for (int t = 0; t < kKeyStages - 1; ++t) fetch(t);
  // The fused top-k: the block's queries' states after the key stages, and query j's lists. This
  // thread's team serves query `mine` of its warpgroup, with barrier team_id.
  static_assert(!TOPK || (kFp8Queries == 2 &&
                          GROUPS * 2 * sizeof(QueryTopk) + GROUPS * 4 * 2 * kStaged * 8 <=
                              GROUPS * Traits::kTopkStateBytes &&
                          sizeof(QueryTopk) % 8 == 0),
                "the fused top-k's teams and room");
  auto* states = reinterpret_cast<QueryTopk*>(smem_raw + (q_s - raw) + GROUPS * kFp8Rows * kFp8Dim +
                                              kKeyStages * kFp8TileBytes) +
                 group * 2;
  const int capacity = top.capacity, mine = warp / 2, team_thread = tid % kTeam;
  const int team_id = 1 + group * 2 + mine;
  QueryTopk& st = states[mine];

  auto list_of = [&](int j, uint32_t which_list) {
    return top.lists + (static_cast<int64_t>(q0 + j) * 2 + which_list) * capacity;
  };
  // This warp's staging of query j's entries (kStaged each, after the block's states), and how
  // many wait there (the same in every lane).
  uint64_t* staging = reinterpret_cast<uint64_t*>(states - group * 2 + GROUPS * 2) +
                      ((group * 4 + warp) * 2) * kStaged;
  uint32_t staged[2] = {0, 0};
  // Appends this warp's staged entries of query j to its list: one atomic reserves their slots.
  const auto flush = [&](int j) {
    if (staged[j] == 0) return;
    __syncwarp();
    uint32_t base = 0;
    if (lane == 0) base = atomicAdd(&states[j].count, staged[j]);
    base = __shfl_sync(0xffffffffu, base, 0);
    uint64_t* list = list_of(j, states[j].list);
    for (uint32_t i = lane; i < staged[j]; i += 32) list[base + i] = staging[j * kStaged + i];
    staged[j] = 0;
    __syncwarp();
  };
  if constexpr (TOPK) {
    if (team_thread == 0) {
      // On a rerun the rows not flagged are done: a bound of +inf lets only +inf and NaN scores
      // into their lists, which no one reads again.
      const bool frozen = top.rerun && !redo_mine;
      st.bound = frozen ? ~0ull : 0, st.floor = frozen ? INFINITY : -INFINITY;
      st.count = 0, st.list = 0;
    }
    __syncthreads();  // the states are set before any thread reads a count
  }

  // The descriptors of this warpgroup's query tile (B) and of the first key stage (A); a step of
  // the reduction, or another stage, is an add to their address field (wg::advanced).
  const uint64_t b = wg::descriptor(q_s + group * kFp8Rows * kFp8Dim, 16, 1024);
  const uint64_t a0 = wg::descriptor(k_s, 16, 1024);
  // One warpgroup (decode) issues the next fetch while its MMAs run, as nothing else on the
  // block would fill that wait; two fetch before them: under the launch bound of two blocks
  // per SM, the fetch's registers beside the live logits would spill (104 bytes).
  constexpr bool kFetchUnderMma = GROUPS == 1;
  // The fused top-k's sample: Eq. 1 for the tile of 64 keys in the stage at shared address `a`,
  // this lane's score (query `query`, key row key0 or key1) before its key's scale. The tile loop
  // below spells the same steps out: called from there, this form moved ptxas to spill 24 bytes
  // in V3.2's kernel.
  const auto tile_scores = [&](uint64_t a) {
    float logit[kFp8Rows / 2];
    wg::fence();
#pragma unroll
    for (int step = 0; step < kFp8Dim / 32; ++step) {
      if constexpr (kFp8Queries == 2) {
        wg::wgmma_m64n128_e4m3(logit, wg::advanced(a, step * 32), wg::advanced(b, step * 32),
                               step > 0);
      } else {
        wg::wgmma_m64n64_e4m3(logit, wg::advanced(a, step * 32), wg::advanced(b, step * 32),
                              step > 0);
      }
    }
    wg::commit();
    wg::wait<0>();
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
    return value;
  };
  if constexpr (TOPK) {
    // The bound from a sample (not on a rerun): `samples` keys evenly spaced over the keys the
    // block's first query sees, scored in the last key stage (the prologue fills the others),
    // give each query the bound that about top.target of its keys pass (indexer_topk_sample).
    const int64_t n_first = min(static_cast<int64_t>(keys), visible(block_q0));
    const int64_t n_last = min(static_cast<int64_t>(keys), visible(block_end - 1));
    const int samples =
        top.rerun ? 0 : indexer_topk_sample(n_first, n_last, capacity);  // block-uniform
    const uint32_t stage = k_s + (kKeyStages - 1) * kFp8TileBytes;
    const auto sample_key = [&](int i) { return static_cast<int64_t>(i) * n_first / samples; };
    for (int t = 0; t < samples; t += kKeyTile) {
      for (int i = tid; i < kKeyTile * 8; i += threads) {
        const int j = i / 8, c = i % 8;
        wg::copy_async_16(stage + j * 128 + ((c ^ (j % 8)) * 16),
                          k + sample_key(t + j) * kFp8Dim + c * 16, true);
      }
      wg::copy_async_commit();
      asm volatile("cp.async.wait_group 0;\n" ::: "memory");
      wg::fence_shared_for_tensor_cores();
      __syncthreads();
      const int row = which ? key1 : key0;
      const int64_t position = sample_key(t + row);
      const float key_scale = k_scale[position];
      const float value = tile_scores(wg::advanced(a0, (kKeyStages - 1) * kFp8TileBytes));
      // Past a list's capacity the sample runs on into the query's second list (contiguous).
      if (q0 + query < q_end) list_of(query, 0)[t + row] = candidate(value * key_scale, position);
      __syncthreads();  // the stage is free again, the samples are in
    }
    if (samples > 0 && q0 + mine < q_end) {
      const int64_t n = min(static_cast<int64_t>(keys), visible(q0 + mine));
      // Where the lists cap the sample (n > capacity^2 / (4 kSampleRank)), the rank stays at
      // the uncapped sample's (kSampleRank for the default target): the bound then passes more
      // than the target, which costs compactions, where a smaller rank would cost reruns.
      const int64_t uncapped =
          (2 * kSampleRank * static_cast<int64_t>(top.target) + capacity - 1) / capacity;
      const int64_t rank = max((static_cast<int64_t>(samples) * top.target + n - 1) / n,
                               min(uncapped, static_cast<int64_t>(samples) - 1));
      if (rank < samples) {
        const uint64_t bound = team_kth(list_of(mine, 0), samples, static_cast<uint32_t>(rank), st,
                                        team_thread, team_id);
        if (team_thread == 0)
          st.bound = bound, st.floor = key_score(static_cast<uint32_t>(bound >> 32));
      }
    }
  }
  // This lane's query: the keys it sees (none past q_end), and its row of scores.
  const int64_t visible_query = q0 + query < q_end ? visible(q0 + query) : 0;
  float* const scores_row = scores + static_cast<int64_t>(q0 + query) * stride;
  for (int tile = 0; tile < tiles; ++tile) {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(kKeyStages - 2) : "memory");
    wg::fence_shared_for_tensor_cores();
    // The fused top-k: a list that this tile could overflow keeps its k largest, and the bound
    // rises to the k-th. Between two checks each of a warpgroup's 4 warps appends at most kStaged
    // entries to a list. Warps flush at their own pace, so the threads' counts may differ here;
    // the block's barrier ORs what they saw, and the last warp to flush saw every flush.
    const auto due = [&](int j) {
      return q0 + j < q_end && states[j].count + 4 * kStaged > static_cast<uint32_t>(capacity);
    };
    bool compact = false;
    if constexpr (TOPK) {
      // the tile is in; every thread is done with the stage fetched next
      compact = __syncthreads_or(due(0) || due(1));
    } else {
      __syncthreads();  // the tile is in; every thread is done with the stage fetched next
    }
    if (!kFetchUnderMma) fetch(tile + kKeyStages - 1);
    if (TOPK && compact) {
      flush(0), flush(1);
      group_barrier(group);  // the lists hold every entry, and the counts stay until the tile
      const bool due_mine = due(mine);
      uint64_t bound = 0;
      uint32_t kept = 0;
      if (due_mine) {
        const uint64_t* from = list_of(mine, st.list);
        const int count = static_cast<int>(st.count);
        bound = team_kth(from, count, top.k, st, team_thread, team_id);
        kept = team_copy_from(from, count, bound, list_of(mine, st.list ^ 1u), st, team_thread,
                              team_id);
      }
      group_barrier(group);
      if (due_mine && team_thread == 0) {
        st.bound = bound, st.count = kept, st.list ^= 1u;
        st.floor = key_score(static_cast<uint32_t>(bound >> 32));
      }
      group_barrier(group);
    }
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
    const uint64_t a = wg::advanced(a0, static_cast<uint32_t>(tile) % kKeyStages * kFp8TileBytes);
    wg::fence();
#pragma unroll
    for (int step = 0; step < kFp8Dim / 32; ++step) {
      if constexpr (kFp8Queries == 2) {
        wg::wgmma_m64n128_e4m3(logit, wg::advanced(a, step * 32), wg::advanced(b, step * 32),
                               step > 0);
      } else {
        wg::wgmma_m64n64_e4m3(logit, wg::advanced(a, step * 32), wg::advanced(b, step * 32),
                              step > 0);
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
    if constexpr (TOPK) {
      // A score below the bound's cannot be in the top-k: one comparison screens it, and a warp
      // none of whose scores pass goes on. The rest join the list: those equal to the bound's
      // score past its position, and NaN (which ranks as -inf), are more than the list needs,
      // never fewer.
      const float score = value * key_scale;
      const uint32_t taken = __ballot_sync(
          0xffffffffu, s < visible_end && s < visible_query && !(score < states[query].floor));
      if (taken != 0) {
        const uint64_t c = candidate(score, s);
        // Lanes 4i and 4i + 1 hold query 0's scores, 4i + 2 and 4i + 3 query 1's.
#pragma unroll
        for (int j = 0; j < kFp8Queries; ++j) {
          const uint32_t lanes = taken & (j == 0 ? 0x33333333u : 0xccccccccu);
          if (lanes == 0) continue;
          if (lanes & (1u << lane))
            staging[j * kStaged + staged[j] + __popc(lanes & ((1u << lane) - 1))] = c;
          staged[j] += __popc(lanes);
          if (staged[j] > kStaged - 16) flush(j);
        }
      }
    } else if (q0 + query < q_end && s < visible_end) {
      scores_row[s] = s < visible_query ? value * key_scale : -INFINITY;
    }
  }
  asm volatile("cp.async.wait_group 0;\n" ::: "memory");
  if constexpr (TOPK) {
    flush(0), flush(1);
    // Each query's top-k from its list, sorted by its team in its own 16 KB of the block's query
    // tiles and key stages (64 KB, free once every MMA of the block is done): k <= 2048 entries.
    static_assert(GROUPS * kFp8Rows * kFp8Dim + kKeyStages * kFp8TileBytes >=
                      GROUPS * 2 * kIndexerTopkMaxK * sizeof(uint64_t),
                  "room to sort every query's top-k");
    __syncthreads();  // every entry is in, every MMA done
    const int64_t visible_mine = min(static_cast<int64_t>(keys), visible(q0 + mine));
    const bool finishes = q0 + mine < q_end && (!top.rerun || redo_mine);
    // A sampled bound that passed fewer keys than the query selects: the rerun scores it again.
    if (finishes && st.bound != 0 && st.count < min(static_cast<int64_t>(top.k), visible_mine)) {
      if (team_thread == 0) {
        top.redo[q0 + mine] = 1;
        atomicAdd(top.redo + rows, 1u);
      }
    } else if (finishes) {
      auto* sorted = reinterpret_cast<uint64_t*>(smem_raw + (q_s - raw)) +
                     (group * 2 + mine) * kIndexerTopkMaxK;
      const uint64_t* list = list_of(mine, st.list);
      const int count = static_cast<int>(st.count);
      int m = count;
      if (count > top.k) {
        const uint64_t bound = team_kth(list, count, top.k, st, team_thread, team_id);
        m = static_cast<int>(team_copy_from(list, count, bound, sorted, st, team_thread, team_id));
      } else {
        for (int i = team_thread; i < count; i += kTeam) sorted[i] = list[i];
      }
      int size = 1;
      while (size < m) size <<= 1;
      for (int i = m + team_thread; i < size; i += kTeam) sorted[i] = 0;
      sort_descending<kTeam>(sorted, size, team_thread, [team_id] { team_barrier(team_id); });
      const int64_t out = static_cast<int64_t>(q0 + mine) * top.k;
      for (int i = team_thread; i < top.k; i += kTeam) {
        top.indices[out + i] = i < m ? candidate_position(sorted[i]) : -1;
        top.values[out + i] = i < m ? candidate_score(sorted[i]) : -INFINITY;
      }
    }
    return;
  }
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
    kernel<<<grid, Traits::kThreads, Traits::kSmem, p.stream>>>(p, key_span, IndexerTopkOutputs{});
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

std::string indexer_topk_limit(int heads, int dim, int64_t k) {
  std::string why = indexer_fp8_limit(heads, dim);
  if (why.empty() && (k < 1 || k > kIndexerTopkMaxK)) {
    why = fmt::format("the CUDA indexer's fused top-k takes 1 <= k <= {}, got k = {}",
                      kIndexerTopkMaxK, k);
  }
  return why;
}

namespace {
// Entries per candidate list: four times k's power of two (at least 1024), so that the sampled
// bound's capacity / 2 admissions are at least twice k, and a compaction frees half of it.
int indexer_topk_capacity(int64_t k) {
  int capacity = 1024;
  while (capacity < 4 * k) capacity *= 2;
  return capacity;
}
}  // namespace

int64_t indexer_topk_scratch(int rows, int64_t k) {
  // Two lists a row, then the rerun's flags and count (uint32, rows + 1 of them).
  return static_cast<int64_t>(rows) * 2 * indexer_topk_capacity(k) + (rows + 2) / 2;
}

bool indexer_topk_preferred(int rows, int64_t keys) {
  if (keys > kIndexerTopkPreferredKeys) return false;
  int device = 0, sms = 0;
  check(cudaGetDevice(&device), "cudaGetDevice");
  check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device),
        "cudaDeviceGetAttribute");
  using Traits = IndexerFp8Traits<2>;
  return rows >= Traits::kGroups * Traits::kQueries * sms;
}

void launch_indexer_topk(const IndexerParams<uint8_t>& p, const IndexerTopkOutputs& out) {
  if (p.rows == 0) return;
  require(indexer_topk_limit(p.heads, p.dim, out.k));
  if (p.sequences != 1) fail(ExitCode::usage, "the CUDA fused top-k takes one sequence a launch");
  using Traits = IndexerFp8Traits<2>;
  const auto kernel =
      p.ratio == 1 ? indexer_fp8_kernel<2, 2, false, true> : indexer_fp8_kernel<2, 2, true, true>;
  constexpr size_t smem = Traits::kSmem + Traits::kGroups * Traits::kTopkStateBytes;
  check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(smem)),
        "cudaFuncSetAttribute(indexer top-k)");
  IndexerTopkOutputs top = out;
  top.capacity = indexer_topk_capacity(out.k);
  top.redo =
      reinterpret_cast<uint32_t*>(out.lists + static_cast<int64_t>(p.rows) * 2 * top.capacity);
  top.rerun = false;
  // A test's knob: DSA_FUSED_TOPK_TARGET sets the keys a sampled bound aims to pass (far below k,
  // most rows take the rerun; near the capacity, the compactions), within [1, capacity - 64].
  top.target = top.capacity / 2;
  if (const char* target = std::getenv("DSA_FUSED_TOPK_TARGET")) {
    top.target = std::clamp(std::atoi(target), 1, top.capacity - kKeyTile);
  }
  const int per_block = Traits::kGroups * Traits::kQueries;
  const dim3 grid((p.rows + per_block - 1) / per_block, 1, 1);
  check(cudaMemsetAsync(top.redo, 0, (p.rows + 1) * sizeof(uint32_t), p.stream),
        "cudaMemsetAsync(indexer top-k)");
  kernel<<<grid, Traits::kThreads, smem, p.stream>>>(p, std::max(p.keys, 1), top);
  check(cudaGetLastError(), "indexer top-k kernel launch");
  // Rows whose sampled bound passed fewer keys than they select (rare: the sample's rank is
  // kSampleRank, so about 1 in 10^5 rows) are scored again, with no bound; the count comes back
  // first, so this call waits for the launch.
  uint32_t redo = 0;
  check(cudaMemcpyAsync(&redo, top.redo + p.rows, sizeof redo, cudaMemcpyDeviceToHost, p.stream),
        "cudaMemcpyAsync(indexer top-k)");
  check(cudaStreamSynchronize(p.stream), "indexer top-k kernel");
  if (redo > 0) {
    top.rerun = true;
    kernel<<<grid, Traits::kThreads, smem, p.stream>>>(p, std::max(p.keys, 1), top);
    check(cudaGetLastError(), "indexer top-k rerun launch");
  }
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
