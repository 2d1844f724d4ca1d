// dsa-compare: what sparse attention loses against dense attention, as one JSON report.
#include <optional>

#include "common.hpp"
#include "dsa/attention.hpp"
#include "dsa/device.hpp"
#include "dsa/error.hpp"
#include "dsa/io.hpp"
#include "dsa/metrics.hpp"
#include "dsa/parallel.hpp"
#include "progress.hpp"
#include "ranks.hpp"

namespace {

// A number of the report as the table shows it: "-" for null (undefined, or no sparse rows).
std::string cell(const nlohmann::json& value, const char* format) {
  if (!value.is_number()) return "-";
  return fmt::format(fmt::runtime(format), value.get<double>());
}

// The terminal's summary of a report: one line on what was compared, then per k the sparse
// rows' means of mass recall, top-k recall, output error and cosine, and the needles found.
std::string summary_table(const nlohmann::json& report) {
  const nlohmann::json& shape = report["shape"];
  std::string text = fmt::format(
      "dsa-compare: {} queries x {} keys, {} heads, selection by {}, on {}, {} (means over "
      "the sparse rows)\n",
      shape["batch"].get<int64_t>() * shape["queries"].get<int64_t>(), shape["keys"].get<int64_t>(),
      shape["heads"].get<int64_t>(), report["selection"].get<std::string>(),
      report["device"].get<std::string>(),
      dsa::app::format_duration(report["timings_ms"]["total"].get<double>() / 1e3));
  const bool cache = report.value("kv_cache", "") == "fp8";
  text += fmt::format("{:>8} {:>11} {:>11} {:>12} {:>11} {:>10} {:>8}{}\n", "k", "sparse rows",
                      "mass recall", "top-k recall", "out rel err", "out cosine", "needles",
                      cache ? "  fp8 vs bf16 err" : "");
  for (const nlohmann::json& r : report["results"]) {
    const auto mean = [&](const char* metric) -> nlohmann::json {
      const nlohmann::json& m = r[metric];
      return m.is_object() ? m["sparse"]["mean"] : nlohmann::json(nullptr);
    };
    const nlohmann::json& needles = r["needle_recall"];
    const std::string found = needles["needles"].get<int64_t>() > 0
                                  ? fmt::format("{}/{}", needles["selected"].get<int64_t>(),
                                                needles["needles"].get<int64_t>())
                                  : "-";
    const std::string loss =
        cache ? fmt::format("  {:>16}", cell(r["kv_cache_loss"]["out_rel_err_global"], "{:.2e}"))
              : "";
    text +=
        fmt::format("{:>8} {:>11} {:>11} {:>12} {:>11} {:>10} {:>8}{}\n", r["topk"].get<int64_t>(),
                    r["rows"]["sparse"].get<int64_t>(), cell(mean("mass_recall"), "{:.4f}"),
                    cell(mean("topk_recall"), "{:.4f}"), cell(mean("out_rel_err"), "{:.2e}"),
                    cell(mean("out_cosine"), "{:.5f}"), found, loss);
  }
  return text;
}

// The report goes out with its timings: the JSON to -o (stdout by default); on a terminal the
// summary table instead of the JSON on stdout (unless --json), or beside a JSON file on stderr.
void finish(nlohmann::json& report, const dsa::StageTimes& times, const dsa::Stopwatch& total,
            const dsa::app::CommonOptions& common) {
  dsa::add_timings(report, times, total.seconds());
  const bool to_terminal = common.output == "-" && dsa::app::stdout_is_terminal();
  if (!to_terminal || common.json) dsa::emit_report(report, common.output);
  if (common.quiet) return;
  if (to_terminal && !common.json) {
    std::fputs(summary_table(report).c_str(), stdout);
    std::fputs("(the JSON report: -o FILE, a pipe, or --json)\n", stdout);
  } else if (common.output != "-" && dsa::app::stderr_is_terminal()) {
    std::fputs(summary_table(report).c_str(), stderr);
  }
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app(
      "Fidelity of DSA against dense attention (DESIGN.md section 2): output error and "
      "cosine, attention mass and oracle top-k recall, the indexer's KL losses (Eq. 3, "
      "4), needle recall; JSON report (schema dsa-compare/3).",
      "dsa-compare");
  dsa::app::CommonOptions common;
  common.shares_rows = true;
  dsa::app::IndexerOptions indexer;
  dsa::app::AttentionOptions attention;
  dsa::app::IndexerTensorOptions tensors;
  std::string indices_path, needles_path;
  int64_t topk = 2048;
  std::vector<int64_t> sweep;
  dsa::app::add_attention_options(app, attention);
  dsa::app::add_kv_cache_option(app, attention);
  auto* idx_opt = app.add_option("--indices", indices_path,
                                 "A precomputed selection [B?, Lq, K] instead of the indexer");
  for (auto* option : dsa::app::add_indexer_tensor_options(app, tensors)) option->excludes(idx_opt);
  bool future_as_padding = false;
  app.add_flag("--future-as-padding", future_as_padding,
               "With --indices: entries beyond their query's position count as -1 padding (the "
               "released code's top-k of rows with fewer than K visible tokens)")
      ->needs(idx_opt);
  auto* k_flag = app.add_option("-k,--topk", topk, "Entries selected per query")
                     ->check(dsa::app::integer_in(1, dsa::app::kLargestTopk))
                     ->capture_default_str()
                     ->excludes(idx_opt);
  auto* sweep_opt =
      app.add_option("--sweep-topk", sweep, "Several k in one pass: 256,512,1024,2048")
          ->delimiter(',')
          ->check(dsa::app::integer_in(1, dsa::app::kLargestTopk))
          ->excludes(k_flag)
          ->excludes(idx_opt);
  (void)sweep_opt;
  app.add_option("--needles", needles_path,
                 "Needles [N, 2] (query position, key position) to check");
  for (auto* option : dsa::app::add_indexer_options(app, indexer)) option->excludes(idx_opt);
  std::string device = "cpu";
  dsa::app::add_device_option(app, device);
  dsa::app::V4AttentionOptions v4;
  CLI::Option* v4_kind = dsa::app::add_v4_attention_options(app, v4).front();
  std::string reference = "every-entry";
  app.add_option("--reference", reference,
                 "With --attention: every-entry (CSA with every visible entry: what the selection "
                 "loses) or dense (causal attention over every raw token with the same sink: what "
                 "compression and selection lose together)")
      ->check(CLI::IsMember({"every-entry", "dense"}))
      ->needs(v4_kind)
      ->capture_default_str();
  app.set_version_flag("--version", app.get_name() + " " + dsa::version());
  app.add_option("-o,--output", common.output,
                 "The JSON report (default stdout; on a terminal the summary table instead)");
  app.add_flag("--json", common.json, "Print the JSON report on a terminal too, not the table");
  app.add_flag("-q,--quiet", common.quiet, "No summary table on the terminal");
  app.add_option("--threads", common.threads, "CPU threads (default: OMP_NUM_THREADS or all cores)")
      ->check(dsa::app::integer_at_least(0));

  return dsa::app::run(app, argc, argv, common, [&] {
    dsa::Stopwatch total;
    const dsa::app::Ranks& job = dsa::app::ranks();
    if (!v4.attention.empty()) {  // DeepSeek-V4: CSA's selection or HCA's compression
      if (job.size > 1) {
        dsa::bad_usage("--attention runs as one process, not as {} MPI ranks", job.size);
      }
      if (future_as_padding) dsa::bad_usage("--future-as-padding is for V3.2 selections");
      dsa::app::check_single_stdin(
          {attention.q, attention.kv, v4.compressed, v4.sink, tensors.q_index, tensors.k_index,
           tensors.weights, tensors.hidden, tensors.indexer_weights, indices_path, needles_path});
      nlohmann::json report = dsa::report_header("dsa-compare", argc, argv);
      report["schema"] = dsa::kCompareSchema;
      dsa::StageTimes times;
      dsa::Stopwatch load;
      dsa::app::V4AttentionTensors loaded;
      dsa::app::load_v4_attention(attention, v4, loaded);
      if (attention.kv_cache == "fp8" && !loaded.fp8) {
        dsa::bad_usage(
            "--kv-cache fp8 measures V4's fp8 caches against the values: give --kv and "
            "--compressed as floating values, not u8 caches");
      }
      if (k_flag->count() == 0 && sweep.empty()) topk = 512;  // DeepSeek-V4-Flash's index_topk
      dsa::CompressedCompareInputs inputs;
      inputs.attention = loaded.inputs;
      inputs.fp8_cache = loaded.fp8 ? &loaded.fp8->inputs : nullptr;
      inputs.scale = loaded.scale.value;
      inputs.reference = dsa::parse_v4_reference(reference);
      const dsa::CompressedAttentionInputs& a = inputs.attention;
      for (const auto& t : loaded.tensors) report["inputs"].push_back(dsa::tensor_json(t));
      std::optional<dsa::app::IndexerTensors> indexer_tensors;
      std::optional<dsa::TokenFile> tokens;
      if (a.kind == dsa::V4Attention::csa && tensors.given()) {
        indexer_tensors = dsa::app::load_indexer_tensors(tensors);
        const dsa::app::IndexerTensors& x = *indexer_tensors;
        inputs.indexer_config = dsa::app::indexer_config(indexer);
        inputs.indexer = dsa::naming_in_usage_errors("--hadamard", [&] {
          return dsa::make_compressed_indexer_inputs(x.q_index, x.k_index, x.weights,
                                                     inputs.indexer_config, a.ratio, a.tokens);
        });
        for (const auto& t : x.read) report["inputs"].push_back(dsa::tensor_json(t));
        inputs.topk = sweep.empty() ? std::vector<int64_t>{topk} : sweep;
      } else if (a.kind == dsa::V4Attention::csa && !indices_path.empty()) {
        tokens = dsa::read_token_file(indices_path);
        inputs.indices = &tokens->indices;
        inputs.positions = tokens->positions;
        report["inputs"].push_back(dsa::tensor_json(tokens->indices));
      } else if (a.kind == dsa::V4Attention::csa) {
        dsa::bad_usage(
            "--attention csa: give the indexer (--q-index, --k-index over the "
            "compressed keys, --weights) or --indices");
      } else if (tensors.given() || !indices_path.empty()) {
        dsa::bad_usage("--attention {} attends every visible entry: no indexer or --indices",
                       v4.attention);
      }
      std::optional<dsa::Tensor> needles;
      if (!needles_path.empty()) {
        needles = dsa::read_tensor(needles_path);
        inputs.needles = &*needles;
        report["inputs"].push_back(dsa::tensor_json(*needles));
      }
      if (inputs.indexer) dsa::app::warn_if_dense_topk("dsa-compare", inputs.topk, a.entries);
      const dsa::DeviceChoice choice =
          dsa::naming("--device", [&] { return dsa::choose_device(device, inputs.attention); });
      dsa::report_device(report, choice);
      times.add("load", load.seconds());
      const dsa::Comparison comparison =
          dsa::compare_compressed_attention(inputs, &times, choice.device);
      report.update(dsa::comparison_report(inputs, comparison));
      report["scale_rule"] = loaded.scale.rule;
      finish(report, times, total, common);
      return;
    }
    if (!tensors.given() && indices_path.empty()) {
      dsa::bad_usage(
          "give the indexer (--q-index, --k-index and --weights, or --hidden and "
          "--indexer-weights) or --indices");
    }
    dsa::app::check_single_stdin({attention.q, attention.kv, attention.k, attention.v,
                                  tensors.q_index, tensors.k_index, tensors.weights, tensors.hidden,
                                  tensors.indexer_weights, indices_path, needles_path});

    nlohmann::json report = dsa::report_header("dsa-compare", argc, argv);
    report["schema"] = dsa::kCompareSchema;
    dsa::app::AttentionTensors loaded;
    dsa::app::load_attention(attention, loaded);
    if (attention.kv_cache == "fp8" && !loaded.fp8) {
      dsa::bad_usage(
          "--kv-cache fp8 measures the fp8 cache against the bf16 one: give --kv as floating "
          "values, not a u8 cache");
    }
    dsa::CompareInputs inputs;
    inputs.attention = loaded.inputs;
    inputs.fp8_cache = loaded.fp8 ? &loaded.fp8->inputs : nullptr;
    inputs.scale = loaded.scale.value;
    for (const auto& t : loaded.tensors) report["inputs"].push_back(dsa::tensor_json(t));
    std::optional<dsa::app::IndexerTensors> indexer_tensors;
    std::optional<dsa::TokenFile> tokens;
    if (tensors.given()) {
      indexer_tensors = dsa::app::load_indexer_tensors(tensors);
      const dsa::app::IndexerTensors& x = *indexer_tensors;
      inputs.indexer_config = dsa::app::indexer_config(indexer);
      inputs.indexer = dsa::naming_in_usage_errors("--hadamard", [&] {
        return dsa::make_indexer_inputs(x.q_index, x.k_index, x.weights, inputs.indexer_config);
      });
      for (const auto& t : x.read) report["inputs"].push_back(dsa::tensor_json(t));
      if (!tensors.hidden.empty()) report["indexer_weights"] = tensors.indexer_weights;
      inputs.topk = sweep.empty() ? std::vector<int64_t>{topk} : sweep;
    } else {
      tokens = dsa::read_token_file(indices_path);
      if (future_as_padding) {
        dsa::DroppedIndices kept = dsa::drop_future_indices(inputs.attention, tokens->indices);
        tokens->indices = std::move(kept.indices);
        report["future_entries_dropped"] = kept.dropped;
      }
      inputs.indices = &tokens->indices;
      inputs.positions = tokens->positions;
      inputs.topk = {tokens->indices.shape.back()};
      report["inputs"].push_back(dsa::tensor_json(tokens->indices));
    }
    std::optional<dsa::Tensor> needles;
    if (!needles_path.empty()) {
      needles = dsa::read_tensor(needles_path);
      inputs.needles = &*needles;
      report["inputs"].push_back(dsa::tensor_json(*needles));
    }
    const dsa::AttentionInputs& a = inputs.attention;
    dsa::app::warn_if_dense_topk("dsa-compare", inputs.topk, a.keys);
    // One GPU per rank: the host's ranks take its GPUs in turn (before any other CUDA call).
    if (job.size > 1 && device != "cpu") dsa::use_local_gpu(job.local_rank);
    const dsa::DeviceChoice choice =
        dsa::naming("--device", [&] { return dsa::choose_device(device, inputs); });
    dsa::report_device(report, choice);

    dsa::StageTimes times;
    // An MPI job: each rank its share of the rows, balanced by their causal work; rank 0 puts
    // the shares together into what one process computes, and alone writes the report.
    const std::vector<dsa::RowRange> shares = dsa::balanced_rows(inputs, job.size);
    inputs.rows = shares[job.rank];
    if (const int peer = dsa::app::ranks_ready()) throw dsa::app::PeerFailed{peer};
    dsa::Comparison comparison = dsa::compare_attention(inputs, &times, choice.device);
    if (job.size > 1) {
      const nlohmann::json timings = dsa::timings_json(times, total.seconds());
      const auto packed = dsa::app::gather_bytes(dsa::pack_rows(comparison, inputs.rows));
      report["ranks"] = dsa::app::gather_rank_entries(report["device"], inputs.rows, timings);
      if (job.rank != 0) return;
      for (int r = 1; r < job.size; ++r) dsa::unpack_rows(comparison, shares[r], packed[r]);
      dsa::finish_comparison(inputs, comparison);
    }
    inputs.rows = {};
    report.update(dsa::comparison_report(inputs, comparison));
    report["scale_rule"] = loaded.scale.rule;
    finish(report, times, total, common);
  });
}
