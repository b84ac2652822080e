//! `quantization_config` and `mtp_quantization_config`: which precision each linear module is
//! expected in.
//!
//! Two methods exist in GLM-5.x checkpoints:
//! - `fp8`: DeepSeek-style e4m3 weights with block scales (`weight_scale_inv`), modules listed
//!   in `modules_to_not_convert` stay in bf16;
//! - `compressed-tensors` with the `pack-quantized` format: INT4/INT8 group-scaled weights packed
//!   into int32 words, modules matched by each config group's `targets` minus `ignore`.
//!
//! The tensors in the checkpoint are the ground truth for how a module is stored; the config
//! supplies the parameters (bits, group size, block size) and is cross-checked against them.

use anyhow::{anyhow, bail, Result};
use serde_json::{Map, Value};

#[derive(Clone, Debug, PartialEq)]
pub enum QuantConfig {
    Fp8 {
        /// `weight_block_size` as [rows, cols]; None means one scale per tensor.
        block: Option<[usize; 2]>,
        not_convert: Vec<StartPattern>,
    },
    Packed {
        groups: Vec<PackedGroup>,
        ignore: Vec<Target>,
    },
}

/// A module-name regex with Python's `re.match` semantics (anchored at the start), compiled
/// once when the config is parsed: it is matched against every linear module at load.
#[derive(Clone, Debug)]
pub struct StartPattern {
    source: String,
    re: fancy_regex::Regex,
}

impl StartPattern {
    fn new(source: &str) -> Result<StartPattern> {
        let re = fancy_regex::Regex::new(&format!("^(?:{source})")).map_err(|e| anyhow!("bad pattern '{source}': {e}"))?;
        Ok(StartPattern { source: source.to_string(), re })
    }

    fn matches(&self, name: &str) -> bool {
        self.re.is_match(name).unwrap_or(false)
    }
}

impl PartialEq for StartPattern {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source
    }
}

/// A compressed-tensors target: `re:` patterns match from the start of the module name, other
/// targets are an exact module name or the class name `Linear` (every module we look up is a
/// linear layer).
#[derive(Clone, Debug, PartialEq)]
pub enum Target {
    Regex(StartPattern),
    Name(String),
}

impl Target {
    fn parse(t: &str) -> Result<Target> {
        Ok(match t.strip_prefix("re:") {
            Some(re) => Target::Regex(StartPattern::new(re)?),
            None => Target::Name(t.to_string()),
        })
    }

