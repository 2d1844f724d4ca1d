// The CUDA backend behind the library's functions: host tensors in, blocks of results out to
// the same sinks as the CPU backend. Inputs are prepared on the CPU with the same code as the
// CPU path (Hadamard, bf16 rounding, fp8 quantization), so both see identical operands.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <memory>
#include <optional>
#include <vector>

#include <cublas_v2.h>
#include <dlfcn.h>
#include <fmt/format.h>

#include "backend.hpp"
#include "chunks.hpp"
#include "device_buffer.cuh"
#include "dsa/error.hpp"
#include "dsa/kv_cache.hpp"
#include "dsa/precision.hpp"
#include "dsa/rope.hpp"
#include "kernels.cuh"
#include "progress.hpp"
#include "traits.cuh"

namespace dsa::cuda {

void check(cudaError_t status, const char* what) {
  if (status != cudaSuccess)
    fail(ExitCode::runtime, "CUDA: {} failed: {}", what, cudaGetErrorString(status));
}

void require(const std::string& why) {
  if (!why.empty()) fail(ExitCode::usage, "{}", why);
}

namespace {
// The bytes the DeviceBuffers hold now, and the most they held at once (the reports'
// peak_device_bytes): every device allocation of the backend is one.
std::atomic<int64_t> live_bytes{0}, peak_bytes{0};
}  // namespace

// A model layer timed on the device (layer_timing.cu): its kernels' limits, and its timing.
std::string layer_timing_limit(const LayerTimingRequest& request);
LayerTiming time_layer(const LayerTimingRequest& request);

void count_device_bytes(int64_t change) {
  const int64_t now = live_bytes.fetch_add(change) + change;
  int64_t peak = peak_bytes.load();
  while (now > peak && !peak_bytes.compare_exchange_weak(peak, now)) {
  }
}

namespace {

// Host rows (indexer operands, probability rows) per parallel range, and elements per range of
// a bf16 conversion.
constexpr int64_t kHostRows = 256;
constexpr int64_t kHostElements = 1 << 18;

__nv_bfloat16 as_bf16(float x) {
  const uint16_t bits = f32_to_bf16(x);
  __nv_bfloat16 out;
  std::memcpy(&out, &bits, 2);
  return out;
}

// Indexer operands of `count` rows of width dim: what the precision pipeline gives, split into
// values (exact in bf16 for bf16 and fp8) and one scale per row (1 outside fp8).
struct IndexerOperands {
  std::vector<uint8_t> codes;  // the e4m3 codes, for the fp8 tensor-core kernel
  std::vector<__nv_bfloat16> values;
  std::vector<float> values_f32;
  std::vector<float> scales;
};

// The fp8 tensor-core kernel covers DSA's own indexer shape, in fp8 and in fp4 (DeepSeek-V4's
// e2m1 values as e4m3 codes, fp4_codes); others run the bf16 kernel on the codes' values (exact
// in bf16).
bool fp8_tensor_cores(const IndexerInputs& in, const IndexerConfig& config) {
  return (config.precision == Precision::fp8 || config.precision == Precision::fp4) &&
         in.heads == 64 && in.dim == 128;
}

// fp4 rows (e2m1 values times their blocks' power-of-two scales) as e4m3 codes of one
// power-of-two scale per row, the ue8m0 fp8 quantization of the row: exact while every block's
// scale is at least 2^-14 of the row's largest (its values are then e4m3 normals or multiples of
// the smallest subnormal), else the smaller blocks round, by less than 2^-16 of the row's largest
// value.
void fp4_codes(float* rows, int64_t count, int64_t dim, float* scales) {
  for (int64_t r = 0; r < count; ++r) scales[r] = fp8_quantize_block(rows + r * dim, dim, true);
}

// Rows are independent: they are prepared in parallel ranges on the host's threads.
void prepare_operands(const Tensor& tensor, int64_t offset, int64_t count, int64_t dim,
                      const IndexerConfig& config, bool codes, IndexerOperands& out) {
  std::vector<float> rows(static_cast<size_t>(count * dim));
  out.scales.assign(static_cast<size_t>(count), 1.0f);
  if (config.precision != Precision::f32) {
    if (codes) {
      out.codes.resize(rows.size());
    } else {
      out.values.resize(rows.size());
    }
  }
  detail::parallel_ranges(count, kHostRows, [&](int64_t begin, int64_t end) {
    float* first = rows.data() + begin * dim;
    to_f32(tensor, (offset + begin) * dim, (end - begin) * dim, first);
    prepare_indexer_rows(first, end - begin, dim, config, out.scales.data() + begin);
    if (config.precision == Precision::f32) return;
    if (codes && config.precision == Precision::fp4) {
      fp4_codes(first, end - begin, dim, out.scales.data() + begin);
    }
    for (int64_t i = begin * dim; i < end * dim; ++i) {
      if (codes) {
        out.codes[i] = f32_to_e4m3(rows[i]);
      } else {
        out.values[i] = as_bf16(rows[i]);
      }
    }
  });
  if (config.precision == Precision::f32) out.values_f32 = std::move(rows);
}

// The backend's limits (Backend::check): what the kernels' *_limit functions say, for the
// kernels these inputs would run, and what the operand preparation needs.
std::string indexer_limit(const IndexerInputs& in, const IndexerConfig& config) {
  if (config.precision == Precision::f32) return "";
  const std::string why =
      fp8_tensor_cores(in, config)
          ? indexer_fp8_limit(static_cast<int>(in.heads), static_cast<int>(in.dim))
          : cuda::indexer_limit(static_cast<int>(in.heads), static_cast<int>(in.dim));
  if (!why.empty()) return why;
  if (config.precision == Precision::fp8 && in.dim > config.quant_block) {
    return fmt::format(
        "the CUDA fp8 indexer needs one scale block per row (d_I <= {}), got d_I = {}",
        config.quant_block, in.dim);
  }
  return "";
}

std::string attention_limit(const AttentionInputs& in, bool dense_probabilities, bool fp8_cache) {
  if (!in.latent) return "the CUDA attention supports MLA's latent layout (one shared K/V) only";
  const int d_qk = static_cast<int>(in.d_qk), d_v = static_cast<int>(in.d_v);
  std::string why = cuda::attention_limit(d_qk, d_v, fp8_cache || in.fp8_cache);
  if (why.empty() && dense_probabilities) why = dense_probabilities_limit(d_qk);
  return why;
}

std::string check_operation(const detail::Operation& op) {
  if (op.layer_timing) return layer_timing_limit(*op.layer_timing);
  if (op.indexer) {
    std::string why = indexer_limit(*op.indexer, *op.indexer_config);
    if (!why.empty()) return why;
  }
  if (op.topk > 0) {
    std::string why = topk_limit(op.topk);
    if (!why.empty()) return why;
  }
  if (op.attention) return attention_limit(*op.attention, op.dense_probabilities, op.fp8_cache);
  if (op.compressor) {
    const CompressorConfig& config = *op.compressor_config;
    std::string why =
        compressor_limit(static_cast<int>(op.compressor->dim), static_cast<int>(config.rope.dims),
                         config.indexer && config.numerics == V4Numerics::released);
    if (why.empty() && config.ratio > 32768) {
      why = fmt::format("the CUDA compressor takes ratios up to 32768, got {}", config.ratio);
    }
    return why;
  }
  if (op.compressed_attention) {  // the V4 kernel, or the gathered cache on the MQA kernels
    const int dim = static_cast<int>(op.compressed_attention->dim);
    if (compressed_attention_limit(dim, op.compressed_attention->window).empty()) return "";
    return cuda::attention_limit(dim, dim, false);
  }
  return "";
}

// The indexer of one batch element on the GPU: the keys prepared and uploaded once, then
// blocks of query rows scored into device memory.
class IndexerOnDevice {
 public:
  IndexerOnDevice(const IndexerInputs& in, const IndexerConfig& config, int64_t b,
                  StageTimes* times)
      : in_(in), config_(config), b_(b), codes_(fp8_tensor_cores(in, config)) {
    Stopwatch prepare;
    IndexerOperands keys;
    prepare_operands(*in.k_index, b * in.keys, in.keys, in.dim, config, codes_, keys);
    if (config.precision == Precision::f32) {
      k_f32_.upload(keys.values_f32.data(), keys.values_f32.size());
    } else if (codes_) {
      k_codes_.upload(keys.codes.data(), keys.codes.size());
    } else {
      k_values_.upload(keys.values.data(), keys.values.size());
    }
    k_scales_.upload(keys.scales.data(), keys.scales.size());
    if (times) times->add("prepare", prepare.seconds());
  }

