// Internal: what the MLA kernels on 64-head tiles share (attention.cu's wgmma attention and
// dense_probabilities.cu): the query-tile loader, the key-row gather and the one QK^T tile loop.
#pragma once

#include <cuda_bf16.h>

#include <cstdint>

#include "traits.cuh"
#include "wgmma.cuh"

namespace dsa::cuda {

// Starts copying query row r's heads h0 .. h0 + 63 (zeros past the last head) into the
// swizzled tile at shared address q_s, THREADS threads sharing the work.
// `thread`: this thread's place among the THREADS (threadIdx.x in the overload below).
template <typename Tile, int THREADS>
__device__ void fetch_query_heads(uint32_t q_s, const __nv_bfloat16* q, int64_t r, int heads,
                                  int h0, int thread) {
  for (int i = thread; i < Tile::kHeads * Tile::kChunks; i += THREADS) {
    const int h = i / Tile::kChunks, c = i % Tile::kChunks;
    const bool valid = h0 + h < heads;
    const __nv_bfloat16* source = valid ? q + (r * heads + h0 + h) * Tile::kDqk + c * 8 : q;
    wgmma::copy_async_16(q_s + wgmma::swizzled_offset(Tile::kHeads, h, c * 8), source, valid);
  }
}
template <typename Tile, int THREADS>
__device__ void fetch_query_heads(uint32_t q_s, const __nv_bfloat16* q, int64_t r, int heads,
                                  int h0) {
  fetch_query_heads<Tile, THREADS>(q_s, q, r, heads, h0, static_cast<int>(threadIdx.x));
}

// The key of a 64-key tile this thread gathers: THREADS / 64 threads per key.
template <int THREADS>
__device__ __forceinline__ int gathered_key() {
  return threadIdx.x / (THREADS / 64);
}

// Starts copying kv row s (zeros when s < 0) into row gathered_key() of the swizzled key tile at
// shared address tile, the key's threads sharing its 16-byte pieces. The caller commits. Each
// thread's pieces are t, t + per_key, ... (t < per_key, a divisor of 8), so their places differ
// by constants: one address of each kind, then immediate offsets (no arithmetic per copy).
template <typename Tile, int THREADS>
__device__ void fetch_key_row(uint32_t tile, const __nv_bfloat16* kv, int s) {
  constexpr int per_key = THREADS / Tile::kKeys;
  static_assert(8 % per_key == 0 && Tile::kChunks % per_key == 0, "whole pieces per thread");
  const int j = gathered_key<THREADS>(), t = threadIdx.x % per_key;
  const bool valid = s >= 0;
  const char* row =
      reinterpret_cast<const char*>(kv + static_cast<int64_t>(valid ? s : 0) * Tile::kDqk) + t * 16;
  const uint32_t key_row = tile + j * 128;
#pragma unroll
  for (int n = 0; n < Tile::kChunks / per_key; ++n) {
    // Piece t + n per_key: 64-column block n per_key / 8, swizzled piece (t + n per_key % 8) ^ j.
    constexpr int kPerBlock = 8 / per_key;
    const uint32_t piece = (t + (n % kPerBlock) * per_key) ^ (j % 8);
    wgmma::copy_async_16(key_row + (n / kPerBlock) * Tile::kKeys * 128 + piece * 16,
                         row + n * per_key * 16, valid);
  }
}

// Starts copying the 64-column blocks [FIRST, END) of the kv rows row[q] (zeros where
// !valid[q]) into rows key + 16 q of the swizzled key tile at shared address tile, for
// key = thread / 8 (thread < 128): eight threads a key, thread % 8 the 16-byte piece of each
// block, so that a warp's copy takes four rows' whole 128-byte lines (with two threads a key,
// 32 bytes of 16 rows a copy, the paired-tile attention ran 1.08 to 1.30 times slower:
// bench/NOTES.md). The caller commits or arrives.
template <typename Tile, int FIRST, int END>
__device__ void fetch_key_blocks(uint32_t tile, const __nv_bfloat16* const (&row)[4],
                                 const bool (&valid)[4], int thread) {
  static_assert(Tile::kKeys == 64, "16 keys of eight threads, four times");
  const int key = thread / 8, t = thread % 8;
  const uint32_t piece = static_cast<uint32_t>(t ^ (key % 8)) * 16;  // (key + 16 q) % 8 alike
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    const char* source = reinterpret_cast<const char*>(row[q]) + t * 16;
    const uint32_t key_row = tile + (key + 16 * q) * 128 + piece;
#pragma unroll
    for (int b = FIRST; b < END; ++b) {
      wgmma::copy_async_16(key_row + b * Tile::kKeys * 128, source + b * 128, valid[q]);
    }
  }
}

// acc (+)= A . B^T over the 64-column blocks [FIRST, END) of the rows, on one warpgroup's tensor
// cores: A 64 rows and B N rows (32 or 64) of swizzled K-major tiles at shared addresses a and b
// (the queries and the keys, either way round); the first MMA zeroes acc when `zero_first`.
// Issues the MMAs, neither fenced nor committed (issue_score_tile below does both).
template <typename Tile, int N, int FIRST, int END>
__device__ __forceinline__ void issue_score_blocks(float (&acc)[N / 2], uint32_t a, uint32_t b,
                                                   bool zero_first) {
  static_assert(N == 32 || N == 64, "score_tile: N is 32 or 64");
  static_assert(Tile::kHeads == Tile::kKeys, "score_tile: query and key tiles of one height");
  static_assert(0 <= FIRST && FIRST < END && END <= Tile::kDqk / 64, "blocks of the row");
  // Step 0's descriptors, once; a step's differ only in the start address (wgmma::advanced).
  const uint64_t a0 = wgmma::descriptor(a, 16, 1024), b0 = wgmma::descriptor(b, 16, 1024);
#pragma unroll
  for (int step = FIRST * 4; step < END * 4; ++step) {
    // Columns 16 step .. 16 step + 15 of a 64-row tile, the queries' and the keys' alike.
    const uint32_t offset = wgmma::swizzled_offset(Tile::kKeys, 0, step * 16);
    const uint64_t da = wgmma::advanced(a0, offset);
    const uint64_t db = wgmma::advanced(b0, offset);
    const bool accumulate = step > FIRST * 4 || !zero_first;
    if constexpr (N == 32) {
      wgmma::wgmma_m64n32_kmajor(acc, da, db, accumulate);
    } else {
      wgmma::wgmma_m64n64_kmajor(acc, da, db, accumulate);
    }
  }
}
// acc = A . B^T over the D_QK columns. Issues and commits the MMAs without waiting for them:
// the caller may issue other work while the tensor cores run, then wgmma::wait<0>() and
// wgmma::fence_operands(acc) before reading acc.
template <typename Tile, int N>
__device__ __forceinline__ void issue_score_tile(float (&acc)[N / 2], uint32_t a, uint32_t b) {
  wgmma::fence();
  issue_score_blocks<Tile, N, 0, Tile::kDqk / 64>(acc, a, b, true);
  wgmma::commit();
}

// issue_score_tile, then the wait: returns when the accumulator is ready.
template <typename Tile, int N>
__device__ __forceinline__ void score_tile(float (&acc)[N / 2], uint32_t a, uint32_t b) {
  issue_score_tile<Tile, N>(acc, a, b);
  wgmma::wait<0>();
  wgmma::fence_operands(acc);
}

}  // namespace dsa::cuda
