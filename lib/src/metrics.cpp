#include "dsa/metrics.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>

#include "backend.hpp"
#include "compare_common.hpp"
#include "dsa/error.hpp"
#include "dsa/parallel.hpp"
#include "dsa/topk.hpp"
#include "progress.hpp"

namespace dsa {

namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

double percentile(const std::vector<double>& sorted, double q) {
  const double pos = q / 100.0 * static_cast<double>(sorted.size() - 1);
  const auto lo = static_cast<std::size_t>(std::floor(pos));
  const std::size_t hi = std::min(lo + 1, sorted.size() - 1);
  return sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - static_cast<double>(lo));
}

// Wall-clock seconds of the comparison loop's stages (each runs on every thread).
struct StageClock {
  double score = 0, select = 0, dense = 0, sparse = 0, metrics = 0;
};

// log(sum(exp(x_i))) over the given scores, in double.
template <typename Get>
double log_sum_exp(int64_t n, Get get) {
  double m = -std::numeric_limits<double>::infinity();
  for (int64_t i = 0; i < n; ++i) m = std::max(m, get(i));
  if (std::isinf(m)) return m;
  double sum = 0;
  for (int64_t i = 0; i < n; ++i) sum += std::exp(get(i) - m);
  return m + std::log(sum);
}

// KL(p || softmax(scores)) over n entries with p given unnormalized (its total `mass`); NaN
// when p has no mass.
template <typename P, typename Score>
double kl_to_softmax(int64_t n, double mass, P p, Score score) {
  if (!(mass > 0)) return kNaN;
  const double lse = log_sum_exp(n, score);
  double kl = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double pi = p(i) / mass;
    if (pi > 0) kl += pi * (std::log(pi) - (score(i) - lse));
  }
  return std::max(kl, 0.0);
}

void validate(const CompareInputs& in) {
  if (in.topk.empty()) bad_usage("give at least one k");
  for (std::size_t i = 0; i < in.topk.size(); ++i) {
    if (in.topk[i] < 1) bad_usage("k must be at least 1, got {}", in.topk[i]);
    if (i > 0 && in.topk[i] <= in.topk[i - 1])
      bad_usage("the k values must be distinct and ascending");
  }
  if (in.indexer.has_value() == (in.indices != nullptr)) {
    bad_usage("give either the indexer inputs or a precomputed selection");
  }
  const AttentionInputs& a = in.attention;
  if (in.fp8_cache) {
    const AttentionInputs& c = *in.fp8_cache;
    if (!c.fp8_cache || a.fp8_cache || !a.latent || c.batch != a.batch || c.queries != a.queries ||
        c.keys != a.keys || c.heads != a.heads || c.d_qk != a.d_qk || c.d_v != a.d_v) {
      bad_usage("the fp8 cache comparison needs the fp8 cache of the attention's own latent kv");
    }
  }
  if (in.indexer) {
    const IndexerInputs& x = *in.indexer;
    if (x.batch != a.batch || x.queries != a.queries || x.keys != a.keys) {
      bad_input(
          "{} (q_index) / {} (k_index): indexer shapes (B {}, Lq {}, Lk {}) do not match the "
          "attention inputs (B {}, Lq {}, Lk {})",
          x.q_index->name, x.k_index->name, x.batch, x.queries, x.keys, a.batch, a.queries, a.keys);
    }
  } else {
    validate_indices(a, *in.indices, in.positions);
    if (in.topk.size() != 1 || in.topk[0] != in.indices->shape.back()) {
      bad_usage("with a precomputed selection k is its width ({})", in.indices->shape.back());
    }
  }
}

// S_t of one row, its first `valid` entries >= 0: the indexer's top `width` of score (Eq. 2),
// or the precomputed selection's row (its -1 entries dropped).
int64_t select_row(const CompareInputs& in, int64_t row, const float* score, int64_t visible,
                   int64_t width, int32_t* sel, float* sel_scores, TopkScratch& scratch,
                   std::vector<int64_t>& index_row) {
  if (score) {
    select_topk_row(score, visible, width, sel, sel_scores, scratch);
  } else {
    index_row.resize(static_cast<std::size_t>(width));
    to_i64(*in.indices, row * width, width, index_row.data());
    int64_t n = 0;
    for (int64_t s : index_row) {
      if (s >= 0) sel[n++] = static_cast<int32_t>(s);
    }
  }
  int64_t valid = 0;
  while (valid < width && sel[valid] >= 0) ++valid;
  return valid;
}