  // Whether select() applies to `rows` query rows at a time and this k: the fp8 tensor-core
  // indexer with its top-k fused, where it is the faster (indexer_topk_preferred).
  bool fuses_topk(int64_t rows, int64_t k) const {
    return codes_ &&
           indexer_topk_limit(static_cast<int>(in_.heads), static_cast<int>(in_.dim), k).empty() &&
           indexer_topk_preferred(static_cast<int>(rows), in_.keys);
  }

  // The top-k of rows [c0, c0 + rows) into indices and values [rows, k] (device memory), the
  // scores never stored (launch_indexer_topk; fuses_topk must hold).
  void select(int64_t c0, int64_t rows, int64_t k, int32_t* indices, float* values,
              StageTimes* times) {
    prepare_queries(c0, rows, times);
    Stopwatch watch;
    q_codes_.upload(queries_.codes.data(), queries_.codes.size());
    lists_.resize(static_cast<size_t>(indexer_topk_scratch(static_cast<int>(rows), k)));
    IndexerTopkOutputs out;
    out.indices = indices;
    out.values = values;
    out.lists = lists_.get();
    out.k = static_cast<int>(k);
    launch_indexer_topk(params(q_codes_, k_codes_, c0, rows, nullptr), out);
    check(cudaDeviceSynchronize(), "indexer top-k kernel");
    if (times) times->add("select", watch.seconds());
  }

