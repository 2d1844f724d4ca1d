// CPU kernels against this machine's own f32 GEMM rate, measured in the same run: the fused
// indexer (f32 and fp8), top-k selection, sparse and dense attention, and the whole DSA
// pipeline (fp8 indexer + top-k + sparse MQA attention) against dense attention.
// Usage: dsa-cpu-bench [--L 8192] [--threads 1,2] [--heads 16] [--topk 2048] [--json FILE]
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <string>
#include <vector>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "dsa/attention.hpp"
#include "dsa/indexer.hpp"
#include "dsa/parallel.hpp"
#include "dsa/report.hpp"
#include "dsa/topk.hpp"
#include "gemm_ceiling.hpp"

namespace {

using namespace dsa;

struct Options {
  int64_t L = 8192, heads = 16, topk = 2048;
  int64_t index_heads = 64, index_dim = 128, d_qk = 576, d_v = 512;
  std::vector<int> threads = {1, 2};
  int repeats = 1;
  bool dense = true;
  std::string json;
};

// Uniform in [-1, 1): fast enough for a billion elements, and the same on every run.
Tensor random_tensor(Shape shape, uint64_t seed, const char* name) {
  Tensor t = make_tensor(DType::f32, std::move(shape), name);
  float* p = mutable_data<float>(t);
  const int64_t n = t.numel();
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    uint64_t x = (static_cast<uint64_t>(i) + 1) * 0x9E3779B97F4A7C15ull ^ seed;
    x ^= x >> 31;
    x *= 0xBF58476D1CE4E5B9ull;
    x ^= x >> 29;
    p[i] = static_cast<float>(static_cast<double>(x >> 40) / static_cast<double>(1 << 23) - 1.0);
  }
  return t;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

struct Row {
  std::string kernel;
  int threads;
  double seconds, gflop;  // gflop 0: not an arithmetic kernel
  double ceiling;         // GFLOP/s of the matching GEMM, same thread count
};

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) throw std::runtime_error("missing value after " + a);
      return argv[++i];
    };
    if (a == "--L") o.L = std::stoll(next());
    else if (a == "--heads") o.heads = std::stoll(next());
    else if (a == "--topk") o.topk = std::stoll(next());
    else if (a == "--repeats") o.repeats = std::stoi(next());
    else if (a == "--no-dense") o.dense = false;
    else if (a == "--json") o.json = next();
    else if (a == "--threads") {
      o.threads.clear();
      std::string list = next();
      for (std::size_t p = 0; p < list.size();) {
        const std::size_t comma = std::min(list.find(',', p), list.size());
        o.threads.push_back(std::stoi(list.substr(p, comma - p)));
        p = comma + 1;
      }
    } else {
      throw std::runtime_error("unknown argument " + a);
    }
  }
  return o;
}

}  // namespace

