// Internal: input checks more than one file of the library makes.
#pragma once

#include "dsa/error.hpp"
#include "dsa/tensor.hpp"

namespace dsa::detail {

inline void require_floating(const Tensor& t, const char* role) {
  if (!is_floating(t.dtype)) {
    bad_input("{} ({}): expected a floating-point tensor, got {}", t.name, role,
              dtype_name(t.dtype));
  }
}

}  // namespace dsa::detail
