// MQA attention (MLA's latent cache) on the GPU, over selected entries or every visible one:
// tiles of keys gathered into shared memory, q . k and p . v on the tensor cores, the softmax
// statistics in f32 (online_softmax.cuh, shared by both kernels).
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <mma.h>

#include <algorithm>
#include <limits>
#include <type_traits>

#include <fmt/format.h>

#include "dsa/error.hpp"
#include "kernels.cuh"
#include "mla_tiles.cuh"
#include "online_softmax.cuh"
#include "traits.cuh"
#include "wgmma.cuh"

namespace dsa::cuda {

namespace {

using namespace nvcuda;

// The pointers of sequence blockIdx.z of a batched launch.
struct Sequence {
  const __nv_bfloat16* q;
  const __nv_bfloat16* kv;
  const uint8_t* kv_fp8;            // null: the bf16 cache
  const int32_t* indices;           // null: dense
  const __nv_bfloat16* compressed;  // V4's entries
  const uint8_t* compressed_fp8;    // V4's entries in the fp8 cache
  float* out;
  float* lse;
  __device__ explicit Sequence(const AttentionParams& p) {
    const int64_t z = blockIdx.z;
    q = p.q + z * p.q_step;
    kv = p.kv ? p.kv + z * p.kv_step : nullptr;
    kv_fp8 = p.kv_fp8 ? p.kv_fp8 + z * p.kv_fp8_step : nullptr;
    indices = p.indices ? p.indices + z * p.indices_step : nullptr;
    compressed = p.compressed ? p.compressed + z * p.compressed_step : nullptr;
    compressed_fp8 = p.compressed_fp8 ? p.compressed_fp8 + z * p.compressed_fp8_step : nullptr;
    out = p.out + z * p.out_step;
    lse = p.lse + z * p.lse_step;
  }
};

// DeepSeek-V4's row at `position` (AttentionParams' V4 fields): the raw tokens of its window, and
// its compressed entries (the selection's width, every visible one, or none).
__host__ __device__ inline int64_t v4_window_tokens(const AttentionParams& p, int64_t position) {
  return position + 1 < p.window ? position + 1 : p.window;
}
__host__ __device__ inline int64_t v4_entries(const AttentionParams& p, int64_t position) {
  if (p.indices) return p.k;
  if (p.ratio == 0) return 0;
  const int64_t visible = (position + 1) / p.ratio;
  return visible < p.entries ? visible : p.entries;
}

// The wmma kernel (WmmaAttentionTraits): 64 query heads per block in 8 warps; keys in tiles of
// 32. Two passes over the selection: the first finds each head's softmax max and sum, the
// second accumulates p . v with the final max, so the 64 x d_v output stays in registers (16
// accumulator tiles per warp) with no rescaling. q . k is computed twice: 1.5x the arithmetic,
// none of the shared-memory traffic of an accumulator that lives in shared memory.
using Wmma = WmmaAttentionTraits;

struct WmmaLayout {
  int ld_qk;
  size_t q, kv, score, prob, stage, stats, slot, bytes;
  __host__ __device__ explicit WmmaLayout(int d_qk) : ld_qk(d_qk + 8) {
    q = 0;
    kv = q + sizeof(__nv_bfloat16) * Wmma::kHeads * ld_qk;
    score = kv + sizeof(__nv_bfloat16) * Wmma::kKeyTile * ld_qk;
    prob = score + sizeof(float) * Wmma::kHeads * Wmma::kScoreStride;
    stage = prob + sizeof(__nv_bfloat16) * Wmma::kHeads * Wmma::kProbStride;
    stats = stage + sizeof(float) * Wmma::kWarps * 16 * 16;
    slot = stats + sizeof(OnlineSoftmax) * Wmma::kHeads;
    bytes = slot + sizeof(int) * Wmma::kKeyTile;
  }
};

__global__ void __launch_bounds__(Wmma::kThreads)
    mqa_kernel(const __grid_constant__ AttentionParams p) {
  const Sequence sequence(p);
  const __nv_bfloat16* __restrict__ q = sequence.q;
  const __nv_bfloat16* __restrict__ kv = sequence.kv;
  const int32_t* __restrict__ indices = sequence.indices;
  float* __restrict__ out = sequence.out;
  float* __restrict__ lse = sequence.lse;
  const int k = p.k, heads = p.heads, d_qk = p.d_qk, d_v = p.d_v;
  constexpr int kHeads = Wmma::kHeads, kKeyTile = Wmma::kKeyTile, kThreads = Wmma::kThreads;
  constexpr int kScoreStride = Wmma::kScoreStride, kProbStride = Wmma::kProbStride;
  constexpr int kMaxOutputTiles = Wmma::kMaxOutputTiles;
  extern __shared__ __align__(128) unsigned char smem[];
  const WmmaLayout layout(d_qk);
  auto* q_s = reinterpret_cast<__nv_bfloat16*>(smem + layout.q);
  auto* kv_s = reinterpret_cast<__nv_bfloat16*>(smem + layout.kv);
  auto* score_s = reinterpret_cast<float*>(smem + layout.score);
  auto* prob_s = reinterpret_cast<__nv_bfloat16*>(smem + layout.prob);
  auto* stage = reinterpret_cast<float*>(smem + layout.stage);          // [warp][16 x 16]
  auto* stats = reinterpret_cast<OnlineSoftmax*>(smem + layout.stats);  // [head]
  auto* slot = reinterpret_cast<int*>(smem + layout.slot);

  const int r = blockIdx.x, h0 = blockIdx.y * kHeads;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int ld = layout.ld_qk;
  const int chunks = d_qk / 8;
  const int64_t position = p.first_position + r;
  const int64_t entries = indices ? k : position + 1;
  const float scale2 = p.scale * kLog2e;

  for (int i = tid; i < kHeads * chunks; i += kThreads) {
    const int h = i / chunks, c = i % chunks;
    uint4 v = make_uint4(0, 0, 0, 0);
    if (h0 + h < heads) {
      v = reinterpret_cast<const uint4*>(q + (static_cast<int64_t>(r) * heads + h0 + h) * d_qk)[c];
    }
    reinterpret_cast<uint4*>(q_s + h * ld)[c] = v;
  }
  for (int h = tid; h < kHeads; h += kThreads) stats[h] = OnlineSoftmax{};

  // Gathers tile e0 of the selection into kv_s and computes score_s = q_s . kv_s^T.
  auto load_and_score = [&](int64_t e0) {
    __syncthreads();
    for (int j = tid; j < kKeyTile; j += kThreads) {
      const int64_t e = e0 + j;
      int s = -1;
      if (e < entries) s = indices ? indices[static_cast<int64_t>(r) * k + e] : static_cast<int>(e);
      slot[j] = s;
    }
    __syncthreads();
    for (int i = tid; i < kKeyTile * chunks; i += kThreads) {
      const int j = i / chunks, c = i % chunks;
      uint4 v = make_uint4(0, 0, 0, 0);
      if (slot[j] >= 0)
        v = reinterpret_cast<const uint4*>(kv + static_cast<int64_t>(slot[j]) * d_qk)[c];
      reinterpret_cast<uint4*>(kv_s + j * ld)[c] = v;
    }
    __syncthreads();
    const int a = warp / 2, b = warp % 2;  // 4 x 2 tiles of 16 x 16, one per warp
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
    wmma::fill_fragment(acc, 0.0f);
    for (int kk = 0; kk < d_qk; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> fa;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major> fb;
      wmma::load_matrix_sync(fa, q_s + a * 16 * ld + kk, ld);
      wmma::load_matrix_sync(fb, kv_s + b * 16 * ld + kk, ld);
      wmma::mma_sync(acc, fa, fb, acc);
    }
    wmma::store_matrix_sync(score_s + a * 16 * kScoreStride + b * 16, acc, kScoreStride,
                            wmma::mem_row_major);
    __syncthreads();
  };

  // Pass 1: each head's max and sum of exp over the selection.
  for (int64_t e0 = 0; e0 < entries; e0 += kKeyTile) {
    load_and_score(e0);
    if (tid < kHeads) {
      const float* logits = score_s + tid * kScoreStride;
      float tile_max = -INFINITY;
      for (int j = 0; j < kKeyTile; ++j) {
        if (slot[j] >= 0) tile_max = fmaxf(tile_max, logits[j] * scale2);
      }
      OnlineSoftmax row = stats[tid];
      row.advance(tile_max);
      for (int j = 0; j < kKeyTile; ++j) {
        if (slot[j] >= 0) row.sum += row.probability(logits[j] * scale2);
      }
      stats[tid] = row;
    }
  }
  // Pass 2: out = sum_s exp(score - max) v_s, in registers. Warp w owns head tile w % 4 and
  // one half of the value columns (warps 0-3 the first, 4-7 the second).
  const int head_tile = warp % 4;
  const int first_half = (d_v / 16 + 1) / 2;
  const int col0 = warp < 4 ? 0 : first_half;
  const int col_tiles = warp < 4 ? first_half : d_v / 16 - first_half;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[kMaxOutputTiles];
#pragma unroll
  for (int t = 0; t < kMaxOutputTiles; ++t) wmma::fill_fragment(acc[t], 0.0f);
  for (int64_t e0 = 0; e0 < entries; e0 += kKeyTile) {
    load_and_score(e0);
    for (int i = tid; i < kHeads * kKeyTile; i += kThreads) {
      const int h = i / kKeyTile, j = i % kKeyTile;
      const float probability =
          slot[j] >= 0 ? stats[h].probability(score_s[h * kScoreStride + j] * scale2) : 0.0f;
      prob_s[h * kProbStride + j] = __float2bfloat16(probability);
    }
    __syncthreads();
    wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> fa[kKeyTile / 16];
#pragma unroll
    for (int kk = 0; kk < kKeyTile / 16; ++kk) {
      wmma::load_matrix_sync(fa[kk], prob_s + head_tile * 16 * kProbStride + kk * 16, kProbStride);
    }
#pragma unroll
    for (int t = 0; t < kMaxOutputTiles; ++t) {
      if (t < col_tiles) {
#pragma unroll
        for (int kk = 0; kk < kKeyTile / 16; ++kk) {
          wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::row_major> fb;
          wmma::load_matrix_sync(fb, kv_s + kk * 16 * ld + (col0 + t) * 16, ld);
          wmma::mma_sync(acc[t], fa[kk], fb, acc[t]);
        }
      }
    }
  }
  // Normalize and write, one 16 x 16 tile at a time through this warp's staging area.
  float* my_stage = stage + warp * 256;
#pragma unroll
  for (int t = 0; t < kMaxOutputTiles; ++t) {
    if (t < col_tiles) {
      wmma::store_matrix_sync(my_stage, acc[t], 16, wmma::mem_row_major);
      __syncwarp();
      for (int i = lane; i < 256; i += 32) {
        const int hl = i / 16, c = i % 16;
        const int h = head_tile * 16 + hl;
        if (h0 + h < heads) {
          const float sum = stats[h].sum;
          out[(static_cast<int64_t>(r) * heads + h0 + h) * d_v + (col0 + t) * 16 + c] =
              sum > 0 ? my_stage[i] / sum : 0.0f;
        }
      }
      __syncwarp();
    }
  }
  for (int h = tid; h < kHeads; h += kThreads) {
    if (h0 + h >= heads) continue;
    lse[static_cast<int64_t>(r) * heads + h0 + h] = stats[h].lse(stats[h].sum);
  }
}

// Where split decoding keeps its partials in AttentionParams::partial: the outputs of every
// (sequence, split) in that order, [rows, heads, d_v] each, then their lse, [rows, heads] each.
struct PartialLayout {
  int64_t out_step, lse_step, lse_offset;
  __host__ __device__ PartialLayout(const AttentionParams& p, int splits)
      : out_step(static_cast<int64_t>(p.rows) * p.heads * p.d_v),
        lse_step(static_cast<int64_t>(p.rows) * p.heads),
        lse_offset(static_cast<int64_t>(p.sequences) * splits * out_step) {}
  __host__ __device__ int64_t floats(const AttentionParams& p, int splits) const {
    return lse_offset + static_cast<int64_t>(p.sequences) * splits * lse_step;
  }
};

// Merges the splits' partials of one (row, head) per block (blockIdx.x = r * heads + h,
// blockIdx.z the sequence): each split's output is normalized by its own sum, so the merged
// one weighs split i by exp(lse_i - lse), lse = log sum_i exp(lse_i). Splits that saw nothing
// (lse -inf) weigh nothing; a row with nothing at all gets zeros and -inf, as one block gives.
// One warp turns the splits' lse into weights once (kMaxSplits <= 32); then each thread's
// column pairs of every split are loaded together, none waiting on another.
__global__ void __launch_bounds__(128)
    combine_splits(const __grid_constant__ AttentionParams p, int splits) {
  static_assert(kMaxSplits <= 32, "one lane a split");
  const PartialLayout parts(p, splits);
  const int64_t z = blockIdx.z, rh = blockIdx.x;
  __shared__ float weight_s[kMaxSplits];
  // Launched while the attention runs (launch_mla_wgmma): its partials are read only after it.
  wgmma::wait_for_prerequisite();
  if (threadIdx.x < 32) {
    const float* lse_part = p.partial + parts.lse_offset + z * splits * parts.lse_step + rh;
    const int i = threadIdx.x;
    const float l = i < splits ? lse_part[i * parts.lse_step] : -INFINITY;
    float top = l;
    for (int m = 16; m >= 1; m /= 2) top = fmaxf(top, __shfl_xor_sync(0xffffffffu, top, m));
    const float e = l > -INFINITY ? __expf(l - top) : 0.0f;
    float total = e;
    for (int m = 16; m >= 1; m /= 2) total += __shfl_xor_sync(0xffffffffu, total, m);
    if (i < splits) weight_s[i] = total > 0 ? e / total : 0.0f;
    if (i == 0) p.lse[z * p.lse_step + rh] = total > 0 ? top + __logf(total) : -INFINITY;
  }
  __syncthreads();
  float* out = p.out + z * p.out_step + rh * p.d_v;
  const float* out_part = p.partial + z * splits * parts.out_step + rh * p.d_v;
  for (int c = 2 * threadIdx.x; c < p.d_v; c += 2 * blockDim.x) {
    float2 sum = make_float2(0.0f, 0.0f);
#pragma unroll 8
    for (int i = 0; i < splits; ++i) {
      const float w = weight_s[i];
      if (w == 0.0f) continue;  // nothing seen, or a weight below f32's range
      const float2 v = *reinterpret_cast<const float2*>(out_part + i * parts.out_step + c);
      sum.x += w * v.x;
      sum.y += w * v.y;
    }
    *reinterpret_cast<float2*>(out + c) = sum;
  }
}

// A score tile's accumulator (this thread's two rows, rows r and r + 8, and N / 8 column pairs
// `pair` + {0, 1} + 8 n, as wgmma lays them out) turned into base-2 logits: times scale2, or
// -inf where attended(column) is false. Returns the two rows' maxima over the tile, reduced over
// the quad of threads that holds each row.
template <int N, typename Attended>
__device__ __forceinline__ float2 mask_and_row_max(float (&s)[N / 2], float scale2, int pair,
                                                   Attended attended) {
  float max0 = -INFINITY, max1 = -INFINITY;
#pragma unroll
  for (int n = 0; n < N / 8; ++n) {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const bool valid = attended(n * 8 + pair + e);
      s[4 * n + e] = valid ? s[4 * n + e] * scale2 : -INFINITY;
      s[4 * n + 2 + e] = valid ? s[4 * n + 2 + e] * scale2 : -INFINITY;
      max0 = fmaxf(max0, s[4 * n + e]);
      max1 = fmaxf(max1, s[4 * n + 2 + e]);
    }
  }
#pragma unroll
  for (int m = 1; m <= 2; m *= 2) {
    max0 = fmaxf(max0, __shfl_xor_sync(0xffffffffu, max0, m));
    max1 = fmaxf(max1, __shfl_xor_sync(0xffffffffu, max1, m));
  }
  return make_float2(max0, max1);
}

// O += P . V over a 64-key tile, on this warpgroup's tensor cores: P 64 x 64 bf16, swizzled
// K-major at shared address p_s; V 64 keys x this warpgroup's 256 value columns, N-major, v0
// its descriptor. Issued and committed; the caller waits.
__device__ __forceinline__ void issue_pv_tile(float (&o)[128], uint32_t p_s, uint64_t v0) {
  const uint64_t p0 = wgmma::descriptor(p_s, 16, 1024);
  wgmma::fence();
#pragma unroll
  for (int step = 0; step < MlaTileTraits<512>::kKeys / 16; ++step) {
    wgmma::wgmma_m64n256_nmajor(o, wgmma::advanced(p0, step * 32),
                                wgmma::advanced(v0, step * 16 * 128), true);
  }
  wgmma::commit();
}

// One work item of the MLA kernels on 64-head tiles: query row r's heads h0 .. h0 + 63, its
// entries (V4: the window of tokens [position - window_tokens + 1, position], then its compressed
// entries) and, with split decoding (gridDim.y > 1), this block's share of the row's tiles
// [first_tile, tiles), its result a partial that combine_splits merges (attention_splits).
struct MlaWork {
  int r, h0;
  int64_t position;
  int window_tokens, entries, first_tile, tiles;  // tiles: the one after the last
};
template <bool V4>
__device__ MlaWork mla_work(const AttentionParams& p, const int32_t* indices, int64_t item,
                            int64_t items) {
  constexpr int kHeads = MlaTileTraits<512>::kHeads, kKeys = MlaTileTraits<512>::kKeys;
  const int groups = (p.heads + kHeads - 1) / kHeads;
  MlaWork w;
  w.r = static_cast<int>(item / groups), w.h0 = static_cast<int>(item % groups) * kHeads;
  w.position = p.first_position + w.r;
  w.window_tokens = 0;
  if constexpr (V4) {
    w.window_tokens = static_cast<int>(v4_window_tokens(p, w.position));
    w.entries = w.window_tokens + static_cast<int>(v4_entries(p, w.position));
  } else {
    w.entries = indices ? p.k : static_cast<int>(w.position + 1);
  }
  const int all_tiles = (w.entries + kKeys - 1) / kKeys;
  const int per_split = (all_tiles + gridDim.y - 1) / gridDim.y;
  w.first_tile = min(all_tiles, static_cast<int>(blockIdx.y) * per_split);
  w.tiles = min(all_tiles, w.first_tile + per_split);
  if (item >= items) w.first_tile = w.tiles = 0;
  return w;
}

// Entry e of item w's tile `tile` (its keys tile * 64 ..), from the selection indices [rows, k]
// (null: every entry): a kv row, or V4's raw token, or with `entry` V4's compressed entry;
// index -1: nothing (past the item's tiles or entries, or a -1 of the selection). The index is
// returned as loaded, so that a caller can issue the load a tile ahead and wait on it only when it
// gathers (bench/NOTES.md).
struct MlaKey {
  int index;
  bool entry;
};
template <bool V4>
__device__ __forceinline__ MlaKey mla_key(const int32_t* indices, int k, const MlaWork& w, int tile,
                                          int e) {
  MlaKey key{-1, false};
  if (tile < w.tiles && e < w.entries) {
    if constexpr (V4) {
      if (e < w.window_tokens) {
        key.index = static_cast<int>(w.position - w.window_tokens + 1 + e);
      } else {
        const int c = e - w.window_tokens;
        key = {indices ? indices[static_cast<int64_t>(w.r) * k + c] : c, true};
      }
    } else {
      key.index = indices ? indices[static_cast<int64_t>(w.r) * k + e] : e;
    }
  }
  return key;
}

// Where this block's outputs and lse go: the sequence's, or with split decoding its partial's
// (PartialLayout's place for (sequence, split)).
struct MlaOutputs {
  float* out;
  float* lse;
};
__device__ inline MlaOutputs mla_outputs(const AttentionParams& p, const Sequence& sequence) {
  if (gridDim.y == 1) return {sequence.out, sequence.lse};
  const PartialLayout parts(p, gridDim.y);
  const int64_t part = static_cast<int64_t>(blockIdx.z) * gridDim.y + blockIdx.y;
  return {p.partial + part * parts.out_step, p.partial + parts.lse_offset + part * parts.lse_step};
}

// 8 e4m3 codes times a power-of-two scale, as 8 bf16 values (exact: FlashMLA's dequantization).
__device__ __forceinline__ uint4 dequantize_e4m3x8(uint2 codes, float scale) {
  uint32_t words[4];
#pragma unroll
  for (int w = 0; w < 4; ++w) {
    const uint32_t pair = ((w < 2 ? codes.x : codes.y) >> (16 * (w % 2))) & 0xffffu;
    const __half2_raw h =
        __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(pair), __NV_E4M3);
    const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&h));
    const __nv_bfloat162 b = __floats2bfloat162_rn(f.x * scale, f.y * scale);
    words[w] = *reinterpret_cast<const uint32_t*>(&b);
  }
  return make_uint4(words[0], words[1], words[2], words[3]);
}

