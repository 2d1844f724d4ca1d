#include "progress.hpp"

#include <algorithm>
#include <chrono>
#include <mutex>
#include <utility>

namespace dsa {

struct ProgressScope::State {
  ProgressCallback callback;
  int64_t interval_ns = 0;
  State* outer = nullptr;
  std::mutex lock;    // the callback runs under it: never concurrently
  bool held = false;  // a Progress reports to it (touched by the scope's own thread only)
};

namespace {

// The scopes of this thread, innermost first through `outer`.
thread_local ProgressScope::State* current_scope = nullptr;

int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

}  // namespace

ProgressScope::ProgressScope(ProgressCallback callback, std::chrono::nanoseconds interval)
    : state_(std::make_unique<State>()) {
  state_->callback = std::move(callback);
  state_->interval_ns = std::max<int64_t>(0, interval.count());
  state_->outer = current_scope;
  current_scope = state_.get();
}

ProgressScope::~ProgressScope() {
  current_scope = state_->outer;
}

namespace detail {

Progress::Progress(std::string_view stage, int64_t total, std::string_view unit)
    : stage_(stage), unit_(unit), total_(std::max<int64_t>(0, total)) {
  ProgressScope::State* scope = current_scope;
  if (!scope || !scope->callback || scope->held) return;
  scope->held = true;
  scope_ = scope;
  start_ns_ = now_ns();
  next_ns_.store(start_ns_ + scope->interval_ns, std::memory_order_relaxed);
}

Progress::~Progress() {
  try {
    finish();
  } catch (...) {  // a lock that cannot be taken: the update is lost, the stage still ends
    if (scope_) scope_->held = false;
  }
}

void Progress::record(int64_t n) {
  done_.fetch_add(n, std::memory_order_relaxed);
  const int64_t now = now_ns();
  if (now < next_ns_.load(std::memory_order_relaxed)) return;
  const std::unique_lock<std::mutex> lock(scope_->lock, std::try_to_lock);
  if (!lock.owns_lock() || now < next_ns_.load(std::memory_order_relaxed)) return;
  next_ns_.store(now + scope_->interval_ns, std::memory_order_relaxed);
  report(false);
}

void Progress::finish() {
  if (!scope_) return;
  {
    const std::lock_guard<std::mutex> lock(scope_->lock);
    report(true);
  }
  scope_->held = false;
  scope_ = nullptr;
}

void Progress::report(bool finished) {
  int64_t done = done_.load(std::memory_order_relaxed);
  if (total_ > 0) done = std::min(done, total_);
  done = std::max(done, reported_);
  reported_ = done;
  const double seconds = static_cast<double>(now_ns() - start_ns_) * 1e-9;
  try {
    scope_->callback({stage_, done, total_, finished, seconds, unit_});
  } catch (...) {  // a display's failure must not stop the computation (dsa/progress.hpp)
  }
}

}  // namespace detail

}  // namespace dsa
