// dsa-compress and dsa-attend --attention (DeepSeek-V4) on the command line: they compute what
// the library does, read a checkpoint's names, and fail cleanly.
#include <gtest/gtest.h>

#include "cli.hpp"
#include "dsa/compressed_attention.hpp"
#include "dsa/compressor.hpp"
#include "dsa/io.hpp"
#include "dsa/kv_cache.hpp"

using namespace dsa;
using namespace dsa::test;

namespace {

class V4Cli : public Cli {
 protected:
  void SetUp() override {
    Cli::SetUp();
    std::mt19937_64 rng(14);
    // A CSA layer's compressor (d 128 so that its e4m3 blocks fit: 64 non-RoPE dims) and an
    // HCA one, under checkpoint names.
    std::vector<Tensor> layer = {
        random_tensor({256, D}, rng, 0.3f, "layers.2.attn.compressor.wkv.weight"),
        random_tensor({256, D}, rng, 0.3f, "layers.2.attn.compressor.wgate.weight"),
        random_tensor({4, 256}, rng, 1.0f, "layers.2.attn.compressor.ape"),
        random_tensor({128}, rng, 0.1f, "layers.2.attn.compressor.norm.weight"),
        random_tensor({128, D}, rng, 0.3f, "layers.3.attn.compressor.wkv.weight"),
        random_tensor({128, D}, rng, 0.3f, "layers.3.attn.compressor.wgate.weight"),
        random_tensor({128, 128}, rng, 1.0f, "layers.3.attn.compressor.ape"),
        random_tensor({128}, rng, 0.1f, "layers.3.attn.compressor.norm.weight"),
        random_tensor({H}, rng, 1.0f, "layers.3.attn.attn_sink")};
    write_safetensors(path("model.safetensors"), layer);
    write("x.npy", random_tensor({T, D}, rng, 1.0f));
    write("q4.npy", random_tensor({Lq, H, 128}, rng, 0.3f));
    write("kv4.npy", random_tensor({T, 128}, rng, 1.0f));
  }
  static constexpr int64_t T = 300, D = 32, H = 4, Lq = 40;
};

}  // namespace

TEST_F(V4Cli, CompressThenAttendAsTheLibraryDoes) {
  for (const char* precision : {"f32", "released"}) {
    SCOPED_TRACE(precision);
    const Outcome c = run(std::string("dsa-compress --x x.npy --weights model.safetensors --prefix "
                                      "layers.3.attn.compressor --ratio 128 --precision ") +
                          precision + " -o c.npy --report c.json");
    ASSERT_EQ(c.code, 0) << c.err;
    const Tensor got = read_tensor(path("c.npy"));
    ASSERT_EQ(got.shape, (Shape{T / 128, 128}));
    // The library on the same tensors.
    const Tensor x = read_tensor(path("x.npy"));
    const std::string file = path("model.safetensors") + ":layers.3.attn.compressor.";
    const Tensor wkv = read_tensor(file + "wkv.weight"), wgate = read_tensor(file + "wgate.weight"),
                 ape = read_tensor(file + "ape"), norm = read_tensor(file + "norm.weight");
    CompressorConfig config;
    config.ratio = 128;
    config.numerics = parse_v4_numerics(precision);
    config.rope = deepseek_v4_rope(128);
    const CompressorInputs in = make_compressor_inputs(x, {&wkv, &wgate, &ape, &norm}, config);
    std::vector<float> want;
    compress(
        in, config,
        [&](const CompressedBlock& b) {
          want.insert(want.end(), b.values, b.values + b.entries * b.dim);
        },
        nullptr);
    ASSERT_EQ(std::vector<float>(f32(got), f32(got) + got.numel()), want);
    const auto report = nlohmann::json::parse(slurp(path("c.json")));
    EXPECT_EQ(report["compressor"]["entries"], T / 128);
    EXPECT_EQ(report["compressor"]["precision"], precision);
  }
  // HCA attention over them with the checkpoint's sink.
  const Outcome a =
      run("dsa-attend --attention hca --q q4.npy --kv kv4.npy --compressed c.npy "
          "--sink model.safetensors:layers.3.attn.attn_sink -o o.npy --lse l.npy "
          "--report a.json");
  ASSERT_EQ(a.code, 0) << a.err;
  const Tensor q = read_tensor(path("q4.npy")), kv = read_tensor(path("kv4.npy"));
  const Tensor c = read_tensor(path("c.npy"));
  const Tensor sink = read_tensor(path("model.safetensors") + ":layers.3.attn.attn_sink");
  const CompressedAttentionInputs in =
      make_compressed_attention_inputs(q, kv, &c, &sink, V4Attention::hca, 128);
  std::vector<float> out, lse;
  compressed_attention(
      in, nullptr, 1.0f / std::sqrt(128.0f),
      [&](const AttentionBlock& b) {
        out.insert(out.end(), b.out, b.out + b.rows * b.heads * b.d_v);
        lse.insert(lse.end(), b.lse, b.lse + b.rows * b.heads);
      },
      nullptr);
  const Tensor o = read_tensor(path("o.npy")), l = read_tensor(path("l.npy"));
  EXPECT_EQ(o.shape, (Shape{Lq, H, 128}));
  EXPECT_EQ(std::vector<float>(f32(o), f32(o) + o.numel()), out);
  EXPECT_EQ(std::vector<float>(f32(l), f32(l) + l.numel()), lse);
  const auto report = nlohmann::json::parse(slurp(path("a.json")));
  EXPECT_EQ(report["mode"], "hca");
  EXPECT_EQ(report["compress_ratio"], 128);
  EXPECT_EQ(report["sink"], true);
  EXPECT_EQ(report["scale_rule"], "d_qk^-0.5");
  // The gathered cache's own stage; "gather" is an MPI job's (rank 0 receiving the others' rows).
  EXPECT_GE(report["timings_ms"]["cache"].get<double>(), 0.0);
  EXPECT_FALSE(report["timings_ms"].contains("gather"));
}

