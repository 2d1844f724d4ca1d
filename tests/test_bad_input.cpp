// The bad-input table of man dsa(7) ("BAD INPUT"), one test per row: what each hostile input
// gets (exit code, a one-line message naming the file and what was expected) and that no
// output, complete or partial, is left behind.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstring>
#include <fstream>
#include <limits>
#include <random>
#include <thread>

#include <nlohmann/json.hpp>

#include "cli.hpp"
#include "dsa/io.hpp"
#include "reference.hpp"

namespace dsa {
namespace {

using test::Outcome;

const std::vector<std::string> kInputs = {"q.npy", "k.npy", "w.npy", "qa.npy", "kv.npy"};
const std::string kIndexer = "--q-index q.npy --k-index k.npy --weights w.npy";
const std::string kAttention = "--q qa.npy --kv kv.npy --dv 12";

class BadInput : public test::Cli {
 protected:
  // A failed run: the exit code, one line on stderr holding every needle, and no output.
  void expect_failure(const Outcome& r, int code, const std::vector<std::string>& needles,
                      std::vector<std::string> left = {}) const {
    EXPECT_EQ(r.code, code) << r.err;
    EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << "one line: " << r.err;
    for (const auto& needle : needles) EXPECT_NE(r.err.find(needle), std::string::npos) << r.err;
    left.insert(left.end(), kInputs.begin(), kInputs.end());
    expect_only(left);
  }