// The per-(row, head) output metrics at one k, and the dense mass the selection holds; returns
// the squared error and the squared norm of the dense output.
std::pair<double, double> head_metrics(const float* sparse, const float* dense, int64_t d_v,
                                       double mass, Fidelity& f, std::size_t at) {
  const auto [err, ref] = detail::relative_error(sparse, dense, d_v, f.out_rel_err[at]);
  double own = 0, dot = 0;
  for (int64_t c = 0; c < d_v; ++c) {
    own += double(sparse[c]) * sparse[c];
    dot += double(sparse[c]) * dense[c];
  }
  f.mass_recall_head[at] = static_cast<float>(mass);
  f.out_cosine[at] = static_cast<float>(ref > 0 && own > 0 ? dot / std::sqrt(ref * own)
                                                           : (ref == own ? 1.0 : 0.0));
  return {err, ref};
}

// What row_metrics reuses between rows.
struct RowScratch {
  std::vector<int64_t> marks;  // [Lk]: the stamp of the row and k that selected s
  int64_t stamp = 0;
  std::vector<int32_t> oracle;
  std::vector<float> oracle_scores;
  TopkScratch topk;
};

// The metrics of row `row` (position t) on the head-summed dense distribution p and, with the
// indexer's scores, its KL losses (Eq. 3, 4): mass and top-k recall and needles at each k.
void row_metrics(const CompareInputs& in, Comparison& out, int64_t row, int64_t t, const float* p,
                 const float* score, const int32_t* sel, int64_t valid,
                 const std::vector<std::pair<int64_t, int64_t>>& needles, RowScratch& scratch,
                 std::vector<int64_t>& needle_counts) {
  const int64_t visible = t + 1;
  if (score) {  // Eq. 3
    out.kl_dense[row] = static_cast<float>(kl_to_softmax(
        visible, 1.0, [&](int64_t s) { return double(p[s]); },
        [&](int64_t s) { return double(score[s]); }));
  }
  const auto first_needle =
      std::lower_bound(needles.begin(), needles.end(), std::make_pair(t, int64_t{-1}));
  for (std::size_t ki = 0; ki < in.topk.size(); ++ki) {
    Fidelity& f = out.per_k[ki];
    const int64_t k = in.topk[ki];
    const int64_t n = std::min(k, valid);
    ++scratch.stamp;
    double mass = 0;
    for (int64_t j = 0; j < n; ++j) {
      scratch.marks[sel[j]] = scratch.stamp;
      mass += p[sel[j]];
    }
    f.mass_recall[row] = static_cast<float>(mass);
    scratch.oracle.resize(static_cast<std::size_t>(k));
    scratch.oracle_scores.resize(static_cast<std::size_t>(k));
    select_topk_row(p, visible, k, scratch.oracle.data(), scratch.oracle_scores.data(),
                    scratch.topk);
    int64_t hits = 0;
    for (int64_t j = 0; j < std::min(k, visible); ++j)
      hits += scratch.marks[scratch.oracle[j]] == scratch.stamp;
    f.topk_recall[row] = static_cast<float>(double(hits) / double(std::min(k, visible)));
    if (score) {  // Eq. 4
      f.kl_sparse[row] = static_cast<float>(kl_to_softmax(
          n, mass, [&](int64_t j) { return double(p[sel[j]]); },
          [&](int64_t j) { return double(score[sel[j]]); }));
    }
    for (auto it = first_needle; it != needles.end() && it->first == t; ++it) {
      ++needle_counts[2 * ki];
      needle_counts[2 * ki + 1] += scratch.marks[it->second] == scratch.stamp;
    }
  }
}
// What compare_attention asks of a backend. The selection runs on the host (compare_on_engine
// says why), so no top-k limit applies.
detail::Operation compare_operation(const CompareInputs& in) {
  detail::Operation op;
  if (in.indexer) {
    op.indexer = &*in.indexer;
    op.indexer_config = &in.indexer_config;
  }
  op.attention = &in.attention;
  op.dense_probabilities = true;
  op.fp8_cache = in.fp8_cache != nullptr;
  return op;
}

// The rows the CPU computes together in one product start at multiples of this in every batch
// element: its dense blocks (cpu_compare_rows) and the indexer's query blocks. Chunks and shares
// start there, so a row is computed alike whatever the chunk or the share.
int64_t share_alignment(const CompareInputs& in) {
  const int64_t dense = detail::cpu_compare_rows(in.attention);
  const int64_t query = in.indexer ? std::max<int64_t>(1, in.indexer_config.query_block) : 1;
  return std::lcm(dense, query);
}

