// Python objects as dsa::Tensor and back, without copies where the layout allows.
#pragma once

#include <string>

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include "dsa/tensor.hpp"

namespace dsa::python {

namespace py = pybind11;

// A tensor viewing the object's buffer, its `storage` holding a reference to the object (released
// under the GIL). Taken as they are: C-contiguous NumPy arrays of native byte order and of a dtype
// the library reads (float32, float64, float16, int32, int64, uint8; ml_dtypes' bfloat16 and
// float8_e4m3fn), and CPU tensors offering DLPack (`__dlpack__`: torch, also bfloat16) with those
// dtypes and a row-major layout. Any other layout is made contiguous by NumPy once (a copy);
// anything else goes through np.asarray. Another dtype, or a DLPack tensor on a GPU, is
// Error(bad_input) naming `name`. `copied`, when given, says whether the data was copied.
Tensor to_tensor(py::handle object, const std::string& name, bool* copied = nullptr);

// A NumPy array viewing the tensor's buffer (no copy), keeping its storage alive.
py::array to_array(const Tensor& tensor);

}  // namespace dsa::python
