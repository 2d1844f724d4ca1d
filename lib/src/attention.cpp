#include "dsa/attention.hpp"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <limits>
#include <optional>

#include <Eigen/Core>

#include "attention_kernels.hpp"
#include "backend.hpp"
#include "checks.hpp"
#include "chunks.hpp"
#include "cpu_kernels.hpp"
#include "dsa/error.hpp"
#include "dsa/kv_cache.hpp"
#include "progress.hpp"

namespace dsa {

namespace detail {

namespace {

// Batch element b's keys as f32: the tensor's own values, or the fp8 cache's rows dequantized.
F32Buffer key_buffer(const AttentionInputs& in, int64_t b) {
  if (!in.fp8_cache) {
    return F32Buffer(*in.k, b * in.keys * in.kv_heads * in.d_qk, in.keys * in.kv_heads * in.d_qk);
  }
  std::vector<float> keys(static_cast<std::size_t>(in.keys * kFp8CacheDim));
  dequantize_kv_cache_fp8(*in.k, b * in.keys, in.keys, keys.data());
  return F32Buffer(std::move(keys));
}

}  // namespace

KeyValues::KeyValues(const AttentionInputs& in, int64_t b)
    : k(key_buffer(in, b)),
      k_stride(in.kv_heads * in.d_qk),
      v_stride(in.latent ? in.d_qk : in.kv_heads * in.d_v) {
  if (!in.latent)
    v.emplace(*in.v, b * in.keys * in.kv_heads * in.d_v, in.keys * in.kv_heads * in.d_v);
}

float softmax_row(float* row, int64_t n) {
  float m = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < n; ++i) m = std::max(m, row[i]);
  float sum = 0.0f;
  for (int64_t i = 0; i < n; ++i) {
    row[i] = std::exp(row[i] - m);
    sum += row[i];
  }
  const float inv = 1.0f / sum;
  for (int64_t i = 0; i < n; ++i) row[i] *= inv;
  return m + std::log(sum);
}

namespace {

// Rows' running softmax states live in the scratch: row r of a call at index r.
void start_rows(const AttentionInputs& in, int64_t rows, int64_t lanes, AttendScratch& scratch) {
  const int64_t group = in.heads / in.kv_heads;
  scratch.acc.assign(static_cast<std::size_t>(rows * group * in.d_v), 0.0f);
  scratch.max.assign(static_cast<std::size_t>(rows * lanes),
                     -std::numeric_limits<float>::infinity());
  scratch.sum.assign(static_cast<std::size_t>(rows * lanes), 0.0f);
  scratch.logits.resize(static_cast<std::size_t>(kAttendTile * lanes));
}

AttendState row_state(const AttentionInputs& in, int64_t row, int64_t lanes,
                      AttendScratch& scratch) {
  const int64_t group = in.heads / in.kv_heads;
  return {scratch.acc.data() + row * group * in.d_v, scratch.max.data() + row * lanes,
          scratch.sum.data() + row * lanes};
}

// q of one kv group's heads [group, d_qk] into the kernels' layout [d_qk, lanes], times scale.
void pack_query(const float* q, int64_t group, int64_t d_qk, int64_t lanes, float scale,
                float* packed) {
  std::fill(packed, packed + d_qk * lanes, 0.0f);
  for (int64_t h = 0; h < group; ++h)
    for (int64_t i = 0; i < d_qk; ++i) packed[i * lanes + h] = scale * q[h * d_qk + i];
}

void finish_row(const AttendState& state, int64_t group, int64_t d_v, float* out, float* lse) {
  for (int64_t h = 0; h < group; ++h) {
    const float inv = 1.0f / state.sum[h];
    for (int64_t c = 0; c < d_v; ++c) out[h * d_v + c] = state.acc[h * d_v + c] * inv;
    lse[h] = state.max[h] + std::log(state.sum[h]);
  }
}

int64_t padded_heads(int64_t group) {
  return ceil_div(group, kHeadLanes) * kHeadLanes;
}

}  // namespace

void attend_selected(const AttentionInputs& in, const KeyValues& kv, const RowMatrix& q,
                     const int64_t* selected, int64_t n, float scale, float* out, float* lse,
                     AttendScratch& scratch) {
  const int64_t group = in.heads / in.kv_heads, lanes = padded_heads(group);
  if (n == 0) {
    std::fill(out, out + in.heads * in.d_v, 0.0f);
    std::fill(lse, lse + in.heads, -std::numeric_limits<float>::infinity());
    return;
  }
  const CpuKernels& kernels = cpu_kernels();
  scratch.q.resize(static_cast<std::size_t>(in.d_qk * lanes));
  scratch.keys.resize(kAttendTile);
  scratch.values.resize(kAttendTile);
  for (int64_t g = 0; g < in.kv_heads; ++g) {
    pack_query(q.row(g * group).data(), group, in.d_qk, lanes, scale, scratch.q.data());
    start_rows(in, 1, lanes, scratch);
    const AttendState state = row_state(in, 0, lanes, scratch);
    for (int64_t i0 = 0; i0 < n; i0 += kAttendTile) {
      const int64_t tile = std::min(kAttendTile, n - i0);
      for (int64_t i = 0; i < tile; ++i) {
        scratch.keys[i] = kv.key(selected[i0 + i], g, in.d_qk);
        scratch.values[i] = kv.value(selected[i0 + i], g, in.d_v);
      }
      kernels.attend_tile({scratch.q.data(), group, lanes, in.d_qk, in.d_v, scratch.keys.data(),
                           scratch.values.data(), tile, scratch.logits.data(), state});
    }
    finish_row(state, group, in.d_v, out + g * group * in.d_v, lse + g * group);
  }
}

}  // namespace detail