// compare_attention on either device: the backend's CompareEngine computes, in chunks of query
// rows, the indexer scores, sparse attention at each k, dense attention and the head-averaged
// dense probabilities; the selections and metrics are computed here, on the host. Top-k runs on
// the host too: the metrics need each row's whole score row and p on the host anyway, and the
// host's selection is the reference the GPU's own top-k is tested against. The mass of head h on
// S_t is read off the two softmax normalizers: sum over s in S_t of p_h[s] =
// exp(lse_sparse - lse_dense).
void compare_on_engine(const detail::Backend& backend, const CompareInputs& in, Comparison& out,
                       const std::vector<std::pair<int64_t, int64_t>>& needles, int64_t width,
                       RowTotals& totals, StageClock& clock, StageTimes* times) {
  const AttentionInputs& a = in.attention;
  const int64_t H = a.heads, Lk = a.keys, Lq = a.queries, d_v = a.d_v;
  const auto n_k = static_cast<int64_t>(in.topk.size());
  const int64_t rows = out.rows();
  // Host memory per row: scores and p, and the outputs at every k (twice with the fp8 cache)
  // and dense.
  const int64_t outputs = in.fp8_cache ? 2 * n_k + 1 : n_k + 1;
  const int64_t per_row = 8 * Lk + 4 * outputs * H * (d_v + 1) + 8 * width;
  // At least four dense blocks of rows per thread, so that every stage keeps the threads busy;
  // a multiple of the rows the CPU computes together (share_alignment), as a share's start is.
  const int64_t busy = 4 * static_cast<int64_t>(max_threads()) * detail::cpu_compare_rows(a);
  const int64_t align = share_alignment(in);
  const int64_t chunk =
      std::max(std::clamp<int64_t>(std::max(backend.compare_chunk_bytes / per_row, busy), 1, 4096) /
                   align * align,
               align);
  const RowRange share = resolve_rows(in.rows, rows, "the comparison's");
  std::vector<float> scores, p, dense_out, dense_lse, sparse_out, sparse_lse, selected_scores;
  std::vector<float> bf16_out, bf16_lse;  // with the fp8 cache: the same selection over kv
  std::vector<int32_t> selection, prefix;
  std::vector<int64_t> valid;
  // Counted per chunk on the host, whichever backend computes.
  detail::Progress progress("compare", share.end - share.begin);
  for (int64_t b = 0; b < a.batch; ++b) {
    // This batch element's query rows in the share.
    const QueryRows queries = batch_queries(share, b, Lq);
    const int64_t first = queries.first, last = queries.last;
    if (first >= last) continue;
    Stopwatch load;
    const std::unique_ptr<detail::CompareEngine> engine = backend.compare_engine(
        a, in.indexer ? &*in.indexer : nullptr, in.indexer_config, in.scale, b);
    const std::unique_ptr<detail::CompareEngine> fp8_engine =
        in.fp8_cache
            ? backend.compare_engine(*in.fp8_cache, nullptr, in.indexer_config, in.scale, b)
            : nullptr;
    if (times) times->add("load", load.seconds());
    Stopwatch compare_watch;
    for (int64_t c0 = first; c0 < last; c0 += chunk) {
      const int64_t n_rows = std::min(chunk, last - c0);
      Stopwatch watch;
      if (in.indexer) {
        scores.resize(static_cast<std::size_t>(n_rows * Lk));
        engine->scores(c0, n_rows, Lk, scores.data());
      }
      clock.score += watch.seconds();
      watch = Stopwatch();
      selection.assign(static_cast<std::size_t>(n_rows * width), -1);
      selected_scores.resize(selection.size());
      valid.resize(static_cast<std::size_t>(n_rows));
#pragma omp parallel
      {
        TopkScratch scratch;
        std::vector<int64_t> index_row;
#pragma omp for schedule(dynamic, 16)
        for (int64_t r = 0; r < n_rows; ++r) {
          valid[r] = select_row(in, b * Lq + c0 + r, in.indexer ? scores.data() + r * Lk : nullptr,
                                a.position(c0 + r) + 1, width, selection.data() + r * width,
                                selected_scores.data() + r * width, scratch, index_row);
        }
      }
      clock.select += watch.seconds();
      watch = Stopwatch();
      sparse_out.resize(static_cast<std::size_t>(n_k * n_rows * H * d_v));
      sparse_lse.resize(static_cast<std::size_t>(n_k * n_rows * H));
      for (int64_t ki = 0; ki < n_k; ++ki) {
        const int64_t k = in.topk[ki];
        prefix.resize(static_cast<std::size_t>(n_rows * k));
        for (int64_t r = 0; r < n_rows; ++r) {
          std::copy_n(selection.begin() + r * width, k, prefix.begin() + r * k);
          totals.sparse_positions[ki] += std::min(k, valid[r]);
        }
        // With the fp8 cache, sparse_out is the fp8 cache's and bf16_out the kv's own.
        detail::CompareEngine& sparse = fp8_engine ? *fp8_engine : *engine;
        sparse.attend(c0, n_rows, prefix.data(), k, sparse_out.data() + ki * n_rows * H * d_v,
                      sparse_lse.data() + ki * n_rows * H);
        if (fp8_engine) {
          bf16_out.resize(sparse_out.size());
          bf16_lse.resize(sparse_lse.size());
          engine->attend(c0, n_rows, prefix.data(), k, bf16_out.data() + ki * n_rows * H * d_v,
                         bf16_lse.data() + ki * n_rows * H);
        }
      }
      clock.sparse += watch.seconds();
      watch = Stopwatch();
      dense_out.resize(static_cast<std::size_t>(n_rows * H * d_v));
      dense_lse.resize(static_cast<std::size_t>(n_rows * H));
      p.resize(static_cast<std::size_t>(n_rows * Lk));
      engine->dense(c0, n_rows, dense_out.data(), dense_lse.data(), p.data(), Lk);
      clock.dense += watch.seconds();
      watch = Stopwatch();
#pragma omp parallel
      {
        RowScratch scratch;
        scratch.marks.assign(static_cast<std::size_t>(Lk), -1);
        std::vector<int64_t> local_needles(totals.needle_counts.size(), 0);
#pragma omp for schedule(dynamic, 16)
        for (int64_t r = 0; r < n_rows; ++r) {
          const int64_t row = b * Lq + c0 + r;
          for (int64_t ki = 0; ki < n_k; ++ki) {
            for (int64_t h = 0; h < H; ++h) {
              const double sparse_lse_h = sparse_lse[(ki * n_rows + r) * H + h];
              const double mass =
                  std::isinf(sparse_lse_h) ? 0.0 : std::exp(sparse_lse_h - dense_lse[r * H + h]);
              const auto [err, ref] =
                  head_metrics(sparse_out.data() + ((ki * n_rows + r) * H + h) * d_v,
                               dense_out.data() + (r * H + h) * d_v, d_v, mass, out.per_k[ki],
                               static_cast<std::size_t>(row * H + h));
              totals.error_squares[ki * rows + row] += err;
              totals.reference_squares[ki * rows + row] += ref;
              if (fp8_engine) {
                const std::size_t at = ((ki * n_rows + r) * H + h) * d_v;
                const auto [cache_err, cache_ref] =
                    detail::relative_error(sparse_out.data() + at, bf16_out.data() + at, d_v,
                                           out.per_k[ki].cache_rel_err[row * H + h]);
                totals.cache_error_squares[ki * rows + row] += cache_err;
                totals.cache_reference_squares[ki * rows + row] += cache_ref;
              }
            }
          }
          row_metrics(in, out, row, a.position(c0 + r), p.data() + r * Lk,
                      in.indexer ? scores.data() + r * Lk : nullptr, selection.data() + r * width,
                      valid[r], needles, scratch, local_needles);
        }
#pragma omp critical
        for (std::size_t i = 0; i < local_needles.size(); ++i)
          totals.needle_counts[i] += local_needles[i];
      }
      clock.metrics += watch.seconds();
      progress.advance(n_rows);
    }
    if (times) times->add("compare", compare_watch.seconds());
  }
}

}  // namespace

