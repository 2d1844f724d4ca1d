#include "dsa/cost.hpp"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <variant>

#include <fmt/format.h>

#include "dsa/error.hpp"
#include "dsa/plot.hpp"

// Where the installed presets lie relative to the installed executables (set by data/).
#ifndef DSA_PRESETS_RELATIVE
#define DSA_PRESETS_RELATIVE "../share/dsa/presets"
#endif

namespace dsa {

namespace fs = std::filesystem;

const char* phase_name(Phase phase) {
  return phase == Phase::prefill ? "prefill" : "decode";
}

// ---------------------------------------------------------------------------------------------
// The model (DESIGN.md §3; the equations are in cost.hpp).

namespace {

StageCost make_stage(const char* stage, const char* mode, const std::string& precision,
                     double flops, double bytes, const HardwareSpec& hardware) {
  StageCost s;
  s.stage = stage;
  s.mode = mode;
  s.precision = precision;
  s.flops = flops;
  s.bytes = bytes;
  const double peak = precision == "fp8" ? hardware.fp8_tflops : hardware.bf16_tflops;
  s.compute_seconds = flops > 0 ? flops / (peak * 1e12 * hardware.compute_efficiency) : 0.0;
  s.memory_seconds =
      bytes > 0 ? bytes / (hardware.memory_tb_s * 1e12 * hardware.memory_efficiency) : 0.0;
  s.seconds = std::max(s.compute_seconds, s.memory_seconds);  // the roofline
  return s;
}

}  // namespace

TokenCost token_cost(const ModelSpec& model, const HardwareSpec& hardware, const Workload& workload,
                     Phase phase, int64_t position) {
  const double x = static_cast<double>(position), L = static_cast<double>(model.layers);
  const double H = static_cast<double>(model.heads);
  const bool prefill = phase == Phase::prefill;
  const bool sparse = model.topk > 0;
  const double chunk = static_cast<double>(workload.prefill_chunk);
  // Cached keys shared by the query tokens of a prefill step; per sequence in decode.
  const double key_share = prefill ? chunk : 1.0;

  TokenCost cost;
  if (sparse) {
    const double H_I = static_cast<double>(model.indexer_heads);
    const double d_I = static_cast<double>(model.indexer_dim);
    cost.stages.push_back(make_stage("indexer", "", model.indexer_precision, L * 2 * H_I * d_I * x,
                                     L * x * model.indexer_key_bytes / key_share, hardware));
    cost.stages.push_back(make_stage("topk", "", "", 0.0, L * x * model.score_bytes, hardware));
  }
  const double entries = sparse ? std::min(x, static_cast<double>(model.topk)) : x;
  const double mqa_flops = L * 2 * H * static_cast<double>(model.d_qk + model.d_v) * entries;
  // A sparse selection differs from token to token: its entries are read per token.
  const double mqa_bytes =
      L * entries * static_cast<double>(model.d_qk) * model.kv_bytes / (sparse ? 1.0 : key_share);
  const StageCost mqa = make_stage("attention", "mqa", "bf16", mqa_flops, mqa_bytes, hardware);
  const StageCost mha =
      make_stage("attention", "mha", "bf16",
                 L * 2 * H * static_cast<double>(model.d_qk_mha + model.d_v_mha) * x,
                 L * x * static_cast<double>(model.d_qk) * model.kv_bytes / chunk, hardware);
  if (!prefill) {
    cost.stages.push_back(mqa);
  } else if (!sparse) {
    cost.stages.push_back(mha);
  } else {
    cost.stages.push_back(model.short_prefill_mha && mha.seconds < mqa.seconds ? mha : mqa);
  }
  const double tokens_per_step = prefill ? chunk : static_cast<double>(workload.decode_batch);
  cost.stages.push_back(make_stage("rest", "", model.weight_precision, 2 * model.activated_params,
                                   model.activated_params * model.weight_bytes / tokens_per_step,
                                   hardware));
  for (const auto& s : cost.stages) cost.seconds += s.seconds;
  cost.usd_per_million = cost.seconds * hardware.price_per_gpu_hour / 3600.0 * 1e6;
  return cost;
}

namespace {

PhaseSummary summarize_phase(const ModelSpec& dense, const ModelSpec& dsa,
                             const HardwareSpec& hardware, const Workload& workload, Phase phase,
                             int64_t max_position) {
  // Seconds, not dollars, so that a price of 0 still finds the crossover.
  const auto costlier = [&](int64_t x) {
    const double a = token_cost(dsa, hardware, workload, phase, x).seconds;
    const double b = token_cost(dense, hardware, workload, phase, x).seconds;
    return a > b * (1 + 1e-12);
  };
  PhaseSummary summary;
  summary.max_position = max_position;
  int64_t x = max_position;
  while (x >= 0 && !costlier(x)) --x;
  if (x < max_position) summary.dsa_costlier_below = x + 1;
  const TokenCost a = token_cost(dense, hardware, workload, phase, max_position);
  const TokenCost b = token_cost(dsa, hardware, workload, phase, max_position);
  summary.dense_usd_per_million = a.usd_per_million;
  summary.dsa_usd_per_million = b.usd_per_million;
  summary.dense_over_dsa = a.seconds / b.seconds;
  return summary;
}

}  // namespace

CostCurves cost_curves(const ModelSpec& dense, const ModelSpec& dsa, const HardwareSpec& hardware,
                       const Workload& workload, int64_t max_position, int64_t step) {
  if (max_position < 1 || max_position > kMaxCostPosition) {
    bad_usage("the largest position must be in [1, {}], got {}", kMaxCostPosition, max_position);
  }
  if (step < 1) bad_usage("the step between positions must be at least 1, got {}", step);
  if (workload.decode_batch < 1 || workload.prefill_chunk < 1) {
    bad_usage("the decode batch and the prefill chunk must be at least 1, got {} and {}",
              workload.decode_batch, workload.prefill_chunk);
  }
  CostCurves curves;
  for (int64_t x = 0;; x = std::min(x + step, max_position)) {
    curves.points.push_back({x, token_cost(dense, hardware, workload, Phase::prefill, x),
                             token_cost(dsa, hardware, workload, Phase::prefill, x),
                             token_cost(dense, hardware, workload, Phase::decode, x),
                             token_cost(dsa, hardware, workload, Phase::decode, x)});
    if (x == max_position) break;
  }
  curves.prefill = summarize_phase(dense, dsa, hardware, workload, Phase::prefill, max_position);
  curves.decode = summarize_phase(dense, dsa, hardware, workload, Phase::decode, max_position);
  return curves;
}

// ---------------------------------------------------------------------------------------------
// Presets, user files and --set.

namespace {

template <typename Spec>
struct Field {
  const char* name;
  std::variant<std::string Spec::*, double Spec::*, int64_t Spec::*, bool Spec::*> member;
};

const std::vector<Field<HardwareSpec>>& hardware_fields() {
  using H = HardwareSpec;
  static const std::vector<Field<H>> fields = {{"name", &H::name},
                                               {"bf16_tflops", &H::bf16_tflops},
                                               {"fp8_tflops", &H::fp8_tflops},
                                               {"memory_tb_s", &H::memory_tb_s},
                                               {"price_per_gpu_hour", &H::price_per_gpu_hour},
                                               {"compute_efficiency", &H::compute_efficiency},
                                               {"memory_efficiency", &H::memory_efficiency},
                                               {"source", &H::source},
                                               {"price_source", &H::price_source}};
  return fields;
}

const std::vector<Field<ModelSpec>>& model_fields() {
  using M = ModelSpec;
  static const std::vector<Field<M>> fields = {{"name", &M::name},
                                               {"layers", &M::layers},
                                               {"activated_params", &M::activated_params},
                                               {"weight_bytes", &M::weight_bytes},
                                               {"weight_precision", &M::weight_precision},
                                               {"heads", &M::heads},
                                               {"d_qk_mha", &M::d_qk_mha},
                                               {"d_v_mha", &M::d_v_mha},
                                               {"d_qk", &M::d_qk},
                                               {"d_v", &M::d_v},
                                               {"kv_bytes", &M::kv_bytes},
                                               {"indexer_heads", &M::indexer_heads},
                                               {"indexer_dim", &M::indexer_dim},
                                               {"indexer_key_bytes", &M::indexer_key_bytes},
                                               {"indexer_precision", &M::indexer_precision},
                                               {"score_bytes", &M::score_bytes},
                                               {"topk", &M::topk},
                                               {"short_prefill_mha", &M::short_prefill_mha},
                                               {"source", &M::source}};
  return fields;
}

template <typename Spec>
std::string field_names(const std::vector<Field<Spec>>& fields) {
  std::string names;
  for (const auto& f : fields) names += (names.empty() ? "" : ", ") + std::string(f.name);
  return names;
}

template <typename Spec>
const Field<Spec>* find_field(const std::vector<Field<Spec>>& fields, const std::string& name) {
  for (const auto& f : fields)
    if (name == f.name) return &f;
  return nullptr;
}

// A value for a message: a string from --set need not be valid UTF-8 (a file's is, or it fails
// to parse), and dump() would throw on it.
std::string json_text(const nlohmann::json& value) {
  return value.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

template <typename Spec>
void set_field(Spec& spec, const Field<Spec>& field, const nlohmann::json& value,
               const std::string& origin) {
  std::visit(
      [&](auto member) {
        using T = std::remove_reference_t<decltype(spec.*member)>;
        const auto wrong = [&](const char* expected) {
          bad_usage("{}: field \"{}\" must be {}, got {}", origin, field.name, expected,
                    json_text(value));
        };
        if constexpr (std::is_same_v<T, std::string>) {
          if (!value.is_string()) wrong("a string");
          spec.*member = value.get<std::string>();
        } else if constexpr (std::is_same_v<T, bool>) {
          if (!value.is_boolean()) wrong("true or false");
          spec.*member = value.get<bool>();
        } else if constexpr (std::is_same_v<T, int64_t>) {
          if (!value.is_number_integer()) wrong("an integer");
          spec.*member = value.get<int64_t>();
        } else {
          if (!value.is_number() || !std::isfinite(value.get<double>())) wrong("a number");
          spec.*member = value.get<double>();
        }
      },
      field.member);
}

template <typename Spec>
nlohmann::json spec_json(const Spec& spec, const std::vector<Field<Spec>>& fields) {
  nlohmann::json out = nlohmann::json::object();
  for (const auto& f : fields)
    std::visit([&](auto member) { out[f.name] = spec.*member; }, f.member);
  return out;
}

void check_range(bool ok, const std::string& origin, const char* field, const char* expected,
                 const nlohmann::json& value) {
  if (!ok) {
    bad_usage("{}: field \"{}\" must be {}, got {}", origin, field, expected, json_text(value));
  }
}

void validate(const HardwareSpec& h, const std::string& origin) {
  check_range(!h.name.empty(), origin, "name", "a non-empty string", h.name);
  check_range(h.bf16_tflops > 0, origin, "bf16_tflops", "positive", h.bf16_tflops);
  check_range(h.fp8_tflops > 0, origin, "fp8_tflops", "positive", h.fp8_tflops);
  check_range(h.memory_tb_s > 0, origin, "memory_tb_s", "positive", h.memory_tb_s);
  check_range(h.price_per_gpu_hour >= 0, origin, "price_per_gpu_hour", "at least 0",
              h.price_per_gpu_hour);
  check_range(h.compute_efficiency > 0 && h.compute_efficiency <= 1, origin, "compute_efficiency",
              "in (0, 1]", h.compute_efficiency);
  check_range(h.memory_efficiency > 0 && h.memory_efficiency <= 1, origin, "memory_efficiency",
              "in (0, 1]", h.memory_efficiency);
}

void validate(const ModelSpec& m, const std::string& origin) {
  const auto precision = [&](const std::string& p, const char* field) {
    check_range(p == "bf16" || p == "fp8", origin, field, "\"bf16\" or \"fp8\"", p);
  };
  check_range(!m.name.empty(), origin, "name", "a non-empty string", m.name);
  check_range(m.layers >= 1, origin, "layers", "at least 1", m.layers);
  check_range(m.activated_params >= 0, origin, "activated_params", "at least 0",
              m.activated_params);
  check_range(m.weight_bytes >= 0, origin, "weight_bytes", "at least 0", m.weight_bytes);
  precision(m.weight_precision, "weight_precision");
  check_range(m.heads >= 1, origin, "heads", "at least 1", m.heads);
  check_range(m.d_qk_mha >= 1, origin, "d_qk_mha", "at least 1", m.d_qk_mha);
  check_range(m.d_v_mha >= 1, origin, "d_v_mha", "at least 1", m.d_v_mha);
  check_range(m.d_qk >= 1, origin, "d_qk", "at least 1", m.d_qk);
  check_range(m.d_v >= 1, origin, "d_v", "at least 1", m.d_v);
  check_range(m.kv_bytes > 0, origin, "kv_bytes", "positive", m.kv_bytes);
  check_range(m.indexer_heads >= 0, origin, "indexer_heads", "at least 0", m.indexer_heads);
  check_range(m.indexer_dim >= 0, origin, "indexer_dim", "at least 0", m.indexer_dim);
  check_range(m.indexer_key_bytes >= 0, origin, "indexer_key_bytes", "at least 0",
              m.indexer_key_bytes);
  precision(m.indexer_precision, "indexer_precision");
  check_range(m.score_bytes >= 0, origin, "score_bytes", "at least 0", m.score_bytes);
  check_range(m.topk >= 0, origin, "topk", "at least 0 (0: dense)", m.topk);
}

template <typename Spec>
Spec spec_from_json(const nlohmann::json& json, const std::string& origin, const Spec* base,
                    const std::vector<Field<Spec>>& fields) {
  if (!json.is_object()) bad_usage("{}: expected a JSON object, got {}", origin, json.type_name());
  Spec spec = base ? *base : Spec{};
  for (const auto& [key, value] : json.items()) {
    if (key == "base" && base) continue;
    const Field<Spec>* field = find_field(fields, key);
    if (!field) {
      bad_usage("{}: unknown field \"{}\" (the fields are {}{})", origin, key, field_names(fields),
                base ? ", base" : "");
    }
    set_field(spec, *field, value, origin);
  }
  if (!base) {
    for (const auto& f : fields)
      if (!json.contains(f.name)) bad_usage("{}: missing field \"{}\"", origin, f.name);
  }
  validate(spec, origin);
  return spec;
}

nlohmann::json read_json_file(const fs::path& path, const char* hint = "") {
  std::ifstream in(path);
  if (!in) bad_input("{}: cannot read the file{}", path.string(), hint);
  std::stringstream text;
  text << in.rdbuf();
  try {
    return nlohmann::json::parse(text.str());
  } catch (const nlohmann::json::parse_error& e) {
    bad_input("{}: not valid JSON: {}", path.string(), e.what());
  }
}

bool same_name(const std::string& a, const std::string& b) {
  return std::equal(a.begin(), a.end(), b.begin(), b.end(), [](char x, char y) {
    return std::tolower(static_cast<unsigned char>(x)) ==
           std::tolower(static_cast<unsigned char>(y));
  });
}

// kind "hardware" or "models": the entries of presets/<file>.json, each checked.
template <typename Spec>
std::vector<Spec> read_presets(const PresetLibrary& presets, const std::string& kind,
                               const std::vector<Field<Spec>>& fields) {
  const fs::path path = presets.dir / (kind + ".json");
  const nlohmann::json json =
      read_json_file(path, " (the presets: give --presets DIR or set DSA_PRESETS)");
  const std::string origin = path.string();
  if (!json.is_object() || !json.contains(kind) || !json[kind].is_array()) {
    bad_usage("{}: expected an object with an array \"{}\"", origin, kind);
  }
  for (const auto& [key, value] : json.items()) {
    if (key != kind && key != "about") {
      bad_usage("{}: unknown field \"{}\" (the fields are {}, about)", origin, key, kind);
    }
  }
  std::vector<Spec> specs;
  for (std::size_t i = 0; i < json[kind].size(); ++i) {
    const nlohmann::json& entry = json[kind][i];
    const std::string name =
        entry.is_object() && entry.contains("name") && entry["name"].is_string()
            ? entry["name"].get<std::string>()
            : fmt::format("#{}", i);
    specs.push_back(spec_from_json<Spec>(entry, fmt::format("{}: preset \"{}\"", origin, name),
                                         nullptr, fields));
  }
  return specs;
}

bool is_file_spec(const std::string& name_or_file) {
  const std::string ext = ".json";
  return name_or_file.find('/') != std::string::npos ||
         (name_or_file.size() >= ext.size() &&
          name_or_file.compare(name_or_file.size() - ext.size(), ext.size(), ext) == 0);
}

// `context` prefixes the message when the name comes from a file's "base".
template <typename Spec>
Spec find_preset(const PresetLibrary& presets, const std::string& kind, const std::string& name,
                 const std::vector<Field<Spec>>& fields, const std::string& context = "") {
  std::string names;
  for (const Spec& spec : read_presets(presets, kind, fields)) {
    if (same_name(spec.name, name)) return spec;
    names += (names.empty() ? "" : ", ") + spec.name;
  }
  bad_usage("{}no {} preset \"{}\" in {} (there are {}; or give a .json file)", context,
            kind == "models" ? "model" : "hardware", name,
            (presets.dir / (kind + ".json")).string(), names);
}

template <typename Spec>
Spec load_spec(const PresetLibrary& presets, const std::string& kind,
               const std::string& name_or_file, const std::vector<Field<Spec>>& fields) {
  if (!is_file_spec(name_or_file)) return find_preset(presets, kind, name_or_file, fields);
  const nlohmann::json json = read_json_file(name_or_file);
  if (json.is_object() && json.contains("base")) {
    if (!json["base"].is_string()) {
      bad_usage("{}: field \"base\" must be the name of a preset, got {}", name_or_file,
                json["base"].dump());
    }
    const Spec base = find_preset(presets, kind, json["base"].get<std::string>(), fields,
                                  name_or_file + ": field \"base\": ");
    return spec_from_json(json, name_or_file, &base, fields);
  }
  return spec_from_json<Spec>(json, name_or_file, nullptr, fields);
}

}  // namespace

PresetLibrary find_presets(const std::string& flag) {
  if (!flag.empty()) return {flag};
  if (const char* env = std::getenv("DSA_PRESETS"); env && *env) return {env};
  std::error_code error;
  const fs::path exe = fs::read_symlink("/proc/self/exe", error);
  return {(exe.parent_path() / DSA_PRESETS_RELATIVE).lexically_normal()};
}

std::vector<std::string> preset_names(const PresetLibrary& presets, const std::string& kind) {
  std::vector<std::string> names;
  if (kind == "hardware") {
    for (const auto& s : read_presets(presets, kind, hardware_fields())) names.push_back(s.name);
  } else {
    for (const auto& s : read_presets(presets, kind, model_fields())) names.push_back(s.name);
  }
  return names;
}

HardwareSpec load_hardware(const PresetLibrary& presets, const std::string& name_or_file) {
  return load_spec(presets, "hardware", name_or_file, hardware_fields());
}

ModelSpec load_model(const PresetLibrary& presets, const std::string& name_or_file) {
  return load_spec(presets, "models", name_or_file, model_fields());
}

HardwareSpec hardware_from_json(const nlohmann::json& json, const std::string& origin,
                                const HardwareSpec* base) {
  return spec_from_json(json, origin, base, hardware_fields());
}

ModelSpec model_from_json(const nlohmann::json& json, const std::string& origin,
                          const ModelSpec* base) {
  return spec_from_json(json, origin, base, model_fields());
}

nlohmann::json hardware_json(const HardwareSpec& hardware) {
  return spec_json(hardware, hardware_fields());
}

nlohmann::json model_json(const ModelSpec& model) {
  return spec_json(model, model_fields());
}

void apply_override(const std::string& assignment, HardwareSpec& hardware, ModelSpec& dense,
                    ModelSpec& dsa) {
  const std::string origin = "--set " + assignment;
  const auto eq = assignment.find('=');
  const auto dot = assignment.find('.');
  if (eq == std::string::npos || dot == std::string::npos || dot > eq) {
    bad_usage("{}: expected KEY=VALUE with KEY hardware.FIELD, dense.FIELD or dsa.FIELD", origin);
  }
  const std::string spec = assignment.substr(0, dot);
  const std::string field = assignment.substr(dot + 1, eq - dot - 1);
  const std::string text = assignment.substr(eq + 1);
  if (field == "base") bad_usage("{}: \"base\" belongs in a file, not in --set", origin);
  // JSON when it parses (numbers, booleans, quoted strings), else the text as a string.
  nlohmann::json value = nlohmann::json::parse(text, nullptr, false);
  if (value.is_discarded()) value = text;
  const nlohmann::json object = {{field, value}};
  if (spec == "hardware") {
    hardware = hardware_from_json(object, origin, &hardware);
  } else if (spec == "dense") {
    dense = model_from_json(object, origin, &dense);
  } else if (spec == "dsa") {
    dsa = model_from_json(object, origin, &dsa);
  } else {
    bad_usage("{}: unknown \"{}\" (the keys are hardware.FIELD, dense.FIELD, dsa.FIELD)", origin,
              spec);
  }
}

// ---------------------------------------------------------------------------------------------
// Outputs.

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
