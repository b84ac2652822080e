//! `config.json` of a `glm_moe_dsa` checkpoint (GLM-5, 5.1, 5.2), parsed and validated.
//!
//! Field names and defaults follow transformers' `GlmMoeDsaConfig`. Every dimension must be
//! present; flags fall back to the transformers defaults. A value of the wrong type, an unknown
//! enumeration value or an inconsistent combination is an error that names the field.

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{Map, Value};

use super::quant::QuantConfig;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MlpKind {
    Dense,
    Sparse,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IndexerKind {
    /// The layer runs its own lightning indexer.
    Full,
    /// The layer reuses the previous full layer's top-k selection (IndexShare).
    Shared,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub moe_intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub n_shared_experts: usize,
    pub n_routed_experts: usize,
    pub num_experts_per_tok: usize,
    pub n_group: usize,
    pub topk_group: usize,
    pub norm_topk_prob: bool,
    pub routed_scaling_factor: f32,
    pub q_lora_rank: usize,
    pub kv_lora_rank: usize,
    pub qk_nope_head_dim: usize,
    pub qk_rope_head_dim: usize,
    pub v_head_dim: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f64,
    pub rope_interleave: bool,
    pub indexer_rope_interleave: bool,
    pub max_position_embeddings: usize,
    pub mlp_layer_types: Vec<MlpKind>,
    pub indexer_types: Vec<IndexerKind>,
    pub index_topk: usize,
    pub index_head_dim: usize,
    pub index_n_heads: usize,
    pub index_share_for_mtp_iteration: bool,
    pub num_nextn_predict_layers: usize,
    pub tie_word_embeddings: bool,
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
    pub bos_token_id: Option<u32>,
    pub quantization: Option<QuantConfig>,
    pub mtp_quantization: Option<QuantConfig>,
}

/// Norm epsilon transformers uses for `q_a_layernorm` and `kv_a_layernorm` (the module default,
/// not `rms_norm_eps`).
pub const LORA_NORM_EPS: f32 = 1e-6;
/// Epsilon of the indexer's key LayerNorm.
pub const INDEXER_NORM_EPS: f32 = 1e-6;

impl ModelConfig {
    pub fn load(path: &Path) -> Result<ModelConfig> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| anyhow!("{}: bad JSON: {e}", path.display()))?;
        ModelConfig::from_json(&v).with_context(|| format!("invalid config {}", path.display()))
    }

    pub fn from_json(v: &Value) -> Result<ModelConfig> {
        let o = v.as_object().ok_or_else(|| anyhow!("config.json is not a JSON object"))?;
        let f = Fields(o);
        match o.get("model_type").and_then(Value::as_str) {
            Some("glm_moe_dsa") => {}
            Some(other) => bail!("field 'model_type': unsupported model type '{other}' (expected 'glm_moe_dsa')"),
            None => bail!("field 'model_type' is missing (expected 'glm_moe_dsa')"),
        }
        let num_hidden_layers = f.dim("num_hidden_layers")?;
        let n_routed_experts = f.dim("n_routed_experts")?;
        let hidden_act = f.string_or("hidden_act", "silu")?;
        if hidden_act != "silu" {
            bail!("field 'hidden_act': unsupported activation '{hidden_act}' (GLM-5.x uses 'silu')");
        }
        if f.bool_or("attention_bias", false)? {
            bail!("field 'attention_bias': true is not supported (GLM-5.x has no attention biases)");
        }
        if f.bool_or("mlp_bias", false)? {
            bail!("field 'mlp_bias': true is not supported (GLM-5.x has no MLP biases)");
        }
        let scoring = f.string_or("scoring_func", "sigmoid")?;
        if scoring != "sigmoid" {
            bail!("field 'scoring_func': unsupported '{scoring}' (GLM-5.x routes with 'sigmoid')");
        }
        let topk_method = f.string_or("topk_method", "noaux_tc")?;
        if topk_method != "noaux_tc" {
            bail!("field 'topk_method': unsupported '{topk_method}' (expected 'noaux_tc')");
        }
        if let Some(dt) = o.get("moe_router_dtype").filter(|v| !v.is_null()) {
            if dt.as_str() != Some("float32") {
                bail!("field 'moe_router_dtype': unsupported {dt} (the router runs in float32)");
            }
        }
        let moe_layer_freq = f.usize_or("moe_layer_freq", 1)?;
        if moe_layer_freq != 1 {
            bail!("field 'moe_layer_freq': {moe_layer_freq} is not supported (expected 1)");
        }

        let first_k_dense = f.usize_or("first_k_dense_replace", 3)?;
        let mlp_layer_types = match o.get("mlp_layer_types").filter(|v| !v.is_null()) {
            Some(list) => {
                let list = list.as_array().ok_or_else(|| anyhow!("field 'mlp_layer_types' must be a list"))?;
                let kinds = list
                    .iter()
                    .enumerate()
                    .map(|(i, k)| match k.as_str() {
                        Some("dense") => Ok(MlpKind::Dense),
                        Some("sparse") => Ok(MlpKind::Sparse),
                        _ => Err(anyhow!("field 'mlp_layer_types'[{i}]: unknown value {k} (expected 'dense' or 'sparse')")),
                    })
                    .collect::<Result<Vec<_>>>()?;
                if kinds.len() != num_hidden_layers {
                    bail!(
                        "field 'mlp_layer_types' has {} entries but num_hidden_layers is {num_hidden_layers}",
                        kinds.len()
                    );
                }
                if o.contains_key("first_k_dense_replace") {
                    let derived = derive_mlp_types(first_k_dense, num_hidden_layers);
                    if derived != kinds {
                        bail!(
                            "field 'mlp_layer_types' disagrees with 'first_k_dense_replace' = {first_k_dense}"
                        );
                    }
                }
                kinds
            }
            None => derive_mlp_types(first_k_dense, num_hidden_layers),
        };

        let indexer_types = parse_indexer_types(o, &f, num_hidden_layers)?;
        if indexer_types.first() == Some(&IndexerKind::Shared) {
            bail!("field 'indexer_types': layer 0 is 'shared' but no earlier full indexer layer exists to share from");
        }

        let (rope_theta, rope_type) = parse_rope(o)?;
        if rope_type != "default" {
            bail!("field 'rope_parameters.rope_type': '{rope_type}' is not supported (GLM-5.x uses 'default')");
        }

        let eos_token_ids = match o.get("eos_token_id") {
            None | Some(Value::Null) => vec![],
            Some(v) => token_id_list(v).ok_or_else(|| anyhow!("field 'eos_token_id' must be a token id or a list of ids"))?,
        };

        let cfg = ModelConfig {
            vocab_size: f.dim("vocab_size")?,
            hidden_size: f.dim("hidden_size")?,
            intermediate_size: f.dim("intermediate_size")?,
            moe_intermediate_size: f.dim("moe_intermediate_size")?,
            num_hidden_layers,
            num_attention_heads: f.dim("num_attention_heads")?,
            n_shared_experts: f.usize_or("n_shared_experts", 1)?,
            n_routed_experts,
            num_experts_per_tok: f.dim("num_experts_per_tok")?,
            n_group: f.usize_or("n_group", 1)?,
            topk_group: f.usize_or("topk_group", 1)?,
            norm_topk_prob: f.bool_or("norm_topk_prob", true)?,
            routed_scaling_factor: f.float_or("routed_scaling_factor", 2.5)? as f32,
            q_lora_rank: f.dim("q_lora_rank")?,
            kv_lora_rank: f.dim("kv_lora_rank")?,
            qk_nope_head_dim: f.dim("qk_nope_head_dim")?,
            qk_rope_head_dim: f.dim("qk_rope_head_dim")?,
            v_head_dim: f.dim("v_head_dim")?,
            rms_norm_eps: f.float_or("rms_norm_eps", 1e-5)? as f32,
            rope_theta,
            rope_interleave: f.bool_or("rope_interleave", true)?,
            indexer_rope_interleave: f.bool_or("indexer_rope_interleave", true)?,
            max_position_embeddings: f.usize_or("max_position_embeddings", 202752)?,
            mlp_layer_types,
            indexer_types,
            index_topk: f.usize_or("index_topk", 2048)?,
            index_head_dim: f.usize_or("index_head_dim", 128)?,
            index_n_heads: f.usize_or("index_n_heads", 32)?,
            index_share_for_mtp_iteration: f.bool_or("index_share_for_mtp_iteration", false)?,
            num_nextn_predict_layers: f.usize_or("num_nextn_predict_layers", 0)?,
            tie_word_embeddings: f.bool_or("tie_word_embeddings", false)?,
            eos_token_ids,
            pad_token_id: f.token_id("pad_token_id")?,
            bos_token_id: f.token_id("bos_token_id")?,
            quantization: QuantConfig::parse_field(o, "quantization_config")?,
            mtp_quantization: QuantConfig::parse_field(o, "mtp_quantization_config")?,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<()> {
        if !self.n_routed_experts.is_multiple_of(self.n_group) {
            bail!(
                "field 'n_group': {} routed experts cannot be split into {} equal groups",
                self.n_routed_experts,
                self.n_group
            );
        }
        if self.topk_group == 0 || self.topk_group > self.n_group {
            bail!("field 'topk_group': {} must be between 1 and n_group = {}", self.topk_group, self.n_group);
        }
        let per_group = self.n_routed_experts / self.n_group;
        if self.n_group > 1 && per_group < 2 {
            bail!("field 'n_group': each group needs at least 2 experts (group score sums the top 2)");
        }
        if self.num_experts_per_tok > self.topk_group * per_group {
            bail!(
                "field 'num_experts_per_tok': {} exceeds the {} experts in the {} selected groups",
                self.num_experts_per_tok,
                self.topk_group * per_group,
                self.topk_group
            );
        }
        if !self.qk_rope_head_dim.is_multiple_of(2) {
            bail!("field 'qk_rope_head_dim': {} must be even (RoPE rotates pairs)", self.qk_rope_head_dim);
        }
        if self.index_head_dim < self.qk_rope_head_dim {
            bail!(
                "field 'index_head_dim': {} is smaller than qk_rope_head_dim = {} (the indexer ropes its first qk_rope_head_dim dims)",
                self.index_head_dim,
                self.qk_rope_head_dim
            );
        }
        if self.index_topk == 0 {
            bail!("field 'index_topk' must be at least 1");
        }
        if self.num_nextn_predict_layers > 1 {
            bail!(
                "field 'num_nextn_predict_layers': {} MTP layers are not supported (GLM-5.x ships one)",
                self.num_nextn_predict_layers
            );
        }
        if !(self.rms_norm_eps > 0.0) {
            bail!("field 'rms_norm_eps' must be positive");
        }
        for &id in &self.eos_token_ids {
            if id as usize >= self.vocab_size {
                bail!("field 'eos_token_id': {id} is outside the vocabulary ({} tokens)", self.vocab_size);
            }
        }
        Ok(())
    }

    pub fn qk_head_dim(&self) -> usize {
        self.qk_nope_head_dim + self.qk_rope_head_dim
    }

    /// Softmax scale of the main attention: qk_head_dim^-0.5.
    pub fn attn_scale(&self) -> f32 {
        (self.qk_head_dim() as f32).powf(-0.5)
    }

    /// Index of the MTP layer in checkpoint tensor names (`model.layers.{N}`), if any.
    pub fn mtp_layer_index(&self) -> Option<usize> {
        (self.num_nextn_predict_layers > 0).then_some(self.num_hidden_layers)
    }

    pub fn is_moe_layer(&self, layer: usize) -> bool {
        // The MTP layer (index num_hidden_layers) is an MoE layer in every GLM-5.x checkpoint.
        self.mlp_layer_types.get(layer).is_none_or(|k| *k == MlpKind::Sparse)
    }

    pub fn indexer_kind(&self, layer: usize) -> IndexerKind {
        // The MTP layer always owns a full indexer.
        self.indexer_types.get(layer).copied().unwrap_or(IndexerKind::Full)
    }

    /// Per-pair RoPE inverse frequencies, rounded to f32 exactly as transformers computes them.
    pub fn rope_inv_freq(&self) -> Vec<f32> {
        let dim = self.qk_rope_head_dim;
        (0..dim / 2)
            .map(|i| {
                let exponent = (2 * i) as f32 / dim as f32;
                let p = (self.rope_theta as f32 as f64).powf(exponent as f64) as f32;
                1.0f32 / p
            })
            .collect()
    }
}

fn derive_mlp_types(first_k_dense: usize, layers: usize) -> Vec<MlpKind> {
    (0..layers).map(|i| if i < first_k_dense { MlpKind::Dense } else { MlpKind::Sparse }).collect()
}

fn parse_indexer_types(o: &Map<String, Value>, f: &Fields, layers: usize) -> Result<Vec<IndexerKind>> {
    if let Some(list) = o.get("indexer_types").filter(|v| !v.is_null()) {
        let list = list.as_array().ok_or_else(|| anyhow!("field 'indexer_types' must be a list"))?;
        let kinds = list
            .iter()
            .enumerate()
            .map(|(i, k)| match k.as_str() {
                Some("full") => Ok(IndexerKind::Full),
                Some("shared") => Ok(IndexerKind::Shared),
                _ => Err(anyhow!("field 'indexer_types'[{i}]: unknown value {k} (expected 'full' or 'shared')")),
            })
            .collect::<Result<Vec<_>>>()?;
        if kinds.len() != layers {
            bail!("field 'indexer_types' has {} entries but num_hidden_layers is {layers}", kinds.len());
        }
        return Ok(kinds);
    }
    if let Some(pattern) = o.get("index_topk_pattern").filter(|v| !v.is_null()) {
        let s = pattern.as_str().ok_or_else(|| anyhow!("field 'index_topk_pattern' must be a string of 'F'/'S'"))?;
        let kinds = s
            .chars()
            .enumerate()
            .map(|(i, c)| match c {
                'F' => Ok(IndexerKind::Full),
                'S' => Ok(IndexerKind::Shared),
                _ => Err(anyhow!("field 'index_topk_pattern'[{i}]: unknown character '{c}' (expected 'F' or 'S')")),
            })
            .collect::<Result<Vec<_>>>()?;
        if kinds.len() != layers {
            bail!("field 'index_topk_pattern' has {} entries but num_hidden_layers is {layers}", kinds.len());
        }
        return Ok(kinds);
    }
    let freq = f.usize_or("index_topk_freq", 1)?.max(1);
    let offset = f.usize_or("index_skip_topk_offset", 2)?;
    Ok((0..layers)
        .map(|i| {
            if (i + 1).saturating_sub(offset) % freq == 0 {
                IndexerKind::Full
            } else {
                IndexerKind::Shared
            }
        })
        .collect())
}

/// Returns (theta, rope_type) from `rope_parameters`, or the older `rope_theta` + `rope_scaling`.
fn parse_rope(o: &Map<String, Value>) -> Result<(f64, String)> {
    let params = o
        .get("rope_parameters")
        .filter(|v| !v.is_null())
        .or_else(|| o.get("rope_scaling").filter(|v| !v.is_null()));
    let (field, params) = match params {
        Some(p) => {
            let name = if o.get("rope_parameters").is_some_and(|v| !v.is_null()) { "rope_parameters" } else { "rope_scaling" };
            (name, Some(p.as_object().ok_or_else(|| anyhow!("field '{name}' must be an object"))?))
        }
        None => ("rope_parameters", None),
    };
    let theta_v = params.and_then(|p| p.get("rope_theta")).or_else(|| o.get("rope_theta"));
    let theta = match theta_v {
        None | Some(Value::Null) => 10_000.0,
        Some(v) => v.as_f64().filter(|t| *t > 0.0).ok_or_else(|| anyhow!("field '{field}.rope_theta' must be a positive number, found {v}"))?,
    };
    let rope_type = match params.and_then(|p| p.get("rope_type").or_else(|| p.get("type"))) {
        None | Some(Value::Null) => "default".to_string(),
        Some(v) => v.as_str().ok_or_else(|| anyhow!("field '{field}.rope_type' must be a string"))?.to_string(),
    };
    Ok((theta, rope_type))
}

fn token_id_list(v: &Value) -> Option<Vec<u32>> {
    match v {
        Value::Number(n) => Some(vec![u32::try_from(n.as_u64()?).ok()?]),
        Value::Array(a) => a.iter().map(|x| x.as_u64().and_then(|x| u32::try_from(x).ok())).collect(),
        _ => None,
    }
}

/// Typed accessors that name the field in every error.
struct Fields<'a>(&'a Map<String, Value>);

