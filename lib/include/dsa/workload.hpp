// Deterministic synthetic attention workloads: main MQA queries/keys with the structure real
// attention has (sinks, a local window, far "needles"), plus an indexer that sees a noisy view
// of that structure.
//
// How a workload is built (scale: the main attention's softmax scale, d_qk^-0.5 unless set):
// - Structure subspace: a random orthonormal basis U [d_qk, r] (Gram-Schmidt on Gaussian
//   vectors). Every main query and key is U · (structure coefficients) + isotropic Gaussian
//   noise of std `noise` in all d_qk dimensions. The r coefficients split into 1 sink
//   dimension, r_loc = 2·floor((r-1)/4) local dimensions and the rest for needles.
//   Strengths are given in logit units: a term of logit λ puts magnitude sqrt(λ/scale) on the
//   query and on the key side, so scale · q · k = λ. The noise alone gives logits of std
//   noise^2 (independent of d_qk).
// - Attention sinks: keys at positions < `sinks` carry the sink direction; every query head
//   carries it too, so those keys get logit `sink_logit` from every query.
// - Local window: r_loc/2 cos/sin pairs of position (frequencies ω_i stratified at random in
//   (0, π/window]) on both sides, so q(t) · k(s) · scale = local_logit · mean_i cos(ω_i (t-s)):
//   local_logit at t = s, ≈ local_logit · sinc(π (t-s) / window) after, ≈ 0 beyond the window.
// - Needles: query positions t spread over the later half of the sequence (and
//   t >= needle_min_distance + sinks), each paired with one key s, sinks <= s <= t -
//   needle_min_distance, and a fresh random unit direction u in the needle subspace:
//   kv[s] += sqrt(λ/scale) u and q[t, every head] += sqrt(λ/scale) u, λ = `needle_logit`: a
//   query that must find one far key. Two needles may share a key.
// - Heads differ: each main head scales its sink, local and needle terms by its own random gain
//   in [0.5, 1.5] (keys are shared by all heads, as in MQA).
// - Indexer: R [r, d_I] with orthonormal rows; k_I[s] = (U^T kv[s]) R and
//   q_I[t, j] = (U^T q[t, j mod H]) R, so q_I · k_I is the main dot product restricted to the
//   structure subspace; then Gaussian noise of std `indexer_noise` × (RMS of the clean values)
//   is added to q_I and to k_I separately: the quality dial. The weights are scale / H_I, so
//   I[t,s] (Eq. 1) is the mean over indexer heads of ReLU(structured logit): in logit units,
//   which keeps softmax(I) comparable with the attention distribution (Eq. 3).
//
// - Hidden states (hidden > 0, d_model): the indexer above, restated as projections of
//   hidden states h [L, d_model] (dsa/indexer_weights.hpp), so "the indexer that generated the
//   data" is a set of weights dsa-fit can be compared with. Per token, z = [U^T kv[t] (r) ;
//   U^T q[t, h] for h < min(H, H_I) (r each) ; 1 ; padding], the structure coefficients plus
//   Gaussian noise of std `indexer_noise` × (their RMS) (the quality dial, in h instead of in
//   q_I and k_I), the padding N(0, RMS^2); h = M z with M a random orthogonal matrix.
//   wq_b maps h to (U^T q[t, j mod H]) R, wk to (U^T kv[t]) R, k_norm is gamma = RMS of those
//   keys, beta = 0 (so keys keep their overall scale but lose their per-token norm and mean),
//   weights_proj gives the constant scale / H_I. q_index, k_index and weights are then exactly
//   project_indexer(hidden, indexer) of the f32 tensors. Needs d_model >= (1 + min(H, H_I)) r + 1.
//
// - Queries (queries = Lq < L): only the last Lq positions get query rows (q, q_index, weights),
//   as a decode or chunked-prefill evaluation keeps them, and the needles' queries are among
//   them; keys and values cover all L positions. Lq = L is the full workload, bit for bit.
// - DeepSeek-V4 (compress_ratio = m > 0; docs/DESIGN.md section 6): `compressed` [floor(L/m),
//   d_qk] holds entry j = the mean of kv over its window (tokens [m j - m, m j + m) for m = 4, the
//   overlapping windows of CSA; [m j, m j + m) otherwise), a fixed stand-in for the model's
//   learned gate that keeps the structure (an entry's logit is the mean of its tokens'; a
//   needle's key is diluted by the window length); k_index holds the same means of the tokens'
//   indexer keys [floor(L/m), d_I], so the indexer scores entries as the main attention does;
//   `sink` [H] is the learned per-head sink logit, sink_logit times the head's sink gain.
//
// Determinism: the same config gives bit-identical tensors on every machine and with every
// thread count. Random numbers come from std::mt19937_64 (its output is fixed by the standard),
// one stream for the setup and one per tensor row (seeded from the seed, the tensor and the
// row), turned into uniforms by a fixed bit transform and into Gaussians by the Marsaglia polar
// method with our own log; cos/sin are our own polynomials. std::normal_distribution and libm's
// transcendental functions are not used: their results differ between standard libraries.
// Everything else is IEEE double arithmetic in a fixed order (workload.cpp is compiled without
// floating-point contraction), rounded to f32 at the end.
#pragma once