int main(int argc, char** argv) {
  const Options o = parse(argc, argv);
  const int64_t L = o.L, k = o.topk;
  fmt::print(stderr, "dsa-cpu-bench: L = {}, H = {}, k = {}, H_I x d_I = {} x {}\n", L, o.heads, k,
             o.index_heads, o.index_dim);
  const Tensor q_index = random_tensor({L, o.index_heads, o.index_dim}, 1, "q_index");
  const Tensor k_index = random_tensor({L, o.index_dim}, 2, "k_index");
  Tensor weights = random_tensor({L, o.index_heads}, 3, "weights");
  const Tensor q = random_tensor({L, o.heads, o.d_qk}, 4, "q");
  const Tensor kv = random_tensor({L, o.d_qk}, 5, "kv");
  const IndexerInputs index_inputs = make_indexer_inputs(q_index, k_index, weights, {});
  const AttentionInputs attention = make_mqa_inputs(q, kv, o.d_v);
  const float scale = default_scale(o.d_qk);

  double pairs = 0, selected = 0;  // visible (t, s) pairs, selected entries
  for (int64_t t = 0; t < L; ++t) {
    pairs += static_cast<double>(t + 1);
    selected += static_cast<double>(std::min(t + 1, k));
  }
  const double index_gflop = 2.0 * static_cast<double>(o.index_heads * o.index_dim) * pairs / 1e9;
  const double per_key = 2.0 * static_cast<double>(o.heads * (o.d_qk + o.d_v)) / 1e9;

  Tensor indices = make_tensor(DType::i32, {L, k}, "indices");
  const SelectionSink keep = [&](const SelectionBlock& block) {
    std::memcpy(mutable_data<int32_t>(indices) + block.row_begin * k, block.indices,
                static_cast<std::size_t>(block.rows * k) * sizeof(int32_t));
  };
  const AttentionSink discard = [](const AttentionBlock&) {};

  std::vector<Row> rows;
  for (const int threads : o.threads) {
    set_threads(threads);
    const double ceiling_index = bench::gemm_gflops(1024, 2048, o.index_dim, 1.0);
    const double ceiling_attention = bench::gemm_gflops(1024, 2048, o.d_qk, 1.0);
    rows.push_back({fmt::format("gemm f32, depth {}", o.index_dim), threads, 0, 0, ceiling_index});
    rows.push_back({fmt::format("gemm f32, depth {}", o.d_qk), threads, 0, 0, ceiling_attention});
    fmt::print(stderr, "threads {}: GEMM {:.1f} GFLOP/s (depth {}), {:.1f} (depth {})\n", threads,
               ceiling_index, o.index_dim, ceiling_attention, o.d_qk);

    for (const bool fp8 : {false, true}) {
      IndexerConfig config;
      if (fp8) {
        config.precision = Precision::fp8;
        config.hadamard = true;
        config.ue8m0 = true;
      }
      std::vector<double> score, select, total;
      for (int r = 0; r < o.repeats; ++r) {
        StageTimes times;
        const Stopwatch watch;
        select_from_indexer(index_inputs, config, k, keep, &times);
        total.push_back(watch.seconds());
        score.push_back(times.get("score"));
        select.push_back(times.get("select"));
      }
      const std::string name = fp8 ? "indexer fp8 (hadamard, ue8m0)" : "indexer f32";
      rows.push_back({name, threads, median(score), index_gflop, ceiling_index});
      rows.push_back({"top-k after " + name, threads, median(select), 0, 0});
      fmt::print(stderr, "  {}: score {:.3f} s, top-k {:.3f} s\n", name, median(score),
                 median(select));
      if (fp8) rows.push_back({"DSA select (fp8 indexer + top-k)", threads, median(total), 0, 0});
    }
    std::vector<double> sparse, dense;
    for (int r = 0; r < o.repeats; ++r) {
      Stopwatch watch;
      sparse_attention(attention, indices, scale, discard, nullptr);
      sparse.push_back(watch.seconds());
    }
    rows.push_back({"sparse attention", threads, median(sparse), per_key * selected,
                    ceiling_attention});
    fmt::print(stderr, "  sparse attention {:.3f} s\n", median(sparse));
    const double pipeline = rows[rows.size() - 2].seconds + median(sparse);
    rows.push_back({"DSA pipeline (select + sparse attention)", threads, pipeline, 0, 0});
    if (o.dense) {
      for (int r = 0; r < o.repeats; ++r) {
        Stopwatch watch;
        dense_attention(attention, scale, discard, nullptr);
        dense.push_back(watch.seconds());
      }
      rows.push_back({"dense attention", threads, median(dense), per_key * pairs,
                      ceiling_attention});
      fmt::print(stderr, "  dense attention {:.3f} s\n", median(dense));
    }
  }

  fmt::print("\nL = {}, H = {}, d_qk/d_v = {}/{}, H_I x d_I = {} x {}, k = {}; median of {}\n", L,
             o.heads, o.d_qk, o.d_v, o.index_heads, o.index_dim, k, o.repeats);
  fmt::print("{:<44} {:>3} {:>10} {:>9} {:>8}\n", "kernel", "thr", "seconds", "GFLOP/s", "of GEMM");
  nlohmann::json out = nlohmann::json::array();
  for (const Row& r : rows) {
    const double rate = r.seconds > 0 && r.gflop > 0 ? r.gflop / r.seconds : r.ceiling;
    const std::string ratio =
        r.gflop > 0 ? fmt::format("{:.0f}%", 100.0 * rate / r.ceiling) : std::string();
    fmt::print("{:<44} {:>3} {:>10} {:>9} {:>8}\n", r.kernel, r.threads,
               r.seconds > 0 ? fmt::format("{:.3f}", r.seconds) : "", rate > 0 ? fmt::format("{:.1f}", rate) : "", ratio);
    out.push_back({{"kernel", r.kernel},
                   {"threads", r.threads},
                   {"seconds", r.seconds},
                   {"gflops", rate},
                   {"ceiling_gflops", r.ceiling}});
  }
  // The ratios the targets name, per thread count.
  for (const int threads : o.threads) {
    auto find = [&](const std::string& name) {
      for (const Row& r : rows)
        if (r.threads == threads && r.kernel == name) return r.seconds;
      return 0.0;
    };
    const double index = find("indexer fp8 (hadamard, ue8m0)");
    const double topk = find("top-k after indexer fp8 (hadamard, ue8m0)");
    const double pipeline = find("DSA pipeline (select + sparse attention)");
    const double dense = find("dense attention");
    fmt::print("threads {}: top-k / indexer {:.1f}%", threads, 100.0 * topk / index);
    if (dense > 0) {
      fmt::print(", dense / pipeline {:.2f}x (FLOP ratio {:.2f}x)", dense / pipeline,
                 per_key * pairs / (per_key * selected + index_gflop));
    }
    fmt::print("\n");
  }
  if (!o.json.empty()) {
    std::ofstream(o.json) << nlohmann::json{{"L", L}, {"heads", o.heads}, {"topk", k},
                                            {"results", out}}.dump(2)
                          << "\n";
  }
  return 0;
}
