//! `duet tiny`: writes a small random checkpoint in the exact GLM-5.2 on-disk layout — sharded
//! safetensors with an index, `config.json` (IndexShare, group-limited routing, MTP layer),
//! `generation_config.json`, a byte-level BPE `tokenizer.json` with GLM-5's special tokens and a
//! GLM-5-style chat template — in BF16, FP8 (128×128 blocks) or INT4 experts with an FP8 MTP
//! layer grafted on.
//!
//! `--model tiny` anywhere means the BF16 variant, made once in a cache folder.

pub mod tokenizer;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::json;

use crate::checkpoint::quantize::{fp8_block, pack_quantized};
use crate::checkpoint::safetensors::{write_file, OwnedTensor};
use crate::checkpoint::INDEX_FILE;
use crate::sampling::Rng;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum TinyQuant {
    /// Every weight in BF16.
    Bf16,
    /// FP8 e4m3 linear layers with 128×128 block scales (DeepSeek/GLM FP8 layout).
    Fp8,
    /// INT4 routed experts and INT8 attention (compressed-tensors pack-quantized), with the
    /// MTP layer in FP8 under `mtp_quantization_config`.
    Int4Fp8mtp,
}

/// Shape of the tiny model. Defaults exercise every feature: dense and MoE layers,
/// IndexShare, group-limited routing, partial FP8 blocks, the MTP layer.
#[derive(Clone, Debug)]
pub struct TinySpec {
    pub quant: TinyQuant,
    pub seed: u64,
    pub hidden: usize,
    pub intermediate: usize,
    pub moe_intermediate: usize,
    pub layers: usize,
    pub first_dense: usize,
    pub heads: usize,
    pub q_lora: usize,
    pub kv_lora: usize,
    pub nope: usize,
    pub rope: usize,
    pub v: usize,
    pub experts: usize,
    pub top_k: usize,
    pub n_group: usize,
    pub topk_group: usize,
    pub index_heads: usize,
    pub index_dim: usize,
    pub index_topk: usize,
    pub merges: usize,
    /// Embedding rows; None: the tokenizer's size rounded up to 64.
    pub vocab: Option<usize>,
    pub max_positions: usize,
    /// INT4 experts' group and symmetry, and INT8 modules' group (`int4-fp8mtp`).
    pub int4_group: usize,
    pub int4_symmetric: bool,
    pub int8_group: usize,
    /// Values drawn per tensor from its own stream, uniform with the same variance, on every
    /// core: for real-width shapes, whose billions of weights one Box–Muller stream would take
    /// minutes to draw. (The tiny shape keeps its one normal stream, which its fixtures match.)
    pub fast_init: bool,
}

impl TinySpec {
    pub fn new(quant: TinyQuant, seed: u64) -> TinySpec {
        TinySpec {
            quant,
            seed,
            hidden: 128,
            intermediate: 192,
            moe_intermediate: 64,
            layers: 4,
            first_dense: 1,
            heads: 4,
            q_lora: 64,
            kv_lora: 32,
            nope: 16,
            rope: 16,
            v: 16,
            experts: 16,
            top_k: 4,
            n_group: 4,
            topk_group: 2,
            index_heads: 16,
            index_dim: 32,
            index_topk: 16,
            merges: 200,
            vocab: None,
            max_positions: 4096,
            int4_group: 32,
            int4_symmetric: false,
            int8_group: 32,
            fast_init: false,
        }
    }

    /// A slice of GLM-5.2 at full width (hidden 6144, 64 heads, MLA + DSA, experts of width
    /// 2048, 8 routed per token, the real vocabulary) with `layers` decoder layers (the first
    /// dense) and `experts` routed experts per MoE layer, for benchmarks at real shapes; INT4 as
    /// the real GLM INT4 checkpoints store it (experts group 64 symmetric, INT8 group 64).
    pub fn glm52(quant: TinyQuant, seed: u64, layers: usize, experts: usize) -> TinySpec {
        TinySpec {
            hidden: 6144,
            intermediate: 12288,
            moe_intermediate: 2048,
            layers,
            heads: 64,
            q_lora: 2048,
            kv_lora: 512,
            nope: 192,
            rope: 64,
            v: 256,
            experts,
            top_k: 8.min(experts),
            n_group: 1,
            topk_group: 1,
            index_heads: 32,
            index_dim: 128,
            index_topk: 2048,
            vocab: Some(154880),
            max_positions: 202752,
            int4_group: 64,
            int4_symmetric: true,
            int8_group: 64,
            fast_init: true,
            ..TinySpec::new(quant, seed)
        }
    }
}

