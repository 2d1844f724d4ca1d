#!/usr/bin/env python3
"""DeepSeek's released DeepSeek-V3.2-Exp lightning indexer, transcribed step by step in NumPy,
against dsa-score and dsa-select (--precision fp8 --hadamard --raw-weights [--ue8m0]).

The source transcribed is the released inference code (github.com/deepseek-ai/DeepSeek-V3.2-Exp,
inference/model.py and inference/kernel.py) and the Hadamard kernel it calls
(github.com/Dao-AILab/fast-hadamard-transform, csrc/fast_hadamard_transform_cuda.cu and
csrc/fast_hadamard_transform_common.h). Each step below names the released function it comes
from and carries the dtypes PyTorch / TileLang / CUDA use on a GPU at that step:

  Indexer.forward (model.py), from the RoPE'd q [.., H, 128] and k [.., 128] (bf16) on:
    q = rotate_activation(q); k = rotate_activation(k)
    q_fp8, q_scale = act_quant(q, block_size, self.scale_fmt)
    k_fp8, k_scale = act_quant(k, block_size, self.scale_fmt)
    weights = self.weights_proj(x) * self.n_heads ** -0.5
    weights = weights.unsqueeze(-1) * q_scale * self.softmax_scale
    index_score = fp8_index(q_fp8.contiguous(), weights, self.k_cache[:bsz, :end_pos]...,
                            self.k_scale_cache[:bsz, :end_pos]...)
    if mask is not None:
        index_score += mask
    topk_indices = index_score.topk(min(self.index_topk, end_pos), dim=-1)[1]

The test feeds the bf16 q_I, k_I and the bf16 weights_proj outputs directly (--raw-weights).
Nothing here comes from the C++ sources. Checks, per case (fresh random bf16 inputs with a few
outlier channels, weights of both signs):

  * dsa-score: every visible score within SCORE_TOL (1e-5) x the row's scale of the
    transcription (float64 from the kernel's exact fp8 products on); -inf exactly at the masked
    positions (s > t in prefill; decode sees every key). The row's scale is its largest visible
    |score|, floored at 1/16 of its largest M[s] = sum_h |weights[h]| ReLU(logits[s, h]) k_scale[s].
    Any f32 accumulation (the released kernel's included) errs by a few ulps of M, not of |score|;
    the floor only matters for rows whose heads largely cancel (max |score| < max M / 16: the
    first prefill rows, with 1-2 keys, where |score| can be 100x below M, and about one row in
    500 elsewhere). Each case prints how many rows sit at the floor and the error relative to
    the plain row max |score| as well.
  * dsa-select -k K (fused, same flags): the first min(K, visible) entries are distinct visible
    positions in descending score order, then -1; the selected set equals the transcription's
    top-K except for positions whose transcription score lies within TIE_TOL (2e-5) x the row's
    scale of the row's K-th score (near-ties: counted and printed per case).

The reference sums the kernel's fp8 products exactly. fp8 tensor cores on Hopper do not: with
--device cuda, where the library runs H_I = 64, d_I = 128 on wgmma e4m3 (as the released
fp8_index does on the same hardware), the scores differ by up to ~1e-3 of the row max (cuBLAS's
fp8 GEMM on an H200 shows the same, ~4e-4 of the largest logit, for K = 128). So with
--device cuda the tolerances are GPU_SCORE_TOL (2e-3) and GPU_TIE_TOL (4e-3) instead: the
check then says that the GPU computes the same steps, and the selections differ only among
entries that close to the K-th score (counted and printed).

Usage: python3 tests/released_indexer_check.py --bin DIR [--seed N] [--device cpu|cuda] [--keep]
Exit status: 0 all checks passed, 1 a mismatch or a failed run, 77 numpy is missing.
"""

import argparse
import os
import shutil
import struct
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pycheck import Checks, RunFailure, run_tool  # noqa: E402

try:
    import numpy as np
except ImportError:
    print("released_indexer_check: numpy is not available; skipping", file=sys.stderr)
    sys.exit(77)

