// Token files: selections read from .jsonl (or a tensor file of indices) and written as .jsonl.
#include "dsa/io.hpp"

#include <algorithm>
#include <cmath>
#include <fstream>
#include <istream>
#include <iterator>
#include <limits>
#include <string>
#include <vector>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "dsa/error.hpp"
#include "io_formats.hpp"

namespace dsa {

using detail::ends_with;
using detail::errno_text;

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