TEST_F(V4Cli, CsaTakesASelectionOfVisibleEntries) {
  ASSERT_EQ(run("dsa-compress --x x.npy --weights model.safetensors --prefix "
                "layers.2.attn.compressor -o c4.npy -q")
                .code,
            0);
  // Row r (t = 260 + r) selects entries 0 and 64 + r / 4 (visible: j < (t + 1) / 4).
  Tensor sel = make_tensor(DType::i64, {Lq, 2}, "sel");
  for (int64_t r = 0; r < Lq; ++r) {
    mutable_data<int64_t>(sel)[2 * r] = 0;
    mutable_data<int64_t>(sel)[2 * r + 1] = 64 + r / 4;
  }
  write("sel.npy", sel);
  const Outcome ok =
      run("dsa-attend --attention csa --q q4.npy --kv kv4.npy --compressed c4.npy "
          "--indices sel.npy -o o.npy -q");
  ASSERT_EQ(ok.code, 0) << ok.err;
  mutable_data<int64_t>(sel)[1] = 66;  // row 0 (t = 260) sees entries < 65
  write("bad.npy", sel);
  const Outcome bad =
      run("dsa-attend --attention csa --q q4.npy --kv kv4.npy --compressed c4.npy "
          "--indices bad.npy -o out.npy -q");
  EXPECT_EQ(bad.code, 3);
  EXPECT_NE(bad.err.find("bad.npy: row 0 (query position 260) selects entry 66"), std::string::npos)
      << bad.err;
  const Outcome none =
      run("dsa-attend --attention csa --q q4.npy --kv kv4.npy --compressed c4.npy "
          "-o out.npy");
  EXPECT_EQ(none.code, 2);
  EXPECT_NE(none.err.find("--indices"), std::string::npos) << none.err;
  // Compressed entries of the wrong length name the file.
  const Outcome shape =
      run("dsa-attend --attention hca --q q4.npy --kv kv4.npy --compressed "
          "c4.npy -o out.npy");
  EXPECT_EQ(shape.code, 3);
  EXPECT_NE(shape.err.find("c4.npy (compressed): expected shape [2, 128]"), std::string::npos)
      << shape.err;
  const Outcome missing =
      run("dsa-compress --x x.npy --weights model.safetensors --prefix "
          "layers.9.attn.compressor -o out.npy");
  EXPECT_EQ(missing.code, 3) << missing.err;
  EXPECT_NE(missing.err.find("layers.9.attn.compressor.wkv.weight"), std::string::npos)
      << missing.err;
  const Outcome no_weights = run("dsa-compress --x x.npy -o out.npy");
  EXPECT_EQ(no_weights.code, 2);
  EXPECT_NE(no_weights.err.find("--weights and --prefix"), std::string::npos) << no_weights.err;
  const Outcome wrong_x =
      run("dsa-compress --x q4.npy --weights model.safetensors --prefix "
          "layers.2.attn.compressor -o out.npy");
  EXPECT_EQ(wrong_x.code, 3);
  EXPECT_NE(wrong_x.err.find("(wkv): expected shape [256, 128]"), std::string::npos) << wrong_x.err;
  expect_only({"qa.npy", "kv.npy", "q.npy", "k.npy", "w.npy", "model.safetensors", "x.npy",
               "q4.npy", "kv4.npy", "c4.npy", "sel.npy", "bad.npy", "o.npy"});
}

