//! A GLM-5.x checkpoint directory: `config.json`, safetensors shards (with
//! `model.safetensors.index.json`, or a single `model.safetensors`), memory-mapped.
//!
//! Everything that can be wrong with a checkpoint is reported here, naming the file and tensor:
//! a missing shard or tensor, a wrong shape or dtype, a truncated shard, a bad header.

pub mod config;
pub mod fp8;
pub mod linear;
pub mod quant;
pub mod quantize;
pub mod safetensors;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};

pub use config::ModelConfig;
pub use linear::{Format, LinearWeight};
use quant::{Expected, QuantConfig};
use safetensors::{DType, SafetensorsFile, TensorView};

pub const INDEX_FILE: &str = "model.safetensors.index.json";
pub const SINGLE_FILE: &str = "model.safetensors";

pub struct Checkpoint {
    pub dir: PathBuf,
    pub config: ModelConfig,
    shards: Vec<SafetensorsFile>,
    /// Tensor name → index into `shards`.
    index: HashMap<String, usize>,
    /// Bytes of the weights handed out so far (what a rank actually loads).
    loaded: std::sync::atomic::AtomicUsize,
}

impl Checkpoint {
    pub fn open(dir: &Path) -> Result<Checkpoint> {
        if !dir.is_dir() {
            bail!("model directory {} does not exist", dir.display());
        }
        let config = ModelConfig::load(&dir.join("config.json"))?;
        let index_path = dir.join(INDEX_FILE);
        let mut shards = Vec::new();
        let mut index = HashMap::new();
        if index_path.exists() {
            let text = std::fs::read_to_string(&index_path)
                .with_context(|| format!("cannot read {}", index_path.display()))?;
            let v: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| anyhow!("{}: bad JSON: {e}", index_path.display()))?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| anyhow!("{}: no 'weight_map' object", index_path.display()))?;
            let mut by_file: BTreeMap<String, usize> = BTreeMap::new();
            for (name, file) in map {
                let file = file
                    .as_str()
                    .ok_or_else(|| anyhow!("{}: weight_map['{name}'] is not a file name", index_path.display()))?;
                if file.contains('/') || file.contains("..") {
                    bail!("{}: weight_map['{name}'] names a file outside the checkpoint: {file}", index_path.display());
                }
                let shard = match by_file.get(file) {
                    Some(&i) => i,
                    None => {
                        let path = dir.join(file);
                        if !path.exists() {
                            bail!("shard {} listed in {INDEX_FILE} (for tensor '{name}') does not exist", path.display());
                        }
                        shards.push(SafetensorsFile::open(&path)?);
                        by_file.insert(file.to_string(), shards.len() - 1);
                        shards.len() - 1
                    }
                };
                if !shards[shard].tensors.contains_key(name) {
                    bail!(
                        "tensor '{name}' is listed in {INDEX_FILE} under {file}, but that shard does not contain it",
                    );
                }
                index.insert(name.clone(), shard);
            }
        } else if dir.join(SINGLE_FILE).exists() {
            let f = SafetensorsFile::open(&dir.join(SINGLE_FILE))?;
            for name in f.tensors.keys() {
                index.insert(name.clone(), 0);
            }
            shards.push(f);
        } else {
            bail!("no {INDEX_FILE} or {SINGLE_FILE} in {}", dir.display());
        }
        Ok(Checkpoint { dir: dir.to_path_buf(), config, shards, index, loaded: Default::default() })
    }

    /// Whether the MTP layer's weights are present (configs may announce one that a
    /// conversion dropped).
    pub fn has_mtp_layer(&self) -> bool {
        match self.config.mtp_layer_index() {
            Some(i) => {
                let found = self.index.keys().any(|n| n.starts_with(&format!("model.layers.{i}.eh_proj.")));
                if !found {
                    tracing::warn!("config announces an MTP layer but model.layers.{i}.eh_proj is absent; running without it");
                }
                found
            }
            None => false,
        }
    }

    /// Bytes of weights loaded through [`Checkpoint::linear`] and [`Checkpoint::vector`].
    pub fn loaded_bytes(&self) -> usize {
        self.loaded.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn count(&self, bytes: usize) {
        self.loaded.fetch_add(bytes, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn has(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    pub fn tensor_names(&self) -> impl Iterator<Item = &String> {
        self.index.keys()
    }

    pub fn shard_count(&self) -> usize {
        self.shards.len()
    }

    /// Total bytes of tensor data over all shards.
    pub fn total_bytes(&self) -> usize {
        self.shards.iter().flat_map(|s| s.tensors.values().map(|t| t.3)).sum()
    }

    pub fn tensor(&self, name: &str) -> Result<TensorView> {
        let shard = self
            .index
            .get(name)
            .ok_or_else(|| anyhow!("checkpoint {} is missing tensor '{name}'", self.dir.display()))?;
        Ok(self.shards[*shard].view(name).expect("indexed tensor present"))
    }

    fn tensor_shaped(&self, name: &str, shape: &[usize]) -> Result<TensorView> {
        let t = self.tensor(name)?;
        if t.shape != shape {
            bail!("tensor '{name}' in {} has shape {:?}, expected {shape:?}", t.file.display(), t.shape);
        }
        Ok(t)
    }

    /// A float vector (norm weight, bias) of length `len`, as f32.
    pub fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>> {
        let t = self.tensor_shaped(name, &[len])?;
        if !t.dtype.is_float() {
            bail!("tensor '{name}' in {} has dtype {}, expected a float type", t.file.display(), t.dtype);
        }
        self.count(t.nbytes());
        t.to_f32()
    }

    /// The quantization config that governs `module`: the MTP layer may carry its own.
    fn quant_for(&self, module: &str) -> Option<&QuantConfig> {
        let mtp = self.config.mtp_layer_index().map(|i| format!("model.layers.{i}."));
        match (&mtp, &self.config.mtp_quantization) {
            (Some(prefix), Some(q)) if module.starts_with(prefix.as_str()) => Some(q),
            _ => self.config.quantization.as_ref(),
        }
    }

    /// The precision the config assigns to `module` (for reporting).
    pub fn expected_precision(&self, module: &str) -> Expected {
        self.quant_for(module).map_or(Expected::Plain, |q| q.expected(module))
    }

    /// The weight of linear module `module`, expected to be `[rows, cols]`, in whatever precision
    /// the checkpoint stores it.
    pub fn linear(&self, module: &str, rows: usize, cols: usize) -> Result<LinearWeight> {
        let expected = self.expected_precision(module);
        let packed_name = format!("{module}.weight_packed");
        let weight_name = format!("{module}.weight");
        let format;
        let data;
        if self.has(&packed_name) {
            let (d, f) = self.packed(module, rows, cols, &expected)?;
            data = d;
            format = f;
        } else if self.has(&weight_name) {
            let t = self.tensor_shaped(&weight_name, &[rows, cols])?;
            match t.dtype {
                DType::F8E4M3 => {
                    format = self.fp8_scale(module, rows, cols, &expected)?;
                }
                d if d.is_float() => format = Format::Plain,
                d => bail!(
                    "tensor '{weight_name}' in {} has dtype {d}, expected BF16, F16, F32 or F8_E4M3",
                    t.file.display()
                ),
            }
            data = t;
        } else {
            let what = match expected {
                Expected::Packed { .. } => packed_name,
                _ => weight_name,
            };
            bail!("checkpoint {} is missing tensor '{what}'", self.dir.display());
        }
        let w = LinearWeight { module: module.to_string(), rows, cols, data, format };
        self.count(w.nbytes());
        let found_kind = match w.format {
            Format::Plain => "plain",
            Format::Fp8 { .. } => "fp8",
            Format::Packed { .. } => "packed",
        };
        let expected_kind = match expected {
            Expected::Plain => "plain",
            Expected::Fp8 { .. } => "fp8",
            Expected::Packed { .. } => "packed",
        };
        if found_kind != expected_kind {
            tracing::debug!("{module}: config expects {expected_kind}, checkpoint stores {}", w.precision());
        }
        Ok(w)
    }

    fn fp8_scale(&self, module: &str, rows: usize, cols: usize, expected: &Expected) -> Result<Format> {
        let name = [format!("{module}.weight_scale_inv"), format!("{module}.weight_scale")]
            .into_iter()
            .find(|n| self.has(n))
            .ok_or_else(|| {
                anyhow!("checkpoint {} is missing tensor '{module}.weight_scale_inv' (the FP8 weight's block scales)", self.dir.display())
            })?;
        let scale = self.tensor(&name)?;
        linear::check_scale_dtype(&scale)?;
        if scale.numel() == 1 {
            return Ok(Format::Fp8 { scale, block: [rows, cols] });
        }
        let block = match expected {
            Expected::Fp8 { block: Some(b) } => *b,
            _ => [128, 128],
        };
        let want = [rows.div_ceil(block[0]), cols.div_ceil(block[1])];
        if scale.shape != want {
            bail!(
                "tensor '{name}' in {} has shape {:?}, expected {want:?} for {}x{} blocks over [{rows}, {cols}]",
                scale.file.display(),
                scale.shape,
                block[0],
                block[1]
            );
        }
        Ok(Format::Fp8 { scale, block })
    }

    fn packed(&self, module: &str, rows: usize, cols: usize, expected: &Expected) -> Result<(TensorView, Format)> {
        let packed = self.tensor(&format!("{module}.weight_packed"))?;
        let file = packed.file.clone();
        if packed.dtype != DType::I32 || packed.shape.len() != 2 || packed.shape[0] != rows {
            bail!(
                "tensor '{}' in {} is {} {:?}, expected I32 [{rows}, words]",
                packed.name,
                file.display(),
                packed.dtype,
                packed.shape
            );
        }
        if let Ok(shape_t) = self.tensor(&format!("{module}.weight_shape")) {
            let shape = shape_t.to_i64()?;
            if shape != [rows as i64, cols as i64] {
                bail!("tensor '{}' in {} says {shape:?}, expected [{rows}, {cols}]", shape_t.name, shape_t.file.display());
            }
        }
        let words = packed.shape[1];
        let (bits, group_cfg, symmetric) = match expected {
            Expected::Packed { bits, group_size, symmetric } => (*bits, *group_size, Some(*symmetric)),
            _ => {
                let bits = (words * 32 / cols) as u32;
                if ![2, 4, 8].contains(&bits) {
                    bail!("tensor '{}' in {}: cannot infer the bit width from {words} words for {cols} columns", packed.name, file.display());
                }
                (bits, None, None)
            }
        };
        if words != (cols * bits as usize).div_ceil(32) {
            bail!(
                "tensor '{}' in {} has {words} words per row, expected {} for {cols} columns of {bits} bits",
                packed.name,
                file.display(),
                (cols * bits as usize).div_ceil(32)
            );
        }
        let scale = self.tensor(&format!("{module}.weight_scale"))?;
        linear::check_scale_dtype(&scale)?;
        if scale.shape.len() != 2 || scale.shape[0] != rows {
            bail!("tensor '{}' in {} has shape {:?}, expected [{rows}, groups]", scale.name, scale.file.display(), scale.shape);
        }
        let groups = scale.shape[1];
        let group = group_cfg.unwrap_or_else(|| cols.div_ceil(groups.max(1)));
        if groups == 0 || cols.div_ceil(group) != groups {
            bail!(
                "tensor '{}' in {} has {groups} groups per row, expected {} for group size {group} over {cols} columns",
                scale.name,
                scale.file.display(),
                cols.div_ceil(group)
            );
        }
        let zero_name = format!("{module}.weight_zero_point");
        let zero = if self.has(&zero_name) {
            let z = self.tensor(&zero_name)?;
            let want = [(rows * bits as usize).div_ceil(32), groups];
            if z.dtype != DType::I32 || z.shape != want {
                bail!(
                    "tensor '{zero_name}' in {} is {} {:?}, expected I32 {want:?} (zero points packed along rows)",
                    z.file.display(),
                    z.dtype,
                    z.shape
                );
            }
            Some(z)
        } else {
            if symmetric == Some(false) {
                bail!("checkpoint {} is missing tensor '{zero_name}' (asymmetric quantization)", self.dir.display());
            }
            None
        };
        Ok((packed, Format::Packed { bits, group, scale, zero }))
    }
}