// A ue8m0 byte's scale, 2^(byte - 127) (0: 2^-127; 255: NaN).
__device__ __forceinline__ float ue8m0_scale(uint8_t byte) {
  return byte == 0     ? __int_as_float(0x00400000)
         : byte == 255 ? __int_as_float(0x7fc00000)
                       : __int_as_float(byte << 23);
}

// The Hopper kernel for MLA's shapes (MlaAttentionTraits: d_qk 512 or 576, d_v 512): 64 heads
// of one query row at a time (an item; a persistent block takes items in turn), two
// warpgroups, tiles of 64 selected keys gathered with cp.async into two swizzled buffers (the
// next tile, of this item or the next, arrives while this one is computed on). Per tile,
// warpgroup g computes the scores of keys 32g .. 32g + 31 for all 64 heads (score_tile, Q and
// the keys from shared memory), the two exchange their row maxima (online softmax, f32, base
// 2), write P in bf16 to shared memory, and each accumulates P . V for its half of the 512
// value columns (wgmma, V read N-major from the same tile): 64 x 256 f32 in registers.
// launch_attention and launch_compressed_attention give it the fp8 caches and V4's CSA; the
// other bf16 rows go to mla_pair_kernel below (measured: bench/NOTES.md, "The paired-tile
// attention").
//
// FP8 (MlaFp8AttentionTraits, d_qk 576): the rows come from FlashMLA's fp8 cache. The next
// tile's raw rows are gathered by cp.async into a staging buffer while this tile is computed
// on; between tiles every thread dequantizes its share into the one bf16 tile (code x scale,
// exact), so the tensor cores see what the bf16 path gives them for the same values.
//
// V4 (DeepSeek-V4's attention, d_qk = d_v = 512): a row's entries are its window of raw tokens,
// then its compressed entries (AttentionParams' V4 fields), gathered from the two caches into
// the same tiles; the split that holds the row's first tile adds the sink to its denominator.
// V4 and FP8 (MlaV4Fp8AttentionTraits): both caches in V4's fp8 format, staged and dequantized
// as FP8's (a ue8m0 scale per 64 codes, the RoPE values copied).
template <int D_QK, bool FP8 = false, bool V4 = false>
__global__ void __launch_bounds__(MlaAttentionTraits<D_QK>::kThreads, 1)
    mla_wgmma_kernel(const __grid_constant__ AttentionParams p) {
  namespace wg = wgmma;
  wg::launch_dependents();  // the merge of the splits may take the SMs this grid leaves idle
  using Fp8Traits = std::conditional_t<V4, MlaV4Fp8AttentionTraits, MlaFp8AttentionTraits>;
  using Traits = std::conditional_t<FP8, Fp8Traits, MlaAttentionTraits<D_QK>>;
  static_assert(!FP8 || D_QK == (V4 ? 512 : 576), "the fp8 caches hold 576 (V3.2), 512 (V4)");
  static_assert(!V4 || D_QK == 512, "V4's rows are 512 wide, K = V");
  using Tile = typename Traits::Tile;
  using Layout = typename Traits::Layout;
  constexpr int kHeads = Tile::kHeads, kKeys = Tile::kKeys, kHalfValues = Traits::kHalfValues;
  const Sequence sequence(p);
  const __nv_bfloat16* __restrict__ q = sequence.q;
  const __nv_bfloat16* __restrict__ kv = sequence.kv;
  const uint8_t* __restrict__ kv_fp8 = sequence.kv_fp8;
  const int32_t* __restrict__ indices = sequence.indices;
  const int k = p.k, heads = p.heads;
  extern __shared__ unsigned char smem_raw[];
  const uint32_t raw = wg::shared_address(smem_raw);
  unsigned char* smem = smem_raw + ((1024 - raw % 1024) % 1024);
  const uint32_t base = wg::shared_address(smem);
  unsigned char* p_s = smem + Layout::p;
  auto* max_s = reinterpret_cast<float*>(smem + Layout::max);  // [warpgroup][head]
  auto* sum_s = reinterpret_cast<float*>(smem + Layout::sum);  // [warpgroup][head]
  auto* slot_s = reinterpret_cast<int*>(smem + Layout::slot);  // [buffer][key]

  // A block's work items are (row, head group) pairs blockIdx.x, blockIdx.x + gridDim.x, ...
  // (persistent: launch_mla_wgmma starts at most one wave), the head groups of one row
  // neighbours in that order, so the second gathers from L2. The gather runs a tile ahead across
  // items, and the next item's queries arrive under the last tile's P . V, so an item's start
  // waits on nothing that could have come earlier.
  const int groups = (heads + kHeads - 1) / kHeads;
  const int64_t items = static_cast<int64_t>(p.rows) * groups;
  const int tid = threadIdx.x, group = tid / 128, lane = tid % 32;
  const int row0 = (tid % 128) / 32 * 16 + lane / 4, row1 = row0 + 8;  // this thread's heads
  const int pair = 2 * (lane % 4);  // the first of this thread's two columns in each 8
  using Work = MlaWork;             // an item (mla_work)
  auto work_of = [&](int64_t item) { return mla_work<V4>(p, indices, item, items); };
  // Starts copying item `of`'s queries into Q's tile, committed: a tile's wait_group waits for
  // committed copies only.
  auto fetch_queries = [&](int64_t of) {
    const Work w = work_of(of);
    fetch_query_heads<Tile, Traits::kThreads>(base + Layout::q, q, w.r, heads, w.h0);
    wg::copy_async_commit();
  };
  int64_t item = blockIdx.x;
  Work work = work_of(item);
  if (item < items) fetch_queries(item);
  // The gather's cursor: tile `ahead` of item `ahead_item`, the next tile to fetch, which runs
  // into this block's later items (settle skips those with no tiles).
  int64_t ahead_item = item;
  int ahead = work.first_tile;
  Work ahead_work = work;
  auto settle = [&] {
    while (ahead >= ahead_work.tiles && ahead_item < items) {
      ahead_item += gridDim.x;
      ahead_work = work_of(ahead_item);
      ahead = ahead_work.first_tile;
    }
  };
  settle();
  // The kv row this thread gathers for tile `tile` of w (-1: none). Loaded a tile ahead of its
  // use, so that the global load of the index overlaps a tile's arithmetic instead of stalling
  // the gather that needs it (long_scoreboard in the profile, bench/NOTES.md).
  const int j = gathered_key<Traits::kThreads>();
  // What index_of loads, untouched, so that nothing waits on the load until the fetch a tile
  // later (V4: whether it is a compressed entry is known without it).
  auto index_of = [&](const Work& w, int tile) {
    return mla_key<V4>(indices, k, w, tile, tile * kKeys + j);
  };
  // Starts gathering kv row s into row j of buffer `buffer` (FP8: of the staging buffer; the
  // slots keep two buffers either way).
  // V4: raw token s as s, compressed entry c as -2 - c, nothing as -1.
  auto fetch = [&](MlaKey g, int buffer) {
    const int s = V4 && g.entry ? (g.index >= 0 ? -2 - g.index : -1) : g.index;
    constexpr int per_key = Traits::kThreads / kKeys;
    if (tid % per_key == 0) slot_s[buffer * kKeys + j] = s;
    if constexpr (FP8 && V4) {  // a raw token's row (s >= 0) or an entry's (-2 - s), 8-aligned
      const uint8_t* row =
          s >= 0    ? kv_fp8 + static_cast<int64_t>(s) * Traits::kRowBytes
          : s == -1 ? kv_fp8
                    : sequence.compressed_fp8 + static_cast<int64_t>(-2 - s) * Traits::kRowBytes;
      const uint32_t staged = base + Layout::raw + j * Traits::kRowBytes;
      for (int c = tid % per_key; c < Traits::kRowPieces; c += per_key)
        wg::copy_async_8(staged + c * 8, row + c * 8, s != -1);
    } else if constexpr (FP8) {
      const uint8_t* row = kv_fp8 + static_cast<int64_t>(s >= 0 ? s : 0) * Traits::kRowBytes;
      const uint32_t staged = base + Layout::raw + j * Traits::kRowBytes;
      for (int c = tid % per_key; c < Traits::kRowChunks; c += per_key)
        wg::copy_async_16(staged + c * 16, row + c * 16, s >= 0);
    } else if constexpr (V4) {
      const bool raw_token = s >= 0;
      const __nv_bfloat16* rows = raw_token ? kv : sequence.compressed;
      fetch_key_row<Tile, Traits::kThreads>(base + Layout::kv + buffer * Tile::kTileBytes, rows,
                                            raw_token ? s : (s == -1 ? -1 : -2 - s));
    } else {
      fetch_key_row<Tile, Traits::kThreads>(base + Layout::kv + buffer * Tile::kTileBytes, kv, s);
    }
    wg::copy_async_commit();
  };
  // FP8: the staged rows into the bf16 tile, 8 values (16 bytes) at a time: a latent piece is 8
  // codes times its tile's scale (V3.2: an f32 per 128; V4: a ue8m0 byte per 64), a rope piece
  // is copied (V4's, 8-aligned, in two halves). Zero rows (s < 0) give zeros.
  auto dequantize = [&] {
    if constexpr (FP8 && V4) {
      // 64 pieces a row and 256 threads: a thread's piece c is the same in every row it does
      // (rows key0, key0 + 4, ...), so its branch and scale byte are fixed, and it issues a
      // batch of rows' loads before converting any (the conversions wait on nothing else).
      static_assert(Tile::kChunks == 64 && Traits::kThreads == 256, "V4: 64 pieces, 4 rows");
      constexpr int kStride = Traits::kThreads / Tile::kChunks, kBatch = 4;
      const int c = tid % Tile::kChunks, key0 = tid / Tile::kChunks;
      const bool latent = c < Traits::kLatent / 8;
      const int offset = latent ? c * 8 : Traits::kRope + (c - Traits::kLatent / 8) * 16;
      const int scale_byte = Traits::kScales + c * 8 / Traits::kTile;
#pragma unroll
      for (int b = 0; b < kKeys / kStride; b += kBatch) {
        uint2 lo[kBatch], hi[kBatch];
        uint8_t scale[kBatch];
#pragma unroll
        for (int n = 0; n < kBatch; ++n) {
          const unsigned char* row =
              smem + Layout::raw + (key0 + kStride * (b + n)) * Traits::kRowBytes;
          lo[n] = *reinterpret_cast<const uint2*>(row + offset);
          if (latent) {
            scale[n] = row[scale_byte];
          } else {
            hi[n] = *reinterpret_cast<const uint2*>(row + offset + 8);
          }
        }
#pragma unroll
        for (int n = 0; n < kBatch; ++n) {
          const uint4 v = latent ? dequantize_e4m3x8(lo[n], ue8m0_scale(scale[n]))
                                 : make_uint4(lo[n].x, lo[n].y, hi[n].x, hi[n].y);
          const int key = key0 + kStride * (b + n);
          *reinterpret_cast<uint4*>(smem + Layout::kv + wg::swizzled_offset(kKeys, key, c * 8)) = v;
        }
      }
    } else if constexpr (FP8) {
      // 72 pieces a row (64 latent, 8 rope), 18 for each of the 256 threads: each issues a batch
      // of its pieces' loads before converting any.
      constexpr int pieces = Tile::kChunks, kBatch = 3;
      constexpr int kPerThread = kKeys * pieces / Traits::kThreads;
      static_assert(kKeys * pieces % Traits::kThreads == 0 && kPerThread % kBatch == 0,
                    "V3.2: whole batches of pieces");
#pragma unroll
      for (int b = 0; b < kPerThread; b += kBatch) {
        uint4 raw[kBatch];
        float scale[kBatch];
#pragma unroll
        for (int n = 0; n < kBatch; ++n) {
          const int i = tid + (b + n) * Traits::kThreads, key = i / pieces, c = i % pieces;
          const unsigned char* row = smem + Layout::raw + key * Traits::kRowBytes;
          if (c < Traits::kLatent / 8) {
            const uint2 codes = *reinterpret_cast<const uint2*>(row + c * 8);
            raw[n] = make_uint4(codes.x, codes.y, 0, 0);
            scale[n] = *reinterpret_cast<const float*>(row + Traits::kScales +
                                                       4 * (c * 8 / Traits::kTile));
          } else {
            raw[n] = *reinterpret_cast<const uint4*>(row + Traits::kRope +
                                                     (c - Traits::kLatent / 8) * 16);
          }
        }
#pragma unroll
        for (int n = 0; n < kBatch; ++n) {
          const int i = tid + (b + n) * Traits::kThreads, key = i / pieces, c = i % pieces;
          const uint4 v = c < Traits::kLatent / 8
                              ? dequantize_e4m3x8(make_uint2(raw[n].x, raw[n].y), scale[n])
                              : raw[n];
          *reinterpret_cast<uint4*>(smem + Layout::kv + wg::swizzled_offset(kKeys, key, c * 8)) = v;
        }
      }
    }
  };
  MlaKey next = index_of(ahead_work, ahead);
  // Issues the gather of the cursor's tile into `buffer` and moves the cursor on.
  auto fetch_ahead = [&](int buffer) {
    if (ahead_item >= items) return;
    fetch(next, buffer);
    ++ahead;
    settle();
    next = index_of(ahead_work, ahead);
  };
  fetch_ahead(0);

  const float scale2 = p.scale * kLog2e;
  int buffer = 0;  // the key buffer (and slots) of the tile in hand, alternating across items
  for (; item < items; item += gridDim.x, work = work_of(item)) {
    OnlineSoftmax softmax0, softmax1;  // rows row0 and row1: this thread's share of their sums
    float o[2 * kHalfValues / 4];
#pragma unroll
    for (int i = 0; i < 2 * kHalfValues / 4; ++i) o[i] = 0.0f;

    for (int tile = work.first_tile; tile < work.tiles; ++tile, buffer ^= 1) {
      const int kv_buffer = FP8 ? 0 : buffer;  // FP8: one bf16 tile
      wg::copy_async_wait_all();
      if constexpr (FP8) {
        __syncthreads();  // the staged rows are in, and both warpgroups are done with the tile
        dequantize();
      }
      wg::fence_shared_for_tensor_cores();
      __syncthreads();

      // S = Q . K^T for this warpgroup's 32 keys, on the tensor cores while this thread issues
      // the next tile's gather (into the other buffer, or FP8's staging, both free since the
      // barrier).
      const uint32_t keys = base + Layout::kv + kv_buffer * Tile::kTileBytes + group * 32 * 128;
      float s[16];
      issue_score_tile<Tile, 32>(s, base + Layout::q, keys);
      fetch_ahead(buffer ^ 1);
      wg::wait<0>();
      wg::fence_operands(s);

      const int* slot = slot_s + buffer * kKeys + group * 32;
      const float2 tile_max = mask_and_row_max<32>(
          s, scale2, pair, [&](int c) { return V4 ? slot[c] != -1 : slot[c] >= 0; });
      const float tile_max0 = tile_max.x, tile_max1 = tile_max.y;
      if (lane % 4 == 0) {
        max_s[group * kHeads + row0] = tile_max0;
        max_s[group * kHeads + row1] = tile_max1;
      }
      __syncthreads();
      // Both warpgroups are done with Q: after the item's last tile, the next item's queries.
      if (tile + 1 == work.tiles && item + gridDim.x < items) fetch_queries(item + gridDim.x);
      const float alpha0 = softmax0.advance(fmaxf(max_s[row0], max_s[kHeads + row0]));
      const float alpha1 = softmax1.advance(fmaxf(max_s[row1], max_s[kHeads + row1]));
#pragma unroll
      for (int n = 0; n < 4; ++n) {
        const float p00 = softmax0.probability(s[4 * n]), p01 = softmax0.probability(s[4 * n + 1]);
        const float p10 = softmax1.probability(s[4 * n + 2]);
        const float p11 = softmax1.probability(s[4 * n + 3]);
        softmax0.sum += p00 + p01;
        softmax1.sum += p10 + p11;
        const int column = group * 32 + n * 8 + pair;
        *reinterpret_cast<__nv_bfloat162*>(p_s + wg::swizzled_offset(kHeads, row0, column)) =
            __floats2bfloat162_rn(p00, p01);
        *reinterpret_cast<__nv_bfloat162*>(p_s + wg::swizzled_offset(kHeads, row1, column)) =
            __floats2bfloat162_rn(p10, p11);
      }
#pragma unroll
      for (int n = 0; n < kHalfValues / 8; ++n) {
        o[4 * n] *= alpha0;
        o[4 * n + 1] *= alpha0;
        o[4 * n + 2] *= alpha1;
        o[4 * n + 3] *= alpha1;
      }
      wg::fence_shared_for_tensor_cores();
      __syncthreads();

      // O += P . V for this warpgroup's 256 value columns.
      const uint32_t p_base = base + Layout::p;
      const uint32_t v_base =
          base + Layout::kv + kv_buffer * Tile::kTileBytes + group * 4 * (kKeys * 128);
      issue_pv_tile(o, p_base, wg::descriptor(v_base, kKeys * 128, 1024));
      wg::wait<0>();
    }

    float sum0 = softmax0.sum, sum1 = softmax1.sum;
#pragma unroll
    for (int m = 1; m <= 2; m *= 2) {
      sum0 += __shfl_xor_sync(0xffffffffu, sum0, m);
      sum1 += __shfl_xor_sync(0xffffffffu, sum1, m);
    }
    if (lane % 4 == 0) {
      sum_s[group * kHeads + row0] = sum0;
      sum_s[group * kHeads + row1] = sum1;
    }
    __syncthreads();
    float total0 = sum_s[row0] + sum_s[kHeads + row0];
    float total1 = sum_s[row1] + sum_s[kHeads + row1];
    __syncthreads();  // all have read the sums before an item with no tiles writes them again
    const int r = work.r, h0 = work.h0;
    float keep0 = 1.0f, keep1 = 1.0f;  // what the sink leaves of the sums' outputs
    if constexpr (V4) {
      if (p.sink && blockIdx.y == 0) {
        if (h0 + row0 < heads) keep0 = softmax0.join_sink(p.sink[h0 + row0], total0);
        if (h0 + row1 < heads) keep1 = softmax1.join_sink(p.sink[h0 + row1], total1);
      }
    }
    const float inverse0 = total0 > 0 ? keep0 / total0 : 0.0f;
    const float inverse1 = total1 > 0 ? keep1 / total1 : 0.0f;
    constexpr int d_v = Traits::kDv;
    const MlaOutputs outputs = mla_outputs(p, sequence);
    float* item_out = outputs.out;
    float* item_lse = outputs.lse;
    float* out0 =
        item_out + (static_cast<int64_t>(r) * heads + h0 + row0) * d_v + group * kHalfValues;
    float* out1 =
        item_out + (static_cast<int64_t>(r) * heads + h0 + row1) * d_v + group * kHalfValues;
#pragma unroll
    for (int n = 0; n < kHalfValues / 8; ++n) {
      if (h0 + row0 < heads) {
        *reinterpret_cast<float2*>(out0 + n * 8 + pair) =
            make_float2(o[4 * n] * inverse0, o[4 * n + 1] * inverse0);
      }
      if (h0 + row1 < heads) {
        *reinterpret_cast<float2*>(out1 + n * 8 + pair) =
            make_float2(o[4 * n + 2] * inverse1, o[4 * n + 3] * inverse1);
      }
    }
    if (group == 0 && lane % 4 == 0) {
      if (h0 + row0 < heads)
        item_lse[static_cast<int64_t>(r) * heads + h0 + row0] = softmax0.lse(total0);
      if (h0 + row1 < heads)
        item_lse[static_cast<int64_t>(r) * heads + h0 + row1] = softmax1.lse(total1);
    }
    // An item with no tiles prefetched nothing: the next item's queries now (the copies of any
    // earlier prefetch into the same places finished first).
    if (work.tiles == work.first_tile && item + gridDim.x < items) {
      wg::copy_async_wait_all();
      fetch_queries(item + gridDim.x);
    }
  }
}

