// dsa-score: the lightning indexer's causal score matrix I (Eq. 1).
#include <optional>

#include "common.hpp"
#include "dsa/device.hpp"
#include "dsa/indexer.hpp"
#include "dsa/io.hpp"
#include "ranks.hpp"

int main(int argc, char** argv) {
  CLI::App app(
      "Lightning indexer scores I[t,s] = sum_j w[t,j] ReLU(q_I[t,j] . k_I[s]), causal; "
      "masked entries are -inf.",
      "dsa-score");
  dsa::app::CommonOptions common;
  common.shares_rows = true;
  dsa::app::IndexerOptions indexer;
  dsa::app::IndexerTensorOptions tensors;
  dsa::app::add_indexer_tensor_options(app, tensors);
  std::string device = "cpu";
  dsa::app::add_indexer_options(app, indexer);
  dsa::app::add_device_option(app, device);
  dsa::app::CompressedKeyOptions compressed_keys;
  dsa::app::add_compressed_key_options(app, compressed_keys);
  dsa::app::add_common_options(app, common);

  return dsa::app::run(app, argc, argv, common, [&] {
    dsa::Stopwatch total;
    const dsa::app::Ranks& job = dsa::app::ranks();
    dsa::app::check_single_stdin({tensors.q_index, tensors.k_index, tensors.weights, tensors.hidden,
                                  tensors.indexer_weights});
    dsa::app::check_binary_output(common.output);
    dsa::app::check_single_stdout({common.output, common.report});
    const dsa::app::IndexerTensors in = dsa::app::load_indexer_tensors(tensors);
    const dsa::Tensor &q = in.q_index, &k = in.k_index, &w = in.weights;
    dsa::IndexerConfig config = dsa::app::indexer_config(indexer);
    dsa::IndexerInputs inputs = dsa::app::indexer_inputs(compressed_keys, q, k, w, config);
    // One GPU per rank: the host's ranks take its GPUs in turn (before any other CUDA call).
    if (job.size > 1 && device != "cpu") dsa::use_local_gpu(job.local_rank);
    const dsa::DeviceChoice choice =
        dsa::naming("--device", [&] { return dsa::choose_device(device, inputs, config); });
    nlohmann::json report = dsa::report_header("dsa-score", argc, argv);
    report["schema"] = dsa::kScoreSchema;
    dsa::report_device(report, choice);

    // An MPI job: each rank its share of the rows, balanced by their work; rank 0 alone writes,
    // its own rows as they come, then the other ranks' (docs/DESIGN.md section 8).
    inputs.rows = dsa::balanced_rows(inputs, config, job.size)[job.rank];
    const dsa::Shape shape = dsa::score_shape(inputs);
    dsa::StageTimes times;
    std::optional<dsa::TensorWriter> writer;
    if (job.rank == 0) writer.emplace(common.output, dsa::DType::f32, shape);
    dsa::app::SharedOutput scores(
        [&](const void* data, std::size_t size) { writer->write(data, size); });
    scores.reserve(static_cast<std::size_t>((inputs.rows.end - inputs.rows.begin) * inputs.keys) *
                   sizeof(float));
    if (const int peer = dsa::app::ranks_ready()) throw dsa::app::PeerFailed{peer};
    dsa::indexer_scores(
        inputs, config,
        [&](const dsa::ScoreBlock& block) {
          dsa::Stopwatch write;
          scores.add(block.scores,
                     static_cast<std::size_t>(block.rows * block.keys) * sizeof(float));
          times.add("write", write.seconds());
        },
        &times, choice.device);
    if (job.size > 1) {
      const nlohmann::json timings = dsa::timings_json(times, total.seconds());
      dsa::Stopwatch gather;
      scores.gather();
      times.add("gather", gather.seconds());
      report["ranks"] = dsa::app::gather_rank_entries(report["device"], inputs.rows, timings);
      if (job.rank != 0) return;
    }
    writer->commit();

    for (const dsa::Tensor& t : in.read) report["inputs"].push_back(dsa::tensor_json(t));
    if (!tensors.hidden.empty()) report["indexer_weights"] = tensors.indexer_weights;
    report.update(dsa::indexer_report(inputs, config));
    report["outputs"] = {{{"name", common.output}, {"shape", shape}, {"dtype", "f32"}}};
    dsa::app::finish_report(
        report, times, total.seconds(), common,
        fmt::format("{} queries x {} keys, {} indexer on {}", inputs.batch * inputs.queries,
                    inputs.keys, dsa::precision_name(config.precision),
                    dsa::device_name(choice.device)));
  });
}
