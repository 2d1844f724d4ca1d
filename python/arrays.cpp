#include "arrays.hpp"

#include <cstdint>
#include <memory>
#include <optional>
#include <vector>

#include "dsa/error.hpp"

namespace dsa::python {

namespace {

// DLPack's ABI (dlpack.h, v0.8: the capsule `__dlpack__()` returns without max_version).
struct DLDevice {
  int32_t device_type;
  int32_t device_id;
};
struct DLDataType {
  uint8_t code;
  uint8_t bits;
  uint16_t lanes;
};
struct DLTensor {
  void* data;
  DLDevice device;
  int32_t ndim;
  DLDataType dtype;
  int64_t* shape;
  int64_t* strides;
  uint64_t byte_offset;
};
struct DLManagedTensor {
  DLTensor dl_tensor;
  void* manager_ctx;
  void (*deleter)(DLManagedTensor*);
};
enum : int32_t { kDLCPU = 1, kDLCUDA = 2, kDLCUDAHost = 3, kDLROCM = 10, kDLCUDAManaged = 13 };
enum : uint8_t { kDLInt = 0, kDLUInt = 1, kDLFloat = 2, kDLBfloat = 4 };

constexpr const char* kTaken =
    "float32, float64, float16, bfloat16, float8_e4m3fn, int32, int64 or uint8";

// Never destroyed: a static py::object would be released after the interpreter is gone.
py::module_& numpy() {
  static auto* np = new py::module_(py::module_::import("numpy"));
  return *np;
}

// Keeps a Python object alive for as long as a tensor views it; the last owner may be a library
// thread without the GIL.
std::shared_ptr<const void> hold(py::handle object) {
  PyObject* raw = object.inc_ref().ptr();
  return {raw, [](const void* p) {
            py::gil_scoped_acquire gil;
            Py_DECREF(static_cast<PyObject*>(const_cast<void*>(p)));
          }};
}

std::optional<DType> numpy_dtype(const py::dtype& dtype) {
  const auto size = dtype.itemsize();
  switch (dtype.kind()) {
    case 'f':
      if (size == 4) return DType::f32;
      if (size == 8) return DType::f64;
      if (size == 2) return DType::f16;
      return std::nullopt;
    case 'i':
      if (size == 4) return DType::i32;
      if (size == 8) return DType::i64;
      return std::nullopt;
    case 'u':
      return size == 1 ? std::optional(DType::u8) : std::nullopt;
    case 'V': {  // ml_dtypes' extension types
      const std::string name = py::str(dtype.attr("name"));
      if (name == "bfloat16" && size == 2) return DType::bf16;
      if (name == "float8_e4m3fn" && size == 1) return DType::f8_e4m3;
      return std::nullopt;
    }
    default:
      return std::nullopt;
  }
}

std::optional<DType> dlpack_dtype(const DLDataType& dtype) {
  if (dtype.lanes != 1) return std::nullopt;
  if (dtype.code == kDLFloat && dtype.bits == 32) return DType::f32;
  if (dtype.code == kDLFloat && dtype.bits == 64) return DType::f64;
  if (dtype.code == kDLFloat && dtype.bits == 16) return DType::f16;
  if (dtype.code == kDLBfloat && dtype.bits == 16) return DType::bf16;
  if (dtype.code == kDLInt && dtype.bits == 32) return DType::i32;
  if (dtype.code == kDLInt && dtype.bits == 64) return DType::i64;
  if (dtype.code == kDLUInt && dtype.bits == 8) return DType::u8;
  return std::nullopt;
}

std::string dlpack_device_name(int32_t type, int32_t id) {
  switch (type) {
    case kDLCUDA:
      return fmt::format("cuda:{}", id);
    case kDLCUDAManaged:
      return fmt::format("cuda:{} (managed)", id);
    case kDLROCM:
      return fmt::format("rocm:{}", id);
    default:
      return fmt::format("DLPack device type {}:{}", type, id);
  }
}

Tensor from_array(py::array array, const std::string& name, bool* copied) {
  const std::optional<DType> dtype = numpy_dtype(array.dtype());
  if (!dtype) {
    bad_input("{}: unsupported dtype {} (dsa takes {})", name,
              std::string(py::str(array.dtype().attr("name"))), kTaken);
  }
  bool copy = false;
  if (!array.dtype().attr("isnative").cast<bool>()) {
    array = array.attr("astype")(array.dtype().attr("newbyteorder")("="));
    copy = true;
  }
  if (!(array.flags() & py::array::c_style)) {
    array = numpy().attr("ascontiguousarray")(array);
    copy = true;
  }
  if (copied) *copied = copy;
  Tensor t;
  t.dtype = *dtype;
  t.shape.assign(array.shape(), array.shape() + array.ndim());
  t.name = name;
  t.data = static_cast<const std::byte*>(array.data());
  t.storage = hold(array);
  return t;
}

// Row-major with these strides (in elements)? Dimensions of one element may have any stride.
bool row_major(const DLTensor& t) {
  if (t.strides == nullptr) return true;
  int64_t expected = 1;
  for (int32_t i = t.ndim - 1; i >= 0; --i) {
    if (t.shape[i] == 0) return true;
    if (t.shape[i] != 1 && t.strides[i] != expected) return false;
    expected *= t.shape[i];
  }
  return true;
}

// The tensor of a DLPack producer on the CPU, or nothing when its layout needs a copy.
std::optional<Tensor> from_dlpack(py::handle object, const std::string& name) {
  if (py::hasattr(object, "__dlpack_device__")) {
    const auto device = object.attr("__dlpack_device__")().cast<std::pair<int32_t, int32_t>>();
    if (device.first != kDLCPU && device.first != kDLCUDAHost) {
      bad_input(
          "{}: a tensor on {}; dsa reads host memory: pass {}.cpu() (device=\"cuda\" runs the "
          "arithmetic on the GPU and copies the inputs there itself)",
          name, dlpack_device_name(device.first, device.second), name);
    }
  }
  py::object capsule = object.attr("__dlpack__")();
  if (!PyCapsule_IsValid(capsule.ptr(), "dltensor")) {
    bad_input("{}: __dlpack__ did not return an unused DLPack capsule", name);
  }
  auto* managed = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(capsule.ptr(), "dltensor"));
  PyCapsule_SetName(capsule.ptr(), "used_dltensor");  // ours to delete now
  std::shared_ptr<const void> owner(managed, [](const void* p) {
    auto* m = static_cast<DLManagedTensor*>(const_cast<void*>(p));
    if (m->deleter) {
      py::gil_scoped_acquire gil;
      m->deleter(m);
    }
  });
  const DLTensor& dl = managed->dl_tensor;
  if (dl.device.device_type != kDLCPU && dl.device.device_type != kDLCUDAHost) {
    bad_input("{}: a tensor on {}; dsa reads host memory: pass {}.cpu()", name,
              dlpack_device_name(dl.device.device_type, dl.device.device_id), name);
  }
  const std::optional<DType> dtype = dlpack_dtype(dl.dtype);
  if (!dtype) {
    bad_input("{}: unsupported DLPack dtype (code {}, {} bits, {} lanes; dsa takes {})", name,
              dl.dtype.code, dl.dtype.bits, dl.dtype.lanes, kTaken);
  }
  if (!row_major(dl)) {
    if (*dtype == DType::bf16) {
      bad_input("{}: a non-contiguous bfloat16 tensor: pass {}.contiguous()", name, name);
    }
    return std::nullopt;  // NumPy makes it contiguous
  }
  Tensor t;
  t.dtype = *dtype;
  t.shape.assign(dl.shape, dl.shape + dl.ndim);
  t.name = name;
  t.data = static_cast<const std::byte*>(dl.data) + dl.byte_offset;
  t.storage = std::move(owner);
  return t;
}

py::dtype numpy_dtype_of(DType dtype) {
  switch (dtype) {
    case DType::f32:
      return py::dtype::of<float>();
    case DType::f64:
      return py::dtype::of<double>();
    case DType::f16:
      return py::dtype("float16");
    case DType::i32:
      return py::dtype::of<int32_t>();
    case DType::i64:
      return py::dtype::of<int64_t>();
    case DType::u8:
      return py::dtype::of<uint8_t>();
    default:
      fail(ExitCode::runtime, "no NumPy dtype for {}", dtype_name(dtype));
  }
}

}  // namespace

