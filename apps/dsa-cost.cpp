// dsa-cost: prefill and decode cost per million tokens against context position, dense MLA
// against DSA (DESIGN.md section 3; the DeepSeek-V3.2-Exp paper's Figure 3), or several models
// side by side with each one's FLOPs per token and KV cache (the DeepSeek-V4 paper's Figure 1),
// as JSON, CSV and an SVG plot.
#include <cstdio>

#include "common.hpp"
#include "dsa/calibrate.hpp"
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
  std::string hardware_name = "H800", dense_name = "DeepSeek-V3.1-Terminus",
              dsa_name = "DeepSeek-V3.2-Exp", format = "json", plot_path, presets_flag, baseline;
  std::vector<std::string> compared;
  int64_t max_context = 131072, step = 4096;
  dsa::Workload workload;
  std::vector<std::string> overrides;
  bool calibrate = false;
  double calibrate_seconds = 1.0;
  app.add_option("--hardware", hardware_name, "Hardware preset NAME or FILE.json")
      ->capture_default_str();
  auto* dense_flag =
      app.add_option("--dense-model", dense_name, "The dense model: preset NAME or FILE.json")
          ->capture_default_str();
  auto* dsa_flag =
      app.add_option("--dsa-model", dsa_name, "The DSA model: preset NAME or FILE.json")
          ->capture_default_str();
  auto* compare_flag =
      app.add_option("--compare-models", compared,
                     "Instead of --dense-model and --dsa-model: several models side by side, "
                     "NAME or FILE.json, comma-separated or repeated")
          ->delimiter(',')
          ->excludes(dense_flag)
          ->excludes(dsa_flag);
  app.add_option("--baseline", baseline,
                 "The compared model the others are measured against, by name (default the "
                 "first)")
      ->needs(compare_flag);
  app.add_option("--presets", presets_flag,
                 "Directory of hardware.json and models.json (default: $DSA_PRESETS, else the "
                 "installed ones)");
  app.add_option("--max-context", max_context, "The largest context position")
      ->check(CLI::Range(int64_t{1}, dsa::kMaxCostPosition))
      ->capture_default_str();
  app.add_option("--step", step, "Positions 0, STEP, 2 STEP, ... up to --max-context")
      ->check(dsa::app::integer_at_least(1))
      ->capture_default_str();
  app.add_option("--batch", workload.decode_batch,
                 "Decode: sequences per step (they share one read of the weights)")
      ->check(dsa::app::integer_at_least(1))
      ->capture_default_str();
  app.add_option("--prefill-chunk", workload.prefill_chunk,
                 "Prefill: tokens per step (they share one read of the weights and of each "
                 "layer's cached keys)")
      ->check(dsa::app::integer_at_least(1))
      ->capture_default_str();
  app.add_option("--set", overrides,
                 "Override one field: hardware.FIELD=VALUE, dense.FIELD=VALUE or dsa.FIELD=VALUE; "
                 "with --compare-models NAME.FIELD=VALUE (repeatable)");
  auto* calibrate_flag =
      app.add_flag("--calibrate", calibrate,
                   "Measure this machine's rates with the toolkit's kernels and use them instead");
  app.add_option("--calibrate-seconds", calibrate_seconds, "Timing per calibrated kernel")
      ->check(CLI::Range(0.0, 60.0))
      ->capture_default_str()
      ->needs(calibrate_flag);
  app.add_option("--format", format, "Output format")
      ->check(CLI::IsMember({"json", "csv"}))
      ->capture_default_str();
  app.add_option("-o,--output", common.output, "The output file (default stdout)");
  app.add_option("--plot", plot_path,
                 "Also write the plot as SVG to FILE: two panels (prefill, decode cost), four "
                 "with --compare-models (and FLOPs per token, KV cache)");
  app.add_flag("-q,--quiet", common.quiet, "Print no summary on stderr");
  app.set_version_flag("--version", dsa::version());
  app.add_option("--threads", common.threads,
                 "CPU threads for --calibrate (default: OMP_NUM_THREADS or all cores)")
      ->check(dsa::app::integer_at_least(0));

  return dsa::app::run(app, argc, argv, common, [&] {
    dsa::Stopwatch total;
    dsa::app::check_single_stdout({common.output, plot_path});
    nlohmann::json report = dsa::report_header("dsa-cost", argc, argv);
    report["schema"] = dsa::kCostSchema;

    dsa::PresetLibrary presets = dsa::find_presets(presets_flag);
    presets.hint = "give --presets DIR or set DSA_PRESETS";
    dsa::HardwareSpec hardware = dsa::load_hardware(presets, hardware_name);
    std::vector<dsa::ModelSpec> models;
    for (const auto& name : compared.empty() ? std::vector{dense_name, dsa_name} : compared)
      models.push_back(dsa::load_model(presets, name));
    dsa::StageTimes times;
    if (calibrate) {
      dsa::Stopwatch watch;
      const dsa::Calibration calibration = dsa::calibrate(calibrate_seconds);
      hardware = dsa::calibrated_hardware(hardware, calibration);
      report["calibration"] = dsa::calibration_json(calibration);
      times.add("calibrate", watch.seconds());
    }
    std::vector<dsa::NamedModel> keys;
    for (std::size_t i = 0; i < models.size(); ++i) {
      keys.push_back({compared.empty() ? (i == 0 ? "dense" : "dsa") : models[i].name, &models[i]});
    }
    for (const auto& assignment : overrides) {
      dsa::app::naming_flag("--set", [&] { dsa::apply_override(assignment, hardware, keys); });
    }

    report["presets"] = presets.dir.string();
    report["hardware"] = dsa::hardware_json(hardware);
    report["hardware"]["calibrated"] = calibrate;
    report["workload"] = {{"decode_batch", workload.decode_batch},
                          {"prefill_chunk", workload.prefill_chunk},
                          {"max_context", max_context},
                          {"step", step}};
    report["model"] = dsa::cost_model_json();

    dsa::Stopwatch watch;
    std::string plot_svg, csv;
    std::vector<std::string> summary;
    if (compared.empty()) {
      const dsa::CostCurves curves =
          dsa::cost_curves(models[0], models[1], hardware, workload, max_context, step);
      times.add("model", watch.seconds());
      report["models"] = {{"dense", dsa::model_json(models[0])},
                          {"dsa", dsa::model_json(models[1])}};
      report["summary"] = dsa::cost_summary_json(curves);
      report["points"] = dsa::cost_points_json(curves);
      if (!plot_path.empty())
        plot_svg = dsa::cost_plot_svg(curves, models[0], models[1], hardware, workload);
      if (format == "csv") csv = dsa::cost_csv(curves);
      for (const auto phase : {dsa::Phase::prefill, dsa::Phase::decode}) {
        const auto& s = phase == dsa::Phase::prefill ? curves.prefill : curves.decode;
        summary.push_back(dsa::cost_summary_line(phase, s));
      }
    } else {
      const std::size_t base = baseline.empty() ? 0 : dsa::app::naming_flag("--baseline", [&] {
        return dsa::model_index(models, baseline);
      });
      const dsa::ModelComparison comparison = dsa::app::naming_flag("--compare-models", [&] {
        return dsa::compare_models(models, base, hardware, workload, max_context, step);
      });
      times.add("model", watch.seconds());
      report["comparison"] = dsa::comparison_json(comparison);
      if (!plot_path.empty()) plot_svg = dsa::comparison_plot_svg(comparison, hardware, workload);
      if (format == "csv") csv = dsa::comparison_csv(comparison);
      summary = dsa::comparison_summary_lines(comparison);
    }

    if (!plot_path.empty()) {
      dsa::OutputFile plot(plot_path);
      plot.write(plot_svg);
      plot.commit();
    }
    if (format == "csv") {
      dsa::OutputFile out(common.output);
      out.write(csv);
      out.commit();
    } else {
      nlohmann::json timings = times.to_json();
      timings["total"] = total.seconds() * 1e3;
      report["timings_ms"] = timings;
      dsa::emit_report(report, common.output);
    }
    if (!common.quiet) {
      for (const auto& line : summary) std::fprintf(stderr, "dsa-cost: %s\n", line.c_str());
    }
  });
}