  // Scores of rows [c0, c0 + rows) into scores [rows, keys] (device memory).
  void score(int64_t c0, int64_t rows, float* scores, StageTimes* times) {
    prepare_queries(c0, rows, times);
    Stopwatch watch;
    if (config_.precision == Precision::f32) {
      q_f32_.upload(queries_.values_f32.data(), queries_.values_f32.size());
      launch_indexer(params(q_f32_, k_f32_, c0, rows, scores));
    } else if (codes_) {
      q_codes_.upload(queries_.codes.data(), queries_.codes.size());
      launch_indexer(params(q_codes_, k_codes_, c0, rows, scores));
    } else {
      q_values_.upload(queries_.values.data(), queries_.values.size());
      launch_indexer(params(q_values_, k_values_, c0, rows, scores));
    }
    check(cudaDeviceSynchronize(), "indexer kernel");
    if (times) times->add("score", watch.seconds());
  }

 private:
  // The queries and head weights of rows [c0, c0 + rows) in host memory, and the weights on the
  // device.
  void prepare_queries(int64_t c0, int64_t rows, StageTimes* times) {
    const int64_t H = in_.heads, d = in_.dim;
    Stopwatch watch;
    prepare_operands(*in_.q_index, (b_ * in_.queries + c0) * H, rows * H, d, config_, codes_,
                     queries_);
    w_.resize(static_cast<size_t>(rows * H));
    to_f32(*in_.weights, (b_ * in_.queries + c0) * H, rows * H, w_.data());
    indexer_head_weights(w_.data(), queries_.scales.data(), rows * H, H, d, config_, w_.data());
    weights_.upload(w_.data(), w_.size());
    if (times) times->add("prepare", watch.seconds());
  }

  template <typename T>
  IndexerParams<T> params(const DeviceBuffer<T>& q, const DeviceBuffer<T>& k, int64_t c0,
                          int64_t rows, float* scores) const {
    IndexerParams<T> p;
    p.q = q.get();
    p.w = weights_.get();
    p.k = k.get();
    p.k_scale = k_scales_.get();
    p.scores = scores;
    p.rows = static_cast<int>(rows);
    p.heads = static_cast<int>(in_.heads);
    p.dim = static_cast<int>(in_.dim);
    p.keys = static_cast<int>(in_.keys);
    p.first_position = in_.position(c0);
    p.stride = in_.keys;
    p.ratio = in_.ratio;
    return p;
  }

  const IndexerInputs& in_;
  const IndexerConfig& config_;
  int64_t b_;
  bool codes_;
  IndexerOperands queries_;
  std::vector<float> w_;
  DeviceBuffer<uint8_t> k_codes_, q_codes_;
  DeviceBuffer<__nv_bfloat16> k_values_, q_values_;
  DeviceBuffer<float> k_f32_, k_scales_, q_f32_, weights_;
  DeviceBuffer<uint64_t> lists_;
};

// Calls use(b, indexer, queries) for each batch element b that has rows in the inputs' rows:
// its indexer (keys on the device) and those rows.
template <typename Use>
void each_batch_element(const IndexerInputs& in, const IndexerConfig& config, StageTimes* times,
                        Use use) {
  const RowRange share = resolve_rows(in.rows, in.batch * in.queries, "the indexer's");
  for (int64_t b = 0; b < in.batch; ++b) {
    const QueryRows queries = batch_queries(share, b, in.queries);
    if (queries.first >= queries.last) continue;
    IndexerOnDevice indexer(in, config, b, times);
    use(b, indexer, queries);
  }
}

// Scores these rows in chunks of score_chunk rows (one buffer of them on the device), handing
// each chunk (first row, rows, device pointer) to `use`.
template <typename Use>
void score_rows(const IndexerInputs& in, IndexerOnDevice& indexer, const QueryRows& queries,
                StageTimes* times, Use use) {
  const int64_t chunk = score_chunk(in.keys);
  DeviceBuffer<float> scores(
      static_cast<size_t>(std::min(chunk, queries.last - queries.first) * in.keys));
  for (int64_t c0 = queries.first; c0 < queries.last; c0 += chunk) {
    const int64_t rows = std::min(chunk, queries.last - c0);
    indexer.score(c0, rows, scores.get(), times);
    use(c0, rows, scores.get());
  }
}

// Host tensor elements to bf16 device memory, converted on the host's threads; keeps its host
// buffers for the next upload.
class Bf16Upload {
 public:
  void operator()(const Tensor& t, int64_t offset, int64_t count,
                  DeviceBuffer<__nv_bfloat16>& dst) {
    staging_.resize(static_cast<size_t>(count));
    converted_.resize(staging_.size());
    detail::parallel_ranges(count, kHostElements, [&](int64_t begin, int64_t end) {
      to_f32(t, offset + begin, end - begin, staging_.data() + begin);
      for (int64_t i = begin; i < end; ++i) converted_[i] = as_bf16(staging_[i]);
    });
    dst.upload(converted_.data(), converted_.size());
  }
  // The last upload's values (or what the caller put there), for another device buffer.
  std::vector<__nv_bfloat16>& converted() { return converted_; }

