// dsa-cost: prefill and decode cost per million tokens against context position, dense MLA
// against DSA (DESIGN.md section 3; the DeepSeek-V3.2-Exp paper's Figure 3), or several models
// side by side with each one's FLOPs per token and KV cache (the DeepSeek-V4 paper's Figure 1),
// as JSON, CSV and an SVG plot.
#include <cstdio>
#include <optional>

#include "common.hpp"
#include "dsa/cost.hpp"
#include "dsa/error.hpp"
#include "dsa/io.hpp"

int main(int argc, char** argv) {
  CLI::App app(
      "Cost per million tokens at each context position, prefill and decode, dense MLA against "
      "DSA, from a roofline of the hardware's rates (DESIGN.md section 3); or, with "
      "--compare-models, several models side by side with each one's FLOPs per token and KV "
      "cache against a baseline's; JSON report (schema dsa-cost/2), CSV, SVG plot.",
      "dsa-cost");
  dsa::app::CommonOptions common;
  dsa::CostRequest request;
  std::string format = "json", plot_path, presets_flag;
  app.add_option("--hardware", request.hardware, "Hardware preset NAME or FILE.json")
      ->capture_default_str();
  auto* dense_flag = app.add_option("--dense-model", request.dense_model,
                                    "The dense model: preset NAME or FILE.json")
                         ->capture_default_str();
  auto* dsa_flag =
      app.add_option("--dsa-model", request.dsa_model, "The DSA model: preset NAME or FILE.json")
          ->capture_default_str();
  auto* compare_flag =
      app.add_option("--compare-models", request.compare_models,
                     "Instead of --dense-model and --dsa-model: several models side by side, "
                     "NAME or FILE.json, comma-separated or repeated")
          ->delimiter(',')
          ->excludes(dense_flag)
          ->excludes(dsa_flag);
  app.add_option("--baseline", request.baseline,
                 "The compared model the others are measured against, by name (default the "
                 "first)")
      ->needs(compare_flag);
  app.add_option("--presets", presets_flag,
                 "Directory of hardware.json and models.json (default: $DSA_PRESETS, else the "
                 "installed ones)");
  app.add_option("--max-context", request.max_context, "The largest context position")
      ->check(CLI::Range(int64_t{1}, dsa::kMaxCostPosition))
      ->capture_default_str();
  app.add_option("--step", request.step, "Positions 0, STEP, 2 STEP, ... up to --max-context")
      ->check(dsa::app::integer_at_least(1))
      ->capture_default_str();
  app.add_option("--batch", request.workload.decode_batch,
                 "Decode: sequences per step (they share one read of the weights)")
      ->check(dsa::app::integer_at_least(1))
      ->capture_default_str();
  app.add_option("--prefill-chunk", request.workload.prefill_chunk,
                 "Prefill: tokens per step (they share one read of the weights and of each "
                 "layer's cached keys)")
      ->check(dsa::app::integer_at_least(1))
      ->capture_default_str();
  app.add_option("--set", request.overrides,
                 "Override one field: hardware.FIELD=VALUE, dense.FIELD=VALUE or dsa.FIELD=VALUE; "
                 "with --compare-models NAME.FIELD=VALUE (repeatable)");
  auto* calibrate_flag =
      app.add_flag("--calibrate", request.calibrate,
                   "Measure this machine's rates with the toolkit's kernels and use them instead");
  app.add_option("--calibrate-seconds", request.calibrate_seconds,
                 "Timing per calibrated kernel and per measured layer")
      ->check(CLI::Range(0.0, 60.0))
      ->capture_default_str()
      ->needs(calibrate_flag);
  app.add_option("--device", request.device,
                 "Where --calibrate measures: cpu (its rates; its layers with "
                 "--calibrate-positions), cuda (the models' layers on the GPU beside the "
                 "roofline) or auto")
      ->check(CLI::IsMember({"cpu", "cuda", "auto"}))
      ->capture_default_str()
      ->needs(calibrate_flag);
  app.add_option("--calibrate-positions", request.calibrate_positions,
                 "Context positions at which --calibrate measures the models' layers, "
                 "ascending, comma-separated (default on a GPU: --max-context / 64, / 16, / 4 "
                 "and itself)")
      ->delimiter(',')
      ->check(CLI::Range(int64_t{0}, dsa::kMaxCostPosition))
      ->needs(calibrate_flag);
  app.add_option("--calibrate-tokens", request.calibrate_tokens,
                 "Query rows of a measured prefill and sequences of a measured decode, at most "
                 "--prefill-chunk and --batch (default: those on a GPU, 4 on the CPU)")
      ->check(dsa::app::integer_at_least(1))
      ->needs(calibrate_flag);
  app.add_option("--format", format, "Output format")
      ->check(CLI::IsMember({"json", "csv"}))
      ->capture_default_str();
  app.add_option("-o,--output", common.output, "The output file (default stdout)");
  app.add_option("--plot", plot_path,
                 "Also write the plot as SVG to FILE: two panels (prefill, decode cost), four "
                 "with --compare-models (and FLOPs per token, KV cache)");
  app.add_flag("-q,--quiet", common.quiet, "Print no summary on stderr");
  app.add_flag("--json", common.json,
               "Print the JSON report on a terminal too (by default a terminal gets only the "
               "summary on stderr)");
  app.set_version_flag("--version", app.get_name() + " " + dsa::version());
  app.add_option("--threads", common.threads,
                 "CPU threads for --calibrate (default: OMP_NUM_THREADS or all cores)")
      ->check(dsa::app::integer_at_least(0));

  return dsa::app::run(app, argc, argv, common, [&] {
    dsa::Stopwatch total;
    dsa::app::check_single_stdout({common.output, plot_path});
    if (!plot_path.empty()) dsa::naming("--plot", [&] { dsa::check_output(plot_path); });
    dsa::PresetLibrary presets = dsa::find_presets(presets_flag);
    presets.hint = "give --presets DIR or set DSA_PRESETS";
    request.want_csv = format == "csv";
    request.want_plot = !plot_path.empty();
    request.names = {"--set", "--baseline", "--compare-models", "--calibrate-positions"};
    dsa::StageTimes times;
    const dsa::CostRun run = dsa::run_cost(presets, request, &times);
    nlohmann::json report = dsa::report_header("dsa-cost", argc, argv);
    report.update(run.report);

    // Every output is written before any is committed: a failed write leaves none behind.
    std::optional<dsa::OutputFile> plot;
    if (!plot_path.empty()) {
      plot.emplace(plot_path);
      plot->write(run.svg);
    }
    // On a terminal the summary lines below stand for the JSON, unless --json asks for it.
    const bool to_terminal = common.output == "-" && dsa::app::stdout_is_terminal();
    std::optional<dsa::OutputFile> out;
    if (format == "csv") {
      out.emplace(common.output);
      out->write(run.csv);
    } else if (!to_terminal || common.json) {
      report["timings_ms"] = dsa::timings_json(times, total.seconds());
      out.emplace(common.output);
      out->write(dsa::report_text(report, common.output));
    }
    if (plot) plot->commit();
    if (out) out->commit();
    if (!common.quiet) {
      for (const auto& line : run.summary) std::fprintf(stderr, "dsa-cost: %s\n", line.c_str());
      if (!out) std::fprintf(stderr, "dsa-cost: the JSON report: -o FILE or --json\n");
    }
  });
}