Summary summarize(const std::vector<double>& values) {
  Summary s;
  std::vector<double> sorted;
  sorted.reserve(values.size());
  for (double v : values) {
    if (std::isnan(v)) {
      ++s.undefined;
    } else {
      sorted.push_back(v);
    }
  }
  s.count = static_cast<int64_t>(sorted.size());
  if (sorted.empty()) return s;
  std::sort(sorted.begin(), sorted.end());
  double sum = 0;
  for (double v : sorted) sum += v;
  s.mean = sum / static_cast<double>(sorted.size());
  s.p50 = percentile(sorted, 50);
  s.p90 = percentile(sorted, 90);
  s.p99 = percentile(sorted, 99);
  s.min = sorted.front();
  s.max = sorted.back();
  return s;
}

nlohmann::json summary_json(const Summary& s) {
  return {{"count", s.count},
          {"undefined", s.undefined},
          {"mean", number_or_null(s.mean)},
          {"p50", number_or_null(s.p50)},
          {"p90", number_or_null(s.p90)},
          {"p99", number_or_null(s.p99)},
          {"min", number_or_null(s.min)},
          {"max", number_or_null(s.max)}};
}

std::vector<std::pair<int64_t, int64_t>> detail::read_needles(const Tensor& n, int64_t first_query,
                                                              int64_t end, const char* seen) {
  if (n.rank() != 2 || n.dim(1) != 2) {
    bad_input("{} (needles): expected shape [N, 2], got {}", n.name, shape_string(n.shape));
  }
  std::vector<int64_t> pairs(static_cast<std::size_t>(n.numel()));
  to_i64(n, 0, n.numel(), pairs.data());
  std::vector<std::pair<int64_t, int64_t>> needles;  // (t, s)
  for (int64_t i = 0; i < n.dim(0); ++i) {
    const int64_t t = pairs[2 * i], s = pairs[2 * i + 1];
    if (t < first_query || t >= end || s < 0 || s > t) {
      bad_input("{} (needles): row {} = ({}, {}) is not a query position and a {} it sees", n.name,
                i, t, s, seen);
    }
    needles.emplace_back(t, s);
  }
  std::sort(needles.begin(), needles.end());
  return needles;
}

