// Internal: tensors that look into other tensors' bytes.
#pragma once

#include <cstdint>
#include <utility>

#include "dsa/tensor.hpp"

namespace dsa::detail {

// The elements of t from `first_element` on, as a tensor of the given shape (sharing t's
// storage and name).
inline Tensor view(const Tensor& t, int64_t first_element, Shape shape) {
  Tensor v;
  v.dtype = t.dtype;
  v.shape = std::move(shape);
  v.name = t.name;
  v.storage = t.storage;
  v.data = t.data + static_cast<std::size_t>(first_element) * dtype_size(t.dtype);
  return v;
}

}  // namespace dsa::detail
