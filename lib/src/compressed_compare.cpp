// DeepSeek-V4's fidelity report (metrics.hpp compare_compressed_attention; docs/DESIGN.md
// sections 2 and 6): CSA's selection or HCA's compression against a reference, in chunks of
// query rows, with the attention on the backends through compressed_attention.
#include <Eigen/Dense>
#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <optional>
#include <vector>

#include "compare_common.hpp"
#include "dsa/error.hpp"
#include "dsa/kv_cache.hpp"
#include "dsa/metrics.hpp"
#include "dsa/topk.hpp"
#include "progress.hpp"
#include "views.hpp"

namespace dsa {

namespace {

using RowMatrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr int64_t kChunkRows = 16;

// Rows [c0, c0 + n) of batch element b as inputs of their own: the queries are the last rows of
// the tokens up to the chunk's last query, so positions and visibility are the whole's. `dense`:
// causal attention over every raw token with the same sink (a window as long as the tokens).
// Over V4's fp8 caches the rows are their 584 bytes.
struct Chunk {
  Tensor q, kv, compressed;
  CompressedAttentionInputs in;
  Chunk(const CompressedAttentionInputs& a, int64_t b, int64_t c0, int64_t n, bool dense) {
    const int64_t d = a.dim, tokens = a.position(c0 + n - 1) + 1;
    const int64_t row = a.fp8_cache ? kV4CacheBytes : d;
    q = detail::view(*a.q, (b * a.queries + c0) * a.heads * d, {n, a.heads, d});
    kv = detail::view(*a.kv, b * a.tokens * row, {tokens, row});
    if (dense) {
      in = make_compressed_attention_inputs(q, kv, nullptr, a.sink, V4Attention::swa, tokens);
    } else {
      compressed = detail::view(*a.compressed, b * a.entries * row, {tokens / a.ratio, row});
      in = make_compressed_attention_inputs(q, kv, &compressed, a.sink, a.kind, a.window);
    }
  }
  Chunk(const Chunk&) = delete;
  Chunk& operator=(const Chunk&) = delete;
};

struct Output {
  std::vector<float> out, lse;
};

Output attend(const CompressedAttentionInputs& in, const Tensor* indices, float scale,
              Device device) {
  Output o;
  compressed_attention(
      in, indices, scale,
      [&](const AttentionBlock& block) {
        o.out.insert(o.out.end(), block.out, block.out + block.rows * block.heads * block.d_v);
        o.lse.insert(o.lse.end(), block.lse, block.lse + block.rows * block.heads);
      },
      nullptr, device);
  return o;
}

// KL(p || softmax(logits)) over the given entries, p renormalized over them.
float kl_divergence(const std::vector<double>& p, const std::vector<float>& logits) {
  double mass = 0, top = -INFINITY;
  for (std::size_t i = 0; i < p.size(); ++i) {
    mass += p[i];
    top = std::max(top, static_cast<double>(logits[i]));
  }
  if (!(mass > 0) || top == -INFINITY) return kNaN;
  double z = 0;
  for (float l : logits) z += std::exp(l - top);
  double kl = 0;
  for (std::size_t i = 0; i < p.size(); ++i) {
    if (p[i] <= 0) continue;
    const double pi = p[i] / mass, qi = std::exp(logits[i] - top) / z;
    kl += pi * (std::log(pi) - std::log(qi));
  }
  return static_cast<float>(kl);
}

}  // namespace

V4Reference parse_v4_reference(const std::string& text) {
  if (text == "every-entry") return V4Reference::every_entry;
  if (text == "dense") return V4Reference::dense;
  bad_usage("reference: expected every-entry or dense, got '{}'", text);
}

std::string v4_reference_name(V4Reference reference) {
  return reference == V4Reference::dense ? "dense" : "every-entry";
}

Comparison compare_compressed_attention(const CompressedCompareInputs& ci, StageTimes* times,
                                        Device device) {
  const CompressedAttentionInputs& a = ci.attention;
  const bool csa = a.kind == V4Attention::csa,
             against_entries = ci.reference == V4Reference::every_entry;
  if (a.kind == V4Attention::swa) {
    bad_usage("SWA attends the window alone: it has no selection or compression to compare");
  }
  if (!csa && (ci.indexer || ci.indices)) {
    bad_usage("HCA attends every visible entry: it takes no selection");
  }
  if (!csa && against_entries) {
    bad_usage(
        "HCA attends every visible entry, which is the every-entry reference itself: "
        "compare it with the dense reference");
  }
  if (csa && ci.indexer.has_value() == (ci.indices != nullptr)) {
    bad_usage("CSA: give either the indexer inputs or a precomputed selection");
  }
  std::vector<int64_t> ks = ci.topk;
  if (ci.indexer) {
    const IndexerInputs& x = *ci.indexer;
    if (x.batch != a.batch || x.queries != a.queries || x.keys != a.entries ||
        x.tokens != a.tokens || x.ratio != a.ratio) {
      bad_input(
          "{} (q_index) / {} (k_index): indexer shapes (B {}, Lq {}, {} keys of {} tokens) do "
          "not match the attention's (B {}, Lq {}, {} entries of {} tokens)",
          x.q_index->name, x.k_index->name, x.batch, x.queries, x.keys, x.ratio, a.batch, a.queries,
          a.entries, a.ratio);
    }
    if (ks.empty()) bad_usage("give at least one k");
    for (std::size_t i = 0; i < ks.size(); ++i) {
      if (ks[i] < 1 || (i > 0 && ks[i] <= ks[i - 1])) {
        bad_usage("the k values must be at least 1, distinct and ascending");
      }
    }
  } else if (ci.indices) {
    validate_compressed_indices(a, *ci.indices, ci.positions);
    ks = {ci.indices->shape.back()};
  } else {
    ks = {a.entries};  // HCA: every visible entry
  }
  if (const CompressedAttentionInputs* c = ci.fp8_cache) {
    if (!c->fp8_cache || a.fp8_cache || c->kind != a.kind || c->batch != a.batch ||
        c->queries != a.queries || c->tokens != a.tokens || c->entries != a.entries ||
        c->heads != a.heads || c->dim != a.dim || c->window != a.window ||
        (c->sink == nullptr) != (a.sink == nullptr)) {
      bad_usage(
          "the fp8 cache comparison needs V4's fp8 caches of the attention's own kv and "
          "compressed entries, with its queries and sink");
    }
  }
  const std::vector<std::pair<int64_t, int64_t>> needles =  // (t, s), ascending
      ci.needles ? detail::read_needles(*ci.needles, a.tokens - a.queries, a.tokens, "token")
                 : std::vector<std::pair<int64_t, int64_t>>{};

  const int64_t H = a.heads, d = a.dim, rows = a.batch * a.queries, kmax = ks.back();
  const int64_t width = std::min(kmax, a.entries);
  const bool with_indexer = ci.indexer.has_value();
  Comparison out = detail::empty_comparison(a.batch, a.queries, a.entries, H, ks, with_indexer);
  out.tokens = a.tokens;
  out.ratio = a.ratio;
  if (ci.fp8_cache) {
    for (Fidelity& f : out.per_k) f.cache_rel_err.assign(f.out_rel_err.size(), kNaN);
    out.kv_cache = "fp8";
  }
  const auto window_length = [&](int64_t t) { return std::min(a.window, t + 1); };
  Stopwatch clock;
  double seconds_reference = 0, seconds_score = 0, seconds_select = 0, seconds_sparse = 0,
         seconds_metrics = 0;
  // The attention calls inside report nothing: this stage holds the caller's line.
  detail::Progress progress("compare", rows);
  for (int64_t b = 0; b < a.batch; ++b) {
    std::unique_ptr<IndexerKernel> kernel;
    if (with_indexer) kernel = std::make_unique<IndexerKernel>(*ci.indexer, ci.indexer_config, b);
    RowMatrix entries;  // the compressed entries in f32, for the reference's probabilities
    if (csa && against_entries) {
      entries.resize(a.entries, d);
      to_f32(*a.compressed, b * a.entries * d, a.entries * d, entries.data());
    }
    TopkScratch scratch;
    for (int64_t c0 = 0; c0 < a.queries; c0 += kChunkRows) {
      const int64_t n = std::min(kChunkRows, a.queries - c0);
      Stopwatch watch;
      const Chunk sparse_inputs(a, b, c0, n, false);
      // The every-entry reference is the same inputs without a selection.
      std::optional<Chunk> dense_inputs;
      if (!against_entries) dense_inputs.emplace(a, b, c0, n, true);
      const Chunk& reference_inputs = against_entries ? sparse_inputs : *dense_inputs;
      // With the fp8 caches the selected attention reads them, and also the values (the loss).
      std::optional<Chunk> cache_inputs;
      if (ci.fp8_cache) cache_inputs.emplace(*ci.fp8_cache, b, c0, n, false);
      const Chunk& attended = cache_inputs ? *cache_inputs : sparse_inputs;
      const Output reference = attend(reference_inputs.in, nullptr, ci.scale, device);
      seconds_reference += watch.seconds();
      // The selection at the largest k, per row: indexer scores and top-k, or the given rows.
      watch = Stopwatch();
      std::vector<int32_t> selection(static_cast<std::size_t>(n * width), -1);
      std::vector<float> scores;
      if (with_indexer) {
        scores.resize(static_cast<std::size_t>(n * a.entries));
        kernel->score_rows(c0, n, scores.data(), a.entries);
        seconds_score += watch.seconds();
        watch = Stopwatch();
        std::vector<int32_t> picked(static_cast<std::size_t>(kmax));
        std::vector<float> picked_scores(static_cast<std::size_t>(kmax));
        for (int64_t r = 0; r < n; ++r) {
          select_topk_row(scores.data() + r * a.entries, a.visible_entries(c0 + r), kmax,
                          picked.data(), picked_scores.data(), scratch);
          std::copy(picked.begin(), picked.begin() + width, selection.begin() + r * width);
        }
      } else if (ci.indices) {
        std::vector<int64_t> row(static_cast<std::size_t>(width));
        for (int64_t r = 0; r < n; ++r) {
          to_i64(*ci.indices, (b * a.queries + c0 + r) * width, width, row.data());
          for (int64_t i = 0; i < width; ++i)
            selection[r * width + i] = static_cast<int32_t>(row[i]);
        }
      }
      seconds_select += watch.seconds();
      // The reference's head-averaged probability of every visible entry (CSA, every-entry).
      watch = Stopwatch();
      std::vector<std::vector<double>> entry_mass(static_cast<std::size_t>(n));
      if (csa && against_entries) {
        RowMatrix q(H, d);
        for (int64_t r = 0; r < n; ++r) {
          const int64_t visible = a.visible_entries(c0 + r);
          to_f32(*a.q, ((b * a.queries + c0 + r) * H) * d, H * d, q.data());
          const RowMatrix logits = q * entries.topRows(visible).transpose();
          std::vector<double>& mass = entry_mass[r];
          mass.assign(static_cast<std::size_t>(visible), 0.0);
          for (int64_t h = 0; h < H; ++h) {
            const double lse = reference.lse[r * H + h];
            for (int64_t j = 0; j < visible; ++j) {
              mass[j] += std::exp(double(ci.scale) * logits(h, j) - lse) / double(H);
            }
          }
        }
      }
      seconds_metrics += watch.seconds();
      for (std::size_t ki = 0; ki < ks.size(); ++ki) {
        Fidelity& f = out.per_k[ki];
        const int64_t k = std::min(ks[ki], width);
        watch = Stopwatch();
        Output sparse, values;  // values: over attention's own values, with the fp8 caches
        std::optional<Tensor> idx;
        if (csa) {
          idx = make_tensor(DType::i32, {n, k}, "selection");
          for (int64_t r = 0; r < n; ++r) {
            std::copy(selection.begin() + r * width, selection.begin() + r * width + k,
                      mutable_data<int32_t>(*idx) + r * k);
          }
        }
        const Tensor* chosen = idx ? &*idx : nullptr;
        sparse = attend(attended.in, chosen, ci.scale, device);
        if (cache_inputs) values = attend(sparse_inputs.in, chosen, ci.scale, device);
        seconds_sparse += watch.seconds();
        watch = Stopwatch();
        for (int64_t r = 0; r < n; ++r) {
          const int64_t row = b * a.queries + c0 + r, t = a.position(c0 + r);
          const int64_t visible = a.visible_entries(c0 + r);
          const int32_t* sel = selection.data() + r * width;
          int64_t kept = visible;  // HCA: every visible entry
          if (csa) kept = std::count_if(sel, sel + k, [](int32_t j) { return j >= 0; });
          f.sparse_flops += 2.0 * H * 2 * d * double(window_length(t) + kept);
          double row_mass = 0;
          for (int64_t h = 0; h < H; ++h) {
            const float* o = sparse.out.data() + (r * H + h) * d;
            const float* ref = reference.out.data() + (r * H + h) * d;
            double err = 0, norm = 0, norm_o = 0, dot = 0;
            for (int64_t e = 0; e < d; ++e) {
              err += double(o[e] - ref[e]) * (o[e] - ref[e]);
              norm += double(ref[e]) * ref[e];
              norm_o += double(o[e]) * o[e];
              dot += double(o[e]) * ref[e];
            }
            f.out_rel_err[row * H + h] =
                norm > 0 ? static_cast<float>(std::sqrt(err / norm)) : kNaN;
            f.out_cosine[row * H + h] =
                norm > 0 && norm_o > 0 ? static_cast<float>(dot / std::sqrt(norm * norm_o)) : kNaN;
            f.error_squares_all += err;
            f.reference_squares_all += norm;
            if (visible > ks[ki]) {
              f.error_squares_sparse += err;
              f.reference_squares_sparse += norm;
            }
            if (cache_inputs) {
              const auto [cache_err, cache_norm] = detail::relative_error(
                  o, values.out.data() + (r * H + h) * d, d, f.cache_rel_err[row * H + h]);
              f.cache_error_squares += cache_err;
              f.cache_reference_squares += cache_norm;
            }
            if (against_entries) {
              const double m = std::exp(double(sparse.lse[r * H + h]) - reference.lse[r * H + h]);
              f.mass_recall_head[row * H + h] = static_cast<float>(m);
              row_mass += m / double(H);
            }
          }
          if (against_entries) f.mass_recall[row] = static_cast<float>(row_mass);
          if (csa && against_entries && visible > 0) {
            // The reference's top min(k, visible) entries by probability against S_t.
            const std::vector<double>& mass = entry_mass[r];
            std::vector<float> as_scores(mass.begin(), mass.end());
            std::vector<int32_t> best(static_cast<std::size_t>(k));
            std::vector<float> best_scores(static_cast<std::size_t>(k));
            select_topk_row(as_scores.data(), visible, k, best.data(), best_scores.data(), scratch);
            int64_t hits = 0;
            for (int64_t i = 0; i < k; ++i) {
              if (best[i] >= 0 && std::find(sel, sel + k, best[i]) != sel + k) ++hits;
            }
            f.topk_recall[row] = static_cast<float>(double(hits) / double(std::min(k, visible)));
            if (with_indexer) {
              const float* score = scores.data() + r * a.entries;
              std::vector<double> p;
              std::vector<float> l;
              for (int64_t i = 0; i < k; ++i) {
                if (sel[i] < 0) continue;
                p.push_back(mass[sel[i]]);
                l.push_back(score[sel[i]]);
              }
              f.kl_sparse[row] = kl_divergence(p, l);
              if (ki == 0) {
                out.kl_dense[row] = kl_divergence(mass, std::vector<float>(score, score + visible));
              }
            }
          }
          // Needles: kept when the token is in the window or an entry pooling it is attended.
          for (auto it =
                   std::lower_bound(needles.begin(), needles.end(), std::make_pair(t, int64_t{-1}));
               it != needles.end() && it->first == t; ++it) {
            const int64_t s = it->second;
            ++f.needles;
            bool held = s > t - a.window;
            const int64_t own = s / a.ratio, next = a.ratio == 4 ? own + 1 : own;
            if (!held && csa) {
              held = std::any_of(sel, sel + k, [&](int32_t j) { return j == own || j == next; });
            } else if (!held) {
              held = own < visible;
            }
            f.needles_selected += held;
          }
        }
        seconds_metrics += watch.seconds();
      }
      progress.advance(n);
    }
  }
  for (int64_t row = 0; row < rows; ++row) {
    const int64_t t = a.position(row % a.queries), visible = a.visible_entries(row % a.queries);
    out.dense_flops +=
        2.0 * H * 2 * d * double(against_entries ? window_length(t) + visible : t + 1);
    if (with_indexer) {
      out.indexer_flops += 2.0 * ci.indexer->heads * ci.indexer->dim * double(visible);
    }
  }
  // The stages of compare_attention's report: "dense" is the reference's attention.
  out.stage_seconds = {{"score", seconds_score},
                       {"select", seconds_select},
                       {"sparse", seconds_sparse},
                       {"dense", seconds_reference},
                       {"metrics", seconds_metrics}};
  if (times) times->add("compare", clock.seconds());
  return out;
}

}  // namespace dsa