 private:
  std::vector<float> staging_;
  std::vector<__nv_bfloat16> converted_;
};

// MQA attention of one batch element on the GPU: the latent rows uploaded once (bf16), then
// blocks of query rows attended over selections or densely, results copied back to the host.
class AttentionOnDevice {
 public:
  AttentionOnDevice(const AttentionInputs& in, float scale, int64_t b)
      : in_(in), scale_(scale), b_(b) {
    if (in.fp8_cache) {  // the attention kernel reads the cache's rows as they are
      const auto* rows =
          reinterpret_cast<const uint8_t*>(in.k->data) + b * in.keys * kFp8CacheBytes;
      kv_fp8_.upload(rows, static_cast<size_t>(in.keys * kFp8CacheBytes));
    } else {
      upload_(*in.k, b * in.keys * in.d_qk, in.keys * in.d_qk, kv_);
    }
  }

  // Rows [c0, c0 + rows): out [rows, H, d_v] and lse [rows, H] on the host, over indices
  // [rows, k] (host, -1 skipped) or, with indices == nullptr, every visible key.
  void attend(int64_t c0, int64_t rows, const int32_t* indices, int64_t k, float* out, float* lse) {
    upload_queries(c0, rows);
    if (indices) idx_.upload(indices, static_cast<size_t>(rows * k));
    out_.resize(static_cast<size_t>(rows * in_.heads * in_.d_v));
    lse_.resize(static_cast<size_t>(rows * in_.heads));
    AttentionParams p;
    p.q = q_.get();
    if (in_.fp8_cache) {
      p.kv_fp8 = kv_fp8_.get();
    } else {
      p.kv = kv_.get();
    }
    p.indices = indices ? idx_.get() : nullptr;
    p.out = out_.get();
    p.lse = lse_.get();
    p.rows = static_cast<int>(rows);
    p.heads = static_cast<int>(in_.heads);
    p.d_qk = static_cast<int>(in_.d_qk);
    p.d_v = static_cast<int>(in_.d_v);
    p.keys = static_cast<int>(in_.keys);
    p.k = static_cast<int>(k);
    p.first_position = in_.position(c0);
    p.scale = scale_;
    p.query_rows = static_cast<int>(in_.queries);
    splits_.resize(static_cast<size_t>(attention_partial_floats(p)));  // split decoding's
    p.partial = splits_.get();
    launch_attention(p);
    check(cudaDeviceSynchronize(), "attention kernel");
    out_.download(out, static_cast<size_t>(rows * in_.heads * in_.d_v));
    lse_.download(lse, static_cast<size_t>(rows * in_.heads));
  }

  // After a dense attend() of the same rows: the head-averaged dense probabilities
  // p [rows, stride] (Eq. 3's target) on the host, for s <= t (later entries unspecified).
  void dense_probabilities(int64_t c0, int64_t rows, float* p, int64_t stride) {
    constexpr int64_t group = MlaTileTraits<512>::kHeads;  // heads per partial slice
    const int64_t groups = (in_.heads + group - 1) / group;
    partial_.resize(static_cast<size_t>(groups * rows * stride));
    if (in_.fp8_cache && kv_.get() == nullptr) {  // its bf16 values, dequantized once (exact)
      std::vector<float> values(static_cast<size_t>(in_.keys * kFp8CacheDim));
      dequantize_kv_cache_fp8(*in_.k, b_ * in_.keys, in_.keys, values.data());
      std::vector<__nv_bfloat16>& converted = upload_.converted();
      converted.resize(values.size());
      detail::parallel_ranges(static_cast<int64_t>(values.size()), kHostElements,
                              [&](int64_t begin, int64_t end) {
                                for (int64_t i = begin; i < end; ++i)
                                  converted[i] = as_bf16(values[i]);
                              });
      kv_.upload(converted.data(), converted.size());
    }
    DenseProbabilityParams params;
    params.q = q_.get();
    params.kv = kv_.get();
    params.lse = lse_.get();
    params.partial = partial_.get();
    params.rows = static_cast<int>(rows);
    params.heads = static_cast<int>(in_.heads);
    params.d_qk = static_cast<int>(in_.d_qk);
    params.first_position = in_.position(c0);
    params.stride = stride;
    params.scale = scale_;
    launch_dense_probabilities(params);
    check(cudaDeviceSynchronize(), "dense probability kernel");
    host_partial_.resize(static_cast<size_t>(groups * rows * stride));
    partial_.download(host_partial_.data(), host_partial_.size());
    const float inverse = 1.0f / static_cast<float>(in_.heads);
    detail::parallel_ranges(rows, kHostRows, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t visible = in_.position(c0 + r) + 1;
        for (int64_t s = 0; s < visible; ++s) {
          float sum = 0.0f;
          for (int64_t g = 0; g < groups; ++g) sum += host_partial_[(g * rows + r) * stride + s];
          p[r * stride + s] = sum * inverse;
        }
      }
    });
  }

