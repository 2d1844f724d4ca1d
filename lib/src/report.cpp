#include "dsa/report.hpp"

#include <sys/resource.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>

#include "dsa/error.hpp"
#include "dsa/io.hpp"
#include "dsa/parallel.hpp"
#include "dsa/version.hpp"

namespace dsa {

std::string version() {
  return kVersion;
}

nlohmann::json number_or_null(double x) {
  return std::isnan(x) ? nlohmann::json(nullptr) : nlohmann::json(x);
}

void StageTimes::add(const std::string& stage, double seconds) {
  for (auto& [name, total] : stages_) {
    if (name == stage) {
      total += seconds;
      return;
    }
  }
  stages_.emplace_back(stage, seconds);
}

double StageTimes::get(const std::string& stage) const {
  for (const auto& [name, total] : stages_) {
    if (name == stage) return total;
  }
  return 0.0;
}

nlohmann::json StageTimes::to_json() const {
  nlohmann::json out = nlohmann::json::object();
  for (const auto& [name, total] : stages_) out[name] = total * 1e3;
  return out;
}

nlohmann::json tensor_json(const Tensor& tensor) {
  nlohmann::json out = {
      {"name", tensor.name}, {"shape", tensor.shape}, {"dtype", dtype_name(tensor.dtype)}};
  if (is_floating(tensor.dtype)) out["non_finite"] = count_non_finite(tensor);
  return out;
}

int64_t peak_rss_bytes() {
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  return static_cast<int64_t>(usage.ru_maxrss) * 1024;
}

nlohmann::json report_header(const std::string& tool, int argc, const char* const* argv) {
  std::vector<std::string> command(argv, argv + argc);
  return {{"tool", tool},
          {"version", version()},
          {"command", command},
          {"device", "cpu"},
          {"threads", max_threads()}};
}

void report_device(nlohmann::json& report, const DeviceChoice& choice) {
  report["device"] = device_description(choice.device);
  if (!choice.note.empty()) report["device_note"] = choice.note;
}

nlohmann::json timings_json(const StageTimes& times, double total_seconds) {
  nlohmann::json timings = times.to_json();
  timings["total"] = total_seconds * 1e3;
  return timings;
}

void add_timings(nlohmann::json& report, const StageTimes& times, double total_seconds) {
  report["timings_ms"] = timings_json(times, total_seconds);
  report["peak_rss_bytes"] = peak_rss_bytes();
  if (const int64_t device = peak_device_bytes(); device > 0) report["peak_device_bytes"] = device;
}

std::string report_text(const nlohmann::json& report, const std::string& path) {
  const bool terminal =
      path.empty() ? isatty(STDERR_FILENO) != 0 : path == "-" && isatty(STDOUT_FILENO) != 0;
  // The command line and file names need not be valid UTF-8: such bytes become U+FFFD.
  return report.dump(terminal || (!path.empty() && path != "-") ? 2 : -1, ' ', false,
                     nlohmann::json::error_handler_t::replace) +
         "\n";
}

void emit_report(const nlohmann::json& report, const std::string& path) {
  if (path.empty()) {
    std::fputs(report_text(report, path).c_str(), stderr);
    return;
  }
  OutputFile file(path);
  file.write(report_text(report, path));
  file.commit();
}

}  // namespace dsa
