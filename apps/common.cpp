#include "common.hpp"

#include <unistd.h>

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <exception>
#include <limits>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "dsa/error.hpp"
#include "dsa/indexer_weights.hpp"
#include "dsa/io.hpp"
#include "dsa/kv_cache.hpp"
#include "dsa/parallel.hpp"
#include "dsa/precision.hpp"
#include "progress.hpp"
#include "ranks.hpp"

namespace dsa::app {

CLI::Validator integer_at_least(int64_t min) {
  return integer_in(min, std::numeric_limits<int64_t>::max());
}

CLI::Validator integer_in(int64_t min, int64_t max) {
  const bool bounded = max < std::numeric_limits<int64_t>::max();
  return CLI::Validator(
      [min, max](std::string& text) {
        int64_t value = 0;
        const char* end = text.data() + text.size();
        const auto [stop, error] = std::from_chars(text.data(), end, value);
        const bool integer = error == std::errc() && stop == end;
        if (integer && value >= min && value <= max) return std::string();
        const bool beyond_int64 =
            error == std::errc::result_out_of_range && stop == end && text[0] != '-';
        if ((integer && value > max) || beyond_int64) {
          return fmt::format("must be an integer <= {}, got {}", max, text);
        }
        return fmt::format("must be an integer >= {}, got {}", min, text);
      },
      bounded ? fmt::format("INT in [{}, {}]", min, max) : fmt::format("INT>={}", min));
}

CLI::Validator number_between(double low, double high) {
  const bool bounded = std::isfinite(high);
  const std::string expected =
      bounded ? fmt::format("in ({}, {})", low, high) : fmt::format("> {}", low);
  return CLI::Validator(
      [low, high, expected](std::string& text) {
        double value = 0;
        const char* end = text.data() + text.size();
        const auto [stop, error] = std::from_chars(text.data(), end, value);
        if (error == std::errc() && stop == end && value > low && value < high)
          return std::string();
        return fmt::format("must be a number {}, got {}", expected, text);
      },
      "NUMBER " + expected);
}

CLI::Validator softmax_scale_text() {
  return CLI::Validator(
      [](std::string& text) {
        try {
          resolve_softmax_scale(text, 1);  // d_qk only sets the default's value
          return std::string();
        } catch (const Error& e) {
          return std::string(e.what());
        }
      },
      "SCALE");
}

void add_common_options(CLI::App& app, CommonOptions& options) {
  app.set_version_flag("--version", app.get_name() + " " + version());
  app.add_option("-o,--output", options.output,
                 "Output file (.npy, .safetensors[:NAME]; - for stdout)")
      ->capture_default_str();
  app.add_option("--threads", options.threads,
                 "CPU threads (default: OMP_NUM_THREADS or all cores)")
      ->check(integer_at_least(0));
  app.add_option("--report", options.report, "Write the JSON run report to FILE instead of stderr");
  app.add_flag("-q,--quiet", options.quiet, "Print nothing on stderr but errors and warnings");
  app.add_flag("--json", options.json,
               "On a terminal too, print the JSON report on stderr instead of the summary line");
}

std::vector<CLI::Option*> add_indexer_options(CLI::App& app, IndexerOptions& options) {
  return {
      app.add_option("--precision", options.precision,
                     "Indexer arithmetic: f32, bf16, fp8 or fp4 (DeepSeek-V4's e2m1 blocks of 32)")
          ->check(CLI::IsMember({"f32", "bf16", "fp8", "fp4"}))
          ->capture_default_str(),
      app.add_flag("--hadamard", options.hadamard, "Rotate q_I and k_I by a Hadamard matrix first"),
      app.add_flag("--ue8m0", options.ue8m0, "fp8: round block scales up to powers of two"),
      app.add_flag("--raw-weights", options.raw_weights,
                   "The weights are raw weights_proj outputs: apply the released code's "
                   "bf16(w * H_I^-0.5) * d_I^-0.5"),
      app.add_option("--query-block", options.query_block,
                     "Query rows scored together (the last bits of the scores depend on it)")
          ->check(integer_at_least(1))
          ->capture_default_str()};
}

IndexerConfig indexer_config(const IndexerOptions& options) {
  IndexerConfig config;
  config.precision = parse_precision(options.precision);
  config.hadamard = options.hadamard;
  config.ue8m0 = options.ue8m0;
  config.raw_weights = options.raw_weights;
  config.query_block = options.query_block;
  naming("--ue8m0", [&] { validate_indexer_config(config); });
  return config;
}

std::vector<CLI::Option*> add_indexer_tensor_options(CLI::App& app, IndexerTensorOptions& options,
                                                     const std::string& mode) {
  auto* q =
      app.add_option("--q-index", options.q_index, "Indexer queries q_I [B?, Lq, H_I, d_I]" + mode);
  auto* k = app.add_option("--k-index", options.k_index, "Indexer keys k_I [B?, Lk, d_I]" + mode);
  auto* w = app.add_option("--weights", options.weights, "Per-head weights w [B?, Lq, H_I]" + mode);
  auto* hidden = app.add_option("--hidden", options.hidden,
                                "Hidden states h [B?, L, d_model]: q_I, k_I and w projected by "
                                "--indexer-weights" +
                                    mode);
  auto* weights = app.add_option("--indexer-weights", options.indexer_weights,
                                 "Indexer projections (.safetensors: wq_b.weight, wk.weight, "
                                 "k_norm.weight, k_norm.bias, weights_proj.weight, as dsa-fit "
                                 "writes)" +
                                     mode);
  auto* prefix = app.add_option("--indexer-prefix", options.prefix,
                                "Prefix of those tensor names, e.g. "
                                "model.layers.3.self_attn.indexer.");
  q->needs(k)->needs(w);
  k->needs(q);
  w->needs(q);
  hidden->needs(weights)->excludes(q)->excludes(k)->excludes(w);
  weights->needs(hidden);
  prefix->needs(weights);
  return {q, k, w, hidden, weights, prefix};
}

IndexerTensors load_indexer_tensors(const IndexerTensorOptions& options) {
  IndexerTensors out;
  if (!options.hidden.empty()) {
    out.read.push_back(read_tensor(options.hidden));
    const IndexerProjection p =
        project_indexer(out.read[0], read_indexer_weights(options.indexer_weights, options.prefix));
    out.q_index = p.q_index;
    out.k_index = p.k_index;
    out.weights = p.weights;
  } else {
    if (options.q_index.empty()) {
      bad_usage("give --q-index, --k-index and --weights, or --hidden and --indexer-weights");
    }
    out.read = {read_tensor(options.q_index), read_tensor(options.k_index),
                read_tensor(options.weights)};
    out.q_index = out.read[0];
    out.k_index = out.read[1];
    out.weights = out.read[2];
  }
  return out;
}

void add_attention_options(CLI::App& app, AttentionOptions& options) {
  app.add_option("--q", options.q, "Queries q [B?, Lq, H, d_qk]")->required();
  auto* kv = app.add_option(
      "--kv", options.kv, "MQA latent cache kv [B?, Lk, d_qk]; values are its first --dv columns");
  auto* k = app.add_option("--k", options.k, "MHA/GQA keys k [B?, Lk, H_kv, d_qk]");
  auto* v = app.add_option("--v", options.v, "MHA/GQA values v [B?, Lk, H_kv, d_v]");
  auto* dv = app.add_option("--dv", options.d_v, "Value width in MQA mode")
                 ->check(integer_at_least(1))
                 ->capture_default_str();
  kv->excludes(k)->excludes(v);
  k->needs(v);
  v->needs(k);
  dv->needs(kv);
  options.d_v_option = dv;
  app.add_option("--scale", options.scale,
                 "Softmax scale: a finite positive number, default (d_qk^-0.5) or deepseek-v3.2 "
                 "(the released model's 192^-0.5 * mscale^2 = 0.1352337788608801)")
      ->check(softmax_scale_text());
}

void load_attention(const AttentionOptions& options, AttentionTensors& out) {
  out.tensors.reserve(3);
  if (options.kv.empty() && options.k.empty()) bad_usage("give either --kv or --k and --v");
  out.tensors.clear();
  out.tensors.push_back(read_tensor(options.q));
  if (!options.kv.empty()) {
    out.tensors.push_back(read_tensor(options.kv));
    out.inputs = naming_option_in_usage_errors(options.d_v_option, [&] {
      return make_mqa_inputs(out.tensors[0], out.tensors[1], options.d_v);
    });
  } else {
    out.tensors.push_back(read_tensor(options.k));
    out.tensors.push_back(read_tensor(options.v));
    out.inputs = make_mha_inputs(out.tensors[0], out.tensors[1], out.tensors[2]);
  }
  out.scale = resolve_softmax_scale(options.scale, out.inputs.d_qk);
  out.fp8 = naming("--kv-cache", [&] {
    return fp8_cache_attention(out.inputs, parse_kv_cache(options.kv_cache));
  });
}

void add_kv_cache_option(CLI::App& app, AttentionOptions& options) {
  app.add_option("--kv-cache", options.kv_cache,
                 "The cache the attention reads: bf16 (--kv itself) or fp8 (FlashMLA's: for V3.2 "
                 "656-byte rows, 512 e4m3 values with a power-of-two f32 scale per 128 and the "
                 "64 rope values in bf16; with --attention 584-byte rows of --kv and "
                 "--compressed, 448 e4m3 values with a ue8m0 scale per 64 and the 64 rope "
                 "values in bf16; dsa(7))")
      ->check(CLI::IsMember({"bf16", "fp8"}))
      ->capture_default_str();
}

void add_compressed_key_options(CLI::App& app, CompressedKeyOptions& options) {
  auto* ratio = app.add_option("--compress-ratio", options.ratio,
                               "The keys are compressed entries of M tokens each (DeepSeek-V4's "
                               "CSA: 4); entry j is visible from token M j + M - 1 on")
                    ->check(integer_at_least(1))
                    ->capture_default_str();
  app.add_option("--tokens", options.tokens,
                 "With --compress-ratio: the tokens T the entries come from, the queries being "
                 "the last Lq (default Lq)")
      ->check(integer_at_least(1))
      ->needs(ratio);
}

IndexerInputs indexer_inputs(const CompressedKeyOptions& options, const Tensor& q_index,
                             const Tensor& k_index, const Tensor& weights,
                             const IndexerConfig& config) {
  // --tokens is at least 1 when given (its check): 0 is its absence.
  const std::optional<int64_t> tokens =
      options.tokens > 0 ? std::optional<int64_t>(options.tokens) : std::nullopt;
  return naming_in_usage_errors("--hadamard", [&] {
    return make_indexer_inputs(q_index, k_index, weights, config, options.ratio, tokens);
  });
}

std::vector<CLI::Option*> add_v4_attention_options(CLI::App& app, V4AttentionOptions& options) {
  auto* kind =
      app.add_option("--attention", options.attention,
                     "DeepSeek-V4's attention: csa (window + selected compressed entries), "
                     "hca (window + every visible entry) or swa (the window alone), with "
                     "its sink; --kv holds the raw tokens")
          ->check(CLI::IsMember({"swa", "csa", "hca"}));
  auto* compressed = app.add_option("--compressed", options.compressed,
                                    "Compressed entries [B?, floor(T / ratio), d] (dsa-compress)");
  auto* sink = app.add_option("--sink", options.sink,
                              "Per-head sink logits [H] (f32; a checkpoint's "
                              "layers.N.attn.attn_sink); none: no sink");
  auto* window = app.add_option("--window", options.window, "Raw tokens t - W + 1 .. t attended")
                     ->check(integer_at_least(1))
                     ->capture_default_str();
  for (auto* option : {compressed, sink, window}) option->needs(kind);
  return {kind, compressed, sink, window};
}

void load_v4_attention(const AttentionOptions& attention, const V4AttentionOptions& options,
                       V4AttentionTensors& out) {
  if (attention.kv.empty() || !attention.k.empty()) {
    bad_usage("--attention reads the raw tokens from --kv (K = V), not --k and --v");
  }
  const V4Attention kind = parse_v4_attention(options.attention);
  if (kind != V4Attention::swa && options.compressed.empty()) {
    bad_usage("--attention {} needs --compressed", options.attention);
  }
  if (kind == V4Attention::swa && !options.compressed.empty()) {
    bad_usage("--attention swa attends over the window alone: drop --compressed");
  }
  out.tensors.clear();
  out.tensors.reserve(4);  // the inputs point into it
  out.tensors.push_back(read_tensor(attention.q));
  out.tensors.push_back(read_tensor(attention.kv));
  const Tensor* compressed = nullptr;
  const Tensor* sink = nullptr;
  if (!options.compressed.empty()) {
    out.tensors.push_back(read_tensor(options.compressed));
    compressed = &out.tensors.back();
  }
  if (!options.sink.empty()) {
    out.tensors.push_back(read_tensor(options.sink));
    sink = &out.tensors.back();
  }
  out.inputs = make_compressed_attention_inputs(out.tensors[0], out.tensors[1], compressed, sink,
                                                kind, options.window);
  out.scale = resolve_softmax_scale(attention.scale, out.inputs.dim);
  out.fp8 = fp8_v4_cache_attention(out.inputs, parse_kv_cache(attention.kv_cache));
}

void add_device_option(CLI::App& app, std::string& device) {
  app.add_option("--device", device,
                 "Where to compute: cpu, cuda or auto (the GPU when there is one)")
      ->check(CLI::IsMember({"cpu", "cuda", "auto"}))
      ->capture_default_str();
}

namespace {

// Levenshtein distance, for suggesting the nearest option name.
std::size_t edit_distance(const std::string& a, const std::string& b) {
  std::vector<std::size_t> row(b.size() + 1);
  for (std::size_t j = 0; j <= b.size(); ++j) row[j] = j;
  for (std::size_t i = 1; i <= a.size(); ++i) {
    std::size_t diagonal = row[0];
    row[0] = i;
    for (std::size_t j = 1; j <= b.size(); ++j) {
      const std::size_t up = row[j];
      row[j] = std::min({row[j] + 1, row[j - 1] + 1, diagonal + (a[i - 1] != b[j - 1])});
      diagonal = up;
    }
  }
  return row[b.size()];
}

}  // namespace

std::string unknown_option_message(const CLI::App& app, int argc, const char* const* argv) {
  std::vector<std::string> names;
  for (const CLI::Option* option : app.get_options()) {
    for (const std::string& name : option->get_lnames()) names.push_back("--" + name);
  }
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--") break;
    if (arg.size() < 3 || arg.compare(0, 2, "--") != 0) continue;
    const std::string name = arg.substr(0, arg.find('='));
    if (std::find(names.begin(), names.end(), name) != names.end()) continue;
    // The nearest name, '_' read as '-' (--q_index), if it is near enough to be meant.
    std::string normalized = name;
    std::replace(normalized.begin(), normalized.end(), '_', '-');
    std::string best;
    std::size_t best_distance = std::string::npos;
    for (const std::string& candidate : names) {
      const std::size_t d = edit_distance(normalized, candidate);
      if (d < best_distance) best_distance = d, best = candidate;
    }
    const std::size_t near = std::max<std::size_t>(2, (name.size() - 2) / 3);
    if (!best.empty() && best_distance <= near) {
      return fmt::format("unknown option {}; did you mean {}?", name, best);
    }
    return fmt::format("unknown option {}", name);
  }
  return {};
}

