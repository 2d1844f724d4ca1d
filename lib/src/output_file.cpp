// Outputs that appear only when complete: a temporary file renamed over the path on commit,
// removed when the process ends by a signal.
#include "dsa/io.hpp"

#include <pthread.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <iterator>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "dsa/error.hpp"
#include "io_formats.hpp"

namespace dsa {

using detail::errno_text;

namespace {

// The temporary files of the OutputFiles alive now, for the signal handler: fixed slots of
// lock-free atomics, since a handler may neither allocate nor take a lock.
constexpr int kCleanupSignals[] = {SIGINT, SIGTERM, SIGHUP, SIGPIPE};
std::atomic<const char*> temp_files[16];
static_assert(std::atomic<const char*>::is_always_lock_free);

bool register_temp_file(const char* path) {
  for (auto& slot : temp_files) {
    const char* empty = nullptr;
    if (slot.compare_exchange_strong(empty, path)) return true;
  }
  return false;
}

void unregister_temp_file(const char* path) {
  for (auto& slot : temp_files) {
    const char* expected = path;
    slot.compare_exchange_strong(expected, nullptr);
  }
}

// Async-signal-safe: unlink(2) and raise(3) only. SA_RESETHAND has restored the default
// action, which ends the process by the same signal once the handler returns.
extern "C" void remove_temp_files_and_reraise(int signal) {
  for (auto& slot : temp_files) {
    if (const char* path = slot.load()) ::unlink(path);
  }
  ::raise(signal);
}

// Blocks the cleanup signals while alive, so a temporary file is never created unregistered.
class CleanupSignalsBlocked {
 public:
  CleanupSignalsBlocked() {
    sigset_t set;
    sigemptyset(&set);
    for (int signal : kCleanupSignals) sigaddset(&set, signal);
    pthread_sigmask(SIG_BLOCK, &set, &old_);
  }
  ~CleanupSignalsBlocked() { pthread_sigmask(SIG_SETMASK, &old_, nullptr); }

 private:
  sigset_t old_;
};

}  // namespace

void install_signal_cleanup() {
  for (int signal : kCleanupSignals) {
    struct sigaction old {};
    sigaction(signal, nullptr, &old);
    if (old.sa_handler == SIG_IGN) continue;  // nohup and `cmd &` keep theirs
    struct sigaction action {};
    action.sa_handler = remove_temp_files_and_reraise;
    sigemptyset(&action.sa_mask);
    action.sa_flags = SA_RESETHAND;
    sigaction(signal, &action, nullptr);
  }
  std::signal(SIGXFSZ, SIG_IGN);
}

namespace {

// How an output path other than `-` is written: in place (a device, FIFO or /dev/fd/N: renaming
// over it would replace it), or through a temporary file beside it, whose mkstemp template
// (".NAME.KIND.XXXXXX" in its directory) this returns. A directory is a usage error.
std::string temporary_template(const std::string& path, const char* kind, bool& in_place) {
  struct stat st {};
  const bool exists = ::stat(path.c_str(), &st) == 0;
  if (exists && S_ISDIR(st.st_mode))
    fail(ExitCode::usage, "output path '{}' names a directory", path);
  in_place = exists && !S_ISREG(st.st_mode);
  if (in_place) return {};
  const std::size_t slash = path.rfind('/');
  const std::string base = slash == std::string::npos ? path : path.substr(slash + 1);
  if (base.empty()) fail(ExitCode::usage, "output path '{}' names a directory", path);
  const std::string dir = slash == std::string::npos ? "" : path.substr(0, slash + 1);
  return fmt::format("{}.{}.{}.XXXXXX", dir, base, kind);
}

}  // namespace

OutputFile::OutputFile(const std::string& path) : path_(path) {
  if (path == "-") {
    file_ = stdout;
    return;
  }
  bool in_place = false;
  const std::string temp = temporary_template(path, "tmp", in_place);
  if (in_place) {
    file_ = std::fopen(path.c_str(), "wb");
    if (file_ == nullptr) fail(ExitCode::runtime, "cannot write '{}': {}", path, errno_text());
    return;
  }
  std::vector<char> name(temp.begin(), temp.end());
  name.push_back('\0');
  const CleanupSignalsBlocked blocked;
  const int fd = ::mkstemp(name.data());
  if (fd < 0) fail(ExitCode::runtime, "cannot write '{}': {}", path, errno_text());
  temp_path_ = name.data();
  if (!register_temp_file(temp_path_.c_str())) {
    ::close(fd);
    ::unlink(temp_path_.c_str());
    fail(ExitCode::runtime, "cannot write '{}': more than {} outputs open at once", path,
         std::size(temp_files));
  }
  const mode_t mask = ::umask(0);
  ::umask(mask);
  ::fchmod(fd, 0666 & ~mask);
  file_ = ::fdopen(fd, "wb");
}

void check_output(const std::string& spec) {
  const std::string path = parse_tensor_spec(spec).path;
  if (path == "-") return;
  bool in_place = false;
  // A probe, not an output: named apart from the outputs' ".tmp." files, and created and
  // removed with the cleanup signals blocked, so that no signal finds it.
  const std::string probe = temporary_template(path, "probe", in_place);
  if (in_place) {
    if (::access(path.c_str(), W_OK) != 0) {
      fail(ExitCode::runtime, "cannot write '{}': {}", path, errno_text());
    }
    return;
  }
  std::vector<char> name(probe.begin(), probe.end());
  name.push_back('\0');
  const CleanupSignalsBlocked blocked;
  const int fd = ::mkstemp(name.data());
  if (fd < 0) fail(ExitCode::runtime, "cannot write '{}': {}", path, errno_text());
  ::close(fd);
  ::unlink(name.data());
}

OutputFile::~OutputFile() {
  if (file_ != nullptr && file_ != stdout) std::fclose(file_);
  if (!temp_path_.empty()) {
    if (!committed_) ::unlink(temp_path_.c_str());
    unregister_temp_file(temp_path_.c_str());
  }
}

void OutputFile::write(const void* data, std::size_t size) {
  if (size == 0) return;
  if (std::fwrite(data, 1, size, file_) != size) {
    fail(ExitCode::runtime, "cannot write '{}': {}", path_, errno_text());
  }
}

void OutputFile::commit() {
  if (std::fflush(file_) != 0)
    fail(ExitCode::runtime, "cannot write '{}': {}", path_, errno_text());
  if (file_ != stdout) {
    const int rc = std::fclose(file_);
    file_ = nullptr;
    if (rc != 0) fail(ExitCode::runtime, "cannot write '{}': {}", path_, errno_text());
    if (!temp_path_.empty() && std::rename(temp_path_.c_str(), path_.c_str()) != 0) {
      fail(ExitCode::runtime, "cannot write '{}': {}", path_, errno_text());
    }
  }
  committed_ = true;
}

}  // namespace dsa