 private:
  void upload_queries(int64_t c0, int64_t rows) {
    if (c0 == queries_at_ && rows == queries_rows_) return;
    upload_(*in_.q, (b_ * in_.queries + c0) * in_.heads * in_.d_qk, rows * in_.heads * in_.d_qk,
            q_);
    queries_at_ = c0;
    queries_rows_ = rows;
  }

  const AttentionInputs& in_;
  float scale_;
  int64_t b_;
  int64_t queries_at_ = -1, queries_rows_ = 0;
  std::vector<float> host_partial_;
  Bf16Upload upload_;
  DeviceBuffer<__nv_bfloat16> kv_, q_;
  DeviceBuffer<uint8_t> kv_fp8_;
  DeviceBuffer<int32_t> idx_;
  DeviceBuffer<float> out_, lse_, partial_, splits_;
};

// The GPU this process computes on: 0, or what select_device chose.
int current_device = 0;

std::string unavailable_reason() {
  int count = 0;
  const cudaError_t status = cudaGetDeviceCount(&count);
  if (status != cudaSuccess) return fmt::format("no usable GPU ({})", cudaGetErrorString(status));
  if (count == 0) return "no GPU found";
  cudaDeviceProp prop{};
  check(cudaGetDeviceProperties(&prop, current_device), "cudaGetDeviceProperties");
  if (prop.major != 9) {
    return fmt::format("the kernels are built for Hopper (sm_90a); GPU {} is {} (sm_{}{})",
                       current_device, prop.name, prop.major, prop.minor);
  }
  return "";
}

std::string describe() {
  cudaDeviceProp prop{};
  check(cudaGetDeviceProperties(&prop, current_device), "cudaGetDeviceProperties");
  return fmt::format("cuda:{} {} ({} SMs)", current_device, prop.name, prop.multiProcessorCount);
}

int select_device(int slot) {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
    (void)cudaGetLastError();  // no GPU: the CPU computes, nothing to choose
    return -1;
  }
  const int device = ((slot % count) + count) % count;
  check(cudaSetDevice(device), "cudaSetDevice");
  current_device = device;
  return device;
}

void indexer_scores(const IndexerInputs& in, const IndexerConfig& config,
                    const detail::ScoreSink& sink, StageTimes* times) {
  std::vector<float> host;
  each_batch_element(in, config, times, [&](int64_t b, IndexerOnDevice& indexer, QueryRows rows) {
    score_rows(in, indexer, rows, times, [&](int64_t c0, int64_t n, const float* scores) {
      host.resize(static_cast<size_t>(n * in.keys));
      check(cudaMemcpy(host.data(), scores, host.size() * sizeof(float), cudaMemcpyDeviceToHost),
            "cudaMemcpy");
      sink({b, c0, n, in.keys, host.data()});
    });
  });
}

void select_from_indexer(const IndexerInputs& in, const IndexerConfig& config, int64_t k,
                         const SelectionSink& sink, StageTimes* times) {
  DeviceBuffer<int32_t> indices;
  DeviceBuffer<float> values;
  std::vector<int32_t> host_indices;
  std::vector<float> host_values;
  // Rows [c0, c0 + rows)'s selection, now in indices and values, to the sink.
  auto hand_over = [&](int64_t b, int64_t c0, int64_t rows) {
    const size_t n = static_cast<size_t>(rows * k);
    host_indices.resize(n);
    host_values.resize(n);
    indices.download(host_indices.data(), n);
    values.download(host_values.data(), n);
    sink({b, c0, rows, k, host_indices.data(), host_values.data(), in.position(c0)});
  };
  each_batch_element(in, config, times, [&](int64_t b, IndexerOnDevice& indexer, QueryRows rows) {
    const int64_t chunk = topk_chunk(k);
    if (indexer.fuses_topk(std::min(chunk, rows.last - rows.first), k)) {
      for (int64_t c0 = rows.first; c0 < rows.last; c0 += chunk) {
        const int64_t n = std::min(chunk, rows.last - c0);
        indices.resize(static_cast<size_t>(n * k));
        values.resize(static_cast<size_t>(n * k));
        indexer.select(c0, n, k, indices.get(), values.get(), times);
        hand_over(b, c0, n);
      }
      return;
    }
    score_rows(in, indexer, rows, times, [&](int64_t c0, int64_t n, const float* scores) {
      Stopwatch watch;
      indices.resize(static_cast<size_t>(n * k));
      values.resize(static_cast<size_t>(n * k));
      TopkParams p;
      p.scores = scores;
      p.indices = indices.get();
      p.values = values.get();
      p.rows = static_cast<int>(n);
      p.keys = static_cast<int>(in.keys);
      p.k = static_cast<int>(k);
      p.first_position = in.position(c0);
      p.stride = in.keys;
      p.ratio = in.ratio;
      launch_topk(p);
      check(cudaDeviceSynchronize(), "top-k kernel");
      if (times) times->add("select", watch.seconds());
      hand_over(b, c0, n);
    });
  });
}

