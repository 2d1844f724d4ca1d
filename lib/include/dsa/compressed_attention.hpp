// DeepSeek-V4's attention (inference/model.py Attention.forward with kernel.py sparse_attn): one
// softmax per head over a sliding window of raw tokens and compressed entries, with a learned
// sink in the denominator; docs/DESIGN.md section 6. CSA (ratio 4): the window and the entries the
// indexer selected; HCA (ratio 128): the window and every visible entry; SWA: the window alone.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "dsa/attention.hpp"
#include "dsa/device.hpp"
#include "dsa/kv_cache.hpp"
#include "dsa/report.hpp"
#include "dsa/rows.hpp"
#include "dsa/tensor.hpp"

namespace dsa {

enum class V4Attention { swa, csa, hca };
V4Attention parse_v4_attention(const std::string& text);  // "swa", "csa", "hca"; Error(usage)
std::string v4_attention_name(V4Attention kind);
int64_t v4_compress_ratio(V4Attention kind);  // 0, 4, 128

// Validated inputs. q [B?, Lq, H, d]; kv [B?, T, d], the raw tokens' cache entries (keys and
// values alike: K = V); compressed [B?, N, d] (not for SWA); sink [H] (optional: none adds
// nothing to the denominator). Query row r sits at position T - Lq + r; entry j is visible to
// the query at t when j < floor((t + 1) / ratio), its window is tokens max(0, t - window + 1) .. t.
// kv and compressed may both be V4 fp8 caches instead, u8 [B?, T, 584] and [B?, N, 584], d = 512
// (quantize_v4_cache_fp8; fp8_v4_cache_attention below).
struct CompressedAttentionInputs {
  const Tensor* q = nullptr;
  const Tensor* kv = nullptr;
  const Tensor* compressed = nullptr;
  const Tensor* sink = nullptr;
  V4Attention kind = V4Attention::csa;
  bool batched = false;
  int64_t ratio = 4, window = 128;
  // kv and compressed are DeepSeek-V4's fp8 cache (dsa/kv_cache.hpp: u8 rows of 584 bytes, d =
  // 512): keys and values their dequantized rows.
  bool fp8_cache = false;
  int64_t batch = 1, queries = 0, tokens = 0, entries = 0, heads = 0, dim = 0;
  // The query rows compressed_attention computes and hands to the sink (one rank's share of a
  // job, balanced_rows below); every row by default.
  RowRange rows;

  int64_t position(int64_t row) const { return tokens - queries + row; }
  int64_t visible_entries(int64_t row) const;
};
CompressedAttentionInputs make_compressed_attention_inputs(const Tensor& q, const Tensor& kv,
                                                           const Tensor* compressed,
                                                           const Tensor* sink, V4Attention kind,
                                                           int64_t window);

// [B?, Lq, H, d] and [B?, Lq, H].
Shape compressed_attention_output_shape(const CompressedAttentionInputs& inputs);
Shape compressed_attention_lse_shape(const CompressedAttentionInputs& inputs);

// Checks a CSA selection [B?, Lq, K] of compressed entries: every entry -1 or visible to its
// query (0 <= j < floor((t + 1) / ratio)), none twice in a row; `positions` (from .jsonl) must
// match the rows.
void validate_compressed_indices(const CompressedAttentionInputs& inputs, const Tensor& indices,
                                 const std::vector<int64_t>& positions = {});

// Where --device `name` runs this attention (choose_device in indexer.hpp says how).
DeviceChoice choose_device(const std::string& name, const CompressedAttentionInputs& inputs);

// A job of `parts` ranks (docs/DESIGN.md section 8): shares of the rows of compressed_attention
// with `indices` (null as there), a query at position t costing the positions it attends: its
// window's visible tokens, min(t + 1, window), plus for CSA min(K, its visible entries) of a
// selection K wide (every visible entry without one), for HCA every visible entry, for SWA
// nothing more. Each share starts at a multiple of compressed_attention's chunk of rows (which
// depends on the inputs alone), so a share's chunks are one process's: the same rows gathered
// into one cache and handed to the backend in one call (where the cache is gathered, the MQA
// kernel's split decoding depends on a call's row count; the GPU's V4 kernel splits by the
// inputs' rows). The shares put together are the whole, to the bit.
std::vector<RowRange> balanced_rows(const CompressedAttentionInputs& inputs, const Tensor* indices,
                                    int parts);

// o[t,h] = sum_u p_u key_u with p_u = exp(l_u) / (exp(sink_h) + sum_v exp(l_v)),
// l_u = scale q[t,h] . key_u, over the window and the compressed entries: for CSA those of
// `indices` (validated; null: every visible entry, the selection that loses nothing), for HCA
// every visible entry (indices must be null), for SWA none. Window tokens and entries that cover
// them both count (the released code does not remove either). o is before the released code's
// inverse RoPE. lse = log(exp(sink_h) + sum_u exp(l_u)): the whole denominator. Computes the
// inputs' rows only (Error(usage) for rows outside the B x Lq).
void compressed_attention(const CompressedAttentionInputs& inputs, const Tensor* indices,
                          float scale, const AttentionSink& sink, StageTimes* times,
                          Device device = Device::cpu);

// dsa-attend's report fields of a run: "mode" (csa; csa-every-visible-entry for CSA without a
// selection, `every_entry`; hca; swa), "layout" v4, "window", "compress_ratio", "sink" (whether
// there is one), "kv_cache" (fp8, or the kv's dtype), "scale" and "scale_rule".
nlohmann::json compressed_attention_report(const CompressedAttentionInputs& inputs,
                                           bool every_entry, const SoftmaxScale& scale);

// DeepSeek-V4's fp8 caches of an attention's kv and compressed entries and the same queries over
// them (`inputs` points into the caches, so the three live on the heap together). Error(bad_input)
// for entries not 512 wide (kv_cache.hpp quantize_v4_cache_fp8).
struct V4Fp8CacheAttention {
  Tensor kv, compressed;
  CompressedAttentionInputs inputs;
};
std::unique_ptr<V4Fp8CacheAttention> fp8_v4_cache_attention(const CompressedAttentionInputs& in);
// With `cache` fp8 and inputs that read floating caches: their fp8 caches and the attention over
// them; null with bf16, or when the inputs read fp8 caches already (V3.2's fp8_cache_attention).
std::unique_ptr<V4Fp8CacheAttention> fp8_v4_cache_attention(const CompressedAttentionInputs& in,
                                                            KvCache cache);

}  // namespace dsa
