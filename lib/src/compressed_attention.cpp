// DeepSeek-V4's attention over a window and compressed entries with a sink
// (compressed_attention.hpp; docs/DESIGN.md section 6): the inputs' checks, then the backend's
// compressed_attention entry. The CPU's (and the GPU's for entries other than 512 wide) is built
// here on a backend's MQA attention: per chunk of query rows, the window's raw tokens and the
// entries the rows use are gathered into one cache, the rows' index lists point into it, the
// backend attends, and the sink joins the denominator afterwards: lse' = log(exp(lse) +
// exp(sink)), o' = o exp(lse - lse') (FlashMLA's attn_sink). The GPU's V4 kernel reads both
// caches itself (lib/cuda/backend.cu).
#include "dsa/compressed_attention.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "backend.hpp"
#include "checks.hpp"
#include "dsa/error.hpp"
#include "dsa/kv_cache.hpp"
#include "progress.hpp"
#include "views.hpp"

namespace dsa {

namespace {

// Compressed entries per row at most: the selection's width, or every visible entry.
int64_t most_entries(const CompressedAttentionInputs& in, const Tensor* indices) {
  if (in.kind == V4Attention::swa) return 0;
  if (indices) return indices->rank() > 0 ? indices->shape.back() : 0;
  return in.queries > 0 ? in.visible_entries(in.queries - 1) : 0;
}

// Query rows per chunk: their gathered cache (window, rows, the entries they use) and index
// lists stay near 64 MB. It depends on the inputs alone, so balanced_rows can align to it.
int64_t chunk_rows(const CompressedAttentionInputs& in, const Tensor* indices) {
  const int64_t per_row =
      std::max<int64_t>(1, in.window + most_entries(in, indices)) * (in.dim * 4 + 8);
  return std::clamp<int64_t>((64 << 20) / per_row / 16 * 16, 16, 4096);
}

}  // namespace

V4Attention parse_v4_attention(const std::string& text) {
  if (text == "swa") return V4Attention::swa;
  if (text == "csa") return V4Attention::csa;
  if (text == "hca") return V4Attention::hca;
  bad_usage("attention: expected swa, csa or hca, got '{}'", text);
}

std::string v4_attention_name(V4Attention kind) {
  switch (kind) {
    case V4Attention::swa:
      return "swa";
    case V4Attention::csa:
      return "csa";
    case V4Attention::hca:
      break;
  }
  return "hca";
}

int64_t v4_compress_ratio(V4Attention kind) {
  switch (kind) {
    case V4Attention::swa:
      return 0;
    case V4Attention::csa:
      return 4;
    case V4Attention::hca:
      break;
  }
  return 128;
}

int64_t CompressedAttentionInputs::visible_entries(int64_t row) const {
  if (ratio == 0) return 0;
  return std::min(entries, (position(row) + 1) / ratio);
}

CompressedAttentionInputs make_compressed_attention_inputs(const Tensor& q, const Tensor& kv,
                                                           const Tensor* compressed,
                                                           const Tensor* sink, V4Attention kind,
                                                           int64_t window) {
  if (window < 1) bad_usage("window must be at least 1 token, got {}", window);
  detail::require_floating(q, "q");
  // The caches: floating rows of d values, or both DeepSeek-V4's fp8 format (kv_cache.hpp).
  const bool fp8 = is_v4_fp8_cache(kv);
  if (!fp8) detail::require_floating(kv, "kv");
  if (q.rank() != 3 && q.rank() != 4) {
    bad_input("{} (q): expected shape [B?, Lq, H, d], got {}", q.name, shape_string(q.shape));
  }
  CompressedAttentionInputs in;
  in.q = &q;
  in.kv = &kv;
  in.kind = kind;
  in.ratio = v4_compress_ratio(kind);
  in.window = window;
  in.batched = q.rank() == 4;
  const int64_t o = in.batched ? 1 : 0;
  in.batch = in.batched ? q.dim(0) : 1;
  in.queries = q.dim(o);
  in.heads = q.dim(o + 1);
  in.dim = q.dim(o + 2);
  in.fp8_cache = fp8;
  if (in.heads < 1 || in.dim < 1) {
    bad_input("{} (q): H and d must be at least 1, got shape {}", q.name, shape_string(q.shape));
  }
  if (fp8 && in.dim != kV4CacheDim) {
    bad_input("{} (q): the V4 fp8 cache {} holds entries of {} values, got d = {}", q.name, kv.name,
              kV4CacheDim, in.dim);
  }
  const int64_t row_width = fp8 ? kV4CacheBytes : in.dim;  // a cache row's last dimension
  const std::string prefix = in.batched ? fmt::format("{}, ", in.batch) : "";
  if (kv.rank() != q.rank() - 1 || (in.batched && kv.dim(0) != in.batch) ||
      kv.dim(o + 1) != row_width) {
    bad_input("{} (kv): expected shape [{}T, {}] to match {} {}, got {}", kv.name, prefix,
              row_width, q.name, shape_string(q.shape), shape_string(kv.shape));
  }
  in.tokens = kv.dim(o);
  if (in.queries > in.tokens) {
    bad_input("{} (q) has {} queries but {} (kv) only {} tokens: queries are the last Lq tokens",
              q.name, in.queries, kv.name, in.tokens);
  }
  if (kind == V4Attention::swa) {
    if (compressed) bad_usage("SWA attends over the window alone: no compressed entries");
  } else {
    if (!compressed) {
      bad_usage("{} needs the compressed entries", v4_attention_name(kind));
    }
    if (fp8 != is_v4_fp8_cache(*compressed)) {
      bad_input("{} (compressed): expected {} like {} (kv), got {} {}", compressed->name,
                fp8 ? "the V4 fp8 cache (u8, 584 bytes a row)" : "floating rows", kv.name,
                dtype_name(compressed->dtype), shape_string(compressed->shape));
    }
    if (!fp8) detail::require_floating(*compressed, "compressed");
    const int64_t expected = in.tokens / in.ratio;
    if (compressed->rank() != kv.rank() || (in.batched && compressed->dim(0) != in.batch) ||
        compressed->dim(o) != expected || compressed->dim(o + 1) != row_width) {
      bad_input(
          "{} (compressed): expected shape [{}{}, {}] (floor(T / {}) entries of {} {}), got {}",
          compressed->name, prefix, expected, row_width, in.ratio, kv.name, shape_string(kv.shape),
          shape_string(compressed->shape));
    }
    in.compressed = compressed;
    in.entries = expected;
  }
  if (sink) {
    detail::require_floating(*sink, "sink");
    if (sink->shape != Shape{in.heads}) {
      bad_input("{} (sink): expected shape [{}] (one logit per head of {}), got {}", sink->name,
                in.heads, q.name, shape_string(sink->shape));
    }
    in.sink = sink;
  }
  if (in.tokens + in.entries > std::numeric_limits<int32_t>::max()) {
    bad_input("{}: {} tokens and entries do not fit int32 indices", kv.name,
              in.tokens + in.entries);
  }
  return in;
}

Shape compressed_attention_output_shape(const CompressedAttentionInputs& in) {
  return with_batch({in.queries, in.heads, in.dim}, in.batched, in.batch);
}

Shape compressed_attention_lse_shape(const CompressedAttentionInputs& in) {
  return with_batch({in.queries, in.heads}, in.batched, in.batch);
}

void validate_compressed_indices(const CompressedAttentionInputs& in, const Tensor& indices,
                                 const std::vector<int64_t>& positions) {
  const Shape expected = with_batch({in.queries}, in.batched, in.batch);
  if (indices.rank() != static_cast<int64_t>(expected.size()) + 1 ||
      !std::equal(expected.begin(), expected.end(), indices.shape.begin())) {
    bad_input("{} (indices): expected shape [{}{}, K] to match {} {}, got {}", indices.name,
              in.batched ? fmt::format("{}, ", in.batch) : "", in.queries, in.q->name,
              shape_string(in.q->shape), shape_string(indices.shape));
  }
  for (std::size_t r = 0; r < positions.size(); ++r) {
    const int64_t t = in.position(static_cast<int64_t>(r) % in.queries);
    if (positions[r] != t) {
      bad_input("{}: row {} has t = {} but that row's query is at position {}", indices.name, r,
                positions[r], t);
    }
  }
  const int64_t k = indices.shape.back();
  std::vector<int64_t> row(static_cast<std::size_t>(k));
  std::vector<int64_t> seen(static_cast<std::size_t>(in.entries), -1);
  for (int64_t r = 0; r < in.batch * in.queries; ++r) {
    to_i64(indices, r * k, k, row.data());
    const int64_t visible = in.visible_entries(r % in.queries);
    for (int64_t i = 0; i < k; ++i) {
      const int64_t j = row[i];
      if (j == -1) continue;
      if (j < 0 || j >= visible) {
        bad_input(
            "{}: row {} (query position {}) selects entry {}: entries must be -1 or in [0, {})"
            " (floor((t + 1) / {}))",
            indices.name, r, in.position(r % in.queries), j, visible, in.ratio);
      }
      if (seen[j] == r) bad_input("{}: row {} selects entry {} twice", indices.name, r, j);
      seen[j] = r;
    }
  }
}

namespace {

detail::Operation operation(const CompressedAttentionInputs& inputs) {
  detail::Operation op;
  op.compressed_attention = &inputs;
  return op;
}

}  // namespace

DeviceChoice choose_device(const std::string& name, const CompressedAttentionInputs& inputs) {
  return detail::choose_device(name, operation(inputs));
}

std::vector<RowRange> balanced_rows(const CompressedAttentionInputs& in, const Tensor* indices,
                                    int parts) {
  const int64_t k = indices && indices->rank() > 0 ? indices->shape.back() : 0;
  return balanced_rows(in.batch, in.queries, chunk_rows(in, indices), parts, [&](int64_t t) {
    const int64_t window = std::min(in.window, in.position(t) + 1);
    const int64_t visible = in.visible_entries(t);
    const int64_t entries = in.kind == V4Attention::swa ? 0
                            : indices                   ? std::min(k, visible)
                                                        : visible;
    return static_cast<double>(window + entries);
  });
}

void compressed_attention(const CompressedAttentionInputs& in, const Tensor* indices, float scale,
                          const AttentionSink& sink, StageTimes* times, Device device) {
  if (indices && in.kind != V4Attention::csa) {
    bad_usage("{} attends every visible entry: it takes no selection", v4_attention_name(in.kind));
  }
  if (indices) validate_compressed_indices(in, *indices);
  resolve_rows(in.rows, in.batch * in.queries, "the attention's");
  detail::backend(device, operation(in)).compressed_attention(in, indices, scale, sink, times);
}

namespace detail {

void cpu_compressed_attention(const CompressedAttentionInputs& in, const Tensor* indices,
                              float scale, const AttentionSink& sink, StageTimes* times) {
  gathered_compressed_attention(in, indices, scale, sink, times, cpu_attention);
}

namespace {

// Rows [row, row + rows) of a cache as f32: its values, or the fp8 cache's dequantized.
void read_rows(const CompressedAttentionInputs& in, const Tensor& cache, int64_t row, int64_t rows,
               float* out) {
  if (in.fp8_cache) {
    dequantize_v4_cache_fp8(cache, row, rows, out);
  } else {
    to_f32(cache, row * in.dim, rows * in.dim, out);
  }
}

}  // namespace

void gathered_compressed_attention(const CompressedAttentionInputs& in, const Tensor* indices,
                                   float scale, const AttentionSink& sink, StageTimes* times,
                                   MqaAttention attention) {
  const RowRange share = resolve_rows(in.rows, in.batch * in.queries, "the attention's");
  const int64_t H = in.heads, d = in.dim;
  const int64_t k = indices ? indices->shape.back() : 0;
  std::vector<float> sinks(static_cast<std::size_t>(H), -INFINITY);
  if (in.sink) to_f32(*in.sink, 0, H, sinks.data());
  const int64_t most = most_entries(in, indices);
  const int64_t chunk = chunk_rows(in, indices);
  std::vector<int32_t> slot(static_cast<std::size_t>(in.entries), -1);  // entry -> cache row
  std::vector<int64_t> selected(static_cast<std::size_t>(k));
  // Counted here per chunk, on either backend; the backend's own loop, inside, reports nothing.
  Progress progress("attend", share.end - share.begin);
  for (int64_t b = 0; b < in.batch; ++b) {
    const QueryRows queries = batch_queries(share, b, in.queries);
    for (int64_t c0 = queries.first; c0 < queries.last; c0 += chunk) {
      Stopwatch gather;
      const int64_t rows = std::min(chunk, queries.last - c0);
      const int64_t lo = std::max<int64_t>(0, in.position(c0) - in.window + 1);
      const int64_t hi = in.position(c0 + rows - 1) + 1;
      // The chunk's entries in first-use order, after the raw tokens [lo, hi).
      std::vector<int64_t> used;
      const int64_t width = in.window + most;
      std::vector<int32_t> lists(static_cast<std::size_t>(rows * width), -1);
      for (int64_t r = 0; r < rows; ++r) {
        int32_t* list = lists.data() + r * width;
        const int64_t t = in.position(c0 + r);
        int64_t n = 0;
        for (int64_t s = std::max<int64_t>(0, t - in.window + 1); s <= t; ++s) {
          list[n++] = static_cast<int32_t>(s - lo);
        }
        const auto take = [&](int64_t j) {
          if (slot[j] < 0) {
            slot[j] = static_cast<int32_t>(hi - lo + static_cast<int64_t>(used.size()));
            used.push_back(j);
          }
          list[n++] = slot[j];
        };
        if (indices) {
          to_i64(*indices, (b * in.queries + c0 + r) * k, k, selected.data());
          for (const int64_t j : selected) {
            if (j >= 0) take(j);
          }
        } else {
          for (int64_t j = 0; j < in.visible_entries(c0 + r); ++j) take(j);
        }
      }
      Tensor cache =
          make_tensor(DType::f32, {hi - lo + static_cast<int64_t>(used.size()), d}, in.kv->name);
      float* rows_out = mutable_data<float>(cache);
      read_rows(in, *in.kv, b * in.tokens + lo, hi - lo, rows_out);
      for (std::size_t u = 0; u < used.size(); ++u) {
        read_rows(in, *in.compressed, b * in.entries + used[u], 1,
                  rows_out + (hi - lo + static_cast<int64_t>(u)) * d);
        slot[used[u]] = -1;
      }
      Tensor list_tensor = make_tensor(DType::i32, {rows, width}, "window and entries");
      std::memcpy(mutable_data<int32_t>(list_tensor), lists.data(), lists.size() * sizeof(int32_t));
      const Tensor q = view(*in.q, (b * in.queries + c0) * H * d, {rows, H, d});
      const AttentionInputs mqa = make_mqa_inputs(q, cache, d);
      if (times) times->add("cache", gather.seconds());
      attention(
          mqa, &list_tensor, scale,
          [&](const AttentionBlock& block) {
            std::vector<float> out(block.out, block.out + block.rows * H * d);
            std::vector<float> lse(block.lse, block.lse + block.rows * H);
            for (int64_t r = 0; r < block.rows; ++r) {
              for (int64_t h = 0; h < H; ++h) {
                float& l = lse[r * H + h];
                const float a = sinks[h];
                const float top = std::max(l, a);
                if (top == -INFINITY) continue;  // nothing and no sink: zeros, -inf
                const float total = top + std::log(std::exp(l - top) + std::exp(a - top));
                const float keep = std::exp(l - total);
                float* o = out.data() + (r * H + h) * d;
                for (int64_t e = 0; e < d; ++e) o[e] *= keep;
                l = total;
              }
            }
            sink({b, c0 + block.row_begin, block.rows, H, d, out.data(), lse.data()});
          },
          times);
      progress.advance(rows);
    }
  }
}

}  // namespace detail

std::unique_ptr<V4Fp8CacheAttention> fp8_v4_cache_attention(const CompressedAttentionInputs& in) {
  if (in.fp8_cache) bad_usage("{} (kv) is an fp8 cache already", in.kv->name);
  auto out = std::make_unique<V4Fp8CacheAttention>();
  out->kv = quantize_v4_cache_fp8(*in.kv);
  if (in.compressed) out->compressed = quantize_v4_cache_fp8(*in.compressed);
  out->inputs = make_compressed_attention_inputs(
      *in.q, out->kv, in.compressed ? &out->compressed : nullptr, in.sink, in.kind, in.window);
  out->inputs.rows = in.rows;
  return out;
}

std::unique_ptr<V4Fp8CacheAttention> fp8_v4_cache_attention(const CompressedAttentionInputs& in,
                                                            KvCache cache) {
  if (cache != KvCache::fp8 || in.fp8_cache) return nullptr;
  return fp8_v4_cache_attention(in);
}

nlohmann::json compressed_attention_report(const CompressedAttentionInputs& inputs,
                                           bool every_entry, const SoftmaxScale& scale) {
  const bool csa = inputs.kind == V4Attention::csa;
  return {{"mode", csa ? (every_entry ? "csa-every-visible-entry" : "csa")
                       : v4_attention_name(inputs.kind)},
          {"layout", "v4"},
          {"window", inputs.window},
          {"compress_ratio", inputs.ratio},
          {"sink", inputs.sink != nullptr},
          {"kv_cache", inputs.fp8_cache ? std::string("fp8") : dtype_name(inputs.kv->dtype)},
          {"scale", scale.value},
          {"scale_rule", scale.rule}};
}

}  // namespace dsa
