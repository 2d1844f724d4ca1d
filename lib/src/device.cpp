// The backend registry: which backends this build has (the one place that reads DSA_HAVE_CUDA),
// and which one runs an operation (docs/DESIGN.md section 5).
#include "dsa/device.hpp"

#include "backend.hpp"
#include "dsa/error.hpp"

#ifdef DSA_HAVE_CUDA
namespace dsa::cuda {
const detail::Backend& backend();  // lib/cuda/backend.cu
}
#endif

namespace dsa {

namespace detail {

namespace {

const Backend& cpu_backend() {
  static const Backend table{Device::cpu,
                             [] { return std::string(); },
                             [] { return std::string("cpu"); },
                             [](const Operation&) { return std::string(); },
                             cpu_indexer_scores,
                             cpu_select_from_indexer,
                             cpu_attention,
                             cpu_compressed_attention,
                             cpu_compress,
                             cpu_time_layer,
                             int64_t{64} << 20,
                             cpu_compare_engine,
                             [] { return int64_t{0}; },
                             [](int) { return -1; }};
  return table;
}

// The CUDA backend, or null when this build has none.
const Backend* cuda_backend() {
#ifdef DSA_HAVE_CUDA
  return &cuda::backend();
#else
  return nullptr;
#endif
}

std::string cuda_unavailable_reason() {
  const Backend* cuda = cuda_backend();
  return cuda ? cuda->unavailable()
              : "this build of dsa has no CUDA backend (configure with nvcc on the PATH)";
}

}  // namespace

}  // namespace detail

int use_local_gpu(int local_rank) {
  const detail::Backend* cuda = detail::cuda_backend();
  return cuda ? cuda->select_device(local_rank) : -1;
}

int64_t peak_device_bytes() {
  const detail::Backend* cuda = detail::cuda_backend();
  return cuda ? cuda->peak_memory_bytes() : 0;
}

namespace detail {

const Backend& backend(Device device) {
  if (device == Device::cpu) return cpu_backend();
  const std::string why = cuda_unavailable_reason();
  if (!why.empty()) fail(ExitCode::runtime, "device cuda: {}", why);
  return *cuda_backend();
}

const Backend& backend(Device device, const Operation& op) {
  const Backend& chosen = backend(device);
  const std::string limit = chosen.check(op);
  if (!limit.empty()) fail(ExitCode::usage, "{}", limit);
  return chosen;
}

DeviceChoice choose_device(const std::string& name, const Operation& op) {
  const Device wanted = resolve_device(name);
  if (wanted == Device::cpu) {
    if (name == "auto")
      return {Device::cpu, "auto: " + cuda_unavailable_reason() + "; ran on the CPU"};
    return {Device::cpu, ""};
  }
  const std::string limit = cuda_backend()->check(op);  // resolve_device found it usable
  if (limit.empty()) return {Device::cuda, ""};
  if (name == "cuda") fail(ExitCode::usage, "device cuda: {}", limit);
  return {Device::cpu, "auto: " + limit + "; ran on the CPU"};
}

}  // namespace detail

bool cuda_available() {
  return detail::cuda_unavailable_reason().empty();
}

Device resolve_device(const std::string& name) {
  if (name == "cpu") return Device::cpu;
  if (name == "auto") return cuda_available() ? Device::cuda : Device::cpu;
  if (name == "cuda") {
    const std::string why = detail::cuda_unavailable_reason();
    if (!why.empty()) fail(ExitCode::runtime, "device cuda: {}", why);
    return Device::cuda;
  }
  bad_usage("unknown device '{}': expected cpu, cuda or auto", name);
}

std::string device_name(Device device) {
  return device == Device::cuda ? "cuda" : "cpu";
}

std::string device_description(Device device) {
  return detail::backend(device).describe();
}

DeviceChoice choose_device(const std::string& name, const IndexerInputs& inputs,
                           const IndexerConfig& config, int64_t topk) {
  return detail::choose_device(name, {&inputs, &config, topk, nullptr, false});
}

DeviceChoice choose_device(const std::string& name, const AttentionInputs& inputs) {
  return detail::choose_device(name, {nullptr, nullptr, 0, &inputs, false});
}

}  // namespace dsa
