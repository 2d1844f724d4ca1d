// Times the CUDA kernels on device-resident data at DeepSeek-V3.2 sizes (indexer 64 x 128,
// top-2048, sparse MQA 128 heads x 576/512) and prints one JSON line per measurement.
// It first measures three ceilings on the same device with the CUDA toolkit's own libraries
// (issue 16): a bf16 and an fp8 e4m3 GEMM through cuBLASLt and the device copy bandwidth, and
// gives every kernel row a "fraction" of its ceiling (null where that ceiling could not be
// measured). A table of the rows ends the run, on stderr. Every row's memory is bounded at any L
// (no buffer of L^2), up to a sequence of 1M tokens; dsa_prefill_chunked chains the prefill's
// stages over query chunks and reports its peak device memory.
// DeepSeek-V4's rows (v4_*) follow each L's V3.2 rows: the CSA indexer over compressed keys with
// its top-512 and top-1024, the CSA and HCA attention of V4-Flash (64 heads) and V4-Pro's CSA (128
// heads), V4-Flash's compressors, each layer beside V3.2's at the same L, V4-Flash's CSA layer
// chained over query chunks (v4_flash_csa_layer_chained: compressors, indexer, top-k, attention,
// bounded memory), and their decode at batch 32 with the split count swept.
// Usage: dsa-cuda-bench [--v4-only | --v32-only] [L ...]   (default 32768 131072)
#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp8.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "kernels.cuh"

namespace {

using dsa::cuda::check;

// Distinct visible positions per row: a stride walk from a row-dependent start.
__global__ void fill_indices(int32_t* idx, int rows, int k, int64_t first_position) {
  const int r = blockIdx.x;
  const int64_t visible = first_position + r + 1;
  for (int j = threadIdx.x; j < k; j += blockDim.x) {
    idx[int64_t(r) * k + j] =
        j < visible ? static_cast<int32_t>((int64_t(j) * 7919 + r) % visible) : -1;
  }
}

// Whether indices [rows, k] (query rows at positions c0 + r) are a selection: per row, the first
// min(k, visible) entries distinct visible positions, the rest -1.
bool valid_selection(const std::vector<int32_t>& idx, int rows, int k, int64_t c0) {
  std::vector<int32_t> row(k);
  for (int r = 0; r < rows; ++r) {
    const int64_t visible = c0 + r + 1;
    const int64_t selected = std::min<int64_t>(k, visible);
    std::copy(idx.begin() + int64_t(r) * k, idx.begin() + int64_t(r + 1) * k, row.begin());
    for (int64_t j = 0; j < k; ++j) {
      const bool ok = j < selected ? row[j] >= 0 && row[j] < visible : row[j] == -1;
      if (!ok) return false;
    }
    std::sort(row.begin(), row.begin() + selected);
    if (std::adjacent_find(row.begin(), row.begin() + selected) != row.begin() + selected)
      return false;
  }
  return true;
}

template <typename T>
T* device_alloc(size_t n) {
  T* p = nullptr;
  check(cudaMalloc(&p, n * sizeof(T)), "cudaMalloc");
  return p;
}

// The device buffers of one row, counted: the bytes they hold now and the most they held at
// once (the row's own figure of its peak memory, beside what cudaMemGetInfo sees). Frees them
// when it goes out of scope.
class CountingAllocator {
 public:
  CountingAllocator() = default;
  CountingAllocator(const CountingAllocator&) = delete;
  CountingAllocator& operator=(const CountingAllocator&) = delete;
  ~CountingAllocator() {
    for (void* p : buffers_) cudaFree(p);
  }
  template <typename T>
  T* alloc(size_t n) {
    T* p = device_alloc<T>(n);
    buffers_.push_back(p);
    live_ += n * sizeof(T);
    peak_ = std::max(peak_, live_);
    return p;
  }
  size_t peak() const { return peak_; }

 private:
  std::vector<void*> buffers_;
  size_t live_ = 0, peak_ = 0;
};

// Device memory in use (total - free, every process and allocation on the device), once the
// device is idle: the kernels in flight and the frees before it have finished.
int64_t device_used_bytes() {
  check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
  size_t free = 0, total = 0;
  check(cudaMemGetInfo(&free, &total), "cudaMemGetInfo");
  return static_cast<int64_t>(total - free);
}

struct Timer {
  cudaEvent_t start, stop;
  Timer() {
    cudaEventCreate(&start);
    cudaEventCreate(&stop);
  }
  void begin() { cudaEventRecord(start); }
  double end_ms() {
    cudaEventRecord(stop);
    check(cudaEventSynchronize(stop), "kernel");
    float ms = 0;
    cudaEventElapsedTime(&ms, start, stop);
    return ms;
  }
};

// The launch parameters of the benchmarks' kernels.
template <typename T>
dsa::cuda::IndexerParams<T> indexer(const T* q, const float* w, const T* k, const float* ks,
                                    int rows, int heads, int dim, int64_t keys, int64_t c0,
                                    float* scores) {
  dsa::cuda::IndexerParams<T> p;
  p.q = q, p.w = w, p.k = k, p.k_scale = ks, p.scores = scores;
  p.rows = rows, p.heads = heads, p.dim = dim, p.keys = static_cast<int>(keys);
  p.first_position = c0, p.stride = keys;
  return p;
}

dsa::cuda::TopkParams topk(const float* scores, int rows, int64_t keys, int64_t c0, int k,
                           int32_t* idx, float* vals) {
  dsa::cuda::TopkParams p;
  p.scores = scores, p.indices = idx, p.values = vals;
  p.rows = rows, p.keys = static_cast<int>(keys), p.k = k;
  p.first_position = c0, p.stride = keys;
  return p;
}

dsa::cuda::IndexerTopkOutputs fused_outputs(int32_t* idx, float* vals, uint64_t* lists, int k) {
  dsa::cuda::IndexerTopkOutputs out;
  out.indices = idx, out.values = vals, out.lists = lists, out.k = k;
  return out;
}

// Whether `count` elements at a and b (device memory) hold the same bytes.
template <typename T>
bool same_on_device(const T* a, const T* b, size_t count) {
  std::vector<T> x(count), y(count);
  check(cudaMemcpy(x.data(), a, count * sizeof(T), cudaMemcpyDeviceToHost), "copy");
  check(cudaMemcpy(y.data(), b, count * sizeof(T), cudaMemcpyDeviceToHost), "copy");
  return std::memcmp(x.data(), y.data(), count * sizeof(T)) == 0;
}

dsa::cuda::AttentionParams attention(const __nv_bfloat16* q, const __nv_bfloat16* kv,
                                     const int32_t* sel, int k, int rows, int heads, int d_qk,
                                     int d_v, int64_t keys, int64_t c0, float scale, float* out,
                                     float* lse) {
  dsa::cuda::AttentionParams p;
  p.q = q, p.kv = kv, p.indices = sel, p.out = out, p.lse = lse;
  p.rows = rows, p.heads = heads, p.d_qk = d_qk, p.d_v = d_v, p.keys = static_cast<int>(keys);
  p.k = k, p.first_position = c0, p.scale = scale;
  return p;
}

// The ceilings of this run (0 where one could not be measured): bf16 and fp8 GEMM in TFLOP/s,
// device copy in TB/s (bytes read + bytes written).
struct Ceilings {
  double bf16_tflops = 0, fp8_tflops = 0, copy_tb_s = 0, f32_tflops = 0;
};
Ceilings ceilings;

// One line of the closing table.
struct Row {
  std::string bench;
  int64_t L;
  double ms, rate;  // rate in TFLOP/s or TB/s (unit), 0 for the floor rows
  const char* unit;
  double fraction;  // NaN: no ceiling
};
std::vector<Row> rows;
// Lines printed under the table (the chained prefill's memory).
std::vector<std::string> table_notes;

std::string json_number(double x, const char* format) {
  if (!std::isfinite(x)) return "null";
  char buffer[64];
  std::snprintf(buffer, sizeof buffer, format, x);
  return buffer;
}

double fraction_of(double rate, double ceiling) {
  return ceiling > 0 ? rate / ceiling : NAN;
}

// A compute-bound row: `flops` (the row's FLOP convention, unchanged) against `ceiling_tflops`.
// `extra` is appended to the JSON object (",\"key\":value").
void report(const char* what, int64_t L, double ms, double flops, double ceiling_tflops,
            const std::string& extra = "") {
  const double tflops = flops / (ms * 1e-3) / 1e12;
  const double fraction = fraction_of(tflops, ceiling_tflops);
  std::printf("{\"bench\":\"%s\",\"L\":%lld,\"ms\":%.3f,\"tflops\":%.1f,\"fraction\":%s%s}\n", what,
              static_cast<long long>(L), ms, tflops, json_number(fraction, "%.4f").c_str(),
              extra.c_str());
  std::fflush(stdout);
  rows.push_back({what, L, ms, tflops, "TFLOP/s", fraction});
}

// A memory-bound row: `bytes` moved against the copy ceiling; "tflops" is kept as before (0 for
// the rows that had no FLOP count). `extra` is appended to the JSON object (",\"key\":value").
void report_bytes(const char* what, int64_t L, double ms, double flops, double bytes,
                  const std::string& extra = "") {
  const double tb_s = bytes / (ms * 1e-3) / 1e12;
  const double fraction = fraction_of(tb_s, ceilings.copy_tb_s);
  std::printf(
      "{\"bench\":\"%s\",\"L\":%lld,\"ms\":%.3f,\"tflops\":%.1f,\"bytes\":%.0f,\"tb_s\":%.3f,"
      "\"fraction\":%s%s}\n",
      what, static_cast<long long>(L), ms, flops / (ms * 1e-3) / 1e12, bytes, tb_s,
      json_number(fraction, "%.4f").c_str(), extra.c_str());
  std::fflush(stdout);
  rows.push_back({what, L, ms, tb_s, "TB/s", fraction});
}

// A pipeline row: its floor (the sum of its stages' times at their ceilings, NaN where a ceiling
// is missing) over the measured time. `extra` is appended to the JSON object, as report_bytes'.
void report_floor(const char* what, int64_t L, double ms, double floor_ms,
                  const std::string& extra = "") {
  const double fraction = floor_ms / ms;
  std::printf(
      "{\"bench\":\"%s\",\"L\":%lld,\"ms\":%.3f,\"tflops\":%.1f,\"floor_ms\":%s,"
      "\"fraction\":%s%s}\n",
      what, static_cast<long long>(L), ms, 0.0, json_number(floor_ms, "%.3f").c_str(),
      json_number(fraction, "%.4f").c_str(), extra.c_str());
  std::fflush(stdout);
  rows.push_back({what, L, ms, 0, "floor", fraction});
}

// Milliseconds of `flops` at `tflops`, of `bytes` at the copy ceiling (NaN without the ceiling).
double floor_ms_flops(double flops, double tflops) {
  return tflops > 0 ? flops / tflops / 1e9 : NAN;
}
double floor_ms_bytes(double bytes) {
  return ceilings.copy_tb_s > 0 ? bytes / ceilings.copy_tb_s / 1e9 : NAN;
}

// ---- Ceilings --------------------------------------------------------------------------------

struct GemmTime {
  double best_ms = 0, median_ms = 0;
  int algorithms = 0;  // the heuristic's candidates that ran
  std::string error;   // empty when it ran
};

// D = A^T B on n x n x n through cuBLASLt, in its column-major terms: A and B stored k x n with
// leading dimension k (each a row-major n x k matrix), A transposed: the TN layout that Hopper's
// fp8 GEMM requires, used for bf16 too. `type` is A's and B's (bf16 or e4m3), D and C are bf16,
// accumulation and alpha/beta f32, no scale pointers (scales 1). Tries the heuristic's first 4
// algorithms: 3 warm-up runs then 10 timed runs of each (events around each run); returns the
// best run and the median of the best algorithm's runs.
GemmTime time_gemm(cublasLtHandle_t lt, cudaDataType_t type, int n, const void* a, const void* b,
                   void* d, void* workspace, size_t workspace_bytes, bool fast_accumulation,
                   Timer& timer) {
  GemmTime result;
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t la = nullptr, lb = nullptr, ld = nullptr;
  cublasLtMatmulPreference_t preference = nullptr;
  auto ok = [&](cublasStatus_t status, const char* what) {
    if (status == CUBLAS_STATUS_SUCCESS) return true;
    if (result.error.empty())
      result.error = std::string(what) + ": " + cublasLtGetStatusString(status);
    return false;
  };
  const cublasOperation_t transpose = CUBLAS_OP_T, none = CUBLAS_OP_N;
  const int8_t fast = fast_accumulation ? 1 : 0;
  cublasLtMatmulHeuristicResult_t candidates[4] = {};
  int count = 0;
  if (ok(cublasLtMatmulDescCreate(&op, CUBLAS_COMPUTE_32F, CUDA_R_32F), "MatmulDescCreate") &&
      ok(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSA, &transpose,
                                        sizeof transpose),
         "TRANSA") &&
      ok(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSB, &none, sizeof none),
         "TRANSB") &&
      (type != CUDA_R_8F_E4M3 ||
       ok(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_FAST_ACCUM, &fast, sizeof fast),
          "FAST_ACCUM")) &&
      ok(cublasLtMatrixLayoutCreate(&la, type, n, n, n), "layout A") &&
      ok(cublasLtMatrixLayoutCreate(&lb, type, n, n, n), "layout B") &&
      ok(cublasLtMatrixLayoutCreate(&ld, CUDA_R_16BF, n, n, n), "layout D") &&
      ok(cublasLtMatmulPreferenceCreate(&preference), "PreferenceCreate") &&
      ok(cublasLtMatmulPreferenceSetAttribute(preference, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                              &workspace_bytes, sizeof workspace_bytes),
         "MAX_WORKSPACE_BYTES") &&
      ok(cublasLtMatmulAlgoGetHeuristic(lt, op, la, lb, ld, ld, preference, 4, candidates, &count),
         "AlgoGetHeuristic")) {
    if (count == 0) result.error = "AlgoGetHeuristic: no algorithm for this layout and types";
    const float alpha = 1.0f, beta = 0.0f;
    double best = 1e30;
    for (int c = 0; c < count; ++c) {
      if (candidates[c].state != CUBLAS_STATUS_SUCCESS) continue;
      auto gemm = [&] {
        return cublasLtMatmul(lt, op, &alpha, a, la, b, lb, &beta, d, ld, d, ld,
                              &candidates[c].algo, workspace, workspace_bytes, nullptr);
      };
      bool ran = true;
      for (int w = 0; w < 3 && ran; ++w) ran = ok(gemm(), "Matmul");
      check(cudaDeviceSynchronize(), "gemm warm-up");
      if (!ran) continue;
      std::vector<double> times;
      for (int rep = 0; rep < 10; ++rep) {
        timer.begin();
        gemm();
        times.push_back(timer.end_ms());
      }
      std::sort(times.begin(), times.end());
      ++result.algorithms;
      if (times.front() < best) {
        best = times.front();
        result.best_ms = times.front();
        result.median_ms = times[times.size() / 2];
      }
    }
    if (result.algorithms > 0) result.error.clear();
  }
  if (preference) cublasLtMatmulPreferenceDestroy(preference);
  if (ld) cublasLtMatrixLayoutDestroy(ld);
  if (lb) cublasLtMatrixLayoutDestroy(lb);
  if (la) cublasLtMatrixLayoutDestroy(la);
  if (op) cublasLtMatmulDescDestroy(op);
  if (result.algorithms == 0 && result.error.empty()) result.error = "no algorithm ran";
  return result;
}

