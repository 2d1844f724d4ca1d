// Internal: the CUDA kernels on device pointers, used by backend.cu and by bench/. Each kernel
// takes one params struct (pointers, shapes, strides, stream) and reads its tile sizes from a
// traits struct (traits.cuh). What shapes a kernel takes is said once, by its *_limit function:
// the backend's check (Backend::check, DESIGN.md §5) asks it before any work, and the launcher
// asks it again before a launch.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>
#include <utility>

namespace dsa::cuda {

// Throws dsa::Error(runtime) naming the call when a CUDA call failed.
void check(cudaError_t status, const char* what);
// Throws dsa::Error(usage) with `why` unless it is empty (a *_limit's answer).
void require(const std::string& why);

// Launches kernel(args...) on `stream` with one launch attribute (cudaLaunchKernelEx): the
// top-k's cooperative grid, the split merge's programmatic dependence on the attention.
template <typename... Params, typename... Args>
cudaError_t launch_with(cudaLaunchAttribute attribute, dim3 grid, dim3 block, size_t shared_bytes,
                        cudaStream_t stream, void (*kernel)(Params...), Args&&... args) {
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = shared_bytes;
  config.stream = stream;
  config.attrs = &attribute;
  config.numAttrs = 1;
  return cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...);
}

// Keys [0, visible_keys(...)) are visible to query row `row` at position first_position + row:
// position + 1, or with compressed keys of `ratio` tokens (DeepSeek-V4's CSA) the complete
// entries, floor((position + 1) / ratio).
__host__ __device__ inline int64_t visible_keys(int64_t first_position, int64_t row,
                                                int64_t ratio) {
  const int64_t n = first_position + row + 1;
  return ratio == 1 ? n : n / ratio;  // no 64-bit division on V3.2's path
}

// Indexer scores (Eq. 1) of `rows` query rows at positions first_position + r against keys
// [0, keys): q [rows, heads, dim] and k [keys, dim] hold the values the precision pipeline
// produced (T = bf16: bf16-rounded, or the e4m3 codes' values, exact in bf16; T = uint8_t: the
// e4m3 codes, on Hopper's fp8 tensor cores; T = float: the f32 mode on the CUDA cores); w
// [rows, heads] is the weight times the query row's fp8 scale, k_scale [keys] the key's (unused
// in f32). scores [rows, stride], -inf past visible_keys. Several sequences in one launch (decode
// batches): sequence z reads and writes at the *_step element offsets from each pointer.
template <typename T>
struct IndexerParams {
  const T* q = nullptr;
  const float* w = nullptr;
  const T* k = nullptr;
  const float* k_scale = nullptr;
  float* scores = nullptr;
  int rows = 0, heads = 0, dim = 0, keys = 0;
  int64_t first_position = 0, stride = 0;
  int64_t ratio = 1;  // tokens per key (visible_keys)
  int sequences = 1;
  int64_t q_step = 0, w_step = 0, k_step = 0, k_scale_step = 0, scores_step = 0;
  cudaStream_t stream = nullptr;
};
// bf16 and f32: 128 % heads == 0, dim % 16 == 0, dim <= 256 (bf16). fp8: heads 64, dim 128.
std::string indexer_limit(int heads, int dim);
std::string indexer_fp8_limit(int heads, int dim);
void launch_indexer(const IndexerParams<__nv_bfloat16>& p);
void launch_indexer(const IndexerParams<uint8_t>& p);
void launch_indexer(const IndexerParams<float>& p);  // one sequence

// The fp8 indexer with the top-k fused (indexer.cu): each query row's top-k of its visible keys
// as launch_topk gives it (the same indices, values and order), the scores never stored. One
// sequence; p.scores and p.stride are unused. lists: indexer_topk_scratch(rows, k) entries of
// device memory, each query's candidates.
struct IndexerTopkOutputs {
  int32_t* indices = nullptr;  // [rows, k]
  float* values = nullptr;     // [rows, k]
  uint64_t* lists = nullptr;
  int k = 0;
  // Set by the launcher: entries per list; the rows whose sampled bound passed too few keys
  // (flags [rows], then their count), scored again with no bound by a second launch (rerun).
  int capacity = 0;
  int target = 0;  // the keys a sampled bound aims to pass: capacity / 2, or DSA_FUSED_TOPK_TARGET
  uint32_t* redo = nullptr;
  bool rerun = false;
};
constexpr int kIndexerTopkMaxK = 2048;  // a query's sorted top-k fills its warpgroup's query tile
std::string indexer_topk_limit(int heads, int dim, int64_t k);
int64_t indexer_topk_scratch(int rows, int64_t k);
// Whether the fused path is the faster for `rows` query rows against `keys` keys: rows enough to
// fill the GPU with one block per SM (fewer: the unfused indexer splits the keys over blocks and
// fills it better), and keys up to kIndexerTopkPreferredKeys, as measured on the H200 (bench/
// NOTES.md: 0.94x the unfused indexer and top-k at 32K, 1.15x at 64K, 1.23x at 128K).
constexpr int64_t kIndexerTopkPreferredKeys = 32768;
bool indexer_topk_preferred(int rows, int64_t keys);
void launch_indexer_topk(const IndexerParams<uint8_t>& p, const IndexerTopkOutputs& out);

