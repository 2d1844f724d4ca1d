// The f32 GEMM rate of this machine at the current thread count (one product per thread).
#pragma once

#include <cstdint>

namespace dsa::bench {

// Seconds of wall time and of CPU time (all threads of the process) since construction: on a
// shared machine the CPU time still counts only the work done while this process ran.
class Clock {
 public:
  Clock();
  double wall() const;
  double cpu() const;

 private:
  double wall_start_, cpu_start_;
};

struct Rate {
  double wall = 0;  // GFLOP per second of wall time
  double cpu = 0;   // GFLOP per CPU-second: the rate of one busy core
};

// [m x depth] * [depth x n] products, repeated for about `seconds`.
Rate gemm_rate(int64_t m, int64_t n, int64_t depth, double seconds);

}  // namespace dsa::bench