F32 = np.float32
F64 = np.float64
SCORE_TOL = 1e-5    # scores: |got - ref| <= SCORE_TOL * the row's scale
TIE_TOL = 2e-5      # selection near-ties: |ref - kth| <= TIE_TOL * the row's scale
GPU_SCORE_TOL = 2e-3  # --device cuda: the fp8 tensor cores' accumulation (see above)
GPU_TIE_TOL = 4e-3
CANCEL_FLOOR = 1.0 / 16   # row scale = max(max |score|, CANCEL_FLOOR * max sum of |terms|)
BLOCK = 128         # model.py: block_size = 128 (act_quant's group_size)
SHOW = 5            # near-tie exceptions printed per case

CHECKS = Checks()


# ------------------------------------------------------------------------------------------
# Number formats (written here; not shared with the C++ code nor with numpy_crosscheck.py)

def bf16(x):
    """float32 -> nearest bfloat16, ties to even (c10::BFloat16(float) / __float2bfloat16),
    returned as float32 values. Integer form: add 0x7FFF plus the kept lsb, drop 16 bits."""
    b = np.ascontiguousarray(x, dtype=F32).view(np.uint32).astype(np.uint64)
    b = ((b + np.uint64(0x7FFF) + ((b >> np.uint64(16)) & np.uint64(1))) >> np.uint64(16)) << np.uint64(16)
    return b.astype(np.uint32).view(F32)


def e4m3fn(y):
    """float32 values already clamped to [-448, 448] -> nearest float8_e4m3fn value (as
    float64), ties to even: 3 mantissa bits, exponent bias 7, the subnormal step 2^-9 below
    2^-6. The value is a whole number of quanta; np.round rounds halves to even."""
    y = np.asarray(y, dtype=F64)
    a = np.abs(y)
    _, e = np.frexp(a)                                   # a = m 2^e, m in [0.5, 1): floor(log2 a) = e - 1
    quantum = np.ldexp(1.0, np.maximum(e - 1, -6) - 3)   # normal: 2^(E-3); E < -6: subnormal 2^-9
    return np.copysign(np.round(a / quantum) * quantum, y)


def self_checks():
    """The formats against facts stated independently."""
    problems = []
    bf = {1.0: 1.0, 1.0 + 2.0 ** -8: 1.0, 1.0 + 3 * 2.0 ** -8: 1.0 + 2.0 ** -6,
          1.0 + 2.0 ** -8 + 2.0 ** -20: 1.0 + 2.0 ** -7, -1.00390625: -1.0, 3.0: 3.0, 0.0: 0.0}
    for x, want in bf.items():
        got = float(bf16(np.array([x], dtype=F32))[0])
        if got != want:
            problems.append(f"bf16({x}) = {got}, expected {want}")
    e4 = {0.0: 0.0, 448.0: 448.0, 2.0 ** -9: 2.0 ** -9, 2.0 ** -10: 0.0, 3 * 2.0 ** -10: 2 * 2.0 ** -9,
          1.5 * 2.0 ** -9: 2 * 2.0 ** -9, 7 * 2.0 ** -9: 7 * 2.0 ** -9, 7.5 * 2.0 ** -9: 2.0 ** -6,
          1.0625: 1.0, 1.1875: 1.25, 17.0: 16.0, 19.0: 20.0, 240.0: 240.0, 424.0: 416.0, 440.0: 448.0,
          -3.3: -3.25, 0.3: 0.3125, 15.5: 16.0, 2.0 ** -6 * 1.0625: 2.0 ** -6}
    for x, want in e4.items():
        got = float(e4m3fn(np.array([x], dtype=F32))[0])
        if got != want:
            problems.append(f"e4m3fn({x}) = {got}, expected {want}")
    # All 127 non-negative finite e4m3fn values map to themselves, and they are exactly those.
    vals = sorted({float(m * 2.0 ** -9) for m in range(8)} |
                  {float((1 + m / 8) * 2.0 ** (e - 7)) for e in range(1, 16) for m in range(8)} - {480.0})
    if len(vals) != 127 or not np.array_equal(e4m3fn(np.array(vals, dtype=F32)), np.array(vals)):
        problems.append("e4m3fn value set")
    x = np.array([[1.0] + [0.0] * 7], dtype=F32)
    if not np.array_equal(hadamard_transform(x, 1.0), np.ones((1, 8), dtype=F32)):
        problems.append("hadamard of e0")
    rng = np.random.default_rng(1)
    x = bf16(rng.standard_normal((4, 128)).astype(F32))
    h = np.ones((1, 1))
    while h.shape[0] < 128:
        h = np.block([[h, h], [h, -h]])
    if np.max(np.abs(hadamard_transform(x, 128 ** -0.5) - x.astype(F64) @ h / np.sqrt(128))) > 0.05:
        problems.append("hadamard vs the Sylvester matrix")
    s = act_quant(np.array([[448.0] + [1.0] * 127], dtype=F32), "ue8m0")[1]
    s2 = act_quant(np.array([[449.0] + [1.0] * 127], dtype=F32), "ue8m0")[1]
    s3 = act_quant(np.zeros((1, 128), dtype=F32), None)[1]
    if float(s[0, 0]) != 1.0 or float(s2[0, 0]) != 2.0 or float(s3[0, 0]) != float(F32(F32(1e-4) * F32(1 / 448))):
        problems.append(f"act_quant scales {s} {s2} {s3}")
    if problems:
        print("released_indexer_check: self-check of the transcription failed: " + "; ".join(problems))
        sys.exit(1)


