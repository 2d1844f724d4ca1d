// dsa-compress: DeepSeek-V4's KV compressor, the attention input x to compressed entries.
#include "common.hpp"
#include "dsa/compressor.hpp"
#include "dsa/device.hpp"
#include "dsa/error.hpp"
#include "dsa/io.hpp"

int main(int argc, char** argv) {
  CLI::App app(
      "DeepSeek-V4's compressor: every --ratio tokens of x [B?, T, D] pooled into one entry "
      "(per-channel gated softmax; ratio 4 overlaps windows of 8), RMSNorm, RoPE at the window's "
      "first token and the cache's quantization: f32 [B?, floor(T / ratio), d].",
      "dsa-compress");
  dsa::app::CommonOptions common;
  std::string x_path, weights_path, prefix, wkv, wgate, ape, norm, precision = "released";
  int64_t ratio = 4, rope_dims = 64;
  bool indexer = false;
  app.add_option("--x", x_path, "Attention input x [B?, T, D] (attn_norm's output)")->required();
  auto* weights = app.add_option("--weights", weights_path,
                                 "A .safetensors file (a checkpoint) holding the compressor under "
                                 "--prefix: PREFIX.wkv.weight, .wgate.weight, .ape, .norm.weight");
  app.add_option("--prefix", prefix,
                 "The compressor's name in --weights, e.g. layers.2.attn.compressor or "
                 "layers.2.attn.indexer.compressor")
      ->needs(weights);
  std::vector<CLI::Option*> single;
  single.push_back(app.add_option("--wkv", wkv, "wkv [c d, D] (c = 2 for ratio 4, else 1)"));
  single.push_back(app.add_option("--wgate", wgate, "wgate [c d, D]"));
  single.push_back(app.add_option("--ape", ape, "ape [ratio, c d]: the gate's per-slot bias"));
  single.push_back(app.add_option("--norm", norm, "RMSNorm weight [d]"));
  for (auto* option : single) option->excludes(weights);
  app.add_option("--ratio", ratio, "Tokens per entry: 4 (CSA, overlapping) or 128 (HCA)")
      ->check(dsa::app::integer_at_least(1))
      ->capture_default_str();
  app.add_flag("--indexer", indexer,
               "The indexer's compressor: its keys are rotated (Hadamard) and go through e2m1");
  app.add_option("--precision", precision,
                 "f32 (no rounding), bf16 (the released code's bf16 steps) or released (bf16 and "
                 "the cache's e4m3 / e2m1 quantization)")
      ->check(CLI::IsMember({"f32", "bf16", "released"}))
      ->capture_default_str();
  app.add_option("--rope-dims", rope_dims, "RoPE over the last N dims of an entry")
      ->check(dsa::app::integer_at_least(2))
      ->capture_default_str();
  std::string device_name = "cpu";
  dsa::app::add_device_option(app, device_name);
  dsa::app::add_common_options(app, common);

  return dsa::app::run(app, argc, argv, common, [&] {
    dsa::Stopwatch total;
    std::string names[4] = {wkv, wgate, ape, norm};
    if (!weights_path.empty()) {
      if (prefix.empty()) dsa::bad_usage("--weights needs --prefix (the compressor's name)");
      const std::string p = prefix.back() == '.' ? prefix : prefix + ".";
      const char* suffix[4] = {"wkv.weight", "wgate.weight", "ape", "norm.weight"};
      for (int i = 0; i < 4; ++i) names[i] = weights_path + ":" + p + suffix[i];
    } else {
      for (const std::string& name : names) {
        if (name.empty())
          dsa::bad_usage(
              "give --weights and --prefix, or --wkv, --wgate, --ape "
              "and --norm");
      }
    }
    dsa::app::check_single_stdin({x_path, names[0], names[1], names[2], names[3]});
    dsa::app::check_binary_output(common.output);
    dsa::app::check_single_stdout({common.output, common.report});

    dsa::CompressorConfig config;
    config.ratio = ratio;
    config.indexer = indexer;
    config.numerics = dsa::parse_v4_numerics(precision);
    config.rope = dsa::deepseek_v4_rope(ratio);
    config.rope.dims = rope_dims;
    std::vector<dsa::Tensor> read;
    read.reserve(5);
    read.push_back(dsa::read_tensor(x_path));
    for (const std::string& name : names) read.push_back(dsa::read_tensor(name));
    const dsa::CompressorWeights w{&read[1], &read[2], &read[3], &read[4]};
    const dsa::CompressorInputs inputs = dsa::make_compressor_inputs(read[0], w, config);

    const dsa::DeviceChoice choice = dsa::naming(
        "--device", [&] { return dsa::choose_device(device_name, inputs, config); });
    const dsa::Shape shape = dsa::compressed_shape(inputs);
    dsa::StageTimes times;
    dsa::TensorWriter writer(common.output, dsa::DType::f32, shape);
    dsa::compress(
        inputs, config,
        [&](const dsa::CompressedBlock& block) {
          dsa::Stopwatch write;
          writer.write(block.values,
                       static_cast<std::size_t>(block.entries * block.dim) * sizeof(float));
          times.add("write", write.seconds());
        },
        &times, choice.device);
    writer.commit();

    nlohmann::json report = dsa::report_header("dsa-compress", argc, argv);
    report["schema"] = dsa::kCompressSchema;
    for (const dsa::Tensor& t : read) report["inputs"].push_back(dsa::tensor_json(t));
    dsa::report_device(report, choice);
    report["compressor"] = {{"compress_ratio", ratio},
                            {"overlap", inputs.overlap},
                            {"indexer", indexer},
                            {"precision", precision},
                            {"rope_dims", config.rope.dims},
                            {"rope_theta", config.rope.theta},
                            {"yarn_factor", config.rope.yarn_factor},
                            {"tokens", inputs.tokens},
                            {"entries", inputs.entries}};
    report["outputs"] = {{{"name", common.output}, {"shape", shape}, {"dtype", "f32"}}};
    dsa::app::finish_report(
        report, times, total.seconds(), common,
        fmt::format("{} tokens into {} entries of {} on {}", inputs.tokens, inputs.entries, ratio,
                    dsa::device_name(choice.device)));
  });
}
