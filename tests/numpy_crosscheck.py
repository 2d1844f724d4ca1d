#!/usr/bin/env python3
"""Independent NumPy implementation of DESIGN.md section 1, checked against the binaries.

Generates fresh seeded random inputs (prefill and decode, with and without a batch dimension,
shapes from L=1 to L=300), writes them as .npy (f32, f16, bfloat16 '<V2') and .safetensors
(selected with FILE.safetensors:NAME), runs dsa-score, dsa-select and dsa-attend, and compares
their outputs with references computed here in float64:

  * dsa-score: f32, bf16, fp8 (block scales, optionally ue8m0), --hadamard, --raw-weights;
    relative error against the row's max |I|, -inf exactly where s > Lk - Lq + t. The precision
    pipeline follows the released DeepSeek-V3.2-Exp indexer (see ref_index_inputs and
    ref_weights; tests/released_indexer_check.py transcribes the released code itself).
  * dsa-select: from --scores (must equal the exact top-k of the binary's own scores), fused
    (must equal the pipeline exactly), -o .jsonl; index sets against the float64 reference,
    where near-ties (within 1e-5 of the row's max |I|) may go either way.
  * dsa-attend: MQA (--kv --dv), MHA/GQA (--k --v), sparse (--indices .npy/.jsonl) and --dense,
    outputs (relative Frobenius error per case) and the log-sum-exp (absolute error).

Nothing here comes from the C++ sources: bf16 rounding, float8 e4m3fn rounding (by enumerating
the code values), block quantization and the Hadamard transform are written out below.

Usage: python3 tests/numpy_crosscheck.py --bin DIR [--keep]
Exit status: 0 all checks passed, 1 a mismatch or a failed run, 77 numpy is missing.
"""

import argparse
import json
import os
import shutil
import struct
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pycheck import Checks, RunFailure, run_tool  # noqa: E402

try:
    import numpy as np
except ImportError:
    print("numpy_crosscheck: numpy is not available; skipping", file=sys.stderr)
    sys.exit(77)

F32 = np.float32
F64 = np.float64
REL_TOL = 1e-5      # scores and attention outputs, relative
LSE_TOL = 1e-5      # log-sum-exp, absolute
TIE_TOL = 1e-5      # near-tie band for index-set comparisons, relative to the row's max |I|


# ------------------------------------------------------------------------------------------
# Bookkeeping

CHECKS = Checks()




# ------------------------------------------------------------------------------------------
# Number formats, written independently of the C++ code

def bf16_round_bits(x):
    """float32 -> bfloat16 bits, round to nearest, ties to even, by comparing the two
    bf16 neighbours in float64 (finite inputs only)."""
    x = np.ascontiguousarray(x, dtype=F32)
    b = x.view(np.uint32)
    lo_bits = b & np.uint32(0xFFFF0000)            # toward zero
    hi_bits = lo_bits + np.uint32(0x10000)         # next bf16 away from zero
    lo = lo_bits.view(F32).astype(F64)
    hi = hi_bits.view(F32).astype(F64)
    xd = x.astype(F64)
    dlo = np.abs(xd - lo)
    dhi = np.abs(hi - xd)
    lo_odd = ((lo_bits >> np.uint32(16)) & np.uint32(1)) == 1
    take_hi = (dhi < dlo) | ((dhi == dlo) & lo_odd)
    out = np.where(take_hi, hi_bits, lo_bits) >> np.uint32(16)
    return out.astype(np.uint16)


def bf16_bits_to_f32(bits):
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << np.uint32(16)).view(F32)


def round_bf16(x):
    return bf16_bits_to_f32(bf16_round_bits(x))


def _e4m3_table():
    """Magnitudes of float8 e4m3fn codes 0..126 (bias 7, subnormals at exponent 0;
    code 127 is NaN, there is no infinity). Increasing with the code."""
    vals = []
    for code in range(127):
        e, m = code >> 3, code & 7
        vals.append(m * 2.0 ** -9 if e == 0 else (1.0 + m / 8.0) * 2.0 ** (e - 7))
    return np.array(vals, dtype=F64)


E4M3 = _e4m3_table()


def e4m3_round(y):
    """float32 -> float8 e4m3fn value (as float64), nearest, ties to the even code, saturating
    at +-448."""
    y = np.asarray(y, dtype=F32)
    a = np.abs(y).astype(F64)
    idx = np.clip(np.searchsorted(E4M3, a, side="left"), 1, 126)
    lo, hi = idx - 1, idx
    dlo = a - E4M3[lo]
    dhi = E4M3[hi] - a
    take_hi = (dhi < dlo) | ((dhi == dlo) & (hi % 2 == 0))
    code = np.where(take_hi, hi, lo)
    code = np.where(a >= E4M3[126], 126, code)      # saturate, no infinities
    return np.where(np.signbit(y), -E4M3[code], E4M3[code])


def fp8_scale(amax, ue8m0):
    """Block scale in float32: max(amax, 1e-4) times float32(1/448) (a product, as the released
    act_quant computes it, not a division by 448), optionally rounded up to a power of two."""
    s = np.maximum(np.asarray(amax, dtype=F32), F32(1e-4)) * F32(1.0 / 448.0)
    s = s.astype(F32)
    if ue8m0:
        m, e = np.frexp(s.astype(F64))                # s = m * 2^e, m in [0.5, 1)
        s = np.where(m == 0.5, s.astype(F64), np.ldexp(1.0, e)).astype(F32)
    return s