std::pair<double, double> detail::relative_error(const float* out, const float* reference,
                                                 int64_t d_v, float& rel_err) {
  double err = 0, ref = 0;
  for (int64_t c = 0; c < d_v; ++c) {
    err += (double(out[c]) - reference[c]) * (double(out[c]) - reference[c]);
    ref += double(reference[c]) * reference[c];
  }
  rel_err = static_cast<float>(ref > 0 ? std::sqrt(err / ref)
                                       : (err > 0 ? std::numeric_limits<double>::infinity() : 0.0));
  return {err, ref};
}

Comparison detail::empty_comparison(int64_t batch, int64_t queries, int64_t keys, int64_t heads,
                                    const std::vector<int64_t>& ks, bool with_indexer) {
  Comparison out;
  out.batch = batch;
  out.queries = queries;
  out.keys = keys;
  out.heads = heads;
  const auto rows = static_cast<std::size_t>(out.rows());
  if (with_indexer) out.kl_dense.assign(rows, NAN);
  for (const int64_t k : ks) {
    Fidelity f;
    f.k = k;
    f.out_rel_err.assign(rows * static_cast<std::size_t>(heads), NAN);
    f.out_cosine = f.mass_recall_head = f.out_rel_err;
    f.mass_recall.assign(rows, NAN);
    f.topk_recall = f.kl_sparse = f.mass_recall;
    out.per_k.push_back(std::move(f));
  }
  return out;
}

Comparison compare_attention(const CompareInputs& in, StageTimes* times, Device device) {
  validate(in);
  const AttentionInputs& a = in.attention;
  const int64_t H = a.heads, Lk = a.keys, Lq = a.queries;
  const int64_t k_max = in.topk.back();
  const auto n_k = static_cast<int64_t>(in.topk.size());
  const std::vector<std::pair<int64_t, int64_t>> needles =
      in.needles ? detail::read_needles(*in.needles, Lk - Lq, Lk, "key")
                 : std::vector<std::pair<int64_t, int64_t>>{};
  Comparison out = detail::empty_comparison(a.batch, Lq, Lk, H, in.topk, in.indexer.has_value());
  const int64_t rows = out.rows();
  const int64_t width = in.indices ? in.indices->shape.back() : k_max;
  StageClock clock;
  // Squared output errors and norms per (k, row), summed in row order at the end so the
  // global ratios do not depend on how rows were spread over threads or ranks.
  RowTotals& totals = out.totals;
  totals.error_squares.assign(static_cast<std::size_t>(n_k * rows), 0.0);
  totals.reference_squares = totals.error_squares;
  totals.needle_counts.assign(static_cast<std::size_t>(2 * n_k), 0);
  totals.sparse_positions.assign(static_cast<std::size_t>(n_k), 0);
  if (in.fp8_cache) {
    totals.cache_error_squares = totals.cache_reference_squares = totals.error_squares;
    for (Fidelity& f : out.per_k) f.cache_rel_err.assign(f.out_rel_err.size(), NAN);
    out.kv_cache = "fp8";
  }

  compare_on_engine(detail::backend(device, compare_operation(in)), in, out, needles, width, totals,
                    clock, times);
  double visible_total = 0;
  for (int64_t t = 0; t < Lq; ++t) visible_total += static_cast<double>(a.position(t) + 1);
  visible_total *= static_cast<double>(a.batch);
  out.dense_flops = 2.0 * visible_total * static_cast<double>(H * (a.d_qk + a.d_v));
  if (in.indexer)
    out.indexer_flops =
        2.0 * visible_total * static_cast<double>(in.indexer->heads * in.indexer->dim);
  finish_comparison(in, out);
  out.stage_seconds = {{"score", clock.score},
                       {"select", clock.select},
                       {"sparse", clock.sparse},
                       {"dense", clock.dense},
                       {"metrics", clock.metrics}};
  return out;
}