// The paired-tile attention over the bf16 caches (MlaPairAttentionTraits; d 512 or 576; the same
// items, window, sink and splits as mla_wgmma_kernel): a row's tiles go in pairs, tile 2i to
// consumer 0 and 2i + 1 to consumer 1, each in its own key buffer (a missing second tile is
// gathered as zeros). Consumer g computes S for its tile at N = 64, takes the pair's max along
// the chain 0 -> 1 (consumer 1 starts from consumer 0's), multiplies its P from registers into
// its half g of the value columns of its own tile, then the other consumer's P (shared memory,
// rescaled to the pair's max) into the same half of the other tile. Buffer b's half x (value
// columns 256 x ..) is read by consumer b's S and by consumer x's P . V, so each half is freed
// by one consumer: (g, g) after g's own P . V, (1 - g, g) after its P . V over the other tile;
// the producer warpgroup refills each half as soon as it is free, in the order they free up,
// and the mbarriers at Layout::ready say what landed, so that it never waits on its copies.
// Consumer 0 issues the next pair's S behind its last P . V; each consumer's S takes its own
// half first, the one it frees itself.
// Named barriers, each arrived at and waited on once a pair (kQFree once an item), never arrived
// at twice by one side before the other passed the previous use: kFree + 2 b + x (half x of
// buffer b read: its consumer -> producer), kMax + g (consumer g's max written), kP + g
// (consumer g's P written), kSum (both), kQFree (both consumers done with an item's queries ->
// producer). The structure is FlashMLA's sm90 sparse prefill's (docs/DESIGN.md section 5).
template <int D_QK, bool V4 = false>
__global__ void __launch_bounds__(MlaPairAttentionTraits<D_QK>::kThreads, 1)
    mla_pair_kernel(const __grid_constant__ AttentionParams p) {
  namespace wg = wgmma;
  wg::launch_dependents();  // the merge of the splits may take the SMs this grid leaves idle
  static_assert(!V4 || D_QK == 512, "V4's rows are 512 wide, K = V");
  using Traits = MlaPairAttentionTraits<D_QK>;
  using Tile = typename Traits::Tile;
  using Layout = typename Traits::Layout;
  constexpr int kHeads = Tile::kHeads, kKeys = Tile::kKeys, kHalfValues = Traits::kHalfValues;
  constexpr int kBlocks = Traits::kBlocks;
  constexpr int kFree = 1, kMax = 5, kP = 7, kSum = 9, kQFree = 10;
  const Sequence sequence(p);
  const int32_t* __restrict__ indices = sequence.indices;
  const int k = p.k, heads = p.heads;
  extern __shared__ unsigned char smem_raw[];
  const uint32_t raw = wg::shared_address(smem_raw);
  unsigned char* smem = smem_raw + ((1024 - raw % 1024) % 1024);
  const uint32_t base = wg::shared_address(smem);
  auto* max_s = reinterpret_cast<float*>(smem + Layout::max);  // [consumer][head]
  auto* sum_s = reinterpret_cast<float*>(smem + Layout::sum);  // [consumer][head]
  auto* slot_s = reinterpret_cast<int*>(smem + Layout::slot);  // [buffer][key]
  auto ready = [&](int b, int x) { return base + Layout::ready + 8 * (2 * b + x); };
  const uint32_t query_ready = base + Layout::query_ready;
  auto buffer = [&](int b) { return base + Layout::kv + b * Tile::kTileBytes; };

  const int groups = (heads + kHeads - 1) / kHeads;
  const int64_t items = static_cast<int64_t>(p.rows) * groups;
  // The warpgroup, broadcast from lane 0 so that the compiler sees it uniform in a warp: a
  // wgmma in a branch it takes for divergent is serialized (ptxas C7520).
  const int tid = threadIdx.x, lane = tid % 32, w = tid % 128;
  const int group = __shfl_sync(0xffffffffu, tid / 128, 0);
  using Work = MlaWork;  // an item (mla_work)
  auto work_of = [&](int64_t item) { return mla_work<V4>(p, indices, item, items); };
  auto pairs_of = [](const Work& wk) { return (wk.tiles - wk.first_tile + 1) / 2; };
  if (tid == 0) {
    for (int b = 0; b < 2; ++b) {
      for (int x = 0; x < 2; ++x) wg::mbarrier_init(ready(b, x), 128);
    }
    wg::mbarrier_init(query_ready, 128);
  }
  __syncthreads();

  if (group == 2) {
    // The producer: each half once it is free, the copies announced by the mbarriers.
    wg::lower_registers<Traits::kProducerRegisters>();
    const int key = w / 8;  // this thread's keys of a tile: key + 16 q, q < 4
    bool refill = false;    // the buffers held an earlier pair: wait for each half's release
    // Tile `tile` of wk's keys key + 16 q: their kv rows (V4: a raw token's, or an entry's;
    // s < 0: nothing, zeros) and whether each is attended.
    struct Keys {
      const __nv_bfloat16* row[4];
      bool valid[4];
    };
    auto keys_of = [&](const Work& wk, int tile) {
      Keys keys;
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const MlaKey g = mla_key<V4>(indices, k, wk, tile, tile * kKeys + key + 16 * q);
        keys.valid[q] = g.index >= 0;
        keys.row[q] = (V4 && g.entry ? sequence.compressed : sequence.kv) +
                      static_cast<int64_t>(g.index >= 0 ? g.index : 0) * Tile::kDqk;
      }
      return keys;
    };
    auto fetch_half = [&](int b, int x, const Keys& keys) {
      if (refill) wg::barrier_sync(kFree + 2 * b + x, 256);
      if (x == b && w % 8 == 0) {
#pragma unroll
        for (int q = 0; q < 4; ++q) slot_s[b * kKeys + key + 16 * q] = keys.valid[q] ? 0 : -1;
      }
      if (x == 0) {
        fetch_key_blocks<Tile, 0, 4>(buffer(b), keys.row, keys.valid, w);
      } else {
        fetch_key_blocks<Tile, 4, kBlocks>(buffer(b), keys.row, keys.valid, w);
      }
      wg::arrive_when_copies_land(ready(b, x));
    };
    bool first_item = true;
    for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
      const Work wk = work_of(item);
      if (!first_item) wg::barrier_sync(kQFree, 384);  // the last item's queries read
      first_item = false;
      fetch_query_heads<Tile, 128>(base + Layout::q, sequence.q, wk.r, heads, wk.h0, w);
      wg::arrive_when_copies_land(query_ready);
      for (int i = 0; i < pairs_of(wk); ++i) {
        const Keys key0 = keys_of(wk, wk.first_tile + 2 * i);
        const Keys key1 = keys_of(wk, wk.first_tile + 2 * i + 1);
        // The order the halves free up in: each consumer's own first, then the other's.
        fetch_half(0, 0, key0);
        fetch_half(1, 1, key1);
        fetch_half(0, 1, key0);
        fetch_half(1, 0, key1);
        refill = true;
      }
    }
    if (!first_item) wg::barrier_sync(kQFree, 384);
    if (refill) {  // the consumers' last releases
      wg::barrier_sync(kFree + 0, 256);
      wg::barrier_sync(kFree + 3, 256);
      wg::barrier_sync(kFree + 1, 256);
      wg::barrier_sync(kFree + 2, 256);
    }
    return;
  }

  // The consumers: g = group.
  wg::raise_registers<Traits::kConsumerRegisters>();
  const int g = group;
  const int row0 = w / 32 * 16 + lane / 4, row1 = row0 + 8;  // this thread's heads
  const int pair = 2 * (lane % 4);
  const float scale2 = p.scale * kLog2e;
  // The base-2 logits' offset: the max, or 0 while it is -inf (exp2 gives 0, not NaN).
  auto offset = [](float m) { return m == -INFINITY ? 0.0f : m; };
  auto factor = [&](float from, float to) {  // what takes sums against `from` to `to` >= from
    return from == -INFINITY ? 0.0f : exp2f(from - offset(to));
  };
  float o[2 * kHalfValues / 4];
  auto scale_output = [&](float f0, float f1) {
#pragma unroll
    for (int n = 0; n < kHalfValues / 8; ++n) {
      o[4 * n] *= f0, o[4 * n + 1] *= f0, o[4 * n + 2] *= f1, o[4 * n + 3] *= f1;
    }
  };
  const uint32_t other_p = base + Layout::p(1 - g);
  // The V operand: buffer b's value columns 256 g .. 256 g + 255 (its half g), N-major.
  auto values = [&](int b) {
    return wg::descriptor(buffer(b) + g * 4 * (kKeys * 128), kKeys * 128, 1024);
  };
  uint32_t phase = 0;        // the parity of the pairs so far (the ready barriers' phase)
  uint32_t query_phase = 0;  // of the items so far
  float s[32];               // S, then P, of this consumer's tile
  // Issues S for the pair `phase` names, this consumer's own half first, as each lands.
  auto issue_scores = [&] {
    const uint32_t q_s = base + Layout::q, k_s = buffer(g);
    wg::mbarrier_wait(ready(g, g), phase);
    wg::fence_shared_for_tensor_cores();
    wg::fence();
    if (g == 0) {
      issue_score_blocks<Tile, 64, 0, 4>(s, q_s, k_s, true);
    } else {
      issue_score_blocks<Tile, 64, 4, kBlocks>(s, q_s, k_s, true);
    }
    wg::mbarrier_wait(ready(g, 1 - g), phase);
    wg::fence_shared_for_tensor_cores();
    if (g == 0) {
      issue_score_blocks<Tile, 64, 4, kBlocks>(s, q_s, k_s, false);
    } else {
      issue_score_blocks<Tile, 64, 0, 4>(s, q_s, k_s, false);
    }
    wg::commit();
  };
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const Work wk = work_of(item);
    const int pairs = pairs_of(wk);
    float m0 = -INFINITY, m1 = -INFINITY;  // rows row0, row1: the max the sums are against
    float l0 = 0.0f, l1 = 0.0f;            // this thread's share of this consumer's sums
