// Tensor files: .npy (v1-v3) and .safetensors, `-` for an npy stream on stdin/stdout, token
// files (.npy int32 or .jsonl), and outputs that appear only when complete.
#pragma once

#include <cstdint>
#include <cstdio>
#include <iosfwd>
#include <string>
#include <string_view>
#include <vector>

#include "dsa/tensor.hpp"

namespace dsa {

// "FILE.safetensors:NAME" -> {FILE.safetensors, NAME}; anything else -> {spec, ""}.
struct TensorSpec {
  std::string path;
  std::string tensor;
};
TensorSpec parse_tensor_spec(const std::string& spec);

enum class FileFormat { npy, safetensors };
FileFormat format_of(const std::string& path);  // by extension; `-` and others are npy

// Reads a tensor. Regular files are memory-mapped; `-` (stdin) and other streams (pipes,
// devices) are read part by part, the format and header checked first, and no further than the
// data the header declares: a stream that holds more (an endless one) is bad input.
// Every malformed file is an Error(bad_input) naming the file and what was wrong.
Tensor read_tensor(const std::string& spec);

// Parsers over bytes already in memory; `name` is used in messages. The returned tensor
// points into `bytes`, which `keep` must keep alive.
Tensor parse_npy(const std::byte* bytes, std::size_t size, const std::string& name,
                 std::shared_ptr<const void> keep);
Tensor parse_safetensors(const std::byte* bytes, std::size_t size, const std::string& name,
                         const std::string& tensor, std::shared_ptr<const void> keep);
// The tensor names of a safetensors file, in file order.
std::vector<std::string> safetensors_names(const std::string& path);

// A file that appears under its name only after commit(): written to a temporary file in the
// same directory and renamed. Destroyed without commit(), the temporary file is removed, and so
// it is when a signal ends the process (install_signal_cleanup). Path `-` writes straight to
// stdout, and a path that is not a regular file (a device such as /dev/null, a FIFO, /dev/fd/N)
// is written in place.
class OutputFile {
 public:
  explicit OutputFile(const std::string& path);
  ~OutputFile();
  OutputFile(const OutputFile&) = delete;
  OutputFile& operator=(const OutputFile&) = delete;

  void write(const void* data, std::size_t size);
  void write(std::string_view text) { write(text.data(), text.size()); }
  void commit();
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  std::string temp_path_;
  std::FILE* file_ = nullptr;
  bool committed_ = false;
};

// Fails now, as OutputFile would later, when `spec` (a path, FILE.safetensors:NAME or `-`)
// cannot be written: a directory, a missing or read-only directory. Creates and removes a
// probe file beside it (".NAME.probe.XXXXXX"); a device or FIFO is only checked for write
// permission. The tools
// check every output this way before they compute.
void check_output(const std::string& spec);

// Makes SIGINT, SIGTERM, SIGHUP and SIGPIPE remove the temporary files of the OutputFiles
// alive, then end the process by the same signal (a shell reports 128 + its number: 130 for
// SIGINT); a signal that was ignored stays ignored. Also ignores SIGXFSZ, so that a write past
// the file size limit fails with EFBIG and is reported like a full disk. The apps call it first.
void install_signal_cleanup();

// Streams one tensor whose dtype and shape are known up front: the header first, then the
// data in row-major order through write(); commit() checks that every byte arrived.
class TensorWriter {
 public:
  TensorWriter(const std::string& spec, DType dtype, Shape shape);
  void write(const void* data, std::size_t size);
  void commit();

 private:
  TensorSpec spec_;
  OutputFile file_;
  std::size_t expected_ = 0;
  std::size_t written_ = 0;
};

void write_tensor(const std::string& spec, const Tensor& tensor);
// Several named tensors in one .safetensors file.
void write_safetensors(const std::string& path, const std::vector<Tensor>& tensors);

// Selected token indices as read from a token file: int32 [B?, Lq, K] with -1 padding and,
// for .jsonl, the query position `t` of every row (checked by the consumer).
struct TokenFile {
  Tensor indices;
  std::vector<int64_t> positions;  // empty for .npy / .safetensors
};
TokenFile read_token_file(const std::string& spec);
// The .jsonl parser over any stream; `name` is used in messages.
TokenFile parse_jsonl_tokens(std::istream& in, const std::string& name);

// One line per query: {"b":…, "t":…, "indices":[…], "scores":[…]} ("b" only when batched);
// padding (-1) is left out.
std::string jsonl_selection_line(int64_t batch, bool batched, int64_t position,
                                 const int32_t* indices, const float* scores, int64_t k);

}  // namespace dsa