void finish_comparison(const CompareInputs& in, Comparison& out) {
  const AttentionInputs& a = in.attention;
  const RowTotals& totals = out.totals;
  const int64_t rows = out.rows();
  for (std::size_t ki = 0; ki < out.per_k.size(); ++ki) {
    Fidelity& f = out.per_k[ki];
    f.error_squares_sparse = f.reference_squares_sparse = 0;
    f.error_squares_all = f.reference_squares_all = 0;
    f.cache_error_squares = f.cache_reference_squares = 0;
    const int64_t base = static_cast<int64_t>(ki) * rows;
    for (int64_t row = 0; row < rows; ++row) {
      const double err = totals.error_squares[base + row],
                   ref = totals.reference_squares[base + row];
      if (out.position(row) + 1 > f.k) {
        f.error_squares_sparse += err;
        f.reference_squares_sparse += ref;
      }
      f.error_squares_all += err;
      f.reference_squares_all += ref;
      if (!totals.cache_error_squares.empty()) {
        f.cache_error_squares += totals.cache_error_squares[base + row];
        f.cache_reference_squares += totals.cache_reference_squares[base + row];
      }
    }
    f.needles = totals.needle_counts[2 * ki];
    f.needles_selected = totals.needle_counts[2 * ki + 1];
    f.sparse_flops = 2.0 * static_cast<double>(totals.sparse_positions[ki]) *
                     static_cast<double>(a.heads * (a.d_qk + a.d_v));
  }
}

std::vector<RowRange> balanced_rows(const CompareInputs& in, int parts) {
  const AttentionInputs& a = in.attention;
  const int64_t k = in.indices ? in.indices->shape.back() : in.topk.back();
  // A row's work: its dense positions and its sparse ones (the indexer's scale as the dense
  // attention's, both linear in t + 1).
  return balanced_rows(a.batch, a.queries, share_alignment(in), parts, [&](int64_t t) {
    const int64_t visible = a.position(t) + 1;
    return static_cast<double>(visible + std::min(visible, k));
  });
}

namespace {

// Every per-row field of a comparison, in one order for pack_rows and unpack_rows: the values
// and how many a row has (C: Comparison, or const Comparison to read them).
template <typename C, typename F>
void for_each_row_field(C& c, F&& field) {
  const int64_t H = c.heads;
  if (!c.kl_dense.empty()) field(c.kl_dense.data(), 1);
  for (auto& f : c.per_k) {
    field(f.out_rel_err.data(), H);
    field(f.out_cosine.data(), H);
    field(f.mass_recall_head.data(), H);
    field(f.mass_recall.data(), 1);
    field(f.topk_recall.data(), 1);
    field(f.kl_sparse.data(), 1);
    if (!f.cache_rel_err.empty()) field(f.cache_rel_err.data(), H);
  }
  auto& t = c.totals;
  const int64_t rows = c.rows();
  for (std::size_t ki = 0; ki < c.per_k.size(); ++ki) {
    const int64_t base = static_cast<int64_t>(ki) * rows;
    field(t.error_squares.data() + base, 1);
    field(t.reference_squares.data() + base, 1);
    if (!t.cache_error_squares.empty()) {
      field(t.cache_error_squares.data() + base, 1);
      field(t.cache_reference_squares.data() + base, 1);
    }
  }
}

}  // namespace

std::vector<std::byte> pack_rows(const Comparison& c, RowRange rows) {
  std::vector<std::byte> out;
  auto append = [&](const void* data, std::size_t bytes) {
    const auto* p = static_cast<const std::byte*>(data);
    out.insert(out.end(), p, p + bytes);
  };
  for_each_row_field(c, [&](auto* values, int64_t per_row) {
    append(values + rows.begin * per_row,
           sizeof(*values) * static_cast<std::size_t>((rows.end - rows.begin) * per_row));
  });
  append(c.totals.needle_counts.data(), sizeof(int64_t) * c.totals.needle_counts.size());
  append(c.totals.sparse_positions.data(), sizeof(int64_t) * c.totals.sparse_positions.size());
  return out;
}

