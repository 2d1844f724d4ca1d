// One model layer timed on the GPU (calibrate.hpp time_layer; dsa-cost --calibrate, DESIGN.md
// §3): its inputs made on the device (fill.cu, no host tensors, no transfers), then the kernels
// the backend runs for such a layer, each launch between two events: the indexer over the keys
// visible to the rows, in the backend's chunks of rows, with its top-k fused where the backend
// fuses it; the top-k; the attention (V3.2's MQA kernel, from the fp8 cache where the model
// stores it; V4's over the window and the entries, with a sink).
#include <algorithm>
#include <cstdint>
#include <optional>
#include <vector>

#include <fmt/format.h>

#include "backend.hpp"
#include "device_buffer.cuh"
#include "dsa/error.hpp"
#include "dsa/kv_cache.hpp"
#include "kernels.cuh"

namespace dsa::cuda {

namespace {

// What the request runs, in the kernels' terms.
struct Layer {
  bool decode = false, v4 = false, indexed = false, codes = false, fp8_cache = false;
  PrefillRows rows;     // per sequence
  int64_t tokens = 0;   // T: the sequence's raw tokens (positions 0 .. T - 1)
  int64_t ratio = 0;    // csa, hca; 0 otherwise
  int64_t entries = 0;  // compressed entries of the sequence
  int64_t keys = 0;     // what the indexer scores per sequence
  int64_t sequences = 1;
};

Layer layer_of(const LayerTimingRequest& r) {
  Layer l;
  l.decode = r.phase == Phase::decode;
  l.v4 = r.kind != LayerKind::mla;
  l.rows = l.decode ? PrefillRows{r.position, 1} : prefill_rows(r.position, r.tokens);
  l.tokens = l.rows.first + l.rows.rows;
  l.ratio = r.kind == LayerKind::csa || r.kind == LayerKind::hca ? r.compress_ratio : 0;
  l.entries = l.ratio > 0 ? l.tokens / l.ratio : 0;
  l.indexed = r.indexer_heads > 0 && (r.kind == LayerKind::mla || l.entries > 0);
  l.keys = r.kind == LayerKind::mla ? l.tokens : l.entries;
  l.codes =
      r.indexer_precision == "fp8" &&
      indexer_fp8_limit(static_cast<int>(r.indexer_heads), static_cast<int>(r.indexer_dim)).empty();
  l.fp8_cache = r.fp8_cache;
  l.sequences = l.decode ? r.tokens : 1;
  return l;
}

// Device bytes of one sequence's inputs, selection and outputs.
int64_t sequence_bytes(const LayerTimingRequest& r, const Layer& l) {
  const int64_t rows = l.rows.rows, H = r.heads, d = r.d_qk;
  int64_t bytes = rows * H * d * 2 + rows * H * (r.d_v + 1) * 4;  // q; out and lse
  const int64_t row = !l.fp8_cache ? d * 2 : l.v4 ? kV4CacheBytes : kFp8CacheBytes;
  bytes += (l.tokens + l.entries) * row;
  if (l.indexed) {
    const int64_t element = l.codes ? 1 : 2;
    bytes += rows * r.indexer_heads * (r.indexer_dim * element + 4);  // q_I, w
    bytes += l.keys * (r.indexer_dim * element + 4) + rows * r.topk * 8;
    if (l.decode) bytes += l.keys * 4;  // the batch's scores
  }
  return bytes;
}

// The limits of the kernels the request runs (Backend::check).
std::string limit(const LayerTimingRequest& r) {
  const Layer l = layer_of(r);
  const int d = static_cast<int>(r.d_qk), dv = static_cast<int>(r.d_v);
  std::string why =
      l.v4 ? compressed_attention_limit(d, r.window) : attention_limit(d, dv, l.fp8_cache);
  if (why.empty() && l.v4 && l.fp8_cache && d != kV4CacheDim) {
    why = fmt::format("the V4 fp8 cache holds entries of {} values, got {}", kV4CacheDim, d);
  }
  if (why.empty() && l.indexed) {
    why = l.codes
              ? ""
              : indexer_limit(static_cast<int>(r.indexer_heads), static_cast<int>(r.indexer_dim));
    if (why.empty()) why = topk_limit(r.topk);
  }
  if (why.empty() && l.keys > INT32_MAX) {
    why =
        fmt::format("the CUDA kernels take up to {} keys per sequence, got {}", INT32_MAX, l.keys);
  }
  return why;
}

// Times launches between two events on the default stream and adds them to a stage's seconds.
class StageClock {
 public:
  StageClock() {
    check(cudaEventCreate(&start_), "cudaEventCreate");
    check(cudaEventCreate(&stop_), "cudaEventCreate");
  }
  ~StageClock() {
    cudaEventDestroy(start_);
    cudaEventDestroy(stop_);
  }
  StageClock(const StageClock&) = delete;
  StageClock& operator=(const StageClock&) = delete;

