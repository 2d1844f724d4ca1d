// Internal: device memory of the CUDA backend (backend.cu and layer_timing.cu), counted for the
// reports' peak_device_bytes, and the chunks of query rows the indexer's launches take.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>

#include "kernels.cuh"

namespace dsa::cuda {

// Adds `change` to the bytes the DeviceBuffers hold, keeping the most they held at once.
void count_device_bytes(int64_t change);

// Device memory that frees itself.
template <typename T>
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(size_t count) { resize(count); }
  ~DeviceBuffer() { release(); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  void resize(size_t count) {
    if (count <= capacity_) return;
    release();
    const size_t n = std::max<size_t>(count, 1);
    check(cudaMalloc(&data_, n * sizeof(T)), "cudaMalloc");
    capacity_ = n;
    count_device_bytes(static_cast<int64_t>(n * sizeof(T)));
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
  size_t bytes() const { return capacity_ * sizeof(T); }

 private:
  void release() {
    if (data_ == nullptr) return;
    cudaFree(data_);
    count_device_bytes(-static_cast<int64_t>(capacity_ * sizeof(T)));
    data_ = nullptr;
    capacity_ = 0;
  }
  T* data_ = nullptr;
  size_t capacity_ = 0;
};

// Query rows per chunk of indexer scores against `keys` keys: 512 MB of them.
inline int64_t score_chunk(int64_t keys) {
  return std::clamp<int64_t>((512 << 20) / std::max<int64_t>(keys * 4, 1), 1, 1 << 16);
}

// Query rows per chunk of the fused top-k: 1 GB of its candidate lists (8192 rows at k 2048).
inline int64_t topk_chunk(int64_t k) {
  return std::clamp<int64_t>((int64_t{1} << 30) / (indexer_topk_scratch(1, k) * 8), 1, 1 << 16);
}

}  // namespace dsa::cuda
