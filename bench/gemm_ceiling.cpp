// The machine's f32 ceiling: an Eigen matrix product, built for this machine (-march=native,
// this file only) so that it uses the widest vectors the CPU has. Eigen's index type is int
// here, so none of these instantiations can merge with the library's (portable) ones.
#include "gemm_ceiling.hpp"

#include <time.h>

#include <omp.h>
#include <Eigen/Core>

namespace dsa::bench {

namespace {

double now(clockid_t clock) {
  timespec t;
  clock_gettime(clock, &t);
  return static_cast<double>(t.tv_sec) + 1e-9 * static_cast<double>(t.tv_nsec);
}

}  // namespace

Clock::Clock() : wall_start_(now(CLOCK_MONOTONIC)), cpu_start_(now(CLOCK_PROCESS_CPUTIME_ID)) {}
double Clock::wall() const {
  return now(CLOCK_MONOTONIC) - wall_start_;
}
double Clock::cpu() const {
  return now(CLOCK_PROCESS_CPUTIME_ID) - cpu_start_;
}

Rate gemm_rate(int64_t m, int64_t n, int64_t depth, double seconds) {
  const int threads = omp_get_max_threads();
  int64_t repeats = 0;
  double elapsed = 0, cpu = 0;
#pragma omp parallel num_threads(threads)
  {
    // One independent product per thread: the rate every core can sustain at once.
    const Eigen::MatrixXf a = Eigen::MatrixXf::Random(static_cast<int>(m), static_cast<int>(depth));
    const Eigen::MatrixXf b = Eigen::MatrixXf::Random(static_cast<int>(depth), static_cast<int>(n));
    Eigen::MatrixXf c(static_cast<int>(m), static_cast<int>(n));
    c.noalias() = a * b;  // warm-up
#pragma omp barrier
    Clock clock;
    int64_t done = 0;
    bool more = true;
    while (more) {
      c.noalias() = a * b;
      ++done;
#pragma omp barrier
#pragma omp single
      {
        elapsed = clock.wall();
        cpu = clock.cpu();
      }
      more = elapsed < seconds;
#pragma omp barrier
    }
#pragma omp master
    repeats = done;
  }
  const double gflop =
      2.0 * static_cast<double>(m * n * depth) * static_cast<double>(repeats * threads) / 1e9;
  return {gflop / elapsed, gflop / cpu};
}

}  // namespace dsa::bench
