// Tensors: a dtype, a shape and bytes (owned or mapped from a file), plus f32 conversion.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace dsa {

enum class DType { f32, f64, f16, bf16, f8_e4m3, i32, i64, u8 };

using Shape = std::vector<int64_t>;

std::size_t dtype_size(DType dtype);
// Short lowercase name used in reports and messages: "f32", "bf16", "f8_e4m3", ...
std::string dtype_name(DType dtype);
bool is_floating(DType dtype);

std::string shape_string(const Shape& shape);  // "[2, 3, 4]"
// Number of elements; throws Error(bad_input) when it overflows int64 (a lying header).
int64_t shape_numel(const Shape& shape);

struct Tensor {
  DType dtype = DType::f32;
  Shape shape;
  // What the tensor is called in messages: "q.npy", "in.safetensors:k_index", "<stdin>".
  std::string name;
  const std::byte* data = nullptr;
  // Keeps `data` alive: a heap buffer or a file mapping.
  std::shared_ptr<const void> storage;

  int64_t rank() const { return static_cast<int64_t>(shape.size()); }
  int64_t numel() const { return shape_numel(shape); }
  std::size_t nbytes() const { return static_cast<std::size_t>(numel()) * dtype_size(dtype); }
  int64_t dim(int64_t i) const { return shape.at(static_cast<std::size_t>(i)); }
};

// The shape with a leading batch dimension of `batch` when `batched` (B? in the shapes above).
Shape with_batch(Shape shape, bool batched, int64_t batch);

// A tensor that owns a zero-filled buffer of the given dtype and shape.
Tensor make_tensor(DType dtype, Shape shape, std::string name = {});
template <typename T>
T* mutable_data(Tensor& tensor) {
  return reinterpret_cast<T*>(const_cast<std::byte*>(tensor.data));
}

// Converts `count` elements starting at element `offset` to f32 (exact for every floating
// dtype except f64, which rounds to nearest).
void to_f32(const Tensor& tensor, int64_t offset, int64_t count, float* out);
std::vector<float> to_f32(const Tensor& tensor);

// The tensor's values rounded to bf16 (nearest even), same name and shape; floating dtypes only.
Tensor to_bf16(const Tensor& tensor);

// Reads integer tensors (i32, i64, u8) as int64.
void to_i64(const Tensor& tensor, int64_t offset, int64_t count, int64_t* out);

// How many elements are NaN or infinite once converted to f32 (0 for integer tensors): the
// reports flag them, since they propagate through the arithmetic (man dsa(7)).
int64_t count_non_finite(const Tensor& tensor);

// f32 rows of a tensor without copying when it already holds contiguous f32.
class F32Buffer {
 public:
  F32Buffer(const Tensor& tensor, int64_t offset, int64_t count);
  explicit F32Buffer(std::vector<float> values) : owned_(std::move(values)), data_(owned_.data()) {}
  F32Buffer(F32Buffer&& other) noexcept
      : owned_(std::move(other.owned_)), data_(owned_.empty() ? other.data_ : owned_.data()) {}
  const float* data() const { return data_; }

 private:
  std::vector<float> owned_;
  const float* data_ = nullptr;
};

}  // namespace dsa