Tensor to_tensor(py::handle object, const std::string& name, bool* copied) {
  if (copied) *copied = false;
  if (py::isinstance<py::array>(object)) {
    return from_array(py::reinterpret_borrow<py::array>(object), name, copied);
  }
  if (py::hasattr(object, "__dlpack__")) {
    if (std::optional<Tensor> t = from_dlpack(object, name)) return std::move(*t);
    py::object array = numpy().attr("from_dlpack")(object);
    Tensor t = from_array(py::reinterpret_borrow<py::array>(array), name, copied);
    if (copied) *copied = true;
    return t;
  }
  py::object array = numpy().attr("asarray")(object);
  return from_array(py::reinterpret_borrow<py::array>(array), name, copied);
}

py::array to_array(const Tensor& tensor) {
  auto* keep = new std::shared_ptr<const void>(tensor.storage);
  py::capsule base(keep, [](void* p) { delete static_cast<std::shared_ptr<const void>*>(p); });
  std::vector<py::ssize_t> shape(tensor.shape.begin(), tensor.shape.end());
  std::vector<py::ssize_t> strides(shape.size());
  py::ssize_t stride = static_cast<py::ssize_t>(dtype_size(tensor.dtype));
  for (std::size_t i = shape.size(); i-- > 0;) {
    strides[i] = stride;
    stride *= shape[i];
  }
  return py::array(numpy_dtype_of(tensor.dtype), shape, strides, tensor.data, base);
}

}  // namespace dsa::python