  template <typename Launch>
  void time(std::vector<TimedStage>& stages, const char* stage, Launch&& launch) {
    check(cudaEventRecord(start_), "cudaEventRecord");
    launch();
    check(cudaEventRecord(stop_), "cudaEventRecord");
    check(cudaEventSynchronize(stop_), stage);
    float ms = 0;
    check(cudaEventElapsedTime(&ms, start_, stop_), "cudaEventElapsedTime");
    add(stages, stage, ms / 1e3);
  }
  static void add(std::vector<TimedStage>& stages, const char* stage, double seconds) {
    for (TimedStage& s : stages) {
      if (s.stage == stage) {
        s.seconds += seconds;
        return;
      }
    }
    stages.push_back({stage, seconds});
  }

 private:
  cudaEvent_t start_ = nullptr, stop_ = nullptr;
};

// The indexer's operands: e4m3 codes on the fp8 tensor cores, or bf16 values.
template <typename T>
void fill_indexer_values(T* x, int64_t n, uint32_t seed) {
  if constexpr (sizeof(T) == 1) {
    fill_e4m3(x, n, seed, 448.0f);
  } else {
    fill_bf16(x, n, seed, 1.0f);
  }
}

// The indexer stages of one run: prefill in the backend's chunks of rows (fused with the top-k
// where it fuses them), decode as one batched launch and one top-k over the batch's rows.
template <typename T>
class IndexerStages {
 public:
  IndexerStages(const LayerTimingRequest& r, const Layer& l, int32_t* indices, float* values)
      : r_(r), l_(l), indices_(indices), values_(values) {
    const int64_t rows = l.rows.rows, B = l.sequences, HI = r.indexer_heads, DI = r.indexer_dim;
    q_.resize(static_cast<size_t>(B * rows * HI * DI));
    w_.resize(static_cast<size_t>(B * rows * HI));
    k_.resize(static_cast<size_t>(B * l.keys * DI));
    k_scale_.resize(static_cast<size_t>(B * l.keys));
    fill_indexer_values(q_.get(), B * rows * HI * DI, 11);
    fill_indexer_values(k_.get(), B * l.keys * DI, 12);
    fill_f32(w_.get(), B * rows * HI, 1.0f / static_cast<float>(HI));
    fill_f32(k_scale_.get(), B * l.keys, sizeof(T) == 1 ? 1.0f / (448.0f * 448.0f) : 1.0f);
    if constexpr (sizeof(T) == 1) {
      fused_ = !l.decode &&
               indexer_topk_limit(static_cast<int>(HI), static_cast<int>(DI), r.topk).empty() &&
               indexer_topk_preferred(static_cast<int>(std::min(topk_chunk(r.topk), rows)), l.keys);
    }
    chunk_ = l.decode ? 1 : fused_ ? topk_chunk(r.topk) : score_chunk(l.keys);
    chunk_ = std::min(chunk_, rows);
    if (fused_) {
      lists_.resize(static_cast<size_t>(indexer_topk_scratch(static_cast<int>(chunk_), r.topk)));
    } else {
      scores_.resize(static_cast<size_t>((l.decode ? B : chunk_) * l.keys));
    }
  }

  bool fused() const { return fused_; }
  int64_t bytes() const {
    return static_cast<int64_t>(q_.bytes() + w_.bytes() + k_.bytes() + k_scale_.bytes() +
                                scores_.bytes() + lists_.bytes());
  }

  void run(StageClock& clock, std::vector<TimedStage>& stages) {
    StageClock::add(stages, "indexer", 0);
    StageClock::add(stages, "topk", 0);
    const int64_t HI = r_.indexer_heads, DI = r_.indexer_dim, k = r_.topk;
    if (l_.decode) {
      IndexerParams<T> p = params(0, 1);
      p.sequences = static_cast<int>(l_.sequences);
      p.q_step = HI * DI, p.w_step = HI, p.k_step = l_.keys * DI, p.k_scale_step = l_.keys;
      p.scores_step = l_.keys;
      clock.time(stages, "indexer", [&] { launch_indexer(p); });
      // The batch's rows side by side: row z, at x + z as the kernel counts, sees at least the
      // keys, every one of its own sequence's.
      const TopkParams t = topk(0, static_cast<int>(l_.sequences));
      clock.time(stages, "topk", [&] { launch_topk(t); });
      return;
    }
    for (int64_t c0 = 0; c0 < l_.rows.rows; c0 += chunk_) {
      const int64_t rows = std::min(chunk_, l_.rows.rows - c0);
      if constexpr (sizeof(T) == 1) {
        if (fused_) {
          IndexerTopkOutputs out;
          out.indices = indices_ + c0 * k;
          out.values = values_ + c0 * k;
          out.lists = lists_.get();
          out.k = static_cast<int>(k);
          const IndexerParams<T> p = params(c0, rows);
          clock.time(stages, "indexer", [&] { launch_indexer_topk(p, out); });
          continue;
        }
      }
      const IndexerParams<T> p = params(c0, rows);
      clock.time(stages, "indexer", [&] { launch_indexer(p); });
      const TopkParams t = topk(c0, static_cast<int>(rows));
      clock.time(stages, "topk", [&] { launch_topk(t); });
    }
  }

