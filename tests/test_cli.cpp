// The binaries as a user runs them: pipelines, formats, reports, exit codes, and no output
// left behind by a failed run.
#include <gtest/gtest.h>

#include <cstring>
#include <fstream>
#include <random>

#include <nlohmann/json.hpp>

#include "cli.hpp"
#include "dsa/device.hpp"
#include "dsa/io.hpp"
#include "dsa/kv_cache.hpp"
#include "reference.hpp"

namespace dsa {
namespace {

using test::Cli;
using test::Outcome;
using test::slurp;

const std::string kIndexer = "--q-index q.npy --k-index k.npy --weights w.npy";

TEST_F(Cli, PipelineEqualsFusedSelection) {
  ASSERT_EQ(run("dsa-score " + kIndexer + " -q | dsa-select --scores - -k 8 -q -o piped.npy").code,
            0);
  ASSERT_EQ(run("dsa-select " + kIndexer + " -k 8 -q -o fused.npy").code, 0);
  EXPECT_EQ(slurp(dir_ / "piped.npy"), slurp(dir_ / "fused.npy"));
  const Tensor t = read_tensor(path("fused.npy"));
  EXPECT_EQ(t.dtype, DType::i32);
  EXPECT_EQ(t.shape, (Shape{24, 8}));
}

TEST_F(Cli, JsonlSelectionMatchesNpyAndFeedsAttention) {
  ASSERT_EQ(run("dsa-select " + kIndexer + " -k 6 -q -o sel.jsonl").code, 0);
  ASSERT_EQ(run("dsa-select " + kIndexer + " -k 6 -q -o sel.npy").code, 0);
  const Tensor npy = read_tensor(path("sel.npy"));
  std::ifstream in(path("sel.jsonl"));
  std::string line;
  int64_t row = 0;
  while (std::getline(in, line)) {
    const auto j = nlohmann::json::parse(line);
    EXPECT_EQ(j["t"], row);
    EXPECT_FALSE(j.contains("b"));
    const auto indices = j["indices"].get<std::vector<int32_t>>();
    EXPECT_EQ(indices.size(), std::min<std::size_t>(6, row + 1));
    EXPECT_EQ(j["scores"].size(), indices.size());
    for (std::size_t i = 0; i < 6; ++i) {
      const int32_t expected = reinterpret_cast<const int32_t*>(npy.data)[row * 6 + i];
      EXPECT_EQ(i < indices.size() ? indices[i] : -1, expected);
    }
    ++row;
  }
  EXPECT_EQ(row, 24);
  ASSERT_EQ(run("dsa-attend --q qa.npy --kv kv.npy --dv 12 --indices sel.jsonl -q -o a.npy").code,
            0);
  ASSERT_EQ(run("dsa-attend --q qa.npy --kv kv.npy --dv 12 --indices sel.npy -q -o b.npy").code, 0);
  EXPECT_EQ(slurp(dir_ / "a.npy"), slurp(dir_ / "b.npy"));
}

TEST_F(Cli, AttendWritesOutputAndLseAndDenseEqualsFullSelection) {
  ASSERT_EQ(run("dsa-select " + kIndexer + " -k 24 -q -o all.npy").code, 0);
  ASSERT_EQ(
      run("dsa-attend --q qa.npy --kv kv.npy --dv 12 --indices all.npy -o s.npy --lse sl.npy -q")
          .code,
      0);
  ASSERT_EQ(run("dsa-attend --q qa.npy --kv kv.npy --dv 12 --dense -o d.npy --lse dl.npy -q").code,
            0);
  const Tensor s = read_tensor(path("s.npy")), d = read_tensor(path("d.npy"));
  const Tensor sl = read_tensor(path("sl.npy")), dl = read_tensor(path("dl.npy"));
  EXPECT_EQ(s.shape, (Shape{24, 3, 12}));
  EXPECT_EQ(sl.shape, (Shape{24, 3}));
  for (int64_t i = 0; i < s.numel(); ++i) ASSERT_NEAR(test::f32(s)[i], test::f32(d)[i], 1e-5);
  for (int64_t i = 0; i < sl.numel(); ++i) ASSERT_NEAR(test::f32(sl)[i], test::f32(dl)[i], 1e-4);
}

// Issue 12: the released code's top-k puts masked future positions into rows with fewer than k
// visible tokens; --future-as-padding takes them as padding, without it they are an error.
TEST_F(Cli, FutureEntriesArePaddingOnlyWhenAsked) {
  Tensor released = make_tensor(DType::i64, {24, 4}, "released");
  for (int64_t t = 0; t < 24; ++t) {
    for (int64_t i = 0; i < 4; ++i) mutable_data<int64_t>(released)[t * 4 + i] = (t + i) % 24;
  }
  write("released.npy", released);
  const std::string attend = "dsa-attend --q qa.npy --kv kv.npy --dv 12 --indices ";
  const Outcome strict = run(attend + "released.npy -o r.npy -q");
  EXPECT_EQ(strict.code, 3);
  EXPECT_NE(strict.err.find("entries must be -1 or in [0, 0]"), std::string::npos) << strict.err;
  EXPECT_FALSE(std::filesystem::exists(path("r.npy")));
  const Outcome padded = run(attend + "released.npy --future-as-padding -o r.npy --report r.json");
  ASSERT_EQ(padded.code, 0) << padded.err;
  // The same rows with those entries written as -1 give the same bits.
  for (int64_t t = 0; t < 24; ++t) {
    for (int64_t i = 0; i < 4; ++i) {
      int64_t& s = mutable_data<int64_t>(released)[t * 4 + i];
      if (s > t) s = -1;
    }
  }
  write("padded.npy", released);
  ASSERT_EQ(run(attend + "padded.npy -o p.npy -q").code, 0);
  EXPECT_EQ(slurp(path("r.npy")), slurp(path("p.npy")));
  // The report counts every entry s > t.
  int64_t dropped = 0;
  for (int64_t t = 0; t < 24; ++t) {
    for (int64_t i = 0; i < 4; ++i) dropped += (t + i) % 24 > t;
  }
  EXPECT_EQ(nlohmann::json::parse(slurp(path("r.json")))["future_entries_dropped"], dropped);
}

TEST_F(Cli, NamedScaleIsTheModelsAndReportsSayWhichScale) {
  const std::string attend = "dsa-attend --q qa.npy --kv kv.npy --dv 12 --dense -o d.npy ";
  ASSERT_EQ(run(attend + "--scale deepseek-v3.2 --report named.json").code, 0);
  const std::string named = slurp(path("d.npy"));
  ASSERT_EQ(run(attend + "--scale 0.1352337788608801 --report given.json").code, 0);
  EXPECT_EQ(slurp(path("d.npy")), named);
  ASSERT_EQ(run(attend + "--report default.json").code, 0);
  EXPECT_NE(slurp(path("d.npy")), named);
  const auto report = [&](const char* name) { return nlohmann::json::parse(slurp(path(name))); };
  EXPECT_EQ(report("named.json")["scale_rule"], "deepseek-v3.2");
  EXPECT_EQ(report("given.json")["scale_rule"], "given");
  EXPECT_EQ(report("default.json")["scale_rule"], "d_qk^-0.5");
  EXPECT_FLOAT_EQ(report("named.json")["scale"].get<float>(), 0.13523378f);
  const Outcome bad = run(attend + "--scale deepseek");
  EXPECT_EQ(bad.code, 2);
  EXPECT_NE(bad.err.find("--scale: softmax scale: expected a number, default or deepseek-v3.2, "
                         "got 'deepseek'"),
            std::string::npos)
      << bad.err;
}

// --device auto runs each operation on the GPU only where the CUDA backend takes its inputs; MHA
// inputs (or a machine without a GPU) run on the CPU, and the report says why.
TEST_F(Cli, DeviceAutoFallsBackToTheCpuAndSaysWhy) {
  std::mt19937_64 rng(43);
  write("mk.npy", test::random_tensor({24, 1, 20}, rng));
  write("mv.npy", test::random_tensor({24, 1, 8}, rng));
  const Outcome r =
      run("dsa-attend --q qa.npy --k mk.npy --v mv.npy --dense --device auto "
          "-o d.npy --report r.json");
  ASSERT_EQ(r.code, 0) << r.err;
  const auto report = nlohmann::json::parse(slurp(path("r.json")));
  EXPECT_EQ(report["device"], "cpu");
  EXPECT_NE(report["device_note"].get<std::string>().find("ran on the CPU"), std::string::npos);
}

// The library's messages name parameters and tensors; the tools put the flag in front, keeping
// the exit code and the one line.
TEST_F(Cli, ErrorsOfALibraryCallNameTheFlag) {
  const auto expect_error = [&](const std::string& command, int code, const std::string& needle) {
    const Outcome r = run(command);
    EXPECT_EQ(r.code, code) << command << ": " << r.err;
    EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
    EXPECT_NE(r.err.find(needle), std::string::npos) << r.err;
  };
  expect_error("dsa-attend --q qa.npy --kv kv.npy --dv 21 --dense -o o.npy", 2,
               "dsa-attend: error: --dv: d_v must be in [1, d_qk = 20], got 21");
  expect_error("dsa-attend --q qa.npy --kv kv.npy --dv 0 --dense -o o.npy", 2,
               "--dv: must be an integer >= 1, got 0");
  expect_error("dsa-gen --scale fast -o g.safetensors", 2,
               "--scale: softmax scale: expected a number, default or deepseek-v3.2, got 'fast'");
  expect_error("dsa-select " + kIndexer + " -k 3000000000 -o s.npy", 2,
               "--topk: must be an integer <= 2147483647, got 3000000000");
  expect_error("dsa-compare --q qa.npy --kv kv.npy --dv 12 " + kIndexer + " --sweep-topk 2,0", 2,
               "--sweep-topk: must be an integer >= 1, got 0");
  std::mt19937_64 rng(44);
  write("w3.npy", test::random_tensor({24, 3}, rng));
  expect_error("dsa-score --q-index qa.npy --k-index kv.npy --weights w3.npy --hadamard -o s.npy",
               2, "--hadamard: the Hadamard rotation needs d_I to be a power of two, got 20");
  // Without a GPU exit 1, with one exit 2 (MHA inputs): "--device" either way.
  write("mk.npy", test::random_tensor({24, 1, 20}, rng));
  write("mv.npy", test::random_tensor({24, 1, 8}, rng));
  const Outcome cuda =
      run("dsa-attend --q qa.npy --k mk.npy --v mv.npy --dense --device cuda -o d.npy");
  EXPECT_EQ(cuda.code, cuda_available() ? 2 : 1) << cuda.err;
  EXPECT_NE(cuda.err.find("dsa-attend: error: --device: device cuda: "), std::string::npos)
      << cuda.err;
  expect_only({"q.npy", "k.npy", "w.npy", "qa.npy", "kv.npy", "w3.npy", "mk.npy", "mv.npy"});
}

TEST_F(Cli, SafetensorsInputsByName) {
  std::vector<Tensor> tensors = {read_tensor(path("q.npy")), read_tensor(path("k.npy")),
                                 read_tensor(path("w.npy"))};
  tensors[0].name = "q_index";
  tensors[1].name = "k_index";
  tensors[2].name = "weights";
  write_safetensors(path("in.safetensors"), tensors);
  ASSERT_EQ(run("dsa-select --q-index in.safetensors:q_index --k-index in.safetensors:k_index "
                "--weights in.safetensors:weights -k 4 -q -o a.safetensors:indices")
                .code,
            0);
  ASSERT_EQ(run("dsa-select " + kIndexer + " -k 4 -q -o b.npy").code, 0);
  const Tensor a = read_tensor(path("a.safetensors:indices")), b = read_tensor(path("b.npy"));
  ASSERT_EQ(a.shape, b.shape);
  EXPECT_EQ(std::memcmp(a.data, b.data, a.nbytes()), 0);
  const Outcome missing =
      run("dsa-select --q-index in.safetensors:nope --k-index k.npy --weights w.npy -q -o c.npy");
  EXPECT_EQ(missing.code, 3);
  EXPECT_NE(missing.err.find("no tensor 'nope'"), std::string::npos) << missing.err;
}

TEST_F(Cli, ReportCarriesVersionCommandShapesThreadsAndTimings) {
  ASSERT_EQ(run("dsa-select " + kIndexer + " -k 4 --threads 1 -o s.npy --report r.json").code, 0);
  const auto r = nlohmann::json::parse(slurp(dir_ / "r.json"));
  EXPECT_EQ(r["tool"], "dsa-select");
  EXPECT_FALSE(r["version"].get<std::string>().empty());
  EXPECT_EQ(r["threads"], 1);
  EXPECT_EQ(r["device"], "cpu");
  EXPECT_EQ(r["inputs"][0]["shape"], (std::vector<int64_t>{24, 4, 16}));
  EXPECT_EQ(r["outputs"][0]["shape"], (std::vector<int64_t>{24, 4}));
  EXPECT_GT(r["timings_ms"]["score"].get<double>(), 0.0);
  EXPECT_TRUE(r["timings_ms"].contains("select"));
  EXPECT_GT(r["peak_rss_bytes"].get<int64_t>(), 0);
  const Outcome stderr_report = run("dsa-select " + kIndexer + " -k 4 -o t.npy");
  EXPECT_EQ(nlohmann::json::parse(stderr_report.err)["tool"], "dsa-select");
}

TEST_F(Cli, ExitCodesAndMessages) {
  const Outcome help = run("dsa-attend --help");
  EXPECT_EQ(help.code, 0);
  EXPECT_NE(help.out.find("--indices"), std::string::npos);
  EXPECT_EQ(run("dsa-score --version").code, 0);
  EXPECT_EQ(run("dsa-select -k 4 -o x.npy").code, 2);                        // no inputs
  EXPECT_EQ(run("dsa-select --scores - --q-index q.npy -o x.npy").code, 2);  // exclusive
  EXPECT_EQ(run("dsa-select " + kIndexer + " -k 0 -o x.npy").code, 2);
  EXPECT_EQ(run("dsa-score " + kIndexer + " --precision fp6 -o x.npy").code, 2);
  const Outcome missing =
      run("dsa-score --q-index nope.npy --k-index k.npy --weights w.npy -o x.npy");
  EXPECT_EQ(missing.code, 3);
  EXPECT_NE(missing.err.find("nope.npy"), std::string::npos);
  const Outcome shape = run("dsa-score --q-index q.npy --k-index w.npy --weights w.npy -o x.npy");
  EXPECT_EQ(shape.code, 3);
  EXPECT_NE(shape.err.find("w.npy (k_index)"), std::string::npos) << shape.err;
  EXPECT_EQ(std::count(shape.err.begin(), shape.err.end(), '\n'), 1) << "one line: " << shape.err;
  const Outcome unwritable = run("dsa-score " + kIndexer + " -q -o no/such/dir/x.npy");
  EXPECT_EQ(unwritable.code, 1);
  EXPECT_NE(unwritable.err.find("no/such/dir/x.npy"), std::string::npos);
  expect_only({"q.npy", "k.npy", "w.npy", "qa.npy", "kv.npy"});
}

TEST_F(Cli, BadIndicesLeaveNoOutput) {
  Tensor future = make_tensor(DType::i32, {24, 2}, "future");
  for (int i = 0; i < 48; ++i) mutable_data<int32_t>(future)[i] = i % 2 ? -1 : i / 2;
  mutable_data<int32_t>(future)[10] = 23;  // row 5 selects position 23
  write("future.npy", future);
  const Outcome r = run(
      "dsa-attend --q qa.npy --kv kv.npy --dv 12 --indices future.npy -o out.npy --lse lse.npy");
  EXPECT_EQ(r.code, 3);
  EXPECT_NE(r.err.find("selects 23"), std::string::npos) << r.err;
  expect_only({"q.npy", "k.npy", "w.npy", "qa.npy", "kv.npy", "future.npy"});
}

TEST_F(Cli, DecodeAndBatchShapes) {
  std::mt19937_64 rng(7);
  write("qb.npy", test::random_tensor({2, 3, 4, 16}, rng));
  write("kb.npy", test::random_tensor({2, 24, 16}, rng));
  write("wb.npy", test::random_tensor({2, 3, 4}, rng));
  ASSERT_EQ(
      run("dsa-select --q-index qb.npy --k-index kb.npy --weights wb.npy -k 30 -q -o s.npy").code,
      0);
  const Tensor s = read_tensor(path("s.npy"));
  EXPECT_EQ(s.shape, (Shape{2, 3, 30}));
  // Query rows sit at positions 21, 22, 23: 22, 23, 24 entries, then -1.
  for (int64_t r = 0; r < 6; ++r) {
    for (int64_t i = 0; i < 30; ++i) {
      EXPECT_EQ(reinterpret_cast<const int32_t*>(s.data)[r * 30 + i] >= 0, i < 22 + r % 3)
          << r << " " << i;
    }
  }
  ASSERT_EQ(
      run("dsa-select --q-index qb.npy --k-index kb.npy --weights wb.npy -k 3 -q -o s.jsonl").code,
      0);
  const std::string first = slurp(dir_ / "s.jsonl").substr(0, 14);
  EXPECT_EQ(first, "{\"b\":0,\"t\":21,");
}

TEST_F(Cli, CompareReportsEveryKAndTheNeedlesOfAGeneratedWorkload) {
  ASSERT_EQ(run("dsa-gen --length 600 --needles 8 --seed 3 -q -o w.safetensors").code, 0);
  const std::string w = "w.safetensors";
  const std::string inputs = "--q " + w + ":q --kv " + w + ":kv --dv 48 --q-index " + w +
                             ":q_index --k-index " + w + ":k_index --weights " + w + ":weights";
  const Outcome r =
      run("dsa-compare " + inputs + " --needles " + w + ":needles --sweep-topk 16,64 --threads 1");
  ASSERT_EQ(r.code, 0) << r.err;
  const auto report = nlohmann::json::parse(r.out);
  EXPECT_EQ(report["schema"], "dsa-compare/3");
  ASSERT_EQ(report["results"].size(), 2u);
  EXPECT_EQ(report["results"][0]["topk"], 16);
  EXPECT_EQ(report["results"][0]["rows"]["exact"], 16);
  EXPECT_EQ(report["results"][1]["rows"]["sparse"], 600 - 64);
  EXPECT_EQ(report["results"][1]["needle_recall"]["needles"], 8);
  // A clean indexer finds every planted needle.
  EXPECT_EQ(report["results"][1]["needle_recall"]["selected"], 8);
  EXPECT_GE(report["results"][1]["mass_recall"]["sparse"]["mean"].get<double>(),
            report["results"][0]["mass_recall"]["sparse"]["mean"].get<double>());
  // The same at 2 threads, to the bit.
  const Outcome two =
      run("dsa-compare " + inputs + " --needles " + w + ":needles --sweep-topk 16,64 --threads 2");
  const auto report2 = nlohmann::json::parse(two.out);
  EXPECT_EQ(report2["results"], report["results"]);
  // A selection from dsa-select instead of the indexer.
  ASSERT_EQ(run("dsa-select --q-index " + w + ":q_index --k-index " + w + ":k_index --weights " +
                w + ":weights -k 64 -q -o sel.npy")
                .code,
            0);
  const Outcome given =
      run("dsa-compare --q " + w + ":q --kv " + w + ":kv --dv 48 --indices sel.npy");
  ASSERT_EQ(given.code, 0) << given.err;
  EXPECT_EQ(nlohmann::json::parse(given.out)["results"][0]["mass_recall"],
            report["results"][1]["mass_recall"]);
  EXPECT_EQ(run("dsa-compare --q " + w + ":q --kv " + w + ":kv --dv 48").code, 2);  // no selection
  EXPECT_EQ(run("dsa-compare " + inputs + " --sweep-topk 64,16").code, 2);          // not ascending
  EXPECT_EQ(run("dsa-compare --q " + w + ":q --kv " + w +
                ":kv --dv 48 --indices sel.npy --sweep-topk 8,64")
                .code,
            2);
  EXPECT_EQ(run("dsa-compare --q " + w + ":q --kv " + w +
                ":kv --dv 48 --indices sel.npy --needles sel.npy")
                .code,
            3);
}

// dsa-fit on a generated workload with hidden states: the weights it writes feed dsa-score and
// dsa-select, the log has the loss per step and the held-out metrics, and two runs agree.
// dsa-compare reads its indexer through the options dsa-score and dsa-select share: with
// --hidden it measures the selection dsa-select --hidden makes.
// --kv-cache fp8: dsa-attend over the library's fp8 cache of --kv equals dsa-attend over that
// cache as a u8 file (FlashMLA's layout), dsa-compare reports the cache's loss against --kv,
// and what the cache cannot be is refused before any output.
TEST_F(Cli, Fp8KvCacheInAttendAndCompare) {
  ASSERT_EQ(run("dsa-gen --length 160 --heads 2 --dqk 576 --dv 512 --needles 2 --seed 4 -q -o "
                "g.safetensors")
                .code,
            0);
  const std::string g = "g.safetensors";
  const std::string attention = "--q " + g + ":q --kv " + g + ":kv";
  write_tensor(path("cache.npy"), quantize_kv_cache_fp8(read_tensor(path(g) + ":kv")));
  Outcome r = run("dsa-attend " + attention + " --dense --kv-cache fp8 -o a.npy --report a.json");
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(nlohmann::json::parse(slurp(dir_ / "a.json"))["kv_cache"], "fp8");
  r = run("dsa-attend --q " + g + ":q --kv cache.npy --dense -q -o b.npy");
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(slurp(dir_ / "a.npy"), slurp(dir_ / "b.npy"));
  ASSERT_EQ(run("dsa-attend " + attention + " --dense -q -o c.npy --report c.json").code, 0);
  EXPECT_NE(slurp(dir_ / "a.npy"), slurp(dir_ / "c.npy"));
  EXPECT_EQ(nlohmann::json::parse(slurp(dir_ / "c.json"))["kv_cache"], "f32");

  const std::string indexer =
      " --q-index " + g + ":q_index --k-index " + g + ":k_index --weights " + g + ":weights";
  r = run("dsa-compare " + attention + indexer + " --sweep-topk 16,64 --kv-cache fp8 --threads 1");
  ASSERT_EQ(r.code, 0) << r.err;
  const auto report = nlohmann::json::parse(r.out);
  EXPECT_EQ(report["kv_cache"], "fp8");
  for (const auto& result : report["results"]) {
    const auto& loss = result["kv_cache_loss"];
    EXPECT_EQ(loss["against"], "bf16");
    const double global = loss["out_rel_err_global"].get<double>();
    EXPECT_GT(global, 1e-3);
    EXPECT_LT(global, 0.1);
  }
  const auto plain = nlohmann::json::parse(
      run("dsa-compare " + attention + indexer + " --sweep-topk 16,64 --threads 1").out);
  EXPECT_FALSE(plain["results"][0].contains("kv_cache_loss"));
  // The fp8 cache's errors against dense include the bf16 cache's selection loss and its own.
  EXPECT_NE(plain["results"][1]["out_rel_err"], report["results"][1]["out_rel_err"]);

  // Refused: compare over a cache already quantized (no bf16 to measure against), V4's attention,
  // MHA, and a u8 kv that is not the 656-byte layout; none leaves an output.
  r = run("dsa-compare --q " + g + ":q --kv cache.npy" + indexer + " --kv-cache fp8 -o x.json");
  EXPECT_EQ(r.code, 2) << r.err;
  EXPECT_NE(r.err.find("--kv-cache fp8"), std::string::npos) << r.err;
  r = run("dsa-attend --q " + g + ":q --k " + g + ":kv --v " + g +
          ":kv --dense --kv-cache fp8 -o x.npy");
  EXPECT_NE(r.code, 0);
  Tensor bytes = make_tensor(DType::u8, {160, 600}, "bytes");
  write_tensor(path("bytes.npy"), bytes);
  r = run("dsa-attend --q " + g + ":q --kv bytes.npy --dense -o x.npy");
  EXPECT_EQ(r.code, 3) << r.err;
  EXPECT_NE(r.err.find("656"), std::string::npos) << r.err;
  EXPECT_FALSE(test::fs::exists(dir_ / "x.npy"));
  EXPECT_FALSE(test::fs::exists(dir_ / "x.json"));
}

TEST_F(Cli, CompareTakesHiddenStatesLikeSelect) {
  ASSERT_EQ(run("dsa-gen --length 160 --needles 2 --needle-distance 40 --hidden 200 -q "
                "-o g.safetensors")
                .code,
            0);
  const std::string attention = "dsa-compare --q g.safetensors:q --kv g.safetensors:kv --dv 48 ";
  const std::string hidden = "--hidden g.safetensors:hidden --indexer-weights g.safetensors";
  ASSERT_EQ(run(attention + hidden + " -k 24 -o hidden.json").code, 0);
  ASSERT_EQ(run("dsa-select " + hidden + " -k 24 -q -o sel.npy").code, 0);
  ASSERT_EQ(run(attention + "--indices sel.npy -o indices.json").code, 0);
  const auto a = nlohmann::json::parse(slurp(path("hidden.json")));
  const auto b = nlohmann::json::parse(slurp(path("indices.json")));
  EXPECT_EQ(a["indexer_weights"], "g.safetensors");
  EXPECT_EQ(a["results"][0]["mass_recall"], b["results"][0]["mass_recall"]);
  EXPECT_EQ(a["results"][0]["topk_recall"], b["results"][0]["topk_recall"]);
  const Outcome both = run(attention + hidden + " --indices sel.npy -o x.json");
  EXPECT_EQ(both.code, 2);
  EXPECT_FALSE(std::filesystem::exists(path("x.json")));
}

TEST_F(Cli, FitWritesWeightsThatScoreAndSelectRead) {
  ASSERT_EQ(run("dsa-gen --length 200 --needles 2 --needle-distance 40 --hidden 200 -q "
                "-o g.safetensors")
                .code,
            0);
  const std::string inputs =
      "--hidden g.safetensors:hidden --q g.safetensors:q "
      "--kv g.safetensors:kv --dv 48";
  const std::string fit = "dsa-fit " + inputs +
                          " --indexer-heads 2 --indexer-dim 8 --steps 6 --batch-rows 16 "
                          "--eval-every 3 --eval-topk 16 --lr 1e-2 -q";
  ASSERT_EQ(run(fit + " --threads 1 -o fit.safetensors --log log.json").code, 0);
  ASSERT_EQ(run(fit + " --threads 2 -o again.safetensors").code, 0);
  EXPECT_EQ(slurp(dir_ / "fit.safetensors"), slurp(dir_ / "again.safetensors"));
  EXPECT_EQ(safetensors_names(path("fit.safetensors")),
            (std::vector<std::string>{"wq_b.weight", "wk.weight", "k_norm.weight", "k_norm.bias",
                                      "weights_proj.weight"}));
  const auto log = nlohmann::json::parse(slurp(dir_ / "log.json"));
  EXPECT_EQ(log["schema"], "dsa-fit/3");
  EXPECT_EQ(log["loss"].size(), 6u);
  ASSERT_EQ(log["evaluations"].size(), 3u);  // steps 0, 3, 6
  EXPECT_EQ(log["evaluations"][2]["step"], 6);
  EXPECT_EQ(log["rows"]["holdout"], 50);
  EXPECT_TRUE(log["evaluations"][0]["topk_recall_mean"].is_number());
  // The sparse stage from the warm-up's weights.
  ASSERT_EQ(run("dsa-fit " + inputs +
                " --init fit.safetensors --stage sparse -k 8 --steps 2 --batch-rows 8 -q "
                "-o sparse.safetensors")
                .code,
            0);
  // The fitted weights drive the indexer tools.
  const Outcome scored =
      run("dsa-score --hidden g.safetensors:hidden --indexer-weights "
          "sparse.safetensors -q -o s.npy");
  ASSERT_EQ(scored.code, 0) << scored.err;
  EXPECT_EQ(read_tensor(path("s.npy")).shape, (Shape{200, 200}));
  ASSERT_EQ(run("dsa-select --hidden g.safetensors:hidden --indexer-weights sparse.safetensors "
                "-k 4 -q -o sel.npy")
                .code,
            0);
  EXPECT_EQ(read_tensor(path("sel.npy")).shape, (Shape{200, 4}));
  // dsa-gen's own projections give exactly its q_index, k_index and weights.
  ASSERT_EQ(run("dsa-score --hidden g.safetensors:hidden --indexer-weights g.safetensors -q "
                "-o from_hidden.npy")
                .code,
            0);
  ASSERT_EQ(run("dsa-score --q-index g.safetensors:q_index --k-index g.safetensors:k_index "
                "--weights g.safetensors:weights -q -o from_tensors.npy")
                .code,
            0);
  EXPECT_EQ(slurp(dir_ / "from_hidden.npy"), slurp(dir_ / "from_tensors.npy"));
}

TEST_F(Cli, FitBadInputsExitWithOneLineAndNoOutput) {
  write("h.npy", make_tensor(DType::f32, {23, 6}, "h"));
  write("h24.npy", make_tensor(DType::f32, {24, 6}, "h"));
  const std::string attention = " --q qa.npy --kv kv.npy --dv 10";
  // Hidden states of another length than q.
  Outcome r = run("dsa-fit --hidden h.npy" + attention + " -o out.safetensors --log log.json");
  EXPECT_EQ(r.code, 3);
  EXPECT_NE(r.err.find("h.npy (hidden): expected floating point [L = 24, d_model]"),
            std::string::npos)
      << r.err;
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
  // A weights file without the projections.
  r = run("dsa-fit --hidden h24.npy" + attention + " --init bad.safetensors -o out.safetensors");
  EXPECT_EQ(r.code, 3);
  write_safetensors(path("bad.safetensors"), {make_tensor(DType::f32, {8, 6}, "wk.weight")});
  r = run("dsa-fit --hidden h24.npy" + attention + " --init bad.safetensors -o out.safetensors");
  EXPECT_EQ(r.code, 3);
  EXPECT_NE(r.err.find("has no tensor 'weights_proj.weight'"), std::string::npos) << r.err;
  r = run("dsa-score --hidden h24.npy --indexer-weights bad.safetensors -o s.npy");
  EXPECT_EQ(r.code, 3);
  EXPECT_NE(r.err.find("bad.safetensors"), std::string::npos) << r.err;
  // Weights for another d_model.
  write_safetensors(
      path("wide.safetensors"),
      {make_tensor(DType::f32, {4, 7}, "wq_b.weight"), make_tensor(DType::f32, {2, 7}, "wk.weight"),
       make_tensor(DType::f32, {2}, "k_norm.weight"), make_tensor(DType::f32, {2}, "k_norm.bias"),
       make_tensor(DType::f32, {2, 7}, "weights_proj.weight")});
  r = run("dsa-fit --hidden h24.npy" + attention + " --init wide.safetensors -o out.safetensors");
  EXPECT_EQ(r.code, 3);
  EXPECT_NE(r.err.find("d_model 7"), std::string::npos) << r.err;
  r = run("dsa-select --hidden h24.npy --indexer-weights wide.safetensors -k 2 -o s.npy");
  EXPECT_EQ(r.code, 3);
  // Usage errors; the message names the flag.
  EXPECT_EQ(run("dsa-fit --hidden h24.npy" + attention + " -o out.npy").code, 2);
  EXPECT_EQ(run("dsa-fit --hidden h24.npy" + attention + " -k 4 -o out.safetensors").code, 2);
  const auto expect_usage = [&](const std::string& flags, const std::string& needle) {
    const Outcome u = run("dsa-fit --hidden h24.npy" + attention + flags + " -o out.safetensors");
    EXPECT_EQ(u.code, 2) << flags;
    EXPECT_EQ(std::count(u.err.begin(), u.err.end(), '\n'), 1) << u.err;
    EXPECT_NE(u.err.find(needle), std::string::npos) << u.err;
  };
  expect_usage(" --holdout 1", "--holdout: must be a number in (0, 1), got 1");
  expect_usage(" --holdout 0.99",
               "--holdout: fit: holdout 0.99 of L = 24 leaves no training or no held-out rows");
  expect_usage(" --lr 0", "--lr: must be a number > 0, got 0");
  expect_usage(" --steps=-1", "--steps: must be an integer >= 0, got -1");
  expect_usage(" --batch-rows 0", "--batch-rows: must be an integer >= 1, got 0");
  expect_usage(" --eval-every 0", "--eval-every: must be an integer >= 1, got 0");
  expect_usage(" --eval-topk 0", "--eval-topk: must be an integer >= 1, got 0");
  expect_usage(" --scale 0", "--scale: softmax scale must be finite and positive, got 0");
  EXPECT_EQ(run("dsa-score --hidden h24.npy -o s.npy").code, 2);
  expect_only({"q.npy", "k.npy", "w.npy", "qa.npy", "kv.npy", "h.npy", "h24.npy", "bad.safetensors",
               "wide.safetensors"});
}

}  // namespace
}  // namespace dsa