/// How one tensor's values are drawn.
enum Init {
    /// Linear weight `[out, in]`, N(0, 1/in).
    Linear,
    /// Norm weight around 1.
    Norm,
    /// Small values around 0 (biases).
    Small,
}

/// Linear modules of one decoder layer with their shapes `[out, in]`, and the other tensors.
fn layer_tensors(s: &TinySpec, layer: usize, full_indexer: bool, moe: bool) -> Vec<(String, Vec<usize>, Init)> {
    let p = format!("model.layers.{layer}");
    let h = s.hidden;
    let mut t: Vec<(String, Vec<usize>, Init)> = vec![
        (format!("{p}.input_layernorm.weight"), vec![h], Init::Norm),
        (format!("{p}.post_attention_layernorm.weight"), vec![h], Init::Norm),
        (format!("{p}.self_attn.q_a_proj.weight"), vec![s.q_lora, h], Init::Linear),
        (format!("{p}.self_attn.q_a_layernorm.weight"), vec![s.q_lora], Init::Norm),
        (format!("{p}.self_attn.q_b_proj.weight"), vec![s.heads * (s.nope + s.rope), s.q_lora], Init::Linear),
        (format!("{p}.self_attn.kv_a_proj_with_mqa.weight"), vec![s.kv_lora + s.rope, h], Init::Linear),
        (format!("{p}.self_attn.kv_a_layernorm.weight"), vec![s.kv_lora], Init::Norm),
        (format!("{p}.self_attn.kv_b_proj.weight"), vec![s.heads * (s.nope + s.v), s.kv_lora], Init::Linear),
        (format!("{p}.self_attn.o_proj.weight"), vec![h, s.heads * s.v], Init::Linear),
    ];
    if full_indexer {
        let ip = format!("{p}.self_attn.indexer");
        t.push((format!("{ip}.wq_b.weight"), vec![s.index_heads * s.index_dim, s.q_lora], Init::Linear));
        t.push((format!("{ip}.wk.weight"), vec![s.index_dim, h], Init::Linear));
        t.push((format!("{ip}.k_norm.weight"), vec![s.index_dim], Init::Norm));
        t.push((format!("{ip}.k_norm.bias"), vec![s.index_dim], Init::Small));
        t.push((format!("{ip}.weights_proj.weight"), vec![s.index_heads, h], Init::Linear));
    }
    let mlp = |prefix: String, inter: usize, t: &mut Vec<(String, Vec<usize>, Init)>| {
        t.push((format!("{prefix}.gate_proj.weight"), vec![inter, h], Init::Linear));
        t.push((format!("{prefix}.up_proj.weight"), vec![inter, h], Init::Linear));
        t.push((format!("{prefix}.down_proj.weight"), vec![h, inter], Init::Linear));
    };
    if moe {
        t.push((format!("{p}.mlp.gate.weight"), vec![s.experts, h], Init::Linear));
        t.push((format!("{p}.mlp.gate.e_score_correction_bias"), vec![s.experts], Init::Small));
        for e in 0..s.experts {
            mlp(format!("{p}.mlp.experts.{e}"), s.moe_intermediate, &mut t);
        }
        mlp(format!("{p}.mlp.shared_experts"), s.moe_intermediate, &mut t);
    } else {
        mlp(format!("{p}.mlp"), s.intermediate, &mut t);
    }
    t
}

/// How a linear module is stored in each variant.
enum Store {
    Bf16,
    Fp8,
    Int { bits: usize, group: usize, symmetric: bool },
}