 private:
  IndexerParams<T> params(int64_t c0, int64_t rows) const {
    const int64_t HI = r_.indexer_heads, DI = r_.indexer_dim;
    IndexerParams<T> p;
    p.q = q_.get() + c0 * HI * DI;
    p.w = w_.get() + c0 * HI;
    p.k = k_.get();
    p.k_scale = k_scale_.get();
    p.scores = scores_.get();
    p.rows = static_cast<int>(rows);
    p.heads = static_cast<int>(HI);
    p.dim = static_cast<int>(DI);
    p.keys = static_cast<int>(l_.keys);
    p.first_position = l_.rows.first + c0;
    p.stride = l_.keys;
    p.ratio = l_.ratio > 0 ? l_.ratio : 1;
    return p;
  }

  TopkParams topk(int64_t c0, int rows) const {
    TopkParams t;
    t.scores = scores_.get();
    t.indices = indices_ + c0 * r_.topk;
    t.values = values_ + c0 * r_.topk;
    t.rows = rows;
    t.keys = static_cast<int>(l_.keys);
    t.k = static_cast<int>(r_.topk);
    t.first_position = l_.rows.first + c0;
    t.stride = l_.keys;
    t.ratio = l_.ratio > 0 ? l_.ratio : 1;
    return t;
  }

