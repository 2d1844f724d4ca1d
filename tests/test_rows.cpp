// Query rows: ranges resolved against an operation's rows, a batch element's part of a range,
// and the shares of a job's ranks (tiling, alignment, balance, more ranks than rows).
#include <gtest/gtest.h>

#include <algorithm>
#include <numeric>

#include "dsa/error.hpp"
#include "dsa/rows.hpp"

namespace dsa {
namespace {

TEST(ResolveRows, EndMinusOneIsTheLastAndOutsideIsAUsageError) {
  const RowRange all = resolve_rows({}, 12, "the test's");
  EXPECT_EQ(all.begin, 0);
  EXPECT_EQ(all.end, 12);
  const RowRange some = resolve_rows({3, 7}, 12, "the test's");
  EXPECT_EQ(some.begin, 3);
  EXPECT_EQ(some.end, 7);
  EXPECT_EQ(resolve_rows({12, 12}, 12, "the test's").end, 12);
  for (const RowRange bad : {RowRange{0, 13}, RowRange{-1, 4}, RowRange{5, 4}}) {
    try {
      resolve_rows(bad, 12, "the test's");
      FAIL() << bad.begin << " " << bad.end;
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), ExitCode::usage);
      EXPECT_NE(std::string(e.what()).find("within the test's 12 rows"), std::string::npos)
          << e.what();
    }
  }
}

TEST(BatchQueries, EachBatchElementsPartOfARange) {
  // Rows [5, 17) of 3 batch elements of 8 queries: 5..7 of the first, all of the second, 0 of
  // the third.
  const RowRange rows{5, 17};
  EXPECT_EQ(batch_queries(rows, 0, 8).first, 5);
  EXPECT_EQ(batch_queries(rows, 0, 8).last, 8);
  EXPECT_EQ(batch_queries(rows, 1, 8).first, 0);
  EXPECT_EQ(batch_queries(rows, 1, 8).last, 8);
  EXPECT_EQ(batch_queries(rows, 2, 8).first, 0);
  EXPECT_EQ(batch_queries(rows, 2, 8).last, 1);
  const QueryRows none = batch_queries({0, 8}, 1, 8);
  EXPECT_EQ(none.first, none.last);
}

// Shares tile the rows in order, start on aligned queries, and hold about 1/N of the work each:
// no share's work passes its fair part by more than one aligned block of the costliest rows.
TEST(BalancedRows, SharesTileAlignAndBalanceTheWork) {
  struct Case {
    int64_t batch, queries, align;
  };
  for (const Case& c : {Case{1, 700, 16}, Case{2, 70, 16}, Case{3, 33, 5}, Case{1, 10, 1},
                        Case{4, 1, 1}, Case{1, 0, 16}}) {
    for (const int parts : {1, 2, 3, 7, 40}) {
      SCOPED_TRACE(::testing::Message() << c.batch << "x" << c.queries << " align " << c.align
                                        << ", " << parts << " parts");
      const auto cost = [](int64_t t) { return static_cast<double>(t + 1); };
      const std::vector<RowRange> shares = balanced_rows(c.batch, c.queries, c.align, parts, cost);
      ASSERT_EQ(shares.size(), static_cast<std::size_t>(parts));
      EXPECT_EQ(shares.front().begin, 0);
      EXPECT_EQ(shares.back().end, c.batch * c.queries);
      double total = 0, largest = 0;
      for (int64_t t = 0; t < c.queries; ++t) largest = std::max(largest, cost(t));
      for (int64_t r = 0; r < c.batch * c.queries; ++r) total += cost(r % c.queries);
      for (int i = 0; i < parts; ++i) {
        const RowRange s = shares[i];
        EXPECT_LE(s.begin, s.end);
        if (i + 1 < parts) {
          EXPECT_EQ(s.end, shares[i + 1].begin);
          if (s.end < c.batch * c.queries) EXPECT_EQ(s.end % c.queries % c.align, 0) << s.end;
        }
        double work = 0;
        for (int64_t r = s.begin; r < s.end; ++r) work += cost(r % c.queries);
        EXPECT_LE(work, total / parts + static_cast<double>(c.align + 1) * largest) << i;
      }
    }
  }
  EXPECT_THROW(balanced_rows(1, 10, 1, 0, [](int64_t) { return 1.0; }), Error);
}

}  // namespace
}  // namespace dsa
