// Bounded memory (DESIGN.md §1, "Long contexts"): the blocked pipeline, fused selection then
// sparse attention, at L = 32768 under an address-space limit (ulimit -v) of 256 MiB, where
// one L x L f32 score matrix alone would need 4 GiB. Small heads keep it to seconds.
// Labelled "memlimit": AddressSanitizer reserves terabytes of address space for its shadow
// memory, so the sanitizer build cannot run it (.ci/run skips the label there).
#include <gtest/gtest.h>

#include <random>

#include <nlohmann/json.hpp>

#include "cli.hpp"
#include "dsa/io.hpp"
#include "reference.hpp"

namespace dsa {
namespace {

constexpr int64_t kLength = 32768;
constexpr int64_t kLimitKiB = 256 * 1024;

class MemoryLimit : public test::Cli {};

TEST_F(MemoryLimit, BlockedPipelineAtLongContextFarBelowLSquaredStorage) {
  static_assert(kLength * kLength * 4 / 1024 >= 16 * kLimitKiB, "the limit is far below L^2");
  std::mt19937_64 rng(11);
  write("lq.npy", test::random_tensor({kLength, 2, 16}, rng));
  write("lk.npy", test::random_tensor({kLength, 16}, rng));
  write("lw.npy", test::random_tensor({kLength, 2}, rng));
  write("q.npy", test::random_tensor({kLength, 2, 16}, rng));
  write("kv.npy", test::random_tensor({kLength, 16}, rng));
  const std::string limit = "ulimit -v " + std::to_string(kLimitKiB) + " && ";
  const test::Outcome select =
      run(limit +
          "dsa-select --q-index lq.npy --k-index lk.npy --weights lw.npy -k 64 -o s.npy "
          "--report select.json");
  ASSERT_EQ(select.code, 0) << select.err;
  const test::Outcome attend =
      run(limit +
          "dsa-attend --q q.npy --kv kv.npy --dv 8 --indices s.npy -o o.npy --lse l.npy "
          "--report attend.json");
  ASSERT_EQ(attend.code, 0) << attend.err;

  const Tensor s = read_tensor(path("s.npy"));
  ASSERT_EQ(s.shape, (Shape{kLength, 64}));
  const int32_t* last = reinterpret_cast<const int32_t*>(s.data) + (kLength - 1) * 64;
  for (int64_t i = 0; i < 64; ++i) EXPECT_TRUE(last[i] >= 0 && last[i] < kLength) << last[i];
  EXPECT_EQ(read_tensor(path("o.npy")).shape, (Shape{kLength, 2, 8}));
  // The peak resident set, from the report, is also far below the L^2 storage.
  for (const char* report : {"select.json", "attend.json"}) {
    const auto r = nlohmann::json::parse(test::slurp(dir_ / report));
    EXPECT_LT(r["peak_rss_bytes"].get<int64_t>(), kLimitKiB * 1024) << report;
  }
}

}  // namespace
}  // namespace dsa
