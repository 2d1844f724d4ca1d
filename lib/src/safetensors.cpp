// .safetensors files: the JSON header parsed and checked, one tensor or several written.
#include "dsa/io.hpp"

#include <algorithm>
#include <limits>
#include <map>
#include <memory>
#include <tuple>

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <nlohmann/json.hpp>

#include "dsa/error.hpp"
#include "io_formats.hpp"

namespace dsa {

namespace {

constexpr uint64_t kMaxSafetensorsHeader = 100u << 20;  // the safetensors library's own limit

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

}  // namespace

namespace detail {

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

bool looks_like_safetensors(const std::byte* bytes, std::size_t size) {
  return size >= 9 && static_cast<char>(bytes[8]) == '{';  // the JSON header's opening brace
}

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

}  // namespace detail

using detail::map_file;
using detail::Mapping;
using detail::safetensors_entries;
using detail::safetensors_header;
using detail::SafetensorsEntry;

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

}  // namespace dsa
