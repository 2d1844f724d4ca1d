// dsa-gen: a deterministic synthetic workload (main attention with sinks, a local window and
// far needles, plus a noisy indexer view of it) in one .safetensors file.
#include <algorithm>
#include <optional>

#include <fmt/ranges.h>

#include "common.hpp"
#include "dsa/attention.hpp"
#include "dsa/error.hpp"
#include "dsa/io.hpp"
#include "dsa/workload.hpp"

namespace {

nlohmann::json config_json(const dsa::WorkloadConfig& c) {
  return {{"length", c.length},
          {"heads", c.heads},
          {"d_qk", c.d_qk},
          {"d_v", c.d_v},
          {"indexer_heads", c.indexer_heads},
          {"indexer_dim", c.indexer_dim},
          {"sinks", c.sinks},
          {"sink_logit", c.sink_logit},
          {"window", c.window},
          {"local_logit", c.local_logit},
          {"needles", c.needles},
          {"needle_logit", c.needle_logit},
          {"needle_min_distance", c.needle_min_distance},
          {"noise", c.noise},
          {"rank", c.rank},
          {"indexer_noise", c.indexer_noise},
          {"seed", c.seed},
          {"hidden", c.hidden},
          {"scale", c.scale},
          {"queries", c.queries},
          {"compress_ratio", c.compress_ratio}};
}

template <typename T>
void override_with(T& field, const std::optional<T>& value) {
  if (value) field = *value;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app(
      "Deterministic synthetic DSA workload: q, kv, q_index, k_index, weights and the needle "
      "pairs (with --hidden also hidden states and the indexer projections; with "
      "--compress-ratio DeepSeek-V4's compressed entries and sinks), in one .safetensors file.",
      "dsa-gen");
  dsa::app::CommonOptions common;
  std::string preset = "small", dtype = "f32";
  std::vector<std::string> only;
  std::optional<int64_t> length, heads, d_qk, d_v, indexer_heads, indexer_dim, sinks, window,
      needles, needle_distance, rank, hidden, queries, compress_ratio;
  std::optional<double> sink_logit, local_logit, needle_logit, noise, indexer_noise;
  std::optional<uint64_t> seed;
  std::optional<std::string> scale;
  app.add_option("--preset", preset,
                 "Sizes to start from: small, v32, v4-flash or v4-pro (the flags override it)")
      ->check(CLI::IsMember({"small", "v32", "v4-flash", "v4-pro"}))
      ->capture_default_str();
  app.add_option("--length", length, "Sequence length L");
  app.add_option("--heads", heads, "Main query heads H");
  app.add_option("--dqk", d_qk, "Query/key width d_qk");
  app.add_option("--dv", d_v, "Value width d_v (the first d_v columns of kv)");
  app.add_option("--indexer-heads", indexer_heads, "Indexer heads H_I");
  app.add_option("--indexer-dim", indexer_dim, "Indexer width d_I");
  app.add_option("--sinks", sinks, "Attention sinks: keys at positions < N (default 4)");
  app.add_option("--sink-logit", sink_logit, "Logit of a sink key (default 6)");
  app.add_option("--window", window, "Local window width in positions (default 64)");
  app.add_option("--local-logit", local_logit, "Logit of the key at t = s (default 4)");
  app.add_option("--needles", needles, "Needle queries, each with one far key (default 8)");
  app.add_option("--needle-logit", needle_logit, "Logit of a needle's key (default 14)");
  app.add_option("--needle-distance", needle_distance,
                 "Minimum t - s of a needle (default 0: 4 * window)");
  app.add_option("--noise", noise, "Std of the isotropic noise in q and kv (default 1)");
  app.add_option("--rank", rank, "Structure subspace rank r (default 0: min(d_I, 32))");
  app.add_option("--indexer-noise", indexer_noise,
                 "Indexer noise relative to the RMS of q_index and k_index (default 0)");
  app.add_option("--seed", seed, "Random seed (default 0)");
  app.add_option("--scale", scale,
                 "Softmax scale the logits are built for: a number, default (d_qk^-0.5) or "
                 "deepseek-v3.2 (the v32 preset's)")
      ->check(dsa::app::softmax_scale_text());
  app.add_option("--hidden", hidden,
                 "Also write hidden states [L, D_MODEL] and the indexer projections of them "
                 "(wq_b.weight, wk.weight, k_norm.*, weights_proj.weight) that give q_index, "
                 "k_index and weights");
  app.add_option("--queries", queries,
                 "Query rows for the last N positions only (default: every position)");
  app.add_option("--compress-ratio", compress_ratio,
                 "DeepSeek-V4: also write compressed entries (window means of kv; M = 4 overlaps "
                 "windows of 8) and sinks; k_index then holds the entries' keys");
  app.add_option("--dtype", dtype, "Dtype of the floating-point tensors: f32 or bf16")
      ->check(CLI::IsMember({"f32", "bf16"}))
      ->capture_default_str();
  app.add_option("--only", only,
                 "Write only these tensors, by name (e.g. hidden,q,kv); default: every one")
      ->delimiter(',');
  dsa::app::add_common_options(app, common);

  return dsa::app::run(app, argc, argv, common, [&] {
    dsa::Stopwatch total;
    dsa::app::check_safetensors_output(common.output, "it holds every tensor");
    dsa::WorkloadConfig config = dsa::workload_preset(preset);
    override_with(config.length, length);
    override_with(config.heads, heads);
    override_with(config.d_qk, d_qk);
    override_with(config.d_v, d_v);
    override_with(config.indexer_heads, indexer_heads);
    override_with(config.indexer_dim, indexer_dim);
    override_with(config.sinks, sinks);
    override_with(config.sink_logit, sink_logit);
    override_with(config.window, window);
    override_with(config.local_logit, local_logit);
    override_with(config.needles, needles);
    override_with(config.needle_logit, needle_logit);
    override_with(config.needle_min_distance, needle_distance);
    override_with(config.noise, noise);
    override_with(config.rank, rank);
    override_with(config.indexer_noise, indexer_noise);
    override_with(config.seed, seed);
    override_with(config.hidden, hidden);
    override_with(config.queries, queries);
    override_with(config.compress_ratio, compress_ratio);
    std::string scale_rule = preset == "v32" ? "deepseek-v3.2" : "d_qk^-0.5";
    if (scale) {
      const dsa::SoftmaxScale s = dsa::resolve_softmax_scale(*scale, config.d_qk);
      scale_rule = s.rule;
      config.scale = s.rule == "deepseek-v3.2" ? dsa::deepseek_v32_softmax_scale()
                     : s.rule == "given"       ? s.value
                                               : 0.0;
    }
    config = dsa::resolve_workload_config(config);

    dsa::StageTimes times;
    dsa::Stopwatch generate;
    dsa::GeneratedWorkload w = dsa::generate_workload(config);
    if (config.hidden > 0 && dtype == "bf16") dsa::narrow_hidden_workload(w, dsa::DType::bf16);
    times.add("generate", generate.seconds());
    std::vector<dsa::Tensor> tensors = {w.q, w.kv, w.q_index, w.k_index, w.weights, w.needles};
    if (config.compress_ratio > 0) {
      tensors.push_back(w.compressed);
      tensors.push_back(w.sink);
    }
    if (config.hidden > 0) {
      tensors.push_back(w.hidden);
      for (dsa::Tensor& t : dsa::indexer_weight_tensors(w.indexer)) tensors.push_back(t);
    }
    if (!only.empty()) {
      std::vector<std::string> names;
      for (const dsa::Tensor& t : tensors) names.push_back(t.name);
      for (const std::string& name : only) {
        if (std::find(names.begin(), names.end(), name) == names.end()) {
          dsa::bad_usage("--only: this workload has no tensor '{}' (it has: {})", name,
                         fmt::join(names, ", "));
        }
      }
      std::erase_if(tensors, [&](const dsa::Tensor& t) {
        return std::find(only.begin(), only.end(), t.name) == only.end();
      });
    }
    w = {};  // each f32 tensor now lives only in `tensors`: its bf16 copy frees it
    if (dtype == "bf16") {
      dsa::Stopwatch convert;
      for (dsa::Tensor& t : tensors) {
        if (t.dtype == dsa::DType::f32) t = dsa::to_bf16(t);  // the needles stay i32
      }
      times.add("convert", convert.seconds());
    }
    dsa::Stopwatch write;
    dsa::write_safetensors(common.output, tensors);
    times.add("write", write.seconds());

    nlohmann::json report = dsa::report_header("dsa-gen", argc, argv);
    report["schema"] = dsa::kGenSchema;
    report["preset"] = preset;
    report["config"] = config_json(config);
    report["config"]["scale_rule"] = scale_rule;
    report["inputs"] = nlohmann::json::array();
    report["outputs"] = nlohmann::json::array();
    for (const dsa::Tensor& t : tensors) {
      report["outputs"].push_back({{"name", common.output + ":" + t.name},
                                   {"shape", t.shape},
                                   {"dtype", dsa::dtype_name(t.dtype)}});
    }
    dsa::app::finish_report(report, times, total.seconds(), common,
                            fmt::format("preset {}, L = {}", preset, config.length));
  });
}
