// Internal: how the CPU backend walks query rows in bounded memory.
#pragma once

#include <algorithm>
#include <cstdint>
#include <functional>

#include "dsa/parallel.hpp"

namespace dsa::detail {

// Rows handled per chunk: enough blocks to keep every thread busy (two each), capped so the
// chunk's per-row buffers stay under `budget_bytes`, and never fewer than one block.
inline int64_t chunk_rows(int64_t block, int64_t bytes_per_row, int64_t budget_bytes = 256 << 20) {
  const int64_t wanted = block * 2 * max_threads();
  const int64_t affordable = budget_bytes / std::max<int64_t>(bytes_per_row, 1);
  return std::max(block, std::min(wanted, affordable / block * block));
}

// body(begin, end) over [0, n) in ranges of `grain` items on the OpenMP threads; each item must
// be independent of the others, so the result does not depend on the thread count. Callable
// from code that is not built with OpenMP (the CUDA backend's host side). The first exception
// a range throws is rethrown here once every thread has stopped.
void parallel_ranges(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& body);

inline int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

}  // namespace dsa::detail
