// Any tensor file: read by its first bytes (a regular file mapped, a stream read part by part)
// and written by its extension; the formats themselves are in npy.cpp and safetensors.cpp.
#include "dsa/io.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "dsa/error.hpp"
#include "io_formats.hpp"

namespace dsa {

namespace detail {

bool ends_with(const std::string& s, std::string_view suffix) {
  return s.size() >= suffix.size() &&
         s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

uint64_t read_le(const std::byte* p, int bytes) {
  uint64_t v = 0;
  for (int i = bytes - 1; i >= 0; --i) v = (v << 8) | static_cast<uint8_t>(p[i]);
  return v;
}

std::string errno_text() {
  return std::strerror(errno);
}

int64_t header_numel(const Shape& shape, const std::string& where) {
  try {
    return shape_numel(shape);
  } catch (const Error& e) {
    bad_input("{}: {}", where, e.what());
  }
}

}  // namespace detail

namespace {

using detail::ends_with;
using detail::errno_text;
using detail::header_numel;
using detail::looks_like_npy;
using detail::looks_like_safetensors;
using detail::Mapping;
using detail::npy_header_bounds;
using detail::npy_header_tensor;
using detail::safetensors_header_entries;
using detail::safetensors_header_size;

// Reads from `file` until `buffer` holds `size` bytes or the stream ends; the buffer grows by
// doubling but never beyond `size`, so a header that overstates its data costs no memory
// until the data arrives.
void read_up_to(std::FILE* file, std::vector<std::byte>& buffer, std::size_t size,
                const std::string& name) {
  while (buffer.size() < size) {
    const std::size_t had = buffer.size();
    const std::size_t chunk = std::min<std::size_t>(size - had, 1 << 20);
    if (buffer.capacity() < had + chunk) {
      buffer.reserve(std::min(size, std::max(had + chunk, 2 * had)));
    }
    buffer.resize(had + chunk);
    const std::size_t n = std::fread(buffer.data() + had, 1, chunk, file);
    buffer.resize(had + n);
    if (n < chunk) {
      if (std::ferror(file)) bad_input("{}: read error: {}", name, errno_text());
      return;
    }
  }
}

uint64_t physical_memory() {
  const long pages = ::sysconf(_SC_PHYS_PAGES), page_size = ::sysconf(_SC_PAGE_SIZE);
  if (pages <= 0 || page_size <= 0) return std::numeric_limits<uint64_t>::max();
  return static_cast<uint64_t>(pages) * static_cast<uint64_t>(page_size);
}

// A stream (stdin, a pipe, a device) has no size to check and cannot be mapped, and it may
// never end (/dev/zero): it is read part by part, each checked before the next is read (the
// format, the header's length, the header), then exactly the data its header declares and one
// byte more, which must not be there. Bytes that are neither format, or a stream cut short,
// come back as they are, for read_tensor and the parsers to report as they do for a file.
Mapping read_stream(std::FILE* file, const std::string& name) {
  auto buffer = std::make_shared<std::vector<std::byte>>();
  std::vector<std::byte>& bytes = *buffer;
  const auto so_far = [&]() -> Mapping { return {bytes.data(), bytes.size(), buffer}; };
  constexpr uint64_t kUnbounded = std::numeric_limits<uint64_t>::max();
  read_up_to(file, bytes, 9, name);  // enough to tell the formats apart
  std::size_t data_start = 0;
  uint64_t data_size = 0;
  if (looks_like_npy(bytes.data(), bytes.size())) {
    // The longest prefix (v2, v3); no valid v1 file ends within its first 12 bytes either.
    read_up_to(file, bytes, 12, name);
    const std::size_t header_end = npy_header_bounds(bytes.data(), bytes.size(), name).end;
    read_up_to(file, bytes, header_end, name);
    if (bytes.size() < header_end) return so_far();
    const Tensor header = npy_header_tensor(bytes.data(), bytes.size(), name, &data_start);
    const auto numel = static_cast<uint64_t>(header_numel(header.shape, name));
    const uint64_t item = dtype_size(header.dtype);
    data_size = numel > kUnbounded / item ? kUnbounded : numel * item;
  } else if (looks_like_safetensors(bytes.data(), bytes.size())) {
    const uint64_t header_size = safetensors_header_size(bytes.data(), bytes.size(), name);
    data_start = 8 + header_size;
    read_up_to(file, bytes, data_start, name);
    if (bytes.size() < data_start) return so_far();
    // The data is yet to come: its size is the largest end offset.
    for (const auto& entry :
         safetensors_header_entries(bytes.data() + 8, header_size, kUnbounded, name)) {
      data_size = std::max(data_size, entry.end);
    }
  } else {
    return so_far();
  }
  const uint64_t memory = physical_memory();
  if (data_size > memory - data_start) {
    bad_input(
        "{}: header declares {} bytes of data, more than the {} bytes of memory a stream "
        "is read into",
        name, data_size, memory);
  }
  const std::size_t end = data_start + data_size;
  read_up_to(file, bytes, end, name);
  if (bytes.size() > end || (bytes.size() == end && std::fgetc(file) != EOF)) {
    bad_input("{}: the stream holds more than the {} bytes of data its header declares", name,
              data_size);
  }
  if (std::ferror(file)) bad_input("{}: read error: {}", name, errno_text());
  return so_far();
}

}  // namespace

namespace detail {

Mapping map_file(const std::string& path) {
  if (path == "-") return read_stream(stdin, "<stdin>");
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) bad_input("cannot open '{}': {}", path, errno_text());
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    ::close(fd);
    bad_input("cannot stat '{}': {}", path, errno_text());
  }
  if (S_ISDIR(st.st_mode)) {
    ::close(fd);
    bad_input("'{}' is a directory, not a tensor file", path);
  }
  if (!S_ISREG(st.st_mode)) {  // a pipe, a device or process substitution
    const std::unique_ptr<std::FILE, int (*)(std::FILE*)> file(::fdopen(fd, "rb"), std::fclose);
    if (file == nullptr) {
      ::close(fd);
      bad_input("cannot open '{}': {}", path, errno_text());
    }
    return read_stream(file.get(), path);
  }
  const auto size = static_cast<std::size_t>(st.st_size);
  if (size == 0) {
    ::close(fd);
    bad_input("'{}' is empty", path);
  }
  void* addr = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
  ::close(fd);
  if (addr == MAP_FAILED) bad_input("cannot map '{}': {}", path, errno_text());
  std::shared_ptr<const void> keep(addr,
                                   [size](const void* p) { ::munmap(const_cast<void*>(p), size); });
  return {static_cast<const std::byte*>(addr), size, keep};
}

}  // namespace detail