void sparse_attention(const AttentionInputs& in, const Tensor* indices, float scale,
                      const AttentionSink& sink, StageTimes* times) {
  const int64_t k = indices ? indices->shape.back() : 0;
  const int64_t chunk =
      std::clamp<int64_t>((256 << 20) / std::max<int64_t>(in.heads * in.d_qk * 2, 1), 1, 1 << 16);
  std::vector<int64_t> wide;
  std::vector<int32_t> narrow;
  const RowRange share = resolve_rows(in.rows, in.batch * in.queries, "the attention's");
  std::vector<float> out, lse;
  for (int64_t b = 0; b < in.batch; ++b) {
    const QueryRows queries = batch_queries(share, b, in.queries);
    if (queries.first >= queries.last) continue;
    Stopwatch load;
    AttentionOnDevice attention(in, scale, b);
    if (times) times->add("load", load.seconds());
    for (int64_t c0 = queries.first; c0 < queries.last; c0 += chunk) {
      const int64_t rows = std::min(chunk, queries.last - c0);
      Stopwatch watch;
      if (indices) {
        wide.resize(static_cast<size_t>(rows * k));
        to_i64(*indices, (b * in.queries + c0) * k, rows * k, wide.data());
        narrow.assign(wide.begin(), wide.end());
      }
      out.resize(static_cast<size_t>(rows * in.heads * in.d_v));
      lse.resize(static_cast<size_t>(rows * in.heads));
      attention.attend(c0, rows, indices ? narrow.data() : nullptr, k, out.data(), lse.data());
      if (times) times->add("attend", watch.seconds());
      sink({b, c0, rows, in.heads, in.d_v, out.data(), lse.data()});
    }
  }
}

// DeepSeek-V4's attention on the V4 kernel (launch_compressed_attention) for entries of 512
// dims: per batch element the raw tokens and the compressed entries uploaded once in bf16, then
// chunks of query rows with their selection, nothing gathered on the host; other widths through
// the gathered cache and the MQA kernels.
void compressed_attention(const CompressedAttentionInputs& in, const Tensor* indices, float scale,
                          const AttentionSink& sink, StageTimes* times) {
  if (!compressed_attention_limit(static_cast<int>(in.dim), in.window).empty()) {
    detail::gathered_compressed_attention(in, indices, scale, sink, times, sparse_attention);
    return;
  }
  const int64_t H = in.heads, d = in.dim;
  const int64_t k = indices ? indices->shape.back() : 0;
  const int64_t chunk = std::clamp<int64_t>((256 << 20) / (H * d * 2), 1, 1 << 16);
  const RowRange share = resolve_rows(in.rows, in.batch * in.queries, "the attention's");
  DeviceBuffer<float> sinks;
  if (in.sink) {
    std::vector<float> values(static_cast<size_t>(H));
    to_f32(*in.sink, 0, H, values.data());
    sinks.upload(values.data(), values.size());
  }
  Bf16Upload upload;
  DeviceBuffer<__nv_bfloat16> kv, compressed, q;
  DeviceBuffer<uint8_t> kv_fp8, compressed_fp8;  // the fp8 caches' rows as they are
  DeviceBuffer<int32_t> selection;
  DeviceBuffer<float> out_d, lse_d, splits;
  std::vector<int64_t> wide;
  std::vector<int32_t> narrow;
  std::vector<float> out, lse;
  detail::Progress progress("attend", share.end - share.begin);
  for (int64_t b = 0; b < in.batch; ++b) {
    const QueryRows queries = batch_queries(share, b, in.queries);
    if (queries.first >= queries.last) continue;
    Stopwatch load;
    if (in.fp8_cache) {
      const auto rows_of = [](const Tensor& t, int64_t first, int64_t count,
                              DeviceBuffer<uint8_t>& dst) {
        dst.upload(reinterpret_cast<const uint8_t*>(t.data) + first * kV4CacheBytes,
                   static_cast<size_t>(count * kV4CacheBytes));
      };
      rows_of(*in.kv, b * in.tokens, in.tokens, kv_fp8);
      if (in.compressed) rows_of(*in.compressed, b * in.entries, in.entries, compressed_fp8);
    } else {
      upload(*in.kv, b * in.tokens * d, in.tokens * d, kv);
      if (in.compressed) upload(*in.compressed, b * in.entries * d, in.entries * d, compressed);
    }
    if (times) times->add("load", load.seconds());
    for (int64_t c0 = queries.first; c0 < queries.last; c0 += chunk) {
      const int64_t rows = std::min(chunk, queries.last - c0);
      Stopwatch watch;
      upload(*in.q, (b * in.queries + c0) * H * d, rows * H * d, q);
      if (indices) {
        wide.resize(static_cast<size_t>(rows * k));
        to_i64(*indices, (b * in.queries + c0) * k, rows * k, wide.data());
        narrow.assign(wide.begin(), wide.end());
        selection.upload(narrow.data(), narrow.size());
      }
      out_d.resize(static_cast<size_t>(rows * H * d));
      lse_d.resize(static_cast<size_t>(rows * H));
      AttentionParams p;
      p.q = q.get();
      if (in.fp8_cache) {
        p.kv_fp8 = kv_fp8.get();
        p.compressed_fp8 = in.compressed ? compressed_fp8.get() : nullptr;
      } else {
        p.kv = kv.get();
        p.compressed = in.compressed ? compressed.get() : nullptr;
      }
      p.indices = indices ? selection.get() : nullptr;
      p.out = out_d.get();
      p.lse = lse_d.get();
      p.rows = static_cast<int>(rows);
      p.heads = static_cast<int>(H);
      p.d_qk = p.d_v = static_cast<int>(d);
      p.keys = static_cast<int>(in.tokens);
      p.k = static_cast<int>(k);
      p.first_position = in.position(c0);
      p.scale = scale;
      p.query_rows = static_cast<int>(in.queries);
      p.window = static_cast<int>(in.window);
      p.ratio = in.ratio;
      p.entries = in.entries;
      p.sink = in.sink ? sinks.get() : nullptr;
      splits.resize(static_cast<size_t>(attention_partial_floats(p)));
      p.partial = splits.get();
      launch_compressed_attention(p);
      check(cudaDeviceSynchronize(), "V4 attention kernel");
      out.resize(static_cast<size_t>(rows * H * d));
      lse.resize(static_cast<size_t>(rows * H));
      out_d.download(out.data(), out.size());
      lse_d.download(lse.data(), lse.size());
      if (times) times->add("attend", watch.seconds());
      sink({b, c0, rows, H, d, out.data(), lse.data()});
      progress.advance(rows);
    }
  }
}