fn store_for(s: &TinySpec, module: &str, mtp_prefix: &str) -> Store {
    let plain = module == "lm_head"
        || module == "model.embed_tokens"
        || module.ends_with("mlp.gate")
        || module.ends_with("indexer.weights_proj");
    if plain {
        return Store::Bf16;
    }
    match s.quant {
        TinyQuant::Bf16 => Store::Bf16,
        TinyQuant::Fp8 => Store::Fp8,
        TinyQuant::Int4Fp8mtp => {
            if module.starts_with(mtp_prefix) {
                Store::Fp8
            } else if module.contains(".mlp.experts.") {
                Store::Int { bits: 4, group: s.int4_group, symmetric: s.int4_symmetric }
            } else if module.contains(".shared_experts.") || (module.contains(".self_attn.") && !module.contains(".indexer.")) {
                Store::Int { bits: 8, group: s.int8_group, symmetric: true }
            } else {
                Store::Bf16
            }
        }
    }
}

fn config_json(s: &TinySpec, vocab: usize, special: &std::collections::HashMap<&'static str, u32>) -> serde_json::Value {
    let full: Vec<&str> = (0..s.layers).map(|i| if (i + 1).saturating_sub(2) % 2 == 0 { "full" } else { "shared" }).collect();
    let mut c = json!({
        "architectures": ["GlmMoeDsaForCausalLM"],
        "model_type": "glm_moe_dsa",
        "attention_bias": false,
        "attention_dropout": 0.0,
        "dtype": "bfloat16",
        "eos_token_id": [special["<|endoftext|>"], special["<|user|>"], special["<|observation|>"]],
        "pad_token_id": special["<|endoftext|>"],
        "first_k_dense_replace": s.first_dense,
        "mlp_layer_types": (0..s.layers).map(|i| if i < s.first_dense { "dense" } else { "sparse" }).collect::<Vec<_>>(),
        "hidden_act": "silu",
        "hidden_size": s.hidden,
        "head_dim": s.nope,
        "index_head_dim": s.index_dim,
        "index_n_heads": s.index_heads,
        "index_topk": s.index_topk,
        "index_topk_freq": 2,
        "index_skip_topk_offset": 2,
        "indexer_types": full,
        "index_share_for_mtp_iteration": true,
        "indexer_rope_interleave": true,
        "initializer_range": 0.02,
        "intermediate_size": s.intermediate,
        "kv_lora_rank": s.kv_lora,
        "max_position_embeddings": s.max_positions,
        "moe_intermediate_size": s.moe_intermediate,
        "moe_layer_freq": 1,
        "moe_router_dtype": "float32",
        "n_group": s.n_group,
        "n_routed_experts": s.experts,
        "n_shared_experts": 1,
        "norm_topk_prob": true,
        "num_attention_heads": s.heads,
        "num_experts_per_tok": s.top_k,
        "num_hidden_layers": s.layers,
        "num_key_value_heads": s.heads,
        "num_nextn_predict_layers": 1,
        "q_lora_rank": s.q_lora,
        "qk_nope_head_dim": s.nope,
        "qk_rope_head_dim": s.rope,
        "rms_norm_eps": 1e-5,
        "rope_interleave": true,
        "rope_parameters": {"rope_theta": 8000000, "rope_type": "default"},
        "routed_scaling_factor": 2.5,
        "scoring_func": "sigmoid",
        "tie_word_embeddings": false,
        "topk_group": s.topk_group,
        "topk_method": "noaux_tc",
        "transformers_version": "5.17.0",
        "use_cache": true,
        "v_head_dim": s.v,
        "vocab_size": vocab,
    });
    let fp8 = |skip: Vec<String>| {
        json!({"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128], "modules_to_not_convert": skip})
    };
    match s.quant {
        TinyQuant::Bf16 => {}
        TinyQuant::Fp8 => {
            c["quantization_config"] = fp8(vec!["lm_head".into(), "model.embed_tokens".into(), "mlp.gate".into(), "indexer.weights_proj".into()]);
        }
        TinyQuant::Int4Fp8mtp => {
            let weights = |bits: usize, group: usize, symmetric: bool| {
                json!({"num_bits": bits, "type": "int", "strategy": "group", "group_size": group, "symmetric": symmetric, "dynamic": false, "actorder": null, "observer": "minmax"})
            };
            c["quantization_config"] = json!({
                "quant_method": "compressed-tensors",
                "format": "pack-quantized",
                "quantization_status": "compressed",
                "config_groups": {
                    "group_0": {"targets": ["re:.*mlp\\.experts\\.[0-9]+\\.(gate|up|down)_proj$"], "weights": weights(4, s.int4_group, s.int4_symmetric), "input_activations": null, "output_activations": null, "format": "pack-quantized"},
                    "group_1": {"targets": ["re:.*self_attn\\.(q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)$", "re:.*shared_experts\\.(gate|up|down)_proj$"], "weights": weights(8, s.int8_group, true), "input_activations": null, "output_activations": null, "format": "pack-quantized"}
                },
                "ignore": ["lm_head", "model.embed_tokens", "re:.*mlp\\.gate$", "re:.*indexer\\..*", format!("re:model\\.layers\\.{}\\..*", s.layers)],
                "kv_cache_scheme": null
            });
            c["mtp_quantization_config"] = fp8(vec!["mlp.gate".into(), "indexer.weights_proj".into()]);
        }
    }
    c
}

/// Writes the tiny checkpoint into `dir` (created if needed).
pub fn write(dir: &Path, s: &TinySpec) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let tok = tokenizer::build(s.merges);
    let vocab = s.vocab.unwrap_or(tok.len.div_ceil(64) * 64);
    if vocab < tok.len {
        bail!("a vocabulary of {vocab} rows cannot hold the tokenizer's {} tokens", tok.len);
    }
    let config = config_json(s, vocab, &tok.special_ids);
    let mtp_prefix = format!("model.layers.{}.", s.layers);

    let mut list: Vec<(String, Vec<usize>, Init)> = vec![("model.embed_tokens.weight".into(), vec![vocab, s.hidden], Init::Linear)];
    for l in 0..s.layers {
        let full = (l + 1).saturating_sub(2) % 2 == 0;
        list.extend(layer_tensors(s, l, full, l >= s.first_dense));
    }
    let m = s.layers;
    list.extend(layer_tensors(s, m, true, true));
    list.push((format!("model.layers.{m}.enorm.weight"), vec![s.hidden], Init::Norm));
    list.push((format!("model.layers.{m}.hnorm.weight"), vec![s.hidden], Init::Norm));
    list.push((format!("model.layers.{m}.eh_proj.weight"), vec![s.hidden, 2 * s.hidden], Init::Linear));
    list.push((format!("model.layers.{m}.shared_head.norm.weight"), vec![s.hidden], Init::Norm));
    list.push(("model.norm.weight".into(), vec![s.hidden], Init::Norm));
    list.push(("lm_head.weight".into(), vec![vocab, s.hidden], Init::Linear));

    let tensors = if s.fast_init { draw_parallel(s, list, &mtp_prefix) } else { draw_sequential(s, list, &mtp_prefix) };
    // Real-width checkpoints in shards under 5 GB, as published ones are.
    let total: usize = tensors.iter().map(|(_, t)| t.data.len()).sum();
    write_shards(dir, tensors, total.div_ceil(4 << 30).max(3))?;

    let write_json = |name: &str, v: &serde_json::Value| -> Result<()> {
        let path = dir.join(name);
        std::fs::write(&path, serde_json::to_string_pretty(v)?).with_context(|| format!("cannot write {}", path.display()))
    };
    write_json("config.json", &config)?;
    write_json(
        "generation_config.json",
        &json!({"_from_model_config": false, "eos_token_id": config["eos_token_id"], "pad_token_id": config["pad_token_id"], "do_sample": true, "temperature": 1.0, "top_p": 0.95, "transformers_version": "5.17.0"}),
    )?;
    write_json("tokenizer.json", &tok.json)?;
    write_json(
        "tokenizer_config.json",
        &json!({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "clean_up_tokenization_spaces": false, "do_lower_case": false, "model_max_length": 4096, "padding_side": "left", "remove_space": false}),
    )?;
    std::fs::write(dir.join("chat_template.jinja"), tokenizer::CHAT_TEMPLATE).context("cannot write chat_template.jinja")?;
    Ok(())
}

/// Every tensor's values from the one normal stream of `s.seed`, in list order.
fn draw_sequential(s: &TinySpec, list: Vec<(String, Vec<usize>, Init)>, mtp_prefix: &str) -> Vec<(String, OwnedTensor)> {
    let mut rng = Rng::new(s.seed);
    let mut tensors = Vec::new();
    for (name, shape, init) in list {
        let n: usize = shape.iter().product();
        let std = init_std(&init, &shape);
        let values: Vec<f32> = (0..n)
            .map(|_| {
                let z = rng.normal() * std;
                (if matches!(init, Init::Norm) { 1.0 + z } else { z }) as f32
            })
            .collect();
        tensors.extend(stored(s, name, &shape, &values, mtp_prefix));
    }
    tensors
}

/// Every tensor's values from its own stream (the seed and its name), uniform with the same
/// variance, the tensors spread over the machine's cores; the result in list order.
fn draw_parallel(s: &TinySpec, list: Vec<(String, Vec<usize>, Init)>, mtp_prefix: &str) -> Vec<(String, OwnedTensor)> {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let done: Vec<std::sync::Mutex<Vec<(String, OwnedTensor)>>> = list.iter().map(|_| Default::default()).collect();
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some((name, shape, init)) = list.get(i) else { break };
                let seed = name.bytes().fold(s.seed ^ 0xcbf2_9ce4_8422_2325, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3));
                let mut rng = Rng::new(seed);
                // Uniform on [−a, a] has variance a²/3.
                let a = init_std(init, shape) * 3f64.sqrt();
                let offset = if matches!(init, Init::Norm) { 1.0 } else { 0.0 };
                let n: usize = shape.iter().product();
                let values: Vec<f32> = (0..n).map(|_| (offset + a * (2.0 * rng.uniform() - 1.0)) as f32).collect();
                *done[i].lock().unwrap() = stored(s, name.clone(), shape, &values, mtp_prefix);
            });
        }
    });
    done.into_iter().flat_map(|m| m.into_inner().unwrap()).collect()
}

