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

struct Timing {
  double wall = 0, cpu = 0;  // seconds: medians over the repeats
};

// Runs `run` `repeats` times; the medians of its wall and CPU seconds.
template <typename Run>
Timing measure(int repeats, Run&& run) {
  std::vector<double> wall, cpu;
  for (int r = 0; r < repeats; ++r) {
    const bench::Clock clock;
    run();
    wall.push_back(clock.wall());
    cpu.push_back(clock.cpu());
  }
  return {median(wall), median(cpu)};
}

struct Row {
  std::string kernel;
  int threads;
  Timing time;
  double gflop = 0;     // 0: not an arithmetic kernel
  bench::Rate ceiling;  // the matching GEMM, measured right after the kernel
};

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) throw std::runtime_error("missing value after " + a);
      return argv[++i];
    };
    if (a == "--L")
      o.L = std::stoll(next());
    else if (a == "--heads")
      o.heads = std::stoll(next());
    else if (a == "--topk")
      o.topk = std::stoll(next());
    else if (a == "--repeats")
      o.repeats = std::stoi(next());
    else if (a == "--no-dense")
      o.dense = false;
    else if (a == "--json")
      o.json = next();
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
  auto print = [](const Row& r) {
    fmt::print(stderr, "  {} ({} threads): {:.3f} s, {:.3f} CPU-s\n", r.kernel, r.threads,
               r.time.wall, r.time.cpu);
  };
  // A GEMM of the kernel's inner dimension right after each kernel: on a shared machine the
  // ratio then compares rates measured under the same load.
  auto add = [&](std::string kernel, int threads, Timing time, double gflop, int64_t depth) {
    const bench::Rate ceiling =
        gflop > 0 ? bench::gemm_rate(1024, 2048, depth, 1.0) : bench::Rate{};
    rows.push_back({std::move(kernel), threads, time, gflop, ceiling});
    print(rows.back());
  };
  for (const int threads : o.threads) {
    set_threads(threads);
    for (const bool fp8 : {false, true}) {
      IndexerConfig config;
      if (fp8) {
        config.precision = Precision::fp8;
        config.hadamard = true;
        config.ue8m0 = true;
      }
      // The fused run's stages split its wall time (and, in proportion, its CPU time).
      std::vector<double> score, select;
      const Timing total = measure(o.repeats, [&] {
        StageTimes times;
        select_from_indexer(index_inputs, config, k, keep, &times);
        score.push_back(times.get("score"));
        select.push_back(times.get("select"));
      });
      const double share = median(score) / (median(score) + median(select));
      const std::string name = fp8 ? "indexer fp8 (hadamard, ue8m0)" : "indexer f32";
      add(name, threads, {median(score), total.cpu * share}, index_gflop, o.index_dim);
      add("top-k after " + name, threads, {median(select), total.cpu * (1 - share)}, 0, 0);
      if (fp8) add("DSA select (fp8 indexer + top-k)", threads, total, 0, 0);
    }
    const Timing select = rows.back().time;
    const Timing sparse =
        measure(o.repeats, [&] { sparse_attention(attention, indices, scale, discard, nullptr); });
    add("sparse attention", threads, sparse, per_key * selected, o.d_qk);
    add("DSA pipeline (select + sparse attention)", threads,
        {select.wall + sparse.wall, select.cpu + sparse.cpu}, 0, 0);
    if (o.dense) {
      const Timing dense =
          measure(o.repeats, [&] { dense_attention(attention, scale, discard, nullptr); });
      add("dense attention", threads, dense, per_key * pairs, o.d_qk);
    }
  }

  fmt::print("\nL = {}, H = {}, d_qk/d_v = {}/{}, H_I x d_I = {} x {}, k = {}; median of {}\n", L,
             o.heads, o.d_qk, o.d_v, o.index_heads, o.index_dim, k, o.repeats);
  fmt::print(
      "GFLOP/s over wall time, and per CPU-second (one busy core); GEMM: an f32 product of\n"
      "the kernel's inner dimension (d_I or d_qk) measured right after it, same threads\n");
  fmt::print("{:<42} {:>3} {:>8} {:>8} {:>8} {:>8} {:>6} {:>8} {:>6}\n", "kernel", "thr", "seconds",
             "CPU-s", "GFLOP/s", "GEMM", "ratio", "per CPU", "ratio");
  nlohmann::json out = nlohmann::json::array();
  for (const Row& r : rows) {
    std::string rates;
    nlohmann::json entry = {{"kernel", r.kernel},
                            {"threads", r.threads},
                            {"seconds", r.time.wall},
                            {"cpu_seconds", r.time.cpu}};
    if (r.gflop > 0) {
      const double wall = r.gflop / r.time.wall, cpu = r.gflop / r.time.cpu;
      rates = fmt::format(" {:>8.1f} {:>8.1f} {:>5.0f}% {:>8.1f} {:>5.0f}%", wall, r.ceiling.wall,
                          100 * wall / r.ceiling.wall, cpu, 100 * cpu / r.ceiling.cpu);
      entry.update({{"gflops", wall},
                    {"gflops_per_cpu_second", cpu},
                    {"gemm_gflops", r.ceiling.wall},
                    {"gemm_gflops_per_cpu_second", r.ceiling.cpu}});
    }
    fmt::print("{:<42} {:>3} {:>8.3f} {:>8.3f}{}\n", r.kernel, r.threads, r.time.wall, r.time.cpu,
               rates);
    out.push_back(entry);
  }
  // The ratios the targets name, per thread count.
  for (const int threads : o.threads) {
    auto find = [&](const std::string& name) {
      for (const Row& r : rows)
        if (r.threads == threads && r.kernel == name) return r.time;
      return Timing{};
    };
    const Timing index = find("indexer fp8 (hadamard, ue8m0)");
    const Timing topk = find("top-k after indexer fp8 (hadamard, ue8m0)");
    const Timing pipeline = find("DSA pipeline (select + sparse attention)");
    const Timing dense = find("dense attention");
    fmt::print("threads {}: top-k / fp8 indexer {:.1f}%", threads, 100.0 * topk.wall / index.wall);
    if (dense.wall > 0) {
      fmt::print(", dense / pipeline {:.2f}x wall, {:.2f}x CPU (FLOP ratio {:.2f}x)",
                 dense.wall / pipeline.wall, dense.cpu / pipeline.cpu,
                 per_key * pairs / (per_key * selected + index_gflop));
    }
    fmt::print("\n");
  }
  if (!o.json.empty()) {
    std::ofstream(o.json)
        << nlohmann::json{{"L", L}, {"heads", o.heads}, {"topk", k}, {"results", out}}.dump(2)
        << "\n";
  }
  return 0;
}