#pragma unroll
    for (int i = 0; i < 2 * kHalfValues / 4; ++i) o[i] = 0.0f;
    wg::mbarrier_wait(query_ready, query_phase);
    query_phase ^= 1;
    if (pairs == 0) wg::barrier_arrive(kQFree, 384);
    for (int i = 0; i < pairs; ++i) {
      if (g == 1 || i == 0) issue_scores();  // consumer 0's later ones: behind its P . V
      if (g == 0 && i > 0) {
        wg::wait<1>();  // the last pair's P . V over buffer 1: its half 0 is read
        wg::fence_operands(o);
        wg::barrier_arrive(kFree + 2 * 1 + 0, 256);
      }
      wg::wait<0>();
      wg::fence_operands(s);
      if (i + 1 == pairs) wg::barrier_arrive(kQFree, 384);  // this consumer's last S read Q
      const int* slot = slot_s + g * kKeys;
      const float2 cur = mask_and_row_max<64>(s, scale2, pair, [&](int c) { return slot[c] == 0; });
      const float cur0 = cur.x, cur1 = cur.y;
      // The chain: consumer 0 from its own max, consumer 1 from consumer 0's new one.
      float from0 = m0, from1 = m1;
      if (g == 1) {
        wg::barrier_sync(kMax + 0, 256);
        from0 = max_s[row0], from1 = max_s[row1];  // consumer 0's
      }
      const float new0 = fmaxf(from0, cur0), new1 = fmaxf(from1, cur1);
      const float a0 = factor(m0, new0), a1 = factor(m1, new1);
      scale_output(a0, a1);
      l0 *= a0, l1 *= a1;
      m0 = new0, m1 = new1;
      // Each consumer writes its own half of max_s and reads the other's: no lane reads where a
      // lane of its warp writes.
      if (lane % 4 == 0) {
        max_s[g * kHeads + row0] = new0, max_s[g * kHeads + row1] = new1;
      }
      wg::barrier_arrive(kMax + g, 256);
      uint32_t a[4][4];  // P in bf16 pairs: the A fragments of keys 16 kk .. 16 kk + 15
#pragma unroll
      for (int n = 0; n < 8; ++n) {
        const float p00 = exp2f(s[4 * n] - offset(new0)), p01 = exp2f(s[4 * n + 1] - offset(new0));
        const float p10 = exp2f(s[4 * n + 2] - offset(new1));
        const float p11 = exp2f(s[4 * n + 3] - offset(new1));
        s[4 * n] = p00, s[4 * n + 1] = p01, s[4 * n + 2] = p10, s[4 * n + 3] = p11;
        l0 += p00 + p01;
        l1 += p10 + p11;
        const __nv_bfloat162 h0 = __floats2bfloat162_rn(p00, p01);
        const __nv_bfloat162 h1 = __floats2bfloat162_rn(p10, p11);
        a[n / 2][2 * (n % 2)] = *reinterpret_cast<const uint32_t*>(&h0);
        a[n / 2][2 * (n % 2) + 1] = *reinterpret_cast<const uint32_t*>(&h1);
      }
      // O += P . V over this consumer's own tile, P from registers.
      const uint64_t own_v = values(g);
      wg::fence();
#pragma unroll
      for (int kk = 0; kk < kKeys / 16; ++kk)
        wg::wgmma_m64n256_regs_nmajor(o, a[kk], wg::advanced(own_v, kk * 16 * 128), true);
      wg::commit();
      // Consumer 0: the pair's max from consumer 1, its P rescaled to it.
      float r0 = 1.0f, r1 = 1.0f;
      if (g == 0) {
        wg::barrier_sync(kMax + 1, 256);
        const float top0 = max_s[kHeads + row0], top1 = max_s[kHeads + row1];
        r0 = factor(m0, top0), r1 = factor(m1, top1);
        m0 = top0, m1 = top1;
      }
      unsigned char* p_s = smem + Layout::p(g);  // at 576, 0's: S has read the RoPE block
#pragma unroll
      for (int n = 0; n < 8; ++n) {
        const int column = n * 8 + pair;
        *reinterpret_cast<__nv_bfloat162*>(p_s + wg::swizzled_offset(kHeads, row0, column)) =
            __floats2bfloat162_rn(s[4 * n] * r0, s[4 * n + 1] * r0);
        *reinterpret_cast<__nv_bfloat162*>(p_s + wg::swizzled_offset(kHeads, row1, column)) =
            __floats2bfloat162_rn(s[4 * n + 2] * r1, s[4 * n + 3] * r1);
      }
      wg::fence_shared_for_tensor_cores();
      wg::barrier_arrive(kP + g, 256);
      wg::wait<0>();  // the own tile's P . V, before O is rescaled and the half released
      wg::fence_operands(o);
#pragma unroll
      for (int kk = 0; kk < kKeys / 16; ++kk) wg::fence_operands(a[kk]);
      wg::barrier_arrive(kFree + 2 * g + g, 256);
      if (g == 0) {
        scale_output(r0, r1);
        l0 *= r0, l1 *= r1;
      }
      // O += P' . V over the other consumer's tile, its P from shared memory.
      wg::barrier_sync(kP + (1 - g), 256);
      issue_pv_tile(o, other_p, values(1 - g));
      phase ^= 1;
      if (g == 0 && i + 1 < pairs) {
        issue_scores();  // the next pair's S behind this P . V; its wait releases buffer 1's half
      } else {
        wg::wait<0>();
        wg::fence_operands(o);
        wg::barrier_arrive(kFree + 2 * (1 - g) + g, 256);
      }
    }
    // The row's sums: this consumer's tiles', then both.