impl Fields<'_> {
    fn get(&self, k: &str) -> Option<&Value> {
        self.0.get(k).filter(|v| !v.is_null())
    }

    fn dim(&self, k: &str) -> Result<usize> {
        match self.get(k) {
            None => bail!("field '{k}' is missing"),
            Some(v) => match v.as_u64() {
                Some(n) if n > 0 => Ok(n as usize),
                _ => bail!("field '{k}' must be a positive integer, found {v}"),
            },
        }
    }

    fn usize_or(&self, k: &str, default: usize) -> Result<usize> {
        match self.get(k) {
            None => Ok(default),
            Some(v) => v.as_u64().map(|n| n as usize).ok_or_else(|| anyhow!("field '{k}' must be a non-negative integer, found {v}")),
        }
    }

    fn float_or(&self, k: &str, default: f64) -> Result<f64> {
        match self.get(k) {
            None => Ok(default),
            Some(v) => v.as_f64().filter(|x| x.is_finite()).ok_or_else(|| anyhow!("field '{k}' must be a number, found {v}")),
        }
    }

    fn bool_or(&self, k: &str, default: bool) -> Result<bool> {
        match self.get(k) {
            None => Ok(default),
            Some(v) => v.as_bool().ok_or_else(|| anyhow!("field '{k}' must be true or false, found {v}")),
        }
    }

    fn string_or(&self, k: &str, default: &str) -> Result<String> {
        match self.get(k) {
            None => Ok(default.to_string()),
            Some(v) => v.as_str().map(str::to_string).ok_or_else(|| anyhow!("field '{k}' must be a string, found {v}")),
        }
    }

    fn token_id(&self, k: &str) -> Result<Option<u32>> {
        match self.get(k) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .and_then(|x| u32::try_from(x).ok())
                .map(Some)
                .ok_or_else(|| anyhow!("field '{k}' must be a token id, found {v}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn glm52_json() -> Value {
        serde_json::json!({
            "architectures": ["GlmMoeDsaForCausalLM"], "model_type": "glm_moe_dsa",
            "vocab_size": 154880, "hidden_size": 6144, "intermediate_size": 12288,
            "moe_intermediate_size": 2048, "num_hidden_layers": 78, "num_attention_heads": 64,
            "num_key_value_heads": 64, "n_shared_experts": 1, "n_routed_experts": 256,
            "num_experts_per_tok": 8, "n_group": 1, "topk_group": 1, "norm_topk_prob": true,
            "routed_scaling_factor": 2.5, "q_lora_rank": 2048, "kv_lora_rank": 512,
            "qk_nope_head_dim": 192, "qk_rope_head_dim": 64, "v_head_dim": 256, "head_dim": 192,
            "rms_norm_eps": 1e-5, "rope_parameters": {"rope_theta": 8000000, "rope_type": "default"},
            "first_k_dense_replace": 3, "index_topk": 2048, "index_head_dim": 128, "index_n_heads": 32,
            "index_topk_freq": 4, "index_skip_topk_offset": 3, "num_nextn_predict_layers": 1,
            "eos_token_id": [154820, 154827, 154829], "pad_token_id": 154820,
            "moe_router_dtype": "float32", "scoring_func": "sigmoid", "topk_method": "noaux_tc"
        })
    }

    #[test]
    fn glm52_index_share_schedule() {
        let c = ModelConfig::from_json(&glm52_json()).unwrap();
        let full: Vec<usize> =
            (0..78).filter(|&i| c.indexer_types[i] == IndexerKind::Full).collect();
        assert_eq!(full.len(), 21);
        assert_eq!(&full[..5], &[0, 1, 2, 6, 10]);
        assert_eq!(*full.last().unwrap(), 74);
        assert_eq!(c.mlp_layer_types.iter().filter(|k| **k == MlpKind::Dense).count(), 3);
        assert_eq!(c.rope_theta, 8e6);
        assert_eq!(c.mtp_layer_index(), Some(78));
    }

    #[test]
    fn errors_name_the_field() {
        let mut v = glm52_json();
        v["hidden_size"] = serde_json::json!("big");
        let e = format!("{:#}", ModelConfig::from_json(&v).unwrap_err());
        assert!(e.contains("hidden_size"), "{e}");

        let mut v = glm52_json();
        v["n_group"] = serde_json::json!(3);
        let e = format!("{:#}", ModelConfig::from_json(&v).unwrap_err());
        assert!(e.contains("n_group"), "{e}");

        let mut v = glm52_json();
        v["indexer_types"] = serde_json::json!(["full", "bogus"]);
        let e = format!("{:#}", ModelConfig::from_json(&v).unwrap_err());
        assert!(e.contains("indexer_types"), "{e}");

        let mut v = glm52_json();
        v.as_object_mut().unwrap().remove("kv_lora_rank");
        let e = format!("{:#}", ModelConfig::from_json(&v).unwrap_err());
        assert!(e.contains("kv_lora_rank"), "{e}");
    }

    #[test]
    fn legacy_rope_theta() {
        let mut v = glm52_json();
        let o = v.as_object_mut().unwrap();
        o.remove("rope_parameters");
        o.insert("rope_theta".into(), serde_json::json!(1000000.0));
        assert_eq!(ModelConfig::from_json(&v).unwrap().rope_theta, 1e6);
    }
}
