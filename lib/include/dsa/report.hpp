// Run reports: version, command line, inputs, device, threads, timings per stage, memory.
#pragma once

#include <chrono>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "dsa/tensor.hpp"

namespace dsa {

std::string version();

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

// Pretty when the destination is a terminal, one line otherwise. An empty path means stderr.
void emit_report(const nlohmann::json& report, const std::string& path);

}  // namespace dsa