fn init_std(init: &Init, shape: &[usize]) -> f64 {
    match init {
        Init::Linear => (1.0 / shape[1] as f64).sqrt(),
        Init::Norm | Init::Small => 0.1,
    }
}

/// Tensor `name` with `values` as the variant stores it: plain, FP8 with its block scales, or
/// pack-quantized with its scales (and zero points).
fn stored(s: &TinySpec, name: String, shape: &[usize], values: &[f32], mtp_prefix: &str) -> Vec<(String, OwnedTensor)> {
    if name.ends_with("e_score_correction_bias") {
        return vec![(name, OwnedTensor::f32(shape, values))];
    }
    let Some(module) = name.strip_suffix(".weight").filter(|_| shape.len() == 2).map(str::to_string) else {
        return vec![(name, OwnedTensor::bf16(shape, values))];
    };
    let (rows, cols) = (shape[0], shape[1]);
    match store_for(s, &module, mtp_prefix) {
        Store::Bf16 => vec![(name, OwnedTensor::bf16(shape, values))],
        Store::Fp8 => {
            let (w, scale) = fp8_block(values, rows, cols, [128, 128]);
            vec![(name, w), (format!("{module}.weight_scale_inv"), scale)]
        }
        Store::Int { bits, group, symmetric } => {
            pack_quantized(values, rows, cols, bits, group, symmetric).into_iter().map(|(suffix, t)| (format!("{module}.{suffix}"), t)).collect()
        }
    }
}