int run(CLI::App& app, int argc, char** argv, const CommonOptions& options,
        const std::function<void()>& body) {
  const std::string tool = app.get_name();
  try {
    // An unknown option first, before CLI11's errors about the options it was meant to be
    // (`--q_index` would otherwise read "--k-index requires --q-index").
    const std::string unknown = unknown_option_message(app, argc, argv);
    if (!unknown.empty()) {
      std::fprintf(stderr, "%s: error: %s (see %s --help)\n", tool.c_str(), unknown.c_str(),
                   tool.c_str());
      return static_cast<int>(ExitCode::usage);
    }
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    if (e.get_exit_code() == 0) return app.exit(e);  // --help, --version
    std::fprintf(stderr, "%s: error: %s (see %s --help)\n", tool.c_str(), e.what(), tool.c_str());
    return static_cast<int>(ExitCode::usage);
  }
  install_signal_cleanup();
  try {
    // One rank of an MPI job, or the one rank (ranks.hpp); only rank 0 writes anything.
    const Ranks& job = start_ranks(&argc, &argv);
    if (job.size > 1 && !options.shares_rows) {
      bad_usage(
          "{} runs as one process, not as {} MPI ranks (dsa-score, dsa-select, dsa-attend and "
          "dsa-compare share their rows)",
          tool, job.size);
    }
    set_threads(options.threads);
    // Every output is checked before any work, so a bad path fails in a second, not after
    // the computation (each tool checks its further outputs the same way).
    if (job.rank == 0) {
      if (!options.output.empty()) naming("-o", [&] { check_output(options.output); });
      if (!options.report.empty()) naming("--report", [&] { check_output(options.report); });
    }
    // The progress line on a terminal; gone (and its line cleared) before any message below.
    const std::unique_ptr<TerminalProgress> progress =
        terminal_progress(tool, options.quiet || job.rank != 0);
    body();
    finish_ranks();
    return 0;
  } catch (const PeerFailed& peer) {
    finish_ranks();
    return peer.code;
  } catch (const Error& e) {
    return fail_rank(tool, e.what(), static_cast<int>(e.code()));
  } catch (const std::bad_alloc&) {
    return fail_rank(tool, "out of memory", static_cast<int>(ExitCode::runtime));
  } catch (const std::exception& e) {
    return fail_rank(tool, e.what(), static_cast<int>(ExitCode::runtime));
  }
}

