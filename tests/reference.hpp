// Straightforward fp64 references of DESIGN.md section 1, and random inputs for the tests.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include "dsa/tensor.hpp"

namespace dsa::test {

inline Tensor random_tensor(Shape shape, std::mt19937_64& rng, float stddev = 1.0f,
                            const std::string& name = "random") {
  Tensor t = make_tensor(DType::f32, std::move(shape), name);
  std::normal_distribution<float> normal(0.0f, stddev);
  float* p = mutable_data<float>(t);
  for (int64_t i = 0; i < t.numel(); ++i) p[i] = normal(rng);
  return t;
}

inline const float* f32(const Tensor& t) {
  return reinterpret_cast<const float*>(t.data);
}

// Eq. 1 in fp64 for one batch element: I [Lq, Lk], -inf where s > position.
inline std::vector<double> reference_scores(const float* q, const float* k, const float* w,
                                            int64_t Lq, int64_t Lk, int64_t H, int64_t d) {
  std::vector<double> I(static_cast<std::size_t>(Lq * Lk),
                        -std::numeric_limits<double>::infinity());
  for (int64_t t = 0; t < Lq; ++t) {
    const int64_t pos = Lk - Lq + t;
    for (int64_t s = 0; s <= pos; ++s) {
      double sum = 0;
      for (int64_t j = 0; j < H; ++j) {
        double dot = 0;
        for (int64_t c = 0; c < d; ++c) dot += double(q[(t * H + j) * d + c]) * k[s * d + c];
        sum += double(w[t * H + j]) * std::max(0.0, dot);
      }
      I[t * Lk + s] = sum;
    }
  }
  return I;
}

// Eq. 2 by full sort: indices of the k best visible entries, ties lower position first.
inline std::vector<int32_t> reference_topk(const double* row, int64_t visible, int64_t k) {
  std::vector<int32_t> order(static_cast<std::size_t>(visible));
  for (int64_t s = 0; s < visible; ++s) order[s] = static_cast<int32_t>(s);
  std::stable_sort(order.begin(), order.end(),
                   [&](int32_t a, int32_t b) { return row[a] > row[b]; });
  order.resize(static_cast<std::size_t>(std::min(visible, k)));
  order.resize(static_cast<std::size_t>(k), -1);
  return order;
}

// Attention of one query row (all heads) over `selected` in fp64: out [H, d_v], lse [H].
// key(s, g) and value(s, g) return pointers to position s of kv head g.
template <typename KeyFn, typename ValueFn>
void reference_attention_row(const float* q, int64_t H, int64_t H_kv, int64_t d_qk, int64_t d_v,
                             const std::vector<int64_t>& selected, double scale, KeyFn key,
                             ValueFn value, std::vector<double>& out, std::vector<double>& lse) {
  out.assign(static_cast<std::size_t>(H * d_v), 0.0);
  lse.assign(static_cast<std::size_t>(H), -std::numeric_limits<double>::infinity());
  if (selected.empty()) return;
  const int64_t group = H / H_kv;
  for (int64_t h = 0; h < H; ++h) {
    const int64_t g = h / group;
    std::vector<double> logits;
    for (int64_t s : selected) {
      double dot = 0;
      for (int64_t c = 0; c < d_qk; ++c) dot += double(q[h * d_qk + c]) * key(s, g)[c];
      logits.push_back(scale * dot);
    }
    const double m = *std::max_element(logits.begin(), logits.end());
    double sum = 0;
    for (double& l : logits) sum += (l = std::exp(l - m));
    for (std::size_t i = 0; i < selected.size(); ++i) {
      const float* v = value(selected[i], g);
      for (int64_t c = 0; c < d_v; ++c) out[h * d_v + c] += logits[i] / sum * v[c];
    }
    lse[h] = m + std::log(sum);
  }
}

// DeepSeek-V4's attention (compressed_attention.hpp) in fp64 for one row and head: the window
// tokens and `entries` of the compressed ones, the sink in the denominator. Returns o [d] and
// the whole denominator's log in lse.
inline std::vector<double> reference_v4_row(const float* q, const float* kv, const float* entries,
                                            int64_t d, int64_t t, int64_t window,
                                            const std::vector<int64_t>& selected, double sink,
                                            double scale, double& lse) {
  std::vector<const float*> keys;
  for (int64_t s = std::max<int64_t>(0, t - window + 1); s <= t; ++s) keys.push_back(kv + s * d);
  for (int64_t j : selected) {
    if (j >= 0) keys.push_back(entries + j * d);
  }
  std::vector<double> logit;
  for (const float* k : keys) {
    double dot = 0;
    for (int64_t e = 0; e < d; ++e) dot += double(q[e]) * k[e];
    logit.push_back(scale * dot);
  }
  double top = sink;
  for (double l : logit) top = std::max(top, l);
  double total = std::exp(sink - top);
  for (double& l : logit) total += (l = std::exp(l - top));
  std::vector<double> o(static_cast<std::size_t>(d), 0.0);
  for (std::size_t u = 0; u < keys.size(); ++u) {
    for (int64_t e = 0; e < d; ++e) o[e] += logit[u] / total * keys[u][e];
  }
  lse = top + std::log(total);
  return o;
}

}  // namespace dsa::test