/// Splits tensors (in order) into `n` shards of similar size and writes them with the index.
fn write_shards(dir: &Path, tensors: Vec<(String, OwnedTensor)>, n: usize) -> Result<()> {
    let total: usize = tensors.iter().map(|(_, t)| t.data.len()).sum();
    let per = total.div_ceil(n);
    let mut shards: Vec<BTreeMap<String, OwnedTensor>> = vec![BTreeMap::new()];
    let mut size = 0;
    for (name, t) in tensors {
        if size >= per && shards.len() < n {
            shards.push(BTreeMap::new());
            size = 0;
        }
        size += t.data.len();
        shards.last_mut().unwrap().insert(name, t);
    }
    let count = shards.len();
    let mut weight_map = serde_json::Map::new();
    for (i, shard) in shards.iter().enumerate() {
        let file = format!("model-{:05}-of-{count:05}.safetensors", i + 1);
        for name in shard.keys() {
            weight_map.insert(name.clone(), json!(file));
        }
        write_file(&dir.join(&file), shard)?;
    }
    let index = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
    std::fs::write(dir.join(INDEX_FILE), serde_json::to_string_pretty(&index)?).context("cannot write the index")?;
    Ok(())
}

/// Folder for caches (the built-in tiny checkpoint): `$DUET_CACHE_DIR`, else
/// `$XDG_CACHE_HOME/duet`, else `~/.cache/duet`.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("DUET_CACHE_DIR") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(d).join("duet");
    }
    match std::env::var_os("HOME") {
        Some(h) => PathBuf::from(h).join(".cache").join("duet"),
        None => std::env::temp_dir().join("duet-cache"),
    }
}