    fn matches(&self, module: &str) -> bool {
        match self {
            Target::Regex(p) => p.matches(module),
            Target::Name(n) => n == module || n == "Linear",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct PackedGroup {
    pub name: String,
    pub targets: Vec<Target>,
    pub bits: u32,
    /// Columns per scale; None for the `channel` strategy (one scale per row).
    pub group_size: Option<usize>,
    pub symmetric: bool,
}

/// What the config says a module should be stored as.
#[derive(Clone, Debug, PartialEq)]
pub enum Expected {
    Plain,
    Fp8 { block: Option<[usize; 2]> },
    Packed { bits: u32, group_size: Option<usize>, symmetric: bool },
}

impl QuantConfig {
    /// Parses `field` of config.json (absent or null means unquantized).
    pub fn parse_field(o: &Map<String, Value>, field: &str) -> Result<Option<QuantConfig>> {
        let Some(v) = o.get(field).filter(|v| !v.is_null()) else { return Ok(None) };
        let q = v.as_object().ok_or_else(|| anyhow!("field '{field}' must be an object"))?;
        let method = q
            .get("quant_method")
            .and_then(Value::as_str)
            .ok_or_else(|| anyhow!("field '{field}.quant_method' is missing"))?;
        match method {
            "fp8" => {
                if let Some(fmt) = q.get("fmt").and_then(Value::as_str) {
                    if fmt != "e4m3" {
                        bail!("field '{field}.fmt': '{fmt}' is not supported (expected 'e4m3')");
                    }
                }
                let block = match q.get("weight_block_size").filter(|v| !v.is_null()) {
                    None => None,
                    Some(b) => {
                        let dims: Option<Vec<usize>> = b.as_array().map(|a| {
                            a.iter().filter_map(|x| x.as_u64().filter(|&x| x > 0).map(|x| x as usize)).collect()
                        });
                        match dims {
                            Some(d) if d.len() == 2 => Some([d[0], d[1]]),
                            _ => bail!("field '{field}.weight_block_size' must be two positive integers, found {b}"),
                        }
                    }
                };
                let not_convert = string_list(q, field, "modules_to_not_convert")?
                    .iter()
                    .map(|p| StartPattern::new(p).map_err(|e| anyhow!("field '{field}.modules_to_not_convert': {e}")))
                    .collect::<Result<_>>()?;
                Ok(Some(QuantConfig::Fp8 { block, not_convert }))
            }
            "compressed-tensors" => {
                let fmt = q.get("format").and_then(Value::as_str).unwrap_or("pack-quantized");
                let groups_v = q
                    .get("config_groups")
                    .and_then(Value::as_object)
                    .ok_or_else(|| anyhow!("field '{field}.config_groups' is missing"))?;
                let mut groups = Vec::new();
                for (name, g) in groups_v {
                    let at = |k: &str| format!("{field}.config_groups.{name}.{k}");
                    let gfmt = g.get("format").and_then(Value::as_str).unwrap_or(fmt);
                    if gfmt != "pack-quantized" {
                        bail!("field '{}': format '{gfmt}' is not supported (expected 'pack-quantized')", at("format"));
                    }
                    let w = g
                        .get("weights")
                        .and_then(Value::as_object)
                        .ok_or_else(|| anyhow!("field '{}' is missing", at("weights")))?;
                    if let Some(a) = g.get("input_activations").filter(|v| !v.is_null()) {
                        bail!("field '{}': activation quantization is not supported, found {a}", at("input_activations"));
                    }
                    let bits = w.get("num_bits").and_then(Value::as_u64).unwrap_or(0) as u32;
                    if ![2, 4, 8].contains(&bits) {
                        bail!("field '{}': {bits} bits is not supported (expected 4 or 8)", at("weights.num_bits"));
                    }
                    let ty = w.get("type").and_then(Value::as_str).unwrap_or("int");
                    if ty != "int" {
                        bail!("field '{}': type '{ty}' is not supported (expected 'int')", at("weights.type"));
                    }
                    let strategy = w.get("strategy").and_then(Value::as_str).unwrap_or("group");
                    let group_size = match strategy {
                        "group" => Some(
                            w.get("group_size")
                                .and_then(Value::as_u64)
                                .filter(|&g| g > 0)
                                .ok_or_else(|| anyhow!("field '{}' must be a positive integer", at("weights.group_size")))?
                                as usize,
                        ),
                        "channel" => None,
                        other => bail!("field '{}': strategy '{other}' is not supported (expected 'group' or 'channel')", at("weights.strategy")),
                    };
                    if w.get("actorder").is_some_and(|a| !a.is_null() && a.as_str() != Some("static")) {
                        bail!("field '{}': activation ordering (g_idx) is not supported", at("weights.actorder"));
                    }
                    let symmetric = w.get("symmetric").and_then(Value::as_bool).unwrap_or(true);
                    let targets = string_list(g.as_object().unwrap_or(&Map::new()), &format!("{field}.config_groups.{name}"), "targets")?
                        .iter()
                        .map(|t| Target::parse(t).map_err(|e| anyhow!("field '{}': {e}", at("targets"))))
                        .collect::<Result<_>>()?;
                    groups.push(PackedGroup { name: name.clone(), targets, bits, group_size, symmetric });
                }
                let ignore = string_list(q, field, "ignore")?
                    .iter()
                    .map(|t| Target::parse(t).map_err(|e| anyhow!("field '{field}.ignore': {e}")))
                    .collect::<Result<_>>()?;
                Ok(Some(QuantConfig::Packed { groups, ignore }))
            }
            other => bail!("field '{field}.quant_method': '{other}' is not supported (expected 'fp8' or 'compressed-tensors')"),
        }
    }

    /// The precision the config assigns to the linear module `module` (e.g.
    /// `model.layers.3.mlp.experts.7.up_proj`).
    pub fn expected(&self, module: &str) -> Expected {
        match self {
            QuantConfig::Fp8 { block, not_convert } => {
                // transformers' `should_convert_module`: a pattern skips a module when it matches
                // the start of its name (as a regex) or the name ends with it.
                if not_convert.iter().any(|p| p.matches(module) || module.ends_with(&p.source)) {
                    Expected::Plain
                } else {
                    Expected::Fp8 { block: *block }
                }
            }
            QuantConfig::Packed { groups, ignore } => {
                if ignore.iter().any(|t| t.matches(module)) {
                    return Expected::Plain;
                }
                groups
                    .iter()
                    .find(|g| g.targets.iter().any(|t| t.matches(module)))
                    .map_or(Expected::Plain, |g| Expected::Packed {
                        bits: g.bits,
                        group_size: g.group_size,
                        symmetric: g.symmetric,
                    })
            }
        }
    }

    pub fn describe(&self) -> String {
        match self {
            QuantConfig::Fp8 { block: Some(b), .. } => format!("fp8 e4m3, {}x{} blocks", b[0], b[1]),
            QuantConfig::Fp8 { block: None, .. } => "fp8 e4m3, per-tensor".into(),
            QuantConfig::Packed { groups, .. } => groups
                .iter()
                .map(|g| {
                    let gs = g.group_size.map_or("channel".to_string(), |s| format!("g{s}"));
                    format!("int{} {gs} {}", g.bits, if g.symmetric { "sym" } else { "asym" })
                })
                .collect::<Vec<_>>()
                .join(", "),
        }
    }
}

fn string_list(o: &Map<String, Value>, field: &str, key: &str) -> Result<Vec<String>> {
    match o.get(key).filter(|v| !v.is_null()) {
        None => Ok(vec![]),
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| x.as_str().map(str::to_string).ok_or_else(|| anyhow!("field '{field}.{key}' must be a list of strings")))
            .collect(),
        Some(_) => bail!("field '{field}.{key}' must be a list of strings"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(v: Value) -> QuantConfig {
        let mut o = Map::new();
        o.insert("quantization_config".into(), v);
        QuantConfig::parse_field(&o, "quantization_config").unwrap().unwrap()
    }

    #[test]
    fn compressed_tensors_targets_and_ignore() {
        let q = parse(serde_json::json!({
            "quant_method": "compressed-tensors", "format": "pack-quantized",
            "config_groups": {
                "group_0": {"targets": ["re:.*mlp\\.experts\\..*"], "weights": {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 32, "symmetric": false}},
                "group_1": {"targets": ["Linear"], "weights": {"num_bits": 8, "type": "int", "strategy": "group", "group_size": 64, "symmetric": true}}
            },
            "ignore": ["lm_head", "re:.*mlp\\.gate$", "re:model\\.layers\\.0\\..*"]
        }));
        assert_eq!(q.expected("model.layers.3.mlp.experts.7.up_proj"), Expected::Packed { bits: 4, group_size: Some(32), symmetric: false });
        assert_eq!(q.expected("model.layers.3.self_attn.o_proj"), Expected::Packed { bits: 8, group_size: Some(64), symmetric: true });
        assert_eq!(q.expected("lm_head"), Expected::Plain);
        assert_eq!(q.expected("model.layers.3.mlp.gate"), Expected::Plain);
        assert_eq!(q.expected("model.layers.0.self_attn.o_proj"), Expected::Plain);
    }

    #[test]
    fn fp8_modules_to_not_convert() {
        let q = parse(serde_json::json!({
            "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
            "weight_block_size": [128, 128], "modules_to_not_convert": ["lm_head", "model.layers.0", "weights_proj"]
        }));
        assert_eq!(q.expected("lm_head"), Expected::Plain);
        assert_eq!(q.expected("model.layers.0.self_attn.q_a_proj"), Expected::Plain);
        assert_eq!(q.expected("model.layers.5.self_attn.indexer.weights_proj"), Expected::Plain);
        assert_eq!(q.expected("model.layers.5.self_attn.q_a_proj"), Expected::Fp8 { block: Some([128, 128]) });
    }

    #[test]
    fn unsupported_method_is_named() {
        let mut o = Map::new();
        o.insert("quantization_config".into(), serde_json::json!({"quant_method": "awq"}));
        let e = QuantConfig::parse_field(&o, "quantization_config").unwrap_err().to_string();
        assert!(e.contains("quantization_config.quant_method"), "{e}");
    }
}
