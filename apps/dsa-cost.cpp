// dsa-cost: prefill and decode cost per million tokens against context position, dense MLA
// against DSA (DESIGN.md section 3; the paper's Figure 3), as JSON, CSV and an SVG plot.
#include <cstdio>

#include "common.hpp"
#include "dsa/calibrate.hpp"
#include "dsa/cost.hpp"
#include "dsa/error.hpp"
#include "dsa/io.hpp"

int main(int argc, char** argv) {
  CLI::App app(
      "Cost per million tokens at each context position, prefill and decode, dense MLA against "
      "DSA, from a roofline of the hardware's rates (DESIGN.md section 3); JSON report (schema "
      "dsa-cost/1), CSV, SVG plot.",
      "dsa-cost");
  dsa::app::CommonOptions common;
  std::string hardware_name = "H800", dense_name = "DeepSeek-V3.1-Terminus",
              dsa_name = "DeepSeek-V3.2-Exp", format = "json", plot_path, presets_flag;
  int64_t max_context = 131072, step = 4096;
  dsa::Workload workload;
  std::vector<std::string> overrides;
  bool calibrate = false;
  double calibrate_seconds = 1.0;
  app.add_option("--hardware", hardware_name, "Hardware preset NAME or FILE.json")
      ->capture_default_str();
  app.add_option("--dense-model", dense_name, "The dense model: preset NAME or FILE.json")
      ->capture_default_str();
  app.add_option("--dsa-model", dsa_name, "The DSA model: preset NAME or FILE.json")
      ->capture_default_str();
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
                 "Override one field: hardware.FIELD=VALUE, dense.FIELD=VALUE or dsa.FIELD=VALUE "
                 "(repeatable)");
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
  app.add_option("--plot", plot_path, "Also write the two-panel plot as SVG to FILE");
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
    dsa::ModelSpec dense = dsa::load_model(presets, dense_name);
    dsa::ModelSpec dsa_model = dsa::load_model(presets, dsa_name);
    dsa::StageTimes times;
    if (calibrate) {
      dsa::Stopwatch watch;
      const dsa::Calibration calibration = dsa::calibrate(calibrate_seconds);
      hardware = dsa::calibrated_hardware(hardware, calibration);
      report["calibration"] = dsa::calibration_json(calibration);
      times.add("calibrate", watch.seconds());
    }
    for (const auto& assignment : overrides) {
      dsa::app::naming_flag("--set",
                            [&] { dsa::apply_override(assignment, hardware, dense, dsa_model); });
    }

    dsa::Stopwatch watch;
    const dsa::CostCurves curves =
        dsa::cost_curves(dense, dsa_model, hardware, workload, max_context, step);
    times.add("model", watch.seconds());

    report["presets"] = presets.dir.string();
    report["hardware"] = dsa::hardware_json(hardware);
    report["hardware"]["calibrated"] = calibrate;
    report["models"] = {{"dense", dsa::model_json(dense)}, {"dsa", dsa::model_json(dsa_model)}};
    report["workload"] = {{"decode_batch", workload.decode_batch},
                          {"prefill_chunk", workload.prefill_chunk},
                          {"max_context", max_context},
                          {"step", step}};
    report["model"] = dsa::cost_model_json();
    report["summary"] = dsa::cost_summary_json(curves);
    report["points"] = dsa::cost_points_json(curves);

    if (!plot_path.empty()) {
      dsa::OutputFile plot(plot_path);
      plot.write(dsa::cost_plot_svg(curves, dense, dsa_model, hardware, workload));
      plot.commit();
    }
    if (format == "csv") {
      dsa::OutputFile csv(common.output);
      csv.write(dsa::cost_csv(curves));
      csv.commit();
    } else {
      nlohmann::json timings = times.to_json();
      timings["total"] = total.seconds() * 1e3;
      report["timings_ms"] = timings;
      dsa::emit_report(report, common.output);
    }
    if (!common.quiet) {
      for (const auto phase : {dsa::Phase::prefill, dsa::Phase::decode}) {
        const auto& summary = phase == dsa::Phase::prefill ? curves.prefill : curves.decode;
        std::fprintf(stderr, "dsa-cost: %s\n", dsa::cost_summary_line(phase, summary).c_str());
      }
    }
  });
}
