// dsa-fit: learns the lightning indexer's projections from hidden states so that it matches
// the main attention: dense warm-up (Eq. 3) or sparse training on its own top-k (Eq. 4).
#include <limits>
#include <optional>

#include <fmt/format.h>

#include "common.hpp"
#include "dsa/error.hpp"
#include "dsa/fit.hpp"
#include "dsa/indexer_weights.hpp"
#include "dsa/io.hpp"
#include "progress.hpp"

int main(int argc, char** argv) {
  CLI::App app(
      "Fits the lightning indexer's projections (wq_b, wk, k_norm, weights_proj) from hidden "
      "states to one layer's main attention with Adam: dense warm-up (Eq. 3) or sparse "
      "training on the indexer's own top-k (Eq. 4). Writes the weights as .safetensors.",
      "dsa-fit");
  dsa::app::CommonOptions common;
  dsa::app::AttentionOptions attention;
  dsa::FitOptions fit;
  std::string hidden_path, init_path, log_path, stage = "warmup", prefix;
  int64_t indexer_heads = 64, indexer_dim = 128;
  std::optional<int64_t> topk;
  app.add_option("--hidden", hidden_path, "Hidden states h [L, d_model] (the indexer's input)")
      ->required();
  dsa::app::add_attention_options(app, attention);
  app.add_option("--stage", stage, "warmup (Eq. 3, dense) or sparse (Eq. 4, on the top-k)")
      ->check(CLI::IsMember({"warmup", "sparse"}))
      ->capture_default_str();
  app.add_option("-k,--topk", topk, "Sparse stage: entries selected per query (default 2048)")
      ->check(dsa::app::integer_in(1, dsa::app::kLargestTopk));
  auto* init = app.add_option("--init", init_path,
                              "Start from these indexer weights (.safetensors); default: random");
  app.add_option("--indexer-heads", indexer_heads, "H_I of a random start")
      ->check(CLI::PositiveNumber)
      ->capture_default_str()
      ->excludes(init);
  app.add_option("--indexer-dim", indexer_dim, "d_I of a random start")
      ->check(CLI::PositiveNumber)
      ->capture_default_str()
      ->excludes(init);
  app.add_option("--prefix", prefix,
                 "Tensor name prefix read and written, e.g. model.layers.3.self_attn.indexer.");
  app.add_option("--steps", fit.steps, "Adam steps")
      ->check(dsa::app::integer_at_least(0))
      ->capture_default_str();
  app.add_option("--lr", fit.lr, "Adam learning rate")
      ->check(dsa::app::number_between(0, std::numeric_limits<double>::infinity()))
      ->capture_default_str();
  app.add_option("--batch-rows", fit.batch_rows, "Query rows sampled per step")
      ->check(dsa::app::integer_at_least(1))
      ->capture_default_str();
  app.add_option("--holdout", fit.holdout,
                 "Fraction of positions held out (the last ones): evaluated, never trained on")
      ->check(dsa::app::number_between(0, 1))
      ->capture_default_str();
  app.add_option("--seed", fit.seed, "Seed of the random start and of the row sampling")
      ->capture_default_str();
  app.add_option("--eval-every", fit.eval_every, "Held-out metrics every N steps")
      ->check(dsa::app::integer_at_least(1))
      ->capture_default_str();
  app.add_option("--eval-topk", fit.eval_topk, "k of the held-out mass_recall and topk_recall")
      ->check(dsa::app::integer_in(1, dsa::app::kLargestTopk))
      ->capture_default_str();
  app.add_option("--log", log_path, "Write the training log (JSON, schema dsa-fit/3) to FILE");
  dsa::app::add_common_options(app, common);

  return dsa::app::run(app, argc, argv, common, [&] {
    dsa::Stopwatch total;
    dsa::app::check_safetensors_output(common.output, "the indexer weights");
    if (topk && stage != "sparse") dsa::bad_usage("--topk applies to --stage sparse only");
    fit.stage = stage == "sparse" ? dsa::FitStage::sparse : dsa::FitStage::warmup;
    fit.topk = topk.value_or(2048);
    dsa::app::check_single_stdin(
        {hidden_path, attention.q, attention.kv, attention.k, attention.v});
    dsa::app::check_single_stdout({common.report, log_path});

    // Opened first, so a log that cannot be written fails before the training.
    std::optional<dsa::OutputFile> log_file;
    if (!log_path.empty()) log_file.emplace(log_path);

    dsa::StageTimes times;
    dsa::Stopwatch load;
    const dsa::Tensor hidden = dsa::read_tensor(hidden_path);
    dsa::app::AttentionTensors main;
    dsa::app::load_attention(attention, main);
    const dsa::FitData data = dsa::make_fit_data(hidden, main.inputs, main.scale.value);
    // --holdout must leave training and held-out rows at this L; checked before any training.
    dsa::naming("--holdout", [&] { return dsa::fit_rows(data.attention.queries, fit.holdout); });
    dsa::IndexerWeights weights =
        init_path.empty()
            ? dsa::random_indexer_weights(hidden.dim(1), indexer_heads, indexer_dim, fit.seed)
            : dsa::read_indexer_weights(init_path, prefix);
    if (weights.d_model != hidden.dim(1)) {
      dsa::bad_input("{}: the indexer weights project from d_model {}, but {} has d_model {}",
                     init_path, weights.d_model, hidden.name, hidden.dim(1));
    }
    times.add("load", load.seconds());

    dsa::Stopwatch train;
    const dsa::FitLog log =
        dsa::fit_indexer(data, weights, fit, [&](const dsa::FitEvaluation& e, double loss) {
          if (common.quiet) return;
          dsa::app::print_above_progress(
              fmt::format("dsa-fit: step {}/{} ({}) loss {:.4f} held-out k={}: topk_recall {:.4f} "
                          "mass_recall {:.4f} kl_dense {:.4f}",
                          e.step, fit.steps, dsa::app::format_duration(train.seconds()), loss,
                          fit.eval_topk, e.topk_recall, e.mass_recall, e.kl_dense));
        });
    times.add("train", train.seconds());

    dsa::Stopwatch write;
    dsa::write_safetensors(common.output, dsa::indexer_weight_tensors(weights, prefix));
    times.add("write", write.seconds());

    nlohmann::json report = dsa::report_header("dsa-fit", argc, argv);
    report["schema"] = dsa::kFitSchema;
    report["inputs"] = {dsa::tensor_json(hidden)};
    for (const dsa::Tensor& t : main.tensors) report["inputs"].push_back(dsa::tensor_json(t));
    report["config"] = {
        {"stage", stage},
        {"topk",
         fit.stage == dsa::FitStage::sparse ? nlohmann::json(fit.topk) : nlohmann::json(nullptr)},
        {"steps", fit.steps},
        {"lr", fit.lr},
        {"adam", {{"beta1", fit.beta1}, {"beta2", fit.beta2}, {"eps", fit.epsilon}}},
        {"batch_rows", fit.batch_rows},
        {"holdout", fit.holdout},
        {"seed", fit.seed},
        {"evaluation", {{"every", fit.eval_every}, {"topk", fit.eval_topk}}},
        {"init", init_path.empty() ? nlohmann::json("random") : nlohmann::json(init_path)},
        {"scale", main.scale.value},
        {"scale_rule", main.scale.rule},
        {"indexer",
         {{"d_model", weights.d_model}, {"heads", weights.heads}, {"dim", weights.dim}}}};
    report.update(dsa::fit_log_json(log));
    report["outputs"] = nlohmann::json::array();
    for (const dsa::Tensor& t : dsa::indexer_weight_tensors(weights, prefix)) {
      report["outputs"].push_back(
          {{"name", common.output + ":" + t.name}, {"shape", t.shape}, {"dtype", "f32"}});
    }
    if (log_file) {
      dsa::add_timings(report, times, total.seconds());
      log_file->write(report.dump(1) + "\n");
      log_file->commit();
    }
    dsa::app::finish_report(report, times, total.seconds(), common);
  });
}
