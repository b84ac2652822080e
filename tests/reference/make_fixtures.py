#!/usr/bin/env python3
"""Reference fixtures for duet's CPU backend, computed with transformers' GlmMoeDsaForCausalLM.

For each on-disk layout (bf16, fp8, int4-fp8mtp) this script
  1. draws a small random GLM-5.2-layout model (IndexShare, n_group > 1, an MTP layer),
  2. writes it as a sharded safetensors checkpoint in that layout (FP8 e4m3 with 128x128 block
     scales; compressed-tensors pack-quantized INT4/INT8 with an FP8 MTP layer grafted on),
  3. loads the *dequantized* weights into transformers' model in float32 with eager attention and
     records teacher-forced logits, greedy tokens with the KV cache, and MTP logits (transformers
     has no MTP, so that head is assembled here from its decoder layer),
  4. checks every top-k boundary it crossed (DSA indexer, router groups, router experts, greedy
     picks) and redraws the model until no decision is a near-tie, so the fixture tests
     correctness rather than tie-breaking.

Run it where torch and transformers >= 5.13 are installed (the GPU machine has them):
    python3 tests/reference/make_fixtures.py --out tests/fixtures
It runs on the CPU in float32 and takes a minute.
"""

import argparse
import importlib.util
import json
import math
import os
import sys

import torch
from safetensors.torch import save_file

import transformers
from transformers import GlmMoeDsaConfig, GlmMoeDsaForCausalLM
from transformers.models.glm_moe_dsa import modeling_glm_moe_dsa as glm

# ----------------------------------------------------------------------------------------------
# Model shape: small, but with every feature the real GLM-5.2 has.

HIDDEN = 192  # > 128 so FP8 128x128 blocks come in full and partial
LAYERS = 5  # layer 0 dense, 1..4 MoE; the MTP layer is layer 5
DIMS = dict(
    vocab_size=256,
    hidden_size=HIDDEN,
    intermediate_size=384,
    moe_intermediate_size=64,
    num_hidden_layers=LAYERS,
    num_attention_heads=4,
    num_key_value_heads=4,
    n_shared_experts=1,
    n_routed_experts=8,
    num_experts_per_tok=3,
    n_group=4,
    topk_group=2,
    norm_topk_prob=True,
    routed_scaling_factor=2.5,
    q_lora_rank=96,
    kv_lora_rank=64,
    qk_nope_head_dim=32,
    qk_rope_head_dim=16,
    v_head_dim=32,
    head_dim=32,
    rms_norm_eps=1e-5,
    first_k_dense_replace=1,
    index_topk=8,
    index_head_dim=32,
    index_n_heads=16,
    max_position_embeddings=4096,
)
# IndexShare as GLM-5.2 derives it (freq/offset), here with freq 2 and offset 2.
INDEX_FREQ, INDEX_OFFSET = 2, 2
INDEXER_TYPES = ["full" if max(i - INDEX_OFFSET + 1, 0) % INDEX_FREQ == 0 else "shared" for i in range(LAYERS)]
MLP_TYPES = ["dense" if i < DIMS["first_k_dense_replace"] else "sparse" for i in range(LAYERS)]
ROPE = {"rope_theta": 8000000.0, "rope_type": "default"}

EVAL_TOKENS = 40  # teacher-forced sequence, much longer than index_topk
PROMPT_TOKENS = 12
GEN_TOKENS = 32  # greedy steps with the cache, well past index_topk
MIN_TOPK_GAP = 1e-4
MIN_GREEDY_LEAD = 1e-3
FP8_BLOCK = (128, 128)


# ----------------------------------------------------------------------------------------------
# Storage formats

def fp8_block_quant(w):
    """e4m3 weight with one f32 scale per 128x128 block (ceil-div grid): (q, scale, dequantized)."""
    rows, cols = w.shape
    br, bc = FP8_BLOCK
    sr, sc = math.ceil(rows / br), math.ceil(cols / bc)
    scale = torch.empty(sr, sc, dtype=torch.float32)
    for i in range(sr):
        for j in range(sc):
            amax = w[i * br:(i + 1) * br, j * bc:(j + 1) * bc].abs().max()
            scale[i, j] = amax / 448.0 if amax > 0 else 1.0
    full = scale.repeat_interleave(br, 0)[:rows].repeat_interleave(bc, 1)[:, :cols]
    q = (w / full).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
    return q, scale, q.float() * full


