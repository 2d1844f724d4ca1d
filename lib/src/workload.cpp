#include "dsa/workload.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <random>
#include <vector>

#include "dsa/attention.hpp"
#include "dsa/error.hpp"
#include "dsa/precision.hpp"
#include "progress.hpp"

namespace dsa {

namespace {

constexpr double kPi = 3.14159265358979323846;
constexpr double kLn2 = 0.69314718055994530942;
constexpr double kSqrtHalf = 0.70710678118654752440;

// Independent random streams: one for the setup, one per row of each tensor's noise.
enum class Stream : uint64_t { setup = 1, q = 2, kv = 3, q_index = 4, k_index = 5, hidden = 6 };

uint64_t splitmix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

// log(x) for finite x > 0 from +, *, / only (libm's log differs between libraries by an ulp):
// x = m 2^e with m in [sqrt(1/2), sqrt(2)), log m = 2 atanh((m-1)/(m+1)) by its series.
double portable_log(double x) {
  int e = 0;
  double m = std::frexp(x, &e);
  if (m < kSqrtHalf) {
    m *= 2;
    --e;
  }
  const double z = (m - 1) / (m + 1), z2 = z * z;  // |z| <= 0.172: 13 terms reach 1e-20
  double series = 1.0 / 25;
  for (int k = 11; k >= 0; --k) series = series * z2 + 1.0 / (2 * k + 1);
  return 2 * z * series + e * kLn2;
}

// sin and cos of 2π·turns from a Taylor series on [-π/4, π/4] and the quarter-turn symmetry.
void sincos_turns(double turns, double& sine, double& cosine) {
  const double x = turns - std::floor(turns);
  const double quarter = std::floor(4 * x + 0.5);  // 0..4
  const double theta = 2 * kPi * (x - quarter / 4), theta2 = theta * theta;
  double s = 1, c = 1;  // degree 19 and 18: error below 1e-19 for |theta| <= π/4
  for (int k = 9; k >= 1; --k) {
    s = 1 - s * theta2 / ((2 * k) * (2 * k + 1));
    c = 1 - c * theta2 / ((2 * k - 1) * (2 * k));
  }
  s *= theta;
  switch (static_cast<int>(quarter) % 4) {
    case 0:
      sine = s, cosine = c;
      break;
    case 1:
      sine = c, cosine = -s;
      break;
    case 2:
      sine = -s, cosine = -c;
      break;
    default:
      sine = -c, cosine = s;
      break;
  }
}

// Uniform and Gaussian numbers that are the same on every platform (see the header).
class Random {
 public:
  Random(uint64_t seed, Stream stream, int64_t row)
      : engine_(splitmix64(splitmix64(splitmix64(seed) ^ static_cast<uint64_t>(stream)) ^
                           static_cast<uint64_t>(row))) {}

  double uniform() { return static_cast<double>(engine_() >> 11) * 0x1p-53; }  // [0, 1)
  int64_t below(int64_t n) {
    return std::min(n - 1, static_cast<int64_t>(uniform() * static_cast<double>(n)));
  }
  // Marsaglia's polar method: two standard normals per accepted pair.
  double normal() {
    if (has_spare_) {
      has_spare_ = false;
      return spare_;
    }
    double u, v, r2;
    do {
      u = 2 * uniform() - 1;
      v = 2 * uniform() - 1;
      r2 = u * u + v * v;
    } while (r2 >= 1 || r2 == 0);
    const double factor = std::sqrt(-2 * portable_log(r2) / r2);
    spare_ = v * factor;
    has_spare_ = true;
    return u * factor;
  }

