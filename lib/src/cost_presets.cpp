// Presets, user files and --set: hardware and model specs read from JSON, every field checked.
#include "dsa/cost.hpp"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <type_traits>
#include <variant>

#include <fmt/format.h>

#include "dsa/error.hpp"

// Where the installed presets lie relative to the installed executables (set by data/).
#ifndef DSA_PRESETS_RELATIVE
#define DSA_PRESETS_RELATIVE "../share/dsa/presets"
#endif

namespace dsa {

namespace fs = std::filesystem;

namespace {

template <typename Spec>
struct Field {
  const char* name;
  std::variant<std::string Spec::*, double Spec::*, int64_t Spec::*, bool Spec::*,
               std::vector<int64_t> Spec::*>
      member;
  bool optional = false;  // absent from a file: the default of Spec{}
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
                                               {"source", &M::source},
                                               {"compress_ratios", &M::compress_ratios, true},
                                               {"window", &M::window, true},
                                               {"csa_ratio", &M::csa_ratio, true}};
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
        } else if constexpr (std::is_same_v<T, std::vector<int64_t>>) {
          const bool integers =
              value.is_array() && std::all_of(value.begin(), value.end(),
                                              [](const auto& v) { return v.is_number_integer(); });
          if (!integers) wrong("an array of integers");
          spec.*member = value.get<std::vector<int64_t>>();
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

// compress_ratios, window and csa_ratio: absent, or a schedule every layer of which attends
// something.
void validate_schedule(const ModelSpec& m, const std::string& origin) {
  check_range(m.window >= 0, origin, "window", "at least 0", m.window);
  check_range(m.csa_ratio >= 0, origin, "csa_ratio", "at least 0 (0: no CSA layers)", m.csa_ratio);
  if (m.compress_ratios.empty()) {
    check_range(m.window == 0, origin, "window", "0 without compress_ratios", m.window);
    check_range(m.csa_ratio == 0, origin, "csa_ratio", "0 without compress_ratios", m.csa_ratio);
    return;
  }
  const auto count = [&](auto&& rule) {
    return std::count_if(m.compress_ratios.begin(), m.compress_ratios.end(), rule);
  };
  const std::string per_layer = fmt::format(
      "one ratio per layer, {} (\"layers\"; a config.json's list ends with the MTP layer's, "
      "which is not counted)",
      m.layers);
  check_range(static_cast<int64_t>(m.compress_ratios.size()) == m.layers, origin, "compress_ratios",
              per_layer.c_str(), m.compress_ratios);
  check_range(count([](int64_t r) { return r < 0; }) == 0, origin, "compress_ratios",
              "ratios of at least 0 (0: sliding window only)", m.compress_ratios);
  check_range(m.window >= 1 || count([](int64_t r) { return r == 0; }) == 0, origin, "window",
              "at least 1 with sliding-window layers (ratio 0)", m.window);
  check_range(
      m.topk >= 1 || m.csa_ratio == 0 || count([&](int64_t r) { return r == m.csa_ratio; }) == 0,
      origin, "topk", "at least 1 with CSA layers (ratio csa_ratio)", m.topk);
  check_range(!m.short_prefill_mha, origin, "short_prefill_mha",
              "false with compress_ratios (the layers have no MHA mode)", m.short_prefill_mha);
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
  validate_schedule(m, origin);
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
      if (!f.optional && !json.contains(f.name))
        bad_usage("{}: missing field \"{}\"", origin, f.name);
  }
  validate(spec, origin);
  return spec;
}

nlohmann::json read_json_file(const fs::path& path, const std::string& hint = "") {
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
  const nlohmann::json json = read_json_file(path, " (the presets: " + presets.hint + ")");
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

PresetLibrary find_presets(const std::string& dir) {
  if (!dir.empty()) return {dir};
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

namespace {

// An override's VALUE: JSON when it parses (numbers, booleans, quoted strings, arrays), else the
// text as a string.
nlohmann::json override_value(const std::string& text) {
  nlohmann::json value = nlohmann::json::parse(text, nullptr, false);
  return value.is_discarded() ? nlohmann::json(text) : value;
}

}  // namespace

ModelSpec load_model(const PresetLibrary& presets, const std::string& name_or_file) {
  // NAME@FIELD=VALUE@...: a variant of a model, named by the whole text.
  const std::size_t slash = name_or_file.rfind('/');
  const std::size_t at = name_or_file.find('@', slash == std::string::npos ? 0 : slash);
  if (at == std::string::npos) return load_spec(presets, "models", name_or_file, model_fields());
  ModelSpec model = load_spec(presets, "models", name_or_file.substr(0, at), model_fields());
  for (std::size_t begin = at + 1; begin <= name_or_file.size();) {
    std::size_t end = name_or_file.find('@', begin);
    if (end == std::string::npos) end = name_or_file.size();
    const std::string part = name_or_file.substr(begin, end - begin);
    const std::size_t eq = part.find('=');
    if (eq == std::string::npos || eq == 0) {
      bad_usage("{}: expected MODEL@FIELD=VALUE, got \"{}\" after an '@'", name_or_file, part);
    }
    const std::string field = part.substr(0, eq);
    if (field == "base" || field == "name") {
      bad_usage("{}: \"{}\" cannot be set in a variant", name_or_file, field);
    }
    model = model_from_json({{field, override_value(part.substr(eq + 1))}}, name_or_file, &model);
    begin = end + 1;
  }
  model.name = name_or_file;
  return model;
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

std::size_t model_index(const std::vector<ModelSpec>& models, const std::string& name) {
  std::string names;
  for (std::size_t i = 0; i < models.size(); ++i) {
    if (same_name(models[i].name, name)) return i;
    names += (names.empty() ? "" : ", ") + models[i].name;
  }
  bad_usage("no model named \"{}\" among {}", name, names);
}

void apply_override(const std::string& assignment, HardwareSpec& hardware,
                    const std::vector<NamedModel>& models) {
  std::string keys = "hardware.FIELD";
  for (std::size_t i = 0; i < models.size(); ++i)
    keys += (i + 1 == models.size() ? " or " : ", ") + models[i].key + ".FIELD";
  // A model's key followed by '.' first: a variant's key holds '=' and '.' itself
  // ("DeepSeek-V3.2-Exp@topk=1024.window=64"). Else the last '.' before the first '=': model
  // names have dots ("DeepSeek-V3.2-Exp"), fields none.
  std::size_t key_end = 0;
  for (const NamedModel& m : models) {
    const std::size_t n = m.key.size();
    if (n > key_end && assignment.size() > n && assignment[n] == '.' &&
        same_name(assignment.substr(0, n), m.key)) {
      key_end = n;
    }
  }
  const auto eq = assignment.find('=', key_end);
  const auto dot = key_end > 0 ? key_end : eq == std::string::npos ? eq : assignment.rfind('.', eq);
  if (eq == std::string::npos || dot == std::string::npos) {
    bad_usage("{}: expected KEY=VALUE with KEY {}", assignment, keys);
  }
  const std::string spec = assignment.substr(0, dot);
  const std::string field = assignment.substr(dot + 1, eq - dot - 1);
  const std::string text = assignment.substr(eq + 1);
  if (field == "base") bad_usage("{}: \"base\" belongs in a file, not in an override", assignment);
  const nlohmann::json object = {{field, override_value(text)}};
  if (spec == "hardware") {
    hardware = hardware_from_json(object, assignment, &hardware);
    return;
  }
  for (const NamedModel& m : models) {
    if (same_name(m.key, spec)) {
      *m.model = model_from_json(object, assignment, m.model);
      return;
    }
  }
  bad_usage("{}: unknown \"{}\" (the keys are {})", assignment, spec, keys);
}

void apply_override(const std::string& assignment, HardwareSpec& hardware, ModelSpec& dense,
                    ModelSpec& dsa) {
  apply_override(assignment, hardware, {{"dense", &dense}, {"dsa", &dsa}});
}

}  // namespace dsa
