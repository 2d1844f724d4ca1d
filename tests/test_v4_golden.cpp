// The library against transformers' DeepSeek-V4 (tests/golden/make_v4_golden.py: a random-weight
// model with a window-only, a CSA and an HCA layer, fp32): the compressors' entries and each
// layer's attention output and log-sum-exp over transformers' own selection. transformers has
// none of the released quantization, so this holds the f32 numerics (docs/DESIGN.md section 6).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <set>
#include <string>

#include "dsa/compressed_attention.hpp"
#include "dsa/compressor.hpp"
#include "dsa/indexer.hpp"
#include "dsa/io.hpp"
#include "dsa/topk.hpp"
#include "reference.hpp"

using namespace dsa;

namespace {

const std::string kGolden = std::string(DSA_TESTS_DIR) + "/data/deepseek_v4_golden.safetensors";
constexpr int64_t kTokens = 260, kWindow = 128;

Tensor golden(const std::string& name) {
  return read_tensor(kGolden + ":" + name);
}

void expect_close(const float* got, const Tensor& want, double tolerance, const std::string& what) {
  const float* w = test::f32(want);
  double worst = 0;
  for (int64_t i = 0; i < want.numel(); ++i) {
    worst = std::max(worst, std::fabs(double(got[i]) - w[i]) / (1 + std::fabs(w[i])));
  }
  EXPECT_LT(worst, tolerance) << what;
  std::printf("%s: largest |got - want| / (1 + |want|) = %.2e\n", what.c_str(), worst);
}

}  // namespace

TEST(V4Golden, CompressorsMatchTransformers) {
  for (const auto& [name, ratio] : {std::pair<std::string, int64_t>{"csa", 4}, {"hca", 128}}) {
    SCOPED_TRACE(name);
    const Tensor x = golden(name + ".x"), wkv = golden(name + ".compressor.wkv"),
                 wgate = golden(name + ".compressor.wgate"), ape = golden(name + ".compressor.ape"),
                 norm = golden(name + ".compressor.norm"), want = golden(name + ".compressed");
    CompressorConfig config;
    config.ratio = ratio;
    config.numerics = V4Numerics::f32;
    config.rope = deepseek_v4_rope(ratio);
    const CompressorInputs in = make_compressor_inputs(x, {&wkv, &wgate, &ape, &norm}, config);
    ASSERT_EQ(compressed_shape(in), want.shape);
    std::vector<float> got;
    compress(
        in, config,
        [&](const CompressedBlock& b) {
          got.insert(got.end(), b.values, b.values + b.entries * b.dim);
        },
        nullptr);
    expect_close(got.data(), want, 5e-6, name + " entries");
  }
}

TEST(V4Golden, AttentionMatchesTransformers) {
  for (const std::string name : {"swa", "csa", "hca"}) {
    SCOPED_TRACE(name);
    const Tensor q = golden(name + ".q"), tail = golden(name + ".kv_tail");
    const Tensor sink = golden(name + ".sink"), want = golden(name + ".out"),
                 want_lse = golden(name + ".lse");
    // The raw tokens before the kept rows' windows are never attended: zeros stand for them.
    const int64_t d = q.dim(2);
    Tensor kv = make_tensor(DType::f32, {kTokens, d}, "kv");
    std::memcpy(mutable_data<float>(kv) + (kTokens - tail.dim(0)) * d, tail.data, tail.nbytes());
    const V4Attention kind = parse_v4_attention(name);
    Tensor compressed;
    if (kind != V4Attention::swa) compressed = golden(name + ".compressed");
    const CompressedAttentionInputs in = make_compressed_attention_inputs(
        q, kv, kind == V4Attention::swa ? nullptr : &compressed, &sink, kind, kWindow);
    Tensor topk;
    if (kind == V4Attention::csa) topk = golden("csa.topk");
    std::vector<float> out, lse;
    compressed_attention(
        in, kind == V4Attention::csa ? &topk : nullptr, 1.0f / std::sqrt(static_cast<float>(d)),
        [&](const AttentionBlock& b) {
          out.insert(out.end(), b.out, b.out + b.rows * b.heads * b.d_v);
          lse.insert(lse.end(), b.lse, b.lse + b.rows * b.heads);
        },
        nullptr);
    ASSERT_EQ(static_cast<int64_t>(out.size()), want.numel());
    expect_close(out.data(), want, 5e-6, name + " output");
    expect_close(lse.data(), want_lse, 5e-6, name + " lse");
  }
}

// The CSA layer's selection: the indexer's compressor (f32: transformers has no Hadamard or
// e2m1) and the indexer over its entries pick what transformers picked, row by row (as sets:
// torch.topk's order among the k is not the toolkit's concern; fp32 scores have no ties here).
TEST(V4Golden, CsaSelectionMatchesTransformers) {
  const Tensor x = golden("csa.x"), wkv = golden("csa.indexer.compressor.wkv"),
               wgate = golden("csa.indexer.compressor.wgate"),
               ape = golden("csa.indexer.compressor.ape"),
               norm = golden("csa.indexer.compressor.norm");
  CompressorConfig config;
  config.ratio = 4;
  config.indexer = true;
  config.numerics = V4Numerics::f32;
  config.rope = deepseek_v4_rope(4);
  const CompressorInputs cin = make_compressor_inputs(x, {&wkv, &wgate, &ape, &norm}, config);
  Tensor keys = make_tensor(DType::f32, compressed_shape(cin), "indexer keys");
  compress(
      cin, config,
      [&](const CompressedBlock& b) {
        std::memcpy(mutable_data<float>(keys) + b.entry_begin * b.dim, b.values,
                    static_cast<std::size_t>(b.entries * b.dim) * sizeof(float));
      },
      nullptr);
  const Tensor q = golden("csa.indexer.q"), w = golden("csa.indexer.weights");
  const Tensor want = golden("csa.topk");
  const IndexerInputs in = make_compressed_indexer_inputs(q, keys, w, {}, 4, kTokens);
  const int64_t k = want.dim(1);
  std::vector<int32_t> got;
  select_from_indexer(
      in, {}, k,
      [&](const SelectionBlock& b) { got.insert(got.end(), b.indices, b.indices + b.rows * b.k); },
      nullptr);
  ASSERT_EQ(static_cast<int64_t>(got.size()), want.numel());
  const int32_t* expected = reinterpret_cast<const int32_t*>(want.data);
  for (int64_t r = 0; r < want.dim(0); ++r) {
    std::set<int32_t> a(got.begin() + r * k, got.begin() + (r + 1) * k);
    std::set<int32_t> b(expected + r * k, expected + (r + 1) * k);
    EXPECT_EQ(a, b) << "row " << r;
  }
}
