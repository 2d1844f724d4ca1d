// dsa-score: the lightning indexer's causal score matrix I (Eq. 1).
#include "common.hpp"
#include "dsa/indexer.hpp"
#include "dsa/io.hpp"

int main(int argc, char** argv) {
  CLI::App app(
      "Lightning indexer scores I[t,s] = sum_j w[t,j] ReLU(q_I[t,j] . k_I[s]), causal; "
      "masked entries are -inf.",
      "dsa-score");
  dsa::app::CommonOptions common;
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
    dsa::app::check_single_stdin({tensors.q_index, tensors.k_index, tensors.weights, tensors.hidden,
                                  tensors.indexer_weights});
    dsa::app::check_binary_output(common.output);
    dsa::app::check_single_stdout({common.output, common.report});
    const dsa::app::IndexerTensors in = dsa::app::load_indexer_tensors(tensors);
    const dsa::Tensor &q = in.q_index, &k = in.k_index, &w = in.weights;
    dsa::IndexerConfig config = dsa::app::indexer_config(indexer);
    const dsa::IndexerInputs inputs = dsa::app::indexer_inputs(compressed_keys, q, k, w, config);
    const dsa::DeviceChoice choice =
        dsa::naming("--device", [&] { return dsa::choose_device(device, inputs, config); });

    const dsa::Shape shape = dsa::score_shape(inputs);
    dsa::StageTimes times;
    dsa::TensorWriter writer(common.output, dsa::DType::f32, shape);
    dsa::indexer_scores(
        inputs, config,
        [&](const dsa::ScoreBlock& block) {
          dsa::Stopwatch write;
          writer.write(block.scores,
                       static_cast<std::size_t>(block.rows * block.keys) * sizeof(float));
          times.add("write", write.seconds());
        },
        &times, choice.device);
    writer.commit();

    nlohmann::json report = dsa::report_header("dsa-score", argc, argv);
    report["schema"] = dsa::kScoreSchema;
    dsa::report_device(report, choice);
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
