#!/usr/bin/env python3
"""Decode speed of duet's CUDA backend against transformers' GlmMoeDsaForCausalLM on the same GPU
and the same checkpoint: a real-width GLM-5.2 slice (hidden 6144, 64 heads, MLA + DSA, experts of
width 2048, 8 routed per token) with random weights, written once in the GLM-5.2 on-disk layout.

    python3 benches/e2e_vs_transformers.py --duet target/release/duet [--layers 4] [--experts 32]

Run on the GPU machine (launch/cuda-env.sh first). Prints ms per decoded token for both and the
ratio; the greedy tokens are compared too (transformers runs bf16, duet f32 activations, so an
early divergence on random weights is expected and reported, not asserted).
"""

import argparse
import json
import os
import subprocess
import time

import torch
from safetensors.torch import save_file

from transformers import GlmMoeDsaConfig, GlmMoeDsaForCausalLM


def config(layers, experts):
    return dict(
        vocab_size=154880, hidden_size=6144, intermediate_size=12288, moe_intermediate_size=2048, num_hidden_layers=layers,
        num_attention_heads=64, num_key_value_heads=64, n_shared_experts=1, n_routed_experts=experts, num_experts_per_tok=8,
        n_group=1, topk_group=1, norm_topk_prob=True, routed_scaling_factor=2.5, q_lora_rank=2048, kv_lora_rank=512,
        qk_nope_head_dim=192, qk_rope_head_dim=64, v_head_dim=256, head_dim=192, rms_norm_eps=1e-5, first_k_dense_replace=1,
        index_topk=2048, index_head_dim=128, index_n_heads=32, max_position_embeddings=202752,
        rope_parameters={"rope_theta": 8000000.0, "rope_type": "default"},
    )


def build(out, layers, experts):
    cfg = config(layers, experts)
    mlp = ["dense"] + ["sparse"] * (layers - 1)
    full = ["full" if max(i - 2, 0) % 4 == 0 else "shared" for i in range(layers)]
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    conf = GlmMoeDsaConfig(**cfg, mlp_layer_types=mlp, indexer_types=full)
    with torch.device("cuda"):
        model = GlmMoeDsaForCausalLM(conf)
    torch.set_default_dtype(torch.float32)
    state = {}
    for name, t in model.state_dict().items():
        if name.endswith("mlp.experts.gate_up_proj"):
            p = name[: -len("gate_up_proj")]
            for e in range(t.shape[0]):
                g, u = t[e].chunk(2, dim=0)
                state[f"{p}{e}.gate_proj.weight"] = g.contiguous()
                state[f"{p}{e}.up_proj.weight"] = u.contiguous()
        elif name.endswith("mlp.experts.down_proj"):
            p = name[: -len("down_proj")]
            for e in range(t.shape[0]):
                state[f"{p}{e}.down_proj.weight"] = t[e].contiguous()
        elif name.endswith("e_score_correction_bias") or name.endswith("mlp.gate.weight"):
            state[name] = t.float()
        else:
            state[name] = t
    os.makedirs(out, exist_ok=True)
    names = sorted(state)
    shards, cur, size = [], [], 0
    for n in names:
        cur.append(n)
        size += state[n].numel() * state[n].element_size()
        if size > 4 << 30:
            shards.append(cur)
            cur, size = [], 0
    if cur:
        shards.append(cur)
    weight_map = {}
    for i, part in enumerate(shards):
        f = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: state[n].cpu() for n in part}, os.path.join(out, f), metadata={"format": "pt"})
        weight_map.update({n: f for n in part})
    with open(os.path.join(out, "model.safetensors.index.json"), "w") as fh:
        json.dump({"metadata": {}, "weight_map": weight_map}, fh)
    with open(os.path.join(out, "config.json"), "w") as fh:
        json.dump({"architectures": ["GlmMoeDsaForCausalLM"], "model_type": "glm_moe_dsa", **cfg, "mlp_layer_types": mlp,
                   "indexer_types": full, "num_nextn_predict_layers": 0, "eos_token_id": [154820], "hidden_act": "silu",
                   "scoring_func": "sigmoid", "topk_method": "noaux_tc"}, fh)
    return model


@torch.no_grad()
def time_transformers(model, prompt, new):
    ids = torch.tensor([prompt], device="cuda")
    kw = dict(do_sample=False, min_new_tokens=new, max_new_tokens=new, eos_token_id=None, pad_token_id=0)
    model.generate(ids, **{**kw, "min_new_tokens": 4, "max_new_tokens": 4})  # warm-up
    torch.cuda.synchronize()
    t0 = time.time()
    model.generate(ids, **{**kw, "min_new_tokens": 1, "max_new_tokens": 1})
    torch.cuda.synchronize()
    t1 = time.time()
    out = model.generate(ids, **kw)
    torch.cuda.synchronize()
    t2 = time.time()
    ms = ((t2 - t1) - (t1 - t0)) / (new - 1) * 1e3
    return ms, out[0, len(prompt):].tolist()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--duet", default="target/release/duet")
    ap.add_argument("--out", default="/tmp/glm52-slice")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--new", type=int, default=32)
    args = ap.parse_args()
    t0 = time.time()
    model = build(args.out, args.layers, args.experts).eval()
    print(f"slice: {args.layers} layers at GLM-5.2 width, {args.experts} experts per MoE layer, written in {time.time() - t0:.0f} s")
    prompt = [int(x) for x in torch.randint(0, 150000, (32,), generator=torch.Generator().manual_seed(1))]
    hf_ms, hf_ids = time_transformers(model, prompt, args.new)
    del model
    torch.cuda.empty_cache()
    r = subprocess.run([args.duet, "generate", "--model", args.out, "--device", "cuda", "--prompt-ids", ",".join(map(str, prompt)),
                        "--max-new-tokens", str(args.new), "--temperature", "0", "--ignore-eos", "--json"],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit("duet failed: " + r.stderr[-2000:])
    j = json.loads(r.stdout.strip().splitlines()[-1])
    duet_ms = 1e3 / j["decode_tok_s"]
    same = next((i for i, (a, b) in enumerate(zip(hf_ids, j["token_ids"])) if a != b), len(hf_ids))
    print(f"transformers (bf16): {hf_ms:.2f} ms/token ({1e3 / hf_ms:.1f} tok/s)")
    print(f"duet (CUDA, f32 activations): {duet_ms:.2f} ms/token ({j['decode_tok_s']:.1f} tok/s), ttft {j['ttft_ms']:.1f} ms")
    print(f"speed-up: {hf_ms / duet_ms:.2f}x; greedy tokens agree for the first {same} of {args.new}")


if __name__ == "__main__":
    main()
