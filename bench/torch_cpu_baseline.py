"""The plain PyTorch peer on the CPU, same sizes as dsa-cpu-bench: the DSA pipeline (einsum
indexer, ReLU, weighted sum over heads, causal mask, topk, gather, softmax attention) and dense
causal attention (two GEMMs and a softmax per block: torch 1.13 has no
scaled_dot_product_attention), both in blocks of queries so that memory stays bounded, plus
torch's own f32 GEMM rate. With --ours FILE (dsa-cpu-bench --json FILE, same L and threads) prints both side by
side. Usage: /usr/bin/python3 bench/torch_cpu_baseline.py --L 8192 --threads 1,2 [--ours F]
Needs Debian's python3-torch (scripts/install-deps.sh --bench)."""
import argparse
import json
import time

import torch

HI, DI, DQK, DV = 64, 128, 576, 512


def timed(fn, repeats):
    """Medians of wall and CPU seconds (every thread of the process)."""
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return sorted(wall)[len(wall) // 2], sorted(cpu)[len(cpu) // 2]


def plain_dsa(qi, ki, w, q, kv, topk, scale, block):
    """Eq. 1, Eq. 2, then MQA attention over the selection, one block of queries at a time."""
    L, H = q.shape[0], q.shape[1]
    out = torch.empty(L, H, DV)
    for t0 in range(0, L, block):
        t1 = min(L, t0 + block)
        pos = torch.arange(t0, t1)
        logits = torch.einsum("bhd,sd->bhs", qi[t0:t1], ki[:t1])  # [B, H_I, t1]
        scores = (logits.relu_() * w[t0:t1, :, None]).sum(1)
        visible = torch.arange(t1)[None, :] <= pos[:, None]
        scores.masked_fill_(~visible, float("-inf"))
        idx = scores.topk(min(topk, t1), dim=1).indices  # [B, k]
        valid = idx <= pos[:, None]
        sel = kv.index_select(0, idx.flatten()).view(*idx.shape, DQK)  # [B, k, d_qk]
        att = torch.einsum("bhd,bkd->bhk", q[t0:t1], sel) * scale
        att.masked_fill_(~valid[:, None, :], float("-inf"))
        out[t0:t1] = torch.einsum("bhk,bkd->bhd", att.softmax(-1), sel[..., :DV])
    return out


def dense(q, kv, scale, block):
    """Causal MQA attention, the math of scaled_dot_product_attention (torch 1.13 has none):
    the heads of a block of queries share the keys, so each block is two plain GEMMs."""
    L, H = q.shape[0], q.shape[1]
    out = torch.empty(L, H, DV)
    for t0 in range(0, L, block):
        t1 = min(L, t0 + block)
        mask = torch.arange(t1)[None, :] <= torch.arange(t0, t1)[:, None]  # [B, t1]
        att = (q[t0:t1].reshape(-1, DQK) @ kv[:t1].T).view(t1 - t0, H, t1) * scale
        att.masked_fill_(~mask[:, None, :], float("-inf"))
        out[t0:t1] = (att.softmax(-1).view(-1, t1) @ kv[:t1, :DV]).view(t1 - t0, H, DV)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--L", type=int, default=8192)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--topk", type=int, default=2048)
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--no-dense", action="store_true")
    parser.add_argument("--ours", help="dsa-cpu-bench --json output to compare with")
    parser.add_argument("--json", help="write the measurements here")
    args = parser.parse_args()
    L, H, k = args.L, args.heads, args.topk
    gen = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.rand(*shape, generator=gen) * 2 - 1

    qi, ki, w = rand(L, HI, DI), rand(L, DI), rand(L, HI)
    q, kv = rand(L, H, DQK), rand(L, DQK)
    scale = DQK**-0.5
    # Blocks whose largest temporaries (logits, gathered rows) stay under 24 MiB: glibc keeps
    # those in its heap (bench/run-cpu-bench.sh raises its thresholds to 32 MiB) instead of
    # mapping fresh pages for every block, which costs more than the arithmetic in this VM.
    budget = 24 << 20
    index_block = max(1, min(256, budget // (HI * L * 4), budget // (min(k, L) * DQK * 4)))
    dense_block = max(1, min(256, budget // (H * L * 4)))
    pairs = L * (L + 1) / 2
    selected = sum(min(t + 1, k) for t in range(L))
    dsa_flops = 2.0 * HI * DI * pairs + 2.0 * H * (DQK + DV) * selected
    dense_flops = 2.0 * H * (DQK + DV) * pairs

    results = []
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        n = 2048
        a, b = rand(n, n), rand(n, n)
        gemm, gemm_cpu = timed(lambda: a @ b, 5)
        results.append({"kernel": "torch f32 matmul 2048^3", "threads": threads, "seconds": gemm,
                        "cpu_seconds": gemm_cpu, "gflops": 2.0 * n**3 / gemm / 1e9})
        with torch.no_grad():
            s, c = timed(lambda: plain_dsa(qi, ki, w, q, kv, k, scale, index_block), args.repeats)
            results.append({"kernel": "torch plain DSA pipeline", "threads": threads, "seconds": s,
                            "cpu_seconds": c, "gflops": dsa_flops / s / 1e9})
            if not args.no_dense:
                s, c = timed(lambda: dense(q, kv, scale, dense_block), args.repeats)
                results.append({"kernel": "torch dense attention", "threads": threads,
                                "seconds": s, "cpu_seconds": c, "gflops": dense_flops / s / 1e9})
        for r in results[-3:]:
            if r["threads"] == threads:
                print(json.dumps(r), flush=True)

    print(f"\ntorch {torch.__version__}, L = {L}, H = {H}, k = {k}; median of {args.repeats}")
    print(f"{'kernel':<44} {'thr':>3} {'seconds':>10} {'CPU-s':>10} {'GFLOP/s':>9}")
    for r in results:
        print(f"{r['kernel']:<44} {r['threads']:>3} {r['seconds']:>10.3f} "
              f"{r['cpu_seconds']:>10.3f} {r['gflops']:>9.1f}")
    if args.ours:
        with open(args.ours) as f:
            ours = json.load(f)
        if ours["L"] != L or ours["heads"] != H or ours["topk"] != k:
            raise SystemExit(f"{args.ours} measured other sizes: {ours['L']}, {ours['heads']}")
        print("\nside by side: speed-up of dsa over torch, same L and threads, in wall time and in "
              "CPU time")
        for r in results:
            if r["kernel"] == "torch f32 matmul 2048^3":
                continue
            mine = "DSA pipeline (select + sparse attention)" if "DSA" in r["kernel"] \
                else "dense attention"
            for o in ours["results"]:
                if o["kernel"] == mine and o["threads"] == r["threads"]:
                    print(f"{mine:<44} {r['threads']:>3} dsa {o['seconds']:.3f} s, "
                          f"torch {r['seconds']:.3f} s: {r['seconds'] / o['seconds']:.2f}x; "
                          f"CPU {o['cpu_seconds']:.3f} / {r['cpu_seconds']:.3f} s: "
                          f"{r['cpu_seconds'] / o['cpu_seconds']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"L": L, "heads": H, "topk": k, "torch": torch.__version__,
                       "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
