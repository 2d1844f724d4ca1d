// Where the numbers are computed: the CPU backend (always there) or the CUDA backend.
#pragma once

#include <cstdint>
#include <string>

namespace dsa {

enum class Device { cpu, cuda };

// "cpu", "cuda" or "auto" (the GPU when this build has the CUDA backend and a GPU is there).
// "cuda" without a usable GPU is an Error(runtime) saying why. An operation's own choose_device
// (indexer.hpp, attention.hpp, metrics.hpp) also asks the backend whether it takes the inputs.
Device resolve_device(const std::string& name);
bool cuda_available();
// "cpu" or "cuda", as resolve_device reads them.
std::string device_name(Device device);
// "cpu" or e.g. "cuda:0 NVIDIA H100 80GB HBM3 (132 SMs)".
std::string device_description(Device device);
// An MPI rank's GPU (docs/DESIGN.md section 8): every later CUDA call of this process uses the
// local_rank-th GPU of this host (modulo their count). Returns its index, or -1 without GPUs
// (nothing changes then). Call it before any other CUDA work.
int use_local_gpu(int local_rank);
// The most GPU memory the CUDA backend's buffers held at once in this process, in bytes (0 when
// nothing ran on a GPU, or this build has no CUDA backend).
int64_t peak_device_bytes();

// Where an operation runs, and with --device auto why it runs on the CPU (empty otherwise).
struct DeviceChoice {
  Device device = Device::cpu;
  std::string note;
};

}  // namespace dsa