namespace {

using detail::AttendScratch;
using detail::finish_row;
using detail::KeyValues;
using detail::pack_query;
using detail::padded_heads;
using detail::row_state;
using detail::RowMatrix;
using detail::start_rows;

constexpr int64_t kQueryBlock = 16;

using detail::require_floating;

AttentionInputs common_query_shape(const Tensor& q) {
  require_floating(q, "q");
  if (q.rank() != 3 && q.rank() != 4) {
    bad_input("{} (q): expected shape [B?, Lq, H, d_qk], got {}", q.name, shape_string(q.shape));
  }
  AttentionInputs in;
  in.q = &q;
  in.batched = q.rank() == 4;
  const int64_t o = in.batched ? 1 : 0;
  in.batch = in.batched ? q.dim(0) : 1;
  in.queries = q.dim(o);
  in.heads = q.dim(o + 1);
  in.d_qk = q.dim(o + 2);
  if (in.heads < 1 || in.d_qk < 1) {
    bad_input("{} (q): H and d_qk must be at least 1, got shape {}", q.name, shape_string(q.shape));
  }
  return in;
}

void check_lengths(const AttentionInputs& in, const Tensor& keys) {
  if (in.queries > in.keys) {
    bad_input("{} (q) has {} queries but {} only {} keys: queries are the last Lq positions",
              in.q->name, in.queries, keys.name, in.keys);
  }
  if (in.keys > std::numeric_limits<int32_t>::max()) bad_input("{}: too many keys", keys.name);
}

std::string batch_prefix(const AttentionInputs& in) {
  return in.batched ? fmt::format("{}, ", in.batch) : "";
}

// Runs `compute(row_begin, rows, out, lse)` over chunks of the inputs' query rows in parallel
// blocks and hands each finished chunk to the sink in order.
template <typename Compute>
void for_each_chunk(const AttentionInputs& in, int64_t block, const AttentionSink& sink,
                    StageTimes* times, const char* stage, Compute&& compute) {
  const int64_t per_row = in.heads * (in.d_v + 1);
  const int64_t chunk = detail::chunk_rows(block, per_row * 4);
  const RowRange share = resolve_rows(in.rows, in.batch * in.queries, "the attention's");
  std::vector<float> out, lse;
  detail::Progress progress(stage, share.end - share.begin);
  for (int64_t b = 0; b < in.batch; ++b) {
    const QueryRows queries = batch_queries(share, b, in.queries);
    if (queries.first >= queries.last) continue;
    Stopwatch load;
    const KeyValues kv(in, b);
    if (times) times->add("load", load.seconds());
    for (int64_t c0 = queries.first; c0 < queries.last; c0 += chunk) {
      const int64_t rows = std::min(chunk, queries.last - c0);
      out.resize(static_cast<std::size_t>(rows * in.heads * in.d_v));
      lse.resize(static_cast<std::size_t>(rows * in.heads));
      Stopwatch watch;
#pragma omp parallel for schedule(dynamic, 1)
      for (int64_t r0 = 0; r0 < rows; r0 += block) {
        const int64_t n = std::min(block, rows - r0);
        compute(kv, b, c0 + r0, n, out.data() + r0 * in.heads * in.d_v, lse.data() + r0 * in.heads);
        progress.advance(n);
      }
      if (times) times->add(stage, watch.seconds());
      sink({b, c0, rows, in.heads, in.d_v, out.data(), lse.data()});
    }
  }
}

}  // namespace

