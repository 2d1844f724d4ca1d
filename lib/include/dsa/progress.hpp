// Progress of long library calls, for a caller that shows it (the tools' line on a terminal).
// The library only counts; what is shown, where and when is the caller's.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string_view>

namespace dsa {

// Where one stage of a library call stands. Stages and units are short, stable names:
// "score", "select", "attend", "compare" and "compress" count query rows (entries for
// "compress"), times the batch; "generate" (dsa-gen) counts tokens; "fit" counts steps; "calibrate" has no unit (done and total are
// microseconds of its timing budget, a fraction to show as a percentage).
struct ProgressUpdate {
  std::string_view stage;
  int64_t done = 0, total = 0;     // 0 <= done <= total, never decreasing within a stage
  bool finished = false;           // the stage's last update: exactly one per stage
  double seconds = 0;              // since the stage began
  std::string_view unit = "rows";  // what done and total count; empty: a fraction only
};
using ProgressCallback = std::function<void(const ProgressUpdate&)>;

// While alive, library calls made by the constructing thread report their blocked loops'
// progress to `callback`: from any thread (the loops' workers too), never concurrently, at most
// once per `interval` while a stage runs, plus once with finished = true when it ends (normally
// or by an exception). The callback must be quick and must not throw (what it throws is
// dropped). Scopes nest; the innermost wins; an empty callback silences the calls made inside.
// A stage that calls the library owns the scope until it ends: the calls inside it (dsa-compare
// attending, dsa-fit evaluating) report nothing, so one stage at a time holds the caller's line.
// Without a scope the loops' counting costs one branch. Results do not depend on a scope.
class ProgressScope {
 public:
  explicit ProgressScope(ProgressCallback callback,
                         std::chrono::nanoseconds interval = std::chrono::milliseconds(50));
  ~ProgressScope();
  ProgressScope(const ProgressScope&) = delete;
  ProgressScope& operator=(const ProgressScope&) = delete;

  struct State;

 private:
  std::unique_ptr<State> state_;
};

}  // namespace dsa
