// The f32 GEMM rate of this machine at the current thread count (one product per thread).
#pragma once

#include <cstdint>

namespace dsa::bench {

// GFLOP/s of [m x depth] * [depth x n] products, repeated for about `seconds`.
double gemm_gflops(int64_t m, int64_t n, int64_t depth, double seconds);

}  // namespace dsa::bench
