// dsa-select: top-k token selection (Eq. 2), from a score matrix or fused with the indexer.
#include <optional>

#include "common.hpp"
#include "dsa/device.hpp"
#include "dsa/error.hpp"
#include "dsa/indexer.hpp"
#include "dsa/io.hpp"
#include "dsa/topk.hpp"
#include "ranks.hpp"

int main(int argc, char** argv) {
  CLI::App app(
      "Top-k selection S_t = TopK_k({I[t,s] : s <= t}): int32 indices [B?, Lq, K], "
      "descending score, ties lower position first, -1 padding.",
      "dsa-select");
  dsa::app::CommonOptions common;
  common.shares_rows = true;
  dsa::app::IndexerOptions indexer;
  std::string scores_path, format;
  dsa::app::IndexerTensorOptions tensors;
  int64_t topk = 2048;
  auto* scores_opt =
      app.add_option("--scores", scores_path, "Score matrix I [B?, Lq, Lk] (from dsa-score)");
  for (auto* option : dsa::app::add_indexer_tensor_options(app, tensors, " (fused mode)")) {
    scores_opt->excludes(option);
  }
  app.add_option("-k,--topk", topk, "Entries selected per query")
      ->check(dsa::app::integer_in(1, dsa::app::kLargestTopk))
      ->capture_default_str();
  app.add_option("--format", format,
                 "Output format: npy or jsonl (default: from the output's "
                 "extension, npy for stdout)")
      ->check(CLI::IsMember({"npy", "jsonl"}));
  for (auto* option : dsa::app::add_indexer_options(app, indexer)) option->excludes(scores_opt);
  std::string device = "cpu";
  dsa::app::add_device_option(app, device);
  dsa::app::CompressedKeyOptions compressed_keys;
  dsa::app::add_compressed_key_options(app, compressed_keys);
  dsa::app::add_common_options(app, common);

  return dsa::app::run(app, argc, argv, common, [&] {
    dsa::Stopwatch total;
    const dsa::app::Ranks& job = dsa::app::ranks();
    if (scores_path.empty() && !tensors.given()) {
      dsa::bad_usage(
          "give either --scores, or --q-index, --k-index and --weights, or --hidden and "
          "--indexer-weights");
    }
    const bool fused = scores_path.empty();
    dsa::app::check_single_stdin({scores_path, tensors.q_index, tensors.k_index, tensors.weights,
                                  tensors.hidden, tensors.indexer_weights});
    const bool jsonl =
        format.empty()
            ? common.output.size() > 6 && common.output.substr(common.output.size() - 6) == ".jsonl"
            : format == "jsonl";
    // JSON lines are text, but not through the terminal that mpirun makes a rank's stdout.
    if (!jsonl || job.size > 1) dsa::app::check_binary_output(common.output);
    dsa::app::check_single_stdout({common.output, common.report});

    nlohmann::json report = dsa::report_header("dsa-select", argc, argv);
    report["schema"] = dsa::kSelectSchema;
    std::vector<dsa::Tensor> inputs;
    if (fused) {
      dsa::app::IndexerTensors in = dsa::app::load_indexer_tensors(tensors);
      for (const auto& t : in.read) report["inputs"].push_back(dsa::tensor_json(t));
      if (!tensors.hidden.empty()) report["indexer_weights"] = tensors.indexer_weights;
      inputs = {in.q_index, in.k_index, in.weights};
    } else {
      inputs = {dsa::read_tensor(scores_path)};
      report["inputs"].push_back(dsa::tensor_json(inputs[0]));
    }

    dsa::IndexerConfig config;
    dsa::Device compute_device = dsa::Device::cpu;
    dsa::IndexerInputs indexer_inputs;
    dsa::Shape shape;
    // Each rank its share of the rows, balanced by their work (docs/DESIGN.md section 8).
    std::vector<dsa::RowRange> shares;
    if (fused) {
      config = dsa::app::indexer_config(indexer);
      indexer_inputs =
          dsa::app::indexer_inputs(compressed_keys, inputs[0], inputs[1], inputs[2], config);
      // One GPU per rank: the host's ranks take its GPUs in turn (before any other CUDA call).
      if (job.size > 1 && device != "cpu") dsa::use_local_gpu(job.local_rank);
      const dsa::DeviceChoice choice = dsa::naming(
          "--device", [&] { return dsa::choose_device(device, indexer_inputs, config, topk); });
      compute_device = choice.device;
      dsa::report_device(report, choice);
      shape = dsa::selection_shape(indexer_inputs, topk);
      report.update(dsa::indexer_report(indexer_inputs, config));
      shares = dsa::balanced_rows(indexer_inputs, config, job.size);
      indexer_inputs.rows = shares[job.rank];
    } else {
      shape = dsa::selection_shape(inputs[0], topk);
      shares = dsa::balanced_rows(inputs[0], job.size);  // checks the score matrix
    }
    const dsa::RowRange rows = shares[job.rank];
    const bool batched = shape.size() == 3;
    dsa::app::warn_if_dense_topk(
        "dsa-select", {topk}, fused ? indexer_inputs.keys : inputs[0].shape.back(), common.quiet);

    dsa::StageTimes times;
    // Rank 0 alone writes: its own rows as they come, then the other ranks' (ranks.hpp).
    std::optional<dsa::TensorWriter> tensor_out;
    std::optional<dsa::OutputFile> jsonl_out;
    if (job.rank == 0) {
      if (jsonl) {
        jsonl_out.emplace(common.output);
      } else {
        tensor_out.emplace(common.output, dsa::DType::i32, shape);
      }
    }
    dsa::app::SharedOutput selection([&](const void* data, std::size_t size) {
      if (jsonl) {
        jsonl_out->write(data, size);
      } else {
        tensor_out->write(data, size);
      }
    });
    if (!jsonl) {
      selection.reserve(static_cast<std::size_t>((rows.end - rows.begin) * topk) * sizeof(int32_t));
    }
    auto sink = [&](const dsa::SelectionBlock& block) {
      dsa::Stopwatch write;
      if (jsonl) {
        std::string text;
        for (int64_t r = 0; r < block.rows; ++r) {
          text += dsa::jsonl_selection_line(block.batch, batched, block.first_position + r,
                                            block.indices + r * block.k, block.scores + r * block.k,
                                            block.k);
        }
        selection.add(text.data(), text.size());
      } else {
        selection.add(block.indices,
                      static_cast<std::size_t>(block.rows * block.k) * sizeof(int32_t));
      }
      times.add("write", write.seconds());
    };
    if (const int peer = dsa::app::ranks_ready()) throw dsa::app::PeerFailed{peer};
    if (fused) {
      dsa::select_from_indexer(indexer_inputs, config, topk, sink, &times, compute_device);
    } else {
      dsa::select_from_scores(inputs[0], topk, sink, &times, rows);
    }
    if (job.size > 1) {
      const nlohmann::json timings = dsa::timings_json(times, total.seconds());
      dsa::Stopwatch gather;
      selection.gather();
      times.add("gather", gather.seconds());
      report["ranks"] = dsa::app::gather_rank_entries(report["device"], rows, timings);
      if (job.rank != 0) return;
    }
    if (jsonl) {
      jsonl_out->commit();
    } else {
      tensor_out->commit();
    }

    report["topk"] = topk;
    report["mode"] = fused ? "fused" : "scores";
    report["outputs"] = {{{"name", common.output},
                          {"shape", shape},
                          {"dtype", "i32"},
                          {"format", jsonl ? "jsonl" : "npy"}}};
    const std::string how =
        fused ? fmt::format("{} indexer on {}", dsa::precision_name(config.precision),
                            dsa::device_name(compute_device))
              : std::string("from scores");
    dsa::app::finish_report(report, times, total.seconds(), common,
                            fmt::format("top-{} of {} keys, {}", topk,
                                        fused ? indexer_inputs.keys : inputs[0].shape.back(), how));
  });
}
