// Outputs: the report's JSON parts, the CSV, the SVG plots and the one-line summaries, of two
// models' curves and of a comparison of several.
#include "dsa/cost.hpp"

#include <cmath>
#include <functional>
#include <iterator>
#include <optional>

#include <fmt/format.h>

#include "dsa/calibrate.hpp"
#include "dsa/device.hpp"
#include "dsa/error.hpp"
#include "dsa/plot.hpp"

namespace dsa {

void add_layer_group(nlohmann::json& j, const LayerGroup& group) {
  j["layer_kind"] = layer_kind_name(group.kind);
  j["layers"] = group.count;
  if (group.kind == LayerKind::csa || group.kind == LayerKind::hca) {
    j["compress_ratio"] = group.compress_ratio;
  }
}

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
    if (s.layers.count > 0) add_layer_group(j, s.layers);
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

// "9.55x smaller", "1.46x larger", "equal" (to two decimals).
std::string times(double ratio, const char* less, const char* more) {
  if (fmt::format("{:.2f}", ratio) == "1.00") return "equal";
  return ratio > 1 ? fmt::format("{:.2f}x {}", ratio, less)
                   : fmt::format("{:.2f}x {}", 1 / ratio, more);
}

// An end label: three significant digits, or the integer part from 1000 on.
std::string short_number(double value) {
  return value >= 1000 ? fmt::format("{:.0f}", value) : fmt::format("{:.3g}", value);
}

// The baseline's value over a model's: 9.55 is "9.55 times smaller"; none for a value of 0.
std::optional<double> over(double baseline, double value) {
  if (!(value > 0)) return std::nullopt;
  return baseline / value;
}

nlohmann::json optional_json(const std::optional<double>& value) {
  return value ? nlohmann::json(*value) : nlohmann::json();
}

constexpr double kGiB = 1024.0 * 1024.0 * 1024.0;

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
          {"position",
           "x = the number of earlier tokens the token attends to; m = min(x, topk); "
           "E = d_qk*kv_bytes, one cached entry as stored; with compress_ratios, per layer of "
           "ratio r: w_x = min(x, window), c = floor(x/r)"},
          {"layers",
           {{"mla",
             "no compress_ratios: every layer; attends x entries (topk 0) or m (DSA, whose "
             "indexer scores x keys)"},
            {"swa", "ratio 0: attends w_x entries"},
            {"csa",
             "ratio csa_ratio: the indexer scores c keys, the attention reads w_x + min(topk, c) "
             "entries"},
            {"hca", "any other ratio: attends w_x + c entries"}}},
          {"stages",
           {{"indexer",
             "per group of n layers: flops 2*n*H_I*d_I*(keys scored) at indexer_precision; bytes "
             "n*(keys scored)*indexer_key_bytes (prefill: / prefill_chunk)"},
            {"topk", "flops 0; bytes n*(keys scored)*score_bytes (one read of the score row)"},
            {"attention",
             "mla dense prefill mha: flops 2*n*H*(d_qk_mha+d_v_mha)*x, bytes "
             "n*x*E/prefill_chunk; mla dense decode mqa: flops 2*n*H*(d_qk+d_v)*x, bytes n*x*E; "
             "DSA mqa over m entries: flops 2*n*H*(d_qk+d_v)*m, bytes n*m*E; DSA prefill with "
             "short_prefill_mha: the faster of that and dense mha; swa, csa, hca mqa over their "
             "entries: flops 2*n*H*(d_qk+d_v) per entry, bytes E per entry, in prefill / "
             "prefill_chunk but for CSA's selected ones"},
            {"rest",
             "flops 2*activated_params at weight_precision; bytes "
             "activated_params*weight_bytes / (prefill_chunk or decode_batch)"}}},
          {"footprint",
           "flops: a decode token's, the stages' sum (attention_flops without the rest); "
           "kv_cache_bytes of the x earlier tokens, per layer: mla x*(E + indexer_key_bytes if "
           "topk > 0), swa w_x*E, csa w_x*E + c*(E + indexer_key_bytes), hca w_x*E + c*E; "
           "kv_bytes_per_token: per layer mla E (+ indexer_key_bytes), csa "
           "(E + indexer_key_bytes)/r, hca E/r, swa 0"},
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

namespace {

// A CSV number: 6 significant digits, a table for people and plotting tools (the JSON report
// keeps every digit); empty for a missing value.
std::string csv_number(double value) {
  return fmt::format("{:.6g}", value);
}
std::string csv_number(const std::optional<double>& value) {
  return value ? csv_number(*value) : "";
}

}  // namespace

std::string cost_csv(const CostCurves& curves) {
  std::string csv =
      "position,prefill_dense_usd_per_million_tokens,prefill_dsa_usd_per_million_tokens,"
      "decode_dense_usd_per_million_tokens,decode_dsa_usd_per_million_tokens\n";
  for (const auto& p : curves.points) {
    csv += fmt::format("{},{},{},{},{}\n", p.position, csv_number(p.prefill_dense.usd_per_million),
                       csv_number(p.prefill_dsa.usd_per_million),
                       csv_number(p.decode_dense.usd_per_million),
                       csv_number(p.decode_dsa.usd_per_million));
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

namespace {

// Model i's measured costs of one phase as points, labelled with the device.
std::optional<PlotSeries> measured_series(const MeasuredCurves* measured, std::size_t i,
                                          bool prefill, const std::string& color) {
  if (!measured || i >= measured->models.size()) return std::nullopt;
  const MeasuredModel& m = measured->models[i];
  PlotSeries s{m.name + " measured", color, {}, {}, {}, true};
  for (const MeasuredPoint& p : m.points) {
    s.x.push_back(static_cast<double>(p.position) / 1024.0);
    s.y.push_back((prefill ? p.prefill : p.decode).usd_per_million);
  }
  return s;
}

std::string measured_subtitle(const MeasuredCurves* measured) {
  return measured ? "; points measured on " + measured->device : "";
}

}  // namespace

std::string cost_plot_svg(const CostCurves& curves, const ModelSpec& dense, const ModelSpec& dsa,
                          const HardwareSpec& hardware, const Workload& workload,
                          const MeasuredCurves* measured) {
  Plot plot;
  plot.title =
      fmt::format("Cost per million tokens by context position: {} vs {}", dense.name, dsa.name);
  plot.subtitle = fmt::format(
      "{} at ${:g}/GPU-hour; decode batch {}, prefill chunk {} tokens; roofline model (dsa-cost){}",
      hardware.name, hardware.price_per_gpu_hour, workload.decode_batch, workload.prefill_chunk,
      measured_subtitle(measured));
  const double max_k = static_cast<double>(curves.points.back().position) / 1024.0;
  for (const Phase phase : {Phase::prefill, Phase::decode}) {
    const bool prefill = phase == Phase::prefill;
    PlotPanel panel;
    panel.title = prefill ? "Prefill" : "Decode";
    panel.x_label = "context position (K tokens)";
    panel.y_label = "cost per million tokens ($)";
    panel.y_tick_prefix = "$";
    panel.x_ticks = position_ticks(max_k);
    PlotSeries a{dense.name + " (" + attention_label(dense) + ")", "#1f77b4", {}, {}, {}};
    PlotSeries b{dsa.name + " (" + attention_label(dsa) + ")", "#ff7f0e", {}, {}, {}};
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
    for (std::size_t i = 0; i < 2; ++i) {
      if (auto m = measured_series(measured, i, prefill, panel.series[i].color)) {
        panel.series.push_back(*m);
      }
    }
    const PhaseSummary& s = prefill ? curves.prefill : curves.decode;
    if (s.dsa_costlier_below && *s.dsa_costlier_below > 0) {
      panel.markers.push_back({static_cast<double>(*s.dsa_costlier_below) / 1024.0,
                               "crossover " + kilo(static_cast<double>(*s.dsa_costlier_below))});
    }
    plot.panels.push_back(panel);
  }
  return render_svg(plot);
}

namespace {

struct Ratios {
  std::optional<double> flops, attention_flops, kv_cache_bytes, prefill_cost, decode_cost;
};

// The baseline's over the model's; the costs by time, so that a price of 0 still has them.
Ratios baseline_over(const ComparedToken& baseline, const ComparedToken& model) {
  return {over(baseline.footprint.flops, model.footprint.flops),
          over(baseline.footprint.attention_flops, model.footprint.attention_flops),
          over(baseline.footprint.kv_cache_bytes, model.footprint.kv_cache_bytes),
          over(baseline.prefill.seconds, model.prefill.seconds),
          over(baseline.decode.seconds, model.decode.seconds)};
}

nlohmann::json row_json(const ModelComparison& c, const ComparisonPoint& p, std::size_t i) {
  const ComparedToken& t = p.models[i];
  const Ratios r = baseline_over(p.models[c.baseline], t);
  return {{"name", c.models[i].name},
          {"flops", t.footprint.flops},
          {"attention_flops", t.footprint.attention_flops},
          {"kv_cache_bytes", t.footprint.kv_cache_bytes},
          {"prefill_usd_per_million_tokens", t.prefill.usd_per_million},
          {"decode_usd_per_million_tokens", t.decode.usd_per_million},
          {"baseline_over",
           {{"flops", optional_json(r.flops)},
            {"attention_flops", optional_json(r.attention_flops)},
            {"kv_cache_bytes", optional_json(r.kv_cache_bytes)},
            {"prefill_cost", optional_json(r.prefill_cost)},
            {"decode_cost", optional_json(r.decode_cost)}}}};
}

nlohmann::json layer_json(const LayerFootprint& f) {
  nlohmann::json j = nlohmann::json::object();
  add_layer_group(j, f.group);
  j["window_entries"] = f.window_entries;
  j["compressed_entries"] = f.compressed_entries;
  j["attended_entries"] = f.attended_entries;
  j["indexed_keys"] = f.indexed_keys;
  j["attention_flops"] = f.attention_flops;
  j["indexer_flops"] = f.indexer_flops;
  j["kv_cache_bytes"] = f.kv_cache_bytes;
  j["kv_bytes_per_token"] = f.kv_bytes_per_token;
  return j;
}

// RFC 4180: a name with a comma, a quote or a line break is quoted, its quotes doubled.
std::string csv_text(const std::string& text) {
  if (text.find_first_of(",\"\r\n") == std::string::npos) return text;
  std::string quoted = "\"";
  for (const char c : text) quoted += c == '"' ? std::string("\"\"") : std::string(1, c);
  return quoted + "\"";
}

}  // namespace

nlohmann::json comparison_json(const ModelComparison& c) {
  nlohmann::json models = nlohmann::json::array();
  for (const ModelSpec& m : c.models) models.push_back(model_json(m));
  const ComparisonPoint& last = c.points.back();
  nlohmann::json at_max = nlohmann::json::array();
  for (std::size_t i = 0; i < c.models.size(); ++i) {
    const ComparedToken& t = last.models[i];
    nlohmann::json row = row_json(c, last, i);
    row["kv_bytes_per_token"] = t.footprint.kv_bytes_per_token;
    row["baseline_over"]["kv_bytes_per_token"] = optional_json(
        over(last.models[c.baseline].footprint.kv_bytes_per_token, t.footprint.kv_bytes_per_token));
    row["layers"] = nlohmann::json::array();
    for (const LayerFootprint& f : t.footprint.layers) row["layers"].push_back(layer_json(f));
    row["prefill"] = token_json(t.prefill);
    row["decode"] = token_json(t.decode);
    at_max.push_back(row);
  }
  nlohmann::json points = nlohmann::json::array();
  for (const ComparisonPoint& p : c.points) {
    nlohmann::json rows = nlohmann::json::array();
    for (std::size_t i = 0; i < c.models.size(); ++i) rows.push_back(row_json(c, p, i));
    points.push_back({{"position", p.position}, {"models", rows}});
  }
  return {{"baseline", c.models[c.baseline].name},
          {"models", models},
          {"at_max_context", {{"position", last.position}, {"models", at_max}}},
          {"points", points}};
}

std::string comparison_csv(const ModelComparison& c) {
  std::string csv =
      "position,model,flops,attention_flops,kv_cache_bytes,prefill_usd_per_million_tokens,"
      "decode_usd_per_million_tokens,baseline_over_flops,baseline_over_attention_flops,"
      "baseline_over_kv_cache_bytes,baseline_over_prefill_cost,baseline_over_decode_cost\n";
  for (const ComparisonPoint& p : c.points) {
    for (std::size_t i = 0; i < c.models.size(); ++i) {
      const ComparedToken& t = p.models[i];
      const Ratios r = baseline_over(p.models[c.baseline], t);
      csv += fmt::format(
          "{},{},{},{},{},{},{},{},{},{},{},{}\n", p.position, csv_text(c.models[i].name),
          csv_number(t.footprint.flops), csv_number(t.footprint.attention_flops),
          csv_number(t.footprint.kv_cache_bytes), csv_number(t.prefill.usd_per_million),
          csv_number(t.decode.usd_per_million), csv_number(r.flops), csv_number(r.attention_flops),
          csv_number(r.kv_cache_bytes), csv_number(r.prefill_cost), csv_number(r.decode_cost));
    }
  }
  return csv;
}

std::string comparison_plot_svg(const ModelComparison& c, const HardwareSpec& hardware,
                                const Workload& workload, const MeasuredCurves* measured) {
  static const char* const kColors[] = {"#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
                                        "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"};
  std::string names;
  for (const ModelSpec& m : c.models) names += (names.empty() ? "" : ", ") + m.name;
  Plot plot;
  plot.title = "Per token by context position: " + names;
  plot.subtitle = fmt::format(
      "{} at ${:g}/GPU-hour; decode batch {}, prefill chunk {} tokens; ratios against {}; "
      "roofline model (dsa-cost){}",
      hardware.name, hardware.price_per_gpu_hour, workload.decode_batch, workload.prefill_chunk,
      c.models[c.baseline].name, measured_subtitle(measured));
  plot.panel_width = 460;
  const ComparisonPoint& last = c.points.back();
  const double max_k = static_cast<double>(last.position) / 1024.0;
  struct View {
    const char *title, *y_label, *prefix;
    std::function<double(const ComparedToken&)> value;
    std::function<std::string(double)> end_label;
    // The legend's ratio at the longest position, or none (the cost panels).
    const char *less, *more;
    std::function<std::optional<double>(const Ratios&)> ratio;
  };
  const std::vector<View> views = {
      {"Prefill", "cost per million tokens ($)", "$",
       [](const ComparedToken& t) { return t.prefill.usd_per_million; }, dollars, nullptr, nullptr,
       nullptr},
      {"Decode", "cost per million tokens ($)", "$",
       [](const ComparedToken& t) { return t.decode.usd_per_million; }, dollars, nullptr, nullptr,
       nullptr},
      {"FLOPs of one decode token", "GFLOP", "",
       [](const ComparedToken& t) { return t.footprint.flops / 1e9; }, short_number, "lower",
       "higher", [](const Ratios& r) { return r.flops; }},
      {"KV cache of the sequence", "GiB", "",
       [](const ComparedToken& t) { return t.footprint.kv_cache_bytes / kGiB; }, short_number,
       "smaller", "larger", [](const Ratios& r) { return r.kv_cache_bytes; }}};
  for (const View& view : views) {
    PlotPanel panel;
    panel.title = view.title;
    panel.x_label = "context position (K tokens)";
    panel.y_label = view.y_label;
    panel.y_tick_prefix = view.prefix;
    panel.x_ticks = position_ticks(max_k);
    for (std::size_t i = 0; i < c.models.size(); ++i) {
      const ModelSpec& m = c.models[i];
      PlotSeries s{m.name, kColors[i % std::size(kColors)], {}, {}, {}};
      if (!view.ratio) {
        s.label += " (" + attention_label(m) + ")";
      } else if (i == c.baseline) {
        s.label += " (baseline)";
      } else if (const auto r =
                     view.ratio(baseline_over(last.models[c.baseline], last.models[i]))) {
        s.label += ": " + times(*r, view.less, view.more);
      }
      for (const ComparisonPoint& p : c.points) {
        s.x.push_back(static_cast<double>(p.position) / 1024.0);
        s.y.push_back(view.value(p.models[i]));
      }
      s.end_label = view.end_label(s.y.back());
      panel.series.push_back(s);
    }
    const std::size_t lines = panel.series.size();
    for (std::size_t i = 0; i < lines && !view.ratio; ++i) {  // the cost panels
      const bool prefill = &view == &views[0];
      if (auto m = measured_series(measured, i, prefill, panel.series[i].color)) {
        panel.series.push_back(*m);
      }
    }
    plot.panels.push_back(panel);
  }
  return render_svg(plot);
}

std::vector<std::string> comparison_summary_lines(const ModelComparison& c) {
  const ComparisonPoint& last = c.points.back();
  const ComparedToken& base = last.models[c.baseline];
  std::vector<std::string> lines = {fmt::format(
      "at {} ({}) {} (baseline): KV cache {:.4g} GiB ({:.6g} B per token), {:.5g} GFLOP per "
      "token (attention {:.5g}), decode {} per million tokens",
      last.position, kilo(static_cast<double>(last.position)), c.models[c.baseline].name,
      base.footprint.kv_cache_bytes / kGiB, base.footprint.kv_bytes_per_token,
      base.footprint.flops / 1e9, base.footprint.attention_flops / 1e9,
      dollars(base.decode.usd_per_million))};
  for (std::size_t i = 0; i < c.models.size(); ++i) {
    if (i == c.baseline) continue;
    const ComparedToken& t = last.models[i];
    const Ratios r = baseline_over(base, t);
    const auto ratio = [](const std::optional<double>& value, const char* less, const char* more) {
      return value ? times(*value, less, more) : std::string("no ratio (0)");
    };
    lines.push_back(fmt::format(
        "{}: KV cache {:.4g} GiB, {} ({} per token); {:.5g} GFLOP per token, {} (attention "
        "alone {}); decode {}, {}",
        c.models[i].name, t.footprint.kv_cache_bytes / kGiB,
        ratio(r.kv_cache_bytes, "smaller", "larger"),
        ratio(over(base.footprint.kv_bytes_per_token, t.footprint.kv_bytes_per_token), "smaller",
              "larger"),
        t.footprint.flops / 1e9, ratio(r.flops, "lower", "higher"),
        ratio(r.attention_flops, "lower", "higher"), dollars(t.decode.usd_per_million),
        ratio(r.decode_cost, "cheaper", "dearer")));
  }
  return lines;
}

CostRun run_cost(const PresetLibrary& presets, const CostRequest& request, StageTimes* stages) {
  StageTimes ignored;
  StageTimes& times_out = stages ? *stages : ignored;
  const bool comparing = !request.compare_models.empty();
  CostRun run;
  nlohmann::json& report = run.report;
  report["schema"] = kCostSchema;
  HardwareSpec hardware = load_hardware(presets, request.hardware);
  std::vector<ModelSpec> models;
  for (const auto& name :
       comparing ? request.compare_models : std::vector{request.dense_model, request.dsa_model}) {
    models.push_back(load_model(presets, name));
  }
  // --calibrate: the CPU's rates replace the preset's; the layers are measured on a GPU, and on
  // the CPU when positions are given.
  const Device device = request.calibrate ? resolve_device(request.device) : Device::cpu;
  const bool calibrates_rates = request.calibrate && device == Device::cpu;
  const bool measures =
      request.calibrate && (device != Device::cpu || !request.calibrate_positions.empty());
  if (calibrates_rates) {
    Stopwatch watch;
    const Calibration calibration = calibrate(request.calibrate_seconds);
    hardware = calibrated_hardware(hardware, calibration);
    report["calibration"] = calibration_json(calibration);
    times_out.add("calibrate", watch.seconds());
  }
  std::vector<NamedModel> keys;
  for (std::size_t i = 0; i < models.size(); ++i) {
    keys.push_back({comparing ? models[i].name : (i == 0 ? "dense" : "dsa"), &models[i]});
  }
  for (const auto& assignment : request.overrides) {
    naming(request.names.overrides, [&] { apply_override(assignment, hardware, keys); });
  }

  const Workload& workload = request.workload;
  report["presets"] = presets.dir.string();
  report["hardware"] = hardware_json(hardware);
  report["hardware"]["calibrated"] = calibrates_rates;
  report["workload"] = {{"decode_batch", workload.decode_batch},
                        {"prefill_chunk", workload.prefill_chunk},
                        {"max_context", request.max_context},
                        {"step", request.step}};
  report["model"] = cost_model_json();

  std::optional<MeasuredCurves> measured;
  if (measures) {
    Stopwatch watch;
    const std::vector<int64_t> positions = request.calibrate_positions.empty()
                                               ? default_measured_positions(request.max_context)
                                               : request.calibrate_positions;
    const int64_t tokens = request.calibrate_tokens > 0 ? request.calibrate_tokens
                           : device == Device::cpu
                               ? kCpuMeasuredTokens
                               : std::max(workload.prefill_chunk, workload.decode_batch);
    naming(request.names.calibrate_positions, [&] { check_measured_positions(positions); });
    measured = measure_curves(models, hardware, workload, positions, device, tokens,
                              request.calibrate_seconds);
    report["measured"] = measured_json(*measured);
    times_out.add("measure", watch.seconds());
  }
  const MeasuredCurves* points = measured ? &*measured : nullptr;
  const auto add_measured_summary = [&] {
    if (!measured) return;
    for (auto& line : measured_summary_lines(*measured)) run.summary.push_back(line);
  };

  Stopwatch watch;
  if (!comparing) {
    const CostCurves curves =
        cost_curves(models[0], models[1], hardware, workload, request.max_context, request.step);
    times_out.add("model", watch.seconds());
    report["models"] = {{"dense", model_json(models[0])}, {"dsa", model_json(models[1])}};
    report["summary"] = cost_summary_json(curves);
    report["points"] = cost_points_json(curves);
    if (request.want_plot)
      run.svg = cost_plot_svg(curves, models[0], models[1], hardware, workload, points);
    if (request.want_csv) run.csv = cost_csv(curves);
    run.summary = {cost_summary_line(Phase::prefill, curves.prefill),
                   cost_summary_line(Phase::decode, curves.decode)};
    add_measured_summary();
    return run;
  }
  const std::size_t base = request.baseline.empty() ? 0 : naming(request.names.baseline, [&] {
    return model_index(models, request.baseline);
  });
  const ModelComparison comparison = naming(request.names.compare_models, [&] {
    return compare_models(models, base, hardware, workload, request.max_context, request.step);
  });
  times_out.add("model", watch.seconds());
  report["comparison"] = comparison_json(comparison);
  if (request.want_plot) run.svg = comparison_plot_svg(comparison, hardware, workload, points);
  if (request.want_csv) run.csv = comparison_csv(comparison);
  run.summary = comparison_summary_lines(comparison);
  add_measured_summary();
  return run;
}

}  // namespace dsa
