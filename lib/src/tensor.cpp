#include "dsa/tensor.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "dsa/error.hpp"
#include "dsa/precision.hpp"

namespace dsa {

std::size_t dtype_size(DType dtype) {
  switch (dtype) {
    case DType::f64:
    case DType::i64:
      return 8;
    case DType::f32:
    case DType::i32:
      return 4;
    case DType::f16:
    case DType::bf16:
      return 2;
    case DType::f8_e4m3:
    case DType::u8:
      return 1;
  }
  return 0;
}

std::string dtype_name(DType dtype) {
  switch (dtype) {
    case DType::f32:
      return "f32";
    case DType::f64:
      return "f64";
    case DType::f16:
      return "f16";
    case DType::bf16:
      return "bf16";
    case DType::f8_e4m3:
      return "f8_e4m3";
    case DType::i32:
      return "i32";
    case DType::i64:
      return "i64";
    case DType::u8:
      return "u8";
  }
  return "?";
}

bool is_floating(DType dtype) {
  return dtype == DType::f32 || dtype == DType::f64 || dtype == DType::f16 ||
         dtype == DType::bf16 || dtype == DType::f8_e4m3;
}

std::string shape_string(const Shape& shape) {
  return fmt::format("[{}]", fmt::join(shape, ", "));
}

int64_t shape_numel(const Shape& shape) {
  int64_t n = 1;
  for (int64_t d : shape) {
    if (d < 0) bad_input("negative dimension in shape {}", shape_string(shape));
    if (d != 0 && n > std::numeric_limits<int64_t>::max() / d) {
      bad_input("shape {} has too many elements", shape_string(shape));
    }
    n *= d;
  }
  return n;
}

Shape with_batch(Shape shape, bool batched, int64_t batch) {
  if (batched) shape.insert(shape.begin(), batch);
  return shape;
}

Tensor make_tensor(DType dtype, Shape shape, std::string name) {
  Tensor t;
  t.dtype = dtype;
  t.shape = std::move(shape);
  t.name = std::move(name);
  auto buffer = std::shared_ptr<std::byte[]>(new std::byte[std::max<std::size_t>(t.nbytes(), 1)]());
  t.data = buffer.get();
  t.storage = buffer;
  return t;
}

namespace {

template <typename T>
T load(const std::byte* p) {
  T v;
  std::memcpy(&v, p, sizeof(T));
  return v;
}

}  // namespace

void to_f32(const Tensor& tensor, int64_t offset, int64_t count, float* out) {
  if (count == 0) return;  // `out` may be null then, which memcpy does not allow
  const std::size_t size = dtype_size(tensor.dtype);
  const std::byte* p = tensor.data + static_cast<std::size_t>(offset) * size;
  switch (tensor.dtype) {
    case DType::f32:
      std::memcpy(out, p, static_cast<std::size_t>(count) * 4);
      return;
    case DType::f64:
      for (int64_t i = 0; i < count; ++i) out[i] = static_cast<float>(load<double>(p + 8 * i));
      return;
    case DType::f16:
      for (int64_t i = 0; i < count; ++i) out[i] = f16_to_f32(load<uint16_t>(p + 2 * i));
      return;
    case DType::bf16:
      for (int64_t i = 0; i < count; ++i) out[i] = bf16_to_f32(load<uint16_t>(p + 2 * i));
      return;
    case DType::f8_e4m3:
      for (int64_t i = 0; i < count; ++i) out[i] = e4m3_to_f32(static_cast<uint8_t>(p[i]));
      return;
    case DType::i32:
      for (int64_t i = 0; i < count; ++i) out[i] = static_cast<float>(load<int32_t>(p + 4 * i));
      return;
    case DType::i64:
      for (int64_t i = 0; i < count; ++i) out[i] = static_cast<float>(load<int64_t>(p + 8 * i));
      return;
    case DType::u8:
      for (int64_t i = 0; i < count; ++i) out[i] = static_cast<float>(static_cast<uint8_t>(p[i]));
      return;
  }
}

std::vector<float> to_f32(const Tensor& tensor) {
  std::vector<float> out(static_cast<std::size_t>(tensor.numel()));
  to_f32(tensor, 0, tensor.numel(), out.data());
  return out;
}

Tensor to_bf16(const Tensor& tensor) {
  Tensor out = make_tensor(DType::bf16, tensor.shape, tensor.name);
  uint16_t* bits = mutable_data<uint16_t>(out);
  constexpr int64_t kRows = 1 << 16;
  std::vector<float> values(static_cast<std::size_t>(std::min(tensor.numel(), kRows)));
  for (int64_t i0 = 0; i0 < tensor.numel(); i0 += kRows) {
    const int64_t n = std::min(kRows, tensor.numel() - i0);
    to_f32(tensor, i0, n, values.data());
    for (int64_t i = 0; i < n; ++i) bits[i0 + i] = f32_to_bf16(values[i]);
  }
  return out;
}

void to_i64(const Tensor& tensor, int64_t offset, int64_t count, int64_t* out) {
  const std::size_t size = dtype_size(tensor.dtype);
  const std::byte* p = tensor.data + static_cast<std::size_t>(offset) * size;
  switch (tensor.dtype) {
    case DType::i32:
      for (int64_t i = 0; i < count; ++i) out[i] = load<int32_t>(p + 4 * i);
      return;
    case DType::i64:
      for (int64_t i = 0; i < count; ++i) out[i] = load<int64_t>(p + 8 * i);
      return;
    case DType::u8:
      for (int64_t i = 0; i < count; ++i) out[i] = static_cast<uint8_t>(p[i]);
      return;
    default:
      bad_input("{}: expected an integer tensor (i32, i64 or u8), got {}", tensor.name,
                dtype_name(tensor.dtype));
  }
}

int64_t count_non_finite(const Tensor& tensor) {
  if (!is_floating(tensor.dtype)) return 0;
  constexpr int64_t kChunk = 1 << 16;
  const int64_t n = tensor.numel();
  int64_t count = 0;
#pragma omp parallel for schedule(static) reduction(+ : count)
  for (int64_t begin = 0; begin < n; begin += kChunk) {
    const int64_t size = std::min(kChunk, n - begin);
    const F32Buffer values(tensor, begin, size);
    for (int64_t i = 0; i < size; ++i) count += !std::isfinite(values.data()[i]);
  }
  return count;
}

F32Buffer::F32Buffer(const Tensor& tensor, int64_t offset, int64_t count) {
  const bool aligned = reinterpret_cast<std::uintptr_t>(tensor.data) % alignof(float) == 0;
  if (tensor.dtype == DType::f32 && aligned) {
    data_ = reinterpret_cast<const float*>(tensor.data) + offset;
    return;
  }
  owned_.resize(static_cast<std::size_t>(count));
  to_f32(tensor, offset, count, owned_.data());
  data_ = owned_.data();
}

}  // namespace dsa