def pack_rows(values, bits):
    """Offset-binary pack of signed ints along the last dim, element c at bit c*bits (own code)."""
    rows, cols = values.shape
    per = 32 // bits
    words = math.ceil(cols * bits / 32)
    u = (values.to(torch.int64) + (1 << (bits - 1))) & ((1 << bits) - 1)
    u = torch.nn.functional.pad(u, (0, words * per - cols))
    u = u.view(rows, words, per)
    shifts = torch.arange(per, dtype=torch.int64) * bits
    packed = (u << shifts).sum(-1)
    packed = torch.where(packed >= 2**31, packed - 2**32, packed)
    return packed.to(torch.int32)


CT_HELPERS = None  # compressed-tensors' own pack_to_int32, when available


def pack_to_int32(values, bits, packed_dim=1):
    mine = pack_rows(values if packed_dim == 1 else values.t(), bits)
    mine = mine if packed_dim == 1 else mine.t().contiguous()
    if CT_HELPERS is not None:
        theirs = CT_HELPERS.pack_to_int32(values.to(torch.int8), bits, packed_dim=packed_dim)
        assert torch.equal(mine, theirs), "packing disagrees with compressed-tensors"
    return mine


def int_group_quant(w, bits, group, symmetric):
    """compressed-tensors pack-quantized: returns tensors to store and the exact f32 dequantization."""
    rows, cols = w.shape
    assert cols % group == 0
    qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    g = w.view(rows, cols // group, group)
    lo = g.amin(-1).clamp(max=0)
    hi = g.amax(-1).clamp(min=0)
    if symmetric:
        scale = torch.maximum(lo.abs(), hi) / ((qmax - qmin) / 2)
    else:
        scale = (hi - lo) / (qmax - qmin)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale)).to(torch.bfloat16)
    s = scale.float()
    if symmetric:
        zp = torch.zeros_like(s, dtype=torch.int32)
    else:
        zp = torch.round(qmin - lo / s).clamp(qmin, qmax).to(torch.int32)
    q = torch.round(g / s[..., None] + zp[..., None]).clamp(qmin, qmax).to(torch.int32)
    deq = ((q - zp[..., None]).float() * s[..., None]).view(rows, cols)
    out = {
        "weight_packed": pack_to_int32(q.view(rows, cols), bits),
        "weight_scale": scale,
        "weight_shape": torch.tensor([rows, cols], dtype=torch.int64),
    }
    if not symmetric:
        out["weight_zero_point"] = pack_to_int32(zp, bits, packed_dim=0)
    return out, deq


# ----------------------------------------------------------------------------------------------
# Layouts: which precision each linear module is stored in.

def is_mtp(module):
    return module.startswith(f"model.layers.{LAYERS}.")


def store_kind(variant, module):
    plain = module in ("lm_head", "model.embed_tokens") or module.endswith("mlp.gate") or module.endswith("indexer.weights_proj")
    if plain:
        return ("f32",) if (variant == "bf16" and module.endswith("mlp.gate")) else ("bf16",)
    if variant == "bf16":
        return ("bf16",)
    if variant == "fp8":
        return ("fp8",)
    # int4-fp8mtp
    if is_mtp(module):
        return ("fp8",)
    if ".mlp.experts." in module:
        return ("int", 4, 32, False)
    if ".shared_experts." in module:
        return ("int", 4, 64, True)
    if ".self_attn." in module and ".indexer." not in module:
        return ("int", 8, 32, True)
    return ("bf16",)


def quant_configs(variant):
    fp8 = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": list(FP8_BLOCK),
        "modules_to_not_convert": ["lm_head", "model.embed_tokens", "mlp.gate", "indexer.weights_proj"],
    }
    if variant == "bf16":
        return {}
    if variant == "fp8":
        return {"quantization_config": fp8}

    def group(bits, size, sym, targets):
        return {
            "targets": targets,
            "weights": {"num_bits": bits, "type": "int", "strategy": "group", "group_size": size, "symmetric": sym,
                        "dynamic": False, "actorder": None, "observer": "minmax"},
            "input_activations": None,
            "output_activations": None,
            "format": "pack-quantized",
        }

    return {
        "quantization_config": {
            "quant_method": "compressed-tensors",
            "format": "pack-quantized",
            "quantization_status": "compressed",
            "config_groups": {
                "group_0": group(4, 32, False, ["re:.*mlp\\.experts\\.[0-9]+\\.(gate|up|down)_proj$"]),
                "group_1": group(4, 64, True, ["re:.*mlp\\.shared_experts\\.(gate|up|down)_proj$"]),
                "group_2": group(8, 32, True, ["re:.*self_attn\\.(q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)$"]),
            },
            "ignore": ["lm_head", "model.embed_tokens", "re:.*mlp\\.gate$", "re:.*indexer\\..*",
                       "re:model\\.layers\\.0\\.mlp\\..*", f"re:model\\.layers\\.{LAYERS}\\..*"],
            "kv_cache_scheme": None,
        },
        "mtp_quantization_config": {**fp8, "modules_to_not_convert": ["mlp.gate", "indexer.weights_proj"]},
    }


