//! Reading and writing the safetensors container: an 8-byte little-endian header length, a JSON
//! header naming each tensor's dtype, shape and byte range, then the raw data.
//!
//! Files are memory-mapped read-only; a tensor is a view into the mapping. Every header field is
//! validated up front, so a truncated shard or a bad header is an error that names the file and
//! the tensor, never a panic later.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use memmap2::Mmap;

/// Element types found in GLM-5.x checkpoints.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    BF16,
    F8E4M3,
    /// Power-of-two scale exponents (UE8M0).
    F8E8M0,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
}

impl DType {
    pub fn parse(s: &str) -> Option<DType> {
        Some(match s {
            "F32" => DType::F32,
            "F16" => DType::F16,
            "BF16" => DType::BF16,
            "F8_E4M3" => DType::F8E4M3,
            "F8_E8M0" => DType::F8E8M0,
            "I64" => DType::I64,
            "I32" => DType::I32,
            "I16" => DType::I16,
            "I8" => DType::I8,
            "U8" => DType::U8,
            "BOOL" => DType::Bool,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::F8E4M3 => "F8_E4M3",
            DType::F8E8M0 => "F8_E8M0",
            DType::I64 => "I64",
            DType::I32 => "I32",
            DType::I16 => "I16",
            DType::I8 => "I8",
            DType::U8 => "U8",
            DType::Bool => "BOOL",
        }
    }

    pub fn size(self) -> usize {
        match self {
            DType::F32 | DType::I32 => 4,
            DType::F16 | DType::BF16 | DType::I16 => 2,
            DType::F8E4M3 | DType::F8E8M0 | DType::I8 | DType::U8 | DType::Bool => 1,
            DType::I64 => 8,
        }
    }

    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F16 | DType::BF16)
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Bytes a tensor view points into: a mapped file, or memory built in-process.
pub type Storage = Arc<dyn AsRef<[u8]> + Send + Sync>;

/// One tensor inside a mapped file: where its bytes are and what they mean.
#[derive(Clone)]
pub struct TensorView {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    map: Storage,
    start: usize,
    len: usize,
    pub file: Arc<PathBuf>,
}

impl fmt::Debug for TensorView {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}{:?}", self.name, self.dtype, self.shape)
    }
}

impl TensorView {
    /// A view of tensor data held in memory (weights made in-process, for tests and benches).
    pub fn in_memory(name: &str, t: OwnedTensor) -> TensorView {
        let len = t.data.len();
        TensorView {
            name: name.to_string(),
            dtype: t.dtype,
            shape: t.shape,
            map: Arc::new(t.data),
            start: 0,
            len,
            file: Arc::new(PathBuf::from("<memory>")),
        }
    }

    pub fn bytes(&self) -> &[u8] {
        &(*self.map).as_ref()[self.start..self.start + self.len]
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn nbytes(&self) -> usize {
        self.len
    }

    /// Every element converted to f32 (floating types only).
    pub fn to_f32(&self) -> Result<Vec<f32>> {
        let mut out = vec![0f32; self.numel()];
        decode_f32(self.dtype, self.bytes(), &mut out)
            .with_context(|| format!("tensor '{}' in {}", self.name, self.file.display()))?;
        Ok(out)
    }

    /// Every element converted to i64 (integer types only).
    pub fn to_i64(&self) -> Result<Vec<i64>> {
        let b = self.bytes();
        Ok(match self.dtype {
            DType::I64 => b.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect(),
            DType::I32 => b.chunks_exact(4).map(|c| i32::from_le_bytes(c.try_into().unwrap()) as i64).collect(),
            DType::I16 => b.chunks_exact(2).map(|c| i16::from_le_bytes(c.try_into().unwrap()) as i64).collect(),
            DType::I8 => b.iter().map(|&v| v as i8 as i64).collect(),
            DType::U8 => b.iter().map(|&v| v as i64).collect(),
            other => bail!("tensor '{}' in {}: expected an integer dtype, found {other}", self.name, self.file.display()),
        })
    }
}

/// Converts a run of little-endian floating-point elements to f32.
pub fn decode_f32(dtype: DType, bytes: &[u8], out: &mut [f32]) -> Result<()> {
    match dtype {
        DType::F32 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        DType::BF16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16);
            }
        }
        DType::F16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
            }
        }
        DType::F8E4M3 => {
            let lut = super::fp8::e4m3_table();
            for (o, &b) in out.iter_mut().zip(bytes) {
                *o = lut[b as usize];
            }
        }
        other => bail!("expected a floating-point dtype, found {other}"),
    }
    Ok(())
}

/// A memory-mapped safetensors file with its validated header.
pub struct SafetensorsFile {
    pub path: Arc<PathBuf>,
    map: Storage,
    pub tensors: BTreeMap<String, (DType, Vec<usize>, usize, usize)>,
    pub metadata: BTreeMap<String, String>,
}

