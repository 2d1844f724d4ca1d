// Determinism: every output of every tool is the same to the bit at 1 and 2 threads and from one
// run to the next (the reports too, but for their timings, memory and command line).
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "cli.hpp"

namespace dsa {
namespace {

using test::slurp;

class Determinism : public test::Cli {
 protected:
  // Runs `command` (which writes `outputs`) at --threads 1, 2 and 2 again, and expects the
  // three runs to agree byte for byte; returns the outputs of the first run.
  std::vector<std::string> expect_deterministic(const std::string& command,
                                                const std::vector<std::string>& outputs) {
    std::vector<std::vector<std::string>> runs;
    for (const int threads : {1, 2, 2}) {
      const test::Outcome r = run(command + " --threads " + std::to_string(threads));
      EXPECT_EQ(r.code, 0) << command << ": " << r.err;
      std::vector<std::string> bytes;
      for (const auto& name : outputs) {
        bytes.push_back(name == "-" ? r.out : slurp(dir_ / name));
        EXPECT_FALSE(bytes.back().empty()) << command << ": " << name;
      }
      runs.push_back(bytes);
    }
    for (std::size_t i = 0; i < outputs.size(); ++i) {
      EXPECT_EQ(runs[0][i], runs[1][i]) << command << ": " << outputs[i] << " at 1 vs 2 threads";
      EXPECT_EQ(runs[1][i], runs[2][i]) << command << ": " << outputs[i] << " in two runs";
    }
    return runs[0];
  }
};

// What of a JSON report must not depend on the thread count or the run.
nlohmann::json without_run_details(nlohmann::json report) {
  for (const char* key : {"command", "threads", "timings_ms", "stage_ms", "peak_rss_bytes"})
    report.erase(key);
  if (report.contains("calibration")) report.erase("calibration");
  return report;
}

TEST_F(Determinism, EveryToolOutputAtOneAndTwoThreadsAndAcrossRuns) {
  const std::string gen = "dsa-gen --length 300 --needles 4 --seed 9 -q -o w.safetensors";
  expect_deterministic(gen, {"w.safetensors"});
  const std::string w = "w.safetensors";
  const std::string indexer =
      "--q-index " + w + ":q_index --k-index " + w + ":k_index --weights " + w + ":weights";
  const std::string attention = "--q " + w + ":q --kv " + w + ":kv --dv 48";
  for (const std::string precision :
       {"--precision f32", "--precision bf16", "--precision fp8 --ue8m0 --hadamard"}) {
    expect_deterministic("dsa-score " + indexer + " " + precision + " -q -o scores.npy",
                         {"scores.npy"});
    expect_deterministic("dsa-select " + indexer + " " + precision + " -k 32 -q -o s.npy",
                         {"s.npy"});
    expect_deterministic("dsa-select " + indexer + " " + precision + " -k 32 -q -o s.jsonl",
                         {"s.jsonl"});
  }
  expect_deterministic("dsa-select --scores scores.npy -k 32 -q -o t.npy", {"t.npy"});
  expect_deterministic("dsa-attend " + attention + " --indices s.npy -q -o o.npy --lse l.npy",
                       {"o.npy", "l.npy"});
  expect_deterministic("dsa-attend " + attention + " --indices s.jsonl -q -o oj.npy", {"oj.npy"});
  expect_deterministic("dsa-attend " + attention + " --dense -q -o d.npy --lse dl.npy",
                       {"d.npy", "dl.npy"});

  // Reports: equal but for what describes the run itself.
  for (const std::string compare : {"dsa-compare " + attention + " " + indexer + " --needles " + w +
                                        ":needles --sweep-topk 16,64 -o c.json",
                                    "dsa-compare " + attention + " --indices s.npy -o c.json"}) {
    std::vector<nlohmann::json> reports;
    for (const int threads : {1, 2, 2}) {
      ASSERT_EQ(run(compare + " --threads " + std::to_string(threads)).code, 0) << compare;
      reports.push_back(without_run_details(nlohmann::json::parse(slurp(dir_ / "c.json"))));
    }
    EXPECT_EQ(reports[0], reports[1]) << compare;
    EXPECT_EQ(reports[1], reports[2]) << compare;
  }
  const std::string presets = "--presets '" DSA_TESTS_DIR "/../data/presets'";
  expect_deterministic("dsa-cost " + presets + " --format csv -q -o cost.csv --plot cost.svg",
                       {"cost.csv", "cost.svg"});
  std::vector<nlohmann::json> costs;
  for (int i = 0; i < 2; ++i) {
    ASSERT_EQ(run("dsa-cost " + presets + " -q -o cost.json").code, 0);
    costs.push_back(without_run_details(nlohmann::json::parse(slurp(dir_ / "cost.json"))));
  }
  EXPECT_EQ(costs[0], costs[1]);
}

}  // namespace
}  // namespace dsa
