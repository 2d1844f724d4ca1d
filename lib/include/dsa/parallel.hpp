// The CPU backend's settings: thread count (OpenMP) and kernels (instruction set).
#pragma once

#include <string>
#include <vector>

namespace dsa {

// n <= 0 keeps the default (OMP_NUM_THREADS or every core).
void set_threads(int n);
int max_threads();

// The hot loops are built for several instruction sets ("avx512", "avx2", "generic"); the widest
// this CPU runs is used unless the environment variable DSA_CPU_KERNELS names another.
std::vector<std::string> available_cpu_kernels();  // widest first
std::string cpu_kernels_name();                    // in use
// Throws Error(usage) for a set this CPU cannot run. Results differ between sets only by rounding.
void set_cpu_kernels(const std::string& name);

}  // namespace dsa