#pragma unroll
    for (int m = 1; m <= 2; m *= 2) {
      l0 += __shfl_xor_sync(0xffffffffu, l0, m);
      l1 += __shfl_xor_sync(0xffffffffu, l1, m);
    }
    if (lane % 4 == 0) sum_s[g * kHeads + row0] = l0, sum_s[g * kHeads + row1] = l1;
    wg::barrier_sync(kSum, 256);
    float total0 = sum_s[row0] + sum_s[kHeads + row0];
    float total1 = sum_s[row1] + sum_s[kHeads + row1];
    wg::barrier_sync(kSum, 256);       // both read before the next item writes
    OnlineSoftmax softmax0, softmax1;  // the sink and the lse against the rows' max
    softmax0.max = m0, softmax1.max = m1;
    float keep0 = 1.0f, keep1 = 1.0f;
    if constexpr (V4) {
      if (p.sink && blockIdx.y == 0) {
        if (wk.h0 + row0 < heads) keep0 = softmax0.join_sink(p.sink[wk.h0 + row0], total0);
        if (wk.h0 + row1 < heads) keep1 = softmax1.join_sink(p.sink[wk.h0 + row1], total1);
      }
    }
    const float inverse0 = total0 > 0 ? keep0 / total0 : 0.0f;
    const float inverse1 = total1 > 0 ? keep1 / total1 : 0.0f;
    const MlaOutputs outputs = mla_outputs(p, sequence);
    float* item_out = outputs.out;
    float* item_lse = outputs.lse;
    constexpr int d_v = Traits::kDv;
    float* out0 =
        item_out + (static_cast<int64_t>(wk.r) * heads + wk.h0 + row0) * d_v + g * kHalfValues;
    float* out1 =
        item_out + (static_cast<int64_t>(wk.r) * heads + wk.h0 + row1) * d_v + g * kHalfValues;
