// Writes the seed corpus of the fuzz targets: small valid files of every kind each reader
// accepts, one directory per target under DIR (npy/, safetensors/, jsonl/, config/).
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "dsa/cost.hpp"
#include "dsa/io.hpp"

namespace fs = std::filesystem;

namespace {

dsa::Tensor counting(dsa::DType dtype, dsa::Shape shape, std::string name) {
  dsa::Tensor t = dsa::make_tensor(dtype, std::move(shape), std::move(name));
  auto* bytes = dsa::mutable_data<uint8_t>(t);
  for (std::size_t i = 0; i < t.nbytes(); ++i) bytes[i] = static_cast<uint8_t>(i * 37 + 11);
  return t;
}

void write_text(const fs::path& path, const std::string& text) {
  std::ofstream(path, std::ios::binary) << text;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: make_seeds DIR\n");
    return 2;
  }
  const fs::path dir = argv[1];
  for (const char* sub : {"npy", "safetensors", "jsonl", "config"})
    fs::create_directories(dir / sub);

  const std::vector<std::pair<dsa::DType, dsa::Shape>> npy_tensors = {
      {dsa::DType::f32, {2, 3}}, {dsa::DType::f64, {3}},         {dsa::DType::f16, {2, 1, 2}},
      {dsa::DType::bf16, {4}},   {dsa::DType::i32, {2, 2}},      {dsa::DType::i64, {0, 5}},
      {dsa::DType::u8, {}},      {dsa::DType::f32, {1, 2, 2, 2}}};
  int n = 0;
  for (const auto& [dtype, shape] : npy_tensors) {
    dsa::write_tensor((dir / "npy" / fmt::format("{}.npy", n++)).string(),
                      counting(dtype, shape, "x"));
  }
  n = 0;
  for (const auto& [dtype, shape] : npy_tensors) {
    dsa::write_safetensors((dir / "safetensors" / fmt::format("{}.safetensors", n++)).string(),
                           {counting(dtype, shape, "x")});
  }
  dsa::write_safetensors((dir / "safetensors" / "f8.safetensors").string(),
                         {counting(dsa::DType::f8_e4m3, {2, 4}, "x")});
  dsa::write_safetensors((dir / "safetensors" / "two.safetensors").string(),
                         {counting(dsa::DType::f32, {2, 2}, "x"),
                          counting(dsa::DType::i32, {3}, "y"), counting(dsa::DType::u8, {0}, "z")});

  const int32_t indices[] = {3, 0, 2, -1};
  const float scores[] = {1.5f, 0.25f, -1.0f, 0.0f};
  std::string plain, batched;
  for (int64_t t = 0; t < 3; ++t)
    plain += dsa::jsonl_selection_line(0, false, t, indices, scores, 4);
  for (int64_t b = 0; b < 2; ++b)
    for (int64_t t = 4; t < 6; ++t)
      batched += dsa::jsonl_selection_line(b, true, t, indices + b, scores, 3 - b);
  write_text(dir / "jsonl" / "plain.jsonl", plain);
  write_text(dir / "jsonl" / "batched.jsonl", batched);
  write_text(dir / "jsonl" / "blank.jsonl",
             "{\"t\":0,\"indices\":[]}\n\n{\"t\":1,\"indices\":[0]}\n");

  const fs::path shipped = DSA_SHIPPED_PRESETS;
  fs::copy_file(shipped / "hardware.json", dir / "config" / "hardware.json",
                fs::copy_options::overwrite_existing);
  fs::copy_file(shipped / "models.json", dir / "config" / "models.json",
                fs::copy_options::overwrite_existing);
  const dsa::PresetLibrary presets{shipped};
  write_text(dir / "config" / "hardware-full.json",
             dsa::hardware_json(dsa::load_hardware(presets, "H800")).dump(1));
  write_text(dir / "config" / "model-full.json",
             dsa::model_json(dsa::load_model(presets, "DeepSeek-V3.2-Exp")).dump(1));
  write_text(dir / "config" / "hardware-base.json",
             R"({"base": "H100", "price_per_gpu_hour": 1.75, "memory_efficiency": 0.8})");
  write_text(dir / "config" / "model-base.json", R"({"base": "DeepSeek-V3.2-Exp", "topk": 1024})");
  write_text(dir / "config" / "value.json", "2.5");
  return 0;
}