void unpack_rows(Comparison& c, RowRange rows, const std::vector<std::byte>& bytes) {
  std::size_t at = 0;
  auto take = [&](void* data, std::size_t n) {
    if (at + n > bytes.size())
      fail(ExitCode::runtime, "a share's results are shorter than its rows");
    std::memcpy(data, bytes.data() + at, n);
    at += n;
  };
  for_each_row_field(c, [&](auto* values, int64_t per_row) {
    take(values + rows.begin * per_row,
         sizeof(*values) * static_cast<std::size_t>((rows.end - rows.begin) * per_row));
  });
  // The counts are the share's own: they add to the others'.
  for (std::vector<int64_t>* counts : {&c.totals.needle_counts, &c.totals.sparse_positions}) {
    std::vector<int64_t> share(counts->size());
    take(share.data(), sizeof(int64_t) * share.size());
    for (std::size_t i = 0; i < share.size(); ++i) (*counts)[i] += share[i];
  }
  if (at != bytes.size()) fail(ExitCode::runtime, "a share's results are longer than its rows");
}

nlohmann::json comparison_json(const Comparison& c) {
  const int64_t H = c.heads;
  nlohmann::json results = nlohmann::json::array();
  for (const Fidelity& f : c.per_k) {
    // Split every metric into rows with t + 1 > k (sparse) and t + 1 <= k (exact).
    auto split = [&](const std::vector<float>& values, int64_t per_row) {
      std::vector<double> part[2];
      for (std::size_t i = 0; i < values.size(); ++i) {
        const int64_t row = static_cast<int64_t>(i) / per_row;
        part[c.visible(row) <= f.k].push_back(values[i]);
      }
      return nlohmann::json{{"sparse", summary_json(summarize(part[0]))},
                            {"exact", summary_json(summarize(part[1]))}};
    };
    int64_t exact_rows = 0;
    for (int64_t row = 0; row < c.rows(); ++row) exact_rows += c.visible(row) <= f.k;
    const bool with_indexer = !c.kl_dense.empty();
    nlohmann::json entry = {
        {"topk", f.k},
        {"rows", {{"sparse", c.rows() - exact_rows}, {"exact", exact_rows}}},
        {"out_rel_err", split(f.out_rel_err, H)},
        {"out_rel_err_global",
         {{"sparse",
           number_or_null(f.reference_squares_sparse > 0
                              ? std::sqrt(f.error_squares_sparse / f.reference_squares_sparse)
                              : kNaN)},
          {"all", number_or_null(f.reference_squares_all > 0
                                     ? std::sqrt(f.error_squares_all / f.reference_squares_all)
                                     : kNaN)}}},
        {"out_cosine", split(f.out_cosine, H)},
        {"mass_recall_head", split(f.mass_recall_head, H)},
        {"mass_recall", split(f.mass_recall, 1)},
        {"topk_recall", split(f.topk_recall, 1)},
        {"kl_dense", with_indexer ? split(c.kl_dense, 1) : nlohmann::json(nullptr)},
        {"kl_sparse", with_indexer ? split(f.kl_sparse, 1) : nlohmann::json(nullptr)},
        {"needle_recall",
         {{"needles", f.needles},
          {"selected", f.needles_selected},
          {"recall",
           number_or_null(f.needles > 0 ? double(f.needles_selected) / double(f.needles) : kNaN)}}},
        {"sparse_attention_flops", f.sparse_flops}};
    // Buckets by position: [0, k) is exact; then [k, 2k), [2k, 4k), ... up to Lk.
    nlohmann::json buckets = nlohmann::json::array();
    for (int64_t begin = 0, end = f.k; begin < c.keys; begin = end, end *= 2) {
      double sums[6] = {0, 0, 0, 0, 0, 0};
      int64_t counts[6] = {0, 0, 0, 0, 0, 0};
      auto add = [&](int metric, float v) {
        if (!std::isnan(v)) {
          sums[metric] += v;
          ++counts[metric];
        }
      };
      int64_t rows = 0;
      for (int64_t row = 0; row < c.rows(); ++row) {
        const int64_t t = c.visible(row) - 1;  // the position, or the last visible entry
        if (t < begin || t >= end) continue;
        ++rows;
        for (int64_t h = 0; h < H; ++h) {
          add(0, f.out_rel_err[row * H + h]);
          add(1, f.out_cosine[row * H + h]);
        }
        add(2, f.mass_recall[row]);
        add(3, f.topk_recall[row]);
        add(4, f.kl_sparse[row]);
        if (with_indexer) add(5, c.kl_dense[row]);
      }
      if (rows == 0) continue;
      auto mean = [&](int metric) {
        return number_or_null(counts[metric] ? sums[metric] / counts[metric] : kNaN);
      };
      buckets.push_back({{"begin", begin},
                         {"end", std::min(end, c.keys)},
                         {"rows", rows},
                         {"out_rel_err", mean(0)},
                         {"out_cosine", mean(1)},
                         {"mass_recall", mean(2)},
                         {"topk_recall", mean(3)},
                         {"kl_sparse", mean(4)},
                         {"kl_dense", mean(5)}});
    }
    entry["buckets"] = buckets;
    if (!f.cache_rel_err.empty()) {
      entry["kv_cache_loss"] = {
          {"cache", c.kv_cache},
          {"against", "bf16"},
          {"out_rel_err", split(f.cache_rel_err, H)},
          {"out_rel_err_global",
           number_or_null(f.cache_reference_squares > 0
                              ? std::sqrt(f.cache_error_squares / f.cache_reference_squares)
                              : kNaN)}};
    }
    results.push_back(entry);
  }
  return results;
}

