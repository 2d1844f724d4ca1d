// dsa-select: top-k token selection (Eq. 2), from a score matrix or fused with the indexer.
#include <optional>

#include "common.hpp"
#include "dsa/error.hpp"
#include "dsa/io.hpp"
#include "dsa/topk.hpp"

int main(int argc, char** argv) {
  CLI::App app(
      "Top-k selection S_t = TopK_k({I[t,s] : s <= t}): int32 indices [B?, Lq, K], "
      "descending score, ties lower position first, -1 padding.",
      "dsa-select");
  dsa::app::CommonOptions common;
  dsa::app::IndexerOptions indexer;
  std::string scores_path, q_path, k_path, w_path, format;
  int64_t topk = 2048;
  auto* scores_opt =
      app.add_option("--scores", scores_path, "Score matrix I [B?, Lq, Lk] (from dsa-score)");
  auto* q_opt =
      app.add_option("--q-index", q_path, "Indexer queries q_I [B?, Lq, H_I, d_I] (fused mode)");
  auto* k_opt = app.add_option("--k-index", k_path, "Indexer keys k_I [B?, Lk, d_I] (fused mode)");
  auto* w_opt =
      app.add_option("--weights", w_path, "Per-head weights w [B?, Lq, H_I] (fused mode)");
  scores_opt->excludes(q_opt)->excludes(k_opt)->excludes(w_opt);
  q_opt->needs(k_opt)->needs(w_opt);
  k_opt->needs(q_opt);
  w_opt->needs(q_opt);
  app.add_option("-k,--topk", topk, "Entries selected per query")
      ->check(dsa::app::integer_at_least(1))
      ->capture_default_str();
  app.add_option("--format", format,
                 "Output format: npy or jsonl (default: from the output's "
                 "extension, npy for stdout)")
      ->check(CLI::IsMember({"npy", "jsonl"}));
  for (auto* option : dsa::app::add_indexer_options(app, indexer)) option->excludes(scores_opt);
  std::string device = "cpu";
  dsa::app::add_device_option(app, device);
  dsa::app::add_common_options(app, common);

  return dsa::app::run(app, argc, argv, common, [&] {
    dsa::Stopwatch total;
    if (scores_path.empty() && q_path.empty()) {
      dsa::bad_usage("give either --scores or --q-index, --k-index and --weights");
    }
    const bool fused = scores_path.empty();
    dsa::app::check_single_stdin({scores_path, q_path, k_path, w_path});
    const bool jsonl =
        format.empty()
            ? common.output.size() > 6 && common.output.substr(common.output.size() - 6) == ".jsonl"
            : format == "jsonl";
    if (!jsonl) dsa::app::check_binary_output(common.output);
    dsa::app::check_single_stdout({common.output, common.report});

    nlohmann::json report = dsa::report_header("dsa-select", argc, argv);
    std::vector<dsa::Tensor> inputs;
    if (fused) {
      inputs = {dsa::read_tensor(q_path), dsa::read_tensor(k_path), dsa::read_tensor(w_path)};
    } else {
      inputs = {dsa::read_tensor(scores_path)};
    }
    for (const auto& t : inputs) report["inputs"].push_back(dsa::tensor_json(t));

    // Output shape [B?, Lq, K] from the inputs' shapes, validated by the library below.
    dsa::IndexerConfig config;
    dsa::IndexerInputs indexer_inputs;
    dsa::Shape shape;
    if (fused) {
      config = dsa::app::indexer_config(indexer, inputs[0]);
      config.device = dsa::resolve_device(device);
      report["device"] = dsa::device_description(config.device);
      indexer_inputs = dsa::make_indexer_inputs(inputs[0], inputs[1], inputs[2], config);
      shape = {indexer_inputs.queries, topk};
      if (indexer_inputs.batched) shape.insert(shape.begin(), indexer_inputs.batch);
      report["indexer"] = dsa::app::indexer_config_json(config);
    } else if (inputs[0].rank() >= 2) {
      shape = inputs[0].shape;
      shape.back() = topk;
    }
    const bool batched = shape.size() == 3;

    dsa::StageTimes times;
    std::optional<dsa::TensorWriter> tensor_out;
    std::optional<dsa::OutputFile> jsonl_out;
    if (jsonl) jsonl_out.emplace(common.output);
    auto sink = [&](const dsa::SelectionBlock& block) {
      dsa::Stopwatch write;
      if (!tensor_out && !jsonl) tensor_out.emplace(common.output, dsa::DType::i32, shape);
      if (jsonl) {
        std::string text;
        const int64_t first = shape[batched ? 1 : 0];
        const int64_t keys = fused ? indexer_inputs.keys : inputs[0].shape.back();
        for (int64_t r = 0; r < block.rows; ++r) {
          text += dsa::jsonl_selection_line(
              block.batch, batched, keys - first + block.row_begin + r, block.indices + r * block.k,
              block.scores + r * block.k, block.k);
        }
        jsonl_out->write(text);
      } else {
        tensor_out->write(block.indices,
                          static_cast<std::size_t>(block.rows * block.k) * sizeof(int32_t));
      }
      times.add("write", write.seconds());
    };
    if (fused) {
      dsa::select_from_indexer(indexer_inputs, config, topk, sink, &times);
    } else {
      dsa::select_from_scores(inputs[0], topk, sink, &times);
    }
    if (jsonl) {
      jsonl_out->commit();
    } else {
      if (!tensor_out) tensor_out.emplace(common.output, dsa::DType::i32, shape);  // zero queries
      tensor_out->commit();
    }

    report["topk"] = topk;
    report["mode"] = fused ? "fused" : "scores";
    report["outputs"] = {{{"path", common.output},
                          {"shape", shape},
                          {"dtype", "i32"},
                          {"format", jsonl ? "jsonl" : "npy"}}};
    dsa::app::finish_report(report, times, total.seconds(), common);
  });
}
