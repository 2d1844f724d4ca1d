#include "dsa/topk.hpp"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <iterator>
#include <limits>

#include "backend.hpp"
#include "chunks.hpp"
#include "dsa/error.hpp"
#include "progress.hpp"

namespace dsa {

namespace {

constexpr float kMinusInf = -std::numeric_limits<float>::infinity();

// Order-preserving map of a score to an unsigned key: a larger score has a larger key; NaN ranks
// like -inf and -0 like +0, as the float comparisons of Eq. 2 would have them.
uint32_t rank_key(float score) {
  if (std::isnan(score)) score = kMinusInf;
  if (score == 0.0f) score = 0.0f;
  uint32_t bits;
  std::memcpy(&bits, &score, sizeof bits);
  return bits & 0x80000000u ? ~bits : bits | 0x80000000u;
}

void check_k(int64_t k) {
  if (k < 1) bad_usage("top-k size k must be at least 1, got {}", k);
  if (k > std::numeric_limits<int32_t>::max()) {
    bad_usage("top-k size k = {} does not fit int32 indices", k);
  }
}

// The k-th largest of keys (1 <= k <= keys.size()) by radix selection on 11, 11 and 10 bits:
// each pass counts the candidates' digits and keeps those in the digit holding the k-th (the
// first pass reads keys, the others the few candidates). Returns it, with `k` left as the number
// of picks among the keys equal to it.
uint32_t kth_largest(const std::vector<uint32_t>& keys, int64_t& k,
                     std::vector<uint32_t>& candidates) {
  uint32_t prefix = 0;
  int shift = 32;
  std::array<int64_t, 2048> counts;
  const std::vector<uint32_t>* source = &keys;
  for (const int bits : {11, 11, 10}) {
    shift -= bits;
    const uint32_t mask = (1u << bits) - 1;
    std::fill_n(counts.begin(), mask + 1, 0);
    for (const uint32_t key : *source) ++counts[(key >> shift) & mask];
    uint32_t digit = mask;
    while (counts[digit] < k) k -= counts[digit--];
    prefix |= digit << shift;
    const uint32_t high = prefix >> shift;  // every digit so far
    auto other = [&](uint32_t key) { return key >> shift != high; };
    if (source == &keys) {
      candidates.clear();
      std::remove_copy_if(keys.begin(), keys.end(), std::back_inserter(candidates), other);
      source = &candidates;
    } else {
      std::erase_if(candidates, other);
    }
  }
  return prefix;
}

// Sorts (~key << 32 | position) entries by their upper half, stably: least significant byte
// first. The entries arrive in ascending position, so equal keys keep that order (Eq. 2's tie
// rule).
void sort_by_key(std::vector<uint64_t>& entries, std::vector<uint64_t>& buffer) {
  buffer.resize(entries.size());
  for (int shift = 32; shift < 64; shift += 8) {
    std::array<std::size_t, 257> offsets{};
    for (const uint64_t e : entries) ++offsets[((e >> shift) & 255) + 1];
    if (std::find(offsets.begin() + 1, offsets.end(), entries.size()) != offsets.end()) continue;
    for (int d = 0; d < 256; ++d) offsets[d + 1] += offsets[d];
    for (const uint64_t e : entries) buffer[offsets[(e >> shift) & 255]++] = e;
    entries.swap(buffer);
  }
}

}  // namespace

void select_topk_row(const float* scores, int64_t visible, int64_t k, int32_t* indices,
                     float* selected_scores, TopkScratch& scratch) {
  auto& picked = scratch.picked;
  picked.clear();
  auto pick = [&](uint32_t key, int64_t s) {
    picked.push_back(static_cast<uint64_t>(~key) << 32 | static_cast<uint64_t>(s));
  };
  if (visible <= k) {
    for (int64_t s = 0; s < visible; ++s) pick(rank_key(scores[s]), s);
  } else {
    // Everything above the k-th largest key, then the lowest positions among those equal to it.
    auto& keys = scratch.keys;
    keys.resize(static_cast<std::size_t>(visible));
    for (int64_t s = 0; s < visible; ++s) keys[s] = rank_key(scores[s]);
    int64_t equal_needed = k;
    const uint32_t threshold = kth_largest(keys, equal_needed, scratch.candidates);
    for (int64_t s = 0; s < visible; ++s) {
      const uint32_t key = keys[s];
      if (key > threshold || (key == threshold && equal_needed-- > 0)) pick(key, s);
    }
  }
  sort_by_key(picked, scratch.buffer);
  const auto n = static_cast<int64_t>(picked.size());
  for (int64_t i = 0; i < n; ++i) {
    const auto s = static_cast<int32_t>(picked[i] & 0xffffffffu);
    indices[i] = s;
    selected_scores[i] = scores[s];
  }
  std::fill(indices + n, indices + k, -1);
  std::fill(selected_scores + n, selected_scores + k, kMinusInf);
}

namespace {

// Selects every row of a chunk of scores [rows, keys] in parallel.
void select_chunk(const float* scores, int64_t rows, int64_t keys, int64_t first_position,
                  int64_t k, int32_t* indices, float* selected) {
#pragma omp parallel
  {
    TopkScratch scratch;
#pragma omp for schedule(dynamic, 4)
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t visible = std::min(keys, first_position + r + 1);
      select_topk_row(scores + r * keys, visible, k, indices + r * k, selected + r * k, scratch);
    }
  }
}

}  // namespace

