// Attention over selected entries (DSA) and dense causal attention (the baseline), with the
// natural-log log-sum-exp of each (query, head) so partial results can be merged.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "dsa/device.hpp"
#include "dsa/report.hpp"
#include "dsa/rows.hpp"
#include "dsa/tensor.hpp"

namespace dsa {

// Validated attention inputs. MQA (MLA latent): q [B?, Lq, H, d_qk], kv [B?, Lk, d_qk], values
// the first d_v columns of kv, or kv FlashMLA's fp8 cache u8 [B?, Lk, 656] (kv_cache.hpp; d_qk
// 576). MHA/GQA: k [B?, Lk, H_kv, d_qk], v [B?, Lk, H_kv, d_v].
struct AttentionInputs {
  const Tensor* q = nullptr;
  const Tensor* k = nullptr;  // kv in MQA mode
  const Tensor* v = nullptr;  // == k in MQA mode
  bool latent = false;
  bool fp8_cache = false;  // kv is the fp8 cache: keys and values its dequantized rows
  bool batched = false;
  int64_t batch = 1, queries = 0, keys = 0, heads = 0, kv_heads = 1, d_qk = 0, d_v = 0;
  // The query rows sparse_attention and dense_attention compute and hand to the sink (one
  // rank's share of a job, balanced_rows below); every row by default.
  RowRange rows;

  int64_t position(int64_t row) const { return keys - queries + row; }
};
AttentionInputs make_mqa_inputs(const Tensor& q, const Tensor& kv, int64_t d_v);
AttentionInputs make_mha_inputs(const Tensor& q, const Tensor& k, const Tensor& v);

// [B?, Lq, H, d_v] and [B?, Lq, H]: the shapes of the attention output and its lse.
Shape attention_output_shape(const AttentionInputs& inputs);
Shape attention_lse_shape(const AttentionInputs& inputs);

float default_scale(int64_t d_qk);  // d_qk^-0.5

// DeepSeek-V3.2's softmax scale as its released MLA computes it (inference/model.py):
// qk_head_dim^-0.5 with qk_head_dim = 128 + 64 = 192, times mscale^2, mscale = 0.1 · ln(40) + 1
// (YaRN, rope_factor 40, max_seq_len > original_seq_len), in double: 0.1352337788608801. The
// absorbed 576-wide decode path multiplies by the same number. docs/DESIGN.md section 1.
double deepseek_v32_softmax_scale();

// A softmax scale and the rule it came from, as every report states it.
struct SoftmaxScale {
  float value = 1.0f;
  std::string rule;  // "d_qk^-0.5", "deepseek-v3.2" or "given"
};
// The softmax scale `text` names: empty or "default" gives d_qk^-0.5, "deepseek-v3.2" the
// model's own, a number itself (finite and positive). Anything else is Error(usage).
SoftmaxScale resolve_softmax_scale(const std::string& text, int64_t d_qk);

struct AttentionBlock {
  int64_t batch, row_begin, rows, heads, d_v;
  const float* out;  // [rows, H, d_v]
  const float* lse;  // [rows, H]; -inf for a row that selected nothing (its output is 0)
};
using AttentionSink = std::function<void(const AttentionBlock&)>;

// Checks indices [B?, Lq, K] against the inputs: every entry -1 or a visible position
// (0 <= s <= t), no entry twice in a row; `positions` (from .jsonl) must match the rows.
void validate_indices(const AttentionInputs& inputs, const Tensor& indices,
                      const std::vector<int64_t>& positions);

// A copy of indices (i64) in which entries beyond their query's position (t < s < Lk) are -1
// padding, and how many were: the released code's top-k over a row with fewer than k visible
// tokens returns masked future positions, which its causal mask then removes (inference/model.py
// MLA.forward, index_mask += mask). Other entries are kept for validate_indices to judge.
struct DroppedIndices {
  Tensor indices;
  int64_t dropped = 0;
};
DroppedIndices drop_future_indices(const AttentionInputs& inputs, const Tensor& indices);

// Where --device `name` runs attention on these inputs (choose_device in indexer.hpp says how).
DeviceChoice choose_device(const std::string& name, const AttentionInputs& inputs);

// A job of `parts` ranks (docs/DESIGN.md section 8): shares of the rows of sparse attention
// over `indices` (a row at position t costs min(t + 1, K) positions) or, indices null, of dense
// attention (t + 1), each starting at a block of the rows the CPU computes together. A row's
// output does not depend on the rows computed with it: the shares put together are the whole.
std::vector<RowRange> balanced_rows(const AttentionInputs& inputs, const Tensor* indices,
                                    int parts);

// o[t,h] = sum_{s in S_t} softmax_s(scale * q[t,h] . k_s) v_s over the given indices.
void sparse_attention(const AttentionInputs& inputs, const Tensor& indices, float scale,
                      const AttentionSink& sink, StageTimes* times, Device device = Device::cpu);

// The same over all s <= t, computed in key tiles with an online softmax.
void dense_attention(const AttentionInputs& inputs, float scale, const AttentionSink& sink,
                     StageTimes* times, Device device = Device::cpu);

// dsa-attend's report fields of a run of either: "mode" (dense or sparse), "layout" (mqa or
// mha), "scale", "scale_rule" and "kv_cache" (fp8, or the dtype of the keys read).
nlohmann::json attention_report(const AttentionInputs& inputs, bool dense,
                                const SoftmaxScale& scale);

}  // namespace dsa
