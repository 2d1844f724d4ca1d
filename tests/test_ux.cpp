// The tools as a person at a terminal and a script meet them (issue 15): unknown options named
// with the nearest one, the tool's name in --version, defaults named in messages, the k >= Lk
// warning, outputs checked before any work, `schema` in every report, the one-line summary and
// dsa-compare's table on a terminal (through script(1)'s pseudo-terminal) and the JSON
// elsewhere, and dsa-cost's model variants.
#include <gtest/gtest.h>

#include <string>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "cli.hpp"

namespace dsa::test {
namespace {

bool have_script() {
  return std::system("command -v script >/dev/null 2>&1") == 0;
}

// The command under script(1): stdout and stderr both a terminal, their text in out.
std::string on_terminal(const std::string& command) {
  return "script -qec \"" + command + "\" /dev/null";
}

TEST_F(Cli, UnknownOptionIsNamedFirstWithTheNearestOne) {
  Outcome r = run("dsa-select --q-index q.npy --k-index k.npy --weights w.npy --top-k 8");
  EXPECT_EQ(r.code, 2);
  EXPECT_NE(r.err.find("unknown option --top-k; did you mean --topk?"), std::string::npos) << r.err;
  r = run("dsa-select --q_index q.npy --k-index k.npy --weights w.npy -k 8");
  EXPECT_EQ(r.code, 2);
  EXPECT_NE(r.err.find("unknown option --q_index; did you mean --q-index?"), std::string::npos)
      << r.err;
  r = run("dsa-compare --q qa.npy --kv kv.npy --frobnicate");
  EXPECT_EQ(r.code, 2);
  EXPECT_NE(r.err.find("unknown option --frobnicate ("), std::string::npos) << r.err;
  // After `--` nothing is an option, and a value is not one either.
  r = run("dsa-select --scores -- --top-k");
  EXPECT_EQ(r.err.find("unknown option"), std::string::npos) << r.err;
  expect_only({"q.npy", "k.npy", "w.npy", "qa.npy", "kv.npy"});
}

TEST_F(Cli, VersionNamesTheTool) {
  for (const char* tool : {"dsa-score", "dsa-select", "dsa-compare", "dsa-cost"}) {
    const Outcome r = run(std::string(tool) + " --version");
    EXPECT_EQ(r.code, 0);
    EXPECT_EQ(r.out.rfind(std::string(tool) + " ", 0), 0u) << r.out;
  }
}

TEST_F(Cli, AMessageAboutADefaultSaysItIsTheDefault) {
  ASSERT_EQ(run("dsa-select --q-index q.npy --k-index k.npy --weights w.npy -k 4 -o i.npy").code,
            0);
  Outcome r = run("dsa-attend --q qa.npy --kv kv.npy --indices i.npy -o o.npy");  // d_qk 20
  EXPECT_EQ(r.code, 2);
  EXPECT_NE(r.err.find("got 512 (the default of --dv: give --dv)"), std::string::npos) << r.err;
  r = run("dsa-attend --q qa.npy --kv kv.npy --dv 30 --indices i.npy -o o.npy");
  EXPECT_EQ(r.code, 2);
  EXPECT_NE(r.err.find("--dv: d_v must be in [1, d_qk = 20], got 30"), std::string::npos) << r.err;
  EXPECT_EQ(r.err.find("default"), std::string::npos) << r.err;
}

TEST_F(Cli, KAtLeastTheKeysWarns) {
  const std::string in = "--q-index q.npy --k-index k.npy --weights w.npy";
  Outcome r = run("dsa-select " + in + " -k 24 -o i.npy");
  EXPECT_EQ(r.code, 0);
  EXPECT_NE(r.err.find("dsa-select: warning: k = 24 >= the 24 keys"), std::string::npos) << r.err;
  r = run("dsa-select " + in + " -k 23 -o i.npy");
  EXPECT_EQ(r.err.find("warning"), std::string::npos) << r.err;
  r = run("dsa-compare --q qa.npy --kv kv.npy --dv 20 " + in + " --sweep-topk 4,24,30 -o c.json");
  EXPECT_EQ(r.code, 0);
  EXPECT_NE(r.err.find("warning: k = 24, 30 >= the 24 keys"), std::string::npos) << r.err;
}

TEST_F(Cli, OutputsAreCheckedBeforeAnyWorkAndAFailedRunLeavesNone) {
  const std::string in = "--q-index q.npy --k-index k.npy --weights w.npy";
  Outcome r = run("dsa-compare --q qa.npy --kv kv.npy --dv 20 " + in + " -k 4 -o nodir/c.json");
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("-o: cannot write 'nodir/c.json'"), std::string::npos) << r.err;
  r = run("dsa-select " + in + " -k 4 -o i.npy --report nodir/r.json");
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("--report: cannot write"), std::string::npos) << r.err;
  r = run("dsa-cost --plot p.svg -o nodir/c.json");
  EXPECT_EQ(r.code, 1);
  r = run("dsa-cost --plot nodir/p.svg -o c.json");
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("--plot: cannot write"), std::string::npos) << r.err;
  r = run("dsa-attend --q qa.npy --kv kv.npy --dv 20 --dense -o o.npy --lse nodir/l.npy");
  EXPECT_EQ(r.code, 1);
  expect_only({"q.npy", "k.npy", "w.npy", "qa.npy", "kv.npy"});
}

