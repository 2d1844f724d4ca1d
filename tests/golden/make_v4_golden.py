"""Golden vectors for DeepSeek-V4's attention from transformers (no weights needed).

Builds a small random-weight DeepseekV4Config with a window-only, a CSA and an HCA layer, runs
one fp32 forward pass, captures each attention layer's input and output and its compressor's
entries, and writes what tests/test_v4_golden.cpp holds the library to:
tests/data/deepseek_v4_golden.safetensors. Run where transformers >= 5.17 and torch are
installed (the H200 machine):  python3 tests/golden/make_v4_golden.py OUT_DIR

transformers computes DeepSeek-V4's unquantized math (no e4m3 / e2m1 caches, no Hadamard), so
the golden file checks the library's f32 numerics; DeepSeek's released code is the reference
for the quantization (docs/DESIGN.md section 6). The script recomputes q and the raw kv of each
layer from the layer's own modules and checks them against what transformers did: its softmax
weights (the eager attention's second output) and, through the output projection, its layer
output. It exits non-zero if either differs.
"""
import math
import os
import sys

import torch
from safetensors.torch import save_file
from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

torch.manual_seed(0)
T, LQ, RD, W = 260, 32, 64, 128  # tokens, query rows kept, RoPE dims, window
KINDS = ["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"]
cfg = DeepseekV4Config(
    vocab_size=256, hidden_size=16, num_hidden_layers=3, num_attention_heads=2, head_dim=128,
    partial_rotary_factor=RD / 128, q_lora_rank=32, o_groups=2, o_lora_rank=16,
    index_n_heads=8, index_head_dim=64, index_topk=8, sliding_window=W, layer_types=KINDS,
    compress_rates={KINDS[1]: 4, KINDS[2]: 128}, mlp_layer_types=["moe"] * 3,
    n_routed_experts=2, num_experts_per_tok=1, moe_intermediate_size=16,
    max_position_embeddings=4096, rope_theta=10000.0, compress_rope_theta=160000.0,
    rope_parameters={"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 65536,
                     "beta_fast": 32, "beta_slow": 1},
    rms_norm_eps=1e-6, attn_implementation="eager")
model = DeepseekV4ForCausalLM(cfg).to(torch.float32).eval()
with torch.no_grad():  # the init zeroes the sinks and the gate biases: randomize them
    for name, p in model.named_parameters():
        if name.endswith(("sinks", "position_bias")):
            p.normal_(0.0, 1.0)
        elif "norm" in name:
            p.copy_(1 + 0.2 * torch.randn_like(p))

captured = {}
for i, layer in enumerate(model.model.layers):
    attn = layer.self_attn

    def pre(module, args, kwargs, i=i):
        captured[i] = {"x": args[0].detach().clone()}

    def post(module, args, kwargs, out, i=i):
        captured[i]["out"], captured[i]["probs"] = out[0].detach().clone(), out[1].detach().clone()

    attn.register_forward_pre_hook(pre, with_kwargs=True)
    attn.register_forward_hook(post, with_kwargs=True)
    if attn.compressor is not None:
        attn.compressor.register_forward_hook(
            lambda m, a, o, i=i: captured[i].update(compressed=o[0].detach().clone()))
        if hasattr(attn.compressor, "indexer"):
            attn.compressor.indexer.register_forward_hook(
                lambda m, a, o, i=i: captured[i].update(topk=o.detach().clone()))
with torch.no_grad():
    model(torch.randint(0, 256, (1, T)), use_cache=False)


