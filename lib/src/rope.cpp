#include "dsa/rope.hpp"

#include <algorithm>
#include <cmath>

#include "dsa/error.hpp"

namespace dsa {

RopeConfig deepseek_v4_rope(int64_t compress_ratio) {
  RopeConfig config;
  if (compress_ratio != 0) {
    config.theta = 160000.0;
    config.yarn_factor = 16.0;
    config.original_length = 65536;
  }
  return config;
}

Rope::Rope(const RopeConfig& c) : dims_(c.dims) {
  if (c.dims < 2 || c.dims % 2 != 0)
    bad_usage("RoPE dims must be even and at least 2, got {}", c.dims);
  if (!(c.theta > 1)) bad_usage("RoPE theta must be greater than 1, got {}", c.theta);
  const int64_t half = c.dims / 2;
  frequencies_.resize(static_cast<std::size_t>(half));
  const auto theta = static_cast<float>(c.theta);
  for (int64_t i = 0; i < half; ++i) {
    // torch: 1.0 / (base ** (arange(0, dim, 2, float32) / dim)), every step in f32.
    const float exponent = static_cast<float>(2 * i) / static_cast<float>(c.dims);
    const auto power = static_cast<float>(std::pow(static_cast<double>(theta), exponent));
    frequencies_[i] = 1.0f / power;
  }
  if (c.original_length > 0 && c.yarn_factor != 1.0) {
    // find_correction_range in Python doubles, the ramp and the blend in f32.
    const auto correction = [&](double rotations) {
      return static_cast<double>(c.dims) *
             std::log(static_cast<double>(c.original_length) / (rotations * 2 * M_PI)) /
             (2 * std::log(c.theta));
    };
    const double low = std::max(std::floor(correction(c.beta_fast)), 0.0);
    double high = std::min(std::ceil(correction(c.beta_slow)), static_cast<double>(c.dims - 1));
    if (low == high) high += 0.001;
    const auto factor = static_cast<float>(c.yarn_factor);
    const auto lo = static_cast<float>(low);
    const auto span = static_cast<float>(high - low);
    for (int64_t i = 0; i < half; ++i) {
      const float ramp = std::clamp((static_cast<float>(i) - lo) / span, 0.0f, 1.0f);
      const float smooth = 1.0f - ramp;
      const float f = frequencies_[i];
      frequencies_[i] = f / factor * (1.0f - smooth) + f * smooth;
    }
  }
}

void Rope::apply(float* x, int64_t position, bool inverse) const {
  const auto t = static_cast<float>(position);
  for (std::size_t i = 0; i < frequencies_.size(); ++i) {
    const float angle = t * frequencies_[i];
    const auto c = static_cast<float>(std::cos(static_cast<double>(angle)));
    const float s = inverse ? -static_cast<float>(std::sin(static_cast<double>(angle)))
                            : static_cast<float>(std::sin(static_cast<double>(angle)));
    const float a = x[2 * i], b = x[2 * i + 1];
    x[2 * i] = a * c - b * s;
    x[2 * i + 1] = a * s + b * c;
  }
}

}  // namespace dsa
