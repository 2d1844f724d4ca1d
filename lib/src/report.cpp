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

void emit_report(const nlohmann::json& report, const std::string& path) {
  // The command line and file names need not be valid UTF-8: such bytes become U+FFFD.
  const auto text = [&](int indent) {
    return report.dump(indent, ' ', false, nlohmann::json::error_handler_t::replace) + "\n";
  };
  if (path.empty()) {
    std::fputs(text(isatty(STDERR_FILENO) ? 2 : -1).c_str(), stderr);
    return;
  }
  OutputFile file(path);
  file.write(text(path == "-" && !isatty(STDOUT_FILENO) ? -1 : 2));
  file.commit();
}

}  // namespace dsa