AttentionInputs make_mqa_inputs(const Tensor& q, const Tensor& kv, int64_t d_v) {
  AttentionInputs in = common_query_shape(q);
  in.k = in.v = &kv;
  in.latent = true;
  const int64_t o = in.batched ? 1 : 0;
  if (kv.dtype == DType::u8) {
    if (!is_fp8_kv_cache(kv) || kv.rank() != q.rank() - 1 ||
        (in.batched && kv.dim(0) != in.batch) || in.d_qk != kFp8CacheDim) {
      bad_input(
          "{} (kv): a u8 kv is FlashMLA's fp8 cache [{}Lk, {}] beside q with d_qk {}; got kv {} "
          "and q {} {}",
          kv.name, batch_prefix(in), kFp8CacheBytes, kFp8CacheDim, shape_string(kv.shape), q.name,
          shape_string(q.shape));
    }
    in.fp8_cache = true;
    in.keys = kv.dim(o);
    if (d_v < 1 || d_v > in.d_qk) bad_usage("d_v must be in [1, d_qk = {}], got {}", in.d_qk, d_v);
    in.d_v = d_v;
    check_lengths(in, kv);
    return in;
  }
  require_floating(kv, "kv");
  if (kv.rank() != q.rank() - 1 || (in.batched && kv.dim(0) != in.batch) ||
      kv.dim(o + 1) != in.d_qk) {
    bad_input("{} (kv): expected shape [{}Lk, {}] to match {} {}, got {}", kv.name,
              batch_prefix(in), in.d_qk, q.name, shape_string(q.shape), shape_string(kv.shape));
  }
  in.keys = kv.dim(o);
  in.kv_heads = 1;
  if (d_v < 1 || d_v > in.d_qk) bad_usage("d_v must be in [1, d_qk = {}], got {}", in.d_qk, d_v);
  in.d_v = d_v;
  check_lengths(in, kv);
  return in;
}

AttentionInputs make_mha_inputs(const Tensor& q, const Tensor& k, const Tensor& v) {
  AttentionInputs in = common_query_shape(q);
  require_floating(k, "k");
  require_floating(v, "v");
  in.k = &k;
  in.v = &v;
  const int64_t o = in.batched ? 1 : 0;
  if (k.rank() != q.rank() || (in.batched && k.dim(0) != in.batch) || k.dim(o + 2) != in.d_qk ||
      k.dim(o + 1) < 1 || in.heads % k.dim(o + 1) != 0) {
    bad_input("{} (k): expected shape [{}Lk, H_kv, {}] with H_kv dividing H = {}, got {}", k.name,
              batch_prefix(in), in.d_qk, in.heads, shape_string(k.shape));
  }
  in.keys = k.dim(o);
  in.kv_heads = k.dim(o + 1);
  if (v.rank() != q.rank() || (in.batched && v.dim(0) != in.batch) || v.dim(o) != in.keys ||
      v.dim(o + 1) != in.kv_heads) {
    bad_input("{} (v): expected shape [{}{}, {}, d_v] to match {} {}, got {}", v.name,
              batch_prefix(in), in.keys, in.kv_heads, k.name, shape_string(k.shape),
              shape_string(v.shape));
  }
  in.d_v = v.dim(o + 2);
  if (in.d_v < 1)
    bad_input("{} (v): d_v must be at least 1, got shape {}", v.name, shape_string(v.shape));
  check_lengths(in, k);
  return in;
}

Shape attention_output_shape(const AttentionInputs& in) {
  return with_batch({in.queries, in.heads, in.d_v}, in.batched, in.batch);
}

Shape attention_lse_shape(const AttentionInputs& in) {
  return with_batch({in.queries, in.heads}, in.batched, in.batch);
}

float default_scale(int64_t d_qk) {
  return 1.0f / std::sqrt(static_cast<float>(d_qk));
}

double deepseek_v32_softmax_scale() {
  // Python's math.log(40) and 192 ** -0.5, written out so that no libm function (whose last bit
  // may differ between C libraries) enters a number that workloads are generated from.
  const double ln_rope_factor = 3.6888794541139363;
  const double mscale = 0.1 * 1.0 * ln_rope_factor + 1.0;  // 0.1 * args.mscale * ln(40) + 1
  return 0.07216878364870322 * mscale * mscale;
}

