// DeepSeek-V4's KV compressor (inference/model.py Compressor.forward, prefill): every `ratio`
// tokens of the attention input x pooled into one entry by a per-channel gated softmax, then
// RMSNorm, RoPE at the entry's first token and the cache's quantization; docs/DESIGN.md
// section 6. Ratio 4 (CSA) pools overlapping windows of 8 tokens, ratio 128 (HCA) disjoint ones.
#pragma once

#include <cstdint>
#include <functional>
#include <string>

#include "dsa/device.hpp"
#include "dsa/report.hpp"
#include "dsa/rope.hpp"
#include "dsa/tensor.hpp"

namespace dsa {

// How DeepSeek-V4's steps round. f32: no rounding, no quantization (what transformers computes
// in fp32). bf16: the released code's bf16 roundings (activations are bf16 between steps), no
// quantization. released: bf16 and the caches' quantization as the released code simulates it
// (e4m3 with ue8m0 scales in blocks of 64 over a main entry's non-RoPE dims; for the indexer's
// keys a Hadamard rotation, then e2m1 with ue8m0 scales in blocks of 32).
enum class V4Numerics { f32, bf16, released };
V4Numerics parse_v4_numerics(const std::string& text);  // throws Error(usage)
std::string v4_numerics_name(V4Numerics numerics);

struct CompressorConfig {
  int64_t ratio = 4;     // 4: CSA, windows of 8 overlapping by 4; 128: HCA; others: no overlap
  bool indexer = false;  // the indexer's compressor: its keys are rotated and go through e2m1
  V4Numerics numerics = V4Numerics::released;
  RopeConfig rope = deepseek_v4_rope(4);
  double eps = 1e-6;  // RMSNorm
};

// The compressor's parameters (checkpoint layers.N.attn.compressor.* and
// layers.N.attn.indexer.compressor.*): wkv and wgate [c d, D], ape [ratio, c d], norm [d], with
// c = 2 when the windows overlap (ratio 4), else 1.
struct CompressorWeights {
  const Tensor* wkv = nullptr;
  const Tensor* wgate = nullptr;
  const Tensor* ape = nullptr;
  const Tensor* norm = nullptr;
};

// Validated inputs: x [B?, T, D] (the attention input, attn_norm's output).
struct CompressorInputs {
  const Tensor* x = nullptr;
  CompressorWeights weights;
  bool batched = false, overlap = false;
  int64_t batch = 1, tokens = 0, model_dim = 0, dim = 0, entries = 0;
};
// Throws Error(bad_input) naming the tensor whose shape or dtype does not fit, Error(usage) for
// a configuration the steps cannot take (ratio < 1, RoPE wider than d, quantization blocks).
CompressorInputs make_compressor_inputs(const Tensor& x, const CompressorWeights& weights,
                                        const CompressorConfig& config);
// [B?, floor(T / ratio), d]: only complete windows make entries.
Shape compressed_shape(const CompressorInputs& inputs);

struct CompressedBlock {
  int64_t batch, entry_begin, entries, dim;
  const float* values;  // [entries, dim]
};
using CompressedSink = std::function<void(const CompressedBlock&)>;

// The entries in order, streamed in blocks. Entry j pools tokens [ratio j, ratio j + ratio)
// (and, with overlap, the first half of tokens [4j - 4, 4j)): for each channel e, a softmax over
// the slots of (wgate x_s)[e] + ape[slot, e] weighting (wkv x_s)[e], in f32; then RMSNorm times
// norm (f32, eps), RoPE on the last rope.dims dims at position ratio j, and the numerics' rounding
// and quantization. Entry 0's overlap slots weigh nothing (the released code's -inf gate).
// On `device`: the CUDA backend computes the projections in f32 (cuBLAS, no TF32) and the rest
// in one kernel with the CPU's arithmetic; the two agree but where their f32 sums round apart.
void compress(const CompressorInputs& inputs, const CompressorConfig& config,
              const CompressedSink& sink, StageTimes* times, Device device = Device::cpu);
// Where --device `name` runs compress on these inputs (choose_device in indexer.hpp says how).
DeviceChoice choose_device(const std::string& name, const CompressorInputs& inputs,
                           const CompressorConfig& config);

}  // namespace dsa