  // The selection a tool writes for the given query rows: row r selects `rows[r]`.
  void write_indices(const std::string& name, const std::vector<std::vector<int32_t>>& rows) {
    Tensor t = make_tensor(DType::i32, {24, 2}, name);
    for (int64_t r = 0; r < 24; ++r) {
      const auto& row = rows[static_cast<std::size_t>(r) % rows.size()];
      for (int64_t i = 0; i < 2; ++i) mutable_data<int32_t>(t)[r * 2 + i] = row[i];
    }
    write(name, t);
  }
};

TEST_F(BadInput, MissingFile) {
  expect_failure(run("dsa-select --q-index nope.npy --k-index k.npy --weights w.npy -k 4 -o s.npy"),
                 3, {"cannot open 'nope.npy'", "No such file"});
}

TEST_F(BadInput, EmptyFile) {
  std::ofstream(path("empty.npy")).close();
  expect_failure(run("dsa-score --q-index empty.npy --k-index k.npy --weights w.npy -o s.npy"), 3,
                 {"'empty.npy' is empty"}, {"empty.npy"});
  const Outcome piped = run("printf '' | dsa-select --scores - -k 4 -o s.npy");
  expect_failure(piped, 3, {"<stdin> is empty"}, {"empty.npy"});
}

TEST_F(BadInput, EndlessStreams) {
  // A stream is checked as it is read and read no further than its header declares, plus the
  // one byte that must not be there: read whole, these would never end. `timeout` makes a
  // regression fail (exit 124) instead of hanging.
  const std::string score = "timeout 10 dsa-score --k-index k.npy --weights w.npy -o s.npy ";
  expect_failure(run(score + "--q-index /dev/zero"), 3,
                 {"/dev/zero: neither a .npy nor a .safetensors file"});
  expect_failure(
      run("cat q.npy /dev/zero | " + score + "--q-index -"), 3,
      {"<stdin>: the stream holds more than the 6144 bytes of data its header declares"});
  write_safetensors(path("q.safetensors"), {read_tensor(path("q.npy"))});
  expect_failure(run("cat q.safetensors /dev/zero | " + score + "--q-index -"), 3,
                 {"<stdin>: the stream holds more than the 6144 bytes of data its header declares"},
                 {"q.safetensors"});
  // A header declaring more data than memory can hold (1 PiB): refused before any is read.
  std::string header = test::slurp(dir_ / "q.npy");
  header.resize(header.size() - 6144);
  header.replace(header.find("(24, 4, 16)"), 11, "(4398046511104, 4, 16)");
  header.erase(header.size() - 12, 11);  // as much padding as the shape grew
  std::ofstream(path("huge.npy"), std::ios::binary) << header;
  expect_failure(run("cat huge.npy /dev/zero | " + score + "--q-index -"), 3,
                 {"<stdin>: header declares 1125899906842624 bytes of data, more than the",
                  "bytes of memory a stream is read into"},
                 {"q.safetensors", "huge.npy"});
}

TEST_F(BadInput, StreamsThatEndWithTheirDataAreRead) {
  const std::string score = " dsa-score --k-index k.npy --weights w.npy -q --q-index ";
  ASSERT_EQ(run(score + "q.npy -o file.npy").code, 0);
  const Outcome npy = run("cat q.npy | timeout 10" + score + "- -o npy.npy");
  ASSERT_EQ(npy.code, 0) << npy.err;
  write_safetensors(path("q.safetensors"), {read_tensor(path("q.npy"))});
  const Outcome safetensors = run("cat q.safetensors | timeout 10" + score + "- -o st.npy");
  ASSERT_EQ(safetensors.code, 0) << safetensors.err;
  const std::string expected = test::slurp(dir_ / "file.npy");
  EXPECT_EQ(test::slurp(dir_ / "npy.npy"), expected);
  EXPECT_EQ(test::slurp(dir_ / "st.npy"), expected);
}

TEST_F(BadInput, TruncatedData) {
  const std::string full = test::slurp(dir_ / "q.npy");
  std::ofstream(path("cut.npy"), std::ios::binary) << full.substr(0, full.size() - 10);
  expect_failure(run("dsa-select --q-index cut.npy --k-index k.npy --weights w.npy -k 4 -o s.npy"),
                 3, {"cut.npy", "header says f32 [24, 4, 16] (6144 bytes of data)", "6134 bytes"},
                 {"cut.npy"});
  std::ofstream(path("header.npy"), std::ios::binary) << full.substr(0, 40);
  expect_failure(run("dsa-select --q-index header.npy --k-index k.npy --weights w.npy -o s.npy"), 3,
                 {"header.npy", "truncated .npy header"}, {"cut.npy", "header.npy"});
}

TEST_F(BadInput, WrongDType) {
  Tensor ints = make_tensor(DType::i32, {24, 4, 16}, "ints");
  write("ints.npy", ints);
  expect_failure(run("dsa-score --q-index ints.npy --k-index k.npy --weights w.npy -o s.npy"), 3,
                 {"ints.npy (q_index): expected a floating-point tensor, got i32"}, {"ints.npy"});
  expect_failure(run("dsa-attend " + kAttention + " --indices w.npy -o o.npy"), 3,
                 {"w.npy: token indices must be i32 or i64, got f32"}, {"ints.npy"});
  // A dtype that .npy has but the toolkit does not read (complex64).
  std::string bytes = test::slurp(dir_ / "k.npy");
  bytes.replace(bytes.find("<f4"), 3, "<c8");
  std::ofstream(path("complex.npy"), std::ios::binary) << bytes;
  expect_failure(run("dsa-score --q-index q.npy --k-index complex.npy --weights w.npy -o s.npy"), 3,
                 {"complex.npy: unsupported dtype '<c8'"}, {"ints.npy", "complex.npy"});
}

TEST_F(BadInput, ShapeMismatchBetweenInputs) {
  std::mt19937_64 rng(3);
  write("k20.npy", test::random_tensor({20, 16}, rng));
  write("k8.npy", test::random_tensor({24, 8}, rng));
  expect_failure(run("dsa-select --q-index q.npy --k-index k8.npy --weights w.npy -k 4 -o s.npy"),
                 3, {"k8.npy (k_index): expected shape [Lk, 16] to match q.npy [24, 4, 16]"},
                 {"k20.npy", "k8.npy"});
  expect_failure(run("dsa-select --q-index q.npy --k-index k20.npy --weights w.npy -k 4 -o s.npy"),
                 3, {"q.npy (q_index) has 24 queries", "k20.npy", "only 20 keys"},
                 {"k20.npy", "k8.npy"});
  expect_failure(run("dsa-attend --q qa.npy --kv k.npy --dv 12 --dense -o o.npy"), 3,
                 {"k.npy (kv): expected shape [Lk, 20] to match qa.npy [24, 3, 20]"},
                 {"k20.npy", "k8.npy"});
}

TEST_F(BadInput, NonFiniteInputsPropagateAndAreCounted) {
  Tensor q = read_tensor(path("q.npy"));
  Tensor copy = make_tensor(DType::f32, q.shape, "q");
  std::memcpy(mutable_data<float>(copy), q.data, q.nbytes());
  mutable_data<float>(copy)[5 * 64] = std::numeric_limits<float>::quiet_NaN();  // row 5
  mutable_data<float>(copy)[7 * 64 + 1] = std::numeric_limits<float>::infinity();
  write("qnan.npy", copy);
  const Outcome r =
      run("dsa-select --q-index qnan.npy --k-index k.npy --weights w.npy -k 4 -o s.npy --report "
          "r.json");
  ASSERT_EQ(r.code, 0) << r.err;
  const auto report = nlohmann::json::parse(test::slurp(dir_ / "r.json"));
  EXPECT_EQ(report["inputs"][0]["non_finite"], 2);
  EXPECT_EQ(report["inputs"][1]["non_finite"], 0);
  // NaN scores rank below every number, like -inf: row 5 still selects 4 valid positions.
  const Tensor s = read_tensor(path("s.npy"));
  for (int64_t i = 0; i < 4; ++i) {
    const int32_t v = reinterpret_cast<const int32_t*>(s.data)[5 * 4 + i];
    EXPECT_TRUE(v >= 0 && v <= 5) << v;
  }
  // Attention propagates them: every head of a query row with a NaN is NaN.
  Tensor qa = read_tensor(path("qa.npy"));
  Tensor qnan = make_tensor(DType::f32, qa.shape, "qa");
  std::memcpy(mutable_data<float>(qnan), qa.data, qa.nbytes());
  mutable_data<float>(qnan)[3 * 60] = std::numeric_limits<float>::quiet_NaN();  // row 3, head 0
  write("qanan.npy", qnan);
  const Outcome a =
      run("dsa-attend --q qanan.npy --kv kv.npy --dv 12 --dense -o o.npy --report a.json");
  ASSERT_EQ(a.code, 0) << a.err;
  EXPECT_EQ(nlohmann::json::parse(test::slurp(dir_ / "a.json"))["inputs"][0]["non_finite"], 1);
  const Tensor o = read_tensor(path("o.npy"));
  const float* out = reinterpret_cast<const float*>(o.data);
  EXPECT_TRUE(std::isnan(out[3 * 36]));          // row 3, head 0
  EXPECT_TRUE(std::isfinite(out[3 * 36 + 12]));  // row 3, head 1
  EXPECT_TRUE(std::isfinite(out[2 * 36]));       // row 2
}

TEST_F(BadInput, TopkZero) {
  expect_failure(run("dsa-select " + kIndexer + " -k 0 -o s.npy"), 2,
                 {"--topk: must be an integer >= 1, got 0"});
  expect_failure(run("dsa-select " + kIndexer + " -k -3 -o s.npy"), 2, {"--topk"});
}

TEST_F(BadInput, TopkLargerThanTheContextPadsWithMinusOne) {
  ASSERT_EQ(run("dsa-select " + kIndexer + " -k 30 -q -o s.npy").code, 0);
  const Tensor s = read_tensor(path("s.npy"));
  ASSERT_EQ(s.shape, (Shape{24, 30}));
  const int32_t* v = reinterpret_cast<const int32_t*>(s.data);
  for (int64_t t = 0; t < 24; ++t) {
    for (int64_t i = 0; i < 30; ++i) EXPECT_EQ(v[t * 30 + i] >= 0, i <= t) << t << " " << i;
  }
}

TEST_F(BadInput, NegativeOrOutOfRangeIndices) {
  write_indices("minus2.npy", {{0, -2}});
  expect_failure(
      run("dsa-attend " + kAttention + " --indices minus2.npy -o o.npy"), 3,
      {"minus2.npy: row 0 (query position 0) selects -2: entries must be -1 or in [0, 0]"},
      {"minus2.npy"});
  write_indices("beyond.npy", {{0, -1}, {0, 1}, {0, 99}});
  expect_failure(run("dsa-attend " + kAttention + " --indices beyond.npy -o o.npy --lse l.npy"), 3,
                 {"beyond.npy: row 2 (query position 2) selects 99"}, {"minus2.npy", "beyond.npy"});
  std::ofstream(path("future.jsonl")) << "{\"t\":0,\"indices\":[0]}\n{\"t\":1,\"indices\":[2]}\n";
  expect_failure(run("dsa-attend " + kAttention + " --indices future.jsonl -o o.npy"), 3,
                 {"future.jsonl (indices): expected shape [24, K]"},
                 {"minus2.npy", "beyond.npy", "future.jsonl"});
  std::ofstream(path("huge.jsonl")) << "{\"t\":0,\"indices\":[0, 4294967296]}\n";
  expect_failure(run("dsa-compare " + kAttention + " --indices huge.jsonl"), 3,
                 {"huge.jsonl:1: indices must be integers in [-1, 2^31)"},
                 {"minus2.npy", "beyond.npy", "future.jsonl", "huge.jsonl"});
}

TEST_F(BadInput, UnwritableOutputPath) {
  expect_failure(run("dsa-select " + kIndexer + " -k 4 -o no/such/dir/s.npy"), 1,
                 {"cannot write 'no/such/dir/s.npy'", "No such file or directory"});
  std::filesystem::create_directory(dir_ / "sub");
  expect_failure(run("dsa-select " + kIndexer + " -k 4 -o sub"), 2,
                 {"output path 'sub' names a directory"}, {"sub"});
}

TEST_F(BadInput, DiskFull) {
  // /dev/full fails every write with ENOSPC; it is written in place, never replaced.
  expect_failure(run("dsa-score " + kIndexer + " -q -o /dev/full"), 1,
                 {"cannot write '/dev/full'", "No space left on device"});
  // A file size limit (ulimit -f, in 512-byte blocks) below the output's size: the write fails
  // with EFBIG (SIGXFSZ is ignored) and the partial temporary file is removed.
  expect_failure(run("(ulimit -f 2 && dsa-score " + kIndexer + " -q -o s.npy)"), 1,
                 {"cannot write 's.npy'", "File too large"});
  struct stat st {};
  ASSERT_EQ(::stat("/dev/full", &st), 0);
  EXPECT_TRUE(S_ISCHR(st.st_mode));
}

// Starts a tool in the test directory; the caller signals and reaps it.
pid_t spawn(const std::string& dir, const std::vector<std::string>& argv) {
  const pid_t pid = ::fork();
  if (pid == 0) {
    if (::chdir(dir.c_str()) != 0) ::_exit(127);
    std::vector<char*> args;
    for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
    args.push_back(nullptr);
    ::execv(args[0], args.data());
    ::_exit(127);
  }
  return pid;
}

bool has_temporary_output(const std::filesystem::path& dir) {
  for (const auto& e : std::filesystem::directory_iterator(dir)) {
    if (e.path().filename().string().find(".tmp.") != std::string::npos) return true;
  }
  return false;
}

TEST_F(BadInput, SignalMidRunLeavesNoOutput) {
  // A fused selection long enough to interrupt (seconds at one thread): its output file is
  // opened after the first block of queries.
  std::mt19937_64 rng(5);
  write("lq.npy", test::random_tensor({32768, 4, 32}, rng));
  write("lk.npy", test::random_tensor({32768, 32}, rng));
  write("lw.npy", test::random_tensor({32768, 4}, rng));
  for (const int signal : {SIGINT, SIGTERM}) {
    const pid_t pid = spawn(
        dir_.string(), {DSA_APPS_DIR "/dsa-select", "--q-index", "lq.npy", "--k-index", "lk.npy",
                        "--weights", "lw.npy", "-k", "64", "--threads", "1", "-q", "-o", "s.npy"});
    ASSERT_GT(pid, 0);
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
    while (!has_temporary_output(dir_) && std::chrono::steady_clock::now() < deadline) {
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
    }
    ASSERT_TRUE(has_temporary_output(dir_)) << "the run never opened its output";
    ::kill(pid, signal);
    int status = 0;
    ASSERT_EQ(::waitpid(pid, &status, 0), pid);
    // It dies of the signal (a shell reports 128 + N), having removed its temporary file.
    ASSERT_TRUE(WIFSIGNALED(status)) << "exited " << WEXITSTATUS(status) << " before the signal";
    EXPECT_EQ(WTERMSIG(status), signal);
    expect_only({"q.npy", "k.npy", "w.npy", "qa.npy", "kv.npy", "lq.npy", "lk.npy", "lw.npy"});
  }
}

}  // namespace
}  // namespace dsa