SoftmaxScale resolve_softmax_scale(const std::string& text, int64_t d_qk) {
  if (text.empty() || text == "default") return {default_scale(d_qk), "d_qk^-0.5"};
  if (text == "deepseek-v3.2") {
    return {static_cast<float>(deepseek_v32_softmax_scale()), "deepseek-v3.2"};
  }
  double value = 0;
  const char* end = text.data() + text.size();
  const auto [stop, error] = std::from_chars(text.data(), end, value);
  if (error != std::errc() || stop != end) {
    bad_usage("softmax scale: expected a number, default or deepseek-v3.2, got '{}'", text);
  }
  const auto scale = static_cast<float>(value);
  if (!(std::isfinite(scale) && scale > 0)) {
    bad_usage("softmax scale must be finite and positive, got {}", text);
  }
  return {scale, "given"};
}

void validate_indices(const AttentionInputs& in, const Tensor& indices,
                      const std::vector<int64_t>& positions) {
  const Shape expected = with_batch({in.queries}, in.batched, in.batch);
  const bool shape_ok = indices.rank() == static_cast<int64_t>(expected.size()) + 1 &&
                        std::equal(expected.begin(), expected.end(), indices.shape.begin());
  if (!shape_ok) {
    bad_input("{} (indices): expected shape [{}{}, K] to match {} {}, got {}", indices.name,
              batch_prefix(in), in.queries, in.q->name, shape_string(in.q->shape),
              shape_string(indices.shape));
  }
  const int64_t k = indices.shape.back();
  const int64_t rows = in.batch * in.queries;
  if (!positions.empty()) {
    for (int64_t r = 0; r < rows; ++r) {
      if (positions[r] != in.position(r % in.queries)) {
        bad_input("{}: row {} has t = {} but that row's query is at position {}", indices.name, r,
                  positions[r], in.position(r % in.queries));
      }
    }
  }
  std::vector<int64_t> row(static_cast<std::size_t>(k));
  std::vector<int64_t> seen(static_cast<std::size_t>(in.keys), -1);
  for (int64_t r = 0; r < rows; ++r) {
    to_i64(indices, r * k, k, row.data());
    const int64_t t = in.position(r % in.queries);
    for (int64_t i = 0; i < k; ++i) {
      const int64_t s = row[i];
      if (s == -1) continue;
      if (s < 0 || s > t) {
        bad_input("{}: row {} (query position {}) selects {}: entries must be -1 or in [0, {}]",
                  indices.name, r, t, s, t);
      }
      if (seen[s] == r) bad_input("{}: row {} selects position {} twice", indices.name, r, s);
      seen[s] = r;
    }
  }
}

DroppedIndices drop_future_indices(const AttentionInputs& in, const Tensor& indices) {
  if (indices.rank() < 1) return {indices, 0};
  DroppedIndices out{make_tensor(DType::i64, indices.shape, indices.name), 0};
  const int64_t k = indices.shape.back(), rows = k == 0 ? 0 : indices.numel() / k;
  int64_t* row = mutable_data<int64_t>(out.indices);
  for (int64_t r = 0; r < rows; ++r, row += k) {
    to_i64(indices, r * k, k, row);
    const int64_t t = in.position(r % std::max<int64_t>(in.queries, 1));
    for (int64_t i = 0; i < k; ++i) {
      if (row[i] > t && row[i] < in.keys) {
        row[i] = -1;
        ++out.dropped;
      }
    }
  }
  return out;
}

namespace {

void cpu_sparse_attention(const AttentionInputs& in, const Tensor& indices, float scale,
                          const AttentionSink& sink, StageTimes* times) {
  const int64_t k = indices.shape.back();
  for_each_chunk(
      in, kQueryBlock, sink, times, "attend",
      [&](const KeyValues& kv, int64_t b, int64_t row_begin, int64_t rows, float* out, float* lse) {
        std::vector<int64_t> selected(static_cast<std::size_t>(k));
        RowMatrix q(in.heads, in.d_qk);
        AttendScratch scratch;
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t row = b * in.queries + row_begin + r;
          to_i64(indices, row * k, k, selected.data());
          const auto n =
              std::remove(selected.begin(), selected.end(), int64_t{-1}) - selected.begin();
          to_f32(*in.q, row * in.heads * in.d_qk, in.heads * in.d_qk, q.data());
          detail::attend_selected(in, kv, q, selected.data(), n, scale, out + r * in.heads * in.d_v,
                                  lse + r * in.heads, scratch);
        }
      });
}