# ----------------------------------------------------------------------------------------------
# Random model

def layer_params(layer, moe, full_indexer):
    """(name, shape, init) of one decoder layer, in a fixed order."""
    p = f"model.layers.{layer}"
    d = DIMS
    h, nh = d["hidden_size"], d["num_attention_heads"]
    out = [
        (f"{p}.input_layernorm.weight", (h,), "norm"),
        (f"{p}.post_attention_layernorm.weight", (h,), "norm"),
        (f"{p}.self_attn.q_a_proj.weight", (d["q_lora_rank"], h), "linear"),
        (f"{p}.self_attn.q_a_layernorm.weight", (d["q_lora_rank"],), "norm"),
        (f"{p}.self_attn.q_b_proj.weight", (nh * (d["qk_nope_head_dim"] + d["qk_rope_head_dim"]), d["q_lora_rank"]), "linear"),
        (f"{p}.self_attn.kv_a_proj_with_mqa.weight", (d["kv_lora_rank"] + d["qk_rope_head_dim"], h), "linear"),
        (f"{p}.self_attn.kv_a_layernorm.weight", (d["kv_lora_rank"],), "norm"),
        (f"{p}.self_attn.kv_b_proj.weight", (nh * (d["qk_nope_head_dim"] + d["v_head_dim"]), d["kv_lora_rank"]), "linear"),
        (f"{p}.self_attn.o_proj.weight", (h, nh * d["v_head_dim"]), "linear"),
    ]
    if full_indexer:
        ip = f"{p}.self_attn.indexer"
        ih, idim = d["index_n_heads"], d["index_head_dim"]
        out += [
            (f"{ip}.wq_b.weight", (ih * idim, d["q_lora_rank"]), "linear"),
            (f"{ip}.wk.weight", (idim, h), "linear"),
            (f"{ip}.k_norm.weight", (idim,), "norm"),
            (f"{ip}.k_norm.bias", (idim,), "small"),
            (f"{ip}.weights_proj.weight", (ih, h), "linear"),
        ]

    def mlp(prefix, inter):
        return [
            (f"{prefix}.gate_proj.weight", (inter, h), "linear"),
            (f"{prefix}.up_proj.weight", (inter, h), "linear"),
            (f"{prefix}.down_proj.weight", (h, inter), "linear"),
        ]

    if moe:
        out += [(f"{p}.mlp.gate.weight", (d["n_routed_experts"], h), "linear"),
                (f"{p}.mlp.gate.e_score_correction_bias", (d["n_routed_experts"],), "bias")]
        for e in range(d["n_routed_experts"]):
            out += mlp(f"{p}.mlp.experts.{e}", d["moe_intermediate_size"])
        out += mlp(f"{p}.mlp.shared_experts", d["moe_intermediate_size"] * d["n_shared_experts"])
    else:
        out += mlp(f"{p}.mlp", d["intermediate_size"])
    return out


def all_params():
    h, v = DIMS["hidden_size"], DIMS["vocab_size"]
    out = [("model.embed_tokens.weight", (v, h), "linear")]
    for i in range(LAYERS):
        out += layer_params(i, MLP_TYPES[i] == "sparse", INDEXER_TYPES[i] == "full")
    m = LAYERS
    out += layer_params(m, True, True)
    out += [(f"model.layers.{m}.enorm.weight", (h,), "norm"),
            (f"model.layers.{m}.hnorm.weight", (h,), "norm"),
            (f"model.layers.{m}.eh_proj.weight", (h, 2 * h), "linear"),
            (f"model.layers.{m}.shared_head.norm.weight", (h,), "norm"),
            ("model.norm.weight", (h,), "norm"),
            ("lm_head.weight", (v, h), "linear")]
    return out