TEST_F(V4Cli, CompareReportsWhatCompressionLoses) {
  ASSERT_EQ(run("dsa-compress --x x.npy --weights model.safetensors --prefix "
                "layers.3.attn.compressor --ratio 128 -o c.npy -q")
                .code,
            0);
  const Outcome r =
      run("dsa-compare --attention hca --reference dense --q q4.npy --kv kv4.npy "
          "--compressed c.npy --sink model.safetensors:layers.3.attn.attn_sink");
  ASSERT_EQ(r.code, 0) << r.err;
  const auto report = nlohmann::json::parse(r.out);
  EXPECT_EQ(report["layout"], "v4");
  EXPECT_EQ(report["reference"], "dense");
  EXPECT_EQ(report["selection"], "every-entry");
  ASSERT_EQ(report["results"].size(), 1u);
  EXPECT_EQ(report["results"][0]["topk"], T / 128);
  EXPECT_GT(report["results"][0]["out_rel_err"]["exact"]["mean"].get<double>(),
            0.0);  // k = every entry
  // HCA is the every-entry reference itself: a usage error naming the way out.
  const Outcome same =
      run("dsa-compare --attention hca --q q4.npy --kv kv4.npy --compressed c.npy");
  EXPECT_EQ(same.code, 2);
  EXPECT_NE(same.err.find("dense reference"), std::string::npos) << same.err;
}

TEST_F(V4Cli, GeneratedWorkloadGoesThroughCompare) {
  const Outcome gen =
      run("dsa-gen --preset v4-flash --length 2048 --queries 16 --heads 4 --dqk 128 "
          "--dv 128 --indexer-heads 8 --indexer-dim 32 -o w.safetensors -q");
  ASSERT_EQ(gen.code, 0) << gen.err;
  const Tensor c = read_tensor(path("w.safetensors") + ":compressed");
  EXPECT_EQ(c.shape, (Shape{512, 128}));
  const std::string w = "w.safetensors:";
  const Outcome r =
      run("dsa-compare --attention csa --q " + w + "q --kv " + w + "kv --compressed " + w +
          "compressed --sink " + w + "sink --q-index " + w + "q_index --k-index " + w +
          "k_index --weights " + w + "weights --needles " + w + "needles --sweep-topk 16,64");
  ASSERT_EQ(r.code, 0) << r.err;
  const auto report = nlohmann::json::parse(r.out);
  ASSERT_EQ(report["results"].size(), 2u);
  EXPECT_EQ(report["results"][1]["topk"], 64);
  EXPECT_GT(report["results"][1]["needle_recall"]["needles"].get<int>(), 0);
  const double m16 = report["results"][0]["mass_recall"]["sparse"]["mean"];
  const double m64 = report["results"][1]["mass_recall"]["sparse"]["mean"];
  EXPECT_GT(m64, m16);  // a larger selection keeps more of the reference's mass
  EXPECT_LE(m64, 1.0 + 1e-6);
}

