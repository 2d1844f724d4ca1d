// The tools' progress line on a terminal: what the library's long calls report
// (dsa/progress.hpp), drawn on one line of stderr and cleared when a stage ends. Nothing is
// drawn when stderr is not a terminal, TERM is dumb, or with -q, so logs and reports are the
// same as without it; DSA_PROGRESS=always draws it anyway (tests, `script`), never never.
#pragma once

#include <memory>
#include <string>
#include <string_view>

#include "dsa/progress.hpp"

namespace dsa::app {

// "850 ms", "4.2 s", "13 s", "2 min 05 s", "1 h 02 min".
std::string format_duration(double seconds);

// "dsa-compare: compare 4096/16384 rows (25%), 13 s, ETA 39 s": the stage, what is done of it,
// the time it has taken and, from 3% done on, the time it will still take at its rate so far.
// A stage without a unit shows its percentage only; one without a total, its count.
std::string progress_line(std::string_view tool, const ProgressUpdate& update, double elapsed_s);

// While alive, the library's progress as one line on stderr, `\r` + line + `\x1b[K`, redrawn at
// most every 200 ms and cleared (`\r\x1b[K`) when a stage finishes and when it is destroyed.
class TerminalProgress {
 public:
  explicit TerminalProgress(std::string_view tool);
  ~TerminalProgress();
  TerminalProgress(const TerminalProgress&) = delete;
  TerminalProgress& operator=(const TerminalProgress&) = delete;

 private:
  void draw(const ProgressUpdate& update);

  std::string tool_;
  ProgressScope scope_;  // last: installed once the rest is ready, removed first
};

// A TerminalProgress when the line is wanted: not `quiet`, DSA_PROGRESS not "never", and
// DSA_PROGRESS "always" or stderr a terminal whose TERM is not "dumb"; else null.
std::unique_ptr<TerminalProgress> terminal_progress(std::string_view tool, bool quiet);

// Writes `line` and a newline to stderr above the progress line: a line shown is cleared first
// and drawn again by the next update (dsa-fit's evaluations, printed while it trains).
void print_above_progress(std::string_view line);

}  // namespace dsa::app