// 16-byte copies, UNROLL independent loads in flight per thread before the stores.
template <int UNROLL>
__global__ void copy_kernel(const int4* __restrict__ src, int4* __restrict__ dst, int64_t n) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  for (; i + (UNROLL - 1) * stride < n; i += UNROLL * stride) {
    int4 v[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) v[u] = src[i + u * stride];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) dst[i + u * stride] = v[u];
  }
  for (; i < n; i += stride) dst[i] = src[i];
}

// Best of 10 timed runs after 2 warm-ups, in ms.
template <typename F>
double best_ms(Timer& timer, F&& run) {
  for (int w = 0; w < 2; ++w) run();
  check(cudaDeviceSynchronize(), "warm-up");
  double best = 1e30;
  for (int rep = 0; rep < 10; ++rep) {
    timer.begin();
    run();
    best = std::min(best, timer.end_ms());
  }
  return best;
}

void measure_ceilings(Timer& timer) {
  cudaDeviceProp prop;
  check(cudaGetDeviceProperties(&prop, 0), "cudaGetDeviceProperties");
  std::printf("{\"bench\":\"device\",\"name\":\"%s\",\"sms\":%d,\"l2_mb\":%.1f}\n", prop.name,
              prop.multiProcessorCount, prop.l2CacheSize / 1048576.0);

  // GEMMs, 8192^3 on random data (the indexer's distributions: bf16 uniform(-1, 1), e4m3 codes
  // of 448 * uniform(-1, 1)).
  const int n = 8192;
  const double flops = 2.0 * n * n * double(n);
  const size_t workspace_bytes = size_t(64) << 20;
  auto* a = device_alloc<__nv_bfloat16>(size_t(n) * n);
  auto* b = device_alloc<__nv_bfloat16>(size_t(n) * n);
  auto* a8 = device_alloc<uint8_t>(size_t(n) * n);
  auto* b8 = device_alloc<uint8_t>(size_t(n) * n);
  auto* d = device_alloc<__nv_bfloat16>(size_t(n) * n);
  auto* workspace = device_alloc<uint8_t>(workspace_bytes);
  dsa::cuda::fill_bf16(a, int64_t(n) * n, 11, 1.0f);
  dsa::cuda::fill_bf16(b, int64_t(n) * n, 12, 1.0f);
  dsa::cuda::fill_e4m3(a8, int64_t(n) * n, 13, 448.0f);
  dsa::cuda::fill_e4m3(b8, int64_t(n) * n, 14, 448.0f);
  check(cudaDeviceSynchronize(), "fill");
  cublasLtHandle_t lt = nullptr;
  const cublasStatus_t created = cublasLtCreate(&lt);
  auto emit = [&](const char* what, const GemmTime& t, const char* extra) {
    if (!t.error.empty()) {
      std::printf("{\"bench\":\"%s\",\"L\":%d,\"error\":\"%s\"}\n", what, n, t.error.c_str());
      std::fprintf(stderr, "%s: cuBLASLt failed: %s\n", what, t.error.c_str());
      return 0.0;
    }
    const double tflops = flops / (t.best_ms * 1e-3) / 1e12;
    std::printf(
        "{\"bench\":\"%s\",\"L\":%d,\"ms\":%.3f,\"tflops\":%.1f,\"median_ms\":%.3f,"
        "\"median_tflops\":%.1f,\"algorithms\":%d%s}\n",
        what, n, t.best_ms, tflops, t.median_ms, flops / (t.median_ms * 1e-3) / 1e12, t.algorithms,
        extra);
    rows.push_back({what, n, t.best_ms, tflops, "TFLOP/s", NAN});
    return tflops;
  };
  if (created != CUBLAS_STATUS_SUCCESS) {
    std::printf("{\"bench\":\"ceiling_bf16_gemm\",\"error\":\"cublasLtCreate: %s\"}\n",
                cublasLtGetStatusString(created));
    std::printf("{\"bench\":\"ceiling_fp8_gemm\",\"error\":\"cublasLtCreate: %s\"}\n",
                cublasLtGetStatusString(created));
  } else {
    ceilings.bf16_tflops =
        emit("ceiling_bf16_gemm",
             time_gemm(lt, CUDA_R_16BF, n, a, b, d, workspace, workspace_bytes, false, timer), "");
    // The fp8 ceiling is cuBLASLt's default mode (partial sums promoted to f32 periodically, as
    // torch._scaled_mm's default and bench/torch_baselines.py's); its fast accumulation is
    // reported beside it, not used as the ceiling.
    ceilings.fp8_tflops =
        emit("ceiling_fp8_gemm",
             time_gemm(lt, CUDA_R_8F_E4M3, n, a8, b8, d, workspace, workspace_bytes, false, timer),
             ",\"fast_accumulation\":false");
    emit("fp8_gemm_fast_accumulation",
         time_gemm(lt, CUDA_R_8F_E4M3, n, a8, b8, d, workspace, workspace_bytes, true, timer),
         ",\"fast_accumulation\":true");
    cublasLtDestroy(lt);
  }
  cudaFree(a), cudaFree(b), cudaFree(a8), cudaFree(b8), cudaFree(d), cudaFree(workspace);
  // The f32 GEMM (cublasSgemm, no TF32): the ceiling of V4's compressor projections, which the
  // released code computes in f32.
  {
    auto* fa = device_alloc<float>(size_t(n) * n);
    auto* fb = device_alloc<float>(size_t(n) * n);
    auto* fd = device_alloc<float>(size_t(n) * n);
    dsa::cuda::fill_f32(fa, int64_t(n) * n, 0.5f);
    dsa::cuda::fill_f32(fb, int64_t(n) * n, 0.25f);
    cublasHandle_t blas = nullptr;
    if (cublasCreate(&blas) == CUBLAS_STATUS_SUCCESS) {
      const float one = 1.0f, zero = 0.0f;
      const double ms = best_ms(timer, [&] {
        cublasSgemm(blas, CUBLAS_OP_T, CUBLAS_OP_N, n, n, n, &one, fa, n, fb, n, &zero, fd, n);
      });
      ceilings.f32_tflops = flops / (ms * 1e-3) / 1e12;
      std::printf("{\"bench\":\"ceiling_f32_gemm\",\"L\":%d,\"ms\":%.3f,\"tflops\":%.1f}\n", n, ms,
                  ceilings.f32_tflops);
      rows.push_back({"ceiling_f32_gemm", n, ms, ceilings.f32_tflops, "TFLOP/s", NAN});
      cublasDestroy(blas);
    } else {
      std::printf("{\"bench\":\"ceiling_f32_gemm\",\"error\":\"cublasCreate\"}\n");
    }
    cudaFree(fa), cudaFree(fb), cudaFree(fd);
  }

  // Copy: 2 GiB device to device, counting bytes read + bytes written; the higher of
  // cudaMemcpyAsync and a 16-byte copy kernel (persistent grid, or one pass of 4 per thread).
  const size_t bytes = size_t(2) << 30;
  auto* src = device_alloc<uint8_t>(bytes);
  auto* dst = device_alloc<uint8_t>(bytes);
  dsa::cuda::fill_e4m3(src, int64_t(bytes), 15, 448.0f);
  check(cudaDeviceSynchronize(), "fill");
  const double memcpy_ms = best_ms(timer, [&] {
    check(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice), "cudaMemcpyAsync");
  });
  const int64_t vectors = int64_t(bytes / sizeof(int4));
  const auto* s4 = reinterpret_cast<const int4*>(src);
  auto* d4 = reinterpret_cast<int4*>(dst);
  const double persistent_ms = best_ms(
      timer, [&] { copy_kernel<4><<<prop.multiProcessorCount * 8, 256>>>(s4, d4, vectors); });
  const double one_pass_ms = best_ms(timer, [&] {
    copy_kernel<4><<<static_cast<int>(vectors / (256 * 4)), 256>>>(s4, d4, vectors);
  });
  check(cudaGetLastError(), "copy kernel");
  std::vector<uint8_t> probe(4096), expected(4096);
  check(cudaMemcpy(probe.data(), dst + bytes - 4096, 4096, cudaMemcpyDeviceToHost), "copy");
  check(cudaMemcpy(expected.data(), src + bytes - 4096, 4096, cudaMemcpyDeviceToHost), "copy");
  cudaFree(src), cudaFree(dst);
  const double moved = 2.0 * bytes;
  const double memcpy_tb_s = moved / (memcpy_ms * 1e-3) / 1e12;
  const double kernel_ms = std::min(persistent_ms, one_pass_ms);
  const double kernel_tb_s = moved / (kernel_ms * 1e-3) / 1e12;
  const double copy_ms = std::min(memcpy_ms, kernel_ms);
  ceilings.copy_tb_s = std::max(memcpy_tb_s, kernel_tb_s);
  std::printf(
      "{\"bench\":\"ceiling_copy\",\"bytes\":%.0f,\"ms\":%.3f,\"tb_s\":%.3f,"
      "\"memcpy_tb_s\":%.3f,\"kernel_tb_s\":%.3f,\"kernel_persistent_ms\":%.3f,"
      "\"kernel_one_pass_ms\":%.3f,\"copied\":%s}\n",
      moved, copy_ms, ceilings.copy_tb_s, memcpy_tb_s, kernel_tb_s, persistent_ms, one_pass_ms,
      probe == expected ? "true" : "false");
  std::fflush(stdout);
  rows.push_back({"ceiling_copy", 0, copy_ms, ceilings.copy_tb_s, "TB/s", NAN});
}

