// Internal: the CPU backend's hot loops. cpu_kernels.inc is compiled once per instruction set
// (cpu_kernels_generic.cpp, _avx2.cpp, _avx512.cpp); cpu_kernels() picks the widest one this
// CPU runs, once, unless DSA_CPU_KERNELS or set_cpu_kernels() names another.
#pragma once

#include <cstdint>

namespace dsa::detail {

// Indexer keys are packed in panels of kPanel keys: [ceil(Lk / kPanel)][d_I][kPanel], zero-padded,
// so that one vector holds one element of kPanel consecutive keys.
inline constexpr int64_t kPanel = 16;

struct IndexerScoreArgs {
  const float* q;           // [rows, H_I, d_I], prepared
  const float* weights;     // [rows, H_I]: indexer_head_weights, q's scales folded in
  const float* panels;      // packed keys
  const float* key_scales;  // [panels * kPanel]: each key's scale, applied after the head sum
  const int64_t* visible;   // [rows]: row r scores keys [0, visible[r])
  int64_t rows, heads, dim;
  float* out;  // row r at out + r * stride; entries at or beyond visible[r] are left alone
  int64_t stride;
};

// The running state of one query row's attention (the heads of one kv group in vector lanes).
struct AttendState {
  float* acc;  // [heads, d_v]: sum of exp(logit - max) * value
  float* max;  // [padded_heads]: running maximum of the scaled logits
  float* sum;  // [padded_heads]: running sum of exp(logit - max)
};

struct AttendTileArgs {
  const float* q;  // [d_qk, padded_heads]: q transposed and times the softmax scale
  int64_t heads, padded_heads, d_qk, d_v;
  const float* const* keys;    // [n] rows of d_qk floats
  const float* const* values;  // [n] rows of d_v floats
  int64_t n;                   // 1 <= n <= kAttendTile
  float* logits;               // scratch [kAttendTile, padded_heads]
  AttendState state;
};
inline constexpr int64_t kAttendTile = 64;
// Heads are padded to a multiple of this (the widest vector's lanes).
inline constexpr int64_t kHeadLanes = 16;

struct CpuKernels {
  const char* name;
  // Eq. 1 over packed keys: out[r, s] = key_scale[s] * sum_j w[r, j] * ReLU(q[r, j] . k[s]) for
  // s < visible[r] (the released fp8_index's order); heads summed in order, so a row's scores do
  // not depend on the other rows of the call.
  void (*indexer_scores)(const IndexerScoreArgs& args);
  // One tile of keys into a row's online softmax: rescales acc and sum by exp(old - new max).
  void (*attend_tile)(const AttendTileArgs& args);
};

// The kernels this process uses.
const CpuKernels& cpu_kernels();

}  // namespace dsa::detail
