// .npy files (NumPy's format, versions 1 to 3): the header parsed and written.
#include "dsa/io.hpp"

#include <cstring>
#include <limits>
#include <map>
#include <memory>
#include <optional>

#include <fmt/format.h>

#include "dsa/error.hpp"
#include "io_formats.hpp"

namespace dsa {

namespace {

constexpr std::size_t kMaxNpyHeader = 1 << 20;
constexpr std::string_view kNpyMagic = "\x93NUMPY";

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

}  // namespace

namespace detail {

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

bool looks_like_npy(const std::byte* bytes, std::size_t size) {
  return size >= kNpyMagic.size() && std::memcmp(bytes, kNpyMagic.data(), kNpyMagic.size()) == 0;
}

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

}  // namespace detail

using detail::header_numel;
using detail::npy_header_tensor;

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

}  // namespace dsa
