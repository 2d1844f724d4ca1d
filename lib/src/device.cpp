#include "dsa/device.hpp"

#include "dsa/error.hpp"
#ifdef DSA_HAVE_CUDA
#include "cuda_backend.hpp"
#endif

namespace dsa {

namespace {

std::string cuda_unavailable_reason() {
#ifdef DSA_HAVE_CUDA
  return cuda::unavailable_reason();
#else
  return "this build of dsa has no CUDA backend (configure with nvcc on the PATH)";
#endif
}

}  // namespace

bool cuda_available() {
  return cuda_unavailable_reason().empty();
}

Device resolve_device(const std::string& name) {
  if (name == "cpu") return Device::cpu;
  if (name == "auto") return cuda_available() ? Device::cuda : Device::cpu;
  if (name == "cuda") {
    const std::string why = cuda_unavailable_reason();
    if (!why.empty()) fail(ExitCode::runtime, "--device cuda: {}", why);
    return Device::cuda;
  }
  bad_usage("unknown device '{}': expected cpu, cuda or auto", name);
}

std::string device_description(Device device) {
#ifdef DSA_HAVE_CUDA
  if (device == Device::cuda) return cuda::describe();
#endif
  (void)device;
  return "cpu";
}

}  // namespace dsa