void check_single_stdin(const std::vector<std::string>& paths) {
  int n = 0;
  for (const auto& p : paths) n += p == "-";
  if (n > 1) bad_usage("only one input can be read from stdin ('-')");
  // Every rank reads the inputs, but mpirun gives stdin to rank 0 alone.
  if (n > 0 && ranks().size > 1) {
    bad_usage(
        "stdin ('-') reaches rank 0 alone under mpirun: give the {} ranks every input as a file",
        ranks().size);
  }
}

void check_single_stdout(const std::vector<std::string>& paths) {
  int n = 0;
  for (const auto& p : paths) n += p == "-";
  if (n > 1) bad_usage("only one output can go to stdout ('-')");
}

void check_safetensors_output(const std::string& path, const std::string& holds) {
  if (path == "-" || format_of(path) != FileFormat::safetensors) {
    bad_usage("-o must name a .safetensors file ({}), got '{}'", holds, path);
  }
}

void check_binary_output(const std::string& path) {
  if (path == "-" && isatty(STDOUT_FILENO)) {
    // Open MPI's mpirun gives its ranks a terminal for stdout, whatever its own stdout is.
    if (ranks().size > 1) {
      bad_usage("under mpirun stdout ('-') is a terminal, even in a pipe: use -o FILE");
    }
    bad_usage("refusing to write a binary tensor to a terminal: use -o FILE or a pipe");
  }
}