void print_table() {
  std::fprintf(stderr, "\n%-30s %7s %10s %10s %-8s %9s\n", "kernel", "L", "ms", "rate", "unit",
               "fraction");
  for (const Row& r : rows) {
    char fraction[32] = "-";
    if (std::isfinite(r.fraction))
      std::snprintf(fraction, sizeof fraction, "%.1f %%", 100 * r.fraction);
    char rate[32] = "-";
    if (r.rate > 0) std::snprintf(rate, sizeof rate, r.unit[1] == 'B' ? "%.3f" : "%.1f", r.rate);
    std::fprintf(stderr, "%-30s %7lld %10.3f %10s %-8s %9s\n", r.bench.c_str(),
                 static_cast<long long>(r.L), r.ms, rate, r.unit, fraction);
  }
  for (const std::string& note : table_notes) std::fprintf(stderr, "%s\n", note.c_str());
  std::fprintf(
      stderr, "ceilings: bf16 GEMM %.1f, fp8 GEMM %.1f TFLOP/s, copy %.3f TB/s (0: not measured)\n",
      ceilings.bf16_tflops, ceilings.fp8_tflops, ceilings.copy_tb_s);
}

// ---- DeepSeek-V4 ------------------------------------------------------------------------------
// V4's attention layers (../shared/V4.md, DESIGN.md section 6): CSA (ratio 4: the indexer's 64
// heads x 128 over the compressed keys, its top-k, then the attention over the 128-token window
// and the selected entries) and HCA (ratio 128: the window and every visible entry); K = V, 512
// dims, a sink per head. V4-Flash has 64 query heads and a top-512, V4-Pro 128 and a top-1024.
struct V4Layer {
  const char* name;
  int heads;
  int64_t ratio;
  int k;  // CSA's top-k (0: HCA)
};
constexpr V4Layer kV4Layers[] = {
    {"v4_flash_csa", 64, 4, 512}, {"v4_flash_hca", 64, 128, 0}, {"v4_pro_csa", 128, 4, 1024}};
constexpr int kV4Dim = 512, kV4Window = 128;
constexpr float kV4Scale = 0.0441942f;  // 512^-1/2

// Distinct visible entries per row of a CSA selection: row r (position first_position + r) sees
// floor((t + 1) / ratio); a stride walk over them from a row-dependent start, -1 past them.
__global__ void fill_entries(int32_t* idx, int rows, int k, int64_t first_position, int64_t ratio) {
  const int r = blockIdx.x;
  const int64_t visible = (first_position + r + 1) / ratio;
  const int64_t stride = visible % 7919 == 0 ? 7907 : 7919;  // prime, coprime with visible
  for (int j = threadIdx.x; j < k; j += blockDim.x) {
    idx[int64_t(r) * k + j] =
        j < visible ? static_cast<int32_t>((int64_t(j) * stride + r) % visible) : -1;
  }
}

// The entries a V4 query at t attends: its window and its compressed entries.
int64_t v4_entries(const V4Layer& layer, int64_t t) {
  const int64_t window = std::min<int64_t>(kV4Window, t + 1), visible = (t + 1) / layer.ratio;
  return window + (layer.k ? std::min<int64_t>(layer.k, visible) : visible);
}

dsa::cuda::AttentionParams v4_attention(const V4Layer& layer, const __nv_bfloat16* q,
                                        const __nv_bfloat16* kv, const __nv_bfloat16* cmp,
                                        const int32_t* sel, const float* sink, int rows, int64_t L,
                                        int64_t c0, float* out, float* lse) {
  auto p = attention(q, kv, layer.k ? sel : nullptr, layer.k, rows, layer.heads, kV4Dim, kV4Dim, L,
                     c0, kV4Scale, out, lse);
  p.compressed = cmp, p.window = kV4Window, p.ratio = layer.ratio, p.entries = L / layer.ratio;
  p.sink = sink;
  return p;
}

// What one L's V4 rows measured, for the table beside V3.2's layer.
struct V4Times {
  double compressor_ms[3] = {NAN, NAN, NAN};  // CSA main, CSA indexer, HCA
  double indexer_topk_ms[2] = {NAN, NAN};     // the faster of fused and unfused, top-512 and 1024
  double attention_ms[3] = {NAN, NAN, NAN};   // kV4Layers' order
  double flops[3] = {0, 0, 0};                // each layer's indexer and attention FLOPs
};

// The CSA indexer over L / 4 compressed keys for every query row, in chunks of rows, with the
// top-512 and the top-1024: unfused (the scores stored, then the top-k) and fused. The same
// e4m3 kernel as V3.2's; V4's FP4 values are exact in e4m3 (see DESIGN.md section 6).
void v4_indexer_rows(Timer& timer, int64_t L, V4Times& times) {
  const int HI = 64, DI = 128;
  const int64_t keys = L / 4;
  const int64_t chunk = std::min<int64_t>(L, (int64_t(4) << 30) / (std::max<int64_t>(keys, 1) * 4));
  CountingAllocator memory;
  auto* q8 = memory.alloc<uint8_t>(size_t(chunk) * HI * DI);
  auto* k8 = memory.alloc<uint8_t>(size_t(keys) * DI);
  auto* w = memory.alloc<float>(size_t(chunk) * HI);
  auto* ks = memory.alloc<float>(keys);
  auto* scores = memory.alloc<float>(size_t(chunk) * keys);
  auto* idx = memory.alloc<int32_t>(size_t(chunk) * 1024);
  auto* vals = memory.alloc<float>(size_t(chunk) * 1024);
  auto* idx_f = memory.alloc<int32_t>(size_t(chunk) * 1024);
  auto* vals_f = memory.alloc<float>(size_t(chunk) * 1024);
  auto* lists = memory.alloc<uint64_t>(size_t(dsa::cuda::indexer_topk_scratch(chunk, 1024)));
  dsa::cuda::fill_e4m3(q8, chunk * HI * DI, 11, 448.0f);
  dsa::cuda::fill_e4m3(k8, keys * DI, 12, 448.0f);
  dsa::cuda::fill_f32(w, chunk * HI, 1.0f / HI);
  dsa::cuda::fill_f32(ks, keys, 1.0f / (448.0f * 448.0f));
  check(cudaDeviceSynchronize(), "fill");
  double pairs = 0;  // sum over t of floor((t + 1) / 4)
  for (int64_t t = 0; t < L; ++t) pairs += double((t + 1) / 4);
  const double flops = 2.0 * pairs * HI * DI;
  double indexer_ms = 0, topk_ms[2] = {0, 0}, fused_ms[2] = {0, 0};
  bool equal[2] = {true, true};
  const int ks_[2] = {512, 1024};
  for (int64_t c0 = 0; c0 < L; c0 += chunk) {
    const int rows = static_cast<int>(std::min(chunk, L - c0));
    auto ip = indexer(q8, w, k8, ks, rows, HI, DI, keys, c0, scores);
    ip.ratio = 4;
    timer.begin();
    dsa::cuda::launch_indexer(ip);
    indexer_ms += timer.end_ms();
    for (int i = 0; i < 2; ++i) {
      auto tp = topk(scores, rows, keys, c0, ks_[i], idx, vals);
      tp.ratio = 4;
      timer.begin();
      dsa::cuda::launch_topk(tp);
      topk_ms[i] += timer.end_ms();
      auto fp = ip;
      fp.scores = nullptr;
      timer.begin();
      dsa::cuda::launch_indexer_topk(fp, fused_outputs(idx_f, vals_f, lists, ks_[i]));
      fused_ms[i] += timer.end_ms();
      if (c0 == 0 || c0 + rows == L) {  // the first chunk (padded rows) and the last
        equal[i] = equal[i] && same_on_device(idx, idx_f, size_t(rows) * ks_[i]) &&
                   same_on_device(vals, vals_f, size_t(rows) * ks_[i]);
      }
    }
  }
  const std::string peak = ",\"peak_device_bytes\":" + std::to_string(memory.peak());
  report("v4_indexer", L, indexer_ms, flops, ceilings.fp8_tflops, peak);
  const double causal = pairs;  // the scores the top-k reads: every visible key of every row
  for (int i = 0; i < 2; ++i) {
    const std::string k = std::to_string(ks_[i]);
    report_bytes(("v4_topk" + k).c_str(), L, topk_ms[i], 0, 4.0 * causal,
                 ",\"vs_indexer\":" + json_number(topk_ms[i] / indexer_ms, "%.4f"));
    report(("v4_indexer_topk" + k).c_str(), L, fused_ms[i], flops, ceilings.fp8_tflops,
           ",\"vs_indexer\":" + json_number(fused_ms[i] / indexer_ms, "%.4f") +
               ",\"vs_unfused\":" + json_number(fused_ms[i] / (indexer_ms + topk_ms[i]), "%.4f") +
               ",\"equals_unfused\":" + (equal[i] ? "true" : "false") + peak);
    times.indexer_topk_ms[i] = std::min(fused_ms[i], indexer_ms + topk_ms[i]);
  }
  times.flops[0] = times.flops[2] = flops;
}

