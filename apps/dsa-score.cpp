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
  std::string q_path, k_path, w_path;
  app.add_option("--q-index", q_path, "Indexer queries q_I [B?, Lq, H_I, d_I]")->required();
  app.add_option("--k-index", k_path, "Indexer keys k_I [B?, Lk, d_I]")->required();
  app.add_option("--weights", w_path, "Per-head weights w [B?, Lq, H_I]")->required();
  std::string device = "cpu";
  dsa::app::add_indexer_options(app, indexer);
  dsa::app::add_device_option(app, device);
  dsa::app::add_common_options(app, common);

  return dsa::app::run(app, argc, argv, common, [&] {
    dsa::Stopwatch total;
    dsa::app::check_single_stdin({q_path, k_path, w_path});
    dsa::app::check_binary_output(common.output);
    dsa::app::check_single_stdout({common.output, common.report});
    const dsa::Tensor q = dsa::read_tensor(q_path);
    const dsa::Tensor k = dsa::read_tensor(k_path);
    const dsa::Tensor w = dsa::read_tensor(w_path);
    dsa::IndexerConfig config = dsa::app::indexer_config(indexer, q);
    config.device = dsa::resolve_device(device);
    const dsa::IndexerInputs inputs = dsa::make_indexer_inputs(q, k, w, config);

    dsa::Shape shape = {inputs.queries, inputs.keys};
    if (inputs.batched) shape.insert(shape.begin(), inputs.batch);
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
        &times);
    writer.commit();

    nlohmann::json report = dsa::report_header("dsa-score", argc, argv);
    report["device"] = dsa::device_description(config.device);
    report["inputs"] = {dsa::tensor_json(q), dsa::tensor_json(k), dsa::tensor_json(w)};
    report["indexer"] = dsa::app::indexer_config_json(config);
    report["outputs"] = {{{"path", common.output}, {"shape", shape}, {"dtype", "f32"}}};
    dsa::app::finish_report(report, times, total.seconds(), common);
  });
}