def frequencies(kind):
    """DeepSeek's precompute_freqs_cis: f32 1 / theta^(2i / 64), YaRN's blend where compressed."""
    theta = 10000.0 if kind == KINDS[0] else 160000.0
    f = 1.0 / (theta ** (torch.arange(0, RD, 2, dtype=torch.float32) / RD))
    if kind != KINDS[0]:
        def correction(rotations):
            return RD * math.log(65536 / (rotations * 2 * math.pi)) / (2 * math.log(theta))
        low, high = max(math.floor(correction(32)), 0), min(math.ceil(correction(1)), RD - 1)
        ramp = torch.clamp((torch.arange(RD // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
        smooth = 1 - ramp
        f = f / 16.0 * (1 - smooth) + f * smooth
    return torch.polar(torch.ones(T, RD // 2), torch.outer(torch.arange(T, dtype=torch.float32), f))


def rope(x, table, inverse=False):  # interleaved pairs on the last RD dims
    head, tail = x[..., :-RD], x[..., -RD:]
    z = torch.view_as_complex(tail.float().unflatten(-1, (-1, 2)).contiguous())
    table = table.conj() if inverse else table
    z = z * table.view(table.shape[0], *([1] * (z.dim() - 2)), table.shape[-1])
    return torch.cat([head, torch.view_as_real(z).flatten(-2)], -1)


def rmsnorm(x, weight):
    return weight * (x * torch.rsqrt(x.square().mean(-1, keepdim=True) + 1e-6))


out, worst = {}, 0.0
with torch.no_grad():
    for i, kind in enumerate(KINDS):
        attn, cap = model.model.layers[i].self_attn, captured[i]
        x = cap["x"][0]
        table = frequencies(kind)
        qr = rmsnorm(x @ attn.q_a_proj.weight.T, attn.q_a_norm.weight)
        q = (qr @ attn.q_b_proj.weight.T).view(T, cfg.num_attention_heads, cfg.head_dim)
        q = rope(q * torch.rsqrt(q.square().mean(-1, keepdim=True) + 1e-6), table)
        kv = rope(rmsnorm(x @ attn.kv_proj.weight.T, attn.kv_norm.weight), table)
        keys = kv
        if kind != KINDS[0]:
            keys = torch.cat([kv, cap["compressed"].reshape(-1, cfg.head_dim)], 0)
        probs = cap["probs"][0]  # [H, T, T + n]: transformers' softmax weights, sink included
        # Our logits where transformers' weights are not zero; its weights from them and the sink.
        logits = torch.einsum("thd,ud->htu", q, keys) * cfg.head_dim ** -0.5
        allowed = probs > 0
        logits = logits.masked_fill(~allowed, float("-inf"))
        sink = attn.sinks.float().view(-1, 1, 1)
        top = torch.maximum(logits.amax(-1, keepdim=True), sink)
        total = torch.exp(logits - top).sum(-1, keepdim=True) + torch.exp(sink - top)
        mine = torch.exp(logits - top) / total
        err = ((mine - probs).abs().max() / probs.abs().max()).item()
        o = torch.einsum("htu,ud->thd", probs, keys)  # transformers' weights times the values
        # Through the inverse RoPE and the grouped output projection to the layer's output.
        y = rope(o, table, inverse=True).reshape(T, cfg.o_groups, -1)
        y = torch.einsum("tgd,grd->tgr", y, attn.o_a_proj.weight.view(cfg.o_groups, cfg.o_lora_rank, -1))
        y = y.flatten(1) @ attn.o_b_proj.weight.T
        err_out = ((y - cap["out"][0]).norm() / cap["out"][0].norm()).item()
        print(f"layer {i} {kind}: softmax weights {err:.2e}, layer output {err_out:.2e}")
        worst = max(worst, err, err_out)
        lse = (top + torch.log(total)).squeeze(-1).T  # [T, H]
        name = ["swa", "csa", "hca"][i]
        rows = slice(T - LQ, T)
        first = T - LQ - W + 1  # the raw tokens the kept rows' windows reach
        out[f"{name}.q"] = q[rows].contiguous()
        out[f"{name}.kv_tail"] = kv[first:].contiguous()
        out[f"{name}.sink"] = attn.sinks.float().contiguous()
        out[f"{name}.out"] = o[rows].contiguous()
        out[f"{name}.lse"] = lse[rows].contiguous()
        if kind != KINDS[0]:
            c = attn.compressor
            out[f"{name}.x"] = x.contiguous()
            out[f"{name}.compressor.wkv"] = c.kv_proj.weight.float().contiguous()
            out[f"{name}.compressor.wgate"] = c.gate_proj.weight.float().contiguous()
            out[f"{name}.compressor.ape"] = c.position_bias.float().contiguous()
            out[f"{name}.compressor.norm"] = c.kv_norm.weight.float().contiguous()
            out[f"{name}.compressed"] = cap["compressed"].reshape(-1, cfg.head_dim).contiguous()
        if kind == KINDS[1]:
            out["csa.topk"] = cap["topk"][0][rows].to(torch.int32).contiguous()
            # The indexer: its queries from qr, its weights with both of transformers' factors
            # (64^-0.5 on weights_proj, 128^-0.5 on the scores) folded in, and its compressor.
            ix = attn.compressor.indexer
            n_i, d_i = cfg.index_n_heads, cfg.index_head_dim
            q_i = rope((qr @ ix.q_b_proj.weight.T).view(T, n_i, d_i), table)
            w_i = (x @ ix.scorer.weights_proj.weight.T) * (n_i ** -0.5 * d_i ** -0.5)
            out["csa.indexer.q"] = q_i[rows].contiguous()
            out["csa.indexer.weights"] = w_i[rows].contiguous()
            out["csa.indexer.compressor.wkv"] = ix.kv_proj.weight.float().contiguous()
            out["csa.indexer.compressor.wgate"] = ix.gate_proj.weight.float().contiguous()
            out["csa.indexer.compressor.ape"] = ix.position_bias.float().contiguous()
            out["csa.indexer.compressor.norm"] = ix.kv_norm.weight.float().contiguous()
            # Check: these give transformers' selection (as sets; fp32 scores have no ties).
            m = cfg.compress_rates[kind]
            n = T // m
            entries = x @ ix.kv_proj.weight.T, x @ ix.gate_proj.weight.T
            kv_i, gate = (e[: n * m].view(n, m, -1) for e in entries)
            gate = gate + ix.position_bias
            half = d_i
            pooled_kv = torch.zeros(n, 2 * m, half)
            pooled_gate = torch.full((n, 2 * m, half), float("-inf"))
            pooled_kv[:, m:], pooled_gate[:, m:] = kv_i[..., half:], gate[..., half:]
            pooled_kv[1:, :m], pooled_gate[1:, :m] = kv_i[:-1, :, :half], gate[:-1, :, :half]
            k_i = rmsnorm((pooled_kv * pooled_gate.softmax(1)).sum(1), ix.kv_norm.weight)
            k_i = rope(k_i, table[0 : n * m : m])
            scores = (torch.einsum("thd,jd->thj", q_i, k_i).relu() * w_i[..., None]).sum(1)
            visible = torch.arange(n)[None, :] < ((torch.arange(T) + 1) // m)[:, None]
            scores = scores.masked_fill(~visible, float("-inf"))
            picked = scores.topk(min(cfg.index_topk, n), -1).indices
            picked = torch.where(picked >= ((torch.arange(T) + 1) // m)[:, None], -1, picked)
            same = all(set(a.tolist()) == set(b.tolist()) for a, b in zip(picked, cap["topk"][0]))
            # The kept rows must have no tie at the k-th score (a tie would make the set a
            # matter of torch.topk's order): a gap of 1e-3 relative to the row's largest.
            ranked = scores[rows].sort(-1, descending=True).values
            k = cfg.index_topk
            gap = ((ranked[:, k - 1] - ranked[:, k]) / ranked[:, 0].abs()).min().item()
            print(f"indexer: recomputed selection equals transformers' on every row: {same}; "
                  f"smallest gap at the k-th score {gap:.2e}")
            if not same or gap < 1e-3:
                worst = float("inf")
if worst > 1e-5:
    sys.exit(f"the recomputed q / kv do not give transformers' attention ({worst:.2e})")
dest = sys.argv[1] if len(sys.argv) > 1 else "."
os.makedirs(dest, exist_ok=True)
path = os.path.join(dest, "deepseek_v4_golden.safetensors")
save_file(out, path, metadata={"T": str(T), "window": str(W), "source": "transformers " +
                               __import__("transformers").__version__ + ", fp32, seed 0"})
print(path, os.path.getsize(path), "bytes")