def draw_model(variant, seed):
    """Returns (tensors to store, f32 reference weights) for one random model."""
    gen = torch.Generator().manual_seed(seed)
    disk, ref = {}, {}
    for name, shape, init in all_params():
        x = torch.randn(shape, generator=gen, dtype=torch.float32)
        if init == "linear":
            x = x / math.sqrt(shape[1])
        elif init == "norm":
            x = 1.0 + 0.1 * x
        else:
            x = 0.1 * x
        if init != "linear":
            if name.endswith("e_score_correction_bias"):
                disk[name], ref[name] = x, x
            else:
                disk[name] = x.to(torch.bfloat16)
                ref[name] = disk[name].float()
            continue
        module = name[: -len(".weight")]
        kind = store_kind(variant, module)
        if kind[0] == "bf16":
            disk[name] = x.to(torch.bfloat16)
            ref[name] = disk[name].float()
        elif kind[0] == "f32":
            disk[name], ref[name] = x, x
        elif kind[0] == "fp8":
            q, scale, deq = fp8_block_quant(x)
            disk[name], disk[f"{module}.weight_scale_inv"] = q, scale
            ref[name] = deq
        else:
            _, bits, group, sym = kind
            stored, deq = int_group_quant(x, bits, group, sym)
            for k, t in stored.items():
                disk[f"{module}.{k}"] = t
            ref[name] = deq
    return disk, ref


def disk_config(variant):
    cfg = {"architectures": ["GlmMoeDsaForCausalLM"], "model_type": "glm_moe_dsa", **DIMS,
           "mlp_layer_types": MLP_TYPES, "index_topk_freq": INDEX_FREQ, "index_skip_topk_offset": INDEX_OFFSET,
           "indexer_types": INDEXER_TYPES, "index_share_for_mtp_iteration": True, "rope_parameters": ROPE,
           "rope_interleave": True, "indexer_rope_interleave": True, "num_nextn_predict_layers": 1,
           "moe_layer_freq": 1, "moe_router_dtype": "float32", "scoring_func": "sigmoid", "topk_method": "noaux_tc",
           "hidden_act": "silu", "attention_bias": False, "tie_word_embeddings": False,
           "eos_token_id": [250, 251], "pad_token_id": 250, "dtype": "bfloat16",
           "transformers_version": transformers.__version__}
    cfg.update(quant_configs(variant))
    return cfg


def write_checkpoint(out_dir, variant, disk):
    os.makedirs(out_dir, exist_ok=True)
    names = list(disk.keys())
    shards = [names[: len(names) // 2], names[len(names) // 2:]]
    weight_map = {}
    total = 0
    for i, part in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: disk[n].contiguous() for n in part}, os.path.join(out_dir, fname), metadata={"format": "pt"})
        for n in part:
            weight_map[n] = fname
            total += disk[n].numel() * disk[n].element_size()
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(disk_config(variant), f, indent=2)
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": [250, 251], "pad_token_id": 250, "do_sample": False}, f, indent=2)


# ----------------------------------------------------------------------------------------------
# Reference model and the decisions it crosses

class Gaps:
    def __init__(self):
        self.indexer = math.inf
        self.router = math.inf
        self.greedy = math.inf

    def ok(self):
        return self.indexer >= MIN_TOPK_GAP and self.router >= MIN_TOPK_GAP and self.greedy >= MIN_GREEDY_LEAD


GAPS = Gaps()


def boundary_gap(values, k):
    """Smallest gap between the k-th and (k+1)-th largest finite value of each row."""
    rows = values.reshape(-1, values.shape[-1]).double()
    if rows.shape[-1] <= k:
        return math.inf
    top = rows.topk(k + 1, dim=-1).values
    valid = top[:, k] > -1e30  # the (k+1)-th is a real candidate, not a masked slot
    if not valid.any():
        return math.inf
    return float((top[valid, k - 1] - top[valid, k]).min())


