// Outputs: the report's JSON parts, the CSV, the SVG plot and the one-line summaries.
#include "dsa/cost.hpp"

#include <cmath>

#include <fmt/format.h>

#include "dsa/plot.hpp"

namespace dsa {

namespace {

nlohmann::json token_json(const TokenCost& cost) {
  nlohmann::json stages = nlohmann::json::array();
  for (const auto& s : cost.stages) {
    nlohmann::json j = {{"stage", s.stage},
                        {"flops", s.flops},
                        {"bytes", s.bytes},
                        {"compute_seconds", s.compute_seconds},
                        {"memory_seconds", s.memory_seconds},
                        {"seconds", s.seconds},
                        {"bound", s.memory_seconds > s.compute_seconds ? "memory" : "compute"}};
    if (!s.mode.empty()) j["mode"] = s.mode;
    if (!s.precision.empty()) j["precision"] = s.precision;
    stages.push_back(j);
  }
  return {{"seconds", cost.seconds},
          {"usd_per_million_tokens", cost.usd_per_million},
          {"stages", stages}};
}

nlohmann::json phase_summary_json(const PhaseSummary& s) {
  return {{"dsa_costlier_below",
           s.dsa_costlier_below ? nlohmann::json(*s.dsa_costlier_below) : nlohmann::json()},
          {"max_position", s.max_position},
          {"dense_usd_per_million_tokens", s.dense_usd_per_million},
          {"dsa_usd_per_million_tokens", s.dsa_usd_per_million},
          {"dense_over_dsa", s.dense_over_dsa}};
}

std::string kilo(double position) {
  return fmt::format("{:.1f}K", position / 1024.0);
}

std::string dollars(double usd) {
  if (usd >= 1e6) return fmt::format("${:.3g}M", usd / 1e6);
  if (usd >= 1e3) return fmt::format("${:.3g}K", usd / 1e3);
  return usd >= 1 ? fmt::format("${:.2f}", usd) : fmt::format("${:.3f}", usd);
}

// Round K-token ticks for a position axis: a power-of-two step, about eight of them.
std::vector<double> position_ticks(double max_k) {
  const double step = std::exp2(std::round(std::log2(max_k / 8)));
  std::vector<double> ticks;
  for (double i = 0; i * step < max_k * (1 + 1e-9) || ticks.size() < 2; ++i)
    ticks.push_back(i * step);
  if (ticks.back() < max_k) ticks.push_back(ticks.back() + step);
  return ticks;
}

}  // namespace

nlohmann::json cost_model_json() {
  return {{"reference", "DESIGN.md section 3; man dsa-cost"},
          {"position", "x = the number of earlier tokens the token attends to; m = min(x, topk)"},
          {"stages",
           {{"indexer",
             "flops 2*L*H_I*d_I*x at indexer_precision; bytes L*x*indexer_key_bytes "
             "(prefill: / prefill_chunk)"},
            {"topk", "flops 0; bytes L*x*score_bytes (one read of the score row)"},
            {"attention",
             "dense prefill mha: flops 2*L*H*(d_qk_mha+d_v_mha)*x, bytes "
             "L*x*d_qk*kv_bytes/prefill_chunk; dense decode mqa: flops "
             "2*L*H*(d_qk+d_v)*x, bytes L*x*d_qk*kv_bytes; DSA mqa over m entries: "
             "flops 2*L*H*(d_qk+d_v)*m, bytes L*m*d_qk*kv_bytes; DSA prefill with "
             "short_prefill_mha: the faster of that and dense mha"},
            {"rest",
             "flops 2*activated_params at weight_precision; bytes "
             "activated_params*weight_bytes / (prefill_chunk or decode_batch)"}}},
          {"time",
           "per stage max(flops/(peak*1e12*compute_efficiency), "
           "bytes/(memory_tb_s*1e12*memory_efficiency)); summed over the stages"},
          {"cost", "usd_per_million_tokens = seconds * price_per_gpu_hour / 3600 * 1e6"}};
}

nlohmann::json cost_points_json(const CostCurves& curves) {
  nlohmann::json points = nlohmann::json::array();
  for (const auto& p : curves.points) {
    points.push_back(
        {{"position", p.position},
         {"prefill", {{"dense", token_json(p.prefill_dense)}, {"dsa", token_json(p.prefill_dsa)}}},
         {"decode", {{"dense", token_json(p.decode_dense)}, {"dsa", token_json(p.decode_dsa)}}}});
  }
  return points;
}

nlohmann::json cost_summary_json(const CostCurves& curves) {
  return {{"prefill", phase_summary_json(curves.prefill)},
          {"decode", phase_summary_json(curves.decode)}};
}

std::string cost_csv(const CostCurves& curves) {
  std::string csv =
      "position,prefill_dense_usd_per_mtok,prefill_dsa_usd_per_mtok,decode_dense_usd_per_mtok,"
      "decode_dsa_usd_per_mtok\n";
  for (const auto& p : curves.points) {
    csv += fmt::format("{},{},{},{},{}\n", p.position, p.prefill_dense.usd_per_million,
                       p.prefill_dsa.usd_per_million, p.decode_dense.usd_per_million,
                       p.decode_dsa.usd_per_million);
  }
  return csv;
}

std::string cost_summary_line(Phase phase, const PhaseSummary& s) {
  const std::string crossover =
      !s.dsa_costlier_below ? fmt::format("DSA costs more up to position {}", s.max_position)
      : *s.dsa_costlier_below == 0
          ? "DSA never costs more"
          : fmt::format("DSA costs more below position {} ({})", *s.dsa_costlier_below,
                        kilo(static_cast<double>(*s.dsa_costlier_below)));
  return fmt::format("{}: {}; at {} ({}) dense {} vs DSA {} per million tokens (dense/DSA {:.2f})",
                     phase_name(phase), crossover, s.max_position,
                     kilo(static_cast<double>(s.max_position)), dollars(s.dense_usd_per_million),
                     dollars(s.dsa_usd_per_million), s.dense_over_dsa);
}

std::string cost_plot_svg(const CostCurves& curves, const ModelSpec& dense, const ModelSpec& dsa,
                          const HardwareSpec& hardware, const Workload& workload) {
  Plot plot;
  plot.title =
      fmt::format("Cost per million tokens by context position: {} vs {}", dense.name, dsa.name);
  plot.subtitle = fmt::format(
      "{} at ${:g}/GPU-hour; decode batch {}, prefill chunk {} tokens; roofline model (dsa-cost)",
      hardware.name, hardware.price_per_gpu_hour, workload.decode_batch, workload.prefill_chunk);
  const double max_k = static_cast<double>(curves.points.back().position) / 1024.0;
  for (const Phase phase : {Phase::prefill, Phase::decode}) {
    const bool prefill = phase == Phase::prefill;
    PlotPanel panel;
    panel.title = prefill ? "Prefill" : "Decode";
    panel.x_label = "context position (K tokens)";
    panel.y_label = "cost per million tokens ($)";
    panel.y_tick_prefix = "$";
    panel.x_ticks = position_ticks(max_k);
    PlotSeries a{dense.name + (dense.topk > 0 ? " (DSA)" : " (dense MLA)"), "#1f77b4", {}, {}, {}};
    PlotSeries b{dsa.name + (dsa.topk > 0 ? " (DSA)" : " (dense MLA)"), "#ff7f0e", {}, {}, {}};
    for (const auto& p : curves.points) {
      const double x = static_cast<double>(p.position) / 1024.0;
      a.x.push_back(x);
      b.x.push_back(x);
      a.y.push_back((prefill ? p.prefill_dense : p.decode_dense).usd_per_million);
      b.y.push_back((prefill ? p.prefill_dsa : p.decode_dsa).usd_per_million);
    }
    a.end_label = dollars(a.y.back());
    b.end_label = dollars(b.y.back());
    panel.series = {a, b};
    const PhaseSummary& s = prefill ? curves.prefill : curves.decode;
    if (s.dsa_costlier_below && *s.dsa_costlier_below > 0) {
      panel.markers.push_back({static_cast<double>(*s.dsa_costlier_below) / 1024.0,
                               "crossover " + kilo(static_cast<double>(*s.dsa_costlier_below))});
    }
    plot.panels.push_back(panel);
  }
  return render_svg(plot);
}

}  // namespace dsa