namespace {

// The batch, query rows and keys of a score matrix [B?, Lq, Lk], checked.
struct ScoreMatrix {
  int64_t batch, queries, keys;
};
ScoreMatrix score_matrix(const Tensor& scores) {
  if (!is_floating(scores.dtype) || (scores.rank() != 2 && scores.rank() != 3)) {
    bad_input("{} (scores): expected a floating-point tensor [B?, Lq, Lk], got {} {}", scores.name,
              dtype_name(scores.dtype), shape_string(scores.shape));
  }
  const bool batched = scores.rank() == 3;
  const ScoreMatrix m{batched ? scores.dim(0) : 1, scores.dim(batched ? 1 : 0),
                      scores.dim(batched ? 2 : 1)};
  if (m.queries > m.keys) {
    bad_input("{} (scores): {} query rows but only {} keys: queries are the last Lq positions",
              scores.name, m.queries, m.keys);
  }
  if (m.keys > std::numeric_limits<int32_t>::max())
    bad_input("{}: too many keys for int32 indices", scores.name);
  return m;
}

}  // namespace

std::vector<RowRange> balanced_rows(const Tensor& scores, int parts) {
  const ScoreMatrix m = score_matrix(scores);
  // A row's work: the candidates it selects from, and one for its output.
  return balanced_rows(m.batch, m.queries, 1, parts, [&](int64_t t) {
    return static_cast<double>(std::min(m.keys, m.keys - m.queries + t + 1) + 1);
  });
}

void select_from_scores(const Tensor& scores, int64_t k, const SelectionSink& sink,
                        StageTimes* times, RowRange rows) {
  check_k(k);
  const ScoreMatrix m = score_matrix(scores);
  const int64_t queries = m.queries, keys = m.keys;
  const RowRange share = resolve_rows(rows, m.batch * queries, "the score matrix's");
  const int64_t chunk = detail::chunk_rows(64, keys * 4 + k * 8);
  std::vector<int32_t> indices;
  std::vector<float> selected;
  detail::Progress progress("select", share.end - share.begin);
  for (int64_t b = 0; b < m.batch; ++b) {
    const QueryRows range = batch_queries(share, b, queries);
    for (int64_t c0 = range.first; c0 < range.last; c0 += chunk) {
      const int64_t rows = std::min(chunk, range.last - c0);
      indices.resize(static_cast<std::size_t>(rows * k));
      selected.resize(static_cast<std::size_t>(rows * k));
      Stopwatch watch;
      const F32Buffer block(scores, (b * queries + c0) * keys, rows * keys);
      select_chunk(block.data(), rows, keys, keys - queries + c0, k, indices.data(),
                   selected.data());
      if (times) times->add("select", watch.seconds());
      sink({b, c0, rows, k, indices.data(), selected.data(), keys - queries + c0});
      progress.advance(rows);
    }
  }
}