def install_recorders():
    orig_indexer = glm.GlmMoeDsaIndexer.forward

    def indexer_forward(self, *args, **kwargs):
        orig_topk = torch.Tensor.topk

        def topk(t, k, *a, **kw):
            GAPS.indexer = min(GAPS.indexer, boundary_gap(t, k))
            return orig_topk(t, k, *a, **kw)

        torch.Tensor.topk = topk
        try:
            return orig_indexer(self, *args, **kwargs)
        finally:
            torch.Tensor.topk = orig_topk

    glm.GlmMoeDsaIndexer.forward = indexer_forward

    orig_router = glm.GlmMoeDsaTopkRouter.forward

    def router_forward(self, hidden_states):
        x = hidden_states.reshape(-1, self.hidden_dim).float()
        s = torch.sigmoid(x @ self.weight.float().t()) + self.e_score_correction_bias
        if self.num_group > 1:
            g = s.view(-1, self.num_group, self.num_experts // self.num_group).topk(2, dim=-1).values.sum(-1)
            GAPS.router = min(GAPS.router, boundary_gap(g, self.topk_group))
            keep = g.topk(self.topk_group, dim=-1).indices
            mask = torch.zeros_like(g, dtype=torch.bool).scatter(1, keep, True)
            mask = mask.repeat_interleave(self.num_experts // self.num_group, dim=1)
            s = s.masked_fill(~mask, float("-inf"))
        GAPS.router = min(GAPS.router, boundary_gap(s, self.top_k))
        return orig_router(self, hidden_states)

    glm.GlmMoeDsaTopkRouter.forward = router_forward


def reference_model(ref):
    cfg = GlmMoeDsaConfig(**{k: v for k, v in DIMS.items()}, mlp_layer_types=MLP_TYPES, indexer_types=INDEXER_TYPES,
                          rope_parameters=dict(ROPE), tie_word_embeddings=False)
    cfg._attn_implementation = "eager"
    cfg._experts_implementation = "eager"
    model = GlmMoeDsaForCausalLM(cfg).float().eval()
    sd = {}
    e, n = DIMS["n_routed_experts"], LAYERS
    for name, t in ref.items():
        if name.startswith(f"model.layers.{n}.") or ".mlp.experts." in name:
            continue
        sd[name] = t
    for layer in range(n):
        if MLP_TYPES[layer] != "sparse":
            continue
        p = f"model.layers.{layer}.mlp.experts"
        sd[f"{p}.gate_up_proj"] = torch.stack(
            [torch.cat([ref[f"{p}.{i}.gate_proj.weight"], ref[f"{p}.{i}.up_proj.weight"]]) for i in range(e)])
        sd[f"{p}.down_proj"] = torch.stack([ref[f"{p}.{i}.down_proj.weight"] for i in range(e)])
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected, unexpected
    assert not [m for m in missing if "rotary" not in m], missing
    return model, cfg


class MtpHead(torch.nn.Module):
    """DeepSeek-V3-style NextN head from transformers' own GLM-MoE-DSA decoder layer."""

    def __init__(self, base_cfg, ref):
        super().__init__()
        n, h = LAYERS, DIMS["hidden_size"]
        cfg = GlmMoeDsaConfig(**{**DIMS, "num_hidden_layers": n + 1}, mlp_layer_types=MLP_TYPES + ["sparse"],
                              indexer_types=INDEXER_TYPES + ["full"], rope_parameters=dict(ROPE))
        cfg._attn_implementation = "eager"
        cfg._experts_implementation = "eager"
        self.layer = glm.GlmMoeDsaDecoderLayer(cfg, n).float()
        self.enorm = glm.GlmMoeDsaRMSNorm(h, eps=DIMS["rms_norm_eps"])
        self.hnorm = glm.GlmMoeDsaRMSNorm(h, eps=DIMS["rms_norm_eps"])
        self.eh_proj = torch.nn.Linear(2 * h, h, bias=False)
        self.head_norm = glm.GlmMoeDsaRMSNorm(h, eps=DIMS["rms_norm_eps"])
        p = f"model.layers.{n}."
        sd = {}
        e = DIMS["n_routed_experts"]
        for name, t in ref.items():
            if not name.startswith(p):
                continue
            rest = name[len(p):]
            if rest.startswith("mlp.experts."):
                continue
            if rest.startswith(("enorm.", "hnorm.", "eh_proj.")):
                sd[rest] = t
            elif rest.startswith("shared_head.norm."):
                sd["head_norm." + rest[len("shared_head.norm."):]] = t
            else:
                sd["layer." + rest] = t
        sd["layer.mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([ref[f"{p}mlp.experts.{i}.gate_proj.weight"], ref[f"{p}mlp.experts.{i}.up_proj.weight"]]) for i in range(e)])
        sd["layer.mlp.experts.down_proj"] = torch.stack([ref[f"{p}mlp.experts.{i}.down_proj.weight"] for i in range(e)])
        missing, unexpected = self.load_state_dict(sd, strict=False)
        assert not unexpected and not missing, (missing, unexpected)
        self.float().eval()

    def forward(self, model, hidden, next_ids):
        """hidden: main-model final hidden states (after model.norm) [1, S, H]; next_ids [1, S]."""
        s = hidden.shape[1]
        emb = model.model.embed_tokens(next_ids)
        u = self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(hidden)], dim=-1))
        pos = torch.arange(s).unsqueeze(0)
        pe = model.model.rotary_emb(u, position_ids=pos)
        mask = torch.full((s, s), torch.finfo(torch.float32).min).triu(1)[None, None]
        g, _ = self.layer(u, attention_mask=mask, position_ids=pos, position_embeddings=pe, past_key_values=None, use_cache=False)
        return model.lm_head(self.head_norm(g))


