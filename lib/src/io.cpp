#include "dsa/io.hpp"

#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cmath>
#include <csignal>
#include <cstring>
#include <fstream>
#include <iostream>
#include <iterator>
#include <limits>
#include <map>
#include <memory>
#include <optional>
#include <tuple>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "dsa/error.hpp"

namespace dsa {

namespace {

constexpr std::size_t kMaxNpyHeader = 1 << 20;
constexpr uint64_t kMaxSafetensorsHeader = 100u << 20;  // the safetensors library's own limit
constexpr std::string_view kNpyMagic = "\x93NUMPY";

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

// shape_numel's overflow error does not know the file; `where` names it.
int64_t header_numel(const Shape& shape, const std::string& where) {
  try {
    return shape_numel(shape);
  } catch (const Error& e) {
    bad_input("{}: {}", where, e.what());
  }
}

// --- npy header: a Python dict literal -------------------------------------------------

struct NpyHeader {
  std::string descr;
  std::optional<bool> fortran_order;
  std::optional<Shape> shape;
};

class HeaderParser {
 public:
  HeaderParser(std::string_view text, const std::string& name) : text_(text), name_(name) {}

  NpyHeader parse() {
    NpyHeader header;
    bool have_descr = false;
    expect('{');
    while (true) {
      skip_space();
      if (peek() == '}') break;
      const std::string key = string_literal();
      expect(':');
      if (key == "descr") {
        skip_space();
        if (peek() != '\'' && peek() != '"')
          fail("'descr' is not a simple dtype string (structured arrays are not supported)");
        header.descr = string_literal();
        have_descr = true;
      } else if (key == "fortran_order") {
        header.fortran_order = boolean();
      } else if (key == "shape") {
        header.shape = tuple();
      } else {
        fail(fmt::format("unexpected key '{}'", key));
      }
      skip_space();
      if (peek() == ',') {
        ++pos_;
        continue;
      }
      skip_space();
      if (peek() != '}') fail("expected ',' or '}'");
    }
    ++pos_;
    if (!have_descr || !header.fortran_order || !header.shape) {
      fail("header lacks one of 'descr', 'fortran_order', 'shape'");
    }
    return header;
  }

 private:
  [[noreturn]] void fail(const std::string& what) {
    bad_input("{}: malformed .npy header: {}", name_, what);
  }
  char peek() { return pos_ < text_.size() ? text_[pos_] : '\0'; }
  void skip_space() {
    while (pos_ < text_.size() &&
           (text_[pos_] == ' ' || text_[pos_] == '\t' || text_[pos_] == '\n'))
      ++pos_;
  }
  void expect(char c) {
    skip_space();
    if (peek() != c) fail(fmt::format("expected '{}'", c));
    ++pos_;
  }
  std::string string_literal() {
    skip_space();
    const char quote = peek();
    if (quote != '\'' && quote != '"') fail("expected a quoted string");
    const std::size_t end = text_.find(quote, pos_ + 1);
    if (end == std::string_view::npos) fail("unterminated string");
    std::string s(text_.substr(pos_ + 1, end - pos_ - 1));
    pos_ = end + 1;
    return s;
  }
  bool boolean() {
    skip_space();
    if (text_.substr(pos_, 4) == "True") {
      pos_ += 4;
      return true;
    }
    if (text_.substr(pos_, 5) == "False") {
      pos_ += 5;
      return false;
    }
    fail("expected True or False");
  }
  Shape tuple() {
    expect('(');
    Shape shape;
    while (true) {
      skip_space();
      if (peek() == ')') break;
      if (peek() < '0' || peek() > '9') fail("shape entries must be non-negative integers");
      int64_t v = 0;
      while (peek() >= '0' && peek() <= '9') {
        if (v > (std::numeric_limits<int64_t>::max() - 9) / 10) fail("shape entry too large");
        v = v * 10 + (peek() - '0');
        ++pos_;
      }
      if (peek() == 'L') ++pos_;  // Python 2 longs
      shape.push_back(v);
      skip_space();
      if (peek() == ',')
        ++pos_;
      else if (peek() != ')')
        fail("expected ',' or ')' in shape");
      if (shape.size() > 32) fail("more than 32 dimensions");
    }
    ++pos_;
    return shape;
  }