namespace {

// What both kinds of comparison report alike: the indexer, the results, FLOPs and stage times.
void add_comparison_fields(nlohmann::json& report, const Comparison& comparison,
                           const std::optional<IndexerInputs>& indexer,
                           const IndexerConfig& config) {
  if (indexer) {
    report["shape"]["indexer_heads"] = indexer->heads;
    report["shape"]["indexer_dim"] = indexer->dim;
    report["indexer"] = indexer_config_json(config);
  }
  report["results"] = comparison_json(comparison);
  report["flops"] = {{"indexer", comparison.indexer_flops},
                     {"dense_attention", comparison.dense_flops}};
  nlohmann::json stage_ms = nlohmann::json::object();
  for (const auto& [stage, seconds] : comparison.stage_seconds) stage_ms[stage] = seconds * 1e3;
  report["stage_ms"] = stage_ms;
}

}  // namespace

nlohmann::json comparison_report(const CompareInputs& inputs, const Comparison& comparison) {
  const AttentionInputs& a = inputs.attention;
  nlohmann::json report;
  report["shape"] = {{"batch", a.batch}, {"queries", a.queries},   {"keys", a.keys},
                     {"heads", a.heads}, {"kv_heads", a.kv_heads}, {"d_qk", a.d_qk},
                     {"d_v", a.d_v}};
  report["layout"] = a.latent ? "mqa" : "mha";
  report["scale"] = inputs.scale;
  report["selection"] = inputs.indexer ? "indexer" : "indices";
  // What the sparse attention read: the fp8 cache, or the kv's own dtype (dense reads the latter).
  report["kv_cache"] = inputs.fp8_cache ? std::string("fp8") : dtype_name(a.k->dtype);
  add_comparison_fields(report, comparison, inputs.indexer, inputs.indexer_config);
  return report;
}

nlohmann::json comparison_report(const CompressedCompareInputs& inputs,
                                 const Comparison& comparison) {
  const CompressedAttentionInputs& a = inputs.attention;
  nlohmann::json report;
  report["shape"] = {{"batch", a.batch}, {"queries", a.queries}, {"keys", a.entries},
                     {"heads", a.heads}, {"kv_heads", 1},        {"d_qk", a.dim},
                     {"d_v", a.dim},     {"tokens", a.tokens},   {"entries", a.entries},
                     {"d", a.dim}};
  report["layout"] = "v4";
  report["attention"] = v4_attention_name(a.kind);
  report["reference"] = v4_reference_name(inputs.reference);
  report["window"] = a.window;
  report["compress_ratio"] = a.ratio;
  report["sink"] = a.sink != nullptr;
  report["scale"] = inputs.scale;
  report["selection"] = inputs.indexer ? "indexer" : inputs.indices ? "indices" : "every-entry";
  // What the selected attention read: V4's fp8 caches, or --kv's own dtype.
  report["kv_cache"] = inputs.fp8_cache ? std::string("fp8") : dtype_name(a.kv->dtype);
  add_comparison_fields(report, comparison, inputs.indexer, inputs.indexer_config);
  return report;
}

DeviceChoice choose_device(const std::string& name, const CompareInputs& inputs) {
  return detail::choose_device(name, compare_operation(inputs));
}

}  // namespace dsa