// V4-Flash's three compressors over L tokens of x (D = 4096): CSA's main (ratio 4, overlap, d
// 512), CSA's indexer (ratio 4, d 128, Hadamard and e2m1) and HCA's (ratio 128, d 512), in chunks
// of 32768 tokens as the backend runs them: x generated per chunk (untimed), the two f32
// projections on cuBLAS (against the f32 GEMM ceiling), then the compressor kernel (its bytes:
// the projections read, ape, the entries written, against the copy ceiling).
void v4_compressor_rows(Timer& timer, int64_t L, V4Times& times) {
  struct Compressor {
    const char* name;
    int ratio, dim;
    bool indexer;
  };
  const Compressor compressors[3] = {{"v4_compressor_csa", 4, 512, false},
                                     {"v4_compressor_csa_indexer", 4, 128, true},
                                     {"v4_compressor_hca", 128, 512, false}};
  const int D = 4096;
  cublasHandle_t blas = nullptr;
  if (cublasCreate(&blas) != CUBLAS_STATUS_SUCCESS) return;
  for (int c = 0; c < 3; ++c) {
    const Compressor& k = compressors[c];
    const int m = k.ratio, d = k.dim, lead = m == 4 ? m : 0, width = (m == 4 ? 2 : 1) * d;
    const int64_t chunk = 32768 / m, entries = L / m;  // entries per chunk, in all
    CountingAllocator memory;
    auto* x = memory.alloc<float>(size_t(chunk * m + lead) * D);
    auto* wkv = memory.alloc<float>(size_t(width) * D);
    auto* wgate = memory.alloc<float>(size_t(width) * D);
    auto* kv = memory.alloc<float>(size_t(chunk * m + lead) * width);
    auto* score = memory.alloc<float>(size_t(chunk * m + lead) * width);
    auto* ape = memory.alloc<float>(size_t(m) * width);
    auto* norm = memory.alloc<float>(d);
    auto* frequencies = memory.alloc<float>(32);
    auto* out = memory.alloc<float>(size_t(chunk) * d);
    dsa::cuda::fill_f32(wkv, int64_t(width) * D, 1.0f / 64);
    dsa::cuda::fill_f32(wgate, int64_t(width) * D, 1.0f / 64);
    dsa::cuda::fill_f32(ape, int64_t(m) * width, 0.1f);
    dsa::cuda::fill_f32(norm, d, 1.0f);
    dsa::cuda::fill_f32(frequencies, 32, 1e-3f);
    double projection_ms = 0, kernel_ms = 0, projection_flops = 0, kernel_bytes = 0;
    for (int64_t j0 = 0; j0 < entries; j0 += chunk) {
      const int64_t j1 = std::min(entries, j0 + chunk);
      const int64_t t0 = std::max<int64_t>(0, m * j0 - lead), tokens = m * j1 - t0;
      dsa::cuda::fill_bf16_as_f32(x, tokens * D, 41 + static_cast<uint32_t>(j0 / chunk));
      check(cudaDeviceSynchronize(), "fill");
      const float one = 1.0f, zero = 0.0f;
      timer.begin();
      cublasSgemm(blas, CUBLAS_OP_T, CUBLAS_OP_N, width, static_cast<int>(tokens), D, &one, wkv, D,
                  x, D, &zero, kv, width);
      cublasSgemm(blas, CUBLAS_OP_T, CUBLAS_OP_N, width, static_cast<int>(tokens), D, &one, wgate,
                  D, x, D, &zero, score, width);
      projection_ms += timer.end_ms();
      projection_flops += 2.0 * 2.0 * double(tokens) * width * D;
      dsa::cuda::CompressorParams p;
      p.kv = kv, p.score = score, p.ape = ape, p.norm = norm, p.frequencies = frequencies;
      p.out = out, p.first_entry = j0, p.token0 = t0, p.entries = static_cast<int>(j1 - j0);
      p.ratio = m, p.dim = d, p.rope_dims = 64, p.overlap = m == 4, p.indexer = k.indexer;
      timer.begin();
      dsa::cuda::launch_compressor(p);
      kernel_ms += timer.end_ms();
      kernel_bytes += 2.0 * 4.0 * double(tokens) * width + 4.0 * double(j1 - j0) * d;
    }
    const std::string peak = ",\"peak_device_bytes\":" + std::to_string(memory.peak());
    report((std::string(k.name) + "_projection").c_str(), L, projection_ms, projection_flops,
           ceilings.f32_tflops, peak);
    report_bytes((std::string(k.name) + "_kernel").c_str(), L, kernel_ms, 0, kernel_bytes, peak);
    times.compressor_ms[c] = projection_ms + kernel_ms;
  }
  cublasDestroy(blas);
}

// Each V4 layer's attention prefill: every query row of L in chunks, q generated per chunk on
// the device (untimed), the raw and compressed caches whole, CSA's selections generated.
void v4_attention_rows(Timer& timer, int64_t L, V4Times& times) {
  for (int l = 0; l < 3; ++l) {
    const V4Layer& layer = kV4Layers[l];
    const int64_t entries = L / layer.ratio;
    const int64_t chunk = std::min<int64_t>(L, layer.heads == 64 ? 16384 : 8192);
    CountingAllocator memory;
    auto* q = memory.alloc<__nv_bfloat16>(size_t(chunk) * layer.heads * kV4Dim);
    auto* kv = memory.alloc<__nv_bfloat16>(size_t(L) * kV4Dim);
    auto* cmp = memory.alloc<__nv_bfloat16>(size_t(std::max<int64_t>(entries, 1)) * kV4Dim);
    auto* sel = memory.alloc<int32_t>(size_t(chunk) * std::max(layer.k, 1));
    auto* sink = memory.alloc<float>(layer.heads);
    auto* out = memory.alloc<float>(size_t(chunk) * layer.heads * kV4Dim);
    auto* lse = memory.alloc<float>(size_t(chunk) * layer.heads);
    // The same rows in V4's fp8 cache (584 bytes each), for the second timing of each chunk.
    auto* kv8 = memory.alloc<uint8_t>(size_t(L) * 584);
    auto* cmp8 = memory.alloc<uint8_t>(size_t(std::max<int64_t>(entries, 1)) * 584);
    dsa::cuda::fill_bf16(kv, L * kV4Dim, 21, 1.0f);
    dsa::cuda::fill_bf16(cmp, entries * kV4Dim, 22, 1.0f);
    dsa::cuda::fill_v4_fp8_cache(kv8, L, 21);
    dsa::cuda::fill_v4_fp8_cache(cmp8, entries, 22);
    dsa::cuda::fill_f32(sink, layer.heads, 0.5f);
    double ms = 0, ms_fp8 = 0, flops = 0;
    for (int64_t c0 = 0; c0 < L; c0 += chunk) {
      const int rows = static_cast<int>(std::min(chunk, L - c0));
      dsa::cuda::fill_bf16(q, int64_t(rows) * layer.heads * kV4Dim,
                           23 + static_cast<uint32_t>(c0 / chunk), 0.1f);
      if (layer.k) fill_entries<<<rows, 256>>>(sel, rows, layer.k, c0, layer.ratio);
      check(cudaDeviceSynchronize(), "fill");
      auto p = v4_attention(layer, q, kv, cmp, sel, sink, rows, L, c0, out, lse);
      timer.begin();
      dsa::cuda::launch_compressed_attention(p);
      ms += timer.end_ms();
      p.kv = p.compressed = nullptr;
      p.kv_fp8 = kv8, p.compressed_fp8 = cmp8;
      timer.begin();
      dsa::cuda::launch_compressed_attention(p);
      ms_fp8 += timer.end_ms();
      for (int64_t r = 0; r < rows; ++r)
        flops += 2.0 * layer.heads * (2 * kV4Dim) * double(v4_entries(layer, c0 + r));
    }
    report((std::string(layer.name) + "_attention").c_str(), L, ms, flops, ceilings.bf16_tflops,
           ",\"peak_device_bytes\":" + std::to_string(memory.peak()));
    report((std::string(layer.name) + "_attention_fp8_cache").c_str(), L, ms_fp8, flops,
           ceilings.bf16_tflops);
    times.attention_ms[l] = ms;
    times.flops[l] += flops;
  }
}

