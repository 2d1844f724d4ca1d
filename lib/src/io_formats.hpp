// Internal: what the tensor file formats share. io.cpp reads any tensor file (the format by its
// first bytes; a stream part by part) and writes one by its extension; npy.cpp and
// safetensors.cpp parse and write one format each, token_file.cpp the token files and
// output_file.cpp the files that appear only when complete.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "dsa/tensor.hpp"

namespace dsa::detail {

// --- common (io.cpp) -----------------------------------------------------------------------

bool ends_with(const std::string& s, std::string_view suffix);
uint64_t read_le(const std::byte* p, int bytes);
std::string errno_text();
// shape_numel's overflow error does not know the file; `where` names it.
int64_t header_numel(const Shape& shape, const std::string& where);

struct Mapping {
  const std::byte* bytes;
  std::size_t size;
  std::shared_ptr<const void> keep;
};

// The bytes of a tensor file: mapped when it is a regular file, else read as a stream (`-`:
// stdin).
Mapping map_file(const std::string& path);

// --- .npy (npy.cpp) ------------------------------------------------------------------------

bool looks_like_npy(const std::byte* bytes, std::size_t size);
// Where an npy header lies, from the file's first 12 bytes at most: magic, version and the
// header's length, bounded before the header is read.
struct NpyHeaderBounds {
  std::size_t begin, end;
};

NpyHeaderBounds npy_header_bounds(const std::byte* bytes, std::size_t size,
                                  const std::string& name);
// The dtype and shape an npy header declares; its data begins at `data_start`.
Tensor npy_header_tensor(const std::byte* bytes, std::size_t size, const std::string& name,
                         std::size_t* data_start);
// The header np.save writes for a C-ordered array: the data after it starts at a multiple of
// 64 bytes.
std::string npy_header(DType dtype, const Shape& shape);

// --- .safetensors (safetensors.cpp) --------------------------------------------------------

bool looks_like_safetensors(const std::byte* bytes, std::size_t size);
struct SafetensorsEntry {
  std::string name;
  DType dtype;
  Shape shape;
  uint64_t begin, end;
};

// The length of a safetensors header, from the file's first 8 bytes, bounded before the header
// is read.
uint64_t safetensors_header_size(const std::byte* bytes, std::size_t size, const std::string& name);
// The entries of the `header_size` bytes of JSON at `header_bytes`, each checked against the
// `data_size` bytes of data that follow it.
std::vector<SafetensorsEntry> safetensors_header_entries(const std::byte* header_bytes,
                                                         uint64_t header_size, uint64_t data_size,
                                                         const std::string& name);
// The entries of a whole file in memory; its data begins at `data_start`.
std::vector<SafetensorsEntry> safetensors_entries(const std::byte* bytes, std::size_t size,
                                                  const std::string& name, std::size_t* data_start);
// The header of a file that holds `tensors`, their data in this order: its length (8 bytes),
// then the JSON, padded with spaces to a multiple of 8 bytes.
std::string safetensors_header(const std::vector<std::pair<std::string, const Tensor*>>& tensors);

}  // namespace dsa::detail
