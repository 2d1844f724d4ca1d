"""Plain NumPy references for the Python module's tests: docs/DESIGN.md section 1 (and 6) in
float64, the number formats written out here (nothing shared with the C++ sources), random
inputs, and a .safetensors writer."""
import json
import os
import struct
import sys

import numpy as np

F32 = np.float32
F64 = np.float64
NEG_INF = -np.inf


def import_dsa():
    """The module under test; says where it was looked for when missing."""
    try:
        import dsa
    except ImportError as e:
        raise SystemExit(f"cannot import dsa ({e}); PYTHONPATH={os.environ.get('PYTHONPATH')}, "
                         f"sys.path={sys.path}")
    return dsa


def rng(seed):
    return np.random.default_rng(seed)


# ------------------------------------------------------------------------------------------------
# Number formats

def bf16(x):
    """float32 -> nearest bfloat16 (ties to even), as float32 values."""
    b = np.ascontiguousarray(x, dtype=F32).view(np.uint32).astype(np.uint64)
    b = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) << 16
    return b.astype(np.uint32).view(F32)


def bf16_bits(x):
    """float32 -> bfloat16 bit patterns (uint16), nearest even."""
    return (bf16(x).view(np.uint32) >> 16).astype(np.uint16)


def e4m3(y):
    """Values in [-448, 448] -> nearest float8 e4m3fn value (ties to even), as float64: 3
    mantissa bits, the subnormal step 2^-9 below 2^-6."""
    y = np.asarray(y, dtype=F64)
    a = np.abs(y)
    _, e = np.frexp(a)
    quantum = np.ldexp(1.0, np.maximum(e - 1, -6) - 3)
    return np.copysign(np.round(a / quantum) * quantum, y)


def fp8_rows(x, ue8m0):
    """Rows of at most 128 values (one block) -> (e4m3 code values float64, scales float32):
    amax = max(max |x|, 1e-4), scale = amax * f32(1/448) in f32 (ue8m0: up to a power of two),
    codes e4m3(clamp(x / scale)) with the division in f32."""
    x = np.asarray(x, dtype=F32)
    amax = np.maximum(np.max(np.abs(x), axis=-1), F32(1e-4)).astype(F32)
    scale = (amax * F32(1.0 / 448.0)).astype(F32)
    if ue8m0:
        bits = scale.view(np.uint32)
        exponent = ((bits >> 23) & 0xFF).astype(np.int64) - 127 + ((bits & 0x7FFFFF) != 0)
        scale = np.ldexp(F32(1.0), exponent).astype(F32)
    y = np.clip((x / scale[..., None]).astype(F32), -448, 448)
    return e4m3(y), scale


# The released rotate_activation's f32 butterflies, as the released-indexer test transcribes them.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tests"))
from released_indexer_check import hadamard_transform  # noqa: E402


def hadamard_f32(x):
    """The orthonormal Walsh-Hadamard transform along the last axis: radix-2 butterflies in f32
    (strides 1, 2, 4, ...), then one multiply by f32(n^-0.5)."""
    return hadamard_transform(x, np.asarray(x).shape[-1] ** -0.5)


def sylvester(n):
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h / np.sqrt(n)


# ------------------------------------------------------------------------------------------------
# Eq. 1 and Eq. 2