@torch.no_grad()
def run_reference(ref, eval_ids, prompt_ids):
    model, cfg = reference_model(ref)
    mtp = MtpHead(cfg, ref)
    ids = torch.tensor([eval_ids])
    out = model.model(input_ids=ids)
    hidden = out.last_hidden_state
    logits = model.lm_head(hidden)[0]
    mtp_logits = mtp(model, hidden[:, :-1], ids[:, 1:])[0]

    cache = transformers.DynamicCache(config=cfg)
    cur = torch.tensor([prompt_ids])
    greedy = []
    for _ in range(GEN_TOKENS):
        o = model(input_ids=cur, past_key_values=cache, use_cache=True)
        last = o.logits[0, -1]
        top2 = last.double().topk(2).values
        GAPS.greedy = min(GAPS.greedy, float(top2[0] - top2[1]))
        tok = int(last.argmax())
        greedy.append(tok)
        cur = torch.tensor([[tok]])
    for row in list(logits) + list(mtp_logits):
        top2 = row.double().topk(2).values
        GAPS.greedy = min(GAPS.greedy, float(top2[0] - top2[1]))
    return logits, mtp_logits, greedy


def main():
    global CT_HELPERS, GAPS
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="tests/fixtures")
    ap.add_argument("--variants", default="bf16,fp8,int4-fp8mtp")
    ap.add_argument("--seed", type=int, default=1000)
    ap.add_argument("--ct-helpers", help="path to compressed_tensors/compressors/pack_quantized/helpers.py, "
                                         "to check our packing against the library's")
    args = ap.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    if args.ct_helpers:
        spec = importlib.util.spec_from_file_location("ct_helpers", args.ct_helpers)
        CT_HELPERS = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(CT_HELPERS)
    else:
        try:
            from compressed_tensors.compressors.pack_quantized import helpers as CT_HELPERS  # noqa: N812
        except ImportError:
            print("compressed-tensors not installed: packing checked only by its documented layout", file=sys.stderr)
    install_recorders()
    print(f"transformers {transformers.__version__}, torch {torch.__version__}")
    for vi, variant in enumerate(args.variants.split(",")):
        for attempt in range(200):
            seed = args.seed + 1000 * vi + attempt
            GAPS = Gaps()
            disk, ref = draw_model(variant, seed)
            gen = torch.Generator().manual_seed(seed)
            eval_ids = torch.randint(0, DIMS["vocab_size"], (EVAL_TOKENS,), generator=gen).tolist()
            prompt_ids = torch.randint(0, DIMS["vocab_size"], (PROMPT_TOKENS,), generator=gen).tolist()
            logits, mtp_logits, greedy = run_reference(ref, eval_ids, prompt_ids)
            print(f"{variant} seed {seed}: min gaps indexer {GAPS.indexer:.2e} router {GAPS.router:.2e} "
                  f"greedy {GAPS.greedy:.2e}")
            if GAPS.ok():
                break
        else:
            sys.exit(f"{variant}: no seed without near-ties")
        out_dir = os.path.join(args.out, variant)
        write_checkpoint(out_dir, variant, disk)
        save_file({
            "logits": logits.contiguous(),
            "mtp_logits": mtp_logits.contiguous(),
            "eval_ids": torch.tensor(eval_ids, dtype=torch.int64),
            "prompt_ids": torch.tensor(prompt_ids, dtype=torch.int64),
            "greedy_ids": torch.tensor(greedy, dtype=torch.int64),
        }, os.path.join(out_dir, "expected.safetensors"))
        with open(os.path.join(out_dir, "expected.json"), "w") as f:
            json.dump({
                "variant": variant, "seed": seed, "eval_ids": eval_ids, "prompt_ids": prompt_ids, "greedy_ids": greedy,
                "min_gap_indexer": GAPS.indexer, "min_gap_router": GAPS.router, "min_greedy_lead": GAPS.greedy,
                "transformers": transformers.__version__, "torch": torch.__version__,
                "packing_checked_against_compressed_tensors": CT_HELPERS is not None,
            }, f, indent=2)
        print(f"wrote {out_dir}")


if __name__ == "__main__":
    main()
