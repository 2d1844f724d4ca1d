// Run reports: version, command line, inputs, device, threads, timings per stage, memory.
#pragma once

#include <chrono>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "dsa/device.hpp"
#include "dsa/tensor.hpp"

namespace dsa {

std::string version();

// Each tool's report schema (man dsa(7) has the glossary of their fields). dsa-compare's,
// dsa-cost's and dsa-fit's are in metrics.hpp, cost.hpp and fit.hpp.
inline constexpr const char* kScoreSchema = "dsa-score/1";
inline constexpr const char* kSelectSchema = "dsa-select/1";
inline constexpr const char* kAttendSchema = "dsa-attend/1";
inline constexpr const char* kCompressSchema = "dsa-compress/1";
inline constexpr const char* kGenSchema = "dsa-gen/1";

class Stopwatch {
 public:
  Stopwatch() : start_(std::chrono::steady_clock::now()) {}
  double seconds() const {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  }

 private:
  std::chrono::steady_clock::time_point start_;
};

// Wall time per named stage, accumulated over blocks, in first-seen order.
class StageTimes {
 public:
  void add(const std::string& stage, double seconds);
  double get(const std::string& stage) const;
  nlohmann::json to_json() const;  // {"stage_ms": ...}

 private:
  std::vector<std::pair<std::string, double>> stages_;
};

// {"name", "shape", "dtype"}, and for a floating-point tensor "non_finite": its count of NaN
// and infinite values.
nlohmann::json tensor_json(const Tensor& tensor);
nlohmann::json number_or_null(double x);  // NaN (undefined) as null
int64_t peak_rss_bytes();

// The fields every report carries; the app adds its own.
nlohmann::json report_header(const std::string& tool, int argc, const char* const* argv);
// The report's "device", and "device_note" when --device auto fell back to the CPU.
void report_device(nlohmann::json& report, const DeviceChoice& choice);
// The report's "timings_ms": each stage's, and the total.
nlohmann::json timings_json(const StageTimes& times, double total_seconds);
// Adds "timings_ms" and "peak_rss_bytes" to a report, and "peak_device_bytes" (the GPU memory
// its buffers held at once, peak_device_bytes) when something ran on a GPU.
void add_timings(nlohmann::json& report, const StageTimes& times, double total_seconds);

// Pretty when the destination is a terminal, one line otherwise. An empty path means stderr.
void emit_report(const nlohmann::json& report, const std::string& path);
// The text emit_report writes to `path` (`-` stdout, empty stderr), newline-terminated.
std::string report_text(const nlohmann::json& report, const std::string& path);

}  // namespace dsa
