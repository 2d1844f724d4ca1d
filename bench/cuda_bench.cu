// Times the CUDA kernels on device-resident data at DeepSeek-V3.2 sizes (indexer 64 x 128,
// top-2048, sparse MQA 128 heads x 576/512) and prints one JSON line per measurement.
// Usage: dsa-cuda-bench [L ...]   (default 32768 131072)
#include <cuda_bf16.h>
#include <cuda_fp8.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "kernels.cuh"

namespace {

using dsa::cuda::check;

// A hash of (i, seed) mapped to [-1, 1): random-looking inputs, the same on every run.
__device__ float uniform(int64_t i, uint32_t seed) {
  uint32_t h = static_cast<uint32_t>(i) * 2654435761u ^ seed;
  h ^= h >> 15;
  h *= 2246822519u;
  h ^= h >> 13;
  return (h & 0xffff) / 32768.0f - 1.0f;
}

__global__ void fill_bf16(__nv_bfloat16* x, int64_t n, uint32_t seed, float amplitude) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    x[i] = __float2bfloat16(amplitude * uniform(i, seed));
}

// e4m3 codes of amplitude * uniform(-1, 1): what fp8 block quantization gives for amplitude 448.
__global__ void fill_e4m3(uint8_t* x, int64_t n, uint32_t seed, float amplitude) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    x[i] = __nv_fp8_e4m3(amplitude * uniform(i, seed)).__x;
}

__global__ void fill_f32(float* x, int64_t n, float value) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    x[i] = value;
}

// Distinct visible positions per row: a stride walk from a row-dependent start.
__global__ void fill_indices(int32_t* idx, int rows, int k, int64_t first_position) {
  const int r = blockIdx.x;
  const int64_t visible = first_position + r + 1;
  for (int j = threadIdx.x; j < k; j += blockDim.x) {
    idx[int64_t(r) * k + j] =
        j < visible ? static_cast<int32_t>((int64_t(j) * 7919 + r) % visible) : -1;
  }
}

