#include "progress.hpp"

#include <sys/ioctl.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <mutex>

#include <fmt/format.h>

namespace dsa::app {

namespace {

constexpr auto kRedraw = std::chrono::milliseconds(200);
constexpr double kEtaFrom = 0.03;  // the fraction done before an ETA is shown

// What stderr shows: one line at a time, whichever TerminalProgress or print drew it.
std::mutex stderr_lock;
bool line_shown = false;
std::chrono::steady_clock::time_point last_draw;

void write_stderr(std::string_view text) {
  std::fwrite(text.data(), 1, text.size(), stderr);
  std::fflush(stderr);
}

// Clears the line shown, if any (stderr_lock held).
void clear_line() {
  if (!line_shown) return;
  write_stderr("\r\x1b[K");
  line_shown = false;
}

// The terminal's width, or 0 where stderr is not one (DSA_PROGRESS=always on a pipe).
std::size_t terminal_columns() {
  winsize size{};
  if (ioctl(STDERR_FILENO, TIOCGWINSZ, &size) != 0) return 0;
  return size.ws_col;
}

}  // namespace

std::string format_duration(double seconds) {
  if (!(seconds > 0)) seconds = 0;
  const double ms = std::round(seconds * 1e3);
  if (ms < 1000) return fmt::format("{} ms", static_cast<int64_t>(ms));
  if (std::round(seconds * 10) < 100) return fmt::format("{:.1f} s", seconds);
  const auto s = static_cast<int64_t>(std::round(seconds));
  if (s < 60) return fmt::format("{} s", s);
  if (s < 3600) return fmt::format("{} min {:02} s", s / 60, s % 60);
  const auto minutes = static_cast<int64_t>(std::round(seconds / 60));
  return fmt::format("{} h {:02} min", minutes / 60, minutes % 60);
}

std::string progress_line(std::string_view tool, const ProgressUpdate& u, double elapsed_s) {
  std::string line = fmt::format("{}: {}", tool, u.stage);
  const double fraction =
      u.total > 0 ? static_cast<double>(u.done) / static_cast<double>(u.total) : 0.0;
  const auto percent = static_cast<int64_t>(std::floor(fraction * 100));
  if (u.total > 0 && u.unit.empty()) {
    line += fmt::format(" {}%", percent);
  } else if (u.total > 0) {
    line += fmt::format(" {}/{} {} ({}%)", u.done, u.total, u.unit, percent);
  } else if (!u.unit.empty()) {
    line += fmt::format(" {} {}", u.done, u.unit);
  }
  line += ", " + format_duration(elapsed_s);
  if (u.total > 0 && u.done < u.total && fraction >= kEtaFrom) {
    line += ", ETA " + format_duration(elapsed_s * (1 - fraction) / fraction);
  }
  return line;
}

TerminalProgress::TerminalProgress(std::string_view tool)
    : tool_(tool), scope_([this](const ProgressUpdate& u) { draw(u); }) {}

TerminalProgress::~TerminalProgress() {
  const std::lock_guard<std::mutex> lock(stderr_lock);
  clear_line();
}

void TerminalProgress::draw(const ProgressUpdate& u) {
  const std::lock_guard<std::mutex> lock(stderr_lock);
  if (u.finished) {
    clear_line();
    return;
  }
  const auto now = std::chrono::steady_clock::now();
  if (line_shown && now - last_draw < kRedraw) return;
  std::string line = progress_line(tool_, u, u.seconds);
  // Longer than the terminal, it would wrap, and `\r` would redraw only its last row.
  const std::size_t columns = terminal_columns();
  if (columns > 1 && line.size() >= columns) line.resize(columns - 1);
  write_stderr("\r" + line + "\x1b[K");
  line_shown = true;
  last_draw = now;
}

std::unique_ptr<TerminalProgress> terminal_progress(std::string_view tool, bool quiet) {
  if (quiet) return nullptr;
  const char* setting = std::getenv("DSA_PROGRESS");
  const std::string_view mode = setting ? setting : "";
  if (mode == "never") return nullptr;
  if (mode != "always") {
    const char* term = std::getenv("TERM");
    if (!isatty(STDERR_FILENO) || (term && std::string_view(term) == "dumb")) return nullptr;
  }
  return std::make_unique<TerminalProgress>(tool);
}

void print_above_progress(std::string_view line) {
  const std::lock_guard<std::mutex> lock(stderr_lock);
  clear_line();
  write_stderr(std::string(line) + "\n");
}

}  // namespace dsa::app
