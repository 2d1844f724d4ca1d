// One exception type for every failure the toolkit reports; the apps catch it once, in main.
#pragma once

#include <stdexcept>
#include <string>
#include <utility>

#include <fmt/format.h>

namespace dsa {

// Documented exit codes (man dsa(7), DESIGN.md §4).
enum class ExitCode : int { ok = 0, runtime = 1, usage = 2, bad_input = 3 };

class Error : public std::runtime_error {
 public:
  Error(ExitCode code, const std::string& message) : std::runtime_error(message), code_(code) {}
  ExitCode code() const { return code_; }

 private:
  ExitCode code_;
};

template <typename... Args>
[[noreturn]] void fail(ExitCode code, fmt::format_string<Args...> format, Args&&... args) {
  throw Error(code, fmt::format(format, std::forward<Args>(args)...));
}

// Bad input data: a file or tensor that does not hold what it should (exit 3).
template <typename... Args>
[[noreturn]] void bad_input(fmt::format_string<Args...> format, Args&&... args) {
  fail(ExitCode::bad_input, format, std::forward<Args>(args)...);
}

// A usage error: flags that contradict each other or are out of range (exit 2).
template <typename... Args>
[[noreturn]] void bad_usage(fmt::format_string<Args...> format, Args&&... args) {
  fail(ExitCode::usage, format, std::forward<Args>(args)...);
}

// The library's messages name parameters and tensors; a caller that knows under what name the
// user gave a value (a tool's flag, the Python module's keyword) runs the library call through
// naming, which rethrows an Error from it with that name in front ("--device: device cuda: no
// GPU found"), keeping its exit code.
template <typename Call>
decltype(auto) naming(const std::string& name, Call&& call) {
  try {
    return std::forward<Call>(call)();
  } catch (const Error& e) {
    throw Error(e.code(), name + ": " + e.what());
  }
}
// The same for a call whose bad-input errors are about its tensors: only its usage errors
// (exit 2) are about the named value.
template <typename Call>
decltype(auto) naming_in_usage_errors(const std::string& name, Call&& call) {
  try {
    return std::forward<Call>(call)();
  } catch (const Error& e) {
    if (e.code() != ExitCode::usage) throw;
    throw Error(e.code(), name + ": " + e.what());
  }
}

}  // namespace dsa