  std::string_view text_;
  const std::string& name_;
  std::size_t pos_ = 0;
};

DType npy_dtype(const std::string& descr, const std::string& name) {
  if (descr.size() >= 2 && descr[0] == '>' && descr != ">u1" && descr != ">i1") {
    bad_input("{}: big-endian dtype '{}' is not supported", name, descr);
  }
  static const std::map<std::string, DType> known = {
      {"<f4", DType::f32},       {"=f4", DType::f32}, {"<f8", DType::f64},  {"=f8", DType::f64},
      {"<f2", DType::f16},       {"=f2", DType::f16}, {"<V2", DType::bf16}, {"|V2", DType::bf16},
      {"bfloat16", DType::bf16}, {"<i4", DType::i32}, {"=i4", DType::i32},  {"<i8", DType::i64},
      {"=i8", DType::i64},       {"|u1", DType::u8},  {"<u1", DType::u8},   {"=u1", DType::u8}};
  const auto it = known.find(descr);
  if (it == known.end()) {
    bad_input(
        "{}: unsupported dtype '{}' (expected <f4, <f8, <f2, <V2 (bfloat16), <i4, <i8 or |u1)",
        name, descr);
  }
  return it->second;
}

std::string npy_descr(DType dtype) {
  switch (dtype) {
    case DType::f32:
      return "<f4";
    case DType::f64:
      return "<f8";
    case DType::f16:
      return "<f2";
    case DType::bf16:
      return "<V2";  // ml_dtypes' bfloat16 as np.save writes it
    case DType::i32:
      return "<i4";
    case DType::i64:
      return "<i8";
    case DType::u8:
      return "|u1";
    case DType::f8_e4m3:
      bad_usage("f8_e4m3 tensors have no .npy dtype: write them to a .safetensors file");
  }
  return "";
}

const std::map<std::string, DType>& safetensors_dtypes() {
  static const std::map<std::string, DType> known = {
      {"F32", DType::f32},         {"F64", DType::f64}, {"F16", DType::f16}, {"BF16", DType::bf16},
      {"F8_E4M3", DType::f8_e4m3}, {"I32", DType::i32}, {"I64", DType::i64}, {"U8", DType::u8}};
  return known;
}

std::string safetensors_dtype(DType dtype) {
  for (const auto& [text, d] : safetensors_dtypes()) {
    if (d == dtype) return text;
  }
  return "";
}

std::string npy_header(DType dtype, const Shape& shape) {
  std::string shape_text = "(";
  for (int64_t d : shape) shape_text += fmt::format("{}, ", d);
  if (shape.size() > 1) shape_text.resize(shape_text.size() - 2);
  if (shape.size() == 1) shape_text.resize(shape_text.size() - 1);
  shape_text += ")";
  std::string dict = fmt::format("{{'descr': '{}', 'fortran_order': False, 'shape': {}, }}",
                                 npy_descr(dtype), shape_text);
  const bool v2 = dict.size() + 11 > 65535;
  const std::size_t prefix = v2 ? 12 : 10;
  const std::size_t total = (prefix + dict.size() + 1 + 63) / 64 * 64;
  dict.append(total - prefix - dict.size() - 1, ' ');
  dict += '\n';
  std::string out(kNpyMagic);
  out += static_cast<char>(v2 ? 2 : 1);
  out += '\0';
  const std::size_t n = dict.size();
  for (int i = 0; i < (v2 ? 4 : 2); ++i) out += static_cast<char>((n >> (8 * i)) & 0xff);
  return out + dict;
}

std::string safetensors_header(const std::vector<std::pair<std::string, const Tensor*>>& tensors) {
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  std::size_t offset = 0;
  for (const auto& [name, tensor] : tensors) {
    header[name] = {{"dtype", safetensors_dtype(tensor->dtype)},
                    {"shape", tensor->shape},
                    {"data_offsets", {offset, offset + tensor->nbytes()}}};
    offset += tensor->nbytes();
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');
  std::string out;
  for (int i = 0; i < 8; ++i) out += static_cast<char>((text.size() >> (8 * i)) & 0xff);
  return out + text;
}

}  // namespace

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

namespace {

// Where an npy header lies, from the file's first 12 bytes at most: magic, version and the
// header's length, bounded before the header is read.
struct NpyHeaderBounds {
  std::size_t begin, end;
};

NpyHeaderBounds npy_header_bounds(const std::byte* bytes, std::size_t size,
                                  const std::string& name) {
  if (size < 10) bad_input("{}: truncated .npy file ({} bytes)", name, size);
  if (std::memcmp(bytes, kNpyMagic.data(), kNpyMagic.size()) != 0) {
    bad_input("{}: not a .npy file (bad magic)", name);
  }
  const int major = static_cast<uint8_t>(bytes[6]);
  if (major < 1 || major > 3) bad_input("{}: unsupported .npy version {}", name, major);
  const std::size_t prefix = major == 1 ? 10 : 12;
  if (size < prefix) bad_input("{}: truncated .npy header", name);
  const std::size_t header_size = read_le(bytes + 8, major == 1 ? 2 : 4);
  if (header_size > kMaxNpyHeader) {
    bad_input("{}: .npy header of {} bytes is larger than the {} allowed", name, header_size,
              kMaxNpyHeader);
  }
  return {prefix, prefix + header_size};
}

// The dtype and shape an npy header declares; its data begins at `data_start`.
Tensor npy_header_tensor(const std::byte* bytes, std::size_t size, const std::string& name,
                         std::size_t* data_start) {
  const NpyHeaderBounds bounds = npy_header_bounds(bytes, size, name);
  if (bounds.end > size) bad_input("{}: truncated .npy header", name);
  const std::string_view text(reinterpret_cast<const char*>(bytes + bounds.begin),
                              bounds.end - bounds.begin);
  const NpyHeader header = HeaderParser(text, name).parse();

  Tensor tensor;
  tensor.name = name;
  tensor.dtype = npy_dtype(header.descr, name);
  tensor.shape = *header.shape;
  if (*header.fortran_order && tensor.shape.size() > 1) {
    bad_input("{}: Fortran-ordered arrays are not supported (save with np.ascontiguousarray)",
              name);
  }
  *data_start = bounds.end;
  return tensor;
}

}  // namespace

Tensor parse_npy(const std::byte* bytes, std::size_t size, const std::string& name,
                 std::shared_ptr<const void> keep) {
  std::size_t data_start = 0;
  Tensor tensor = npy_header_tensor(bytes, size, name, &data_start);
  const std::size_t available = size - data_start;
  const int64_t numel = header_numel(tensor.shape, name);
  if (static_cast<uint64_t>(numel) > available / dtype_size(tensor.dtype) + 1 ||
      tensor.nbytes() != available) {
    bad_input("{}: header says {} {} ({} bytes of data) but the file holds {} bytes of data", name,
              dtype_name(tensor.dtype), shape_string(tensor.shape),
              static_cast<uint64_t>(numel) * dtype_size(tensor.dtype), available);
  }
  tensor.data = bytes + data_start;
  tensor.storage = std::move(keep);
  return tensor;
}

namespace {

struct SafetensorsEntry {
  std::string name;
  DType dtype;
  Shape shape;
  uint64_t begin, end;
};

// The length of a safetensors header, from the file's first 8 bytes, bounded before the header
// is read.
uint64_t safetensors_header_size(const std::byte* bytes, std::size_t size,
                                 const std::string& name) {
  if (size < 8) bad_input("{}: truncated .safetensors file ({} bytes)", name, size);
  const uint64_t header_size = read_le(bytes, 8);
  if (header_size > kMaxSafetensorsHeader) {
    bad_input("{}: .safetensors header of {} bytes is larger than the {} allowed", name,
              header_size, kMaxSafetensorsHeader);
  }
  return header_size;
}

// The entries of the `header_size` bytes of JSON at `header_bytes`, each checked against the
// `data_size` bytes of data that follow it.
std::vector<SafetensorsEntry> safetensors_header_entries(const std::byte* header_bytes,
                                                         uint64_t header_size, uint64_t data_size,
                                                         const std::string& name) {
  nlohmann::ordered_json header;
  try {
    header =
        nlohmann::ordered_json::parse(reinterpret_cast<const char*>(header_bytes),
                                      reinterpret_cast<const char*>(header_bytes + header_size));
  } catch (const nlohmann::json::exception& e) {
    bad_input("{}: .safetensors header is not valid JSON: {}", name, e.what());
  }
  if (!header.is_object()) bad_input("{}: .safetensors header is not a JSON object", name);
  std::vector<SafetensorsEntry> entries;
  for (const auto& [key, value] : header.items()) {
    if (key == "__metadata__") continue;
    const std::string where = fmt::format("{}:{}", name, key);
    if (!value.is_object() || !value.contains("dtype") || !value["dtype"].is_string() ||
        !value.contains("shape") || !value["shape"].is_array() || !value.contains("data_offsets") ||
        !value["data_offsets"].is_array() || value["data_offsets"].size() != 2) {
      bad_input("{}: entry needs 'dtype', 'shape' and 'data_offsets' [begin, end]", where);
    }
    SafetensorsEntry entry;
    entry.name = key;
    const std::string dtype = value["dtype"];
    const auto it = safetensors_dtypes().find(dtype);
    if (it == safetensors_dtypes().end()) {
      bad_input(
          "{}: unsupported dtype '{}' (expected F32, F64, F16, BF16, F8_E4M3, I32, I64 or U8)",
          where, dtype);
    }
    entry.dtype = it->second;
    for (const auto& d : value["shape"]) {
      if (!d.is_number_unsigned())
        bad_input("{}: shape entries must be non-negative integers", where);
      if (d.get<uint64_t>() > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
        bad_input("{}: shape entry too large", where);
      }
      entry.shape.push_back(d.get<int64_t>());
    }
    const auto& offsets = value["data_offsets"];
    if (!offsets[0].is_number_unsigned() || !offsets[1].is_number_unsigned()) {
      bad_input("{}: data_offsets must be non-negative integers", where);
    }
    entry.begin = offsets[0];
    entry.end = offsets[1];
    if (entry.begin > entry.end || entry.end > data_size) {
      bad_input("{}: data_offsets [{}, {}] lie outside the {} bytes of data", where, entry.begin,
                entry.end, data_size);
    }
    const int64_t numel = header_numel(entry.shape, where);
    const uint64_t bytes_needed = static_cast<uint64_t>(numel) * dtype_size(entry.dtype);
    if (static_cast<uint64_t>(numel) > data_size || bytes_needed != entry.end - entry.begin) {
      bad_input("{}: {} {} needs {} bytes but data_offsets span {}", where, dtype,
                shape_string(entry.shape), static_cast<uint64_t>(numel) * dtype_size(entry.dtype),
                entry.end - entry.begin);
    }
    entries.push_back(std::move(entry));
  }
  std::vector<const SafetensorsEntry*> sorted;
  for (const auto& e : entries) sorted.push_back(&e);
  // An empty tensor sorts before a tensor starting at the same offset: it overlaps nothing.
  std::sort(sorted.begin(), sorted.end(), [](auto* a, auto* b) {
    return std::tie(a->begin, a->end) < std::tie(b->begin, b->end);
  });
  for (std::size_t i = 1; i < sorted.size(); ++i) {
    if (sorted[i]->begin < sorted[i - 1]->end) {
      bad_input("{}: tensors '{}' and '{}' overlap in the data buffer", name, sorted[i - 1]->name,
                sorted[i]->name);
    }
  }
  return entries;
}

std::vector<SafetensorsEntry> safetensors_entries(const std::byte* bytes, std::size_t size,
                                                  const std::string& name,
                                                  std::size_t* data_start) {
  const uint64_t header_size = safetensors_header_size(bytes, size, name);
  if (8 + header_size > size) bad_input("{}: truncated .safetensors header", name);
  *data_start = 8 + header_size;
  return safetensors_header_entries(bytes + 8, header_size, size - 8 - header_size, name);
}

struct Mapping {
  const std::byte* bytes;
  std::size_t size;
  std::shared_ptr<const void> keep;
};

bool looks_like_npy(const std::byte* bytes, std::size_t size) {
  return size >= kNpyMagic.size() && std::memcmp(bytes, kNpyMagic.data(), kNpyMagic.size()) == 0;
}

bool looks_like_safetensors(const std::byte* bytes, std::size_t size) {
  return size >= 9 && static_cast<char>(bytes[8]) == '{';  // the JSON header's opening brace
}

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

}  // namespace

Tensor parse_safetensors(const std::byte* bytes, std::size_t size, const std::string& name,
                         const std::string& tensor, std::shared_ptr<const void> keep) {
  std::size_t data_start = 0;
  const auto entries = safetensors_entries(bytes, size, name, &data_start);
  const SafetensorsEntry* chosen = nullptr;
  std::vector<std::string> names;
  for (const auto& e : entries) {
    names.push_back(e.name);
    if (e.name == tensor) chosen = &e;
  }
  if (tensor.empty()) {
    if (entries.size() != 1) {
      bad_input("{} holds {} tensors ({}): name one as {}:NAME", name, entries.size(),
                fmt::join(names, ", "), name);
    }
    chosen = &entries.front();
  } else if (chosen == nullptr) {
    bad_input("{} has no tensor '{}' (it holds: {})", name, tensor, fmt::join(names, ", "));
  }
  Tensor out;
  out.name = fmt::format("{}:{}", name, chosen->name);
  out.dtype = chosen->dtype;
  out.shape = chosen->shape;
  out.data = bytes + data_start + chosen->begin;
  out.storage = std::move(keep);
  return out;
}

std::vector<std::string> safetensors_names(const std::string& path) {
  const Mapping m = map_file(path);
  std::size_t data_start = 0;
  std::vector<std::string> names;
  for (const auto& e : safetensors_entries(m.bytes, m.size, path, &data_start))
    names.push_back(e.name);
  return names;
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

// --- outputs -------------------------------------------------------------------------------

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

OutputFile::OutputFile(const std::string& path) : path_(path) {
  if (path == "-") {
    file_ = stdout;
    return;
  }
  struct stat st {};
  const bool exists = ::stat(path.c_str(), &st) == 0;
  if (exists && S_ISDIR(st.st_mode))
    fail(ExitCode::usage, "output path '{}' names a directory", path);
  if (exists && !S_ISREG(st.st_mode)) {
    // A device, FIFO or /dev/fd/N: written in place (renaming over it would replace it).
    file_ = std::fopen(path.c_str(), "wb");
    if (file_ == nullptr) fail(ExitCode::runtime, "cannot write '{}': {}", path, errno_text());
    return;
  }
  const std::size_t slash = path.rfind('/');
  const std::string base = slash == std::string::npos ? path : path.substr(slash + 1);
  if (base.empty()) fail(ExitCode::usage, "output path '{}' names a directory", path);
  const std::string dir = slash == std::string::npos ? "" : path.substr(0, slash + 1);
  const std::string temp = fmt::format("{}.{}.tmp.XXXXXX", dir, base);
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

void write_safetensors(const std::string& path, const std::vector<Tensor>& tensors) {
  std::vector<std::pair<std::string, const Tensor*>> named;
  for (const Tensor& t : tensors) {
    for (const auto& [name, other] : named) {
      if (name == t.name) bad_usage("{}: two tensors are both named '{}'", path, name);
    }
    named.emplace_back(t.name, &t);
  }
  OutputFile file(path);
  file.write(safetensors_header(named));
  for (const Tensor& t : tensors) file.write(t.data, t.nbytes());
  file.commit();
}

// --- token files -----------------------------------------------------------------------------

TokenFile parse_jsonl_tokens(std::istream& in, const std::string& path) {
  struct Row {
    int64_t batch;
    int64_t position;
    std::vector<int32_t> indices;
  };
  std::vector<Row> rows;
  bool batched = false;
  std::string line;
  int64_t line_number = 0;
  while (std::getline(in, line)) {
    ++line_number;
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(line);
    } catch (const nlohmann::json::exception& e) {
      bad_input("{}:{}: not valid JSON: {}", path, line_number, e.what());
    }
    if (!j.is_object() || !j.contains("t") || !j["t"].is_number_integer() ||
        !j.contains("indices") || !j["indices"].is_array()) {
      bad_input("{}:{}: expected an object with integer \"t\" and an \"indices\" array", path,
                line_number);
    }
    Row row{0, j["t"].get<int64_t>(), {}};
    if (j.contains("b")) {
      // Bounded, so that the batch count (the largest "b" + 1) neither wraps nor overflows.
      if (!j["b"].is_number_unsigned() ||
          j["b"].get<uint64_t>() > static_cast<uint64_t>(std::numeric_limits<int32_t>::max())) {
        bad_input("{}:{}: \"b\" must be an integer in [0, 2^31)", path, line_number);
      }
      row.batch = j["b"].get<int64_t>();
      batched = true;
    }
    for (const auto& v : j["indices"]) {
      if (!v.is_number_integer() || v.get<int64_t>() < -1 ||
          v.get<int64_t>() > std::numeric_limits<int32_t>::max()) {
        bad_input("{}:{}: indices must be integers in [-1, 2^31)", path, line_number);
      }
      row.indices.push_back(static_cast<int32_t>(v.get<int64_t>()));
    }
    rows.push_back(std::move(row));
  }
  if (rows.empty()) bad_input("{}: no rows", path);
  std::stable_sort(rows.begin(), rows.end(),
                   [](const Row& a, const Row& b) { return a.batch < b.batch; });
  const int64_t batches = rows.back().batch + 1;
  if (static_cast<int64_t>(rows.size()) % batches != 0) {
    bad_input("{}: {} rows do not split evenly into {} batch elements", path, rows.size(), batches);
  }
  const int64_t per_batch = static_cast<int64_t>(rows.size()) / batches;
  std::size_t k = 0;
  for (std::size_t i = 0; i < rows.size(); ++i) {
    if (rows[i].batch != static_cast<int64_t>(i) / per_batch) {
      bad_input("{}: batch element {} has a different number of rows than the others", path,
                rows[i].batch);
    }
    k = std::max(k, rows[i].indices.size());
  }
  TokenFile out;
  Shape shape = {per_batch, static_cast<int64_t>(k)};
  if (batched) shape.insert(shape.begin(), batches);
  out.indices = make_tensor(DType::i32, shape, path);
  int32_t* dst = mutable_data<int32_t>(out.indices);
  std::fill(dst, dst + out.indices.numel(), -1);
  for (std::size_t i = 0; i < rows.size(); ++i) {
    std::copy(rows[i].indices.begin(), rows[i].indices.end(), dst + i * k);
    out.positions.push_back(rows[i].position);
  }
  return out;
}

TokenFile read_token_file(const std::string& spec) {
  if (ends_with(spec, ".jsonl")) {
    std::ifstream in(spec);
    if (!in) bad_input("cannot open '{}': {}", spec, errno_text());
    return parse_jsonl_tokens(in, spec);
  }
  TokenFile out;
  out.indices = read_tensor(spec);
  const DType d = out.indices.dtype;
  if (d != DType::i32 && d != DType::i64) {
    bad_input("{}: token indices must be i32 or i64, got {}", out.indices.name, dtype_name(d));
  }
  return out;
}

std::string jsonl_selection_line(int64_t batch, bool batched, int64_t position,
                                 const int32_t* indices, const float* scores, int64_t k) {
  int64_t n = 0;
  while (n < k && indices[n] >= 0) ++n;
  std::string line = batched ? fmt::format("{{\"b\":{},\"t\":{},\"indices\":[", batch, position)
                             : fmt::format("{{\"t\":{},\"indices\":[", position);
  for (int64_t i = 0; i < n; ++i)
    fmt::format_to(std::back_inserter(line), "{}{}", i ? "," : "", indices[i]);
  line += "],\"scores\":[";
  for (int64_t i = 0; i < n; ++i) {
    if (std::isfinite(scores[i])) {
      fmt::format_to(std::back_inserter(line), "{}{}", i ? "," : "", scores[i]);
    } else {
      fmt::format_to(std::back_inserter(line), "{}null", i ? "," : "");
    }
  }
  line += "]}\n";
  return line;
}

}  // namespace dsa