// A whole V4-Flash CSA layer's attention chained over chunks of query rows, as a prefill that
// arrives in chunks computes it: per chunk of C rows at positions c0 .. c0 + C - 1, the two
// compressors make the entries the chunk completes (the tokens from c0 - 4 on: x's projections
// on cuBLAS, then the compressor kernel writing the caches the next kernels read: the main
// entries in bf16, the indexer's keys as e4m3 codes of a power-of-two scale), the indexer and its
// top-512 over the entries visible so far (fused where indexer_topk_preferred says, as the
// backend chooses), then the attention over each row's window and selection. x, the raw-token kv
// of the chunk (its projection is not built), and the queries are generated per chunk, untimed.
// Only the caches are whole-L buffers; the f32 scores of a chunk are at most 4 GiB. Checks: the
// first chunk's indexer keys equal the compressor's f32 values (codes x scale), and the first and
// last chunks' selections are distinct visible entries.
void v4_csa_chain(Timer& timer, int64_t L, double v32_ms) {
  const V4Layer& layer = kV4Layers[0];
  const int D = 4096, HI = 64, DI = 128, K = layer.k;
  const int64_t entries = L / 4;
  const int64_t C = std::clamp<int64_t>((int64_t(4) << 30) / (std::max<int64_t>(entries, 1) * 4), 4,
                                        std::min<int64_t>(L, 16384)) /
                    4 * 4;
  cublasHandle_t blas = nullptr;
  if (cublasCreate(&blas) != CUBLAS_STATUS_SUCCESS) return;
  CountingAllocator memory;
  auto* x = memory.alloc<float>(size_t(C + 4) * D);
  auto* wkv = memory.alloc<float>(size_t(2 * kV4Dim) * D);
  auto* wgate = memory.alloc<float>(size_t(2 * kV4Dim) * D);
  auto* wkv_i = memory.alloc<float>(size_t(2 * DI) * D);
  auto* wgate_i = memory.alloc<float>(size_t(2 * DI) * D);
  auto* ape = memory.alloc<float>(size_t(4) * 2 * kV4Dim);
  auto* norm = memory.alloc<float>(kV4Dim);
  auto* frequencies = memory.alloc<float>(32);
  auto* kv_proj = memory.alloc<float>(size_t(C + 4) * 2 * kV4Dim);
  auto* score_proj = memory.alloc<float>(size_t(C + 4) * 2 * kV4Dim);
  auto* check_f32 = memory.alloc<float>(size_t(C / 4) * DI);
  auto* c4 = memory.alloc<__nv_bfloat16>(size_t(std::max<int64_t>(entries, 1)) * kV4Dim);
  auto* k8 = memory.alloc<uint8_t>(size_t(std::max<int64_t>(entries, 1)) * DI);
  auto* ks = memory.alloc<float>(std::max<int64_t>(entries, 1));
  auto* kv = memory.alloc<__nv_bfloat16>(size_t(L) * kV4Dim);
  auto* q8 = memory.alloc<uint8_t>(size_t(C) * HI * DI);
  auto* w = memory.alloc<float>(size_t(C) * HI);
  auto* scores = memory.alloc<float>(size_t(C) * std::max<int64_t>(entries, 1));
  auto* idx = memory.alloc<int32_t>(size_t(C) * K);
  auto* vals = memory.alloc<float>(size_t(C) * K);
  auto* lists = memory.alloc<uint64_t>(size_t(dsa::cuda::indexer_topk_scratch(C, K)));
  auto* q = memory.alloc<__nv_bfloat16>(size_t(C) * layer.heads * kV4Dim);
  auto* sink = memory.alloc<float>(layer.heads);
  auto* out = memory.alloc<float>(size_t(C) * layer.heads * kV4Dim);
  auto* lse = memory.alloc<float>(size_t(C) * layer.heads);
  dsa::cuda::fill_f32(wkv, int64_t(2 * kV4Dim) * D, 1.0f / 64);
  dsa::cuda::fill_f32(wgate, int64_t(2 * kV4Dim) * D, 1.0f / 64);
  dsa::cuda::fill_f32(wkv_i, int64_t(2 * DI) * D, 1.0f / 64);
  dsa::cuda::fill_f32(wgate_i, int64_t(2 * DI) * D, 1.0f / 64);
  dsa::cuda::fill_f32(ape, int64_t(4) * 2 * kV4Dim, 0.1f);
  dsa::cuda::fill_f32(norm, kV4Dim, 1.0f);
  dsa::cuda::fill_f32(frequencies, 32, 1e-3f);
  dsa::cuda::fill_f32(w, C * HI, 1.0f / HI);
  dsa::cuda::fill_f32(sink, layer.heads, 0.5f);
  check(cudaDeviceSynchronize(), "fill");
  double stage_ms[4] = {0, 0, 0, 0};  // compressors, indexer (and top-k), top-k, attention
  bool keys_exact = true, valid = true;
  int fused_chunks = 0;
  const float one = 1.0f, zero = 0.0f;
  for (int64_t c0 = 0; c0 < L; c0 += C) {
    const int rows = static_cast<int>(std::min(C, L - c0));
    const int64_t j0 = c0 / 4, j1 = (c0 + rows) / 4;  // the entries this chunk completes
    const int64_t t0 = std::max<int64_t>(0, 4 * j0 - 4), tokens = 4 * j1 - t0;
    const uint32_t seed = 60 + 4 * static_cast<uint32_t>(c0 / C);
    dsa::cuda::fill_bf16_as_f32(x, tokens * D, seed);
    dsa::cuda::fill_bf16(kv + size_t(c0) * kV4Dim, int64_t(rows) * kV4Dim, seed + 1, 1.0f);
    dsa::cuda::fill_bf16(q, int64_t(rows) * layer.heads * kV4Dim, seed + 2, 0.1f);
    dsa::cuda::fill_e4m3(q8, int64_t(rows) * HI * DI, seed + 3, 448.0f);
    check(cudaDeviceSynchronize(), "fill");
    timer.begin();
    if (j1 > j0) {
      for (int c = 0; c < 2; ++c) {  // the main compressor, then the indexer's
        const int d = c == 0 ? kV4Dim : DI, width = 2 * d;
        cublasSgemm(blas, CUBLAS_OP_T, CUBLAS_OP_N, width, static_cast<int>(tokens), D, &one,
                    c == 0 ? wkv : wkv_i, D, x, D, &zero, kv_proj, width);
        cublasSgemm(blas, CUBLAS_OP_T, CUBLAS_OP_N, width, static_cast<int>(tokens), D, &one,
                    c == 0 ? wgate : wgate_i, D, x, D, &zero, score_proj, width);
        dsa::cuda::CompressorParams p;
        p.kv = kv_proj, p.score = score_proj, p.ape = ape, p.norm = norm;
        p.frequencies = frequencies, p.first_entry = j0, p.token0 = t0;
        p.entries = static_cast<int>(j1 - j0), p.ratio = 4, p.dim = d, p.rope_dims = 64;
        p.overlap = true, p.indexer = c == 1;
        if (c == 0) {
          p.out_bf16 = c4 + size_t(j0) * kV4Dim;
        } else {
          p.out_codes = k8 + size_t(j0) * DI, p.out_scales = ks + j0;
          if (c0 == 0) p.out = check_f32;
        }
        dsa::cuda::launch_compressor(p);
      }
    }
    stage_ms[0] += timer.end_ms();
    if (c0 == 0 && j1 > 0) {  // the indexer's keys hold the compressor's values exactly
      std::vector<float> values(size_t(j1) * DI), scales(j1);
      std::vector<uint8_t> codes(values.size());
      check(cudaMemcpy(values.data(), check_f32, values.size() * 4, cudaMemcpyDeviceToHost),
            "copy");
      check(cudaMemcpy(codes.data(), k8, codes.size(), cudaMemcpyDeviceToHost), "copy");
      check(cudaMemcpy(scales.data(), ks, scales.size() * 4, cudaMemcpyDeviceToHost), "copy");
      for (size_t i = 0; i < values.size(); ++i) {
        const __nv_fp8_e4m3 code = *reinterpret_cast<const __nv_fp8_e4m3*>(&codes[i]);
        keys_exact = keys_exact && float(code) * scales[i / DI] == values[i];
      }
    }
    const int64_t keys = j1;  // the entries the chunk's last row sees
    auto ip = indexer(q8, w, k8, ks, rows, HI, DI, keys, c0, scores);
    ip.ratio = 4;
    if (dsa::cuda::indexer_topk_preferred(rows, keys)) {
      ++fused_chunks;
      ip.scores = nullptr;
      timer.begin();
      dsa::cuda::launch_indexer_topk(ip, fused_outputs(idx, vals, lists, K));
      stage_ms[1] += timer.end_ms();
    } else {
      timer.begin();
      dsa::cuda::launch_indexer(ip);
      stage_ms[1] += timer.end_ms();
      auto tp = topk(scores, rows, keys, c0, K, idx, vals);
      tp.ratio = 4;
      timer.begin();
      dsa::cuda::launch_topk(tp);
      stage_ms[2] += timer.end_ms();
    }
    if (c0 == 0 || c0 + rows == L) {
      std::vector<int32_t> selection(size_t(rows) * K);
      check(cudaMemcpy(selection.data(), idx, selection.size() * 4, cudaMemcpyDeviceToHost),
            "copy");
      for (int r = 0; r < rows && valid; ++r) {
        const int64_t visible = std::min<int64_t>(K, (c0 + r + 1) / 4);
        std::vector<int32_t> row(selection.begin() + int64_t(r) * K,
                                 selection.begin() + int64_t(r) * K + visible);
        for (const int32_t j : row) valid = valid && j >= 0 && j < (c0 + r + 1) / 4;
        std::sort(row.begin(), row.end());
        valid = valid && std::adjacent_find(row.begin(), row.end()) == row.end();
        for (int64_t i = visible; i < K; ++i) valid = valid && selection[int64_t(r) * K + i] == -1;
      }
    }
    timer.begin();
    dsa::cuda::launch_compressed_attention(
        v4_attention(layer, q, kv, c4, idx, sink, rows, L, c0, out, lse));
    stage_ms[3] += timer.end_ms();
  }
  cublasDestroy(blas);
  const double total = stage_ms[0] + stage_ms[1] + stage_ms[2] + stage_ms[3];
  char extra[640];
  std::snprintf(extra, sizeof extra,
                ",\"compressors_ms\":%.3f,\"indexer_ms\":%.3f,\"topk_ms\":%.3f,"
                "\"attention_ms\":%.3f,\"chunk_rows\":%lld,\"fused_chunks\":%d,"
                "\"peak_device_bytes\":%zu,\"keys_exact\":%s,\"indices_valid\":%s,"
                "\"v32_dsa_layer_ms\":%s,\"v32_over_v4\":%s",
                stage_ms[0], stage_ms[1], stage_ms[2], stage_ms[3], static_cast<long long>(C),
                fused_chunks, memory.peak(), keys_exact ? "true" : "false",
                valid ? "true" : "false", json_number(v32_ms, "%.3f").c_str(),
                json_number(v32_ms / total, "%.3f").c_str());
  std::printf("{\"bench\":\"v4_flash_csa_layer_chained\",\"L\":%lld,\"ms\":%.3f%s}\n",
              static_cast<long long>(L), total, extra);
  std::fflush(stdout);
  rows.push_back({"v4_flash_csa_layer_chained", L, total, 0, "-", NAN});
  char note[256];
  std::snprintf(note, sizeof note,
                "v4_flash_csa_layer_chained L %lld: %lld-row chunks, buffers %.3f GiB at peak; "
                "V3.2 DSA layer %.1f ms, %.2fx",
                static_cast<long long>(L), static_cast<long long>(C), memory.peak() / 1073741824.0,
                v32_ms, v32_ms / total);
  table_notes.push_back(note);
}

// Each V4 layer's decode at batch 32, one query each at position L - 1: the CSA indexer over the
// sequences' L / 4 compressed keys and the top-k, then the attention with split decoding, best of
// 10. Memory-bound: the fewest bytes each stage moves, against the copy ceiling.
void v4_decode_rows(Timer& timer, int64_t L) {
  const int B = 32, HI = 64, DI = 128;
  const int64_t keys = L / 4, hca_entries = L / 128;
  CountingAllocator memory;
  auto* kv = memory.alloc<__nv_bfloat16>(size_t(B) * L * kV4Dim);
  auto* c4 = memory.alloc<__nv_bfloat16>(size_t(B) * keys * kV4Dim);
  auto* c128 = memory.alloc<__nv_bfloat16>(size_t(B) * std::max<int64_t>(hca_entries, 1) * kV4Dim);
  // The caches again in V4's fp8 format (584 bytes a row), for the fp8 decode rows.
  auto* kv8 = memory.alloc<uint8_t>(size_t(B) * L * 584);
  auto* c4_8 = memory.alloc<uint8_t>(size_t(B) * std::max<int64_t>(keys, 1) * 584);
  auto* c128_8 = memory.alloc<uint8_t>(size_t(B) * std::max<int64_t>(hca_entries, 1) * 584);
  auto* q8 = memory.alloc<uint8_t>(size_t(B) * HI * DI);
  auto* k8 = memory.alloc<uint8_t>(size_t(B) * keys * DI);
  auto* w = memory.alloc<float>(size_t(B) * HI);
  auto* ks = memory.alloc<float>(size_t(B) * keys);
  auto* scores = memory.alloc<float>(size_t(B) * keys);
  auto* idx = memory.alloc<int32_t>(size_t(B) * 1024);
  auto* vals = memory.alloc<float>(size_t(B) * 1024);
  auto* q = memory.alloc<__nv_bfloat16>(size_t(B) * 128 * kV4Dim);
  auto* sink = memory.alloc<float>(128);
  auto* out = memory.alloc<float>(size_t(B) * 128 * kV4Dim);
  auto* lse = memory.alloc<float>(size_t(B) * 128);
  dsa::cuda::fill_bf16(kv, B * L * kV4Dim, 31, 1.0f);
  dsa::cuda::fill_bf16(c4, B * keys * kV4Dim, 32, 1.0f);
  dsa::cuda::fill_bf16(c128, B * hca_entries * kV4Dim, 33, 1.0f);
  dsa::cuda::fill_v4_fp8_cache(kv8, B * L, 31);
  dsa::cuda::fill_v4_fp8_cache(c4_8, B * keys, 32);
  dsa::cuda::fill_v4_fp8_cache(c128_8, B * hca_entries, 33);
  dsa::cuda::fill_bf16(q, B * 128 * kV4Dim, 34, 0.1f);
  dsa::cuda::fill_e4m3(q8, B * HI * DI, 35, 448.0f);
  dsa::cuda::fill_e4m3(k8, B * keys * DI, 36, 448.0f);
  dsa::cuda::fill_f32(w, B * HI, 1.0f / HI);
  dsa::cuda::fill_f32(ks, B * keys, 1.0f);
  dsa::cuda::fill_f32(sink, 128, 0.5f);
  check(cudaDeviceSynchronize(), "fill");
  auto ib = indexer(q8, w, k8, ks, 1, HI, DI, keys, L - 1, scores);
  ib.ratio = 4, ib.sequences = B;
  ib.q_step = int64_t(HI) * DI, ib.w_step = HI, ib.k_step = keys * DI, ib.k_scale_step = keys;
  ib.scores_step = keys;
  const double indexer_ms = best_ms(timer, [&] { dsa::cuda::launch_indexer(ib); });
  const double indexer_bytes = double(B) * (HI * DI + HI * 4.0 + keys * (DI + 4.0) + keys * 4.0);
  report_bytes("v4_decode_b32_indexer", L, indexer_ms, 2.0 * B * keys * HI * DI, indexer_bytes);
  for (const V4Layer& layer : kV4Layers) {
    double topk_ms = 0, topk_bytes = 0;
    if (layer.k) {
      // The batch's rows side by side, each its sequence's scores: a row r at L - 1 + r would
      // see (L + r) / 4 keys, clamped to the sequence's L / 4, so every row sees all of them,
      // as one row at L - 1 does (V3.2's decode row does the same).
      auto tp = topk(scores, B, keys, L - 1, layer.k, idx, vals);
      tp.ratio = 4;
      topk_ms = best_ms(timer, [&] { dsa::cuda::launch_topk(tp); });
      topk_bytes = double(B) * keys * 4.0;  // the attention then reads the top-k's selections
    }
    auto ab =
        v4_attention(layer, q, kv, layer.ratio == 4 ? c4 : c128, idx, sink, 1, L, L - 1, out, lse);
    ab.sequences = B;
    ab.q_step = int64_t(layer.heads) * kV4Dim, ab.kv_step = L * kV4Dim;
    ab.compressed_step = (L / layer.ratio) * kV4Dim, ab.indices_step = layer.k;
    ab.out_step = int64_t(layer.heads) * kV4Dim, ab.lse_step = layer.heads;
    auto most = ab;  // the sweep's largest split count sizes the scratch
    most.splits = dsa::cuda::kMaxSplits;
    float* partial = memory.alloc<float>(
        size_t(std::max<int64_t>(1, dsa::cuda::attention_partial_floats(most))));
    ab.partial = partial;
    const double attention_ms = best_ms(timer, [&] { dsa::cuda::launch_compressed_attention(ab); });
    // The split count swept, for the rule's tuning: the best count and its time.
    int best_splits = 0;
    double best_split_ms = 1e30;
    for (const int splits : {1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32}) {
      auto swept = ab;
      swept.splits = splits;
      if (dsa::cuda::attention_splits(swept) != splits) continue;  // more than the row's tiles
      const double ms = best_ms(timer, [&] { dsa::cuda::launch_compressed_attention(swept); });
      std::printf(
          "{\"bench\":\"v4_decode_split_sweep\",\"layer\":\"%s\",\"L\":%lld,"
          "\"splits\":%d,\"ms\":%.4f}\n",
          layer.name, static_cast<long long>(L), splits, ms);
      if (ms < best_split_ms) best_split_ms = ms, best_splits = splits;
    }
    const double n = double(v4_entries(layer, L - 1));
    const double attention_bytes =
        double(B) * (n * kV4Dim * 2.0 + layer.heads * kV4Dim * 2.0 + layer.k * 4.0 +
                     layer.heads * kV4Dim * 4.0 + layer.heads * 4.0);
    const std::string name = std::string("v4_decode_b32_") + (layer.name + 3);
    report_bytes((name + "_attention").c_str(), L, attention_ms,
                 2.0 * B * n * layer.heads * 2 * kV4Dim, attention_bytes,
                 ",\"splits\":" + std::to_string(dsa::cuda::attention_splits(ab)) +
                     ",\"best_splits\":" + std::to_string(best_splits) +
                     ",\"best_splits_ms\":" + json_number(best_split_ms, "%.4f"));
    // From the fp8 caches: the same launch, 584 bytes an entry read instead of 1024.
    auto fp8 = ab;
    fp8.kv = fp8.compressed = nullptr;
    fp8.kv_fp8 = kv8, fp8.kv_fp8_step = L * 584;
    fp8.compressed_fp8 = layer.ratio == 4 ? c4_8 : c128_8;
    fp8.compressed_fp8_step = (L / layer.ratio) * 584;
    const double fp8_ms = best_ms(timer, [&] { dsa::cuda::launch_compressed_attention(fp8); });
    const double fp8_bytes = attention_bytes - double(B) * n * kV4Dim * 2.0 + double(B) * n * 584.0;
    report_bytes((name + "_attention_fp8_cache").c_str(), L, fp8_ms,
                 2.0 * B * n * layer.heads * 2 * kV4Dim, fp8_bytes,
                 ",\"splits\":" + std::to_string(dsa::cuda::attention_splits(fp8)));
    if (layer.k) {
      report_bytes((name + "_topk").c_str(), L, topk_ms, 0, topk_bytes);
      report_bytes(name.c_str(), L, indexer_ms + topk_ms + attention_ms, 0,
                   indexer_bytes + topk_bytes + attention_bytes,
                   ",\"peak_device_bytes\":" + std::to_string(memory.peak()));
    } else {
      report_bytes(name.c_str(), L, attention_ms, 0, attention_bytes,
                   ",\"peak_device_bytes\":" + std::to_string(memory.peak()));
    }
  }
}

}  // namespace

