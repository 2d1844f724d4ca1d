#include "common.hpp"

#include <unistd.h>

#include <charconv>
#include <cmath>
#include <cstdio>
#include <exception>
#include <limits>

#include <fmt/format.h>

#include "dsa/error.hpp"
#include "dsa/indexer_weights.hpp"
#include "dsa/io.hpp"
#include "dsa/parallel.hpp"
#include "dsa/precision.hpp"

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
  app.set_version_flag("--version", version());
  app.add_option("-o,--output", options.output,
                 "Output file (.npy, .safetensors[:NAME]; - for stdout)")
      ->capture_default_str();
  app.add_option("--threads", options.threads,
                 "CPU threads (default: OMP_NUM_THREADS or all cores)")
      ->check(integer_at_least(0));
  app.add_option("--report", options.report, "Write the JSON run report to FILE instead of stderr");
  app.add_flag("-q,--quiet", options.quiet, "Print no report on stderr");
}

std::vector<CLI::Option*> add_indexer_options(CLI::App& app, IndexerOptions& options) {
  return {
      app.add_option("--precision", options.precision, "Indexer arithmetic: f32, bf16 or fp8")
          ->check(CLI::IsMember({"f32", "bf16", "fp8"}))
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
  if (options.ue8m0 && config.precision != Precision::fp8) {
    bad_usage("--ue8m0 applies to --precision fp8 only");
  }
  config.hadamard = options.hadamard;
  config.ue8m0 = options.ue8m0;
  config.raw_weights = options.raw_weights;
  config.query_block = options.query_block;
  return config;
}

nlohmann::json indexer_config_json(const IndexerConfig& config) {
  return {{"precision", precision_name(config.precision)},
          {"hadamard", config.hadamard},
          {"ue8m0", config.ue8m0},
          {"quant_block", config.quant_block},
          {"raw_weights", config.raw_weights},
          {"query_block", config.query_block}};
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
    out.inputs = naming_flag_in_usage_errors(
        "--dv", [&] { return make_mqa_inputs(out.tensors[0], out.tensors[1], options.d_v); });
  } else {
    out.tensors.push_back(read_tensor(options.k));
    out.tensors.push_back(read_tensor(options.v));
    out.inputs = make_mha_inputs(out.tensors[0], out.tensors[1], out.tensors[2]);
  }
  out.scale = resolve_softmax_scale(options.scale, out.inputs.d_qk);
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
  return naming_flag_in_usage_errors("--hadamard", [&] {
    if (options.ratio == 1 && options.tokens == 0) {
      return make_indexer_inputs(q_index, k_index, weights, config);
    }
    const int64_t queries = q_index.rank() >= 3 ? q_index.dim(q_index.rank() - 3) : 0;
    const int64_t tokens = options.tokens > 0 ? options.tokens : queries;
    return make_compressed_indexer_inputs(q_index, k_index, weights, config, options.ratio, tokens);
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
}

void add_device_option(CLI::App& app, std::string& device) {
  app.add_option("--device", device,
                 "Where to compute: cpu, cuda or auto (the GPU when there is one)")
      ->check(CLI::IsMember({"cpu", "cuda", "auto"}))
      ->capture_default_str();
}

void report_device(nlohmann::json& report, const DeviceChoice& choice) {
  report["device"] = device_description(choice.device);
  if (!choice.note.empty()) report["device_note"] = choice.note;
}

int run(CLI::App& app, int argc, char** argv, const CommonOptions& options,
        const std::function<void()>& body) {
  const std::string tool = app.get_name();
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    if (e.get_exit_code() == 0) return app.exit(e);  // --help, --version
    std::fprintf(stderr, "%s: error: %s (see %s --help)\n", tool.c_str(), e.what(), tool.c_str());
    return static_cast<int>(ExitCode::usage);
  }
  install_signal_cleanup();
  try {
    set_threads(options.threads);
    body();
    return 0;
  } catch (const Error& e) {
    std::fprintf(stderr, "%s: error: %s\n", tool.c_str(), e.what());
    return static_cast<int>(e.code());
  } catch (const std::bad_alloc&) {
    std::fprintf(stderr, "%s: error: out of memory\n", tool.c_str());
    return static_cast<int>(ExitCode::runtime);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s: error: %s\n", tool.c_str(), e.what());
    return static_cast<int>(ExitCode::runtime);
  }
}

void check_single_stdin(const std::vector<std::string>& paths) {
  int n = 0;
  for (const auto& p : paths) n += p == "-";
  if (n > 1) bad_usage("only one input can be read from stdin ('-')");
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
    bad_usage("refusing to write a binary tensor to a terminal: use -o FILE or a pipe");
  }
}

void add_timings(nlohmann::json& report, const StageTimes& times, double total_seconds) {
  nlohmann::json timings = times.to_json();
  timings["total"] = total_seconds * 1e3;
  report["timings_ms"] = timings;
  report["peak_rss_bytes"] = peak_rss_bytes();
}

void finish_report(nlohmann::json report, const StageTimes& times, double total_seconds,
                   const CommonOptions& options) {
  add_timings(report, times, total_seconds);
  if (options.quiet && options.report.empty()) return;
  emit_report(report, options.report);
}

}  // namespace dsa::app