def indexer_scores(q, k, w, precision="f32", hadamard=False, ue8m0=False, raw_weights=False,
                   ratio=1, tokens=None):
    """I[t,s] = k_scale[s] sum_j w'[t,j] ReLU(q'[t,j] . k'[s]) in float64 for q [B?, Lq, H, d],
    k [B?, Lk, d], w [B?, Lq, H]; -inf where s is not visible. Returns (scores, bound): bound[t]
    is the largest sum_j |w'| |q' . k'| k_scale of the row, the scale its rounding errs by."""
    batched = q.ndim == 4
    if not batched:
        q, k, w = q[None], k[None], w[None]
    B, Lq, H, d = q.shape
    Lk = k.shape[1]
    qf, kf = q.astype(F32), k.astype(F32)
    if hadamard:
        qf, kf = hadamard_f32(qf), hadamard_f32(kf)
    q_scale = np.ones((B, Lq, H))
    k_scale = np.ones((B, Lk))
    if precision in ("bf16", "fp8"):
        qf, kf = bf16(qf), bf16(kf)
    qv, kv = qf.astype(F64), kf.astype(F64)
    if precision == "fp8":
        qv, q_scale = fp8_rows(qf, ue8m0)
        kv, k_scale = fp8_rows(kf, ue8m0)
    weights = w.astype(F32)
    if raw_weights:
        weights = bf16((weights * F32(H ** -0.5)).astype(F32))
    head_w = weights.astype(F64) * q_scale
    if raw_weights:
        head_w = head_w * float(F32(d ** -0.5))
    logits = np.einsum("bthd,bsd->btsh", qv, kv)
    terms = head_w[:, :, None, :] * np.maximum(logits, 0.0)
    scores = terms.sum(-1) * k_scale[:, None, :]
    bound = (np.abs(head_w)[:, :, None, :] * np.abs(logits)).sum(-1) * k_scale[:, None, :]
    T = tokens if tokens is not None else (Lk if ratio == 1 else Lq)
    for t in range(Lq):
        visible = min((T - Lq + t + 1) // ratio, Lk)
        scores[:, t, visible:] = NEG_INF
        bound[:, t, visible:] = 0.0
    bound = bound.max(-1)
    return (scores, bound) if batched else (scores[0], bound[0])


def topk_rows(scores, k):
    """TopK per row of [.., Lq, Lk] (masked entries -inf): descending score, equal scores lower
    position first, NaN last, -inf entries padding (-1)."""
    lead, Lk = scores.shape[:-1], scores.shape[-1]
    flat = scores.reshape(-1, Lk)
    idx = np.full((flat.shape[0], k), -1, dtype=np.int32)
    val = np.full((flat.shape[0], k), NEG_INF, dtype=F32)
    for r, row in enumerate(flat):
        visible = np.flatnonzero(row != NEG_INF)
        key = np.where(np.isnan(row[visible]), np.inf, -row[visible])
        order = visible[np.lexsort((visible, key))][:k]
        idx[r, :len(order)] = order
        val[r, :len(order)] = row[order]
    return idx.reshape(lead + (k,)), val.reshape(lead + (k,))


# ------------------------------------------------------------------------------------------------
# Attention

def attention(q, keys, values, selection, scale, sink=None):
    """o[t,h] = sum_{s in S(t)} softmax(scale q[t,h] . keys[h][s]) values[h][s], float64, with the
    natural-log lse; `selection(t)` lists the rows of keys; keys/values [H, N, d] (per query head);
    sink [H] logits add exp(sink) to the denominator."""
    Lq, H, _ = q.shape
    out = np.zeros((Lq, H, values.shape[-1]))
    lse = np.full((Lq, H), NEG_INF)
    for t in range(Lq):
        s = np.asarray(selection(t), dtype=np.int64)
        for h in range(H):
            logits = scale * (keys[h][s] @ q[t, h].astype(F64)) if len(s) else np.zeros(0)
            parts = list(logits) + ([float(sink[h])] if sink is not None else [])
            if not parts:
                continue
            m = max(parts)
            denominator = np.sum(np.exp(np.array(parts) - m))
            lse[t, h] = m + np.log(denominator)
            if len(s):
                p = np.exp(logits - lse[t, h])
                out[t, h] = p @ values[h][s]
    return out, lse


def mqa_heads(kv, heads, d_v):
    kv = kv.astype(F64)
    return np.broadcast_to(kv, (heads,) + kv.shape), np.broadcast_to(kv[:, :d_v], (heads, kv.shape[0], d_v))


def mha_heads(k, v, heads):
    group = heads // k.shape[1]
    keys = np.stack([k[:, h // group].astype(F64) for h in range(heads)])
    values = np.stack([v[:, h // group].astype(F64) for h in range(heads)])
    return keys, values


def deepseek_v32_scale():
    mscale = 0.1 * np.log(40.0) + 1.0
    return 192 ** -0.5 * mscale * mscale


# ------------------------------------------------------------------------------------------------
# Inputs

def indexer_inputs(g, Lq, Lk, H=4, d=16, batch=None):
    lead = () if batch is None else (batch,)
    q = g.standard_normal(lead + (Lq, H, d)).astype(F32)
    k = g.standard_normal(lead + (Lk, d)).astype(F32)
    w = g.standard_normal(lead + (Lq, H)).astype(F32)
    return q, k, w


def write_safetensors(path, tensors):
    """{name: float32 array} as a .safetensors file."""
    header, blobs, offset = {}, [], 0
    for name, array in tensors.items():
        data = np.ascontiguousarray(array, dtype=F32).tobytes()
        header[name] = {"dtype": "F32", "shape": list(array.shape),
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for blob in blobs:
            f.write(blob)
