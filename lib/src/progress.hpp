// Internal: the counter a blocked loop reports its progress through (dsa/progress.hpp).
#pragma once

#include <atomic>
#include <cstdint>
#include <string_view>

#include "dsa/progress.hpp"

namespace dsa::detail {

// One stage of a library call: constructed on the calling thread, which captures the scope
// installed there (OpenMP's workers see no thread_local of the caller), then advanced from any
// thread. Inactive, at the cost of one branch per advance, when the thread has no scope, the
// scope's callback is empty, or another Progress already holds the scope (the outermost stage
// owns the line; the library calls it makes report nothing). Reports finished when it is
// finished or destroyed, so a stage left by an exception ends too. The scope must outlive it.
class Progress {
 public:
  Progress(std::string_view stage, int64_t total, std::string_view unit = "rows");
  ~Progress();
  Progress(const Progress&) = delete;
  Progress& operator=(const Progress&) = delete;

  // Thread-safe: an atomic add and a clock read; a report at most once per the scope's
  // interval, skipped (never waited for) while another thread is reporting.
  void advance(int64_t n) {
    if (scope_) record(n);
  }
  // The stage's finished report (once; the destructor's is then none).
  void finish();

 private:
  void record(int64_t n);
  void report(bool finished);

  ProgressScope::State* scope_ = nullptr;
  std::string_view stage_, unit_;
  int64_t total_ = 0;
  int64_t start_ns_ = 0;
  std::atomic<int64_t> done_{0};
  std::atomic<int64_t> next_ns_{0};
  int64_t reported_ = 0;  // the last done reported, under the scope's lock
};

}  // namespace dsa::detail
