// Internal: the operations a backend implements, as one table per backend (ggml's backend
// interface, htslib's hFILE_backend): the public functions of indexer.hpp, topk.hpp,
// attention.hpp and metrics.hpp pick a backend through the registry (device.cpp, the one file
// that knows which backends this build has) and call its entry. A new operation is a new entry
// here, implemented by every backend or refused by its `check`.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "dsa/attention.hpp"
#include "dsa/calibrate.hpp"
#include "dsa/compressed_attention.hpp"
#include "dsa/compressor.hpp"
#include "dsa/device.hpp"
#include "dsa/indexer.hpp"
#include "dsa/topk.hpp"

namespace dsa::detail {

// What an operation is about to run on, for Backend::check; unset parts are not run.
struct Operation {
  const IndexerInputs* indexer = nullptr;
  const IndexerConfig* indexer_config = nullptr;
  int64_t topk = 0;  // the largest k selected on the backend (0: none)
  const AttentionInputs* attention = nullptr;
  bool dense_probabilities = false;  // dsa-compare's head-averaged dense distribution p
  bool fp8_cache = false;  // the attention also runs over the fp8 cache of these inputs' kv
  const CompressedAttentionInputs* compressed_attention = nullptr;  // DeepSeek-V4's
  const CompressorInputs* compressor = nullptr;  // with compressor_config, DeepSeek-V4's
  const CompressorConfig* compressor_config = nullptr;
  const LayerTimingRequest* layer_timing = nullptr;  // dsa-cost's measured layers
};

// dsa-compare's arithmetic for one batch element, in blocks of query rows [c0, c0 + rows),
// results on the host; the selections and the metrics stay in metrics.cpp.
class CompareEngine {
 public:
  virtual ~CompareEngine() = default;
  // Indexer scores out [rows, keys] (Eq. 1, -inf where s > t).
  virtual void scores(int64_t c0, int64_t rows, int64_t keys, float* out) = 0;
  // Attention over indices [rows, k] (-1 skipped): out [rows, H, d_v], lse [rows, H].
  virtual void attend(int64_t c0, int64_t rows, const int32_t* indices, int64_t k, float* out,
                      float* lse) = 0;
  // Dense attention out and lse, and the head-averaged dense probabilities p [rows, stride].
  virtual void dense(int64_t c0, int64_t rows, float* out, float* lse, float* p,
                     int64_t stride) = 0;
};

using ScoreSink = std::function<void(const ScoreBlock&)>;

struct Backend {
  Device device;
  std::string (*unavailable)();  // empty when it can compute on this machine, else why not
  std::string (*describe)();     // "cpu", "cuda:0 NVIDIA H200 (132 SMs)"
  // Empty when the backend takes these inputs, else one line naming the limit; asked before any
  // work starts, so no entry below throws for a shape.
  std::string (*check)(const Operation& op);
  void (*indexer_scores)(const IndexerInputs& inputs, const IndexerConfig& config,
                         const ScoreSink& sink, StageTimes* times);
  void (*select_from_indexer)(const IndexerInputs& inputs, const IndexerConfig& config, int64_t k,
                              const SelectionSink& sink, StageTimes* times);
  // Over indices [B?, Lq, K] (-1 skipped), or over every visible key when indices is null.
  void (*attention)(const AttentionInputs& inputs, const Tensor* indices, float scale,
                    const AttentionSink& sink, StageTimes* times);
  // DeepSeek-V4's attention of the inputs' rows (compressed_attention.hpp), over CSA's selection
  // `indices` (validated) or, null, every visible entry.
  void (*compressed_attention)(const CompressedAttentionInputs& inputs, const Tensor* indices,
                               float scale, const AttentionSink& sink, StageTimes* times);
  // DeepSeek-V4's compressor (compressor.hpp compress): the entries in order, in blocks.
  void (*compress)(const CompressorInputs& inputs, const CompressorConfig& config,
                   const CompressedSink& sink, StageTimes* times);
  // One model layer timed on inputs of its shapes resident where the backend computes
  // (calibrate.hpp time_layer; dsa-cost's measured curves).
  LayerTiming (*time_layer)(const LayerTimingRequest& request);
  // Host memory a chunk of compare_attention's rows may take: the GPU's launches want long
  // chunks, the CPU's stages stay in less memory with short ones at no cost in time.
  int64_t compare_chunk_bytes;
  std::unique_ptr<CompareEngine> (*compare_engine)(const AttentionInputs& attention,
                                                   const IndexerInputs* indexer,
                                                   const IndexerConfig& config, float scale,
                                                   int64_t b);
  // The most memory of its own device the backend's buffers held at once in this process (0:
  // none, or a backend that computes in host memory, which peak_rss_bytes counts).
  int64_t (*peak_memory_bytes)();
  // Computes from now on on the slot-th of its devices (modulo their count); the device's index,
  // or -1 when the backend has no devices to choose from.
  int (*select_device)(int slot);
};

// The CPU's entries (indexer.cpp, topk.cpp, attention.cpp).
void cpu_indexer_scores(const IndexerInputs& inputs, const IndexerConfig& config,
                        const ScoreSink& sink, StageTimes* times);
void cpu_select_from_indexer(const IndexerInputs& inputs, const IndexerConfig& config, int64_t k,
                             const SelectionSink& sink, StageTimes* times);
void cpu_attention(const AttentionInputs& inputs, const Tensor* indices, float scale,
                   const AttentionSink& sink, StageTimes* times);
void cpu_compress(const CompressorInputs& inputs, const CompressorConfig& config,
                  const CompressedSink& sink, StageTimes* times);
void cpu_compressed_attention(const CompressedAttentionInputs& inputs, const Tensor* indices,
                              float scale, const AttentionSink& sink, StageTimes* times);
LayerTiming cpu_time_layer(const LayerTimingRequest& request);  // layer_timing.cpp

// time_layer's timing (DESIGN.md §3): one run of `run`, which returns its own seconds; when that
// took less than `budget` it was a warm-up and the result is the mean of the runs that follow
// until their seconds add up to `budget`. Each run's seconds go to `stages` (per stage name, as
// the run adds them), averaged the same way.
struct RunTiming {
  int64_t repeats = 0;
  std::vector<TimedStage> stages;
};
RunTiming time_runs(const std::function<void(std::vector<TimedStage>&)>& run, double budget);

// DeepSeek-V4's attention through a backend's MQA `attention` entry (compressed_attention.cpp):
// per chunk of query rows, the window's raw tokens and the entries the rows use gathered on the
// host into one cache (the "cache" stage), the rows' index lists into it, the sink joined after.
using MqaAttention = void (*)(const AttentionInputs&, const Tensor*, float, const AttentionSink&,
                              StageTimes*);
void gathered_compressed_attention(const CompressedAttentionInputs& inputs, const Tensor* indices,
                                   float scale, const AttentionSink& sink, StageTimes* times,
                                   MqaAttention attention);

// dsa-compare's CPU engine (compare_engine.cpp), and the rows of its dense blocks: chunks of
// compare_attention are multiples of them, so that the same rows always share a product.
std::unique_ptr<CompareEngine> cpu_compare_engine(const AttentionInputs& attention,
                                                  const IndexerInputs* indexer,
                                                  const IndexerConfig& config, float scale,
                                                  int64_t b);
int64_t cpu_compare_rows(const AttentionInputs& attention);

// The backend that computes on `device` (Error(runtime) when this build has none).
const Backend& backend(Device device);
// The same, once it has said it takes `op` (else Error(usage) naming the limit, before any work).
const Backend& backend(Device device, const Operation& op);

// The device a --device name gives for `op`: "cpu"; "cuda", which fails before any work when
// there is no usable GPU (Error(runtime)) or the CUDA backend refuses the inputs (Error(usage),
// naming the limit); "auto", the GPU where it is usable and takes the inputs, else the CPU with a
// note saying why.
DeviceChoice choose_device(const std::string& name, const Operation& op);

}  // namespace dsa::detail