#pragma unroll
    for (int n = 0; n < kHalfValues / 8; ++n) {
      if (wk.h0 + row0 < heads) {
        *reinterpret_cast<float2*>(out0 + n * 8 + pair) =
            make_float2(o[4 * n] * inverse0, o[4 * n + 1] * inverse0);
      }
      if (wk.h0 + row1 < heads) {
        *reinterpret_cast<float2*>(out1 + n * 8 + pair) =
            make_float2(o[4 * n + 2] * inverse1, o[4 * n + 3] * inverse1);
      }
    }
    if (g == 0 && lane % 4 == 0) {
      if (wk.h0 + row0 < heads)
        item_lse[static_cast<int64_t>(wk.r) * heads + wk.h0 + row0] = softmax0.lse(total0);
      if (wk.h0 + row1 < heads)
        item_lse[static_cast<int64_t>(wk.r) * heads + wk.h0 + row1] = softmax1.lse(total1);
    }
  }
}

}  // namespace

std::string attention_limit(int d_qk, int d_v, bool fp8_cache) {
  if (fp8_cache && (d_qk != 576 || d_v != MlaFp8AttentionTraits::kDv)) {
    return fmt::format(
        "the CUDA attention over the fp8 cache needs d_qk 576 and d_v {}, got d_qk {} and d_v {}",
        MlaFp8AttentionTraits::kDv, d_qk, d_v);
  }
  if (d_qk % 16 != 0 || d_v % 16 != 0 || d_v > d_qk || d_qk > Wmma::kMaxDqk || d_v > Wmma::kMaxDv) {
    return fmt::format(
        "the CUDA attention needs d_qk and d_v multiples of 16 with d_v <= d_qk <= {} and d_v <= "
        "{}, got d_qk {} and d_v {}",
        Wmma::kMaxDqk, Wmma::kMaxDv, d_qk, d_v);
  }
  return "";
}

