// DeepSeek-V4's compressor (compressor.hpp; docs/DESIGN.md section 6): the released
// Compressor.forward of a prefill, step for step, in blocks of entries.
#include "dsa/compressor.hpp"

#include <Eigen/Dense>
#include <algorithm>
#include <cmath>
#include <vector>

#include "backend.hpp"
#include "checks.hpp"
#include "chunks.hpp"
#include "dsa/error.hpp"
#include "dsa/precision.hpp"
#include "progress.hpp"

namespace dsa {

namespace {

using RowMatrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

constexpr int64_t kEntryBlock = 32;  // entries pooled together (one projection GEMM)
constexpr int64_t kFp8Block = 64;    // the main cache's e4m3 blocks
constexpr int64_t kFp4Block = 32;    // the indexer cache's e2m1 blocks

void require_shape(const Tensor& t, const char* role, const Shape& expected) {
  detail::require_floating(t, role);
  if (t.shape != expected) {
    bad_input("{} ({}): expected shape {}, got {}", t.name, role, shape_string(expected),
              shape_string(t.shape));
  }
}

RowMatrix matrix_of(const Tensor& t, int64_t rows, int64_t cols) {
  RowMatrix m(rows, cols);
  to_f32(t, 0, rows * cols, m.data());
  return m;
}

}  // namespace

V4Numerics parse_v4_numerics(const std::string& text) {
  if (text == "f32") return V4Numerics::f32;
  if (text == "bf16") return V4Numerics::bf16;
  if (text == "released") return V4Numerics::released;
  bad_usage("numerics: expected f32, bf16 or released, got '{}'", text);
}

std::string v4_numerics_name(V4Numerics numerics) {
  switch (numerics) {
    case V4Numerics::f32:
      return "f32";
    case V4Numerics::bf16:
      return "bf16";
    case V4Numerics::released:
      break;
  }
  return "released";
}

CompressorInputs make_compressor_inputs(const Tensor& x, const CompressorWeights& w,
                                        const CompressorConfig& config) {
  if (config.ratio < 1) bad_usage("compress ratio must be at least 1, got {}", config.ratio);
  if (!w.wkv || !w.wgate || !w.ape || !w.norm) {
    bad_usage("the compressor needs wkv, wgate, ape and norm");
  }
  detail::require_floating(x, "x");
  if (x.rank() != 2 && x.rank() != 3) {
    bad_input("{} (x): expected shape [B?, T, D], got {}", x.name, shape_string(x.shape));
  }
  CompressorInputs in;
  in.x = &x;
  in.weights = w;
  in.batched = x.rank() == 3;
  in.batch = in.batched ? x.dim(0) : 1;
  in.tokens = x.dim(in.batched ? 1 : 0);
  in.model_dim = x.shape.back();
  in.overlap = config.ratio == 4;
  detail::require_floating(*w.norm, "norm");
  if (w.norm->rank() != 1 || w.norm->dim(0) < 1) {
    bad_input("{} (norm): expected shape [d], got {}", w.norm->name, shape_string(w.norm->shape));
  }
  in.dim = w.norm->dim(0);
  const int64_t width = (in.overlap ? 2 : 1) * in.dim;
  require_shape(*w.wkv, "wkv", {width, in.model_dim});
  require_shape(*w.wgate, "wgate", {width, in.model_dim});
  require_shape(*w.ape, "ape", {config.ratio, width});
  if (config.rope.dims > in.dim) {
    bad_usage("RoPE over the last {} dims needs d >= {}, got d = {}", config.rope.dims,
              config.rope.dims, in.dim);
  }
  if (config.numerics == V4Numerics::released) {
    if (config.indexer && (!is_power_of_two(in.dim) || in.dim % kFp4Block != 0)) {
      bad_usage(
          "the indexer cache's Hadamard and e2m1 blocks of {} need d a power of two >= {}, "
          "got d = {}",
          kFp4Block, kFp4Block, in.dim);
    }
    if (!config.indexer && (in.dim - config.rope.dims) % kFp8Block != 0) {
      bad_usage(
          "the main cache's e4m3 blocks of {} need d - {} (the non-RoPE dims) a multiple of "
          "{}, got d = {}",
          kFp8Block, config.rope.dims, kFp8Block, in.dim);
    }
  }
  in.entries = in.tokens / config.ratio;
  return in;
}

Shape compressed_shape(const CompressorInputs& in) {
  return with_batch({in.entries, in.dim}, in.batched, in.batch);
}

namespace {

detail::Operation operation(const CompressorInputs& inputs, const CompressorConfig& config) {
  detail::Operation op;
  op.compressor = &inputs;
  op.compressor_config = &config;
  return op;
}

}  // namespace

DeviceChoice choose_device(const std::string& name, const CompressorInputs& inputs,
                           const CompressorConfig& config) {
  return detail::choose_device(name, operation(inputs, config));
}

void compress(const CompressorInputs& in, const CompressorConfig& config,
              const CompressedSink& sink, StageTimes* times, Device device) {
  detail::backend(device, operation(in, config)).compress(in, config, sink, times);
}

namespace detail {

void cpu_compress(const CompressorInputs& in, const CompressorConfig& config,
                  const CompressedSink& sink, StageTimes* times) {
  const int64_t m = config.ratio, d = in.dim, D = in.model_dim;
  const int64_t width = (in.overlap ? 2 : 1) * d, lead = in.overlap ? m : 0;
  const bool rounds = config.numerics != V4Numerics::f32;
  const bool quantizes = config.numerics == V4Numerics::released;
  Stopwatch prepare;
  const RowMatrix wkv = matrix_of(*in.weights.wkv, width, D);
  const RowMatrix wgate = matrix_of(*in.weights.wgate, width, D);
  const std::vector<float> ape = to_f32(*in.weights.ape), norm = to_f32(*in.weights.norm);
  const Rope rope(config.rope);
  if (times) times->add("prepare", prepare.seconds());
  const auto bf16 = [&](float v) { return rounds ? round_to_bf16(v) : v; };

  Progress progress("compress", in.batch * in.entries, "entries");
  for (int64_t b = 0; b < in.batch; ++b) {
    const int64_t blocks = ceil_div(in.entries, kEntryBlock);
    // Blocks in order, a few at a time in parallel, so the sink sees the entries in order.
    const int64_t group = std::max<int64_t>(1, 2 * max_threads());
    for (int64_t g0 = 0; g0 < blocks; g0 += group) {
      const int64_t g1 = std::min(blocks, g0 + group);
      const int64_t first = g0 * kEntryBlock, last = std::min(in.entries, g1 * kEntryBlock);
      std::vector<float> out(static_cast<std::size_t>((last - first) * d));
      Stopwatch watch;
      parallel_ranges(g1 - g0, 1, [&](int64_t begin, int64_t end) {
        for (int64_t block = g0 + begin; block < g0 + end; ++block) {
          const int64_t j0 = block * kEntryBlock, j1 = std::min(in.entries, j0 + kEntryBlock);
          // Tokens [m j0 - lead, m j1): the block's windows and, with overlap, the one before.
          const int64_t t0 = std::max<int64_t>(0, m * j0 - lead), t1 = m * j1;
          RowMatrix x(t1 - t0, D);
          to_f32(*in.x, (b * in.tokens + t0) * D, (t1 - t0) * D, x.data());
          const RowMatrix kv = x * wkv.transpose();  // the released code's f32 projections
          const RowMatrix score = x * wgate.transpose();
          std::vector<float> logits(static_cast<std::size_t>(2 * m)), values(logits.size());
          for (int64_t j = j0; j < j1; ++j) {
            float* entry = out.data() + (j - first) * d;
            for (int64_t e = 0; e < d; ++e) {
              int64_t slots = 0;
              if (in.overlap && j > 0) {  // the previous window's first half, ape rows 0 .. m-1
                for (int64_t r = 0; r < m; ++r) {
                  const int64_t s = m * (j - 1) + r - t0;
                  values[slots] = kv(s, e);
                  logits[slots++] = score(s, e) + ape[r * width + e];
                }
              }
              const int64_t half = in.overlap ? d : 0;  // the own window's half
              for (int64_t r = 0; r < m; ++r) {
                const int64_t s = m * j + r - t0;
                values[slots] = kv(s, half + e);
                logits[slots++] = score(s, half + e) + ape[r * width + half + e];
              }
              // torch softmax over the slots, then the weighted sum, in f32.
              float top = -INFINITY;
              for (int64_t i = 0; i < slots; ++i) top = std::max(top, logits[i]);
              float total = 0.0f;
              for (int64_t i = 0; i < slots; ++i) {
                logits[i] = std::exp(logits[i] - top);
                total += logits[i];
              }
              float pooled = 0.0f;
              for (int64_t i = 0; i < slots; ++i) pooled += values[i] * (logits[i] / total);
              entry[e] = bf16(pooled);  // kv.to(dtype)
            }
            // RMSNorm: x * rsqrt(mean(x^2) + eps), times the weight, in f32; one rounding.
            double squares = 0;
            for (int64_t e = 0; e < d; ++e) squares += static_cast<double>(entry[e]) * entry[e];
            const float mean = static_cast<float>(squares / static_cast<double>(d));
            const float inverse = 1.0f / std::sqrt(mean + static_cast<float>(config.eps));
            for (int64_t e = 0; e < d; ++e) entry[e] = bf16(norm[e] * (entry[e] * inverse));
            // RoPE at the window's first token.
            float* rotated = entry + d - rope.dims();
            rope.apply(rotated, m * j);
            for (int64_t e = 0; e < rope.dims(); ++e) rotated[e] = bf16(rotated[e]);
            if (!quantizes) continue;
            if (config.indexer) {  // rotate_activation (bf16 out), then fp4_act_quant
              hadamard_transform(entry, d);
              for (int64_t e = 0; e < d; ++e) entry[e] = round_to_bf16(entry[e]);
              fp4_fake_quantize(entry, d, kFp4Block, entry);
            } else {  // act_quant of the non-RoPE dims; the RoPE dims stay bf16
              fp8_fake_quantize(entry, d - rope.dims(), kFp8Block, true, entry);
            }
          }
          progress.advance(j1 - j0);
        }
      });
      if (times) times->add("compress", watch.seconds());
      sink({b, first, last - first, d, out.data()});
    }
  }
}

}  // namespace detail

}  // namespace dsa
