// The CUDA backend behind the library's functions: host tensors in, blocks of results out to
// the same sinks as the CPU backend. Inputs are prepared on the CPU with the same code as the
// CPU path (Hadamard, bf16 rounding, fp8 quantization), so both see identical operands.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include <fmt/format.h>

#include "cuda_backend.hpp"
#include "dsa/error.hpp"
#include "dsa/precision.hpp"
#include "kernels.cuh"

namespace dsa::cuda {

void check(cudaError_t status, const char* what) {
  if (status != cudaSuccess)
    fail(ExitCode::runtime, "CUDA: {} failed: {}", what, cudaGetErrorString(status));
}

namespace {

// Device memory that frees itself.
template <typename T>
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(size_t count) { resize(count); }
  ~DeviceBuffer() { cudaFree(data_); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  void resize(size_t count) {
    if (count <= capacity_) return;
    cudaFree(data_);
    data_ = nullptr;
    check(cudaMalloc(&data_, std::max<size_t>(count, 1) * sizeof(T)), "cudaMalloc");
    capacity_ = count;
  }
  void upload(const T* host, size_t count) {
    resize(count);
    check(cudaMemcpy(data_, host, count * sizeof(T), cudaMemcpyHostToDevice),
          "cudaMemcpy to the GPU");
  }
  void download(T* host, size_t count) const {
    check(cudaMemcpy(host, data_, count * sizeof(T), cudaMemcpyDeviceToHost),
          "cudaMemcpy from the GPU");
  }
  T* get() const { return data_; }

 private:
  T* data_ = nullptr;
  size_t capacity_ = 0;
};

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

// The fp8 tensor-core kernel covers DSA's own indexer shape; others run the bf16 kernel on the
// fp8 codes' values (exact in bf16).
bool fp8_tensor_cores(const IndexerInputs& in, const IndexerConfig& config) {
  return config.precision == Precision::fp8 && in.heads == 64 && in.dim == 128;
}

void prepare_operands(const Tensor& tensor, int64_t offset, int64_t count, int64_t dim,
                      const IndexerConfig& config, bool codes, IndexerOperands& out) {
  std::vector<float> rows(static_cast<size_t>(count * dim));
  to_f32(tensor, offset * dim, count * dim, rows.data());
  out.scales.assign(static_cast<size_t>(count), 1.0f);
  if (config.precision == Precision::f32) {
    prepare_indexer_rows(rows.data(), count, dim, config);
    out.values_f32 = std::move(rows);
    return;
  }
  if (codes) {
    out.codes.resize(rows.size());
  } else {
    out.values.resize(rows.size());
  }
  for (int64_t r = 0; r < count; ++r) {
    float* row = rows.data() + r * dim;
    if (config.hadamard) hadamard_transform(row, dim);
    if (config.precision == Precision::fp8)
      out.scales[r] = fp8_quantize_block(row, dim, config.ue8m0);
    for (int64_t i = 0; i < dim; ++i) {
      if (codes) {
        out.codes[r * dim + i] = f32_to_e4m3(row[i]);
      } else {
        out.values[r * dim + i] = as_bf16(row[i]);
      }
    }
  }
}

void check_indexer_shape(const IndexerInputs& in, const IndexerConfig& config) {
  if (config.precision == Precision::f32) return;
  if (128 % in.heads != 0 || in.dim % 16 != 0 || in.dim > 256) {
    bad_usage(
        "the CUDA indexer needs H_I dividing 128 and d_I a multiple of 16 up to 256, got H_I = {}, "
        "d_I = {}",
        in.heads, in.dim);
  }
  if (config.precision == Precision::fp8 && in.dim > config.quant_block) {
    bad_usage("the CUDA fp8 indexer needs one scale block per row (d_I <= {}), got d_I = {}",
              config.quant_block, in.dim);
  }
}

// Streams the indexer's score rows of one batch element in chunks that fit the GPU, handing
// each chunk (device pointer, rows) to `use`.
template <typename Use>
void score_chunks(const IndexerInputs& in, const IndexerConfig& config, int64_t b,
                  StageTimes* times, Use use) {
  const int64_t H = in.heads, d = in.dim, Lk = in.keys;
  const bool codes = fp8_tensor_cores(in, config);
  Stopwatch prepare;
  IndexerOperands keys;
  prepare_operands(*in.k_index, b * Lk, Lk, d, config, codes, keys);
  DeviceBuffer<uint8_t> k_codes, q_codes;
  DeviceBuffer<__nv_bfloat16> k_values;
  DeviceBuffer<float> k_f32, k_scales(static_cast<size_t>(Lk)), q_f32, weights, scores;
  DeviceBuffer<__nv_bfloat16> q_values;
  if (config.precision == Precision::f32) {
    k_f32.upload(keys.values_f32.data(), keys.values_f32.size());
  } else if (codes) {
    k_codes.upload(keys.codes.data(), keys.codes.size());
    k_scales.upload(keys.scales.data(), keys.scales.size());
  } else {
    k_values.upload(keys.values.data(), keys.values.size());
    k_scales.upload(keys.scales.data(), keys.scales.size());
  }
  if (times) times->add("prepare", prepare.seconds());
  const int64_t chunk = std::clamp<int64_t>((512 << 20) / std::max<int64_t>(Lk * 4, 1), 1, 1 << 16);
  scores.resize(static_cast<size_t>(std::min(chunk, in.queries) * Lk));
  IndexerOperands queries;
  std::vector<float> w(static_cast<size_t>(chunk * H));
  for (int64_t c0 = 0; c0 < in.queries; c0 += chunk) {
    const int64_t rows = std::min(chunk, in.queries - c0);
    Stopwatch watch;
    prepare_operands(*in.q_index, (b * in.queries + c0) * H, rows * H, d, config, codes, queries);
    to_f32(*in.weights, (b * in.queries + c0) * H, rows * H, w.data());
    for (int64_t i = 0; i < rows * H; ++i) w[i] *= config.weight_scale * queries.scales[i];
    weights.upload(w.data(), static_cast<size_t>(rows * H));
    if (times) times->add("prepare", watch.seconds());
    watch = Stopwatch();
    if (config.precision == Precision::f32) {
      q_f32.upload(queries.values_f32.data(), queries.values_f32.size());
      launch_indexer_f32(q_f32.get(), weights.get(), k_f32.get(), static_cast<int>(rows),
                         static_cast<int>(H), static_cast<int>(d), static_cast<int>(Lk),
                         in.position(c0), scores.get(), Lk, nullptr);
    } else if (codes) {
      q_codes.upload(queries.codes.data(), queries.codes.size());
      launch_indexer_fp8(q_codes.get(), weights.get(), k_codes.get(), k_scales.get(),
                         static_cast<int>(rows), static_cast<int>(Lk), in.position(c0),
                         scores.get(), Lk, nullptr);
    } else {
      q_values.upload(queries.values.data(), queries.values.size());
      launch_indexer_bf16(q_values.get(), weights.get(), k_values.get(), k_scales.get(),
                          static_cast<int>(rows), static_cast<int>(H), static_cast<int>(d),
                          static_cast<int>(Lk), in.position(c0), scores.get(), Lk, nullptr);
    }
    check(cudaDeviceSynchronize(), "indexer kernel");
    if (times) times->add("score", watch.seconds());
    use(c0, rows, scores.get());
  }
}

}  // namespace

std::string unavailable_reason() {
  int count = 0;
  const cudaError_t status = cudaGetDeviceCount(&count);
  if (status != cudaSuccess) return fmt::format("no usable GPU ({})", cudaGetErrorString(status));
  if (count == 0) return "no GPU found";
  cudaDeviceProp prop{};
  check(cudaGetDeviceProperties(&prop, 0), "cudaGetDeviceProperties");
  if (prop.major != 9) {
    return fmt::format("the kernels are built for Hopper (sm_90a); GPU 0 is {} (sm_{}{})",
                       prop.name, prop.major, prop.minor);
  }
  return "";
}

std::string describe() {
  cudaDeviceProp prop{};
  check(cudaGetDeviceProperties(&prop, 0), "cudaGetDeviceProperties");
  return fmt::format("cuda:0 {} ({} SMs)", prop.name, prop.multiProcessorCount);
}

void indexer_scores(const IndexerInputs& in, const IndexerConfig& config,
                    const std::function<void(const ScoreBlock&)>& sink, StageTimes* times) {
  check_indexer_shape(in, config);
  std::vector<float> host;
  for (int64_t b = 0; b < in.batch; ++b) {
    score_chunks(in, config, b, times, [&](int64_t c0, int64_t rows, const float* scores) {
      host.resize(static_cast<size_t>(rows * in.keys));
      check(cudaMemcpy(host.data(), scores, host.size() * sizeof(float), cudaMemcpyDeviceToHost),
            "cudaMemcpy");
      sink({b, c0, rows, in.keys, host.data()});
    });
  }
}

void select_from_indexer(const IndexerInputs& in, const IndexerConfig& config, int64_t k,
                         const SelectionSink& sink, StageTimes* times) {
  check_indexer_shape(in, config);
  DeviceBuffer<int32_t> indices;
  DeviceBuffer<float> values;
  std::vector<int32_t> host_indices;
  std::vector<float> host_values;
  for (int64_t b = 0; b < in.batch; ++b) {
    score_chunks(in, config, b, times, [&](int64_t c0, int64_t rows, const float* scores) {
      Stopwatch watch;
      const size_t n = static_cast<size_t>(rows * k);
      indices.resize(n);
      values.resize(n);
      launch_topk(scores, in.keys, static_cast<int>(rows), in.position(c0),
                  static_cast<int>(in.keys), static_cast<int>(k), indices.get(), values.get(),
                  nullptr);
      check(cudaDeviceSynchronize(), "top-k kernel");
      if (times) times->add("select", watch.seconds());
      host_indices.resize(n);
      host_values.resize(n);
      indices.download(host_indices.data(), n);
      values.download(host_values.data(), n);
      sink({b, c0, rows, k, host_indices.data(), host_values.data()});
    });
  }
}

void sparse_attention(const AttentionInputs& in, const Tensor* indices, float scale,
                      const AttentionSink& sink, StageTimes* times) {
  if (!in.latent) bad_usage("the CUDA attention supports the MQA layout (--kv) only");
  const int64_t k = indices ? indices->shape.back() : 0;
  const int64_t chunk =
      std::clamp<int64_t>((256 << 20) / std::max<int64_t>(in.heads * in.d_qk * 2, 1), 1, 1 << 16);
  DeviceBuffer<__nv_bfloat16> kv, q;
  DeviceBuffer<int32_t> idx;
  DeviceBuffer<float> out, lse;
  std::vector<float> staging;
  std::vector<__nv_bfloat16> converted;
  std::vector<int64_t> wide;
  std::vector<int32_t> narrow;
  std::vector<float> host_out, host_lse;
  auto upload_bf16 = [&](const Tensor& t, int64_t offset, int64_t count,
                         DeviceBuffer<__nv_bfloat16>& dst) {
    staging.resize(static_cast<size_t>(count));
    to_f32(t, offset, count, staging.data());
    converted.resize(staging.size());
    for (size_t i = 0; i < staging.size(); ++i) converted[i] = as_bf16(staging[i]);
    dst.upload(converted.data(), converted.size());
  };
  for (int64_t b = 0; b < in.batch; ++b) {
    Stopwatch load;
    upload_bf16(*in.k, b * in.keys * in.d_qk, in.keys * in.d_qk, kv);
    if (times) times->add("load", load.seconds());
    for (int64_t c0 = 0; c0 < in.queries; c0 += chunk) {
      const int64_t rows = std::min(chunk, in.queries - c0);
      Stopwatch watch;
      upload_bf16(*in.q, (b * in.queries + c0) * in.heads * in.d_qk, rows * in.heads * in.d_qk, q);
      if (indices) {
        wide.resize(static_cast<size_t>(rows * k));
        to_i64(*indices, (b * in.queries + c0) * k, rows * k, wide.data());
        narrow.assign(wide.begin(), wide.end());
        idx.upload(narrow.data(), narrow.size());
      }
      out.resize(static_cast<size_t>(rows * in.heads * in.d_v));
      lse.resize(static_cast<size_t>(rows * in.heads));
      if (times) times->add("load", watch.seconds());
      watch = Stopwatch();
      launch_mqa_attention(q.get(), kv.get(), indices ? idx.get() : nullptr, static_cast<int>(k),
                           static_cast<int>(rows), static_cast<int>(in.heads),
                           static_cast<int>(in.d_qk), static_cast<int>(in.d_v),
                           static_cast<int>(in.keys), in.position(c0), scale, out.get(), lse.get(),
                           nullptr);
      check(cudaDeviceSynchronize(), "attention kernel");
      if (times) times->add("attend", watch.seconds());
      host_out.resize(static_cast<size_t>(rows * in.heads * in.d_v));
      host_lse.resize(static_cast<size_t>(rows * in.heads));
      out.download(host_out.data(), host_out.size());
      lse.download(host_lse.data(), host_lse.size());
      sink({b, c0, rows, in.heads, in.d_v, host_out.data(), host_lse.data()});
    }
  }
}

}  // namespace dsa::cuda
