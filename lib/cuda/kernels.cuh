// Internal: the CUDA kernels on device pointers, used by backend.cu and by bench/.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

namespace dsa::cuda {

// Throws dsa::Error(runtime) naming the call when a CUDA call failed.
void check(cudaError_t status, const char* what);

// Indexer scores (Eq. 1) of `rows` query rows at positions first_position + r against keys
// [0, keys), on the tensor cores: q [rows, H, d] and k [keys, d] hold the values the
// precision pipeline produced (bf16-rounded, or the e4m3 codes' values, exact in bf16);
// w [rows, H] is the weight times the query row's fp8 scale, k_scale [keys] the key's.
// The per-head logits stay in shared memory. scores [rows, stride], -inf where s > t.
// Needs 128 % H == 0 and d % 16 == 0, d <= 256.
// Several sequences in one launch (decode batches): sequence z reads and writes at these
// element offsets from each pointer.
struct IndexerBatch {
  int count = 1;
  int64_t q = 0, w = 0, k = 0, k_scale = 0, scores = 0;
};
void launch_indexer_bf16(const __nv_bfloat16* q, const float* w, const __nv_bfloat16* k,
                         const float* k_scale, int rows, int heads, int dim, int keys,
                         int64_t first_position, float* scores, int64_t stride, cudaStream_t stream,
                         const IndexerBatch& batch = {});
// The fp8 path on Hopper's fp8 tensor cores for DSA's indexer shape (H = 64, d = 128): q and k
// hold the e4m3 codes, w and k_scale as above (the scales of the fp8 blocks).
void launch_indexer_fp8(const uint8_t* q, const float* w, const uint8_t* k, const float* k_scale,
                        int rows, int keys, int64_t first_position, float* scores, int64_t stride,
                        cudaStream_t stream, const IndexerBatch& batch = {});
// The same in f32 on the CUDA cores (the f32 precision mode).
void launch_indexer_f32(const float* q, const float* w, const float* k, int rows, int heads,
                        int dim, int keys, int64_t first_position, float* scores, int64_t stride,
                        cudaStream_t stream);

// Top-k of every row (Eq. 2): row r sees scores[r, 0 .. first_position + r]; indices [rows, k]
// in descending score, ties lower position first, NaN ranked like -inf, -1 padding; values
// the selected scores (-inf for padding). k <= kMaxTopk.
inline constexpr int kMaxTopk = 8192;
void launch_topk(const float* scores, int64_t stride, int rows, int64_t first_position, int keys,
                 int k, int32_t* indices, float* values, cudaStream_t stream);

// MQA attention of `rows` query rows: q [rows, H, d_qk] bf16, kv [keys, d_qk] bf16 (values its
// first d_v columns), over indices [rows, k] (-1 skipped) or, with indices == nullptr, over
// every s <= first_position + r (dense). out [rows, H, d_v] f32, lse [rows, H] (natural log;
// -inf and zeros for a row that selects nothing). d_qk, d_v multiples of 16, d_v <= d_qk <= 576,
// d_v <= 512.
struct AttentionBatch {
  int count = 1;
  int64_t q = 0, kv = 0, indices = 0, out = 0, lse = 0;
};
void launch_mqa_attention(const __nv_bfloat16* q, const __nv_bfloat16* kv, const int32_t* indices,
                          int k, int rows, int heads, int d_qk, int d_v, int keys,
                          int64_t first_position, float scale, float* out, float* lse,
                          cudaStream_t stream, const AttentionBatch& batch = {});

// Dense probabilities summed over heads (dsa-compare's reference p, times H), for MLA's shapes
// (d_qk 512 or 576): partial [ceil(H / 64), rows, stride], one slice per group of 64 heads,
// partial[g][r][s] = sum over the group's heads h of exp(scale q[r, h] . kv[s] - lse[r, h]) for
// s <= first_position + r (entries past it are not written); lse [rows, H] the dense attention's.
void launch_dense_probabilities(const __nv_bfloat16* q, const __nv_bfloat16* kv, int rows,
                                int heads, int d_qk, int64_t first_position, float scale,
                                const float* lse, float* partial, int64_t stride,
                                cudaStream_t stream);

}  // namespace dsa::cuda
