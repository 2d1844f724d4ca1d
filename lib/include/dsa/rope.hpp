// Rotary position embedding as DeepSeek-V4's released code builds and applies it
// (inference/model.py precompute_freqs_cis, apply_rotary_emb): the last `dims` entries of a
// vector, rotated in interleaved pairs (2i, 2i+1) as complex numbers; docs/DESIGN.md section 6.
#pragma once

#include <cstdint>
#include <vector>

namespace dsa {

struct RopeConfig {
  int64_t dims = 64;            // rotated entries: the vector's last `dims` (qk_rope_head_dim)
  double theta = 10000.0;       // the frequency base
  double yarn_factor = 1.0;     // 1: no YaRN
  int64_t original_length = 0;  // YaRN's original context (0: no YaRN)
  double beta_fast = 32.0, beta_slow = 1.0;
};
// The released model's tables: window-only layers (ratio 0) theta 10000 without YaRN; layers
// with a compressor (ratio 4 or 128) theta 160000 with YaRN factor 16 over 65536, beta 32 / 1.
// There is no YaRN mscale (softmax scale d^-0.5).
RopeConfig deepseek_v4_rope(int64_t compress_ratio);

class Rope {
 public:
  explicit Rope(const RopeConfig& config);
  // The f32 frequencies f_i, i < dims / 2, as the released code computes them:
  // 1 / theta^(2i / dims) in f32, then YaRN's blend f / factor * (1 - smooth) + f * smooth.
  const std::vector<float>& frequencies() const { return frequencies_; }
  int64_t dims() const { return dims_; }
  // Rotates x[0 .. dims) (the vector's last dims entries) to `position`: each pair (a, b) times
  // cos + i sin of the f32 angle f32(position) * f_i, in f32; `inverse` rotates back (conjugate).
  void apply(float* x, int64_t position, bool inverse = false) const;

 private:
  int64_t dims_;
  std::vector<float> frequencies_;
};

}  // namespace dsa