template <typename T>
T* device_alloc(size_t n) {
  T* p = nullptr;
  check(cudaMalloc(&p, n * sizeof(T)), "cudaMalloc");
  return p;
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

void report(const char* what, int64_t L, double ms, double flops) {
  std::printf("{\"bench\":\"%s\",\"L\":%lld,\"ms\":%.3f,\"tflops\":%.1f}\n", what,
              static_cast<long long>(L), ms, flops / (ms * 1e-3) / 1e12);
  std::fflush(stdout);
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<int64_t> lengths;
  for (int i = 1; i < argc; ++i) lengths.push_back(std::atoll(argv[i]));
  if (lengths.empty()) lengths = {32768, 131072};
  const int HI = 64, DI = 128, H = 128, DQK = 576, DV = 512, K = 2048;
  Timer timer;
  for (int64_t L : lengths) {
    // Indexer (fp8, and bf16 for the ratio at the first length) + top-k over every query row,
    // in chunks of rows.
    const int64_t chunk = std::min<int64_t>(L, (int64_t(4) << 30) / (L * 4));
    auto* q = device_alloc<__nv_bfloat16>(size_t(chunk) * HI * DI);
    auto* k = device_alloc<__nv_bfloat16>(size_t(L) * DI);
    auto* q8 = device_alloc<uint8_t>(size_t(chunk) * HI * DI);
    auto* k8 = device_alloc<uint8_t>(size_t(L) * DI);
    auto* w = device_alloc<float>(size_t(chunk) * HI);
    auto* ks = device_alloc<float>(L);
    auto* scores = device_alloc<float>(size_t(chunk) * L);
    auto* idx = device_alloc<int32_t>(size_t(chunk) * K);
    auto* vals = device_alloc<float>(size_t(chunk) * K);
    fill_bf16<<<1024, 256>>>(q, chunk * HI * DI, 1, 1.0f);
    fill_bf16<<<1024, 256>>>(k, L * DI, 2, 1.0f);
    fill_e4m3<<<1024, 256>>>(q8, chunk * HI * DI, 1, 448.0f);
    fill_e4m3<<<1024, 256>>>(k8, L * DI, 2, 448.0f);
    fill_f32<<<1024, 256>>>(w, chunk * HI, 1.0f / HI);
    fill_f32<<<1024, 256>>>(ks, L, 1.0f / (448.0f * 448.0f));
    check(cudaDeviceSynchronize(), "fill");
    const double causal_pairs = double(L) * double(L + 1) / 2;
    if (L == lengths.front()) {
      double bf16_ms = 0;
      for (int64_t c0 = 0; c0 < L; c0 += chunk) {
        const int rows = static_cast<int>(std::min(chunk, L - c0));
        timer.begin();
        dsa::cuda::launch_indexer(indexer(q, w, k, ks, rows, HI, DI, L, c0, scores));
        bf16_ms += timer.end_ms();
      }
      report("indexer_bf16", L, bf16_ms, 2.0 * causal_pairs * HI * DI);
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
    report("indexer", L, indexer_ms, 2.0 * causal_pairs * HI * DI);
    report("topk", L, topk_ms, 0);
    cudaFree(q), cudaFree(w), cudaFree(scores), cudaFree(idx), cudaFree(vals), cudaFree(k),
        cudaFree(ks), cudaFree(q8), cudaFree(k8);

    // Sparse MQA attention over K selected entries per row.
    const int64_t attn_chunk = std::min<int64_t>(L, 16384);
    auto* qa = device_alloc<__nv_bfloat16>(size_t(attn_chunk) * H * DQK);
    auto* kv = device_alloc<__nv_bfloat16>(size_t(L) * DQK);
    auto* sel = device_alloc<int32_t>(size_t(attn_chunk) * K);
    auto* out = device_alloc<float>(size_t(attn_chunk) * H * DV);
    auto* lse = device_alloc<float>(size_t(attn_chunk) * H);
    fill_bf16<<<1024, 256>>>(qa, attn_chunk * H * DQK, 3, 0.1f);
    fill_bf16<<<1024, 256>>>(kv, L * DQK, 4, 1.0f);
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
    report("sparse_attention", L, attn_ms, attn_flops);
    report("dsa_prefill", L, indexer_ms + topk_ms + attn_ms, 0);

    // dsa-compare's dense probabilities (the dense attention's lse is an input) over the last
    // 256 query rows, and the same rows' sparse attention on the wmma kernel (d_qk = d_v = 256).
    {
      const int rows = static_cast<int>(std::min<int64_t>(256, L));
      const int64_t c0 = L - rows;
      auto* partial = device_alloc<float>(size_t(2) * rows * L);
      fill_f32<<<1024, 256>>>(lse, int64_t(rows) * H, 8.0f);
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
      report("dense_probabilities", L, dense_ms, 2.0 * H * DQK * dense_pairs);
      fill_indices<<<rows, 256>>>(sel, rows, K, c0);
      check(cudaDeviceSynchronize(), "fill indices");
      const int d256 = 256;
      timer.begin();
      dsa::cuda::launch_attention(
          attention(qa, kv, sel, K, rows, H, d256, d256, L, c0, 0.0625f, out, lse));
      const double wmma_ms = timer.end_ms();
      report("sparse_attention_d256", L, wmma_ms, 2.0 * rows * H * (2 * d256 + d256) * K);
      cudaFree(partial);
    }
    cudaFree(qa), cudaFree(kv), cudaFree(sel), cudaFree(out), cudaFree(lse);
  }
  // Decode: batch 32, one query each, context 131072.
  {
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
    fill_e4m3<<<1024, 256>>>(q, B * HI * DI, 5, 448.0f);
    fill_e4m3<<<1024, 256>>>(k, B * L * DI, 6, 448.0f);
    fill_bf16<<<1024, 256>>>(qa, B * H * DQK, 7, 0.1f);
    fill_bf16<<<1024, 256>>>(kv, B * L * DQK, 8, 1.0f);
    fill_f32<<<1024, 256>>>(w, B * HI, 1.0f / HI);
    fill_f32<<<1024, 256>>>(ks, B * L, 1.0f);
    check(cudaDeviceSynchronize(), "fill");
    auto ib = indexer(q, w, k, ks, 1, HI, DI, L, L - 1, scores);
    ib.sequences = B;
    ib.q_step = int64_t(HI) * DI, ib.w_step = HI, ib.k_step = L * DI, ib.k_scale_step = L;
    ib.scores_step = L;
    auto ab = attention(qa, kv, idx, K, 1, H, DQK, DV, L, L - 1, 0.0417f, out, lse);
    ab.sequences = B;
    ab.q_step = int64_t(H) * DQK, ab.kv_step = L * DQK, ab.indices_step = K;
    ab.out_step = int64_t(H) * DV, ab.lse_step = H;
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
        dsa::cuda::launch_attention(attention(qa + size_t(b) * H * DQK, kv + size_t(b) * L * DQK,
                                              idx + size_t(b) * K, K, 1, H, DQK, DV, L, L - 1,
                                              0.0417f, out + size_t(b) * H * DV, lse + b * H));
      }
      check(cudaMemcpy(single.data(), scores, single.size() * 4, cudaMemcpyDeviceToHost), "copy");
      check(cudaMemcpy(out_single.data(), out, out_single.size() * 4, cudaMemcpyDeviceToHost),
            "copy");
      std::printf("{\"bench\":\"decode_batched_equals_single\",\"indexer\":%s,\"attention\":%s}\n",
                  batched == single ? "true" : "false",
                  out_batched == out_single ? "true" : "false");
    }
    report("decode_b32_131072_indexer", L, best_indexer, 2.0 * B * L * HI * DI);
    report("decode_b32_131072_topk", L, best_topk, 0);
    report("decode_b32_131072_attention", L, best_attention, 2.0 * B * K * H * (DQK + DV));
    report("decode_b32_131072", L, best, 0);
  }
  return 0;
}