// --kv-cache fp8 with --attention: both caches quantized into V4's fp8 format (584-byte rows);
// the same as the library over them, and as dsa-attend over the caches given as u8 files; a kv
// cache beside floating entries is refused naming the file; dsa-compare measures the caches'
// loss against the values.
TEST_F(V4Cli, Fp8CacheOfTheWindowAndTheEntries) {
  std::mt19937_64 rng(15);
  const int64_t T8 = 200, Lq8 = 20, H8 = 2;
  const Tensor q = random_tensor({Lq8, H8, kV4CacheDim}, rng, 0.05f, "q");
  const Tensor kv = random_tensor({T8, kV4CacheDim}, rng, 1.0f, "kv");
  const Tensor c = random_tensor({T8 / 4, kV4CacheDim}, rng, 1.0f, "c");
  write("q8.npy", q);
  write("kv8.npy", kv);
  write("c8.npy", c);
  Tensor sel = make_tensor(DType::i64, {Lq8, 3}, "sel");
  for (int64_t r = 0; r < Lq8; ++r) {
    int64_t* row = mutable_data<int64_t>(sel) + 3 * r;
    row[0] = 0, row[1] = 10 + r, row[2] = -1;
  }
  write("sel8.npy", sel);
  const std::string args = "dsa-attend --attention csa --q q8.npy --indices sel8.npy ";
  Outcome r =
      run(args + "--kv kv8.npy --compressed c8.npy --kv-cache fp8 -o o.npy --report a.json");
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(nlohmann::json::parse(slurp(path("a.json")))["kv_cache"], "fp8");
  const CompressedAttentionInputs in =
      make_compressed_attention_inputs(q, kv, &c, nullptr, V4Attention::csa, 128);
  const auto fp8 = fp8_v4_cache_attention(in);
  std::vector<float> want;
  compressed_attention(
      fp8->inputs, &sel, 1.0f / std::sqrt(512.0f),
      [&](const AttentionBlock& b) {
        want.insert(want.end(), b.out, b.out + b.rows * b.heads * b.d_v);
      },
      nullptr);
  const Tensor o = read_tensor(path("o.npy"));
  EXPECT_EQ(std::vector<float>(f32(o), f32(o) + o.numel()), want);
  write("kv8.fp8.npy", fp8->kv);
  write("c8.fp8.npy", fp8->compressed);
  r = run(args + "--kv kv8.fp8.npy --compressed c8.fp8.npy -o o2.npy -q");
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(slurp(path("o.npy")), slurp(path("o2.npy")));
  r = run(args + "--kv kv8.npy --compressed c8.npy -o o3.npy -q");  // bf16: other values
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_NE(slurp(path("o.npy")), slurp(path("o3.npy")));

  r = run(args + "--kv kv8.fp8.npy --compressed c8.npy -o refused.npy");
  EXPECT_EQ(r.code, 3);
  EXPECT_NE(r.err.find("c8.npy (compressed): expected the V4 fp8 cache"), std::string::npos)
      << r.err;
  // dsa-compare measures the caches: their output against the dense reference, and the loss
  // against the same selection over the values (kv_cache_loss). Given as u8 caches already,
  // there are no values to measure against.
  const std::string compare =
      "dsa-compare --attention csa --reference dense --q q8.npy --indices sel8.npy ";
  r = run(compare + "--kv kv8.npy --compressed c8.npy --kv-cache fp8 -o cmp.json");
  ASSERT_EQ(r.code, 0) << r.err;
  const auto report = nlohmann::json::parse(slurp(path("cmp.json")));
  EXPECT_EQ(report["kv_cache"], "fp8");
  const double loss = report["results"][0]["kv_cache_loss"]["out_rel_err_global"];
  EXPECT_GT(loss, 1e-3);
  EXPECT_LT(loss, 0.1);
  r = run(compare + "--kv kv8.npy --compressed c8.npy -o cmp16.json");
  ASSERT_EQ(r.code, 0) << r.err;
  const auto values = nlohmann::json::parse(slurp(path("cmp16.json")));
  EXPECT_EQ(values["kv_cache"], "f32");
  EXPECT_FALSE(values["results"][0].contains("kv_cache_loss"));
  EXPECT_NE(values["results"][0]["out_rel_err"], report["results"][0]["out_rel_err"]);
  r = run(compare + "--kv kv8.fp8.npy --compressed c8.fp8.npy --kv-cache fp8 -o refused.json");
  EXPECT_EQ(r.code, 2);
  EXPECT_NE(r.err.find("give --kv and --compressed as floating values"), std::string::npos)
      << r.err;
  EXPECT_FALSE(fs::exists(path("refused.npy")));
  EXPECT_FALSE(fs::exists(path("refused.json")));
}