// cuBLAS, opened at the first GPU compressor (dlopen: the tools do not load its hundreds of
// megabytes, under a memory limit too, until they need it), and a handle for one call.
class Blas {
 public:
  Blas() {
    const Library& lib = library();
    check_blas(lib.create(&handle_), "cublasCreate");
  }
  ~Blas() { library().destroy(handle_); }
  Blas(const Blas&) = delete;
  Blas& operator=(const Blas&) = delete;
  // out [rows, n] = x [rows, k] . w^T for w [n, k], all row-major f32, in f32 (cuBLAS's default
  // math: no TF32).
  void project(const float* x, const float* w, float* out, int64_t rows, int64_t n, int64_t k) {
    const float one = 1.0f, zero = 0.0f;
    check_blas(
        library().sgemm(handle_, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(n),
                        static_cast<int>(rows), static_cast<int>(k), &one, w, static_cast<int>(k),
                        x, static_cast<int>(k), &zero, out, static_cast<int>(n)),
        "cublasSgemm (compressor projection)");
  }

 private:
  struct Library {
    decltype(&cublasCreate_v2) create = nullptr;
    decltype(&cublasDestroy_v2) destroy = nullptr;
    decltype(&cublasSgemm_v2) sgemm = nullptr;
  };
  static const Library& library() {
    static const Library lib = [] {
      const std::string name = fmt::format("libcublas.so.{}", CUBLAS_VER_MAJOR);
      void* handle = dlopen(name.c_str(), RTLD_NOW | RTLD_LOCAL);
      if (!handle) {
        fail(ExitCode::runtime, "CUDA: the compressor's projections need cuBLAS: {}", dlerror());
      }
      Library l;
      l.create = reinterpret_cast<decltype(l.create)>(dlsym(handle, "cublasCreate_v2"));
      l.destroy = reinterpret_cast<decltype(l.destroy)>(dlsym(handle, "cublasDestroy_v2"));
      l.sgemm = reinterpret_cast<decltype(l.sgemm)>(dlsym(handle, "cublasSgemm_v2"));
      if (!l.create || !l.destroy || !l.sgemm) {
        fail(ExitCode::runtime,
             "CUDA: {} lacks cublasCreate_v2, cublasDestroy_v2 or cublasSgemm_v2", name);
      }
      return l;
    }();
    return lib;
  }
  static void check_blas(cublasStatus_t status, const char* what) {
    if (status != CUBLAS_STATUS_SUCCESS)
      fail(ExitCode::runtime, "CUDA: {} failed: cuBLAS status {}", what, static_cast<int>(status));
  }
  cublasHandle_t handle_ = nullptr;
};

// Host tensor elements to f32 device memory.
void upload_f32(const Tensor& t, int64_t offset, int64_t count, std::vector<float>& staging,
                DeviceBuffer<float>& dst) {
  staging.resize(static_cast<size_t>(count));
  detail::parallel_ranges(count, kHostElements, [&](int64_t begin, int64_t end) {
    to_f32(t, offset + begin, end - begin, staging.data() + begin);
  });
  dst.upload(staging.data(), staging.size());
}