def fp8_quant(x, ue8m0, block=128):
    """Per 128-element block of each row (last axis): the e4m3 code values (float32) and the
    block scales (float32, [..., number of blocks])."""
    x = np.asarray(x, dtype=F32)
    codes = np.empty_like(x)
    d = x.shape[-1]
    scales = []
    for begin in range(0, d, block):
        xb = x[..., begin:begin + block]
        amax = np.max(np.abs(xb), axis=-1, keepdims=True)
        scale = fp8_scale(amax, ue8m0)
        codes[..., begin:begin + block] = e4m3_round((xb / scale).astype(F32))  # f32 division, e4m3
        scales.append(scale)
    return codes, np.concatenate(scales, axis=-1)


def fp8_fake_quant(x, ue8m0, block=128):
    """Per 128-element block of each row (last axis): dequantized float32 values code*scale."""
    codes, scales = fp8_quant(x, ue8m0, block)
    d = codes.shape[-1]
    per_element = np.repeat(scales, block, axis=-1)[..., :d]
    return (codes * per_element).astype(F32)                  # f32 product


def hadamard_f32(x):
    """Orthonormal Sylvester Walsh-Hadamard transform along the last axis (n a power of two),
    float32 butterflies, then times float32(1/sqrt(n)) (1/sqrt(n) in double, then rounded)."""
    x = np.asarray(x, dtype=F32)
    n = x.shape[-1]
    lead = x.shape[:-1]
    y = x.copy()
    h = 1
    while h < n:
        y = y.reshape(lead + (n // (2 * h), 2, h))
        a, b = y[..., 0, :], y[..., 1, :]
        y = np.stack([a + b, a - b], axis=-2).reshape(lead + (n,))
        h *= 2
    return (y * F32(1.0 / np.sqrt(float(n)))).astype(F32)


def sylvester(n):
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h


def self_checks():
    """The formats above against facts stated independently (fails the script if wrong)."""
    problems = []
    if E4M3[126] != 448.0 or E4M3[1] != 2.0 ** -9 or E4M3[8] != 2.0 ** -6 or np.any(np.diff(E4M3) <= 0):
        problems.append("e4m3 table")
    cases = {0.0: 0.0, 2.0 ** -10: 0.0, 3 * 2.0 ** -10: 2 * 2.0 ** -9, 448.0: 448.0, 460.0: 448.0,
             500.0: 448.0, 1e30: 448.0, 1.0625: 1.0, 1.1875: 1.25, 17.0: 16.0, 19.0: 20.0, 240.0: 240.0,
             -3.3: -3.25, 0.3: 0.3125, 5e-4: 0.0, 1.5 * 2.0 ** -9: 2 * 2.0 ** -9}
    for x, want in cases.items():
        got = float(e4m3_round(np.array([x], dtype=F32))[0])
        if got != want:
            problems.append(f"e4m3({x}) = {got}, expected {want}")
    bf = {1.0: 1.0, 1.0 + 2.0 ** -8: 1.0, 1.0 + 3 * 2.0 ** -8: 1.0 + 2.0 ** -6, 1.0 + 2.0 ** -8 + 2.0 ** -20:
          1.0 + 2.0 ** -7, -1.00390625: -1.0, 3.0: 3.0}
    for x, want in bf.items():
        got = float(round_bf16(np.array([x], dtype=F32))[0])
        if got != want:
            problems.append(f"bf16({x}) = {got}, expected {want}")
    if float(fp8_scale(np.array(448.0), False)) != 1.0 or \
            float(fp8_scale(np.array(0.0), False)) != F32(F32(1e-4) * F32(1.0 / 448.0)) or \
            float(fp8_scale(np.array(3.0), False)) != float(F32(F32(3.0) * F32(1.0 / 448.0))):
        problems.append("fp8 scale")
    if float(fp8_scale(np.array(449.0), True)) != 2.0 or float(fp8_scale(np.array(448.0), True)) != 1.0:
        problems.append("ue8m0 scale")
    rng = np.random.default_rng(5)
    for n in (1, 2, 16, 64, 256):
        x = rng.standard_normal((3, n)).astype(F32)
        want = x.astype(F64) @ sylvester(n) / np.sqrt(n)
        if np.max(np.abs(hadamard_f32(x) - want)) > 1e-5:
            problems.append(f"hadamard n={n}")
    if problems:
        print("numpy_crosscheck: self-check of the NumPy reference failed: " + "; ".join(problems))
        sys.exit(1)


# ------------------------------------------------------------------------------------------
# Files

def _npy_header(descr, shape):
    header = "{'descr': '%s', 'fortran_order': False, 'shape': %s, }" % (descr, repr(tuple(shape)))
    pad = (64 - (10 + len(header) + 1) % 64) % 64
    header = header + " " * pad + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode("latin1")


def save(path, x, storage="f32"):
    """Writes x (float32 values) in the given storage and returns the values the binary will
    read (exactly representable in that storage)."""
    x = np.asarray(x, dtype=F32)
    if storage == "f32":
        np.save(path, x)
        return x
    if storage == "f16":
        h = x.astype(np.float16)
        np.save(path, h)
        return h.astype(F32)
    if storage == "bf16":
        bits = bf16_round_bits(x)
        with open(path, "wb") as f:
            f.write(_npy_header("<V2", x.shape))
            f.write(bits.astype("<u2").tobytes())
        return bf16_bits_to_f32(bits).reshape(x.shape)
    raise ValueError(storage)


def write_safetensors(path, tensors):
    """tensors: name -> (storage, float32 array). Returns name -> values as stored."""
    header, blobs, values, offset = {}, [], {}, 0
    for name, (storage, x) in tensors.items():
        x = np.asarray(x, dtype=F32)
        if storage == "f32":
            data, dtype, v = x.astype("<f4").tobytes(), "F32", x
        elif storage == "f16":
            h = x.astype(np.float16)
            data, dtype, v = h.astype("<f2").tobytes(), "F16", h.astype(F32)
        elif storage == "bf16":
            bits = bf16_round_bits(x)
            data, dtype, v = bits.astype("<u2").tobytes(), "BF16", bf16_bits_to_f32(bits).reshape(x.shape)
        else:
            raise ValueError(storage)
        header[name] = {"dtype": dtype, "shape": list(x.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        values[name] = v
        offset += len(data)
    header["__metadata__"] = {"source": "numpy_crosscheck"}
    text = json.dumps(header).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for blob in blobs:
            f.write(blob)
    return values


def read_safetensors(path):
    with open(path, "rb") as f:
        raw = f.read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    base = 8 + n
    dtypes = {"F32": "<f4", "I32": "<i4", "F16": "<f2", "I64": "<i8"}
    out = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        a, b = entry["data_offsets"]
        out[name] = np.frombuffer(raw[base + a:base + b], dtype=dtypes[entry["dtype"]]).reshape(entry["shape"])
    return out


def load_npy(path, dtype, shape, what):
    x = np.load(path)
    if x.dtype != np.dtype(dtype):
        raise RunFailure(f"{what}: dtype {x.dtype}, expected {np.dtype(dtype)}")
    if tuple(x.shape) != tuple(shape):
        raise RunFailure(f"{what}: shape {x.shape}, expected {tuple(shape)}")
    return x


# ------------------------------------------------------------------------------------------
# References (float64)

def ref_index_inputs(q, k, precision, hadamard, ue8m0):
    """The rows as the scoring sees them, float64, with the per-row scales (float32, [...]):
      f32:  the rows (rotated in f32 if hadamard); scales 1.
      bf16: rotated (if hadamard), rounded to bf16; scales 1.
      fp8:  rotated (if hadamard), rounded to bf16 (the released rotate_activation returns bf16
            and act_quant reads bf16), block-quantized (fp8_quant). A row of ONE block (d <= 128,
            DSA's d_I = 128) keeps its e4m3 code values and its block scale, which the score
            multiplies in after the dot product as the released fp8_index does; a row of several
            blocks holds the dequantized values code * block scale (f32) and scale 1."""
    q = np.asarray(q, dtype=F32)
    k = np.asarray(k, dtype=F32)
    if hadamard:
        q, k = hadamard_f32(q), hadamard_f32(k)
    if precision != "f32":
        q, k = round_bf16(q), round_bf16(k)
    qs = np.ones(q.shape[:-1], dtype=F32)
    ks = np.ones(k.shape[:-1], dtype=F32)
    if precision == "fp8":
        if q.shape[-1] <= 128:
            q, qs = fp8_quant(q, ue8m0)
            k, ks = fp8_quant(k, ue8m0)
            qs, ks = qs[..., 0], ks[..., 0]
        else:
            q, k = fp8_fake_quant(q, ue8m0), fp8_fake_quant(k, ue8m0)
    return q.astype(F64), k.astype(F64), qs, ks


def ref_weights(w, q_scales, dim, raw_weights):
    """The per-head factors w' [B, Lq, H] (float32) the scores multiply ReLU(q . k) by:
    w * q_scale, or with --raw-weights (w are raw weights_proj outputs) the released
    Indexer.forward steps, in float32: float32(bf16(float32(w) * float32(H_I**-0.5))), then
    times q_scale, then times float32(d_I**-0.5). q_scales [B, Lq, H] is 1 outside fp8 and for
    rows of several blocks."""
    w = np.asarray(w, dtype=F32)
    if not raw_weights:
        return (w * q_scales).astype(F32)
    heads = w.shape[-1]
    w = round_bf16((w * F32(heads ** -0.5)).astype(F32))
    w = (w * q_scales).astype(F32)
    return (w * F32(dim ** -0.5)).astype(F32)


def ref_scores(q, k, w, precision="f32", hadamard=False, ue8m0=False, raw_weights=False):
    """q [B,Lq,H,d], k [B,Lk,d], w [B,Lq,H] -> (I [B,Lq,Lk] float64 with -inf where s > pos,
    norm [B,Lq,1]). I[t,s] = k_scale[s] * sum_j w'[t,j] ReLU(q_I[t,j] . k_I[s]) with the rows,
    scales and w' of ref_index_inputs / ref_weights. norm is the row's max over visible s of
    k_scale[s] sum_j |w'[t,j]| ReLU(q_I[t,j].k_I[s]), which is >= the row's max |I| and, unlike
    it, does not shrink when the heads' terms cancel (a row with a single visible key can have
    |I| far below its terms)."""
    qd, kd, qs, ks = ref_index_inputs(q, k, precision, hadamard, ue8m0)
    wd = ref_weights(w, qs, q.shape[-1], raw_weights).astype(F64)
    dots = np.einsum("bthd,bsd->bths", qd, kd)
    relu = np.maximum(dots, 0.0)
    ksd = ks.astype(F64)[:, None, :]
    scores = np.einsum("bth,bths->bts", wd, relu) * ksd
    magnitude = np.einsum("bth,bths->bts", np.abs(wd), relu) * ksd
    lq, lk = q.shape[1], k.shape[1]
    pos = lk - lq + np.arange(lq)
    mask = np.arange(lk)[None, :] > pos[:, None]
    scores[:, mask] = -np.inf
    magnitude[:, mask] = 0.0
    norm = magnitude.max(axis=-1, keepdims=True)
    norm = np.maximum(norm, max(1e-6 * float(norm.max(initial=0.0)), 1e-30))
    return scores, norm


def topk_exact(scores, k):
    """Top-k of each row: descending score, equal scores lower index first, -1 padding."""
    b, lq, lk = scores.shape
    out = np.full((b, lq, k), -1, dtype=np.int32)
    idx = np.arange(lk)
    for bi in range(b):
        for t in range(lq):
            row = scores[bi, t]
            vis = np.isfinite(row)
            cand = idx[vis]
            order = np.lexsort((cand, -row[vis]))[:k]
            out[bi, t, :len(order)] = cand[order]
    return out


def attend_ref(q, keys, values, indices, scale, lk):
    """q [B,Lq,H,d], keys [B,Lk,Hkv,d], values [B,Lk,Hkv,dv], indices [B,Lq,K] or None (dense).
    Query head h reads kv head h // (H / Hkv)."""
    q = q.astype(F64)
    keys = keys.astype(F64)
    values = values.astype(F64)
    b, lq, h, _ = q.shape
    hkv = keys.shape[2]
    head_map = np.arange(h) // (h // hkv)
    o = np.zeros((b, lq, h, values.shape[-1]))
    lse = np.zeros((b, lq, h))
    for bi in range(b):
        for t in range(lq):
            pos = lk - lq + t
            sel = np.arange(pos + 1) if indices is None else indices[bi, t][indices[bi, t] >= 0]
            kk = keys[bi, sel][:, head_map]        # [n, H, d]
            vv = values[bi, sel][:, head_map]      # [n, H, dv]
            logits = scale * np.einsum("nhd,hd->hn", kk, q[bi, t])
            m = logits.max(axis=1, keepdims=True)
            p = np.exp(logits - m)
            z = p.sum(axis=1, keepdims=True)
            lse[bi, t] = (m + np.log(z))[:, 0]
            o[bi, t] = np.einsum("hn,nhd->hd", p / z, vv)
    return o, lse


# ------------------------------------------------------------------------------------------
# Comparisons

def score_error(got, ref, norm):
    """Max |got - ref| over visible entries relative to the row's norm (see ref_scores);
    None if the -inf pattern differs. Also returns the same error relative to the row's max
    |ref| for information."""
    if got.shape != ref.shape:
        return None, f"shape {got.shape} != {ref.shape}"
    vis = np.isfinite(ref)
    if np.any(np.isnan(got)) or np.any(np.isposinf(got)):
        return None, "NaN or +inf in the output"
    if not np.array_equal(np.isneginf(got), ~vis):
        bad = np.argwhere(np.isneginf(got) != ~vis)[0]
        return None, f"-inf mask differs at {tuple(bad)} (got {got[tuple(bad)]}, reference {ref[tuple(bad)]})"
    absref = np.where(vis, np.abs(ref), 0.0)
    rowmax = np.maximum(absref.max(axis=-1, keepdims=True), 1e-30)
    diff = np.where(vis, np.abs(got.astype(F64) - np.where(vis, ref, 0.0)), 0.0)
    if not diff.size:
        return 0.0, 0.0
    return float((diff / norm).max()), float((diff / rowmax).max())


def selection_check(got, ref, norm, k):
    """Index sets of `got` [B,Lq,K] against the float64 scores `ref` [B,Lq,Lk]; scores within
    TIE_TOL * norm of the k-th score count as near-ties and may go either way.
    Returns (ok, message, rows_exact, rows_near_tie)."""
    b, lq, lk = ref.shape
    if got.shape != (b, lq, k):
        return False, f"shape {got.shape} != {(b, lq, k)}", 0, 0
    exact_rows, tie_rows = 0, 0
    for bi in range(b):
        for t in range(lq):
            row, g = ref[bi, t], got[bi, t]
            vis = np.isfinite(row)
            nvis = int(vis.sum())
            n = min(k, nvis)
            where = f"row b={bi} t={t}"
            if np.any(g[n:] != -1):
                return False, f"{where}: expected -1 padding after {n} entries, got {g.tolist()}", 0, 0
            sel = g[:n]
            if np.any(sel < 0) or np.any(sel >= lk):
                return False, f"{where}: index out of range in {sel.tolist()}", 0, 0
            if len(np.unique(sel)) != n:
                return False, f"{where}: repeated index in {sel.tolist()}", 0, 0
            if not np.all(vis[sel]):
                return False, f"{where}: selected a masked (future) position: {sel.tolist()}", 0, 0
            tol = TIE_TOL * float(norm[bi, t, 0])
            s = row[sel]
            if n > 1:
                viol = float(np.max(s[1:] - s[:-1]))       # should be <= 0 (descending)
                if viol > tol:
                    return False, f"{where}: not in descending score order: {s.tolist()}", 0, 0
            if nvis <= k:
                exact_rows += 1
                continue
            kth = np.sort(row[vis])[::-1][k - 1]
            must = np.nonzero(vis & (row > kth + tol))[0]
            missing = np.setdiff1d(must, sel)
            if missing.size:
                return False, (f"{where}: positions {missing.tolist()} with scores "
                               f"{row[missing].tolist()} clearly above the k-th score {kth} were not selected"), 0, 0
            low = sel[row[sel] < kth - tol]
            if low.size:
                return False, (f"{where}: selected positions {low.tolist()} with scores {row[low].tolist()} "
                               f"clearly below the k-th score {kth}"), 0, 0
            ref_set = np.lexsort((np.arange(lk)[vis], -row[vis]))[:k]
            if set(np.arange(lk)[vis][ref_set].tolist()) == set(sel.tolist()):
                exact_rows += 1
            else:
                tie_rows += 1
    return True, "", exact_rows, tie_rows


def rel_frobenius(got, ref):
    denom = np.linalg.norm(ref.ravel())
    return float(np.linalg.norm((got.astype(F64) - ref).ravel()) / (denom if denom > 0 else 1.0))


# ------------------------------------------------------------------------------------------
# Cases

def batched_shape(batch, *dims):
    return ((batch,) if batch else ()) + dims


def add_batch(x, batch):
    return x if batch else x[None]


class Runner:
    def __init__(self, bindir, tmp):
        self.bindir = bindir
        self.tmp = tmp

    def path(self, name):
        return os.path.join(self.tmp, name)

    def check(self, name, fn):
        """Runs fn() -> (ok, detail, category, error); a RunFailure is a failed check."""
        try:
            ok, detail, category, error = fn()
        except RunFailure as e:
            return CHECKS.record(name, False, str(e))
        return CHECKS.record(name, ok, detail, category, error)

    # --- indexer: dsa-score and dsa-select ---------------------------------------------------

    def indexer_case(self, name, seed, batch, lq, lk, heads, dim, topk, storage="f32",
                     variants=(), ties=False, special_rows=False, extra=False):
        rng = np.random.default_rng(seed)
        if ties:
            q = rng.integers(-2, 3, size=batched_shape(batch, lq, heads, dim)).astype(F32)
            k = rng.integers(-2, 3, size=batched_shape(batch, lk, dim)).astype(F32)
            w = rng.integers(1, 3, size=batched_shape(batch, lq, heads)).astype(F32)
        else:
            q = rng.standard_normal(batched_shape(batch, lq, heads, dim)).astype(F32)
            k = rng.standard_normal(batched_shape(batch, lk, dim)).astype(F32)
            w = rng.standard_normal(batched_shape(batch, lq, heads)).astype(F32)
        if special_rows:
            # Exercise the fp8 block scales: tiny rows (amax < 1e-4, clamped), a zero row,
            # outliers in one block, a block with a very different range from its neighbour.
            kk = k if batch else k[None]
            qq = q if batch else q[None]
            kk[:, 1] *= F32(1e-6)
            kk[:, 2] = 0.0
            kk[:, 3, 5] = 300.0
            kk[:, 4, :min(dim, 128)] *= F32(50.0)
            qq[:, 0, 0, 7] = -80.0
            qq[:, -1, :, :] *= F32(1e-5)      # amax < 1e-4: the clamped scale
        ins = {}
        if storage == "safetensors":
            st = self.path(f"{name}.safetensors")
            vals = write_safetensors(st, {"weights_out": ("f32", w), "q_index": ("f32", q),
                                          "k_index": ("bf16", k), "unused": ("f16", k[..., :3])})
            q, k, w = vals["q_index"], vals["k_index"], vals["weights_out"]
            ins = {"q": f"{st}:q_index", "k": f"{st}:k_index", "w": f"{st}:weights_out"}
        else:
            ins = {"q": self.path(f"{name}_q.npy"), "k": self.path(f"{name}_k.npy"), "w": self.path(f"{name}_w.npy")}
            q = save(ins["q"], q, storage)
            k = save(ins["k"], k, storage)
            w = save(ins["w"], w, "f32" if storage == "bf16" else storage)
        qb, kb, wb = add_batch(q, batch), add_batch(k, batch), add_batch(w, batch)
        out_shape = batched_shape(batch, lq, lk)
        sel_shape = batched_shape(batch, lq, topk)
        tag = f"{name} [B={batch or '-'} Lq={lq} Lk={lk} H_I={heads} d_I={dim} k={topk} {storage}]"
        index_args = ["--q-index", ins["q"], "--k-index", ins["k"], "--weights", ins["w"]]

        for variant in ("f32",) + tuple(variants):
            precision = variant.split("+")[0]
            hadamard = "hadamard" in variant
            ue8m0 = "ue8m0" in variant
            raw = "raw" in variant
            flags = ["--precision", precision] + (["--hadamard"] if hadamard else []) + \
                    (["--ue8m0"] if ue8m0 else []) + (["--raw-weights"] if raw else [])
            vtag = f"{tag} {variant}"
            ref, norm = ref_scores(qb, kb, wb, precision, hadamard, ue8m0, raw)
            spath = self.path(f"{name}_{variant}_S.npy")
            state = {}

            def score():
                run_tool(self.bindir, "dsa-score", index_args + flags + ["-o", spath])
                got = load_npy(spath, "<f4", out_shape, "dsa-score output")
                state["S"] = add_batch(got, batch)
                err, plain = score_error(state["S"], ref, norm)
                if err is None:
                    return False, plain, None, None
                return err <= REL_TOL, f"max rel err {err:.3g} (vs row max |I|: {plain:.3g})", \
                    f"dsa-score {precision}", err

            if not self.check(f"dsa-score {vtag}", score):
                continue

            sel_path = self.path(f"{name}_{variant}_sel.npy")

            def select_scores():
                run_tool(self.bindir, "dsa-select", ["--scores", spath, "-k", topk, "-o", sel_path])
                got = add_batch(load_npy(sel_path, "<i4", sel_shape, "dsa-select output"), batch)
                state["sel"] = got
                want = topk_exact(state["S"].astype(F64), topk)
                if not np.array_equal(got, want):
                    bad = np.argwhere(np.any(got != want, axis=-1))[0]
                    return False, (f"differs from the exact top-k of the binary's own scores at row {tuple(bad)}: "
                                   f"got {got[tuple(bad)].tolist()}, expected {want[tuple(bad)].tolist()}"), None, None
                ok, why, exact, near = selection_check(got, ref, norm, topk)
                if not ok:
                    return False, "against the float64 reference: " + why, None, None
                return True, f"exact top-k of its scores; vs float64: {exact} rows identical, {near} near-tie rows", None, None

            if not self.check(f"dsa-select --scores {vtag}", select_scores):
                continue

            fused_path = self.path(f"{name}_{variant}_fused.npy")

            def select_fused():
                run_tool(self.bindir, "dsa-select", index_args + flags + ["-k", topk, "-o", fused_path])
                got = add_batch(load_npy(fused_path, "<i4", sel_shape, "dsa-select fused output"), batch)
                if not np.array_equal(got, state["sel"]):
                    bad = np.argwhere(np.any(got != state["sel"], axis=-1))[0]
                    return False, (f"fused differs from score|select at row {tuple(bad)}: {got[tuple(bad)].tolist()} "
                                   f"vs {state['sel'][tuple(bad)].tolist()}"), None, None
                return True, "identical to dsa-score | dsa-select", None, None

            self.check(f"dsa-select fused {vtag}", select_fused)

            if variant != "f32":
                continue

            if ties:
                def ties_order():
                    want = topk_exact(ref, topk)   # exact: small integer scores
                    got = state["sel"]
                    if not np.array_equal(got, want):
                        bad = np.argwhere(np.any(got != want, axis=-1))[0]
                        return False, (f"tie order at row {tuple(bad)}: got {got[tuple(bad)].tolist()}, "
                                       f"expected {want[tuple(bad)].tolist()}"), None, None
                    nties = int(sum(len(np.unique(r[np.isfinite(r)])) < np.isfinite(r).sum() for r in ref[0]))
                    return True, f"exact order incl. ties, {nties} rows with tied scores", None, None

                self.check(f"dsa-select tie order {vtag}", ties_order)

            jsonl_path = self.path(f"{name}_sel.jsonl")
            state["jsonl"] = jsonl_path

            def select_jsonl():
                run_tool(self.bindir, "dsa-select", index_args + ["-k", topk, "-o", jsonl_path])
                with open(jsonl_path) as f:
                    lines = [json.loads(line) for line in f if line.strip()]
                nb = batch or 1
                if len(lines) != nb * lq:
                    return False, f"{len(lines)} lines, expected {nb * lq}", None, None
                seen = set()
                worst = 0.0
                for obj in lines:
                    if bool(batch) != ("b" in obj):
                        return False, f"'b' key presence wrong in {obj}", None, None
                    bi = obj.get("b", 0)
                    t = obj["t"] - (lk - lq)
                    if not (0 <= bi < nb and 0 <= t < lq) or (bi, t) in seen:
                        return False, f"bad or repeated row b={bi} t={obj['t']}", None, None
                    seen.add((bi, t))
                    want = state["sel"][bi, t]
                    want = want[want >= 0]
                    if obj["indices"] != want.tolist():
                        return False, f"row b={bi} t={obj['t']}: indices {obj['indices']} != npy {want.tolist()}", None, None
                    if len(obj["scores"]) != len(want):
                        return False, f"row b={bi} t={obj['t']}: {len(obj['scores'])} scores", None, None
                    sc = np.array(obj["scores"], dtype=F64)
                    if not np.array_equal(sc.astype(F32), state["S"][bi, t, want]):
                        return False, f"row b={bi} t={obj['t']}: scores {obj['scores']} != dsa-score's", None, None
                    if len(want):
                        worst = max(worst, float(np.max(np.abs(sc - ref[bi, t, want]))) / norm[bi, t, 0])
                return worst <= REL_TOL, f"indices == npy, scores == dsa-score's, rel err vs float64 {worst:.3g}", \
                    "dsa-select jsonl scores", worst

            self.check(f"dsa-select -o .jsonl {tag}", select_jsonl)

            if extra:
                def threads():
                    p1 = self.path(f"{name}_S_t1.npy")
                    run_tool(self.bindir, "dsa-score", index_args + ["--threads", 1, "-o", p1])
                    p2 = self.path(f"{name}_sel_t3.npy")
                    run_tool(self.bindir, "dsa-select", index_args + ["--threads", 3, "-k", topk, "-o", p2])
                    if not np.array_equal(add_batch(np.load(p1), batch), state["S"]):
                        return False, "scores differ between --threads 1 and the default", None, None
                    if not np.array_equal(add_batch(np.load(p2), batch), state["sel"]):
                        return False, "selection differs between --threads 3 and the default", None, None
                    return True, "bit-identical with --threads 1 / 3", None, None

                self.check(f"dsa-score/select --threads {tag}", threads)

                def query_block():
                    # Another query block changes the f32 GEMM shapes: equal within tolerance,
                    # and the fused selection must still equal the pipeline at that block.
                    p1 = self.path(f"{name}_S_qb7.npy")
                    run_tool(self.bindir, "dsa-score", index_args + ["--query-block", 7, "-o", p1])
                    p2 = self.path(f"{name}_sel_qb7.npy")
                    run_tool(self.bindir, "dsa-select", ["--scores", p1, "-k", topk, "-o", p2])
                    p3 = self.path(f"{name}_fused_qb7.npy")
                    run_tool(self.bindir, "dsa-select", index_args + ["--query-block", 7, "--threads", 2,
                                                                      "-k", topk, "-o", p3])
                    s7 = add_batch(np.load(p1), batch)
                    err, plain = score_error(s7, ref, norm)
                    if err is None or err > REL_TOL:
                        return False, f"--query-block 7 scores vs float64: {plain if err is None else err}", None, None
                    if not np.array_equal(np.load(p2), np.load(p3)):
                        return False, "with --query-block 7 the fused selection differs from score|select", None, None
                    ok, why, _, _ = selection_check(add_batch(np.load(p3), batch), ref, norm, topk)
                    if not ok:
                        return False, "--query-block 7 selection vs float64: " + why, None, None
                    bitwise = np.array_equal(s7, state["S"])
                    return True, (f"rel err {err:.3g}, fused == pipeline, "
                                  f"{'bit-identical to' if bitwise else 'not bit-identical to'} the default block"), \
                        "dsa-score f32", err

                self.check(f"dsa-score/select --query-block 7 {tag}", query_block)

                def st_output():
                    p = self.path(f"{name}_out.safetensors")
                    run_tool(self.bindir, "dsa-score", index_args + ["-o", f"{p}:scores"])
                    t = read_safetensors(p)
                    if list(t) != ["scores"]:
                        return False, f"tensors {list(t)} in the output, expected ['scores']", None, None
                    if not np.array_equal(add_batch(t["scores"], batch), state["S"]):
                        return False, "-o FILE.safetensors:scores differs from the .npy output", None, None
                    return True, "-o FILE.safetensors:scores == .npy output", None, None

                self.check(f"dsa-score -o .safetensors:NAME {tag}", st_output)
        return ins

    # --- attention: dsa-attend ---------------------------------------------------------------

    def attend_case(self, name, seed, batch, lq, lk, heads, dqk, dv, topk, hkv=None, storage="f32",
                    scale=None, index_file=None, index_dtype="int32", qscale=1.0):
        rng = np.random.default_rng(seed)
        mqa = hkv is None
        q = (qscale * rng.standard_normal(batched_shape(batch, lq, heads, dqk))).astype(F32)
        if mqa:
            kv = rng.standard_normal(batched_shape(batch, lk, dqk)).astype(F32)
        else:
            kk = rng.standard_normal(batched_shape(batch, lk, hkv, dqk)).astype(F32)
            vv = rng.standard_normal(batched_shape(batch, lk, hkv, dv)).astype(F32)
        if storage == "safetensors":
            st = self.path(f"{name}.safetensors")
            tensors = {"q": ("f32", q)}
            if mqa:
                tensors["kv"] = ("bf16", kv)
            else:
                tensors["k"], tensors["v"] = ("bf16", kk), ("f16", vv)
            vals = write_safetensors(st, tensors)
            q = vals["q"]
            args = ["--q", f"{st}:q"]
            if mqa:
                kv = vals["kv"]
                args += ["--kv", f"{st}:kv", "--dv", dv]
            else:
                kk, vv = vals["k"], vals["v"]
                args += ["--k", f"{st}:k", "--v", f"{st}:v"]
        else:
            q = save(self.path(f"{name}_q.npy"), q, storage)
            args = ["--q", self.path(f"{name}_q.npy")]
            if mqa:
                kv = save(self.path(f"{name}_kv.npy"), kv, storage)
                args += ["--kv", self.path(f"{name}_kv.npy"), "--dv", dv]
            else:
                kk = save(self.path(f"{name}_k.npy"), kk, storage)
                vv = save(self.path(f"{name}_v.npy"), vv, storage)
                args += ["--k", self.path(f"{name}_k.npy"), "--v", self.path(f"{name}_v.npy")]
        qb = add_batch(q, batch)
        if mqa:
            kvb = add_batch(kv, batch)
            keys, values = kvb[:, :, None, :], kvb[:, :, None, :dv]
        else:
            keys, values = add_batch(kk, batch), add_batch(vv, batch)
        if scale is not None:
            args += ["--scale", repr(scale)]
        sc = scale if scale is not None else dqk ** -0.5

        # Random selections: distinct visible positions in random order, -1 padding at the end.
        nb = batch or 1
        idx = np.full((nb, lq, topk), -1, dtype=np.int32)
        for bi in range(nb):
            for t in range(lq):
                pos = lk - lq + t
                n = min(topk, pos + 1)
                idx[bi, t, :n] = rng.permutation(pos + 1)[:n]
        if index_file is None:
            index_file = self.path(f"{name}_idx.npy")
            np.save(index_file, (idx if batch else idx[0]).astype(index_dtype))
        else:
            # A dsa-select output (.jsonl): read it back here for the reference.
            idx = np.full((nb, lq, topk), -1, dtype=np.int32)
            with open(index_file) as f:
                for line in f:
                    if line.strip():
                        obj = json.loads(line)
                        row = obj["indices"]
                        idx[obj.get("b", 0), obj["t"] - (lk - lq), :len(row)] = row
        layout = "MQA" if mqa else ("MHA" if hkv == heads else f"GQA H_kv={hkv}")
        tag = (f"{name} [B={batch or '-'} Lq={lq} Lk={lk} H={heads} d_qk={dqk} d_v={dv} {layout} "
               f"{storage}{'' if scale is None else f' scale={scale}'}]")
        o_shape = batched_shape(batch, lq, heads, dv)
        l_shape = batched_shape(batch, lq, heads)

        for mode in ("sparse", "dense"):
            def attend(mode=mode):
                o_path = self.path(f"{name}_{mode}_o.npy")
                l_path = self.path(f"{name}_{mode}_lse.npy")
                sel_args = ["--dense"] if mode == "dense" else ["--indices", index_file]
                run_tool(self.bindir, "dsa-attend", args + sel_args + ["-o", o_path, "--lse", l_path])
                o = add_batch(load_npy(o_path, "<f4", o_shape, "dsa-attend output"), batch)
                lse = add_batch(load_npy(l_path, "<f4", l_shape, "dsa-attend --lse"), batch)
                ro, rl = attend_ref(qb, keys, values, None if mode == "dense" else idx, sc, lk)
                e_o = rel_frobenius(o, ro)
                e_l = float(np.max(np.abs(lse.astype(F64) - rl)))
                prev = CHECKS.worst.get("dsa-attend lse (abs)")
                if prev is None or e_l > prev[0]:
                    CHECKS.worst["dsa-attend lse (abs)"] = (e_l, f"dsa-attend {'--dense' if mode == 'dense' else '--indices'} {tag}")
                ok = e_o <= REL_TOL and e_l <= LSE_TOL
                return ok, f"o rel Frobenius err {e_o:.3g} (tol {REL_TOL}), lse abs err {e_l:.3g} (tol {LSE_TOL})", \
                    "dsa-attend o (rel Frobenius)", e_o

            how = "--dense" if mode == "dense" else \
                f"--indices {os.path.basename(index_file)}{' i64' if index_dtype == 'int64' else ''}"
            self.check(f"dsa-attend {how} {tag}", attend)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bin", required=True, help="directory holding dsa-score, dsa-select, dsa-attend")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args()
    bindir = os.path.abspath(args.bin)
    for tool in ("dsa-score", "dsa-select", "dsa-attend"):
        if not os.access(os.path.join(bindir, tool), os.X_OK):
            print(f"numpy_crosscheck: {tool} not found (or not executable) in {bindir}")
            return 1

    self_checks()
    tmp = tempfile.mkdtemp(prefix="dsa-numpy-crosscheck-")
    try:
        r = Runner(bindir, tmp)
        # Indexer: dsa-score, dsa-select.
        r.indexer_case("tiny", 1, None, 1, 1, 2, 8, 4, variants=("bf16", "fp8"))
        r.indexer_case("prefill37", 2, None, 37, 37, 4, 16, 8, storage="bf16",
                       variants=("bf16", "fp8", "fp8+ue8m0", "f32+hadamard", "fp8+hadamard"), extra=True)
        r.indexer_case("decode", 3, None, 6, 45, 4, 16, 16, storage="f16", variants=("bf16", "fp8"))
        r.indexer_case("decode1", 4, None, 1, 37, 4, 16, 40)
        r.indexer_case("batched", 5, 2, 9, 23, 3, 32, 12, storage="safetensors",
                       variants=("bf16", "fp8", "fp8+hadamard+ue8m0", "f32+raw"), extra=True)
        r.indexer_case("medium", 6, None, 300, 300, 8, 64, 64,
                       variants=("bf16", "fp8", "fp8+ue8m0", "f32+hadamard", "bf16+hadamard",
                                 "fp8+hadamard", "fp8+hadamard+ue8m0", "f32+raw"), extra=True)
        r.indexer_case("wide256", 7, None, 20, 50, 4, 256, 16, special_rows=True,
                       variants=("bf16", "fp8", "fp8+ue8m0", "fp8+hadamard", "bf16+hadamard"))
        r.indexer_case("odd192", 8, 2, 12, 20, 2, 192, 6, special_rows=True, variants=("fp8", "fp8+ue8m0"))
        r.indexer_case("ties", 9, None, 40, 40, 2, 8, 10, ties=True)
        r.indexer_case("ties-batched-decode", 10, 3, 10, 30, 3, 4, 7, ties=True)
        # Attention: dsa-attend.
        r.attend_case("att-tiny", 11, None, 1, 1, 2, 8, 4, 4)
        r.attend_case("att-prefill37", 12, None, 37, 37, 4, 24, 16, 8, storage="bf16")
        r.attend_case("att-prefill37-selected", 12, None, 37, 37, 4, 24, 16, 8,
                      index_file=os.path.join(tmp, "prefill37_sel.jsonl"))
        r.attend_case("att-decode", 13, None, 6, 45, 8, 72, 64, 16, storage="f16")
        r.attend_case("att-batched-gqa", 14, 2, 9, 23, 4, 16, 12, 12, hkv=2, storage="safetensors")
        r.attend_case("att-batched-mqa", 15, 2, 5, 11, 3, 20, 8, 4, storage="safetensors")
        r.attend_case("att-mha-decode", 16, None, 10, 37, 3, 16, 8, 8, hkv=3, index_dtype="int64")
        r.attend_case("att-gqa4", 17, None, 37, 37, 8, 32, 32, 64, hkv=2, qscale=3.0)
        r.attend_case("att-medium", 18, None, 300, 300, 16, 96, 64, 64, qscale=2.0)
        r.attend_case("att-medium-scale", 19, None, 300, 300, 16, 96, 64, 64, scale=0.05)
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    print("worst observed errors:")
    for category, (err, where) in sorted(CHECKS.worst.items()):
        print(f"  {category}: {err:.3g}  ({where})")
    return CHECKS.finish()


if __name__ == "__main__":
    sys.exit(main())
