// Internal: the tile sizes of every CUDA kernel, one traits struct per kernel (as FlashMLA's
// config.h), read by the kernel and by its launcher alike.
#pragma once

#include <cuda_bf16.h>

#include <cstddef>
#include <cstdint>

namespace dsa::cuda {

// The bf16 (and f32-value) indexer on wmma: 128 (query, head) rows per block (128 / H
// queries), tiles of 64 keys double-buffered, 4 warps of 32 rows each.
struct IndexerBf16Traits {
  static constexpr int kRows = 128;
  static constexpr int kKeyTile = 64;
  static constexpr int kThreads = 128;
  static constexpr int kLogitStride = kKeyTile + 4;
  static constexpr int row_stride(int dim) { return dim + 8; }  // bf16, off the banks
  static constexpr size_t smem(int dim) {
    return (kRows + 2 * kKeyTile) * row_stride(dim) * sizeof(__nv_bfloat16) +
           (kRows * kLogitStride + kRows + 2 * kKeyTile) * sizeof(float);
  }
};

// The fp8 indexer on Hopper's fp8 wgmma at DSA's shape (H_I 64, d_I 128): GROUPS warpgroups of
// QUERIES queries (QUERIES x 64 (query, head) rows, the wgmma's N; 1 for a decode step, so that
// no half of the MMA and of the head sum is spent on a row that does not exist) per block
// share each tile of 64 keys, kStages deep.
template <int GROUPS, int QUERIES = 2>
struct IndexerFp8Traits {
  static_assert(QUERIES == 1 || QUERIES == 2, "the wgmma's N is 64 or 128");
  static constexpr int kGroups = GROUPS;
  static constexpr int kThreads = 128 * GROUPS;
  static constexpr int kHeads = 64;
  static constexpr int kDim = 128;
  static constexpr int kRows = 64 * QUERIES;
  static constexpr int kQueries = kRows / kHeads;  // per warpgroup
  static constexpr int kKeyTile = 64;
  static constexpr int kStages = 4;
  static constexpr uint32_t kTileBytes = kKeyTile * kDim;
  static constexpr size_t kSmem = 1024 + GROUPS * kRows * kDim + kStages * kTileBytes;
  // With the top-k fused, after the key stages: a warpgroup's state (indexer.cu's QueryTopk for
  // each of its 2 queries) and its warps' staging (kStaged entries of 8 bytes a query).
  static constexpr size_t kTopkStateBytes = 2 * 1088 + 4 * 2 * 64 * 8;
};

// The f32 indexer on the CUDA cores: one query row per block along x, 256 keys along y.
struct IndexerF32Traits {
  static constexpr int kThreads = 256;
};

// Top-k: 512 threads per row; a sample of 2048 scores sets the threshold, at most 8192
// candidates are sorted in shared memory, so k is at most that.
struct TopkTraits {
  static constexpr int kThreads = 512;
  static constexpr int kCandidates = 8192;
  static constexpr int kSample = 2048;
  static constexpr int kMaxK = kCandidates;
  static constexpr size_t kSmem = kCandidates * sizeof(uint64_t);
};

// MLA on 64-head tiles (the wgmma attention and the dense probabilities): 64 heads of one query
// row against tiles of 64 keys, both swizzled K-major in shared memory.
template <int D_QK>
struct MlaTileTraits {
  static constexpr int kDqk = D_QK;
  static constexpr int kHeads = 64;
  static constexpr int kKeys = 64;
  static constexpr int kChunks = D_QK / 8;  // 16-byte pieces of a row
  static constexpr uint32_t kTileBytes = kKeys * D_QK * sizeof(__nv_bfloat16);
  static constexpr uint32_t kQueryBytes = kHeads * D_QK * sizeof(__nv_bfloat16);
};

// The wgmma attention (d_qk 512 or 576, d_v 512): two warpgroups, each the scores of 32 keys
// and P . V for half of the 512 value columns; two key buffers.
template <int D_QK>
struct MlaAttentionTraits : MlaTileTraits<D_QK> {
  using Tile = MlaTileTraits<D_QK>;
  static constexpr int kThreads = 256;
  static constexpr int kHalfValues = 256;
  static constexpr int kDv = 2 * kHalfValues;
  struct Layout {  // byte offsets from the 1024-aligned base; kv + b * kTileBytes: buffer b
    static constexpr uint32_t q = 0;
    static constexpr uint32_t kv = q + Tile::kQueryBytes;
    static constexpr uint32_t p = kv + 2 * Tile::kTileBytes;
    static constexpr uint32_t max = p + sizeof(__nv_bfloat16) * Tile::kHeads * Tile::kKeys;
    static constexpr uint32_t sum = max + sizeof(float) * 2 * Tile::kHeads;
    static constexpr uint32_t slot = sum + sizeof(float) * 2 * Tile::kHeads;
    static constexpr uint32_t bytes = slot + sizeof(int) * 2 * Tile::kKeys + 1024;  // + slack
  };
};

// The paired-tile wgmma attention (bf16 caches, d_qk 512 or 576, d_v 512): two consumer
// warpgroups, each the scores of its own 64-key tile of a pair (N = 64) and P . V over both
// tiles for its half of the 512 value columns, and a producer warpgroup that gathers. One key
// buffer a consumer, gathered and released in halves (the 64-column blocks 0-3, and 4-7 with
// the RoPE block 8 at 576: the halves of the value columns, each freed as soon as the
// consumers are done with it); the P tile each hands the other (consumer 0's at 576 in its
// buffer's RoPE block, which only S reads: FlashMLA's trick, so that Q and two tiles fit); the
// max they pass along; their sums; the barriers that announce what landed.
template <int D_QK>
struct MlaPairAttentionTraits : MlaTileTraits<D_QK> {
  using Tile = MlaTileTraits<D_QK>;
  static constexpr int kThreads = 384;
  static constexpr int kHalfValues = 256;
  static constexpr int kDv = 2 * kHalfValues;
  static constexpr int kBlocks = D_QK / 64;  // 64-column blocks of a row; half 0: 0-3
  static constexpr uint32_t kPBytes = sizeof(__nv_bfloat16) * Tile::kHeads * Tile::kKeys;
  struct Layout {
    static constexpr uint32_t q = 0;
    static constexpr uint32_t kv = q + Tile::kQueryBytes;           // + g kTileBytes: consumer g's
    static constexpr uint32_t extra_p = kv + 2 * Tile::kTileBytes;  // P tiles not in a buffer
    static constexpr uint32_t max = extra_p + (D_QK == 576 ? 1 : 2) * kPBytes;
    static constexpr uint32_t sum = max + sizeof(float) * 2 * Tile::kHeads;  // [consumer][head]
    static constexpr uint32_t slot = sum + sizeof(float) * 2 * Tile::kHeads;
    // mbarriers: buffer b's half x landed (ready + 8 (2 b + x)), the queries (query_ready).
    static constexpr uint32_t ready = slot + sizeof(int) * 2 * Tile::kKeys;
    static constexpr uint32_t query_ready = ready + 4 * 8;
    static constexpr uint32_t bytes = query_ready + 8 + 1024;  // + slack to align the base
    // Consumer g's P tile: at 576 consumer 0's is the RoPE block 8 of its key buffer.
    static constexpr uint32_t p(int g) {
      return D_QK == 576 ? (g == 0 ? kv + 8 * Tile::kKeys * 128 : extra_p) : extra_p + g * kPBytes;
    }
  };
  static_assert(D_QK == 512 || D_QK == 576, "MLA's widths");
  static_assert(Layout::bytes <= 227 * 1024, "one block an SM");
  // setmaxnreg moves registers within what the block was given at launch (65536 / 384 = 168
  // a thread, rounded down to 8): the consumers' raise must fit in what the producer frees, or
  // a consumer's setmaxnreg.inc waits forever (the first version's hang: 224 and 64).
  static constexpr int kConsumerRegisters = 216, kProducerRegisters = 72;
  static constexpr int kLaunchRegisters = 65536 / kThreads / 8 * 8;
  static_assert(2 * (kConsumerRegisters - kLaunchRegisters) <=
                    kLaunchRegisters - kProducerRegisters,
                "the consumers' raise within what the producer frees");
};

// The wgmma attention over FlashMLA's fp8 cache (d_qk 576): the same warpgroups and bf16 tile,
// one buffer of it; the next tile's raw rows (656 bytes each, dsa/kv_cache.hpp) arrive by
// cp.async into a staging buffer while this tile is computed on, and are dequantized into the
// bf16 tile between tiles.
struct MlaFp8AttentionTraits : MlaAttentionTraits<576> {
  using Tile = MlaTileTraits<576>;
  static constexpr int kRowBytes = 656;
  static constexpr int kRowChunks = kRowBytes / 16;  // 41 pieces of 16 bytes
  static constexpr int kLatent = 512, kScales = 512, kRope = 528, kTile = 128;
  struct Layout {
    static constexpr uint32_t q = 0;
    static constexpr uint32_t kv = q + Tile::kQueryBytes;
    static constexpr uint32_t raw = kv + Tile::kTileBytes;
    static constexpr uint32_t p = raw + Tile::kKeys * kRowBytes;  // 1024-aligned: 64 x 656
    static constexpr uint32_t max = p + sizeof(__nv_bfloat16) * Tile::kHeads * Tile::kKeys;
    static constexpr uint32_t sum = max + sizeof(float) * 2 * Tile::kHeads;
    static constexpr uint32_t slot = sum + sizeof(float) * 2 * Tile::kHeads;
    static constexpr uint32_t bytes = slot + sizeof(int) * 2 * Tile::kKeys + 1024;  // + slack
  };
  static_assert(Layout::kv % 1024 == 0 && Layout::p % 1024 == 0, "swizzled operands");
};

// The V4 attention over DeepSeek-V4's fp8 caches (d 512, dsa/kv_cache.hpp): as the fp8 cache's
// traits above, with rows of 584 bytes (8-byte aligned only, gathered 8 bytes at a time): 448
// e4m3 codes, the 64 RoPE values in bf16 at byte 448, a ue8m0 scale byte per 64 codes at 576.
struct MlaV4Fp8AttentionTraits : MlaAttentionTraits<512> {
  using Tile = MlaTileTraits<512>;
  static constexpr int kRowBytes = 584;
  static constexpr int kRowPieces = kRowBytes / 8;  // 73 pieces of 8 bytes
  static constexpr int kLatent = 448, kRope = 448, kScales = 576, kTile = 64;
  struct Layout {
    static constexpr uint32_t q = 0;
    static constexpr uint32_t kv = q + Tile::kQueryBytes;
    static constexpr uint32_t raw = kv + Tile::kTileBytes;
    // P is a 128-byte-swizzled wgmma operand: 1024-aligned (64 x 584 staged bytes are not).
    static constexpr uint32_t p = (raw + Tile::kKeys * kRowBytes + 1023) / 1024 * 1024;
    static constexpr uint32_t max = p + sizeof(__nv_bfloat16) * Tile::kHeads * Tile::kKeys;
    static constexpr uint32_t sum = max + sizeof(float) * 2 * Tile::kHeads;
    static constexpr uint32_t slot = sum + sizeof(float) * 2 * Tile::kHeads;
    static constexpr uint32_t bytes = slot + sizeof(int) * 2 * Tile::kKeys + 1024;  // + slack
  };
  static_assert(Layout::kv % 1024 == 0 && Layout::p % 1024 == 0, "swizzled operands");
};

// The dense probabilities: one warpgroup, keys as the A operand (a key per accumulator row), the
// 64 heads' queries as B; two key buffers.
template <int D_QK>
struct DenseProbabilityTraits : MlaTileTraits<D_QK> {
  using Tile = MlaTileTraits<D_QK>;
  static constexpr int kThreads = 128;
  static constexpr size_t kSmem = 1024 + Tile::kQueryBytes + 2 * Tile::kTileBytes;
};

// The attention on wmma for the other shapes (d_qk, d_v multiples of 16 up to 576 and 512): 64
// heads per block in 8 warps, tiles of 32 keys, two passes over the selection (the softmax
// statistics, then P . V with the final max, 16 accumulator tiles per warp in registers).
struct WmmaAttentionTraits {
  static constexpr int kHeads = 64;
  static constexpr int kKeyTile = 32;
  static constexpr int kWarps = 8;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kScoreStride = kKeyTile + 4;
  static constexpr int kProbStride = kKeyTile + 8;
  static constexpr int kMaxOutputTiles = 16;  // per warp: 64 heads x 512 values / 8 warps / 256
  static constexpr int kMaxDqk = 576;
  static constexpr int kMaxDv = 512;
};

}  // namespace dsa::cuda