namespace {

// The current device's SMs.
int sm_count() {
  int device = 0, sms = 1;
  check(cudaGetDevice(&device), "cudaGetDevice");
  check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device),
        "cudaDeviceGetAttribute");
  return sms;
}

// The wgmma kernel takes d_qk 576 (either cache) or 512, with d_v 512.
bool wgmma_shape(const AttentionParams& p) {
  return p.kv_fp8 || ((p.d_qk == 576 || p.d_qk == 512) && p.d_v == MlaAttentionTraits<576>::kDv);
}

}  // namespace

int attention_splits(const AttentionParams& p) {
  if (!wgmma_shape(p) || std::max(p.rows, p.query_rows) > kSplitRows) return 1;
  int64_t entries = p.indices ? p.k : p.first_position + p.rows;
  if (p.window > 0) {  // V4: the window and the entries of the last row
    const int64_t last = p.first_position + p.rows - 1;
    entries = v4_window_tokens(p, last) + v4_entries(p, last);
  }
  const int64_t tiles = (entries + MlaTileTraits<576>::kKeys - 1) / MlaTileTraits<576>::kKeys;
  const int64_t most = std::max<int64_t>(1, std::min<int64_t>(tiles, kMaxSplits));
  if (p.splits > 0) return static_cast<int>(std::min<int64_t>(p.splits, most));
  // As many pieces of kSplitTiles as one wave of blocks holds: the rows, head groups and
  // sequences times the splits at most the SMs (more cost a second wave, bench/NOTES.md). The
  // rows are the input's (query_rows), not this chunk's, so that every chunk and MPI share of a
  // row's input splits it alike.
  const int sms = sm_count();
  const int64_t groups = (p.heads + MlaTileTraits<576>::kHeads - 1) / MlaTileTraits<576>::kHeads;
  const int64_t rows = std::max(p.rows, p.query_rows);
  const int64_t wave = std::max<int64_t>(1, sms / (rows * groups * p.sequences));
  return static_cast<int>(
      std::clamp<int64_t>((tiles + kSplitTiles - 1) / kSplitTiles, 1, std::min(most, wave)));
}