#include <cstdint>
#include <string>

#include "dsa/indexer_weights.hpp"
#include "dsa/tensor.hpp"

namespace dsa {

struct WorkloadConfig {
  int64_t length = 1024;  // L
  int64_t heads = 4;      // H, main query heads
  int64_t d_qk = 64;
  int64_t d_v = 48;  // values are the first d_v columns of kv
  int64_t indexer_heads = 8;
  int64_t indexer_dim = 32;
  int64_t sinks = 4;  // keys at positions < sinks are attention sinks
  double sink_logit = 6.0;
  int64_t window = 64;  // width of the local window, in positions
  double local_logit = 4.0;
  int64_t needles = 8;  // requested; fewer when the sequence is too short
  double needle_logit = 14.0;
  int64_t needle_min_distance = 0;  // t - s of every needle; 0: 4 · window
  double noise = 1.0;               // std of the isotropic noise in q and kv
  int64_t rank = 0;                 // r, the structure subspace; 0: min(indexer_dim, 32)
  double indexer_noise = 0.0;       // relative std of the noise added to q_I and k_I
  uint64_t seed = 0;
  int64_t hidden = 0;          // d_model of hidden states and indexer projections; 0: none
  double scale = 0;            // the softmax scale the logits are built for; 0: d_qk^-0.5
  int64_t queries = 0;         // Lq, the last positions with query rows; 0: every position
  int64_t compress_ratio = 0;  // DeepSeek-V4: tokens per compressed entry (4 CSA, 128 HCA); 0: none
};

// "small": L 1024, H 4, d_qk 64, d_v 48, H_I 8, d_I 32 (the defaults above).
// "v32": DeepSeek-V3.2 sizes, L 16384, H 128, d_qk 576, d_v 512, H_I 64, d_I 128, and its
// softmax scale (deepseek_v32_softmax_scale, dsa/attention.hpp: what --scale deepseek-v3.2 gives).
// "v4-flash" / "v4-pro": a DeepSeek-V4 CSA layer, L 131072 with the last 64 query rows, H 64 /
// 128, d_qk = d_v = 512 (K = V), H_I 64, d_I 128, compress ratio 4, window 128, learned sinks
// (no sink keys), needle logit 32 (4 on an entry of 8 tokens), scale 512^-0.5.
// Anything else is Error(usage).
WorkloadConfig workload_preset(const std::string& name);

// The config with its automatic values filled in (rank, needle_min_distance, scale); throws
// Error(usage) naming the field when a value is out of range.
WorkloadConfig resolve_workload_config(const WorkloadConfig& config);

struct GeneratedWorkload {
  Tensor q;        // f32 [Lq, H, d_qk]
  Tensor kv;       // f32 [L, d_qk]
  Tensor q_index;  // f32 [Lq, H_I, d_I]
  Tensor k_index;  // f32 [L, d_I]
  Tensor weights;  // f32 [Lq, H_I], all scale / H_I
  Tensor needles;  // i32 [N, 2]: (query position t, key position s), sorted by t; N may be 0
  // With config.compress_ratio > 0 only (k_index then holds the entries' keys):
  Tensor compressed;  // f32 [floor(L / m), d_qk]
  Tensor sink;        // f32 [H]
  // With config.hidden > 0 only:
  Tensor hidden;           // f32 [L, d_model]
  IndexerWeights indexer;  // values exact in f32; q_index, k_index, weights project from hidden
};

// Tensors named "q", "kv", "q_index", "k_index", "weights", "needles" (and "hidden", or
// "compressed" and "sink").
GeneratedWorkload generate_workload(const WorkloadConfig& config);

// q_index, k_index and weights recomputed from the hidden states and the indexer weights
// (project_indexer).
void project_workload_indexer(GeneratedWorkload& workload);
// Rounds the hidden states and the indexer weights to `dtype` (bf16) and reprojects, so that a
// file written in that dtype still holds exactly what its projections give (up to the final
// rounding of q_index, k_index and weights).
void narrow_hidden_workload(GeneratedWorkload& workload, DType dtype);

}  // namespace dsa