 private:
  std::mt19937_64 engine_;
  double spare_ = 0;
  bool has_spare_ = false;
};

double dot(const double* a, const double* b, int64_t n) {
  double sum = 0;
  for (int64_t i = 0; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

// `count` orthonormal vectors of length n (count <= n): Gram-Schmidt, applied twice so the
// result is orthonormal to rounding, on Gaussian vectors. Row-major [count, n].
std::vector<double> random_orthonormal_rows(int64_t count, int64_t n, Random& random) {
  std::vector<double> rows(static_cast<std::size_t>(count * n));
  for (int64_t i = 0; i < count; ++i) {
    double* v = rows.data() + i * n;
    for (int64_t d = 0; d < n; ++d) v[d] = random.normal();
    for (int pass = 0; pass < 2; ++pass) {
      for (int64_t j = 0; j < i; ++j) {
        const double* u = rows.data() + j * n;
        const double projection = dot(v, u, n);
        for (int64_t d = 0; d < n; ++d) v[d] -= projection * u[d];
      }
      const double norm = std::sqrt(dot(v, v, n));
      for (int64_t d = 0; d < n; ++d) v[d] /= norm;
    }
  }
  return rows;
}

void check_positive(int64_t value, const char* field) {
  if (value < 1) bad_usage("workload: {} must be positive, got {}", field, value);
}

void check_non_negative(double value, const char* field) {
  if (!(std::isfinite(value) && value >= 0))
    bad_usage("workload: {} must be finite and non-negative, got {}", field, value);
}

// Everything the rows need, drawn once from the setup stream.
struct Structure {
  int64_t rank = 0, local_pairs = 0, needle_dims = 0;
  int64_t local_begin = 1, needle_begin = 0;  // coefficient 0 is the sink direction
  std::vector<double> basis;                  // U [d_qk, r], row-major
  std::vector<double> index_map;              // R [r, d_I]
  std::vector<double> frequencies;            // local frequencies, in turns per position
  std::vector<double> sink_gain, local_gain, needle_gain;  // per main head
  double sink_amplitude = 0, local_amplitude = 0, needle_amplitude = 0;
  std::vector<int32_t> needle_pairs;      // (t, s) pairs, sorted by t
  std::vector<double> needle_directions;  // [N, needle_dims], unit rows
  std::vector<int64_t> needle_of_query;   // [L]: the needle whose query is t, or -1
  std::vector<double> key_coefficients;   // [L, r]
};

Structure make_structure(const WorkloadConfig& c) {
  Structure st;
  const int64_t r = c.rank;
  st.rank = r;
  st.local_pairs = (r - 1) / 4;
  st.needle_begin = st.local_begin + 2 * st.local_pairs;
  st.needle_dims = r - st.needle_begin;
  const double scale = c.scale;
  st.sink_amplitude = std::sqrt(c.sink_logit / scale);
  st.local_amplitude = std::sqrt(c.local_logit / (scale * static_cast<double>(st.local_pairs)));
  st.needle_amplitude = std::sqrt(c.needle_logit / scale);

  Random random(c.seed, Stream::setup, 0);
  const std::vector<double> basis_rows = random_orthonormal_rows(r, c.d_qk, random);
  st.basis.resize(static_cast<std::size_t>(c.d_qk * r));
  for (int64_t i = 0; i < r; ++i) {
    for (int64_t d = 0; d < c.d_qk; ++d) st.basis[d * r + i] = basis_rows[i * c.d_qk + d];
  }
  st.index_map = random_orthonormal_rows(r, c.indexer_dim, random);
  // ω_i = π (i + v_i) / (pairs · window), v_i in (0, 1]: stratified over (0, π/window], and
  // not evenly spaced, which would make mean_i cos(ω_i d) periodic in d.
  for (int64_t i = 0; i < st.local_pairs; ++i) {
    const double v = 1 - random.uniform();
    st.frequencies.push_back((static_cast<double>(i) + v) /
                             (2.0 * static_cast<double>(st.local_pairs * c.window)));
  }
  for (int64_t h = 0; h < c.heads; ++h) {
    st.sink_gain.push_back(0.5 + random.uniform());
    st.local_gain.push_back(0.5 + random.uniform());
    st.needle_gain.push_back(0.5 + random.uniform());
  }

  // Needle queries: one per stratum of [t_begin, L), t_begin the later half of the sequence
  // unless the minimum distance pushes it further.
  const int64_t distance = c.needle_min_distance, first = distance + c.sinks;
  if (c.needles > 0 && std::max(first, c.length - c.queries) < c.length) {
    const int64_t t_begin = std::max({first, c.length / 2, c.length - c.queries});
    const int64_t span = c.length - t_begin;
    const int64_t count = std::min(c.needles, span);
    for (int64_t n = 0; n < count; ++n) {
      const int64_t lo = t_begin + n * span / count, hi = t_begin + (n + 1) * span / count;
      const int64_t t = lo + random.below(hi - lo);
      const int64_t s = c.sinks + random.below(t - distance - c.sinks + 1);
      st.needle_pairs.push_back(static_cast<int32_t>(t));
      st.needle_pairs.push_back(static_cast<int32_t>(s));
      std::vector<double> u(static_cast<std::size_t>(st.needle_dims));
      for (double& x : u) x = random.normal();
      const double norm = std::sqrt(dot(u.data(), u.data(), st.needle_dims));
      for (double& x : u) st.needle_directions.push_back(x / norm);
    }
  }

  st.needle_of_query.assign(static_cast<std::size_t>(c.length), -1);
  st.key_coefficients.assign(static_cast<std::size_t>(c.length * r), 0.0);
  for (int64_t s = 0; s < c.length; ++s) {
    double* k = st.key_coefficients.data() + s * r;
    if (s < c.sinks) k[0] = st.sink_amplitude;
    for (int64_t i = 0; i < st.local_pairs; ++i) {
      double sine, cosine;
      sincos_turns(st.frequencies[i] * static_cast<double>(s), sine, cosine);
      k[st.local_begin + 2 * i] = st.local_amplitude * cosine;
      k[st.local_begin + 2 * i + 1] = st.local_amplitude * sine;
    }
  }
  const int64_t needles = static_cast<int64_t>(st.needle_pairs.size()) / 2;
  for (int64_t n = 0; n < needles; ++n) {
    st.needle_of_query[st.needle_pairs[2 * n]] = n;
    double* k = st.key_coefficients.data() + st.needle_pairs[2 * n + 1] * r + st.needle_begin;
    for (int64_t i = 0; i < st.needle_dims; ++i)
      k[i] += st.needle_amplitude * st.needle_directions[n * st.needle_dims + i];
  }
  return st;
}

// Structure coefficients of query head h at position t.
void query_coefficients(const Structure& st, int64_t t, int64_t h, double* c) {
  std::fill(c, c + st.rank, 0.0);
  c[0] = st.sink_gain[h] * st.sink_amplitude;
  for (int64_t i = 0; i < st.local_pairs; ++i) {
    double sine, cosine;
    sincos_turns(st.frequencies[i] * static_cast<double>(t), sine, cosine);
    c[st.local_begin + 2 * i] = st.local_gain[h] * st.local_amplitude * cosine;
    c[st.local_begin + 2 * i + 1] = st.local_gain[h] * st.local_amplitude * sine;
  }
  const int64_t n = st.needle_of_query[t];
  if (n < 0) return;
  for (int64_t i = 0; i < st.needle_dims; ++i) {
    c[st.needle_begin + i] =
        st.needle_gain[h] * st.needle_amplitude * st.needle_directions[n * st.needle_dims + i];
  }
}

// out = U · coefficients + noise · N(0, I), rounded to f32; then, unless projection is null,
// projection = U^T out.
void make_row(const Structure& st, int64_t d_qk, const double* coefficients, double noise,
              Random& random, float* out, double* projection) {
  const int64_t r = st.rank;
  for (int64_t d = 0; d < d_qk; ++d) {
    const double structured = dot(st.basis.data() + d * r, coefficients, r);
    out[d] = static_cast<float>(structured + noise * random.normal());
  }
  if (projection == nullptr) return;
  std::fill(projection, projection + r, 0.0);
  for (int64_t d = 0; d < d_qk; ++d) {
    for (int64_t i = 0; i < r; ++i) projection[i] += st.basis[d * r + i] * double(out[d]);
  }
}

// out[0..d_I) = projection · R; returns the sum of squares of the f32 results.
double index_row(const Structure& st, int64_t d_index, const double* projection, float* out) {
  double squares = 0;
  for (int64_t e = 0; e < d_index; ++e) {
    double sum = 0;
    for (int64_t i = 0; i < st.rank; ++i) sum += projection[i] * st.index_map[i * d_index + e];
    out[e] = static_cast<float>(sum);
    squares += double(out[e]) * double(out[e]);
  }
  return squares;
}

// Adds N(0, stddev^2) to every element of a [rows, width] f32 tensor, one stream per row.
void add_noise(Tensor& tensor, int64_t rows, int64_t width, double stddev, uint64_t seed,
               Stream stream) {
  float* data = mutable_data<float>(tensor);
#pragma omp parallel for schedule(static)
  for (int64_t row = 0; row < rows; ++row) {
    Random random(seed, stream, row);
    float* x = data + row * width;
    for (int64_t e = 0; e < width; ++e)
      x[e] = static_cast<float>(double(x[e]) + stddev * random.normal());
  }
}

double sum_in_order(const std::vector<double>& values) {
  double sum = 0;
  for (double v : values) sum += v;
  return sum;
}

// Hidden states whose projections are the indexer (see the header). coefficients [L, width]
// holds U^T kv[t] and U^T q[t, h < H'] per token; the noise is added to it in place.
void add_hidden_states(const WorkloadConfig& c, const Structure& st,
                       std::vector<double>& coefficients, GeneratedWorkload& w) {
  const int64_t L = c.length, D = c.hidden, r = st.rank, H_I = c.indexer_heads, d_I = c.indexer_dim;
  const int64_t heads = std::min(c.heads, H_I), width = (1 + heads) * r, one = width;
  std::vector<double> key_squares(static_cast<std::size_t>(L)),
      query_squares(static_cast<std::size_t>(L));
  for (int64_t t = 0; t < L; ++t) {
    const double* z = coefficients.data() + t * width;
    key_squares[t] = dot(z, z, r);
    query_squares[t] = dot(z + r, z + r, heads * r);
  }
  const double key_rms = std::sqrt(sum_in_order(key_squares) / static_cast<double>(L * r));
  const double query_rms =
      std::sqrt(sum_in_order(query_squares) / static_cast<double>(L * heads * r));
  Random setup(c.seed, Stream::hidden, L);
  const std::vector<double> mix = random_orthonormal_rows(D, D, setup);  // O: z = O h
  w.hidden = make_tensor(DType::f32, {L, D}, "hidden");
  float* hidden = mutable_data<float>(w.hidden);
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < L; ++t) {
    Random random(c.seed, Stream::hidden, t);
    std::vector<double> z(static_cast<std::size_t>(D));
    double* coefficient = coefficients.data() + t * width;
    for (int64_t i = 0; i < width; ++i) {
      coefficient[i] += c.indexer_noise * (i < r ? key_rms : query_rms) * random.normal();
      z[i] = coefficient[i];
    }
    z[one] = 1.0;
    for (int64_t i = one + 1; i < D; ++i) z[i] = query_rms * random.normal();
    key_squares[t] = dot(coefficient, coefficient, r);
    for (int64_t d = 0; d < D; ++d) {
      double sum = 0;
      for (int64_t i = 0; i < D; ++i) sum += mix[i * D + d] * z[i];
      hidden[t * D + d] = static_cast<float>(sum);
    }
  }
  // Projections: a row i of O read back from h, mapped through R.
  IndexerWeights& x = w.indexer;
  x = zero_indexer_weights(D, H_I, d_I);
  auto through_index_map = [&](int64_t first, int64_t e, double* out) {
    for (int64_t d = 0; d < D; ++d) {
      double sum = 0;
      for (int64_t i = 0; i < r; ++i) sum += st.index_map[i * d_I + e] * mix[(first + i) * D + d];
      out[d] = static_cast<float>(sum);
    }
  };
  for (int64_t e = 0; e < d_I; ++e) through_index_map(0, e, x.wk.data() + e * D);
  for (int64_t j = 0; j < H_I; ++j) {
    for (int64_t e = 0; e < d_I; ++e) {
      through_index_map(r + (j % c.heads) * r, e, x.wq.data() + (j * d_I + e) * D);
    }
  }
  // |(U^T kv) R| = |U^T kv|: gamma restores the keys' overall RMS after the LayerNorm.
  const double gamma = std::sqrt(sum_in_order(key_squares) / static_cast<double>(L * d_I));
  x.k_norm_weight.assign(static_cast<std::size_t>(d_I), static_cast<float>(gamma));
  const double weight = c.scale / static_cast<double>(H_I);
  for (int64_t j = 0; j < H_I; ++j) {
    for (int64_t d = 0; d < D; ++d) {
      x.weights_proj[j * D + d] = static_cast<float>(weight * mix[one * D + d]);
    }
  }
  project_workload_indexer(w);
}

}  // namespace

WorkloadConfig workload_preset(const std::string& name) {
  WorkloadConfig config;
  if (name == "small") return config;
  if (name == "v32") {
    config.length = 16384;
    config.heads = 128;
    config.d_qk = 576;
    config.d_v = 512;
    config.indexer_heads = 64;
    config.indexer_dim = 128;
    config.scale = deepseek_v32_softmax_scale();
    return config;
  }
  if (name == "v4-flash" || name == "v4-pro") {
    config.length = 131072;
    config.queries = 64;
    config.heads = name == "v4-flash" ? 64 : 128;
    config.d_qk = config.d_v = 512;
    config.indexer_heads = 64;
    config.indexer_dim = 128;
    config.compress_ratio = 4;
    config.window = 128;
    config.sinks = 0;
    config.needle_logit = 32.0;
    return config;
  }
  bad_usage("unknown workload preset '{}' (expected small, v32, v4-flash or v4-pro)", name);
}

WorkloadConfig resolve_workload_config(const WorkloadConfig& config) {
  WorkloadConfig c = config;
  check_positive(c.length, "length");
  check_positive(c.heads, "heads");
  check_positive(c.d_qk, "d_qk");
  check_positive(c.d_v, "d_v");
  check_positive(c.indexer_heads, "indexer_heads");
  check_positive(c.indexer_dim, "indexer_dim");
  check_positive(c.window, "window");
  if (c.length > std::numeric_limits<int32_t>::max())
    bad_usage("workload: length {} does not fit the int32 needle positions", c.length);
  const double elements =
      static_cast<double>(c.length) *
      static_cast<double>(std::max(c.heads * c.d_qk, c.indexer_heads * c.indexer_dim));
  if (elements > 0x1p50) bad_usage("workload: {} elements per tensor is too many", elements);
  if (c.d_v > c.d_qk) bad_usage("workload: d_v {} must not exceed d_qk {}", c.d_v, c.d_qk);
  if (c.sinks < 0 || c.sinks > c.length)
    bad_usage("workload: sinks must be in [0, length {}], got {}", c.length, c.sinks);
  if (c.needles < 0) bad_usage("workload: needles must be non-negative, got {}", c.needles);
  if (c.needle_min_distance < 0)
    bad_usage("workload: needle_min_distance must be non-negative, got {}", c.needle_min_distance);
  if (c.needle_min_distance == 0) c.needle_min_distance = 4 * c.window;
  check_non_negative(c.sink_logit, "sink_logit");
  check_non_negative(c.local_logit, "local_logit");
  check_non_negative(c.needle_logit, "needle_logit");
  check_non_negative(c.noise, "noise");
  check_non_negative(c.indexer_noise, "indexer_noise");
  if (c.rank < 0) bad_usage("workload: rank must be non-negative, got {}", c.rank);
  const bool automatic = c.rank == 0;
  if (automatic) c.rank = std::min<int64_t>(c.indexer_dim, 32);
  // 1 sink + 2 local + 2 needle dimensions at least.
  if (c.rank < 5) {
    bad_usage("workload: rank {}{} must be at least 5 (1 sink, 2 local, 2 needle dimensions)",
              c.rank, automatic ? " (min(indexer_dim, 32))" : "");
  }
  if (c.rank > c.indexer_dim || c.rank > c.d_qk) {
    bad_usage("workload: rank {} must not exceed indexer_dim {} nor d_qk {}", c.rank, c.indexer_dim,
              c.d_qk);
  }
  if (c.hidden < 0) bad_usage("workload: hidden must be non-negative, got {}", c.hidden);
  if (c.scale == 0) c.scale = 1.0 / std::sqrt(static_cast<double>(c.d_qk));
  if (c.queries == 0) c.queries = c.length;
  if (c.queries < 0 || c.queries > c.length) {
    bad_usage("workload: queries must be in [1, length {}], got {}", c.length, c.queries);
  }
  if (c.compress_ratio < 0 || c.compress_ratio > c.length) {
    bad_usage("workload: compress_ratio must be in [0, length {}], got {}", c.length,
              c.compress_ratio);
  }
  if (c.hidden > 0 && (c.queries < c.length || c.compress_ratio > 0)) {
    bad_usage("workload: hidden states need every query row and no compression");
  }
  if (!(std::isfinite(c.scale) && c.scale > 0))
    bad_usage("workload: scale must be finite and positive, got {}", c.scale);
  const int64_t needed = (1 + std::min(c.heads, c.indexer_heads)) * c.rank + 1;
  if (c.hidden > 0 && c.hidden < needed) {
    bad_usage("workload: hidden (d_model) {} must be at least (1 + min(H, H_I)) * rank + 1 = {}",
              c.hidden, needed);
  }
  return c;
}

// DeepSeek-V4's entries: window means of kv and of the tokens' indexer keys, and the sinks.
void compress_workload(const WorkloadConfig& c, const Structure& st, GeneratedWorkload& w) {
  const int64_t m = c.compress_ratio, n = c.length / m, lead = m == 4 ? m : 0;
  const auto pool = [&](const Tensor& tokens, int64_t width, const char* name) {
    Tensor out = make_tensor(DType::f32, {n, width}, name);
    const float* x = reinterpret_cast<const float*>(tokens.data);
    float* y = mutable_data<float>(out);
#pragma omp parallel for schedule(static)
    for (int64_t j = 0; j < n; ++j) {
      const int64_t first = std::max<int64_t>(0, m * j - lead), end = m * j + m;
      for (int64_t e = 0; e < width; ++e) {
        double sum = 0;
        for (int64_t s = first; s < end; ++s) sum += x[s * width + e];
        y[j * width + e] = static_cast<float>(sum / static_cast<double>(end - first));
      }
    }
    return out;
  };
  w.compressed = pool(w.kv, c.d_qk, "compressed");
  w.k_index = pool(w.k_index, c.indexer_dim, "k_index");
  w.sink = make_tensor(DType::f32, {c.heads}, "sink");
  for (int64_t h = 0; h < c.heads; ++h) {
    mutable_data<float>(w.sink)[h] = static_cast<float>(c.sink_logit * st.sink_gain[h]);
  }
}

GeneratedWorkload generate_workload(const WorkloadConfig& config) {
  const WorkloadConfig c = resolve_workload_config(config);
  const Structure st = make_structure(c);
  const int64_t L = c.length, H = c.heads, r = st.rank, H_I = c.indexer_heads, d_I = c.indexer_dim;
  const int64_t Lq = c.queries, q0 = L - Lq;  // query rows: positions q0 .. L - 1
  GeneratedWorkload w;
  w.q = make_tensor(DType::f32, {Lq, H, c.d_qk}, "q");
  w.kv = make_tensor(DType::f32, {L, c.d_qk}, "kv");
  w.q_index = make_tensor(DType::f32, {Lq, H_I, d_I}, "q_index");
  w.k_index = make_tensor(DType::f32, {L, d_I}, "k_index");
  w.weights = make_tensor(DType::f32, {Lq, H_I}, "weights");
  const int64_t needles = static_cast<int64_t>(st.needle_pairs.size()) / 2;
  w.needles = make_tensor(DType::i32, {needles, 2}, "needles");
  std::copy(st.needle_pairs.begin(), st.needle_pairs.end(), mutable_data<int32_t>(w.needles));

  std::vector<double> q_index_squares(static_cast<std::size_t>(L)),
      k_index_squares(static_cast<std::size_t>(L));
  float* q = mutable_data<float>(w.q);
  float* kv = mutable_data<float>(w.kv);
  float* q_index = mutable_data<float>(w.q_index);
  float* k_index = mutable_data<float>(w.k_index);
  // Hidden mode: every token's U^T kv[t] and U^T q[t, h < min(H, H_I)], [L, (1 + H') r].
  const int64_t projected_heads = std::min(H, H_I), width = (1 + projected_heads) * r;
  std::vector<double> coefficients_of(static_cast<std::size_t>(c.hidden > 0 ? L * width : 0));
  detail::Progress progress("generate", L, "tokens");
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < L; ++t) {
    progress.advance(1);
    std::vector<double> coefficients(static_cast<std::size_t>(r));
    // U^T q[t, h] for the heads the indexer copies (j mod H for j < H_I).
    const int64_t projected = std::min(H, H_I);
    std::vector<double> projections(static_cast<std::size_t>(projected * r));
    Random key_noise(c.seed, Stream::kv, t);
    make_row(st, c.d_qk, st.key_coefficients.data() + t * r, c.noise, key_noise, kv + t * c.d_qk,
             projections.data());
    k_index_squares[t] = index_row(st, d_I, projections.data(), k_index + t * d_I);
    double* hidden_coefficients = c.hidden > 0 ? coefficients_of.data() + t * width : nullptr;
    if (hidden_coefficients) std::copy_n(projections.data(), r, hidden_coefficients);
    q_index_squares[t] = 0;
    if (t < q0) continue;  // no query row here
    const int64_t row = t - q0;
    Random query_noise(c.seed, Stream::q, t);
    for (int64_t h = 0; h < H; ++h) {
      query_coefficients(st, t, h, coefficients.data());
      make_row(st, c.d_qk, coefficients.data(), c.noise, query_noise, q + (row * H + h) * c.d_qk,
               h < projected ? projections.data() + h * r : nullptr);
    }
    if (hidden_coefficients)
      std::copy_n(projections.data(), projected * r, hidden_coefficients + r);
    for (int64_t j = 0; j < H_I; ++j) {
      q_index_squares[t] +=
          index_row(st, d_I, projections.data() + (j % H) * r, q_index + (row * H_I + j) * d_I);
    }
  }
  if (c.indexer_noise > 0) {
    const double q_rms =
        std::sqrt(sum_in_order(q_index_squares) / static_cast<double>(Lq * H_I * d_I));
    const double k_rms = std::sqrt(sum_in_order(k_index_squares) / static_cast<double>(L * d_I));
    add_noise(w.q_index, Lq * H_I, d_I, c.indexer_noise * q_rms, c.seed, Stream::q_index);
    add_noise(w.k_index, L, d_I, c.indexer_noise * k_rms, c.seed, Stream::k_index);
  }
  const auto weight = static_cast<float>(c.scale / static_cast<double>(H_I));
  std::fill_n(mutable_data<float>(w.weights), Lq * H_I, weight);
  if (c.hidden > 0) add_hidden_states(c, st, coefficients_of, w);
  if (c.compress_ratio > 0) compress_workload(c, st, w);
  return w;
}

void narrow_hidden_workload(GeneratedWorkload& w, DType dtype) {
  if (dtype != DType::bf16) bad_usage("hidden workloads narrow to bf16 only");
  float* h = mutable_data<float>(w.hidden);
  for (int64_t i = 0; i < w.hidden.numel(); ++i) h[i] = round_to_bf16(h[i]);
  for (std::vector<double>* p : parameters(w.indexer)) {
    for (double& x : *p) x = round_to_bf16(static_cast<float>(x));
  }
  project_workload_indexer(w);
}

void project_workload_indexer(GeneratedWorkload& w) {
  IndexerProjection p = project_indexer(w.hidden, w.indexer);
  w.q_index = std::move(p.q_index);
  w.k_index = std::move(p.k_index);
  w.weights = std::move(p.weights);
}

}  // namespace dsa
