// Internal: the online softmax of the two attention kernels (attention.cu), one row's running
// statistics in base 2: logits come in already multiplied by scale . log2(e).
#pragma once

#include <cmath>

namespace dsa::cuda {

constexpr float kLog2e = 1.4426950408889634f;

struct OnlineSoftmax {
  float max = -INFINITY;  // the largest logit seen so far
  float sum = 0.0f;       // sum of exp2(logit - offset()) over what was seen (a share of it)

  // What a tile's logits are taken relative to: the running max, or 0 while every logit seen
  // is -inf (so that exp2 gives 0, not NaN).
  __device__ __forceinline__ float offset() const { return max == -INFINITY ? 0.0f : max; }

  // Takes in a tile whose largest logit is tile_max: moves the running max, rescales the sum,
  // and returns the factor by which anything accumulated against the old max must be
  // multiplied. Add the tile's exp2(logit - offset()) to sum afterwards.
  __device__ __forceinline__ float advance(float tile_max) {
    const float old = max;
    max = fmaxf(max, tile_max);
    const float alpha = exp2f(old - offset());
    sum *= alpha;
    return alpha;
  }

  __device__ __forceinline__ float probability(float logit) const {
    return exp2f(logit - offset());
  }

  // Joins a sink, a logit `sink` in natural-log units that adds exp(sink) to the denominator
  // and nothing to the output, to a row whose whole sum is `total`: moves the max, sets total
  // to the new denominator, and returns the factor for what was accumulated against the old
  // max. A -inf sink changes nothing; a row that saw nothing gets total 1 at max = the sink.
  __device__ __forceinline__ float join_sink(float sink, float& total) {
    const float logit = sink * kLog2e;
    if (logit == -INFINITY) return 1.0f;
    const float old = max;
    max = fmaxf(max, logit);
    const float alpha = old == -INFINITY ? 0.0f : exp2f(old - max);
    total = total * alpha + exp2f(logit - max);
    return alpha;
  }

  // The natural-log log-sum-exp given the row's whole sum (-inf for a row that saw nothing).
  __device__ __forceinline__ float lse(float total) const {
    constexpr float kLn2 = 0.6931471805599453f;
    return total > 0 ? max * kLn2 + __logf(total) : -INFINITY;
  }
};

}  // namespace dsa::cuda