using detail::map_file;
using detail::npy_header;
using detail::safetensors_header;

TensorSpec parse_tensor_spec(const std::string& spec) {
  const std::size_t colon = spec.rfind(':');
  if (colon != std::string::npos && ends_with(spec.substr(0, colon), ".safetensors")) {
    return {spec.substr(0, colon), spec.substr(colon + 1)};
  }
  return {spec, ""};
}

FileFormat format_of(const std::string& path) {
  return ends_with(path, ".safetensors") ? FileFormat::safetensors : FileFormat::npy;
}

Tensor read_tensor(const std::string& spec) {
  const TensorSpec parsed = spec == "-" ? TensorSpec{"-", ""} : parse_tensor_spec(spec);
  const std::string name = parsed.path == "-" ? "<stdin>" : parsed.path;
  const Mapping m = map_file(parsed.path);
  if (looks_like_npy(m.bytes, m.size)) {
    if (!parsed.tensor.empty())
      bad_input("{} is a .npy file: it has no tensor '{}'", name, parsed.tensor);
    return parse_npy(m.bytes, m.size, name, m.keep);
  }
  if (looks_like_safetensors(m.bytes, m.size)) {
    return parse_safetensors(m.bytes, m.size, name, parsed.tensor, m.keep);
  }
  if (m.size == 0) bad_input("{} is empty", name);
  bad_input("{}: neither a .npy nor a .safetensors file", name);
}

TensorWriter::TensorWriter(const std::string& spec, DType dtype, Shape shape)
    : spec_(spec == "-" ? TensorSpec{"-", ""} : parse_tensor_spec(spec)), file_(spec_.path) {
  Tensor header_only;
  header_only.dtype = dtype;
  header_only.shape = std::move(shape);
  expected_ = header_only.nbytes();
  if (spec_.path != "-" && format_of(spec_.path) == FileFormat::safetensors) {
    const std::string name = spec_.tensor.empty() ? "tensor" : spec_.tensor;
    file_.write(safetensors_header({{name, &header_only}}));
  } else {
    file_.write(npy_header(dtype, header_only.shape));
  }
}

void TensorWriter::write(const void* data, std::size_t size) {
  written_ += size;
  if (written_ > expected_) {
    fail(ExitCode::runtime, "internal error: more data than the shape of '{}' holds", file_.path());
  }
  file_.write(data, size);
}

void TensorWriter::commit() {
  if (written_ != expected_) {
    fail(ExitCode::runtime, "internal error: '{}' got {} of {} bytes", file_.path(), written_,
         expected_);
  }
  file_.commit();
}

void write_tensor(const std::string& spec, const Tensor& tensor) {
  TensorWriter writer(spec, tensor.dtype, tensor.shape);
  writer.write(tensor.data, tensor.nbytes());
  writer.commit();
}

}  // namespace dsa