// Top-k of every row (Eq. 2): row r sees scores[r, 0 .. min(keys, visible_keys(...)));
// indices [rows, k] in descending score, ties lower position first, NaN ranked like -inf, -1
// padding; values the selected scores (-inf for padding).
struct TopkParams {
  const float* scores = nullptr;
  int32_t* indices = nullptr;
  float* values = nullptr;
  int rows = 0, keys = 0, k = 0;
  int64_t first_position = 0, stride = 0;
  int64_t ratio = 1;  // tokens per key (visible_keys)
  cudaStream_t stream = nullptr;
};
std::string topk_limit(int64_t k);
void launch_topk(const TopkParams& p);

// MQA attention of `rows` query rows: q [rows, heads, d_qk] bf16, kv [keys, d_qk] bf16 (values
// its first d_v columns), over indices [rows, k] (-1 skipped) or, with indices == nullptr, over
// every s <= first_position + r (dense). out [rows, heads, d_v] f32, lse [rows, heads] (natural
// log; -inf and zeros for a row that selects nothing). Batched like IndexerParams. With kv_fp8
// set instead of kv, the latent rows are FlashMLA's fp8 cache (dsa/kv_cache.hpp: 656 bytes a
// row, sequence z's at byte z * kv_fp8_step; d_qk 576, d_v 512), dequantized to bf16 in shared
// memory (exact: code x power-of-two scale).
struct AttentionParams {
  const __nv_bfloat16* q = nullptr;
  const __nv_bfloat16* kv = nullptr;
  const uint8_t* kv_fp8 = nullptr;
  int64_t kv_fp8_step = 0;
  const int32_t* indices = nullptr;
  float* out = nullptr;
  float* lse = nullptr;
  int rows = 0, heads = 0, d_qk = 0, d_v = 0, keys = 0, k = 0;
  int64_t first_position = 0;
  float scale = 1.0f;
  int sequences = 1;
  int64_t q_step = 0, kv_step = 0, indices_step = 0, out_step = 0, lse_step = 0;
  // Split decoding's scratch (attention_partial_floats of these params), or null: one block
  // per (row, head group) walks the whole selection.
  float* partial = nullptr;
  // The input's query rows per sequence when these rows are a chunk of them (0: rows). Split
  // decoding is chosen by it, not by the chunk, so that chunks and MPI shares of the rows give
  // every row the same arithmetic.
  int query_rows = 0;
  // Split decoding's pieces per row when set (the bench's sweep; at most the row's tiles and
  // kMaxSplits), else attention_splits' rule.
  int splits = 0;
  // DeepSeek-V4 (launch_compressed_attention; dsa/compressed_attention.hpp): with window > 0,
  // row r at t = first_position + r attends its window of raw tokens kv[max(0, t - window + 1)
  // .. t], then compressed entries, rows of compressed [entries, 512] (sequence z's at
  // z * compressed_step): those of indices [rows, k] (CSA, -1 skipped), or with indices null
  // every visible one, j < min(entries, floor((t + 1) / ratio)) (HCA; ratio 0, SWA: none). One
  // softmax with sink [heads] (natural-log logits, null: none) in its denominator; lse is the
  // whole denominator's.
  const __nv_bfloat16* compressed = nullptr;
  int64_t compressed_step = 0;
  // Or, with kv_fp8 set instead of kv, both caches in DeepSeek-V4's fp8 format (dsa/kv_cache.hpp:
  // 584 bytes a row, sequence z's at byte z * kv_fp8_step and z * compressed_fp8_step).
  const uint8_t* compressed_fp8 = nullptr;
  int64_t compressed_fp8_step = 0;
  int window = 0;
  int64_t ratio = 0, entries = 0;
  const float* sink = nullptr;
  cudaStream_t stream = nullptr;
};
// d_qk and d_v multiples of 16, d_v <= d_qk <= 576, d_v <= 512; from the fp8 cache, d_qk 576 and
// d_v 512.
std::string attention_limit(int d_qk, int d_v, bool fp8_cache = false);
// Split decoding (flash decoding): with at most kSplitRows query rows per sequence, the wgmma
// kernel cuts each row's selection into pieces of at least kSplitTiles tiles of 64, one block
// each, as many as one wave of blocks holds (the input's rows per sequence, query_rows, x head
// groups x sequences x splits at most the GPU's SMs) up to kMaxSplits, and a second kernel merges
// their partials by their lse. The count depends on the launch (the backend launches one sequence
// at a time; a batched launch gives each sequence what a launch of it alone with the same split
// count, `splits` above, gives). 1: no split (and no scratch needed).
constexpr int kSplitRows = 8, kSplitTiles = 3, kMaxSplits = 32;
int attention_splits(const AttentionParams& p);
int64_t attention_partial_floats(const AttentionParams& p);
void launch_attention(const AttentionParams& p);
// DeepSeek-V4's attention (the fields above), d_qk = d_v = 512 (K = V), window >= 1, from the
// bf16 caches or (kv_fp8) the fp8 ones; split decoding as launch_attention's, over a row's
// window and entries.
std::string compressed_attention_limit(int dim, int64_t window);
void launch_compressed_attention(const AttentionParams& p);

