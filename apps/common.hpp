// What every subcommand shares: common flags, the error-to-exit-code mapping, the report.
// Nothing numeric lives here.
#pragma once

#include <cstdint>
#include <functional>
#include <limits>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "dsa/attention.hpp"
#include "dsa/compressed_attention.hpp"
#include "dsa/error.hpp"
#include "dsa/indexer.hpp"
#include "dsa/kv_cache.hpp"
#include "dsa/report.hpp"

namespace dsa::app {

struct CommonOptions {
  int threads = 0;
  std::string output = "-";
  std::string report;  // empty: the report (or on a terminal its summary) goes to stderr
  bool quiet = false;
  bool json = false;         // the JSON report even on a terminal, instead of the summary line
  bool shares_rows = false;  // the tool runs as MPI ranks (ranks.hpp); the others refuse to
};

void add_common_options(CLI::App& app, CommonOptions& options);

// An integer option's check: "--topk: must be an integer >= 1, got 0" (CLI11's PositiveNumber
// says "Value 0 not in range 0.000000 to 1.797693e+308").
CLI::Validator integer_at_least(int64_t min);
// The same with an upper bound: "--topk: must be an integer <= 2147483647, got 3000000000".
CLI::Validator integer_in(int64_t min, int64_t max);
// The largest k of a top-k flag: the selected indices are int32.
inline constexpr int64_t kLargestTopk = std::numeric_limits<int32_t>::max();
// A real option's check on the open interval (low, high): "--holdout: must be a number in
// (0, 1), got 1", or with high infinite "--lr: must be a number > 0, got 0".
CLI::Validator number_between(double low, double high);
// --scale's check by the library's own rule (resolve_softmax_scale), before any tensor is read:
// "--scale: softmax scale: expected a number, default or deepseek-v3.2, got 'x'".
CLI::Validator softmax_scale_text();

// The library's messages name parameters and tensors, the apps' name flags: library calls given
// a flag's value run through dsa::naming("--flag", ...) or dsa::naming_in_usage_errors
// (error.hpp). This one is for an option with a default value: when the user did not give the
// option, the message says the value was its default ("--dv: d_v must be in [1, d_qk = 64], got 512
// (the default of --dv: give --dv)").
template <typename Call>
decltype(auto) naming_option_in_usage_errors(const CLI::Option* option, Call&& call) {
  try {
    return std::forward<Call>(call)();
  } catch (const Error& e) {
    if (e.code() != ExitCode::usage) throw;
    const std::string flag = option->get_name();
    if (option->count() > 0) throw Error(e.code(), flag + ": " + e.what());
    throw Error(e.code(),
                fmt::format("{}: {} (the default of {}: give {})", flag, e.what(), flag, flag));
  }
}

// --precision, --hadamard, --ue8m0, --raw-weights, --query-block.
struct IndexerOptions {
  std::string precision = "f32";
  bool hadamard = false;
  bool ue8m0 = false;
  bool raw_weights = false;
  int64_t query_block = 16;
};
// Returns the options, so a mode that has no indexer can exclude them.
std::vector<CLI::Option*> add_indexer_options(CLI::App& app, IndexerOptions& options);
// The configuration the options give (validate_indexer_config's errors name the flag).
IndexerConfig indexer_config(const IndexerOptions& options);

// The indexer's inputs: --q-index, --k-index and --weights, or --hidden with
// --indexer-weights (and --indexer-prefix), from which the library projects them.
struct IndexerTensorOptions {
  std::string q_index, k_index, weights, hidden, indexer_weights, prefix;
  bool given() const { return !q_index.empty() || !hidden.empty(); }
};
// Returns every option it adds; `mode` ends each help text (e.g. " (fused mode)").
std::vector<CLI::Option*> add_indexer_tensor_options(CLI::App& app, IndexerTensorOptions& options,
                                                     const std::string& mode = "");
// The tensors as read (for the report) and q_index, k_index, weights (projected from the
// hidden states when those were given). Usage error unless exactly one way was given.
struct IndexerTensors {
  std::vector<Tensor> read;
  Tensor q_index, k_index, weights;
};
IndexerTensors load_indexer_tensors(const IndexerTensorOptions& options);

// --q, --kv/--dv or --k/--v, --scale: the attention inputs of dsa-attend and dsa-compare.
struct AttentionOptions {
  std::string q, kv, k, v;
  int64_t d_v = 512;
  std::string scale;  // resolve_softmax_scale's text: a number, default or deepseek-v3.2
  std::string kv_cache = "bf16";            // --kv-cache, where the tool has it
  const CLI::Option* d_v_option = nullptr;  // set by add_attention_options
};
void add_attention_options(CLI::App& app, AttentionOptions& options);
// --kv-cache bf16|fp8 (dsa-attend, dsa-compare): the sparse attention reads FlashMLA's fp8 cache
// of --kv, made by the library (kv_cache.hpp).
void add_kv_cache_option(CLI::App& app, AttentionOptions& options);
// The tensors read once, and the validated inputs that point into them.
struct AttentionTensors {
  std::vector<Tensor> tensors;  // q, then kv or k and v
  AttentionInputs inputs;
  SoftmaxScale scale;
  // With --kv-cache fp8 over a floating --kv: its fp8 cache and the same queries over it (a u8
  // --kv is the cache already: `inputs` read it and this stays null).
  std::unique_ptr<Fp8CacheAttention> fp8;
};
void load_attention(const AttentionOptions& options, AttentionTensors& out);

// --compress-ratio M and --tokens T: the indexer's keys are DeepSeek-V4's compressed entries
// (dsa-compress --indexer), T the tokens they come from (default Lq: a whole prefill).
struct CompressedKeyOptions {
  int64_t ratio = 1, tokens = 0;
};
void add_compressed_key_options(CLI::App& app, CompressedKeyOptions& options);
// make_indexer_inputs, or make_compressed_indexer_inputs with --compress-ratio.
IndexerInputs indexer_inputs(const CompressedKeyOptions& options, const Tensor& q_index,
                             const Tensor& k_index, const Tensor& weights,
                             const IndexerConfig& config);

// --attention swa|csa|hca with --compressed, --sink and --window: DeepSeek-V4's attention over
// a window of raw tokens (--kv) and compressed entries (compressed_attention.hpp).
struct V4AttentionOptions {
  std::string attention, compressed, sink;
  int64_t window = 128;
};
// The options; the first is --attention, which the others need.
std::vector<CLI::Option*> add_v4_attention_options(CLI::App& app, V4AttentionOptions& options);
struct V4AttentionTensors {
  std::vector<Tensor> tensors;  // q, kv, then compressed and sink where given
  CompressedAttentionInputs inputs;
  SoftmaxScale scale;
  std::unique_ptr<V4Fp8CacheAttention> fp8;  // with --kv-cache fp8: the caches and the inputs
  // The inputs the attention reads: over the fp8 caches with --kv-cache fp8.
  const CompressedAttentionInputs& attended() const { return fp8 ? fp8->inputs : inputs; }
};
// Reads --q, --kv, --compressed and --sink (AttentionOptions' --k, --v and --dv do not apply);
// --kv and --compressed may be V4 fp8 caches (u8, 584 bytes a row), and with --kv-cache fp8
// floating ones are quantized into them.
void load_v4_attention(const AttentionOptions& attention, const V4AttentionOptions& options,
                       V4AttentionTensors& out);

// --device cpu|cuda|auto (default cpu).
void add_device_option(CLI::App& app, std::string& device);

// "unknown option --top-k; did you mean --topk?" for the first argument that looks like a long
// option the app does not have (before a `--`), or empty.
std::string unknown_option_message(const CLI::App& app, int argc, const char* const* argv);

// Parses argv, applies --threads, runs body, maps every failure to its documented exit code
// with a one-line message on stderr. Returns the process exit code.
int run(CLI::App& app, int argc, char** argv, const CommonOptions& options,
        const std::function<void()>& body);

// Usage error unless at most one of the given paths is `-` (stdin can be read once), and none
// in an MPI job (mpirun gives stdin to rank 0 alone).
void check_single_stdin(const std::vector<std::string>& paths);
// Usage error unless at most one of the given outputs is `-` (stdout carries one stream).
void check_single_stdout(const std::vector<std::string>& paths);
// Usage error unless -o names a .safetensors file; `holds` says what it is for.
void check_safetensors_output(const std::string& path, const std::string& holds);
// Usage error when a binary tensor would go to a terminal (which mpirun makes a rank's stdout).
void check_binary_output(const std::string& path);

// "TOOL: warning: MESSAGE" on stderr, unless quiet.
void warn(const std::string& tool, const std::string& message, bool quiet = false);
// The warning for each k >= the keys: every query selects every key it sees, so the selection
// is dense attention and no row measures what sparsity loses.
void warn_if_dense_topk(const std::string& tool, const std::vector<int64_t>& topk, int64_t keys,
                        bool quiet = false);

// Adds timings and peak memory, then writes the report: the JSON to --report FILE when given;
// on stderr, when it is a terminal, one summary line ("TOOL: DETAIL: wrote OUTPUTS in TIME")
// unless --json, else the JSON (what scripts and CI logs read). -q: nothing on stderr.
void finish_report(nlohmann::json report, const StageTimes& times, double total_seconds,
                   const CommonOptions& options, const std::string& detail = "");
// The outputs of a report as a summary names them: "sel.npy i32 [512, 64]", or
// "w.safetensors (12 tensors)" for several tensors of one file.
std::string outputs_text(const nlohmann::json& outputs);
// Whether a stream is a terminal (isatty) and so gets a summary rather than JSON.
bool stdout_is_terminal();
bool stderr_is_terminal();

}  // namespace dsa::app