int64_t attention_partial_floats(const AttentionParams& p) {
  const int splits = attention_splits(p);
  return splits > 1 ? PartialLayout(p, splits).floats(p, splits) : 0;
}

namespace {

// One launch of a wgmma kernel over p, and with split decoding (p.partial) the merge after it.
template <typename Kernel, typename Traits>
void launch_mla_wgmma(const AttentionParams& p, Kernel kernel, Traits) {
  const int splits = p.partial ? attention_splits(p) : 1;
  constexpr uint32_t bytes = Traits::Layout::bytes;
  check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes),
        "cudaFuncSetAttribute(attention)");
  // Persistent: at most one wave of blocks (one an SM), each taking items in turn.
  const int64_t items =
      static_cast<int64_t>(p.rows) * ((p.heads + Traits::kHeads - 1) / Traits::kHeads);
  const int64_t wave = std::max<int64_t>(
      1, (sm_count() + splits * p.sequences - 1) / (static_cast<int64_t>(splits) * p.sequences));
  const dim3 grid(static_cast<unsigned>(std::min(items, wave)), splits, p.sequences);
  kernel<<<grid, Traits::kThreads, bytes, p.stream>>>(p);
  if (splits > 1) {
    check(cudaGetLastError(), "attention kernel launch");
    // A programmatic dependent launch: the merge's blocks take the SMs the attention leaves idle
    // and wait there for it (wait_for_prerequisite), so that no launch gap separates the two
    // (bench/NOTES.md, "the merge's programmatic launch").
    cudaLaunchAttribute dependent{};
    dependent.id = cudaLaunchAttributeProgrammaticStreamSerialization;
    dependent.val.programmaticStreamSerializationAllowed = 1;
    check(launch_with(dependent, dim3(static_cast<unsigned>(p.rows * p.heads), 1, p.sequences),
                      dim3(128), 0, p.stream, combine_splits, p, splits),
          "cudaLaunchKernelEx(merge)");
  }
}

}  // namespace

void launch_attention(const AttentionParams& p) {
  if (p.rows == 0 || p.sequences == 0) return;
  require(attention_limit(p.d_qk, p.d_v, p.kv_fp8 != nullptr));
  if (p.kv_fp8) {
    launch_mla_wgmma(p, mla_wgmma_kernel<576, true>, MlaFp8AttentionTraits{});
  } else if (p.d_qk == 576 && p.d_v == MlaAttentionTraits<576>::kDv) {
    launch_mla_wgmma(p, mla_pair_kernel<576>, MlaPairAttentionTraits<576>{});
  } else if (p.d_qk == 512 && p.d_v == MlaAttentionTraits<512>::kDv) {
    launch_mla_wgmma(p, mla_pair_kernel<512>, MlaPairAttentionTraits<512>{});
  } else {
    const WmmaLayout layout(p.d_qk);
    check(cudaFuncSetAttribute(mqa_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               static_cast<int>(layout.bytes)),
          "cudaFuncSetAttribute(attention)");
    const dim3 grid(p.rows, (p.heads + Wmma::kHeads - 1) / Wmma::kHeads, p.sequences);
    mqa_kernel<<<grid, Wmma::kThreads, layout.bytes, p.stream>>>(p);
  }
  check(cudaGetLastError(), "attention kernel launch");
}

std::string compressed_attention_limit(int dim, int64_t window) {
  if (dim != MlaAttentionTraits<512>::kDv) {
    return fmt::format("the CUDA V4 attention needs entries of {} dims (K = V), got {}",
                       MlaAttentionTraits<512>::kDv, dim);
  }
  if (window < 1 || window > std::numeric_limits<int>::max()) {
    return fmt::format("the CUDA V4 attention needs a window of 1 to {} tokens, got {}",
                       std::numeric_limits<int>::max(), window);
  }
  return "";
}

void launch_compressed_attention(const AttentionParams& p) {
  if (p.rows == 0 || p.sequences == 0) return;
  require(compressed_attention_limit(p.d_qk, p.window));
  require(p.d_v == p.d_qk ? "" : "the CUDA V4 attention's values are its keys: d_v = d_qk");
  if (p.kv_fp8) {
    launch_mla_wgmma(p, mla_wgmma_kernel<512, true, true>, MlaV4Fp8AttentionTraits{});
  } else if (p.indices) {
    // CSA's selections: the one-buffer-a-tile kernel, ahead of the paired tiles on V4's short
    // rows of scattered entries (bench/NOTES.md, "The paired-tile attention").
    launch_mla_wgmma(p, mla_wgmma_kernel<512, false, true>, MlaAttentionTraits<512>{});
  } else {
    launch_mla_wgmma(p, mla_pair_kernel<512, true>, MlaPairAttentionTraits<512>{});
  }
  check(cudaGetLastError(), "attention kernel launch");
}

}  // namespace dsa::cuda
