#include "dsa/indexer_weights.hpp"

#include <cmath>
#include <random>

#include "dsa/error.hpp"
#include "dsa/io.hpp"

namespace dsa {

namespace {

std::size_t count(int64_t n) {
  return static_cast<std::size_t>(n);
}

Tensor f32_tensor(const std::vector<double>& values, Shape shape, std::string name) {
  Tensor t = make_tensor(DType::f32, std::move(shape), std::move(name));
  float* out = mutable_data<float>(t);
  for (std::size_t i = 0; i < values.size(); ++i) out[i] = static_cast<float>(values[i]);
  return t;
}

// The tensor `name` of `path` as doubles, after checking its shape.
std::vector<double> read_parameter(const std::string& path, const std::string& name,
                                   const Shape& expected, const char* what) {
  const Tensor t = read_tensor(path + ":" + name);
  if (!is_floating(t.dtype)) {
    bad_input("{}: {} must be floating point, got {}", t.name, what, dtype_name(t.dtype));
  }
  if (t.shape != expected) {
    bad_input("{}: {} expected shape {}, got {}", t.name, what, shape_string(expected),
              shape_string(t.shape));
  }
  std::vector<float> f = to_f32(t);
  return {f.begin(), f.end()};
}

}  // namespace

IndexerWeights zero_indexer_weights(int64_t d_model, int64_t heads, int64_t dim) {
  if (d_model < 1 || heads < 1 || dim < 1) {
    bad_usage("indexer sizes must be positive, got d_model {}, H_I {}, d_I {}", d_model, heads,
              dim);
  }
  IndexerWeights w;
  w.d_model = d_model;
  w.heads = heads;
  w.dim = dim;
  w.wq.assign(count(heads * dim * d_model), 0.0);
  w.wk.assign(count(dim * d_model), 0.0);
  w.k_norm_weight.assign(count(dim), 0.0);
  w.k_norm_bias.assign(count(dim), 0.0);
  w.weights_proj.assign(count(heads * d_model), 0.0);
  return w;
}

IndexerWeights random_indexer_weights(int64_t d_model, int64_t heads, int64_t dim, uint64_t seed) {
  IndexerWeights w = zero_indexer_weights(d_model, heads, dim);
  std::mt19937_64 engine(seed);
  const double bound = 1.0 / std::sqrt(static_cast<double>(d_model));
  // Uniform in [-bound, bound) from the top 53 bits: the same numbers with every standard library.
  auto uniform = [&] { return (static_cast<double>(engine() >> 11) * 0x1p-52 - 1.0) * bound; };
  for (double& x : w.wq) x = uniform();
  for (double& x : w.wk) x = uniform();
  // The released model multiplies w by H_I^-0.5 d_I^-0.5 when it scores; we fold that factor
  // into the start instead, so the first scores are O(1). A positive factor on w leaves the
  // ranking, and so the random indexer's selection, unchanged.
  const double fold = 1.0 / std::sqrt(static_cast<double>(heads * dim));
  for (double& x : w.weights_proj) x = uniform() * fold;
  w.k_norm_weight.assign(count(dim), 1.0);
  return w;
}

std::vector<std::vector<double>*> parameters(IndexerWeights& w) {
  return {&w.wq, &w.wk, &w.k_norm_weight, &w.k_norm_bias, &w.weights_proj};
}

IndexerWeightNames indexer_weight_names(const std::string& prefix) {
  return {prefix + "wq_b.weight", prefix + "wk.weight", prefix + "k_norm.weight",
          prefix + "k_norm.bias", prefix + "weights_proj.weight"};
}

std::vector<Tensor> indexer_weight_tensors(const IndexerWeights& w, const std::string& prefix) {
  const IndexerWeightNames names = indexer_weight_names(prefix);
  return {f32_tensor(w.wq, {w.heads * w.dim, w.d_model}, names.wq),
          f32_tensor(w.wk, {w.dim, w.d_model}, names.wk),
          f32_tensor(w.k_norm_weight, {w.dim}, names.k_norm_weight),
          f32_tensor(w.k_norm_bias, {w.dim}, names.k_norm_bias),
          f32_tensor(w.weights_proj, {w.heads, w.d_model}, names.weights_proj)};
}

IndexerWeights read_indexer_weights(const std::string& path, const std::string& prefix) {
  const IndexerWeightNames names = indexer_weight_names(prefix);
  if (format_of(path) != FileFormat::safetensors) {
    bad_input("{}: indexer weights must be a .safetensors file holding {}, {}, {}, {} and {}", path,
              names.wq, names.wk, names.k_norm_weight, names.k_norm_bias, names.weights_proj);
  }
  // wk fixes d_I and d_model, weights_proj H_I; wq_b must then be [H_I * d_I, d_model].
  const Tensor wk = read_tensor(path + ":" + names.wk);
  if (wk.rank() != 2) {
    bad_input("{}: wk expected shape [d_I, d_model], got {}", wk.name, shape_string(wk.shape));
  }
  const Tensor proj = read_tensor(path + ":" + names.weights_proj);
  if (proj.rank() != 2 || proj.dim(1) != wk.dim(1)) {
    bad_input("{}: weights_proj expected shape [H_I, {}] (d_model from wk), got {}", proj.name,
              wk.dim(1), shape_string(proj.shape));
  }
  IndexerWeights w = zero_indexer_weights(wk.dim(1), proj.dim(0), wk.dim(0));
  w.wk = read_parameter(path, names.wk, {w.dim, w.d_model}, "wk");
  w.weights_proj = read_parameter(path, names.weights_proj, {w.heads, w.d_model}, "weights_proj");
  w.wq = read_parameter(path, names.wq, {w.heads * w.dim, w.d_model}, "wq_b (H_I * d_I rows)");
  w.k_norm_weight = read_parameter(path, names.k_norm_weight, {w.dim}, "k_norm weight");
  w.k_norm_bias = read_parameter(path, names.k_norm_bias, {w.dim}, "k_norm bias");
  return w;
}

IndexerProjection project_indexer(const Tensor& hidden, const IndexerWeights& w) {
  const int64_t D = w.d_model, H_I = w.heads, d_I = w.dim;
  if (hidden.rank() < 2 || hidden.shape.back() != D || !is_floating(hidden.dtype)) {
    bad_input(
        "{} (hidden): expected floating point [..., {}] (d_model of the indexer weights), "
        "got {} {}",
        hidden.name, D, dtype_name(hidden.dtype), shape_string(hidden.shape));
  }
  Shape lead(hidden.shape.begin(), hidden.shape.end() - 1);
  const int64_t tokens = shape_numel(lead);
  auto with = [&](std::initializer_list<int64_t> tail) {
    Shape s = lead;
    s.insert(s.end(), tail);
    return s;
  };
  IndexerProjection out{make_tensor(DType::f32, with({H_I, d_I}), "q_index"),
                        make_tensor(DType::f32, with({d_I}), "k_index"),
                        make_tensor(DType::f32, with({H_I}), "weights")};
  float* q = mutable_data<float>(out.q_index);
  float* k = mutable_data<float>(out.k_index);
  float* weights = mutable_data<float>(out.weights);
#pragma omp parallel
  {
    std::vector<float> row(count(D));
    std::vector<double> y(count(d_I));
    auto project = [&](const std::vector<double>& matrix, int64_t r) {
      double sum = 0;
      for (int64_t c = 0; c < D; ++c) sum += matrix[count(r * D + c)] * double(row[count(c)]);
      return sum;
    };
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tokens; ++t) {
      to_f32(hidden, t * D, D, row.data());
      for (int64_t r = 0; r < H_I * d_I; ++r) q[t * H_I * d_I + r] = float(project(w.wq, r));
      for (int64_t j = 0; j < H_I; ++j) weights[t * H_I + j] = float(project(w.weights_proj, j));
      double mean = 0, var = 0;
      for (int64_t e = 0; e < d_I; ++e) mean += (y[count(e)] = project(w.wk, e));
      mean /= static_cast<double>(d_I);
      for (int64_t e = 0; e < d_I; ++e) var += (y[count(e)] - mean) * (y[count(e)] - mean);
      const double inv = 1.0 / std::sqrt(var / static_cast<double>(d_I) + kIndexerNormEps);
      for (int64_t e = 0; e < d_I; ++e) {
        k[t * d_I + e] = static_cast<float>((y[count(e)] - mean) * inv * w.k_norm_weight[count(e)] +
                                            w.k_norm_bias[count(e)]);
      }
    }
  }
  return out;
}

}  // namespace dsa
