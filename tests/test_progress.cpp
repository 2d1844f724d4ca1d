// Progress of the library's long calls (dsa/progress.hpp) and the tools' line on a terminal
// (apps/progress.hpp): what the callback sees from real calls, scopes, nesting, results
// unchanged by a scope, the line's text, and the tools' stderr with and without it.
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <filesystem>
#include <mutex>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "../apps/progress.hpp"
#include "../lib/src/progress.hpp"
#include "cli.hpp"
#include "dsa/calibrate.hpp"
#include "dsa/compressed_attention.hpp"
#include "dsa/fit.hpp"
#include "dsa/indexer.hpp"
#include "dsa/indexer_weights.hpp"
#include "dsa/metrics.hpp"
#include "dsa/parallel.hpp"
#include "dsa/progress.hpp"
#include "dsa/topk.hpp"
#include "dsa/workload.hpp"
#include "reference.hpp"

namespace dsa {
namespace {

using namespace std::chrono_literals;

// Every update a scope's callback sees, checking that no two calls overlap.
struct Recorder {
  std::vector<ProgressUpdate> updates;
  std::vector<std::string> stages;  // the stage names, copied (the views are the library's)
  std::atomic<bool> inside{false};
  std::atomic<int> overlaps{0};

  ProgressCallback callback() {
    return [this](const ProgressUpdate& u) {
      if (inside.exchange(true)) ++overlaps;
      updates.push_back(u);
      stages.emplace_back(u.stage);
      inside = false;
    };
  }
  int64_t finished() const {
    return std::count_if(updates.begin(), updates.end(),
                         [](const ProgressUpdate& u) { return u.finished; });
  }
};

// One stage's updates: `stage` throughout, done never falling and within total, the last one
// the only finished one, at done = total.
void expect_one_stage(const Recorder& r, const std::string& stage, int64_t total) {
  ASSERT_FALSE(r.updates.empty());
  EXPECT_EQ(r.overlaps, 0);
  int64_t last = 0;
  for (std::size_t i = 0; i < r.updates.size(); ++i) {
    const ProgressUpdate& u = r.updates[i];
    EXPECT_EQ(r.stages[i], stage);
    EXPECT_EQ(u.total, total);
    EXPECT_GE(u.done, last);
    EXPECT_LE(u.done, total);
    EXPECT_EQ(u.finished, i + 1 == r.updates.size()) << i;
    last = u.done;
  }
  EXPECT_EQ(r.updates.back().done, total);
  EXPECT_EQ(r.finished(), 1);
}

struct IndexerProblem {
  Tensor q_index, k_index, weights;
  IndexerInputs inputs;
  IndexerConfig config;
  IndexerProblem(int64_t batch, int64_t queries, int64_t keys, uint64_t seed) {
    std::mt19937_64 rng(seed);
    q_index = test::random_tensor({batch, queries, 4, 16}, rng, 1.0f, "q_index");
    k_index = test::random_tensor({batch, keys, 16}, rng, 1.0f, "k_index");
    weights = test::random_tensor({batch, queries, 4}, rng, 1.0f, "weights");
    config.query_block = 4;
    inputs = make_indexer_inputs(q_index, k_index, weights, config);
  }
};

std::vector<float> all_scores(const IndexerProblem& p) {
  std::vector<float> scores(
      static_cast<std::size_t>(p.inputs.batch * p.inputs.queries * p.inputs.keys));
  indexer_scores(
      p.inputs, p.config,
      [&](const ScoreBlock& b) {
        std::copy_n(b.scores, b.rows * b.keys,
                    scores.begin() + (b.batch * p.inputs.queries + b.row_begin) * b.keys);
      },
      nullptr);
  return scores;
}

TEST(Progress, IndexerScoresCountRowsTimesBatchUpToTheTotalOnce) {
  set_threads(2);
  const IndexerProblem p(2, 96, 128, 1);
  Recorder r;
  std::vector<float> scored;
  {
    const ProgressScope scope(r.callback(), 0ns);  // every advance reports
    scored = all_scores(p);
  }
  expect_one_stage(r, "score", 2 * 96);
  EXPECT_GT(r.updates.size(), 2u);  // the blocks' own reports, not only the finished one
  EXPECT_EQ(r.updates.back().unit, "rows");
  EXPECT_EQ(scored, all_scores(p));  // the same numbers without a scope
}

TEST(Progress, FusedSelectionAndSelectionFromScoresCountRows) {
  set_threads(2);
  const IndexerProblem p(1, 80, 80, 2);
  Recorder fused, from_scores;
  std::vector<int32_t> a, b, c;
  const auto keep = [](std::vector<int32_t>& into) {
    return [&into](const SelectionBlock& s) {
      into.insert(into.end(), s.indices, s.indices + s.rows * s.k);
    };
  };
  {
    const ProgressScope scope(fused.callback(), 0ns);
    select_from_indexer(p.inputs, p.config, 8, keep(a), nullptr);
  }
  expect_one_stage(fused, "select", 80);
  select_from_indexer(p.inputs, p.config, 8, keep(b), nullptr);
  EXPECT_EQ(a, b);
  Tensor scores = make_tensor(DType::f32, {80, 80}, "scores");
  const std::vector<float> s = all_scores(p);
  std::copy(s.begin(), s.end(), mutable_data<float>(scores));
  {
    const ProgressScope scope(from_scores.callback(), 0ns);
    select_from_scores(scores, 8, keep(c), nullptr);
  }
  expect_one_stage(from_scores, "select", 80);
  EXPECT_EQ(a, c);
}

struct CompareProblem {
  Tensor q, kv, q_index, k_index, weights;
  CompareInputs inputs;
  explicit CompareProblem(int64_t L) {
    std::mt19937_64 rng(3);
    q = test::random_tensor({L, 4, 24}, rng, 1.5f, "q");
    kv = test::random_tensor({L, 24}, rng, 1.0f, "kv");
    q_index = test::random_tensor({L, 2, 8}, rng, 1.0f, "q_index");
    k_index = test::random_tensor({L, 8}, rng, 1.0f, "k_index");
    weights = test::random_tensor({L, 2}, rng, 1.0f, "weights");
    inputs.attention = make_mqa_inputs(q, kv, 16);
    inputs.scale = default_scale(24);
    inputs.indexer = make_indexer_inputs(q_index, k_index, weights, inputs.indexer_config);
    inputs.topk = {4, 16};
  }
};

TEST(Progress, CompareReportsOneStageAndTheSameNumbers) {
  set_threads(2);
  const CompareProblem p(300);
  Recorder r;
  nlohmann::json with_scope;
  {
    const ProgressScope scope(r.callback(), 0ns);
    with_scope = comparison_json(compare_attention(p.inputs, nullptr));
  }
  expect_one_stage(r, "compare", 300);
  EXPECT_EQ(with_scope.dump(), comparison_json(compare_attention(p.inputs, nullptr)).dump());
}

TEST(Progress, AttentionCountsRows) {
  set_threads(2);
  const CompareProblem p(70);
  Recorder r;
  std::vector<float> with_scope, without;
  const auto keep = [](std::vector<float>& into) {
    return [&into](const AttentionBlock& b) {
      into.insert(into.end(), b.out, b.out + b.rows * b.heads * b.d_v);
    };
  };
  {
    const ProgressScope scope(r.callback(), 0ns);
    dense_attention(p.inputs.attention, p.inputs.scale, keep(with_scope), nullptr);
  }
  expect_one_stage(r, "attend", 70);
  dense_attention(p.inputs.attention, p.inputs.scale, keep(without), nullptr);
  EXPECT_EQ(with_scope, without);
}

// compare_compressed_attention attends through compressed_attention, which runs the backend's
// attention: the outer stage alone reports.
TEST(Progress, NestedLibraryCallsLeaveTheLineToTheOutermostStage) {
  set_threads(2);
  std::mt19937_64 rng(4);
  const int64_t T = 512, Lq = 48, H = 2, d = 16;
  const Tensor q = test::random_tensor({Lq, H, d}, rng, 1.0f, "q");
  const Tensor kv = test::random_tensor({T, d}, rng, 1.0f, "kv");
  const Tensor c128 = test::random_tensor({T / 128, d}, rng, 1.0f, "compressed");
  CompressedCompareInputs ci;
  ci.attention = make_compressed_attention_inputs(q, kv, &c128, nullptr, V4Attention::hca, 16);
  ci.scale = default_scale(d);
  ci.reference = V4Reference::dense;
  Recorder r;
  {
    const ProgressScope scope(r.callback(), 0ns);
    compare_compressed_attention(ci, nullptr);
  }
  expect_one_stage(r, "compare", Lq);
  // The inner call on its own reports its own stage.
  Recorder inner;
  {
    const ProgressScope scope(inner.callback(), 0ns);
    compressed_attention(
        ci.attention, nullptr, ci.scale, [](const AttentionBlock&) {}, nullptr);
  }
  expect_one_stage(inner, "attend", Lq);
}

TEST(Progress, FitCountsStepsAndItsEvaluationsReportNothing) {
  set_threads(2);
  std::mt19937_64 rng(5);
  const int64_t L = 64;
  const Tensor hidden = test::random_tensor({L, 12}, rng, 1.0f, "hidden");
  const Tensor q = test::random_tensor({L, 2, 16}, rng, 1.0f, "q");
  const Tensor kv = test::random_tensor({L, 16}, rng, 1.0f, "kv");
  const FitData data = make_fit_data(hidden, make_mqa_inputs(q, kv, 8), default_scale(16));
  FitOptions options;
  options.steps = 5;
  options.batch_rows = 8;
  options.eval_every = 2;
  options.eval_topk = 4;
  IndexerWeights with_scope = random_indexer_weights(12, 2, 8, 1), without = with_scope;
  Recorder r;
  {
    const ProgressScope scope(r.callback(), 0ns);
    fit_indexer(data, with_scope, options, {});
  }
  expect_one_stage(r, "fit", 5);
  EXPECT_EQ(r.updates.back().unit, "steps");
  fit_indexer(data, without, options, {});
  EXPECT_EQ(with_scope.wq, without.wq);
  EXPECT_EQ(with_scope.weights_proj, without.weights_proj);
}

TEST(Progress, CalibrationIsOneStageOfFractionsOnly) {
  Recorder r;
  {
    const ProgressScope scope(r.callback(), 0ns);
    calibrate(0.01);
  }
  ASSERT_FALSE(r.updates.empty());
  expect_one_stage(r, "calibrate", r.updates.back().total);
  EXPECT_EQ(r.updates.back().unit, "");
  EXPECT_GT(r.updates.back().total, 0);
}

TEST(Progress, WorkloadGenerationCountsTokens) {
  set_threads(2);
  WorkloadConfig c;
  c.length = 300;
  Recorder r;
  GeneratedWorkload w;
  {
    const ProgressScope scope(r.callback(), 0ns);
    w = generate_workload(c);
  }
  expect_one_stage(r, "generate", 300);
  EXPECT_EQ(r.updates.back().unit, "tokens");
  const GeneratedWorkload again = generate_workload(c);  // the same numbers without a scope
  ASSERT_EQ(w.kv.nbytes(), again.kv.nbytes());
  EXPECT_TRUE(std::equal(w.kv.data, w.kv.data + w.kv.nbytes(), again.kv.data));
  EXPECT_TRUE(std::equal(w.q.data, w.q.data + w.q.nbytes(), again.q.data));
}

TEST(Progress, NothingWithoutAScopeOnThisThread) {
  const IndexerProblem p(1, 40, 40, 6);
  Recorder r;
  { const ProgressScope scope(r.callback(), 0ns); }
  all_scores(p);  // the scope is gone
  // A scope on another thread does not see this thread's calls.
  std::atomic<bool> ready{false}, done{false};
  std::thread other([&] {
    const ProgressScope scope(r.callback(), 0ns);
    ready = true;
    while (!done) std::this_thread::yield();
  });
  while (!ready) std::this_thread::yield();
  all_scores(p);
  done = true;
  other.join();
  EXPECT_TRUE(r.updates.empty());
}

TEST(Progress, TheInnermostScopeWinsAndAnEmptyOneSilences) {
  const IndexerProblem p(1, 40, 40, 7);
  Recorder outer, inner;
  const ProgressScope outer_scope(outer.callback(), 0ns);
  {
    const ProgressScope inner_scope(inner.callback(), 0ns);
    all_scores(p);
  }
  EXPECT_TRUE(outer.updates.empty());
  expect_one_stage(inner, "score", 40);
  {
    const ProgressScope silent(ProgressCallback{});
    all_scores(p);
  }
  EXPECT_TRUE(outer.updates.empty());
  all_scores(p);  // the outer scope again
  expect_one_stage(outer, "score", 40);
}

TEST(Progress, AStageLeftByAnExceptionStillFinishesOnce) {
  const IndexerProblem p(1, 200, 200, 8);
  Recorder r;
  {
    const ProgressScope scope(r.callback(), 0ns);
    EXPECT_THROW(indexer_scores(
                     p.inputs, p.config,
                     [](const ScoreBlock&) { throw std::runtime_error("disk full"); }, nullptr),
                 std::runtime_error);
  }
  ASSERT_FALSE(r.updates.empty());
  EXPECT_EQ(r.finished(), 1);
  EXPECT_TRUE(r.updates.back().finished);
  EXPECT_LT(r.updates.back().done, 200);
}

// Four threads advancing one counter made on this thread, as a loop's workers do.
void advance_from_threads(detail::Progress& progress) {
  std::vector<std::thread> workers;
  for (int w = 0; w < 4; ++w) {
    workers.emplace_back([&] {
      for (int i = 0; i < 1000; ++i) progress.advance(1);
    });
  }
  for (std::thread& w : workers) w.join();
}

TEST(Progress, CounterFromManyThreadsIsMonotonicAndRateLimited) {
  Recorder every, limited;
  {
    const ProgressScope scope(every.callback(), 0ns);
    detail::Progress progress("test", 4000, "items");
    advance_from_threads(progress);
  }
  expect_one_stage(every, "test", 4000);
  EXPECT_GT(every.updates.size(), 1u);
  {
    const ProgressScope scope(limited.callback(), 1h);
    detail::Progress progress("test", 4000, "items");
    advance_from_threads(progress);
  }
  ASSERT_EQ(limited.updates.size(), 1u);  // only the finished report within the hour
  expect_one_stage(limited, "test", 4000);
}

TEST(ProgressLine, Durations) {
  EXPECT_EQ(app::format_duration(0), "0 ms");
  EXPECT_EQ(app::format_duration(-1), "0 ms");
  EXPECT_EQ(app::format_duration(0.85), "850 ms");
  EXPECT_EQ(app::format_duration(0.9996), "1.0 s");
  EXPECT_EQ(app::format_duration(4.24), "4.2 s");
  EXPECT_EQ(app::format_duration(9.96), "10 s");
  EXPECT_EQ(app::format_duration(13.2), "13 s");
  EXPECT_EQ(app::format_duration(59.6), "1 min 00 s");
  EXPECT_EQ(app::format_duration(125), "2 min 05 s");
  EXPECT_EQ(app::format_duration(3599.6), "1 h 00 min");
  EXPECT_EQ(app::format_duration(3720), "1 h 02 min");
  EXPECT_EQ(app::format_duration(100 * 3600.0 + 59), "100 h 01 min");
}

TEST(ProgressLine, Lines) {
  ProgressUpdate u{"compare", 4096, 16384};
  EXPECT_EQ(app::progress_line("dsa-compare", u, 13),
            "dsa-compare: compare 4096/16384 rows (25%), 13 s, ETA 39 s");
  u.done = 300;  // under 3%: no ETA yet
  EXPECT_EQ(app::progress_line("dsa-compare", u, 0.85),
            "dsa-compare: compare 300/16384 rows (1%), 850 ms");
  u.done = 16384;  // done: no ETA
  EXPECT_EQ(app::progress_line("dsa-compare", u, 52.5),
            "dsa-compare: compare 16384/16384 rows (100%), 53 s");
  const ProgressUpdate fit{"fit", 120, 800, false, 0, "steps"};
  EXPECT_EQ(app::progress_line("dsa-fit", fit, 30),
            "dsa-fit: fit 120/800 steps (15%), 30 s, ETA 2 min 50 s");
  const ProgressUpdate calibrate{"calibrate", 1200000, 4000000, false, 0, ""};
  EXPECT_EQ(app::progress_line("dsa-cost", calibrate, 1.3),
            "dsa-cost: calibrate 30%, 1.3 s, ETA 3.0 s");
  const ProgressUpdate unknown{"score", 5, 0};
  EXPECT_EQ(app::progress_line("dsa-score", unknown, 2), "dsa-score: score 5 rows, 2.0 s");
}

// The line from a tool: a run long enough (about a second) for several of the renderer's redraws.
class ProgressCli : public test::Cli {
 protected:
  void SetUp() override {
    Cli::SetUp();
    ASSERT_EQ(run("dsa-gen --length 256 --hidden 200 -q -o g.safetensors").code, 0);
  }
  const std::string fit =
      "dsa-fit --hidden g.safetensors:hidden --q g.safetensors:q --kv g.safetensors:kv --dv 48 "
      "--indexer-heads 2 --indexer-dim 8 --batch-rows 64 --eval-every 300 --eval-topk 16 "
      "--steps 600 --threads 1 -o w.safetensors";
};

// Where `text` starts a line of what a terminal shows: after a newline or a cleared line.
bool starts_a_line(const std::string& err, const std::string& text) {
  const std::size_t at = err.find(text);
  if (at == std::string::npos) return false;
  return at == 0 || err[at - 1] == '\n' || (at >= 4 && err.compare(at - 4, 4, "\r\x1b[K") == 0);
}

TEST_F(ProgressCli, FitDrawsTheLineOnlyWhenForcedAndNeverWithQuiet) {
  const test::Outcome forced = run("DSA_PROGRESS=always " + fit);
  ASSERT_EQ(forced.code, 0) << forced.err;
  const std::size_t drawn = forced.err.find("\rdsa-fit: fit ");
  ASSERT_NE(drawn, std::string::npos) << forced.err;
  EXPECT_NE(forced.err.find(" steps (", drawn), std::string::npos);
  EXPECT_NE(forced.err.find("\x1b[K", drawn), std::string::npos);
  // The evaluations' lines print above it; after the last one, the stage ends and nothing is
  // drawn again (the report comes on a clean line).
  for (const char* step :
       {"dsa-fit: step 0/600 (", "dsa-fit: step 300/600 (", "dsa-fit: step 600/600 ("}) {
    EXPECT_TRUE(starts_a_line(forced.err, step)) << step << forced.err;
  }
  EXPECT_EQ(forced.err.find('\r', forced.err.find("dsa-fit: step 600/600 (")), std::string::npos);

  // Not a terminal: the evaluations' lines and the report only.
  for (const std::string& setting : {"env -u DSA_PROGRESS ", "DSA_PROGRESS=never "}) {
    const test::Outcome plain = run(setting + fit);
    ASSERT_EQ(plain.code, 0) << plain.err;
    EXPECT_EQ(plain.err.find('\r'), std::string::npos) << setting;
    EXPECT_EQ(plain.err.find('\x1b'), std::string::npos) << setting;
    EXPECT_EQ(plain.err.rfind("dsa-fit: step 0/600 (", 0), 0u) << plain.err;
    EXPECT_NE(plain.err.find("\ndsa-fit: step 300/600 ("), std::string::npos);
    EXPECT_NE(plain.err.find("\ndsa-fit: step 600/600 ("), std::string::npos);
  }

  // -q: nothing on the terminal, forced or not, and every file asked for is written.
  const test::Outcome quiet =
      run("DSA_PROGRESS=always " + fit + " -q --report r.json --log l.json");
  ASSERT_EQ(quiet.code, 0) << quiet.err;
  EXPECT_EQ(quiet.err, "");
  EXPECT_EQ(nlohmann::json::parse(test::slurp(dir_ / "r.json"))["tool"], "dsa-fit");
  EXPECT_EQ(nlohmann::json::parse(test::slurp(dir_ / "l.json"))["evaluations"].size(), 3u);
  EXPECT_TRUE(std::filesystem::exists(dir_ / "w.safetensors"));
}

// Every tool, once common.cpp's run() installs terminal_progress (apps/progress.hpp).
TEST_F(ProgressCli, CompareDrawsTheLineOnlyWhenForced) {
  ASSERT_EQ(run("dsa-gen --length 4096 -q -o long.safetensors").code, 0);
  const std::string compare =
      "dsa-compare --q long.safetensors:q --kv long.safetensors:kv --dv 48 --q-index "
      "long.safetensors:q_index --k-index long.safetensors:k_index --weights "
      "long.safetensors:weights --sweep-topk 64,256 --threads 1 -o c.json";
  const test::Outcome forced = run("DSA_PROGRESS=always " + compare);
  ASSERT_EQ(forced.code, 0) << forced.err;
  EXPECT_NE(forced.err.find("\rdsa-compare: compare "), std::string::npos) << forced.err;
  EXPECT_EQ(forced.err.rfind("\r\x1b[K"), forced.err.size() - 4) << forced.err;
  const test::Outcome plain = run("env -u DSA_PROGRESS " + compare);
  ASSERT_EQ(plain.code, 0);
  EXPECT_EQ(plain.err, "");
}

}  // namespace
}  // namespace dsa
