#include "cpu_kernels.hpp"

#include <atomic>
#include <cstdlib>
#include <string>
#include <vector>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "dsa/error.hpp"
#include "dsa/parallel.hpp"

namespace dsa {

namespace detail {

namespace generic {
extern const CpuKernels kernels;
}
#ifdef DSA_HAVE_X86_KERNELS
namespace avx2 {
extern const CpuKernels kernels;
}
namespace avx512 {
extern const CpuKernels kernels;
}
#endif

}  // namespace detail

namespace {

using detail::CpuKernels;

// Widest first.
std::vector<const CpuKernels*> runnable_kernels() {
  std::vector<const CpuKernels*> sets;
#ifdef DSA_HAVE_X86_KERNELS
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("fma")) {
    sets.push_back(&detail::avx512::kernels);
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
    sets.push_back(&detail::avx2::kernels);
#endif
  sets.push_back(&detail::generic::kernels);
  return sets;
}

const CpuKernels* find_kernels(const std::string& name) {
  for (const CpuKernels* set : runnable_kernels())
    if (name == set->name) return set;
  bad_usage("CPU kernels '{}' do not run on this CPU (it runs: {})", name,
            fmt::join(available_cpu_kernels(), ", "));
}

// The first use may be on any thread, inside a parallel loop: a bad DSA_CPU_KERNELS is reported
// on stderr, not thrown.
std::atomic<const CpuKernels*>& chosen() {
  static std::atomic<const CpuKernels*> kernels = [] {
    const std::vector<const CpuKernels*> sets = runnable_kernels();
    const char* name = std::getenv("DSA_CPU_KERNELS");
    if (!name || !*name) return sets.front();
    for (const CpuKernels* set : sets)
      if (std::string(name) == set->name) return set;
    fmt::print(stderr, "dsa: DSA_CPU_KERNELS={} does not run on this CPU (it runs: {}); using {}\n",
               name, fmt::join(available_cpu_kernels(), ", "), sets.front()->name);
    return sets.front();
  }();
  return kernels;
}

}  // namespace

const detail::CpuKernels& detail::cpu_kernels() {
  return *chosen().load(std::memory_order_relaxed);
}

std::vector<std::string> available_cpu_kernels() {
  std::vector<std::string> names;
  for (const CpuKernels* set : runnable_kernels()) names.emplace_back(set->name);
  return names;
}

std::string cpu_kernels_name() {
  return detail::cpu_kernels().name;
}

void set_cpu_kernels(const std::string& name) {
  chosen().store(find_kernels(name), std::memory_order_relaxed);
}

}  // namespace dsa