void cpu_dense_attention(const AttentionInputs& in, float scale, const AttentionSink& sink,
                         StageTimes* times) {
  const int64_t group = in.heads / in.kv_heads, lanes = padded_heads(group);
  const int64_t tile_keys = detail::kAttendTile;
  for_each_chunk(
      in, kQueryBlock, sink, times, "attend",
      [&](const KeyValues& kv, int64_t b, int64_t row_begin, int64_t rows, float* out, float* lse) {
        const detail::CpuKernels& kernels = detail::cpu_kernels();
        AttendScratch scratch;
        std::vector<float> q_row(static_cast<std::size_t>(in.heads * in.d_qk));
        std::vector<float> packed(static_cast<std::size_t>(rows * in.d_qk * lanes));
        const int64_t visible_end = in.position(row_begin + rows - 1) + 1;
        scratch.keys.resize(tile_keys);
        scratch.values.resize(tile_keys);
        for (int64_t g = 0; g < in.kv_heads; ++g) {
          for (int64_t r = 0; r < rows; ++r) {
            to_f32(*in.q, (b * in.queries + row_begin + r) * in.heads * in.d_qk, in.heads * in.d_qk,
                   q_row.data());
            pack_query(q_row.data() + g * group * in.d_qk, group, in.d_qk, lanes, scale,
                       packed.data() + r * in.d_qk * lanes);
          }
          start_rows(in, rows, lanes, scratch);
          // Key tiles outermost: a tile is read once from memory for all rows of the block.
          for (int64_t s0 = 0; s0 < visible_end; s0 += tile_keys) {
            const int64_t tile = std::min(tile_keys, visible_end - s0);
            for (int64_t i = 0; i < tile; ++i) {
              scratch.keys[i] = kv.key(s0 + i, g, in.d_qk);
              scratch.values[i] = kv.value(s0 + i, g, in.d_v);
            }
            for (int64_t r = 0; r < rows; ++r) {
              const int64_t n = std::min(tile, in.position(row_begin + r) + 1 - s0);
              if (n <= 0) continue;
              kernels.attend_tile({packed.data() + r * in.d_qk * lanes, group, lanes, in.d_qk,
                                   in.d_v, scratch.keys.data(), scratch.values.data(), n,
                                   scratch.logits.data(), row_state(in, r, lanes, scratch)});
            }
          }
          for (int64_t r = 0; r < rows; ++r) {
            finish_row(row_state(in, r, lanes, scratch), group, in.d_v,
                       out + (r * in.heads + g * group) * in.d_v, lse + r * in.heads + g * group);
          }
        }
      });
}

}  // namespace

void detail::cpu_attention(const AttentionInputs& in, const Tensor* indices, float scale,
                           const AttentionSink& sink, StageTimes* times) {
  if (indices) {
    cpu_sparse_attention(in, *indices, scale, sink, times);
  } else {
    cpu_dense_attention(in, scale, sink, times);
  }
}

namespace {

// The CPU counts its blocks as they finish (for_each_chunk); another backend's chunks are counted
// on the host as they arrive.
void attention_on(Device device, const AttentionInputs& in, const Tensor* indices, float scale,
                  const AttentionSink& sink, StageTimes* times) {
  const RowRange share = resolve_rows(in.rows, in.batch * in.queries, "the attention's");
  const detail::Backend& backend = detail::backend(device, {nullptr, nullptr, 0, &in, false});
  if (backend.device == Device::cpu) {
    backend.attention(in, indices, scale, sink, times);
    return;
  }
  detail::Progress progress("attend", share.end - share.begin);
  backend.attention(
      in, indices, scale,
      [&](const AttentionBlock& block) {
        sink(block);
        progress.advance(block.rows);
      },
      times);
}

}  // namespace

std::vector<RowRange> balanced_rows(const AttentionInputs& in, const Tensor* indices, int parts) {
  const int64_t k = indices && indices->rank() > 0 ? indices->shape.back() : 0;
  return balanced_rows(in.batch, in.queries, kQueryBlock, parts, [&](int64_t t) {
    const int64_t visible = in.position(t) + 1;
    return static_cast<double>(indices ? std::min(visible, k) : visible);
  });
}

void sparse_attention(const AttentionInputs& in, const Tensor& indices, float scale,
                      const AttentionSink& sink, StageTimes* times, Device device) {
  attention_on(device, in, &indices, scale, sink, times);
}

void dense_attention(const AttentionInputs& in, float scale, const AttentionSink& sink,
                     StageTimes* times, Device device) {
  attention_on(device, in, nullptr, scale, sink, times);
}

nlohmann::json attention_report(const AttentionInputs& inputs, bool dense,
                                const SoftmaxScale& scale) {
  return {{"mode", dense ? "dense" : "sparse"},
          {"layout", inputs.latent ? "mqa" : "mha"},
          {"scale", scale.value},
          {"scale_rule", scale.rule},
          // What the keys were read from: the fp8 cache, or the kv tensors' own dtype.
          {"kv_cache", inputs.fp8_cache ? std::string("fp8") : dtype_name(inputs.k->dtype)}};
}

}  // namespace dsa