// One L's layers side by side: V3.2's DSA layer (dsa_prefill_chunked: indexer, top-k,
// attention) and V4's, the sum of its stages' rows (CSA: the main and the indexer compressors,
// the indexer and top-k the faster way, the attention; HCA: its compressor and the attention;
// V4-Pro's compressors timed at Flash's D = 4096, not Pro's 7168), their times and ratios, and
// the ratio of their indexer and attention FLOPs. Neither counts the q/kv projections.
void v4_beside_v32(int64_t L, const V4Times& v4, double v32_ms, double v32_flops) {
  const double csa_compressors = v4.compressor_ms[0] + v4.compressor_ms[1];
  const double flash_csa = csa_compressors + v4.indexer_topk_ms[0] + v4.attention_ms[0];
  const double pro_csa = csa_compressors + v4.indexer_topk_ms[1] + v4.attention_ms[2];
  const double flash_hca = v4.compressor_ms[2] + v4.attention_ms[1];
  std::printf(
      "{\"bench\":\"v4_beside_v32\",\"L\":%lld,\"v32_dsa_layer_ms\":%s,"
      "\"v4_flash_csa_layer_ms\":%.3f,\"v4_flash_hca_layer_ms\":%.3f,"
      "\"v4_pro_csa_layer_ms\":%.3f,\"v32_over_v4_flash_csa\":%s,"
      "\"v32_over_v4_flash_csa_flops\":%s,\"v32_over_v4_pro_csa\":%s}\n",
      static_cast<long long>(L), json_number(v32_ms, "%.3f").c_str(), flash_csa, flash_hca, pro_csa,
      json_number(v32_ms / flash_csa, "%.3f").c_str(),
      json_number(v32_flops > 0 ? v32_flops / v4.flops[0] : NAN, "%.3f").c_str(),
      json_number(v32_ms / pro_csa, "%.3f").c_str());
  std::fflush(stdout);
  char note[320];
  std::snprintf(
      note, sizeof note,
      "L %lld layers (ms): V3.2 DSA %.1f; V4-Flash CSA %.1f (%.2fx), HCA %.1f; V4-Pro CSA "
      "%.1f (%.2fx)",
      static_cast<long long>(L), v32_ms, flash_csa, v32_ms / flash_csa, flash_hca, pro_csa,
      v32_ms / pro_csa);
  table_notes.push_back(note);
}