# ------------------------------------------------------------------------------------------
# The released computation, step by step

def hadamard_transform(x, scale):
    """rotate_activation (model.py):
        hidden_size = x.size(-1)
        return hadamard_transform(x, scale=hidden_size ** -0.5)
    fast_hadamard_transform (csrc/fast_hadamard_transform_cuda.cu, d = 128: kLogN = 7, 16
    threads of kNElts = 8 consecutive elements, kNChunks = 1, one warp):
      load_input:          x_vals[c][i] = float(x_vals_load[c][i])             (bf16 -> f32, exact)
      hadamard_mult_thread: strides 1, 2, 4 inside a thread: x[idx], x[idx + stride] = a + b, a - b
      hadamard_mult_warp:   lane masks 1, 2, 4, 8 (element strides 8, 16, 32, 64):
                            x = sign * x + x_other  (lower lane a + b, upper lane -b + a = a - b)
      store_output:         out_vals_store = out_vals * scale  (float * float, then to bf16)
    i.e. the radix-2 Sylvester butterflies with half = 1, 2, 4, ..., 64 in f32, times
    float(scale), rounded to bf16 by the caller. `scale` is the Python float d**-0.5, passed to
    the extension as `float scale` (f32)."""
    y = np.asarray(x, dtype=F32).copy()
    lead, n = y.shape[:-1], y.shape[-1]
    half = 1
    while half < n:
        y = y.reshape(lead + (n // (2 * half), 2, half))
        a, b = y[..., 0, :], y[..., 1, :]
        y = np.stack([a + b, a - b], axis=-2).reshape(lead + (n,))   # f32 adds (numpy: IEEE, RNE)
        half *= 2
    return (y * F32(scale)).astype(F32)


def rotate_activation(x):
    """model.py rotate_activation: bf16 in (assert x.dtype == torch.bfloat16), bf16 out."""
    return bf16(hadamard_transform(x, x.shape[-1] ** -0.5))


def act_quant(x, scale_fmt):
    """kernel.py act_quant / act_quant_kernel (block_size 128 along the last dim; x holds bf16
    values; the scale and amax fragments are scale_dtype = float32):
        T.reduce_absmax(x_local, amax_local, dim=1)                 # max |x| of the block (exact)
        amax_local[i] = T.max(amax_local[i], 1e-4)                  # f32 constant 1e-4
        if round_scale:                                             # scale_fmt is not None
            s_local[i] = fast_round_scale(amax_local[i], fp8_max_inv)
        else:
            s_local[i] = amax_local[i] * fp8_max_inv               # fp8_max_inv = 1 / 448 (f32)
        y_local[i, j] = T.clamp(x_local[i, j] / s_local[i], fp8_min, fp8_max)   # f32, to fp8
    fast_round_scale(amax, inv) = fast_pow2(fast_log2_ceil(amax * inv)):
        fast_log2_ceil: bits = reinterpret uint32; exp - 127 + (mantissa bits != 0)
        fast_pow2:      reinterpret float32 of (x + 127) << 23
    The bf16 / f32 division is done in f32 (TVM promotes the bf16 operand; TL_DISABLE_FAST_MATH:
    IEEE division); the f32 -> float8_e4m3 cast rounds to nearest even. Returns (code values
    as float64, scales float32 [..., d / 128])."""
    x = np.asarray(x, dtype=F32)
    n = x.shape[-1]
    assert n % BLOCK == 0, "act_quant: last dimension must be divisible by block_size"
    xb = x.reshape(x.shape[:-1] + (n // BLOCK, BLOCK))
    amax = np.max(np.abs(xb), axis=-1)                       # T.reduce_absmax into float32
    amax = np.maximum(amax, F32(1e-4))                       # T.max(amax, 1e-4)
    fp8_max_inv = F32(1 / 448.0)                             # fp8_max_inv = 1 / fp8_max
    prod = (amax * fp8_max_inv).astype(F32)                  # amax * fp8_max_inv, f32 product
    if scale_fmt is not None:                                # round_scale=scale_fmt is not None
        bits = prod.view(np.uint32)
        exp = ((bits >> np.uint32(23)) & np.uint32(0xFF)).astype(np.int64)
        man = bits & np.uint32((1 << 23) - 1)
        log2_ceil = exp - 127 + (man != 0).astype(np.int64)            # fast_log2_ceil
        s = ((log2_ceil + 127) << 23).astype(np.uint32).view(F32)      # fast_pow2
    else:
        s = prod
    y = (xb / s[..., None]).astype(F32)                      # x_local / s_local, f32 IEEE division
    y = np.clip(y, F32(-448.0), F32(448.0))                  # T.clamp(.., fp8_min, fp8_max)
    codes = e4m3fn(y)                                        # y_local (float8_e4m3), RNE
    return codes.reshape(x.shape), s


def index_weights(w_raw, q_scale, n_heads, head_dim):
    """Indexer.forward (model.py):
        weights = self.weights_proj(x) * self.n_heads ** -0.5
          bf16 tensor (weights_proj: Linear(.., dtype=torch.get_default_dtype()) = bf16) times a
          Python float: computed in the f32 opmath with the scalar as float32, stored as bf16.
        weights = weights.unsqueeze(-1) * q_scale * self.softmax_scale
          bf16 [.., H, 1] * f32 q_scale [.., H, d/128 = 1] -> promoted to f32; then the f32
          tensor times the Python float softmax_scale = self.head_dim ** -0.5 (as float32).
    Returns the f32 per-head factors fp8_index receives as q_s [.., H]."""
    w = bf16(np.asarray(w_raw, dtype=F32) * F32(n_heads ** -0.5))
    w = (w * q_scale[..., 0]).astype(F32)
    return (w * F32(head_dim ** -0.5)).astype(F32)


def fp8_index(q_codes, q_s, k_codes, k_s, rows=64):
    """kernel.py fp8_index / fp8_index_kernel, per batch b, query m, key n:
        T.gemm(k_smem, q_smem, logits, transpose_B=True)     # fp8 x fp8, f32 accumulation
        logits[i3_n, i_h] = T.max(logits[i3_n, i_h], 0) * q_s_frag[i_h]
        T.reduce_sum(logits, logits_sum, dim=1)              # over the heads
        logits_sum[i3_n] *= k_s_frag[i3_n]
    Accumulated here in float64: the products of two e4m3 values and their sums over d = 128
    are exact in float64, so `logits` is the exact dot product of the codes (not of the
    dequantized values). q_codes [B, M, H, d], q_s [B, M, H], k_codes [B, N, d], k_s [B, N].
    Also returns, for the tolerance only, the same sum with |q_s| (the sum of the terms' sizes)."""
    nb, m, h, d = q_codes.shape
    out = np.empty((nb, m, k_codes.shape[1]))
    size = np.empty_like(out)
    for b in range(nb):
        kt = k_codes[b].T                                    # [d, N]
        for r0 in range(0, m, rows):
            r1 = min(m, r0 + rows)
            logits = q_codes[b, r0:r1].reshape(-1, d) @ kt   # [(rows H), N], exact
            logits = np.maximum(logits, 0.0).reshape(r1 - r0, h, -1)   # T.max(logits, 0)
            qs = q_s[b, r0:r1].astype(F64)
            out[b, r0:r1] = np.einsum("mh,mhn->mn", qs, logits)        # * q_s, reduce_sum over h
            size[b, r0:r1] = np.einsum("mh,mhn->mn", np.abs(qs), logits)
        out[b] *= k_s[b].astype(F64)[None, :]                # logits_sum *= k_s
        size[b] *= k_s[b].astype(F64)[None, :]
    return out, size


def released_indexer(q, k, w_raw, scale_fmt, prefill):
    """Indexer.forward from rotate_activation to the masked index_score (float64 [B, Lq, Lk]);
    also each row's scale for the tolerances (see the module docstring), [B, Lq, 1]."""
    n_heads, head_dim = q.shape[-2], q.shape[-1]
    q = rotate_activation(q)                                 # q = rotate_activation(q)
    k = rotate_activation(k)                                 # k = rotate_activation(k)
    q_fp8, q_scale = act_quant(q, scale_fmt)                 # act_quant(q, block_size, self.scale_fmt)
    k_fp8, k_scale = act_quant(k, scale_fmt)                 # act_quant(k, block_size, self.scale_fmt)
    weights = index_weights(w_raw, q_scale, n_heads, head_dim)
    index_score, size = fp8_index(q_fp8, weights, k_fp8, k_scale[..., 0])
    if prefill:
        # Transformer.forward: mask = torch.full((seqlen, seqlen), float("-inf")).triu_(1)
        # if seqlen > 1 else None (start_pos 0, end_pos = seqlen); decode: no mask.
        seqlen = q.shape[1]
        mask = np.triu(np.full((seqlen, seqlen), -np.inf), 1)
        index_score = index_score + mask[None]               # index_score += mask
    vis = np.isfinite(index_score)
    row_scale = np.maximum(np.where(vis, np.abs(index_score), 0.0).max(axis=-1, keepdims=True),
                           CANCEL_FLOOR * np.where(vis, size, 0.0).max(axis=-1, keepdims=True))
    return index_score, np.maximum(row_scale, 1e-300)


# ------------------------------------------------------------------------------------------
# Files

def write_bf16_npy(path, values):
    """bfloat16 .npy as ml_dtypes writes it: descr '<V2', the raw 16-bit patterns."""
    values = np.ascontiguousarray(values, dtype=F32)
    bits = (values.view(np.uint32) >> np.uint32(16)).astype("<u2")
    header = "{'descr': '<V2', 'fortran_order': False, 'shape': %s, }" % (repr(tuple(values.shape)),)
    header += " " * ((64 - (10 + len(header) + 1) % 64) % 64) + "\n"
    with open(path, "wb") as f:
        f.write(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode("latin1"))
        f.write(bits.tobytes())


def load_npy(path, dtype, shape, what):
    x = np.load(path)
    if x.dtype != np.dtype(dtype) or tuple(x.shape) != tuple(shape):
        raise RunFailure(f"{what}: {x.dtype} {x.shape}, expected {np.dtype(dtype)} {tuple(shape)}")
    return x


# ------------------------------------------------------------------------------------------
# Inputs

def make_inputs(rng, batch, lq, lk, heads, dim):
    """bf16 q_I [B, Lq, H, d], k_I [B, Lk, d] with a few outlier channels (the same channels
    in q and k, as in the model's activations, so the Hadamard rotation changes the block
    scales), and raw weights_proj outputs w [B, Lq, H] of both signs."""
    q = rng.standard_normal((batch, lq, heads, dim)).astype(F32)
    k = rng.standard_normal((batch, lk, dim)).astype(F32)
    channels = rng.choice(dim, size=4, replace=False)
    gains = rng.uniform(8.0, 40.0, size=4).astype(F32)
    q[..., channels] *= gains
    k[..., channels] *= gains
    k *= rng.uniform(0.25, 4.0, size=(batch, lk, 1)).astype(F32)   # keys of different sizes
    w = (rng.standard_normal((batch, lq, heads)) * 2.0).astype(F32)
    return bf16(q), bf16(k), bf16(w)


# ------------------------------------------------------------------------------------------
# Comparisons

def score_check(got, ref, row_scale):
    vis = np.isfinite(ref)
    if np.any(np.isnan(got)) or np.any(np.isposinf(got)):
        return False, "NaN or +inf in the scores", 0.0
    if not np.array_equal(np.isneginf(got), ~vis):
        bad = tuple(int(i) for i in np.argwhere(np.isneginf(got) != ~vis)[0])
        return False, f"-inf pattern differs at {bad}: got {float(got[bad])!r}, released {float(ref[bad])!r}", 0.0
    rowmax = np.maximum(np.where(vis, np.abs(ref), 0.0).max(axis=-1, keepdims=True), 1e-300)
    diff = np.where(vis, np.abs(got.astype(F64) - np.where(vis, ref, 0.0)), 0.0)
    rel = diff / row_scale
    worst = float(rel.max())
    plain = float((diff / rowmax).max())
    floored = int(np.sum(row_scale > rowmax))
    if worst > SCORE_TOL:
        bad = tuple(int(i) for i in np.unravel_index(np.argmax(rel), rel.shape))
        return False, (f"max error {worst:.3g} of the row scale (tolerance {SCORE_TOL:g}) at {bad}: "
                       f"got {float(got[bad])!r}, released {float(ref[bad])!r}, row scale {float(row_scale[bad[:-1]][0]):.6g}, "
                       f"row max |score| {float(rowmax[bad[:-1]][0]):.6g}; {int((rel > SCORE_TOL).sum())} entries over"), worst
    return True, (f"max error {worst:.3g} of the row scale ({plain:.3g} of the row max |score|; "
                  f"{floored} rows at the cancellation floor)"), worst


def select_check(got, ref, row_scale, k):
    """got [B, Lq, k] int32 from dsa-select; ref [B, Lq, Lk] float64 released scores.
    Returns (ok, message, near-tie exceptions list)."""
    nb, lq, lk = ref.shape
    exceptions = []
    for b in range(nb):
        for t in range(lq):
            row, g = ref[b, t], got[b, t]
            where = f"b={b} t={t}"
            vis = np.isfinite(row)
            nvis = int(vis.sum())
            n = min(k, nvis)         # torch's topk(min(k, end_pos)) holds -inf entries past nvis
            if np.any(g[n:] != -1):
                return False, f"{where}: expected -1 after {n} entries, got {g[n:n + 8].tolist()}...", exceptions
            sel = g[:n]
            if np.any(sel < 0) or np.any(sel >= lk) or len(np.unique(sel)) != n:
                return False, f"{where}: out of range or repeated indices", exceptions
            if not np.all(vis[sel]):
                return False, f"{where}: selected masked positions {sel[~vis[sel]].tolist()}", exceptions
            tol = TIE_TOL * float(row_scale[b, t, 0])
            s = row[sel]
            if n > 1 and float(np.max(s[1:] - s[:-1])) > tol:
                i = int(np.argmax(s[1:] - s[:-1]))
                return False, (f"{where}: not in descending order: entry {i + 1} (position {sel[i + 1]}, "
                               f"{float(s[i + 1])!r}) above entry {i} (position {sel[i]}, {float(s[i])!r})"), exceptions
            if nvis <= k:
                continue             # the visible part is everything
            cand = np.nonzero(vis)[0]
            order = cand[np.lexsort((cand, -row[cand]))]
            want = order[:k]
            kth = row[order[k - 1]]
            sym = np.setxor1d(want, sel)
            far = sym[np.abs(row[sym] - kth) > tol]
            if far.size:
                p = int(far[0])
                how = "missing" if p in want else "selected"
                return False, (f"{where}: position {p} {how} with released score {float(row[p])!r}, "
                               f"k-th score {float(kth)!r}, band {tol:.3g} ({far.size} such positions)"), exceptions
            for p in np.setdiff1d(sel, want):
                exceptions.append((b, t, int(p), float(row[p]), float(kth), float(row_scale[b, t, 0])))
    return True, "", exceptions


# ------------------------------------------------------------------------------------------
# Cases

class Runner:
    def __init__(self, bindir, tmp, device):
        self.bindir, self.tmp, self.device = bindir, tmp, device

    def path(self, name):
        return os.path.join(self.tmp, name)

    def case(self, name, rng, batch, lq, lk, heads, dim, ue8m0, topks):
        """batch None: no batch dimension in the files (prefill); otherwise [B, ...]."""
        nb = batch or 1
        prefill = lq == lk
        q, k, w = make_inputs(rng, nb, lq, lk, heads, dim)
        files = {}
        for what, x in (("q", q), ("k", k), ("w", w)):
            files[what] = self.path(f"{name}_{what}.npy")
            write_bf16_npy(files[what], x if batch else x[0])
        t0 = time.perf_counter()
        ref, row_scale = released_indexer(q, k, w, "ue8m0" if ue8m0 else None, prefill)
        t_ref = time.perf_counter() - t0
        args = ["--q-index", files["q"], "--k-index", files["k"], "--weights", files["w"],
                "--precision", "fp8", "--hadamard", "--raw-weights", "--device", self.device] + \
            (["--ue8m0"] if ue8m0 else [])
        lead = (batch,) if batch else ()
        tag = (f"{name} [B={batch or '-'} Lq={lq} Lk={lk} H_I={heads} d_I={dim} "
               f"{'ue8m0' if ue8m0 else 'f32 scales'}]")

        try:
            spath = self.path(f"{name}_scores.npy")
            run_tool(self.bindir, "dsa-score", args + ["-o", spath])
            got = load_npy(spath, "<f4", lead + (lq, lk), "dsa-score output")
            ok, msg, _ = score_check(got if batch else got[None], ref, row_scale)
        except RunFailure as e:
            ok, msg = False, str(e)
        CHECKS.record(f"dsa-score {tag}", ok, f"{msg}; transcription {t_ref:.1f} s" if ok else msg)

        for topk in topks:
            try:
                opath = self.path(f"{name}_sel{topk}.npy")
                run_tool(self.bindir, "dsa-select", args + ["-k", topk, "-o", opath])
                sel = load_npy(opath, "<i4", lead + (lq, topk), "dsa-select output")
                ok, msg, exc = select_check(sel if batch else sel[None], ref, row_scale, topk)
            except RunFailure as e:
                ok, msg, exc = False, str(e), []
            if ok:
                rows = len({e[:2] for e in exc})
                msg = f"top-{topk} sets identical but for {len(exc)} near-tie exceptions in {rows} rows"
            CHECKS.record(f"dsa-select -k {topk} {tag}", ok, msg)
            for b, t, p, s, kth, scale in exc[:SHOW]:
                print(f"      near-tie: row b={b} t={t}: selected {p} with released score {s!r}, "
                      f"k-th score {kth!r} (difference {abs(s - kth) / scale:.2g} of the row scale)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bin", required=True, help="directory holding dsa-score and dsa-select")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: a fresh one, printed)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="passed to the tools")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args()
    if args.device == "cuda":
        global SCORE_TOL, TIE_TOL
        SCORE_TOL, TIE_TOL = GPU_SCORE_TOL, GPU_TIE_TOL
    bindir = os.path.abspath(args.bin)
    for tool in ("dsa-score", "dsa-select"):
        if not os.access(os.path.join(bindir, tool), os.X_OK):
            print(f"released_indexer_check: {tool} not found (or not executable) in {bindir}")
            return 1
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little")
    print(f"seed {seed} (reproduce with --seed {seed}), device {args.device}")
    sys.stdout.flush()

    self_checks()
    start = time.perf_counter()
    tmp = tempfile.mkdtemp(prefix="dsa-released-indexer-")
    try:
        r = Runner(bindir, tmp, args.device)
        cases = [
            # name, batch, Lq, Lk, H_I, d_I, ue8m0, k for selection
            ("prefill-h64", None, 512, 512, 64, 128, False, (64, 256)),
            ("prefill-h64-ue8m0", None, 512, 512, 64, 128, True, (64, 256)),
            ("prefill-h32", None, 512, 512, 32, 128, False, (64, 256)),
            ("prefill-h32-ue8m0", None, 512, 512, 32, 128, True, (64, 256)),
            ("decode512-h64", 4, 1, 512, 64, 128, False, (64, 256)),
            ("decode512-h64-ue8m0", 4, 1, 512, 64, 128, True, (64, 256)),
            ("decode777-h32", 4, 1, 777, 32, 128, False, (64, 256)),
            ("decode777-h64-ue8m0", 4, 1, 777, 64, 128, True, (64, 256)),
        ]
        for i, (name, batch, lq, lk, heads, dim, ue8m0, topks) in enumerate(cases):
            rng = np.random.default_rng([seed, i])
            r.case(name, rng, batch, lq, lk, heads, dim, ue8m0, topks)
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"seed {seed}, {time.perf_counter() - start:.1f} s")
    return CHECKS.finish()


if __name__ == "__main__":
    sys.exit(main())