  const LayerTimingRequest& r_;
  const Layer& l_;
  int32_t* indices_;
  float* values_;
  bool fused_ = false;
  int64_t chunk_ = 1;
  DeviceBuffer<T> q_, k_;
  DeviceBuffer<float> w_, k_scale_, scores_;
  DeviceBuffer<uint64_t> lists_;
};

template <typename T>
LayerTiming time_on_device(const LayerTimingRequest& r, const Layer& l) {
  const int64_t rows = l.rows.rows, B = l.sequences, H = r.heads, d = r.d_qk, dv = r.d_v;
  const int64_t T_ = l.tokens;
  DeviceBuffer<__nv_bfloat16> q(static_cast<size_t>(B * rows * H * d));
  DeviceBuffer<__nv_bfloat16> kv, compressed;
  DeviceBuffer<uint8_t> kv_fp8, compressed_fp8;
  DeviceBuffer<float> sink, out(static_cast<size_t>(B * rows * H * dv)),
      lse(static_cast<size_t>(B * rows * H)), values, partial;
  DeviceBuffer<int32_t> indices;
  fill_bf16(q.get(), B * rows * H * d, 21, 0.1f);
  const int64_t row_bytes = l.v4 ? kV4CacheBytes : kFp8CacheBytes;  // the fp8 caches' rows
  if (l.fp8_cache && l.v4) {
    kv_fp8.resize(static_cast<size_t>(B * T_ * row_bytes));
    fill_v4_fp8_cache(kv_fp8.get(), B * T_, 22);
    if (l.entries > 0) {
      compressed_fp8.resize(static_cast<size_t>(B * l.entries * row_bytes));
      fill_v4_fp8_cache(compressed_fp8.get(), B * l.entries, 23);
    }
  } else if (l.fp8_cache) {
    kv_fp8.resize(static_cast<size_t>(B * T_ * row_bytes));
    fill_fp8_cache(kv_fp8.get(), B * T_, 22);
  } else {
    kv.resize(static_cast<size_t>(B * T_ * d));
    fill_bf16(kv.get(), B * T_ * d, 22, 1.0f);
    if (l.entries > 0) {
      compressed.resize(static_cast<size_t>(B * l.entries * d));
      fill_bf16(compressed.get(), B * l.entries * d, 23, 1.0f);
    }
  }
  if (l.v4) {
    sink.resize(static_cast<size_t>(H));
    fill_f32(sink.get(), H, 0.5f);
  }
  std::optional<IndexerStages<T>> indexer;
  if (l.indexed) {
    indices.resize(static_cast<size_t>(B * rows * r.topk));
    values.resize(static_cast<size_t>(B * rows * r.topk));
    indexer.emplace(r, l, indices.get(), values.get());
  }

  AttentionParams p;
  p.q = q.get();
  p.kv = kv.get();
  p.kv_fp8 = kv_fp8.get();
  p.kv_fp8_step = T_ * row_bytes;
  p.indices = l.indexed ? indices.get() : nullptr;
  p.out = out.get();
  p.lse = lse.get();
  p.rows = static_cast<int>(rows);
  p.heads = static_cast<int>(H);
  p.d_qk = static_cast<int>(d);
  p.d_v = static_cast<int>(dv);
  p.keys = static_cast<int>(T_);
  p.k = l.indexed ? static_cast<int>(r.topk) : 0;
  p.first_position = l.rows.first;
  p.scale = default_scale(d);
  p.sequences = static_cast<int>(B);
  p.q_step = rows * H * d, p.kv_step = T_ * d, p.indices_step = rows * r.topk;
  p.out_step = rows * H * dv, p.lse_step = rows * H;
  p.query_rows = static_cast<int>(rows);
  if (l.v4) {
    p.compressed = compressed.get();
    p.compressed_step = l.entries * d;
    p.compressed_fp8 = compressed_fp8.get();
    p.compressed_fp8_step = l.entries * row_bytes;
    p.window = static_cast<int>(r.window);
    p.ratio = l.ratio;
    p.entries = l.entries;
    p.sink = sink.get();
    if (r.kind != LayerKind::csa) p.indices = nullptr, p.k = 0;
  }
  partial.resize(static_cast<size_t>(std::max<int64_t>(1, attention_partial_floats(p))));
  p.partial = partial.get();
  check(cudaDeviceSynchronize(), "filling the measured layer's inputs");

  StageClock clock;
  const auto run = [&](std::vector<TimedStage>& stages) {
    if (indexer) indexer->run(clock, stages);
    clock.time(stages, "attention", [&] {
      if (l.v4) {
        launch_compressed_attention(p);
      } else {
        launch_attention(p);
      }
    });
  };
  const detail::RunTiming timing = detail::time_runs(run, r.seconds);

  LayerTiming t;
  t.first_position = l.rows.first;
  t.rows = rows;
  t.sequences = B;
  t.attention = !l.v4                      ? (l.indexed ? "sparse" : "dense")
                : r.kind == LayerKind::swa ? "window"
                : r.kind == LayerKind::csa ? "window+selected"
                                           : "window+all";
  t.cache = l.fp8_cache ? "fp8" : "bf16";
  if (l.indexed) {
    t.indexer = l.codes ? "fp8" : "bf16";
    t.fused_topk = indexer->fused();
  }
  t.stages = timing.stages;
  t.repeats = timing.repeats;
  t.bytes = static_cast<int64_t>(q.bytes() + kv.bytes() + kv_fp8.bytes() + compressed.bytes() +
                                 compressed_fp8.bytes() + sink.bytes() + out.bytes() + lse.bytes() +
                                 values.bytes() + partial.bytes() + indices.bytes()) +
            (indexer ? indexer->bytes() : 0);
  return t;
}

}  // namespace

std::string layer_timing_limit(const LayerTimingRequest& request) {
  return limit(request);
}

LayerTiming time_layer(const LayerTimingRequest& request) {
  require(limit(request));
  Layer l = layer_of(request);
  // A decode batch takes at most 80 % of the free memory: fewer sequences, each with its own
  // caches, where the whole batch would not fit.
  size_t free = 0, total = 0;
  check(cudaMemGetInfo(&free, &total), "cudaMemGetInfo");
  const double room = 0.8 * static_cast<double>(free);
  const int64_t per_sequence = sequence_bytes(request, l);
  if (static_cast<double>(l.sequences * per_sequence) > room) {
    l.sequences =
        std::max<int64_t>(1, static_cast<int64_t>(room / static_cast<double>(per_sequence)));
  }
  if (static_cast<double>(l.sequences * per_sequence) > room) {
    fail(ExitCode::runtime,
         "the measured {} layer at position {} needs {:.1f} GiB on the GPU, {:.1f} GiB are free",
         layer_kind_name(request.kind), request.position,
         static_cast<double>(per_sequence) / (1 << 30), static_cast<double>(free) / (1 << 30));
  }
  return l.codes || !l.indexed ? time_on_device<uint8_t>(request, l)
                               : time_on_device<__nv_bfloat16>(request, l);
}

}  // namespace dsa::cuda
