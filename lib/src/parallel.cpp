#include "dsa/parallel.hpp"

#include <omp.h>

#include <algorithm>
#include <exception>
#include <mutex>

#include "chunks.hpp"

namespace dsa {

void set_threads(int n) {
  if (n > 0) omp_set_num_threads(n);
}

int max_threads() {
  return omp_get_max_threads();
}

namespace detail {

void parallel_ranges(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& body) {
  grain = std::max<int64_t>(grain, 1);
  const int64_t ranges = ceil_div(std::max<int64_t>(n, 0), grain);
  if (ranges <= 1) {
    if (n > 0) body(0, n);
    return;
  }
  std::exception_ptr first;
  std::mutex guard;
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t r = 0; r < ranges; ++r) {
    try {
      body(r * grain, std::min(n, (r + 1) * grain));
    } catch (...) {
      const std::lock_guard<std::mutex> lock(guard);
      if (!first) first = std::current_exception();
    }
  }
  if (first) std::rethrow_exception(first);
}

}  // namespace detail

}  // namespace dsa
