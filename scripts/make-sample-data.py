#!/usr/bin/env python3
"""Writes data/sample.safetensors: a small DSA workload (seeded) for the README's main job.

Indexer q_I [L, H_I, d_I], k_I [L, d_I], w [L, H_I]; MQA attention q [L, H, d_qk] and latent
kv [L, d_qk] whose first d_v columns are the values. The indexer sees a noisy low-rank view of
the main queries and keys, so its selection is informative without being exact.
Run with Debian's python3 (python3-numpy): /usr/bin/python3 scripts/make-sample-data.py
"""
import json
import struct
import sys

import numpy as np

L, H, D_QK, H_I, D_I = 512, 4, 576, 8, 128
rng = np.random.default_rng(20251001)

kv = rng.standard_normal((L, D_QK)).astype(np.float32)
q = rng.standard_normal((L, H, D_QK)).astype(np.float32)
kv[:4] *= 3.0  # attention sinks: the first tokens get large keys
projection = rng.standard_normal((D_QK, D_I)).astype(np.float32) / np.sqrt(D_QK)
k_index = kv @ projection + 0.1 * rng.standard_normal((L, D_I)).astype(np.float32)
heads = q[:, np.arange(H_I) % H, :] @ projection
q_index = heads + 0.1 * rng.standard_normal((L, H_I, D_I)).astype(np.float32)
weights = np.abs(rng.standard_normal((L, H_I))).astype(np.float32) / np.sqrt(H_I * D_I)


def bf16_bytes(x):
    bits = x.astype(np.float32).view(np.uint32)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16  # round to nearest even
    return rounded.astype("<u2").tobytes()


tensors = [("q_index", "BF16", q_index), ("k_index", "BF16", k_index), ("weights", "F32", weights),
           ("q", "BF16", q), ("kv", "BF16", kv)]
header, blobs, offset = {}, [], 0
for name, dtype, array in tensors:
    blob = bf16_bytes(array) if dtype == "BF16" else array.astype("<f4").tobytes()
    header[name] = {"dtype": dtype, "shape": list(array.shape), "data_offsets": [offset, offset + len(blob)]}
    blobs.append(blob)
    offset += len(blob)
header["__metadata__"] = {"generator": "scripts/make-sample-data.py", "seed": "20251001"}
text = json.dumps(header, separators=(",", ":")).encode()
text += b" " * (-len(text) % 8)
out = sys.argv[1] if len(sys.argv) > 1 else "data/sample.safetensors"
with open(out, "wb") as f:
    f.write(struct.pack("<Q", len(text)) + text + b"".join(blobs))