/// Version of the built-in tiny checkpoint; bump when its recipe changes.
const TINY_VERSION: u32 = 1;

/// The built-in tiny checkpoint (BF16), written on first use.
pub fn builtin() -> Result<PathBuf> {
    let dir = cache_dir().join(format!("tiny-v{TINY_VERSION}"));
    if dir.join("config.json").exists() {
        return Ok(dir);
    }
    let tmp = cache_dir().join(format!(".tiny-v{TINY_VERSION}.{}", std::process::id()));
    write(&tmp, &TinySpec::new(TinyQuant::Bf16, 0))?;
    if let Err(e) = std::fs::rename(&tmp, &dir) {
        // Another process may have finished first; keep theirs.
        let _ = std::fs::remove_dir_all(&tmp);
        if !dir.join("config.json").exists() {
            bail!("cannot create {}: {e}", dir.display());
        }
    }
    Ok(dir)
}

/// Resolves a `--model` argument: `tiny` means the built-in checkpoint.
pub fn resolve_model(arg: &Path) -> Result<PathBuf> {
    if arg == Path::new("tiny") && !arg.exists() {
        builtin()
    } else {
        Ok(arg.to_path_buf())
    }
}

#[cfg(test)]
mod tests {
    use super::{config_json, tokenizer, TinyQuant, TinySpec};
    use crate::checkpoint::config::ModelConfig;

    #[test]
    fn the_glm52_slice_has_glm52_widths() {
        // Its config only (the weights are gigabytes): what the model reads from it.
        let s = TinySpec::glm52(TinyQuant::Int4Fp8mtp, 0, 4, 32);
        let tok = tokenizer::build(s.merges);
        let c = ModelConfig::from_json(&config_json(&s, s.vocab.unwrap(), &tok.special_ids)).unwrap();
        let dims = [c.hidden_size, c.num_attention_heads, c.q_lora_rank, c.kv_lora_rank, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim];
        assert_eq!(dims, [6144, 64, 2048, 512, 192, 64, 256]);
        assert_eq!((c.moe_intermediate_size, c.n_routed_experts, c.num_experts_per_tok, c.vocab_size), (2048, 32, 8, 154880));
        assert_eq!((c.num_hidden_layers, c.index_topk, c.index_n_heads, c.index_head_dim), (4, 2048, 32, 128));
        assert!(c.quantization.is_some() && c.mtp_quantization.is_some());
    }
}