TEST_F(Cli, EveryReportHasItsSchemaAndNamesItsOutputs) {
  const std::string in = "--q-index q.npy --k-index k.npy --weights w.npy";
  ASSERT_EQ(run("dsa-score " + in + " -o s.npy --report score.json").code, 0);
  ASSERT_EQ(run("dsa-select " + in + " -k 4 -o i.npy --report select.json").code, 0);
  ASSERT_EQ(run("dsa-attend --q qa.npy --kv kv.npy --dv 20 --indices i.npy -o o.npy --lse l.npy "
                "--report attend.json")
                .code,
            0);
  ASSERT_EQ(run("dsa-gen --length 64 -o g.safetensors --report gen.json").code, 0);
  for (const std::string tool : {"score", "select", "attend", "gen"}) {
    SCOPED_TRACE(tool);
    const nlohmann::json report = nlohmann::json::parse(slurp(path(tool + ".json")));
    EXPECT_EQ(report["schema"], "dsa-" + tool + "/1");
    EXPECT_EQ(report["tool"], "dsa-" + tool);
    for (const auto& o : report["outputs"]) {
      EXPECT_TRUE(o.contains("name")) << o;
      EXPECT_FALSE(o.contains("path")) << o;
    }
  }
  const nlohmann::json select = nlohmann::json::parse(slurp(path("select.json")));
  EXPECT_EQ(select["topk"], 4);
  EXPECT_EQ(select["outputs"][0]["name"], "i.npy");
}

TEST_F(Cli, ATerminalGetsASummaryAndAPipeTheJson) {
  if (!have_script()) GTEST_SKIP() << "no script(1) for a pseudo-terminal";
  const std::string in = "--q-index q.npy --k-index k.npy --weights w.npy";
  // Not a terminal: the JSON on stderr, as scripts and CI logs read it.
  Outcome r = run("dsa-select " + in + " -k 4 -o i.npy");
  ASSERT_EQ(r.code, 0);
  EXPECT_EQ(nlohmann::json::parse(r.err)["tool"], "dsa-select");
  // A terminal: one line.
  r = run(on_terminal("dsa-select " + in + " -k 4 -o i.npy"));
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_NE(r.out.find("dsa-select: top-4 of 24 keys, f32 indexer on cpu: wrote i.npy i32 "
                       "[24, 4] in "),
            std::string::npos)
      << r.out;
  EXPECT_EQ(r.out.find('{'), std::string::npos) << r.out;
  // --json asks for the JSON there too; --report FILE keeps it and the line stays.
  r = run(on_terminal("dsa-select " + in + " -k 4 -o i.npy --json"));
  EXPECT_NE(r.out.find("\"tool\": \"dsa-select\""), std::string::npos) << r.out;
  r = run(on_terminal("dsa-select " + in + " -k 4 -o i.npy --report r.json"));
  EXPECT_NE(r.out.find("wrote i.npy"), std::string::npos) << r.out;
  EXPECT_EQ(nlohmann::json::parse(slurp(path("r.json")))["tool"], "dsa-select");
  r = run(on_terminal("dsa-select " + in + " -k 4 -o i.npy -q"));
  EXPECT_EQ(r.out, "");

  // dsa-compare: the table instead of the JSON on a terminal, the JSON through a pipe.
  const std::string compare = "dsa-compare --q qa.npy --kv kv.npy --dv 20 " + in;
  r = run(on_terminal(compare + " --sweep-topk 4,8"));
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_NE(r.out.find("mass recall"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("dsa-compare: 24 queries x 24 keys, 3 heads"), std::string::npos) << r.out;
  EXPECT_EQ(r.out.find('{'), std::string::npos) << r.out;
  r = run(compare + " --sweep-topk 4,8 | cat");
  ASSERT_EQ(r.code, 0);
  const nlohmann::json report = nlohmann::json::parse(r.out);
  ASSERT_EQ(report["results"].size(), 2u);
  // Each row of the table holds its k's means over the sparse rows, as the report has them.
  r = run(on_terminal(compare + " --sweep-topk 4,8 -o c.json"));
  const nlohmann::json file = nlohmann::json::parse(slurp(path("c.json")));
  for (const auto& result : file["results"]) {
    const std::string mass =
        fmt::format("{:.4f}", result["mass_recall"]["sparse"]["mean"].get<double>());
    const std::string row = fmt::format("{:>8} {:>11} {:>11}", result["topk"].get<int64_t>(),
                                        result["rows"]["sparse"].get<int64_t>(), mass);
    EXPECT_NE(r.out.find(row), std::string::npos) << row << "\n" << r.out;
  }
}

TEST_F(Cli, CostComparesVariantsOfOneModel) {
  ASSERT_EQ(run("dsa-cost --compare-models 'DeepSeek-V3.2-Exp,DeepSeek-V3.2-Exp@topk=1024' "
                "--set 'DeepSeek-V3.2-Exp@topk=1024.window=0' --max-context 65536 -q -o c.json")
                .code,
            0);
  const nlohmann::json report = nlohmann::json::parse(slurp(path("c.json")));
  const auto& models = report["comparison"]["models"];
  ASSERT_EQ(models.size(), 2u);
  EXPECT_EQ(models[1]["name"], "DeepSeek-V3.2-Exp@topk=1024");
  EXPECT_EQ(models[1]["topk"], 1024);
  EXPECT_EQ(models[0]["topk"], 2048);
  // Fewer keys attended: fewer FLOPs per token at 64K, the same KV cache.
  const auto& at = report["comparison"]["at_max_context"]["models"];
  EXPECT_LT(at[1]["flops"].get<double>(), at[0]["flops"].get<double>());
  EXPECT_EQ(at[1]["kv_cache_bytes"], at[0]["kv_cache_bytes"]);
  const Outcome r = run("dsa-cost --compare-models 'DeepSeek-V3.2-Exp,DeepSeek-V3.2-Exp@topk'");
  EXPECT_EQ(r.code, 2);
  EXPECT_NE(r.err.find("expected MODEL@FIELD=VALUE"), std::string::npos) << r.err;
}

}  // namespace
}  // namespace dsa::test
