#include "dsa/attention.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>

#include <Eigen/Core>

#include "attention_kernels.hpp"
#include "chunks.hpp"
#ifdef DSA_HAVE_CUDA
#include "cuda_backend.hpp"
#endif
#include "dsa/error.hpp"

namespace dsa {

namespace detail {

KeyValues::KeyValues(const AttentionInputs& in, int64_t b)
    : k(*in.k, b * in.keys * in.kv_heads * in.d_qk, in.keys * in.kv_heads * in.d_qk),
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

void attend_selected(const AttentionInputs& in, const KeyValues& kv, const RowMatrix& q,
                     const int64_t* selected, int64_t n, float scale, float* out, float* lse,
                     AttendScratch& scratch) {
  const int64_t group = in.heads / in.kv_heads;
  if (n == 0) {
    std::fill(out, out + in.heads * in.d_v, 0.0f);
    std::fill(lse, lse + in.heads, -std::numeric_limits<float>::infinity());
    return;
  }
  for (int64_t g = 0; g < in.kv_heads; ++g) {
    scratch.keys.resize(n, in.d_qk);
    scratch.values.resize(n, in.d_v);
    for (int64_t i = 0; i < n; ++i) {
      std::copy_n(kv.key(selected[i], g, in.d_qk), in.d_qk, scratch.keys.row(i).data());
      std::copy_n(kv.value(selected[i], g, in.d_v), in.d_v, scratch.values.row(i).data());
    }
    scratch.logits.noalias() = scale * (q.middleRows(g * group, group) * scratch.keys.transpose());
    for (int64_t h = 0; h < group; ++h) {
      lse[g * group + h] = softmax_row(scratch.logits.row(h).data(), n);
    }
    scratch.out.noalias() = scratch.logits * scratch.values;
    std::copy_n(scratch.out.data(), group * in.d_v, out + g * group * in.d_v);
  }
}

}  // namespace detail

namespace {

using detail::AttendScratch;
using detail::KeyValues;
using detail::RowMatrix;
using Strided = Eigen::Map<const RowMatrix, 0, Eigen::OuterStride<>>;

constexpr float kMinusInf = -std::numeric_limits<float>::infinity();
constexpr int64_t kQueryBlock = 16;
constexpr int64_t kKeyTile = 128;

void require_floating(const Tensor& t, const char* role) {
  if (!is_floating(t.dtype)) {
    bad_input("{} ({}): expected a floating-point tensor, got {}", t.name, role,
              dtype_name(t.dtype));
  }
}

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

// Runs `compute(row_begin, rows, out, lse)` over chunks of query rows in parallel blocks and
// hands each finished chunk to the sink in order.
template <typename Compute>
void for_each_chunk(const AttentionInputs& in, int64_t block, const AttentionSink& sink,
                    StageTimes* times, const char* stage, Compute&& compute) {
  const int64_t per_row = in.heads * (in.d_v + 1);
  const int64_t chunk = detail::chunk_rows(block, per_row * 4);
  std::vector<float> out, lse;
  for (int64_t b = 0; b < in.batch; ++b) {
    Stopwatch load;
    const KeyValues kv(in, b);
    if (times) times->add("load", load.seconds());
    for (int64_t c0 = 0; c0 < in.queries; c0 += chunk) {
      const int64_t rows = std::min(chunk, in.queries - c0);
      out.resize(static_cast<std::size_t>(rows * in.heads * in.d_v));
      lse.resize(static_cast<std::size_t>(rows * in.heads));
      Stopwatch watch;
#pragma omp parallel for schedule(dynamic, 1)
      for (int64_t r0 = 0; r0 < rows; r0 += block) {
        compute(kv, b, c0 + r0, std::min(block, rows - r0), out.data() + r0 * in.heads * in.d_v,
                lse.data() + r0 * in.heads);
      }
      if (times) times->add(stage, watch.seconds());
      sink({b, c0, rows, in.heads, in.d_v, out.data(), lse.data()});
    }
  }
}

}  // namespace

AttentionInputs make_mqa_inputs(const Tensor& q, const Tensor& kv, int64_t d_v) {
  AttentionInputs in = common_query_shape(q);
  require_floating(kv, "kv");
  in.k = in.v = &kv;
  in.latent = true;
  const int64_t o = in.batched ? 1 : 0;
  if (kv.rank() != q.rank() - 1 || (in.batched && kv.dim(0) != in.batch) ||
      kv.dim(o + 1) != in.d_qk) {
    bad_input("{} (kv): expected shape [{}Lk, {}] to match {} {}, got {}", kv.name,
              batch_prefix(in), in.d_qk, q.name, shape_string(q.shape), shape_string(kv.shape));
  }
  in.keys = kv.dim(o);
  in.kv_heads = 1;
  if (d_v < 1 || d_v > in.d_qk) bad_usage("--dv must be in [1, d_qk = {}], got {}", in.d_qk, d_v);
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

float default_scale(int64_t d_qk) {
  return 1.0f / std::sqrt(static_cast<float>(d_qk));
}

void validate_indices(const AttentionInputs& in, const Tensor& indices,
                      const std::vector<int64_t>& positions) {
  Shape expected = {in.queries};
  if (in.batched) expected.insert(expected.begin(), in.batch);
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

void sparse_attention(const AttentionInputs& in, const Tensor& indices, float scale,
                      const AttentionSink& sink, StageTimes* times, Device device) {
#ifdef DSA_HAVE_CUDA
  if (device == Device::cuda) return cuda::sparse_attention(in, &indices, scale, sink, times);
#endif
  (void)device;
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

void dense_attention(const AttentionInputs& in, float scale, const AttentionSink& sink,
                     StageTimes* times, Device device) {
#ifdef DSA_HAVE_CUDA
  if (device == Device::cuda) return cuda::sparse_attention(in, nullptr, scale, sink, times);
#endif
  (void)device;
  const int64_t group = in.heads / in.kv_heads;
  for_each_chunk(
      in, kQueryBlock, sink, times, "attend",
      [&](const KeyValues& kv, int64_t b, int64_t row_begin, int64_t rows, float* out, float* lse) {
        const int64_t n_rows = rows * group;  // (query, head of the group) pairs
        RowMatrix q(n_rows, in.d_qk), acc(n_rows, in.d_v), logits, keys, values;
        std::vector<float> row_max(n_rows), row_sum(n_rows);
        std::vector<float> q_row(static_cast<std::size_t>(in.heads * in.d_qk));
        const int64_t visible_end = in.position(row_begin + rows - 1) + 1;
        for (int64_t g = 0; g < in.kv_heads; ++g) {
          for (int64_t r = 0; r < rows; ++r) {
            to_f32(*in.q, (b * in.queries + row_begin + r) * in.heads * in.d_qk, in.heads * in.d_qk,
                   q_row.data());
            for (int64_t h = 0; h < group; ++h) {
              std::copy_n(q_row.data() + (g * group + h) * in.d_qk, in.d_qk,
                          q.row(r * group + h).data());
            }
          }
          acc.setZero();
          std::fill(row_max.begin(), row_max.end(), kMinusInf);
          std::fill(row_sum.begin(), row_sum.end(), 0.0f);
          for (int64_t s0 = 0; s0 < visible_end; s0 += kKeyTile) {
            const int64_t tile = std::min(kKeyTile, visible_end - s0);
            const Strided tile_keys(kv.key(s0, g, in.d_qk), tile, in.d_qk,
                                    Eigen::OuterStride<>(kv.k_stride));
            const Strided tile_values(kv.value(s0, g, in.d_v), tile, in.d_v,
                                      Eigen::OuterStride<>(kv.v_stride));
            logits.noalias() = scale * (q * tile_keys.transpose());
            for (int64_t i = 0; i < n_rows; ++i) {
              const int64_t t = in.position(row_begin + i / group);
              float* l = logits.row(i).data();
              const int64_t valid = std::clamp<int64_t>(t - s0 + 1, 0, tile);
              float m = row_max[i];
              for (int64_t s = 0; s < valid; ++s) m = std::max(m, l[s]);
              if (valid == 0) {
                std::fill(l, l + tile, 0.0f);
                continue;
              }
              const float correction = std::exp(row_max[i] - m);  // online softmax rescale
              float sum = 0.0f;
              for (int64_t s = 0; s < valid; ++s) {
                l[s] = std::exp(l[s] - m);
                sum += l[s];
              }
              std::fill(l + valid, l + tile, 0.0f);
              row_sum[i] = row_sum[i] * correction + sum;
              row_max[i] = m;
              acc.row(i) *= correction;
            }
            acc.noalias() += logits * tile_values;
          }
          for (int64_t i = 0; i < n_rows; ++i) {
            const int64_t r = i / group, h = g * group + i % group;
            const float inv = 1.0f / row_sum[i];
            float* dst = out + (r * in.heads + h) * in.d_v;
            for (int64_t c = 0; c < in.d_v; ++c) dst[c] = acc(i, c) * inv;
            lse[r * in.heads + h] = row_max[i] + std::log(row_sum[i]);
          }
        }
      });
}

}  // namespace dsa
