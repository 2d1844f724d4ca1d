#include "dsa/rows.hpp"

#include <algorithm>

#include "dsa/error.hpp"

namespace dsa {

RowRange resolve_rows(RowRange range, int64_t rows, const char* what) {
  const int64_t end = range.end < 0 ? rows : range.end;
  if (range.begin < 0 || range.begin > end || end > rows) {
    bad_usage("rows [{}, {}) are not within {} {} rows", range.begin, end, what, rows);
  }
  return {range.begin, end};
}

QueryRows batch_queries(RowRange rows, int64_t b, int64_t queries) {
  return {std::clamp<int64_t>(rows.begin - b * queries, 0, queries),
          std::clamp<int64_t>(rows.end - b * queries, 0, queries)};
}

std::vector<RowRange> balanced_rows(int64_t batch, int64_t queries, int64_t align, int parts,
                                    const std::function<double(int64_t)>& cost) {
  if (parts < 1) bad_usage("a job needs at least one rank, got {}", parts);
  align = std::max<int64_t>(align, 1);
  const int64_t rows = batch * queries;
  std::vector<double> work(static_cast<std::size_t>(queries));
  for (int64_t t = 0; t < queries; ++t) work[t] = cost(t);
  double total = 0;
  for (int64_t row = 0; row < rows; ++row) total += work[row % queries];
  std::vector<RowRange> shares;
  int64_t begin = 0;
  double done = 0;
  for (int part = 0; part < parts; ++part) {
    int64_t end = rows;
    if (part + 1 < parts) {
      // The first aligned row at which the work so far reaches this share's end.
      const double target = total * (part + 1) / parts;
      end = begin;
      double sum = done;
      while (end < rows && sum < target) sum += work[end++ % queries];
      while (end < rows && (end % queries) % align != 0) sum += work[end++ % queries];
      done = sum;
    }
    shares.push_back({begin, end});
    begin = end;
  }
  return shares;
}

}  // namespace dsa