void warn(const std::string& tool, const std::string& message, bool quiet) {
  // One rank of a job says it for all: every rank sees the same inputs.
  if (!quiet && ranks().rank == 0)
    std::fprintf(stderr, "%s: warning: %s\n", tool.c_str(), message.c_str());
}

void warn_if_dense_topk(const std::string& tool, const std::vector<int64_t>& topk, int64_t keys,
                        bool quiet) {
  std::vector<int64_t> dense;
  for (int64_t k : topk) {
    if (k >= keys) dense.push_back(k);
  }
  if (dense.empty()) return;
  warn(tool,
       fmt::format("k = {} >= the {} keys: every query selects every key it sees, which is "
                   "dense attention (no row is sparse)",
                   fmt::join(dense, ", "), keys),
       quiet);
}

bool stdout_is_terminal() {
  return isatty(STDOUT_FILENO) != 0;
}
bool stderr_is_terminal() {
  return isatty(STDERR_FILENO) != 0;
}

std::string outputs_text(const nlohmann::json& outputs) {
  const auto name = [](const nlohmann::json& o) {
    const std::string n = o.value("name", "");
    return n == "-" ? std::string("<stdout>") : n;
  };
  if (outputs.size() > 3) {
    const std::string file = parse_tensor_spec(name(outputs[0])).path;
    return fmt::format("{} ({} tensors)", file, outputs.size());
  }
  std::vector<std::string> parts;
  for (const nlohmann::json& o : outputs) {
    parts.push_back(fmt::format("{} {} {}", name(o), o.value("dtype", ""),
                                shape_string(o.value("shape", Shape{}))));
  }
  return fmt::format("{}", fmt::join(parts, ", "));
}

void finish_report(nlohmann::json report, const StageTimes& times, double total_seconds,
                   const CommonOptions& options, const std::string& detail) {
  add_timings(report, times, total_seconds);
  if (!options.report.empty()) emit_report(report, options.report);
  if (options.quiet) return;
  if (stderr_is_terminal() && !options.json) {
    const std::string tool = report.value("tool", "dsa");
    const std::string what = report.contains("outputs") ? outputs_text(report["outputs"]) : "";
    std::fprintf(stderr, "%s: %s%swrote %s in %s%s\n", tool.c_str(), detail.c_str(),
                 detail.empty() ? "" : ": ", what.c_str(), format_duration(total_seconds).c_str(),
                 options.report.empty() ? " (--json or --report FILE for the report)" : "");
    return;
  }
  if (options.report.empty()) emit_report(report, "");
}

}  // namespace dsa::app