// DeepSeek-V4's compressor after its projections (compressor.cu; dsa/compressor.hpp compress):
// entries [first_entry, first_entry + entries) of one sequence from kv = wkv x and score = wgate
// x, f32 [tokens, width] for the tokens from token0 on (width = 2 dim with overlap, else dim):
// the per-channel softmax over each entry's slots (score + ape) weighting kv, RMSNorm times norm
// (eps), RoPE at position ratio j with the f32 frequencies [rope_dims / 2] (dsa::Rope's), and,
// with quantizes, the cache's rounding (indexer: Hadamard, then e2m1 in blocks of 32; else e4m3
// in blocks of 64 over the non-RoPE dims), each as compress() does it; rounds: the bf16 steps.
// out [entries, dim] f32; and, where set, the caches the other kernels read: out_bf16 the same
// values in bf16 (the attention's compressed rows; exact outside f32), out_codes with out_scales
// [entries] each entry as e4m3 codes of one power-of-two scale (the fp8 indexer's keys: exact for
// the indexer's e2m1 values while its blocks' scales lie within 2^14 of each other).
struct CompressorParams {
  const float* kv = nullptr;
  const float* score = nullptr;
  const float* ape = nullptr;          // [ratio, width]
  const float* norm = nullptr;         // [dim]
  const float* frequencies = nullptr;  // [rope_dims / 2]
  float* out = nullptr;
  __nv_bfloat16* out_bf16 = nullptr;
  uint8_t* out_codes = nullptr;
  float* out_scales = nullptr;
  int64_t first_entry = 0, token0 = 0;
  int entries = 0, ratio = 4, dim = 0, rope_dims = 64;
  bool overlap = false, indexer = false, rounds = true, quantizes = true;
  float eps = 1e-6f;
  cudaStream_t stream = nullptr;
};
// d a multiple of 64 up to 1024 (one thread per channel), an even RoPE width up to d; the
// indexer's Hadamard: d a power of two.
std::string compressor_limit(int dim, int rope_dims, bool hadamard);
void launch_compressor(const CompressorParams& p);

// Dense probabilities summed over heads (dsa-compare's reference p, times H), for MLA's shapes:
// partial [ceil(heads / 64), rows, stride], one slice per group of 64 heads, partial[g][r][s] =
// sum over the group's heads h of exp(scale q[r, h] . kv[s] - lse[r, h]) for s <= first_position
// + r (entries past it are not written); lse [rows, heads] the dense attention's.
struct DenseProbabilityParams {
  const __nv_bfloat16* q = nullptr;
  const __nv_bfloat16* kv = nullptr;
  const float* lse = nullptr;
  float* partial = nullptr;
  int rows = 0, heads = 0, d_qk = 0;
  int64_t first_position = 0, stride = 0;
  float scale = 1.0f;
  cudaStream_t stream = nullptr;
};
// d_qk 512 or 576.
std::string dense_probabilities_limit(int d_qk);
void launch_dense_probabilities(const DenseProbabilityParams& p);

// Random-looking device values, the same on every run (fill.cu): n elements from a hash of
// (index, seed) uniform in [-1, 1). bf16 values times amplitude; e4m3 codes of amplitude x it (448:
// what fp8 block quantization gives); bf16-rounded values held in f32 (an activation as an f32
// projection reads it); one value everywhere; n rows of FlashMLA's fp8 cache (656 bytes: e4m3 codes
// of 448 x it, the four scales 2^-8, the 64 RoPE dims bf16 values of it); n rows of V4's (584
// bytes: the same codes and RoPE values, seven ue8m0 scales of 2^-8).
void fill_bf16(__nv_bfloat16* x, int64_t n, uint32_t seed, float amplitude,
               cudaStream_t stream = nullptr);
void fill_e4m3(uint8_t* x, int64_t n, uint32_t seed, float amplitude,
               cudaStream_t stream = nullptr);
void fill_bf16_as_f32(float* x, int64_t n, uint32_t seed, cudaStream_t stream = nullptr);
void fill_f32(float* x, int64_t n, float value, cudaStream_t stream = nullptr);
void fill_fp8_cache(uint8_t* x, int64_t n, uint32_t seed, cudaStream_t stream = nullptr);
void fill_v4_fp8_cache(uint8_t* x, int64_t n, uint32_t seed, cudaStream_t stream = nullptr);

}  // namespace dsa::cuda