int main(int argc, char** argv) {
  // Lengths, and --v4-only or --v32-only to run one generation's rows; --v4-attention, V4's
  // attention rows alone (prefill and decode: the kernel's, for iterating on it).
  std::vector<int64_t> lengths;
  bool run_v32 = true, run_v4 = true, v4_attention_only = false;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--v4-only") {
      run_v32 = false;
    } else if (arg == "--v4-attention") {
      run_v32 = false, v4_attention_only = true;
    } else if (arg == "--v32-only") {
      run_v4 = false;
    } else {
      lengths.push_back(std::atoll(argv[i]));
    }
  }
  if (lengths.empty()) lengths = {32768, 131072};
  const int HI = 64, DI = 128, H = 128, DQK = 576, DV = 512, K = 2048;
  Timer timer;
  measure_ceilings(timer);
  for (int64_t L : lengths) {
    double v32_layer_ms = NAN, v32_flops = 0;  // the chained prefill's, for V4's table
    if (run_v32) {
      // Indexer (fp8, and bf16 for the ratio at the first length) + top-k over every query row,
      // in chunks of rows (4 GiB of f32 scores: 1024 rows at 1M).
      const int64_t chunk = std::min<int64_t>(L, (int64_t(4) << 30) / (L * 4));
      // The bf16 indexer is there for its ratio to the fp8 one, which the first length gives; past
      // 131072 it is skipped even there: its time grows as L^2 (64 times 128K's at 1M) for a ratio
      // that the shorter lengths already show, and its bf16 keys and queries would be held besides.
      const bool bf16_indexer = L == lengths.front() && L <= 131072;
      __nv_bfloat16 *q = nullptr, *k = nullptr;
      if (bf16_indexer) {
        q = device_alloc<__nv_bfloat16>(size_t(chunk) * HI * DI);
        k = device_alloc<__nv_bfloat16>(size_t(L) * DI);
        dsa::cuda::fill_bf16(q, chunk * HI * DI, 1, 1.0f);
        dsa::cuda::fill_bf16(k, L * DI, 2, 1.0f);
      }
      auto* q8 = device_alloc<uint8_t>(size_t(chunk) * HI * DI);
      auto* k8 = device_alloc<uint8_t>(size_t(L) * DI);
      auto* w = device_alloc<float>(size_t(chunk) * HI);
      auto* ks = device_alloc<float>(L);
      auto* scores = device_alloc<float>(size_t(chunk) * L);
      auto* idx = device_alloc<int32_t>(size_t(chunk) * K);
      auto* vals = device_alloc<float>(size_t(chunk) * K);
      dsa::cuda::fill_e4m3(q8, chunk * HI * DI, 1, 448.0f);
      dsa::cuda::fill_e4m3(k8, L * DI, 2, 448.0f);
      dsa::cuda::fill_f32(w, chunk * HI, 1.0f / HI);
      dsa::cuda::fill_f32(ks, L, 1.0f / (448.0f * 448.0f));
      check(cudaDeviceSynchronize(), "fill");
      const double causal_pairs = double(L) * double(L + 1) / 2;
      if (bf16_indexer) {
        double bf16_ms = 0;
        for (int64_t c0 = 0; c0 < L; c0 += chunk) {
          const int rows = static_cast<int>(std::min(chunk, L - c0));
          timer.begin();
          dsa::cuda::launch_indexer(indexer(q, w, k, ks, rows, HI, DI, L, c0, scores));
          bf16_ms += timer.end_ms();
        }
        report("indexer_bf16", L, bf16_ms, 2.0 * causal_pairs * HI * DI, ceilings.bf16_tflops);
      }
      double indexer_ms = 0, topk_ms = 0;
      for (int64_t c0 = 0; c0 < L; c0 += chunk) {
        const int rows = static_cast<int>(std::min(chunk, L - c0));
        timer.begin();
        dsa::cuda::launch_indexer(indexer(q8, w, k8, ks, rows, HI, DI, L, c0, scores));
        indexer_ms += timer.end_ms();
        timer.begin();
        dsa::cuda::launch_topk(topk(scores, rows, L, c0, K, idx, vals));
        topk_ms += timer.end_ms();
      }
      const double indexer_flops = 2.0 * causal_pairs * HI * DI;
      report("indexer", L, indexer_ms, indexer_flops, ceilings.fp8_tflops);
      // Top-k bytes: the f32 scores each row reads, 4 B x (c0 + r + 1) visible keys, so 4 B x
      // L (L + 1) / 2 in all; the selections written (8 B x k per row: 25 % more at 32K, 6 % at
      // 128K) are not counted. vs_indexer: top-k time over the indexer's (issue 16's fused target:
      // <= 0.05).
      const double topk_bytes = 4.0 * causal_pairs;
      report_bytes("topk", L, topk_ms, 0, topk_bytes,
                   ",\"vs_indexer\":" + json_number(topk_ms / indexer_ms, "%.4f"));
      // The indexer with the top-k fused (the scores never stored) over the same chunks: its time
      // over the indexer's alone (issue 16's target: <= 1.05 at 128K), and whether its selection
      // of the last chunk is the unfused top-k's, which idx and vals still hold.
      {
        auto* lists = device_alloc<uint64_t>(size_t(dsa::cuda::indexer_topk_scratch(chunk, K)));
        auto* idx_f = device_alloc<int32_t>(size_t(chunk) * K);
        auto* vals_f = device_alloc<float>(size_t(chunk) * K);
        double fused_ms = 0;
        int last_rows = 0;
        for (int64_t c0 = 0; c0 < L; c0 += chunk) {
          last_rows = static_cast<int>(std::min(chunk, L - c0));
          timer.begin();
          dsa::cuda::launch_indexer_topk(indexer(q8, w, k8, ks, last_rows, HI, DI, L, c0, nullptr),
                                         fused_outputs(idx_f, vals_f, lists, K));
          fused_ms += timer.end_ms();
        }
        const bool equal = same_on_device(idx, idx_f, size_t(last_rows) * K) &&
                           same_on_device(vals, vals_f, size_t(last_rows) * K);
        report("indexer_topk", L, fused_ms, indexer_flops, ceilings.fp8_tflops,
               ",\"vs_indexer\":" + json_number(fused_ms / indexer_ms, "%.4f") +
                   ",\"vs_unfused\":" + json_number(fused_ms / (indexer_ms + topk_ms), "%.4f") +
                   ",\"equals_unfused\":" + (equal ? "true" : "false"));
        cudaFree(lists), cudaFree(idx_f), cudaFree(vals_f);
      }
      cudaFree(q), cudaFree(w), cudaFree(scores), cudaFree(idx), cudaFree(vals), cudaFree(k),
          cudaFree(ks), cudaFree(q8), cudaFree(k8);

      // Sparse MQA attention over K selected entries per row.
      const int64_t attn_chunk = std::min<int64_t>(L, 16384);
      auto* qa = device_alloc<__nv_bfloat16>(size_t(attn_chunk) * H * DQK);
      auto* kv = device_alloc<__nv_bfloat16>(size_t(L) * DQK);
      auto* sel = device_alloc<int32_t>(size_t(attn_chunk) * K);
      auto* out = device_alloc<float>(size_t(attn_chunk) * H * DV);
      auto* lse = device_alloc<float>(size_t(attn_chunk) * H);
      dsa::cuda::fill_bf16(qa, attn_chunk * H * DQK, 3, 0.1f);
      dsa::cuda::fill_bf16(kv, L * DQK, 4, 1.0f);
      double attn_ms = 0, attn_flops = 0;
      for (int64_t c0 = 0; c0 < L; c0 += attn_chunk) {
        const int rows = static_cast<int>(std::min(attn_chunk, L - c0));
        fill_indices<<<rows, 256>>>(sel, rows, K, c0);
        check(cudaDeviceSynchronize(), "fill indices");
        timer.begin();
        dsa::cuda::launch_attention(
            attention(qa, kv, sel, K, rows, H, DQK, DV, L, c0, 0.0417f, out, lse));
        attn_ms += timer.end_ms();
        for (int64_t r = 0; r < rows; ++r)
          attn_flops += 2.0 * H * (DQK + DV) * double(std::min<int64_t>(K, c0 + r + 1));
      }
      report("sparse_attention", L, attn_ms, attn_flops, ceilings.bf16_tflops);
      // The same rows over FlashMLA's fp8 cache (the kernel dequantizes each tile into bf16):
      // the same FLOPs, and its time beside the bf16 cache's.
      {
        auto* kv8 = device_alloc<uint8_t>(size_t(L) * 656);
        dsa::cuda::fill_fp8_cache(kv8, L, 9);
        double fp8_ms = 0;
        for (int64_t c0 = 0; c0 < L; c0 += attn_chunk) {
          const int rows = static_cast<int>(std::min(attn_chunk, L - c0));
          fill_indices<<<rows, 256>>>(sel, rows, K, c0);
          check(cudaDeviceSynchronize(), "fill indices");
          auto p = attention(qa, nullptr, sel, K, rows, H, DQK, DV, L, c0, 0.0417f, out, lse);
          p.kv_fp8 = kv8;
          timer.begin();
          dsa::cuda::launch_attention(p);
          fp8_ms += timer.end_ms();
        }
        report("sparse_attention_fp8_cache", L, fp8_ms, attn_flops, ceilings.bf16_tflops);
        cudaFree(kv8);
      }
      // The prefill's floor: the indexer at the fp8 ceiling, the top-k's bytes at the copy
      // ceiling and the attention at the bf16 ceiling.
      report_floor("dsa_prefill", L, indexer_ms + topk_ms + attn_ms,
                   floor_ms_flops(indexer_flops, ceilings.fp8_tflops) + floor_ms_bytes(topk_bytes) +
                       floor_ms_flops(attn_flops, ceilings.bf16_tflops));

      // dsa-compare's dense probabilities (the dense attention's lse is an input) over the last
      // 256 query rows, and the same rows' sparse attention on the wmma kernel (d_qk = d_v = 256).
      {
        const int rows = static_cast<int>(std::min<int64_t>(256, L));
        const int64_t c0 = L - rows;
        auto* partial = device_alloc<float>(size_t(2) * rows * L);
        dsa::cuda::fill_f32(lse, int64_t(rows) * H, 8.0f);
        check(cudaDeviceSynchronize(), "fill");
        timer.begin();
        dsa::cuda::DenseProbabilityParams dense;
        dense.q = qa, dense.kv = kv, dense.lse = lse, dense.partial = partial;
        dense.rows = rows, dense.heads = H, dense.d_qk = DQK;
        dense.first_position = c0, dense.stride = L, dense.scale = 0.0417f;
        dsa::cuda::launch_dense_probabilities(dense);
        const double dense_ms = timer.end_ms();
        double dense_pairs = 0;
        for (int r = 0; r < rows; ++r) dense_pairs += double(c0 + r + 1);
        report("dense_probabilities", L, dense_ms, 2.0 * H * DQK * dense_pairs,
               ceilings.bf16_tflops);
        fill_indices<<<rows, 256>>>(sel, rows, K, c0);
        check(cudaDeviceSynchronize(), "fill indices");
        const int d256 = 256;
        timer.begin();
        dsa::cuda::launch_attention(
            attention(qa, kv, sel, K, rows, H, d256, d256, L, c0, 0.0625f, out, lse));
        const double wmma_ms = timer.end_ms();
        report("sparse_attention_d256", L, wmma_ms, 2.0 * rows * H * (2 * d256 + d256) * K,
               ceilings.bf16_tflops);
        cudaFree(partial);
      }
      cudaFree(qa), cudaFree(kv), cudaFree(sel), cudaFree(out), cudaFree(lse);

      // The chained prefill: the query rows arrive in chunks of C, as in a chunked prefill, and
      // each chunk runs the fp8 indexer, the top-k of its scores, then the sparse attention of its
      // queries over the top-k's own indices. Only the keys are whole-L buffers (the fp8 indexer
      // keys and scales, the bf16 latent cache), which is what a real prefill holds; a chunk's
      // queries are generated on the device into chunk-sized buffers, untimed (the whole-L
      // attention queries would be 128 x 576 bf16 a row, 151 GB at 1M), and its f32 scores, C x L,
      // are at most 4 GiB (1024 rows at 1M: full waves of the top-k's 3 blocks per SM, where 512
      // rows took 1.6x as long): no buffer grows as L^2. The chunk's keys are the positions it
      // sees, [0, c0 + rows): the cache holds no more when the chunk arrives, so the indexer
      // neither reads nor writes (-inf) past them, which the indexer row above does up to L.
      {
        const int64_t used_before = device_used_bytes();
        const int64_t C =
            std::clamp<int64_t>((int64_t(4) << 30) / (L * 4), 1, std::min<int64_t>(L, 16384));
        CountingAllocator memory;
        auto* k8c = memory.alloc<uint8_t>(size_t(L) * DI);
        auto* ksc = memory.alloc<float>(L);
        auto* kvc = memory.alloc<__nv_bfloat16>(size_t(L) * DQK);
        auto* q8c = memory.alloc<uint8_t>(size_t(C) * HI * DI);
        auto* wc = memory.alloc<float>(size_t(C) * HI);
        auto* scores_c = memory.alloc<float>(size_t(C) * L);
        auto* idx_c = memory.alloc<int32_t>(size_t(C) * K);
        auto* vals_c = memory.alloc<float>(size_t(C) * K);
        auto* qac = memory.alloc<__nv_bfloat16>(size_t(C) * H * DQK);
        auto* out_c = memory.alloc<float>(size_t(C) * H * DV);
        auto* lse_c = memory.alloc<float>(size_t(C) * H);
        // The fused indexer and top-k's own buffers (no scores): counted apart, so that its chain's
        // buffers are these and the keys, queries and outputs above.
        CountingAllocator fused_memory;
        auto* lists_c = fused_memory.alloc<uint64_t>(size_t(dsa::cuda::indexer_topk_scratch(C, K)));
        auto* idx_f = fused_memory.alloc<int32_t>(size_t(C) * K);
        auto* vals_f = fused_memory.alloc<float>(size_t(C) * K);
        dsa::cuda::fill_e4m3(k8c, L * DI, 2, 448.0f);
        dsa::cuda::fill_f32(ksc, L, 1.0f / (448.0f * 448.0f));
        dsa::cuda::fill_bf16(kvc, L * DQK, 4, 1.0f);
        // The weights (times the queries' fp8 scales) are one value for every row, as above.
        dsa::cuda::fill_f32(wc, C * HI, 1.0f / HI);
        // What the device holds once the row's buffers are: sampled here and after the last chunk
        // (anything the runtime allocates on the way counts too), against the figure before.
        const int64_t used_allocated = device_used_bytes();
        double stage_ms[4] = {0, 0, 0, 0};  // indexer, top-k, attention, fused indexer and top-k
        bool indices_valid = true, fused_equal = true;
        for (int64_t c0 = 0; c0 < L; c0 += C) {
          const int rows = static_cast<int>(std::min(C, L - c0));
          const int64_t keys = c0 + rows;
          // This chunk's queries, their own values (a seed per chunk), before the timed stages.
          const uint32_t seed = 100 + 2 * static_cast<uint32_t>(c0 / C);
          dsa::cuda::fill_e4m3(q8c, int64_t(rows) * HI * DI, seed, 448.0f);
          dsa::cuda::fill_bf16(qac, int64_t(rows) * H * DQK, seed + 1, 0.1f);
          auto ip = indexer(q8c, wc, k8c, ksc, rows, HI, DI, keys, c0, scores_c);
          ip.stride = L;
          auto tp = topk(scores_c, rows, keys, c0, K, idx_c, vals_c);
          tp.stride = L;
          timer.begin();
          dsa::cuda::launch_indexer(ip);
          stage_ms[0] += timer.end_ms();
          timer.begin();
          dsa::cuda::launch_topk(tp);
          stage_ms[1] += timer.end_ms();
          timer.begin();
          dsa::cuda::launch_indexer_topk(
              indexer(q8c, wc, k8c, ksc, rows, HI, DI, keys, c0, nullptr),
              fused_outputs(idx_f, vals_f, lists_c, K));
          stage_ms[3] += timer.end_ms();
          // The attention over the fused selection (the unfused one's, where compared below).
          timer.begin();
          dsa::cuda::launch_attention(
              attention(qac, kvc, idx_f, K, rows, H, DQK, DV, keys, c0, 0.0417f, out_c, lse_c));
          stage_ms[2] += timer.end_ms();
          // The first chunk's selections (rows that see fewer than K keys, padded) and the last's.
          if (c0 == 0 || keys == L) {
            std::vector<int32_t> selection(size_t(rows) * K);
            check(cudaMemcpy(selection.data(), idx_f, selection.size() * sizeof(int32_t),
                             cudaMemcpyDeviceToHost),
                  "copy");
            indices_valid = indices_valid && valid_selection(selection, rows, K, c0);
            fused_equal = fused_equal && same_on_device(idx_c, idx_f, size_t(rows) * K) &&
                          same_on_device(vals_c, vals_f, size_t(rows) * K);
          }
        }
        const int64_t used = std::max(used_allocated, device_used_bytes()) - used_before;
        const double chained_ms = stage_ms[0] + stage_ms[1] + stage_ms[2];
        v32_layer_ms = chained_ms;
        v32_flops = indexer_flops + attn_flops;
        // The same floor as dsa_prefill's: the same rows, so the same indexer FLOPs, top-k bytes
        // and attention FLOPs (every row with at least K visible keys selects K of them).
        const double chained_floor_ms = floor_ms_flops(indexer_flops, ceilings.fp8_tflops) +
                                        floor_ms_bytes(topk_bytes) +
                                        floor_ms_flops(attn_flops, ceilings.bf16_tflops);
        char extra[512];
        std::snprintf(extra, sizeof extra,
                      ",\"indexer_ms\":%.3f,\"topk_ms\":%.3f,\"attention_ms\":%.3f,"
                      "\"chunk_rows\":%lld,\"chunks\":%lld,\"peak_device_bytes\":%zu,"
                      "\"device_used_bytes\":%lld,\"indices_valid\":%s",
                      stage_ms[0], stage_ms[1], stage_ms[2], static_cast<long long>(C),
                      static_cast<long long>((L + C - 1) / C), memory.peak(),
                      static_cast<long long>(used), indices_valid ? "true" : "false");
        report_floor("dsa_prefill_chunked", L, chained_ms, chained_floor_ms, extra);
        // The same chain with the fused indexer and top-k: its buffers are the chain's without the
        // scores and the unfused selection, plus the fused one's lists and selection.
        const size_t fused_bytes = memory.peak() - size_t(C) * L * sizeof(float) -
                                   size_t(C) * K * (sizeof(int32_t) + sizeof(float)) +
                                   fused_memory.peak();
        std::snprintf(extra, sizeof extra,
                      ",\"indexer_topk_ms\":%.3f,\"attention_ms\":%.3f,\"buffer_bytes\":%zu,"
                      "\"equals_unfused\":%s",
                      stage_ms[3], stage_ms[2], fused_bytes, fused_equal ? "true" : "false");
        report_floor("dsa_prefill_fused", L, stage_ms[3] + stage_ms[2], chained_floor_ms, extra);
        char note[256];
        std::snprintf(
            note, sizeof note,
            "dsa_prefill_chunked L %lld: %lld-row chunks, buffers %.3f GiB at peak, device "
            "used %+.3f GiB (cudaMemGetInfo)",
            static_cast<long long>(L), static_cast<long long>(C), memory.peak() / 1073741824.0,
            used / 1073741824.0);
        table_notes.push_back(note);
      }
    }  // run_v32
    if (run_v4) {
      V4Times v4;
      if (v4_attention_only) {
        v4_attention_rows(timer, L, v4);
        continue;
      }
      v4_compressor_rows(timer, L, v4);
      v4_indexer_rows(timer, L, v4);
      v4_attention_rows(timer, L, v4);
      v4_beside_v32(L, v4, v32_layer_ms, v32_flops);
      v4_csa_chain(timer, L, v32_layer_ms);
    }
  }
  if (run_v4) {
    for (int64_t L : lengths) v4_decode_rows(timer, L);
  }
  // Decode: batch 32, one query each, context 131072.
  if (run_v32) {
    const int B = 32;
    const int64_t L = 131072;
    auto* q = device_alloc<uint8_t>(size_t(B) * HI * DI);
    auto* k = device_alloc<uint8_t>(size_t(B) * L * DI);
    auto* w = device_alloc<float>(size_t(B) * HI);
    auto* ks = device_alloc<float>(size_t(B) * L);
    auto* scores = device_alloc<float>(size_t(B) * L);
    auto* idx = device_alloc<int32_t>(size_t(B) * K);
    auto* vals = device_alloc<float>(size_t(B) * K);
    auto* qa = device_alloc<__nv_bfloat16>(size_t(B) * H * DQK);
    auto* kv = device_alloc<__nv_bfloat16>(size_t(B) * L * DQK);
    auto* out = device_alloc<float>(size_t(B) * H * DV);
    auto* lse = device_alloc<float>(size_t(B) * H);
    dsa::cuda::fill_e4m3(q, B * HI * DI, 5, 448.0f);
    dsa::cuda::fill_e4m3(k, B * L * DI, 6, 448.0f);
    dsa::cuda::fill_bf16(qa, B * H * DQK, 7, 0.1f);
    dsa::cuda::fill_bf16(kv, B * L * DQK, 8, 1.0f);
    dsa::cuda::fill_f32(w, B * HI, 1.0f / HI);
    dsa::cuda::fill_f32(ks, B * L, 1.0f);
    check(cudaDeviceSynchronize(), "fill");
    auto ib = indexer(q, w, k, ks, 1, HI, DI, L, L - 1, scores);
    ib.sequences = B;
    ib.q_step = int64_t(HI) * DI, ib.w_step = HI, ib.k_step = L * DI, ib.k_scale_step = L;
    ib.scores_step = L;
    auto ab = attention(qa, kv, idx, K, 1, H, DQK, DV, L, L - 1, 0.0417f, out, lse);
    ab.sequences = B;
    ab.q_step = int64_t(H) * DQK, ab.kv_step = L * DQK, ab.indices_step = K;
    ab.out_step = int64_t(H) * DV, ab.lse_step = H;
    // Split decoding's scratch, as the backend gives it (the batched launch's is the largest).
    auto most = ab;  // the sweep's largest split count sizes the scratch
    most.splits = dsa::cuda::kMaxSplits;
    float* partial = device_alloc<float>(
        size_t(std::max<int64_t>(1, dsa::cuda::attention_partial_floats(most))));
    const auto unsplit = ab;
    ab.partial = partial;
    double best = 1e30, best_indexer = 1e30, best_topk = 1e30, best_attention = 1e30;
    for (int rep = 0; rep < 10; ++rep) {
      timer.begin();
      dsa::cuda::launch_indexer(ib);
      const double t_indexer = timer.end_ms();
      timer.begin();
      dsa::cuda::launch_topk(topk(scores, B, L, L - 1, K, idx, vals));
      const double t_topk = timer.end_ms();
      timer.begin();
      dsa::cuda::launch_attention(ab);
      const double t_attention = timer.end_ms();
      if (t_indexer + t_topk + t_attention < best) {
        best = t_indexer + t_topk + t_attention;
        best_indexer = t_indexer, best_topk = t_topk, best_attention = t_attention;
      }
    }
    // The batched launches must give what one launch per sequence gives, to the bit.
    {
      std::vector<float> batched(size_t(B) * L), single(size_t(B) * L);
      std::vector<float> out_batched(size_t(B) * H * DV), out_single(out_batched.size());
      check(cudaMemcpy(batched.data(), scores, batched.size() * 4, cudaMemcpyDeviceToHost), "copy");
      check(cudaMemcpy(out_batched.data(), out, out_batched.size() * 4, cudaMemcpyDeviceToHost),
            "copy");
      for (int b = 0; b < B; ++b) {
        dsa::cuda::launch_indexer(indexer(q + size_t(b) * HI * DI, w + b * HI,
                                          k + size_t(b) * L * DI, ks + b * L, 1, HI, DI, L, L - 1,
                                          scores + size_t(b) * L));
        auto one =
            attention(qa + size_t(b) * H * DQK, kv + size_t(b) * L * DQK, idx + size_t(b) * K, K, 1,
                      H, DQK, DV, L, L - 1, 0.0417f, out + size_t(b) * H * DV, lse + b * H);
        one.partial = partial;
        one.splits = dsa::cuda::attention_splits(ab);  // the batch's pieces, for the same sums
        dsa::cuda::launch_attention(one);
      }
      check(cudaMemcpy(single.data(), scores, single.size() * 4, cudaMemcpyDeviceToHost), "copy");
      check(cudaMemcpy(out_single.data(), out, out_single.size() * 4, cudaMemcpyDeviceToHost),
            "copy");
      std::printf("{\"bench\":\"decode_batched_equals_single\",\"indexer\":%s,\"attention\":%s}\n",
                  batched == single ? "true" : "false",
                  out_batched == out_single ? "true" : "false");
    }
    // Decode is memory-bound: each row's fewest bytes through device memory, against the copy
    // ceiling. Indexer: q (fp8) and w read, the keys (128 B fp8 + 4 B scale each) read, the f32
    // scores written. Top-k: the f32 scores read (as in the prefill rows). Attention: the k
    // selected latent rows gathered (576 bf16 each), q and the indices read, out (f32) and lse
    // written. The pipeline row counts the three together.
    const double indexer_bytes = double(B) * (HI * DI + HI * 4.0 + L * (DI + 4.0) + L * 4.0);
    const double decode_topk_bytes = double(B) * L * 4.0;
    const double attention_bytes =
        double(B) * (K * DQK * 2.0 + H * DQK * 2.0 + K * 4.0 + H * DV * 4.0 + H * 4.0);
    report_bytes("decode_b32_131072_indexer", L, best_indexer, 2.0 * B * L * HI * DI,
                 indexer_bytes);
    report_bytes("decode_b32_131072_topk", L, best_topk, 0, decode_topk_bytes);
    report_bytes("decode_b32_131072_attention", L, best_attention, 2.0 * B * K * H * (DQK + DV),
                 attention_bytes);
    report_bytes("decode_b32_131072", L, best, 0,
                 indexer_bytes + decode_topk_bytes + attention_bytes);
    // The split count swept, as for V4's decode rows.
    for (const int splits : {1, 2, 3, 4, 6, 8, 12, 16, 24, 32}) {
      auto swept = ab;
      swept.splits = splits;
      const double ms = best_ms(timer, [&] { dsa::cuda::launch_attention(swept); });
      std::printf("{\"bench\":\"decode_split_sweep\",\"L\":%lld,\"splits\":%d,\"ms\":%.4f}\n",
                  static_cast<long long>(L), splits, ms);
    }
    // The attention without split decoding: one block per (row, 64 heads) walks all 2048.
    {
      double best_unsplit = 1e30;
      for (int rep = 0; rep < 10; ++rep) {
        timer.begin();
        dsa::cuda::launch_attention(unsplit);
        best_unsplit = std::min(best_unsplit, timer.end_ms());
      }
      report_bytes("decode_b32_131072_attention_one_block", L, best_unsplit,
                   2.0 * B * K * H * (DQK + DV), attention_bytes);
    }
    // The attention over FlashMLA's fp8 cache: 656 bytes per selected row instead of 1152.
    {
      cudaFree(kv);
      auto* kv8 = device_alloc<uint8_t>(size_t(B) * L * 656);
      dsa::cuda::fill_fp8_cache(kv8, B * L, 10);
      auto fp8 = ab;
      fp8.kv = nullptr;
      fp8.kv_fp8 = kv8;
      fp8.kv_fp8_step = L * 656;
      fp8.partial = partial;
      double best_fp8 = 1e30;
      for (int rep = 0; rep < 10; ++rep) {
        timer.begin();
        dsa::cuda::launch_attention(fp8);
        best_fp8 = std::min(best_fp8, timer.end_ms());
      }
      const double fp8_bytes =
          double(B) * (K * 656.0 + H * DQK * 2.0 + K * 4.0 + H * DV * 4.0 + H * 4.0);
      report_bytes("decode_b32_131072_attention_fp8_cache", L, best_fp8,
                   2.0 * B * K * H * (DQK + DV), fp8_bytes);
      cudaFree(kv8);
      kv = nullptr;
    }
  }
  print_table();
  return 0;
}