Shape selection_shape(const IndexerInputs& inputs, int64_t k) {
  return with_batch({inputs.queries, k}, inputs.batched, inputs.batch);
}

Shape selection_shape(const Tensor& scores, int64_t k) {
  Shape shape = scores.shape;
  if (!shape.empty()) shape.back() = k;
  return shape;
}

void select_from_indexer(const IndexerInputs& inputs, const IndexerConfig& config, int64_t k,
                         const SelectionSink& sink, StageTimes* times, Device device) {
  check_k(k);
  const RowRange share = resolve_rows(inputs.rows, inputs.batch * inputs.queries, "the indexer's");
  const detail::Backend& backend = detail::backend(device, {&inputs, &config, k, nullptr, false});
  if (backend.device == Device::cpu) {
    backend.select_from_indexer(inputs, config, k, sink, times);  // counts its blocks itself
    return;
  }
  // Another backend's chunks are counted on the host as they arrive.
  detail::Progress progress("select", share.end - share.begin);
  backend.select_from_indexer(
      inputs, config, k,
      [&](const SelectionBlock& block) {
        sink(block);
        progress.advance(block.rows);
      },
      times);
}

void detail::cpu_select_from_indexer(const IndexerInputs& inputs, const IndexerConfig& config,
                                     int64_t k, const SelectionSink& sink, StageTimes* times) {
  const int64_t block = std::max<int64_t>(1, config.query_block);
  const int64_t chunk = detail::chunk_rows(block, inputs.keys * 4 + k * 8);
  const RowRange share = resolve_rows(inputs.rows, inputs.batch * inputs.queries, "the indexer's");
  std::vector<float> scores;
  std::vector<int32_t> indices;
  std::vector<float> selected;
  Progress progress("select", share.end - share.begin);
  for (int64_t b = 0; b < inputs.batch; ++b) {
    const QueryRows queries = batch_queries(share, b, inputs.queries);
    if (queries.first >= queries.last) continue;
    Stopwatch prepare;
    const IndexerKernel kernel(inputs, config, b);
    if (times) times->add("prepare", prepare.seconds());
    for (int64_t c0 = queries.first; c0 < queries.last; c0 += chunk) {
      const int64_t rows = std::min(chunk, queries.last - c0);
      scores.resize(static_cast<std::size_t>(rows * inputs.keys));
      indices.resize(static_cast<std::size_t>(rows * k));
      selected.resize(static_cast<std::size_t>(rows * k));
      // Each task scores a block and selects its rows while the scores are still in cache.
      // The chunk's wall time is split between the stages as the threads' own clocks split it.
      double score_seconds = 0, select_seconds = 0;
      const Stopwatch watch;
#pragma omp parallel reduction(+ : score_seconds, select_seconds)
      {
        TopkScratch scratch;
#pragma omp for schedule(dynamic, 1)
        for (int64_t r0 = 0; r0 < rows; r0 += block) {
          const int64_t n = std::min(block, rows - r0);
          const Stopwatch score_watch;
          kernel.score_rows(c0 + r0, n, scores.data() + r0 * inputs.keys, inputs.keys);
          score_seconds += score_watch.seconds();
          const Stopwatch select_watch;
          for (int64_t r = r0; r < r0 + n; ++r) {
            select_topk_row(scores.data() + r * inputs.keys, inputs.visible(c0 + r), k,
                            indices.data() + r * k, selected.data() + r * k, scratch);
          }
          select_seconds += select_watch.seconds();
          progress.advance(n);
        }
      }
      if (times) {
        const double wall = watch.seconds(), busy = std::max(score_seconds + select_seconds, 1e-30);
        times->add("score", wall * score_seconds / busy);
        times->add("select", wall * select_seconds / busy);
      }
      sink({b, c0, rows, k, indices.data(), selected.data(), inputs.position(c0)});
    }
  }
}

}  // namespace dsa