// DeepSeek-V4's compressor: the weights uploaded once; per chunk of entries (about 32768 tokens)
// the chunk's tokens of x (and, with overlap, the window before) uploaded in f32, the two
// projections on cuBLAS, then the compressor kernel; the entries back to the host in order.
void compress(const CompressorInputs& in, const CompressorConfig& config,
              const CompressedSink& sink, StageTimes* times) {
  const int64_t m = config.ratio, d = in.dim, D = in.model_dim;
  const int64_t width = (in.overlap ? 2 : 1) * d, lead = in.overlap ? m : 0;
  Stopwatch prepare;
  std::vector<float> staging;
  DeviceBuffer<float> wkv, wgate, ape, norm, frequencies, x, kv, score, out;
  upload_f32(*in.weights.wkv, 0, width * D, staging, wkv);
  upload_f32(*in.weights.wgate, 0, width * D, staging, wgate);
  upload_f32(*in.weights.ape, 0, m * width, staging, ape);
  upload_f32(*in.weights.norm, 0, d, staging, norm);
  const Rope rope(config.rope);
  frequencies.upload(rope.frequencies().data(), rope.frequencies().size());
  Blas blas;
  if (times) times->add("prepare", prepare.seconds());
  const int64_t chunk = std::max<int64_t>(1, 32768 / m);  // entries
  std::vector<float> values;
  detail::Progress progress("compress", in.batch * in.entries, "entries");
  for (int64_t b = 0; b < in.batch; ++b) {
    for (int64_t j0 = 0; j0 < in.entries; j0 += chunk) {
      Stopwatch watch;
      const int64_t j1 = std::min(in.entries, j0 + chunk);
      const int64_t t0 = std::max<int64_t>(0, m * j0 - lead), t1 = m * j1;
      upload_f32(*in.x, (b * in.tokens + t0) * D, (t1 - t0) * D, staging, x);
      kv.resize(static_cast<size_t>((t1 - t0) * width));
      score.resize(static_cast<size_t>((t1 - t0) * width));
      blas.project(x.get(), wkv.get(), kv.get(), t1 - t0, width, D);
      blas.project(x.get(), wgate.get(), score.get(), t1 - t0, width, D);
      out.resize(static_cast<size_t>((j1 - j0) * d));
      CompressorParams p;
      p.kv = kv.get();
      p.score = score.get();
      p.ape = ape.get();
      p.norm = norm.get();
      p.frequencies = frequencies.get();
      p.out = out.get();
      p.first_entry = j0;
      p.token0 = t0;
      p.entries = static_cast<int>(j1 - j0);
      p.ratio = static_cast<int>(m);
      p.dim = static_cast<int>(d);
      p.rope_dims = static_cast<int>(config.rope.dims);
      p.overlap = in.overlap;
      p.indexer = config.indexer;
      p.rounds = config.numerics != V4Numerics::f32;
      p.quantizes = config.numerics == V4Numerics::released;
      p.eps = static_cast<float>(config.eps);
      launch_compressor(p);
      check(cudaDeviceSynchronize(), "compressor kernel");
      values.resize(static_cast<size_t>((j1 - j0) * d));
      out.download(values.data(), values.size());
      if (times) times->add("compress", watch.seconds());
      sink({b, j0, j1 - j0, d, values.data()});
      progress.advance(j1 - j0);
    }
  }
}

class DeviceCompareEngine : public detail::CompareEngine {
 public:
  DeviceCompareEngine(const AttentionInputs& attention, const IndexerInputs* indexer,
                      const IndexerConfig& config, float scale, int64_t b)
      : attention_device_(attention, scale, b) {
    if (indexer) indexer_device_.emplace(*indexer, config, b, nullptr);
  }

  void scores(int64_t c0, int64_t rows, int64_t keys, float* out) override {
    scores_.resize(static_cast<size_t>(rows * keys));
    indexer_device_->score(c0, rows, scores_.get(), nullptr);
    scores_.download(out, static_cast<size_t>(rows * keys));
  }

  void attend(int64_t c0, int64_t rows, const int32_t* indices, int64_t k, float* out,
              float* lse) override {
    attention_device_.attend(c0, rows, indices, k, out, lse);
  }

  void dense(int64_t c0, int64_t rows, float* out, float* lse, float* p, int64_t stride) override {
    attention_device_.attend(c0, rows, nullptr, 0, out, lse);
    attention_device_.dense_probabilities(c0, rows, p, stride);
  }

 private:
  AttentionOnDevice attention_device_;
  std::optional<IndexerOnDevice> indexer_device_;
  DeviceBuffer<float> scores_;
};

std::unique_ptr<detail::CompareEngine> compare_engine(const AttentionInputs& attention,
                                                      const IndexerInputs* indexer,
                                                      const IndexerConfig& config, float scale,
                                                      int64_t b) {
  return std::make_unique<DeviceCompareEngine>(attention, indexer, config, scale, b);
}

}  // namespace

const detail::Backend& backend() {
  static const detail::Backend table{Device::cuda,
                                     unavailable_reason,
                                     describe,
                                     check_operation,
                                     indexer_scores,
                                     select_from_indexer,
                                     sparse_attention,
                                     compressed_attention,
                                     compress,
                                     time_layer,
                                     int64_t{1} << 30,
                                     compare_engine,
                                     [] { return peak_bytes.load(); },
                                     select_device};
  return table;
}

}  // namespace dsa::cuda
