"""PyTorch baselines on the GPU, timed in the same run as dsa-cuda-bench: dense causal attention
through scaled_dot_product_attention (cuDNN), the plain PyTorch DSA pipeline (einsum indexer,
topk, gather, softmax) and the machine's ceilings (bf16 and fp8 GEMM, copy bandwidth).
Prints one JSON line per measurement. Usage: python3 bench/torch_baselines.py [L ...]
[--no-ceilings] [--dense-only] (--dense-only: cuDNN dense attention alone, for a sweep of L)"""
import json
import sys

import torch
import torch.nn.functional as F


def timed(fn, reps=5, warmup=2):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(stop))
    return sorted(times)[len(times) // 2]


def emit(name, L, ms, flops=0.0):
    print(json.dumps({"bench": name, "L": L, "ms": round(ms, 3), "tflops": round(flops / ms / 1e9, 1)}), flush=True)


def ceilings():
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    emit("ceiling_bf16_gemm", n, timed(lambda: a @ b), 2.0 * n**3)
    a8, b8 = a.to(torch.float8_e4m3fn), b.t().contiguous().to(torch.float8_e4m3fn).t()
    one = torch.tensor(1.0, device="cuda")
    emit("ceiling_fp8_gemm", n, timed(lambda: torch._scaled_mm(a8, b8, one, one, out_dtype=torch.bfloat16)), 2.0 * n**3)
    x = torch.empty(1 << 30, device="cuda", dtype=torch.uint8)
    y = torch.empty_like(x)
    ms = timed(lambda: y.copy_(x))
    print(json.dumps({"bench": "ceiling_copy", "ms": round(ms, 3), "tb_s": round(2 * x.numel() / ms / 1e9, 2)}), flush=True)


def dense(L):
    H = 128
    q = torch.randn(1, H, L, 192, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, H, L, 192, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(1, H, L, 128, device="cuda", dtype=torch.bfloat16)
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        ms = timed(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), reps=3, warmup=1)
    emit("torch_dense_cudnn", L, ms, 2.0 * H * (192 + 128) * L * (L + 1) / 2)


def plain_dsa(L, topk=2048):
    # Query blocks small enough that the [block, H_I, L] f32 logits stay near 4 GiB.
    block = max(16, min(1024, (4 << 30) // (64 * L * 4)))
    HI, DI, H, DQK, DV = 64, 128, 128, 576, 512
    qi = torch.randn(L, HI, DI, device="cuda", dtype=torch.bfloat16)
    ki = torch.randn(L, DI, device="cuda", dtype=torch.bfloat16)
    w = torch.rand(L, HI, device="cuda", dtype=torch.float32)
    q = torch.randn(L, H, DQK, device="cuda", dtype=torch.bfloat16) * 0.1
    kv = torch.randn(L, DQK, device="cuda", dtype=torch.bfloat16)
    pos = torch.arange(L, device="cuda")

    def run():
        for t0 in range(0, L, block):
            t1 = min(L, t0 + block)
            logits = torch.einsum("thd,sd->ths", qi[t0:t1], ki[: t1]).float().relu_()
            scores = torch.einsum("th,ths->ts", w[t0:t1], logits)
            scores.masked_fill_(pos[None, : t1] > pos[t0:t1, None], float("-inf"))
            idx = scores.topk(min(topk, t1), dim=-1).indices
            keys = kv[idx]                                   # [b, k, DQK]
            att = torch.einsum("thd,tkd->thk", q[t0:t1], keys).float() * DQK**-0.5
            valid = torch.gather(scores, 1, idx) > float("-inf")
            att.masked_fill_(~valid[:, None, :], float("-inf"))
            torch.einsum("thk,tkd->thd", att.softmax(-1).to(torch.bfloat16), keys[..., :DV])

    emit("torch_plain_dsa", L, timed(run, reps=1, warmup=1))


if __name__ == "__main__":
    lengths = [int(x) for x in sys.argv[1:] if x.isdigit()] or [32768, 131072]
    if "--no-ceilings" not in sys.argv:
        ceilings()
    for L in lengths:
        dense(L)
        torch.cuda.empty_cache()
        if "--dense-only" not in sys.argv:
            plain_dsa(L)
            torch.cuda.empty_cache()
