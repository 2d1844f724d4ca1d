// Query rows: the part of an operation's B x Lq rows that one call computes, and the shares of
// them that the ranks of an MPI job take (docs/DESIGN.md section 8). The library never calls
// MPI; it says which rows a rank computes, and computes them as one process does.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

namespace dsa {

// Query rows [begin, end) of an operation's B x Lq (row r: batch element r / Lq, query r % Lq);
// end -1: to the last.
struct RowRange {
  int64_t begin = 0, end = -1;
};

// The range with its end resolved against the operation's `rows` (-1: rows); Error(usage) unless
// 0 <= begin <= end <= rows. `what` names the operation in the message ("the attention's").
RowRange resolve_rows(RowRange range, int64_t rows, const char* what);

// The queries [first, last) of batch element b that a resolved range holds (first == last: none).
struct QueryRows {
  int64_t first = 0, last = 0;
};
QueryRows batch_queries(RowRange rows, int64_t b, int64_t queries);

// A job of `parts` ranks: contiguous shares of batch x queries rows, in rank order, of equal
// work (`cost(t)`: the work of query t of a batch element), each starting at a multiple of
// `align` queries in its batch element (the rows the CPU computes together, whose products'
// sums depend on the block), so every row is computed as one process computes it. Error(usage)
// for parts < 1. The operations' own balanced_rows (attention.hpp, indexer.hpp, topk.hpp,
// metrics.hpp) give the cost and alignment of their rows.
std::vector<RowRange> balanced_rows(int64_t batch, int64_t queries, int64_t align, int parts,
                                    const std::function<double(int64_t)>& cost);

}  // namespace dsa