impl SafetensorsFile {
    pub fn open(path: &Path) -> Result<SafetensorsFile> {
        let file = File::open(path).with_context(|| format!("cannot open shard {}", path.display()))?;
        let file_len = file.metadata().with_context(|| format!("cannot stat {}", path.display()))?.len() as usize;
        // Safety: the mapping is read-only; checkpoints are not modified while served.
        let map = unsafe { Mmap::map(&file) }.with_context(|| format!("cannot map {}", path.display()))?;
        let path = Arc::new(path.to_path_buf());
        let p = path.display();
        if file_len < 8 {
            bail!("shard {p} is truncated: {file_len} bytes, too short for a safetensors header");
        }
        let header_len = u64::from_le_bytes(map[..8].try_into().unwrap());
        if header_len > (file_len - 8) as u64 {
            bail!("shard {p} is truncated or corrupt: header claims {header_len} bytes, file has {}", file_len - 8);
        }
        let header_len = header_len as usize;
        let header: serde_json::Value = serde_json::from_slice(&map[8..8 + header_len])
            .with_context(|| format!("shard {p} has a bad safetensors header (not valid JSON)"))?;
        let obj = header
            .as_object()
            .ok_or_else(|| anyhow::anyhow!("shard {p} has a bad safetensors header: not a JSON object"))?;
        let data_start = 8 + header_len;
        let data_len = file_len - data_start;
        let mut tensors = BTreeMap::new();
        let mut metadata = BTreeMap::new();
        for (name, entry) in obj {
            if name == "__metadata__" {
                if let Some(m) = entry.as_object() {
                    for (k, v) in m {
                        metadata.insert(k.clone(), v.as_str().unwrap_or_default().to_string());
                    }
                }
                continue;
            }
            let bad = |what: &str| anyhow::anyhow!("shard {p}: tensor '{name}' has a bad header entry: {what}");
            let dtype_s = entry.get("dtype").and_then(|d| d.as_str()).ok_or_else(|| bad("no dtype"))?;
            let dtype = DType::parse(dtype_s).ok_or_else(|| bad(&format!("unsupported dtype {dtype_s}")))?;
            let shape: Vec<usize> = entry
                .get("shape")
                .and_then(|s| s.as_array())
                .ok_or_else(|| bad("no shape"))?
                .iter()
                .map(|d| d.as_u64().map(|d| d as usize))
                .collect::<Option<_>>()
                .ok_or_else(|| bad("shape is not a list of non-negative integers"))?;
            let offs = entry
                .get("data_offsets")
                .and_then(|s| s.as_array())
                .filter(|a| a.len() == 2)
                .ok_or_else(|| bad("no data_offsets pair"))?;
            let (begin, end) = match (offs[0].as_u64(), offs[1].as_u64()) {
                (Some(b), Some(e)) if b <= e => (b as usize, e as usize),
                _ => return Err(bad("data_offsets are not an ordered pair of integers")),
            };
            let numel = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).ok_or_else(|| bad("shape overflows"))?;
            if numel * dtype.size() != end - begin {
                return Err(bad(&format!(
                    "{} bytes for shape {:?} of {dtype}, expected {}",
                    end - begin,
                    shape,
                    numel * dtype.size()
                )));
            }
            if end > data_len {
                bail!(
                    "shard {p} is truncated: tensor '{name}' needs data bytes {begin}..{end}, the file holds {data_len}"
                );
            }
            tensors.insert(name.clone(), (dtype, shape, data_start + begin, end - begin));
        }
        Ok(SafetensorsFile { path, map: Arc::new(map) as Storage, tensors, metadata })
    }

    pub fn view(&self, name: &str) -> Option<TensorView> {
        self.tensors.get(name).map(|(dtype, shape, start, len)| TensorView {
            name: name.to_string(),
            dtype: *dtype,
            shape: shape.clone(),
            map: self.map.clone(),
            start: *start,
            len: *len,
            file: self.path.clone(),
        })
    }
}

/// A tensor to be written: raw little-endian bytes plus its description.
pub struct OwnedTensor {
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

impl OwnedTensor {
    pub fn f32(shape: &[usize], values: &[f32]) -> OwnedTensor {
        assert_eq!(shape.iter().product::<usize>(), values.len());
        let data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        OwnedTensor { dtype: DType::F32, shape: shape.to_vec(), data }
    }

    pub fn bf16(shape: &[usize], values: &[f32]) -> OwnedTensor {
        assert_eq!(shape.iter().product::<usize>(), values.len());
        let data = values.iter().flat_map(|v| half::bf16::from_f32(*v).to_bits().to_le_bytes()).collect();
        OwnedTensor { dtype: DType::BF16, shape: shape.to_vec(), data }
    }

    pub fn i32(shape: &[usize], values: &[i32]) -> OwnedTensor {
        assert_eq!(shape.iter().product::<usize>(), values.len());
        let data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        OwnedTensor { dtype: DType::I32, shape: shape.to_vec(), data }
    }

    pub fn i64(shape: &[usize], values: &[i64]) -> OwnedTensor {
        let data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        OwnedTensor { dtype: DType::I64, shape: shape.to_vec(), data }
    }
}

/// Writes tensors (sorted by name) as one safetensors file.
pub fn write_file(path: &Path, tensors: &BTreeMap<String, OwnedTensor>) -> Result<()> {
    let mut header = serde_json::Map::new();
    let mut meta = serde_json::Map::new();
    meta.insert("format".into(), "pt".into());
    header.insert("__metadata__".into(), serde_json::Value::Object(meta));
    let mut offset = 0usize;
    for (name, t) in tensors {
        let end = offset + t.data.len();
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": t.dtype.name(), "shape": t.shape, "data_offsets": [offset, end]}),
        );
        offset = end;
    }
    let mut header_bytes = serde_json::to_vec(&serde_json::Value::Object(header))?;
    // Pad the header with spaces so the data section starts 8-byte aligned, as the reference writer does.
    while (header_bytes.len() + 8) % 8 != 0 {
        header_bytes.push(b' ');
    }
    let mut f = std::io::BufWriter::new(File::create(path).with_context(|| format!("cannot create {}", path.display()))?);
    f.write_all(&(header_bytes.len() as u64).to_le_bytes())?;
    f.write_all(&header_bytes)?;
    for t in tensors.values() {
        f.write_all(&t.data)?;
    }
    f.flush().with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}
