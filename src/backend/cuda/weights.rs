//! Weights on the GPU, in checkpoint precision: the raw weight bytes, scales (integer group
//! scales as f16 when exact, else f32) and int8 zero points, described to kernels by a
//! [`WDesc`].

use anyhow::{bail, Result};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DeviceRepr};

use super::linear::MmaVariant;
use crate::checkpoint::safetensors::DType;
use crate::checkpoint::{Format, LinearWeight};

/// Weight formats the kernels know (`FMT_*` in kernels/linear.cu).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Fmt {
    F32,
    Bf16,
    F16,
    Fp8,
    Int4,
    Int8,
}

impl Fmt {
    /// Suffix of the kernel entry points (`gemv_bf16`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Fmt::F32 => "f32",
            Fmt::Bf16 => "bf16",
            Fmt::F16 => "f16",
            Fmt::Fp8 => "fp8",
            Fmt::Int4 => "int4",
            Fmt::Int8 => "int8",
        }
    }

    /// Elements per 16-byte unit.
    pub fn unit(self) -> usize {
        match self {
            Fmt::F32 => 4,
            Fmt::Bf16 | Fmt::F16 => 8,
            Fmt::Fp8 | Fmt::Int8 => 16,
            Fmt::Int4 => 32,
        }
    }
}

/// Mirrors `struct WDesc` in kernels/common.cuh.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct WDesc {
    pub w: u64,
    pub scale: u64,
    pub scale16: u64,
    pub zero: u64,
    pub scale_zero16: u64,
    pub rows: i32,
    pub cols: i32,
    pub br: i32,
    pub bc: i32,
    pub group: i32,
    pub sc: i32,
    pub vec: i32,
    pub mma: i32,
    pub interleaved: i32,
    pub scale_exp: i32,
}

unsafe impl DeviceRepr for WDesc {}

/// One weight matrix on the device.
pub struct CudaLinear {
    pub module: String,
    pub fmt: Fmt,
    pub rows: usize,
    pub cols: usize,
    bufs: DeviceBuffers,
    pub desc: WDesc,
}

/// The device memory a `CudaLinear`'s descriptor points into.
struct DeviceBuffers {
    w: CudaSlice<u8>,
    scale: Option<CudaSlice<f32>>,
    scale16: Option<CudaSlice<u16>>,
    zero: Option<CudaSlice<i8>>,
    scale_zero16: Option<CudaSlice<u16>>,
}

impl DeviceBuffers {
    /// `desc` with its pointers at these buffers.
    fn describe(&self, desc: WDesc, stream: &std::sync::Arc<CudaStream>) -> WDesc {
        fn ptr<T>(b: &Option<CudaSlice<T>>, stream: &std::sync::Arc<CudaStream>) -> u64 {
            b.as_ref().map_or(0, |s| s.device_ptr(stream).0)
        }
        WDesc {
            w: self.w.device_ptr(stream).0,
            scale: ptr(&self.scale, stream),
            scale16: ptr(&self.scale16, stream),
            zero: ptr(&self.zero, stream),
            scale_zero16: ptr(&self.scale_zero16, stream),
            ..desc
        }
    }

    /// A copy in device memory of its own.
    fn replica(&self, stream: &std::sync::Arc<CudaStream>) -> Result<DeviceBuffers> {
        fn copy<T: DeviceRepr>(b: &Option<CudaSlice<T>>, stream: &std::sync::Arc<CudaStream>) -> Result<Option<CudaSlice<T>>> {
            Ok(b.as_ref().map(|s| stream.clone_dtod(s)).transpose()?)
        }
        Ok(DeviceBuffers {
            w: stream.clone_dtod(&self.w)?,
            scale: copy(&self.scale, stream)?,
            scale16: copy(&self.scale16, stream)?,
            zero: copy(&self.zero, stream)?,
            scale_zero16: copy(&self.scale_zero16, stream)?,
        })
    }
}

/// Host-side form of a weight before upload: raw rows plus per-row scale and zero tables.
struct HostLinear {
    module: String,
    fmt: Fmt,
    rows: usize,
    cols: usize,
    data: Vec<u8>,
    /// fp8: block grid with `br` rows per scale row; int: `[rows, sc]`.
    scale: Vec<f32>,
    zero: Option<Vec<i8>>,
    br: usize,
    bc: usize,
    group: usize,
    sc: usize,
}

impl HostLinear {
    fn from(w: &LinearWeight) -> Result<HostLinear> {
        let (fmt, br, bc, group, sc) = match &w.format {
            Format::Plain => {
                let fmt = match w.data.dtype {
                    DType::F32 => Fmt::F32,
                    DType::BF16 => Fmt::Bf16,
                    DType::F16 => Fmt::F16,
                    d => bail!("{}: dtype {d} has no CUDA kernel", w.module),
                };
                (fmt, 0, 0, 0, 0)
            }
            Format::Fp8 { block, .. } => (Fmt::Fp8, block[0], block[1], 0, w.cols.div_ceil(block[1])),
            Format::Packed { bits: 4, group, .. } => (Fmt::Int4, 0, 0, *group, w.cols.div_ceil(*group)),
            Format::Packed { bits: 8, group, .. } => (Fmt::Int8, 0, 0, *group, w.cols.div_ceil(*group)),
            Format::Packed { bits, .. } => bail!("{}: {bits}-bit weights have no CUDA kernel", w.module),
        };
        let mut h = HostLinear {
            module: w.module.clone(),
            fmt,
            rows: w.rows,
            cols: w.cols,
            data: w.data.bytes().to_vec(),
            scale: w.scale_values(),
            zero: w.zero_points(),
            br,
            bc,
            group,
            sc,
        };
        // The tensor-core kernels take at most one scale group per chunk (128 INT4 columns, 64
        // INT8 ones; kernels/linear_mma.cu): larger groups are spelled out per chunk.
        let chunk = match h.fmt {
            Fmt::Int4 => 128,
            Fmt::Int8 => 64,
            _ => usize::MAX,
        };
        if h.group > chunk && h.mma_ok() {
            let (sc, per) = (h.cols / chunk, h.group / chunk);
            h.scale = regroup(&h.scale, h.sc, sc, per);
            h.zero = h.zero.map(|z| regroup(&z, h.sc, sc, per));
            (h.group, h.sc) = (chunk, sc);
        }
        if fmt == Fmt::Fp8 && h.scale.len() == 1 {
            // A per-tensor scale, spelled out as one block row of 128-column blocks.
            h.br = h.rows;
            h.bc = 128;
            h.sc = h.cols.div_ceil(128);
            h.scale = vec![h.scale[0]; h.sc];
        }
        Ok(h)
    }

    /// Whether rows can be read in 16-byte units.
    fn vec_ok(&self) -> bool {
        let u = self.fmt.unit();
        self.cols.is_multiple_of(u)
            && match self.fmt {
                Fmt::Fp8 => self.bc.is_multiple_of(16),
                Fmt::Int4 => self.group.is_multiple_of(32),
                Fmt::Int8 => self.group.is_multiple_of(16),
                _ => true,
            }
    }

    /// Whether the tensor-core kernels (kernels/linear_mma.cu) can read it: FP8 in 64-column
    /// chunks inside power-of-two scale blocks, INT4 in 128-column chunks with power-of-two
    /// groups of at least 32, and INT8 symmetric with power-of-two groups of at least 64 (49% ->
    /// 89.5% of copy bandwidth at 16384->6144 against the CUDA-core kernel, on H200); both
    /// integer formats read the activation planes, made per 128 columns.
    fn mma_ok(&self) -> bool {
        match self.fmt {
            Fmt::Fp8 => self.cols.is_multiple_of(64) && self.bc.is_multiple_of(64) && (self.bc / 64).is_power_of_two(),
            Fmt::Int4 => self.cols.is_multiple_of(128) && self.group >= 32 && self.group.is_power_of_two(),
            Fmt::Int8 => self.cols.is_multiple_of(128) && self.group >= 64 && self.group.is_power_of_two() && self.zero.is_none(),
            _ => false,
        }
    }

    /// Rows of an FP8 scale grid spelled out per weight row (block height 1).
    fn expand_fp8_rows(&mut self) {
        if self.fmt != Fmt::Fp8 || self.br == 1 {
            return;
        }
        let scale = (0..self.rows).flat_map(|r| self.scale[(r / self.br) * self.sc..(r / self.br + 1) * self.sc].to_vec()).collect();
        self.scale = scale;
        self.br = 1;
    }

    /// Row-concatenation of compatible parts (gate ‖ up), or the parts back when they cannot be
    /// fused. One part is returned as it is (no copy).
    fn stack(mut parts: Vec<HostLinear>) -> std::result::Result<HostLinear, Vec<HostLinear>> {
        if parts.len() == 1 {
            return Ok(parts.remove(0));
        }
        let Some(first) = parts.first() else { return Err(parts) };
        let same = parts.iter().all(|p| p.fmt == first.fmt && p.cols == first.cols && p.bc == first.bc && p.group == first.group);
        if !same {
            return Err(parts);
        }
        if first.fmt == Fmt::Fp8 {
            let br = first.br;
            if parts.iter().any(|p| p.br != br || p.rows % br != 0) {
                parts.iter_mut().for_each(HostLinear::expand_fp8_rows);
            }
        }
        let any_zero = parts.iter().any(|p| p.zero.is_some());
        let mut out = HostLinear {
            module: parts.iter().map(|p| p.module.as_str()).collect::<Vec<_>>().join("+"),
            fmt: parts[0].fmt,
            rows: 0,
            cols: parts[0].cols,
            data: vec![],
            scale: vec![],
            zero: any_zero.then(Vec::new),
            br: parts[0].br,
            bc: parts[0].bc,
            group: parts[0].group,
            sc: parts[0].sc,
        };
        for p in parts {
            out.rows += p.rows;
            out.data.extend(p.data);
            out.scale.extend(p.scale);
            if let Some(z) = out.zero.as_mut() {
                z.extend(p.zero.unwrap_or_else(|| vec![0; p.rows * p.sc]));
            }
        }
        Ok(out)
    }

    /// How the rows are stored for the tensor-core kernels (kernels/linear_mma.cu; `interleaved`
    /// of WDesc): INT4 with groups under 128 in lane order per group (the groups per 128 columns,
    /// int4_word in common.cuh), so each lane reads its four words in one 16-byte load and each
    /// group's activations in whole pieces; INT8 (1) in the planes' order (int8_pos). 0: as stored.
    fn interleave(&self) -> usize {
        match self.fmt {
            Fmt::Int4 if self.group < 128 && self.mma_ok() => 128 / self.group,
            Fmt::Int8 if self.mma_ok() => 1,
            _ => 0,
        }
    }

    fn upload(mut self, stream: &std::sync::Arc<CudaStream>) -> Result<CudaLinear> {
        let vec = self.vec_ok();
        let interleave = self.interleave();
        match self.fmt {
            Fmt::Int4 if interleave > 0 => permute_int4(&mut self.data, interleave),
            Fmt::Int8 if interleave > 0 => interleave_int8(&mut self.data),
            _ => {}
        }
        if self.fmt == Fmt::Int4 {
            // Every nibble n stored as n ^ 8, the signed n − 8 the tensor cores read
            // (int4_unsigned in kernels/common.cuh).
            self.data.iter_mut().for_each(|b| *b ^= 0x88);
        }
        // Integer group scales as f16 when every one is exact so (the checkpoints' bf16 and f16
        // scales), else f32; the tensor-core kernels read only the f16 table.
        let half = match self.fmt {
            Fmt::Int4 | Fmt::Int8 => f16_scales(&self.scale),
            _ => None,
        };
        let (scale, scale16, scale_exp) = match &half {
            Some((bits, exp)) => (None, Some(stream.clone_htod(bits)?), *exp),
            None if self.scale.is_empty() => (None, None, 0),
            None => (Some(stream.clone_htod(&self.scale)?), None, 0),
        };
        let mma = self.mma_ok() && (self.fmt == Fmt::Fp8 || scale16.is_some());
        if self.mma_ok() && !mma {
            tracing::warn!("{}: group scales that f16 cannot hold exactly; this weight takes the slower CUDA-core kernels", self.module);
        }
        // The tensor-core kernels read their weights in 16-row tiles (wbyte in kernels/common.cuh).
        if mma {
            self.data = tile_rows(&self.data, self.rows);
        }
        let w = stream.clone_htod(&self.data)?;
        let zero = match &self.zero {
            Some(z) => Some(stream.clone_htod(z)?),
            None => None,
        };
        // (Kept beside scale16 and zero, which the CUDA-core kernels read for prefill: 4 more
        // bytes a group resident, +6% of group 128's bytes.)
        let scale_zero16 = match (&half, &self.zero) {
            (Some((bits, _)), Some(z)) if mma && self.fmt == Fmt::Int4 && self.group >= 64 => {
                let Some(table) = scale_zero_halves(bits, z, self.rows, self.sc, 128 / self.group) else {
                    bail!("{}: {} scales and {} zero points for {} rows of {} groups", self.module, bits.len(), z.len(), self.rows, self.sc);
                };
                Some(stream.clone_htod(&table)?)
            }
            _ => None,
        };
        let bufs = DeviceBuffers { w, scale, scale16, zero, scale_zero16 };
        let desc = WDesc {
            rows: self.rows as i32,
            cols: self.cols as i32,
            br: self.br as i32,
            bc: self.bc as i32,
            group: self.group as i32,
            sc: self.sc as i32,
            vec: vec as i32,
            mma: mma as i32,
            interleaved: interleave as i32,
            scale_exp,
            ..WDesc::default()
        };
        let desc = bufs.describe(desc, stream);
        Ok(CudaLinear { module: self.module, fmt: self.fmt, rows: self.rows, cols: self.cols, bufs, desc })
    }
}

/// The tensor-core INT4 kernels' scales and zero points side by side (WDesc.scale_zero16, which
/// Int4Tile in kernels/linear_mma.cu reads for one or two groups a chunk): per row and
/// 128-column chunk, its `per_chunk` f16 scale bits (`scales`, [rows, sc]), then its zero points
/// `zero` ([rows, sc]) as the f16 bits of −16·zp, exact for every int8 zero point. None above
/// two groups a chunk (the kernels' chunk scales then fill more than the 8 bytes they hold).
fn scale_zero_halves(scales: &[u16], zero: &[i8], rows: usize, sc: usize, per_chunk: usize) -> Option<Vec<u16>> {
    if per_chunk == 0 || per_chunk > 2 || !sc.is_multiple_of(per_chunk) || scales.len() != rows * sc || zero.len() != rows * sc {
        return None;
    }
    let mut out = Vec::with_capacity(2 * rows * sc);
    for r in 0..rows {
        for q in 0..sc / per_chunk {
            let g = r * sc + q * per_chunk..r * sc + (q + 1) * per_chunk;
            out.extend_from_slice(&scales[g.clone()]);
            out.extend(zero[g].iter().map(|&z| half::f16::from_f32(-16.0 * z as f32).to_bits()));
        }
    }
    Some(out)
}

impl CudaLinear {
    /// A copy of the weight in device memory of its own (its descriptor points at the copy):
    /// benchmarks that stand a few distinct experts for a layer's many still read every
    /// expert from its own memory, as the real layer does, not the same bytes again from L2.
    pub fn replica(&self, stream: &std::sync::Arc<CudaStream>) -> Result<CudaLinear> {
        let bufs = self.bufs.replica(stream)?;
        let desc = bufs.describe(self.desc, stream);
        Ok(CudaLinear { module: self.module.clone(), fmt: self.fmt, rows: self.rows, cols: self.cols, bufs, desc })
    }
}

/// The scales as f16 bits of scale·2^exp, with exp putting the largest |scale| in [2^14, 2^15),
/// when every one converts exactly (16-bit checkpoint scales do unless their range spans more
/// than about 2^29); None otherwise.
fn f16_scales(scales: &[f32]) -> Option<(Vec<u16>, i32)> {
    let max = scales.iter().fold(0f32, |m, s| m.max(s.abs()));
    if !max.is_finite() {
        return None;
    }
    // max = f·2^e with f in [0.5, 1): exp = 15 − e (0 for all-zero scales).
    let exp = if max > 0.0 { 15 - (max.log2().floor() as i32 + 1) } else { 0 };
    if exp.abs() > 126 {
        return None;
    }
    let mul = 2f32.powi(exp);
    let bits: Vec<u16> = scales.iter().map(|&s| half::f16::from_f32(s * mul).to_bits()).collect();
    let exact = bits.iter().zip(scales).all(|(&b, &s)| half::f16::from_bits(b).to_f32() == s * mul);
    exact.then_some((bits, exp))
}

/// The rows of `data` (`rows` of them, each a whole number of 64-byte pieces) in 16-row tiles
/// (`wbyte` in kernels/common.cuh): piece q of tile t's 16 rows at t·16·row + q·1 KB, row j's
/// at 64j within it; the last tile padded with zero rows.
fn tile_rows(data: &[u8], rows: usize) -> Vec<u8> {
    let row = data.len() / rows.max(1);
    let tiles = rows.div_ceil(16);
    let mut out = vec![0u8; tiles * 16 * row];
    for r in 0..rows {
        let (t, j) = (r / 16, r % 16);
        for q in 0..row / 64 {
            let dst = t * 16 * row + q * 1024 + j * 64;
            out[dst..dst + 64].copy_from_slice(&data[r * row + 64 * q..r * row + 64 * q + 64]);
        }
    }
    out
}

/// Rows of `from` group values each spelled out as `to` values, group j of the new row taking
/// group j / `per` of the old one (groups split into `per` equal smaller groups).
fn regroup<T: Copy>(values: &[T], from: usize, to: usize, per: usize) -> Vec<T> {
    values.chunks_exact(from).flat_map(|row| (0..to).map(move |j| row[j / per])).collect()
}

/// The interleaved INT4 layout for `groups` (2 or 4) scale groups per 64-byte piece
/// (`int4_word` in kernels/common.cuh): lane c's word j, stored at 4c + j, is the piece's word
/// s·16/groups + c·4/groups + j % (4/groups) with s = j / (4/groups). Rows are whole pieces
/// (`mma_ok`: 128 columns per 64 bytes), so the pieces of the buffer are those of its rows.
fn permute_int4(data: &mut [u8], groups: usize) {
    let (per, span) = (4 / groups, 16 / groups);
    for piece in data.chunks_exact_mut(64) {
        let src: [u8; 64] = piece.try_into().expect("64-byte piece");
        for (c, j) in (0..4).flat_map(|c| (0..4).map(move |j| (c, j))) {
            let w = (j / per) * span + c * per + j % per;
            piece[16 * c + 4 * j..16 * c + 4 * j + 4].copy_from_slice(&src[4 * w..4 * w + 4]);
        }
    }
}

/// Every 8 INT8 bytes in the order of columns 0 2 4 6 1 3 5 7 and as two's complement (the
/// checkpoint's offset-binary byte ^ 0x80): the interleaved INT8 layout (`int8_pos` in
/// kernels/common.cuh). Rows are whole groups of 8 (`mma_ok`: 128 columns at a time).
fn interleave_int8(data: &mut [u8]) {
    for group in data.chunks_exact_mut(8) {
        let src: [u8; 8] = group.try_into().expect("8-byte group");
        for (k, b) in src.into_iter().enumerate() {
            group[((k & 1) << 2) | ((k >> 1) & 3)] = b ^ 0x80;
        }
    }
}

/// A linear weight: one matrix, or row-stacked parts that could not be fused.
pub struct CudaWeight {
    pub parts: Vec<CudaLinear>,
    pub rows: usize,
    pub cols: usize,
}

pub fn upload_stacked(stream: &std::sync::Arc<CudaStream>, parts: &[LinearWeight]) -> Result<CudaWeight> {
    let cols = crate::backend::stacked_cols(parts)?;
    let host = parts.iter().map(HostLinear::from).collect::<Result<Vec<_>>>()?;
    let rows = parts.iter().map(|p| p.rows).sum();
    let uploaded = match HostLinear::stack(host) {
        Ok(one) => vec![one.upload(stream)?],
        Err(parts) => parts.into_iter().map(|p| p.upload(stream)).collect::<Result<Vec<_>>>()?,
    };
    Ok(CudaWeight { parts: uploaded, rows, cols })
}

/// The routed experts of one MoE layer: fused gate‖up and down matrices, with a device table
/// of their descriptors so kernels pick experts by index without the host.
pub struct CudaExperts {
    pub fmt_gate_up: Fmt,
    pub fmt_down: Fmt,
    pub inter: usize,
    pub hidden: usize,
    pub count: usize,
    /// Every expert can take the tensor-core kernels, all in the same variant: these.
    pub(super) mma: Option<(MmaVariant, MmaVariant)>,
    _weights: Vec<(CudaLinear, CudaLinear)>,
    pub gate_up_table: CudaSlice<WDesc>,
    pub down_table: CudaSlice<WDesc>,
}

impl CudaExperts {
    /// Whether decode steps run these experts on the tensor-core kernels.
    pub fn tensor_cores(&self) -> bool {
        self.mma.is_some()
    }
}

/// Each expert's weights on the device: gate and up stacked, and down.
pub fn upload_expert_weights(stream: &std::sync::Arc<CudaStream>, experts: &[crate::backend::ExpertWeights]) -> Result<Vec<(CudaLinear, CudaLinear)>> {
    let mut weights = Vec::with_capacity(experts.len());
    for e in experts {
        let gu = HostLinear::stack(vec![HostLinear::from(&e.gate)?, HostLinear::from(&e.up)?])
            .map_err(|_| anyhow::anyhow!("{} and {} cannot be fused (different formats)", e.gate.module, e.up.module))?;
        weights.push((gu.upload(stream)?, HostLinear::from(&e.down)?.upload(stream)?));
    }
    Ok(weights)
}

/// The expert set over uploaded `weights` (gate/up stacked, down), expert e being `weights[e]`.
pub fn experts_from(stream: &std::sync::Arc<CudaStream>, weights: Vec<(CudaLinear, CudaLinear)>) -> Result<CudaExperts> {
    let Some((gu0, dn0)) = weights.first() else { bail!("an MoE layer without experts") };
    let (fmt_gate_up, fmt_down) = (gu0.fmt, dn0.fmt);
    if let Some((gu, dn)) = weights.iter().find(|(g, d)| g.fmt != fmt_gate_up || d.fmt != fmt_down) {
        bail!("{} / {}: experts of one layer must share a format", gu.module, dn.module);
    }
    let (inter, hidden) = (gu0.rows / 2, gu0.cols);
    let gate_up_table = stream.clone_htod(&weights.iter().map(|w| w.0.desc).collect::<Vec<_>>())?;
    let down_table = stream.clone_htod(&weights.iter().map(|w| w.1.desc).collect::<Vec<_>>())?;
    let variants = |(g, d): &(CudaLinear, CudaLinear)| Some((MmaVariant::of(g.fmt, &g.desc)?, MmaVariant::of(d.fmt, &d.desc)?));
    let first = variants(&weights[0]);
    let mma = first.filter(|_| weights.iter().all(|w| variants(w) == first));
    Ok(CudaExperts { fmt_gate_up, fmt_down, inter, hidden, count: weights.len(), mma, _weights: weights, gate_up_table, down_table })
}

#[cfg(test)]
mod tests {
    use super::{f16_scales, interleave_int8, permute_int4, regroup, scale_zero_halves, tile_rows};

    #[test]
    fn zero_points_follow_each_chunks_scales() {
        // Two rows of four groups, two groups a chunk: row r, chunk q holds its two scales,
        // then its two zero points as f16 −16·zp.
        let scales: Vec<u16> = (0..8).collect();
        let zero: Vec<i8> = vec![-8, -1, 0, 7, 1, 2, 3, 4];
        let h = |z: f32| half::f16::from_f32(-16.0 * z).to_bits();
        let t = scale_zero_halves(&scales, &zero, 2, 4, 2).unwrap();
        assert_eq!(t, vec![0, 1, h(-8.0), h(-1.0), 2, 3, h(0.0), h(7.0), 4, 5, h(1.0), h(2.0), 6, 7, h(3.0), h(4.0)]);
        // One group a chunk: a scale, then its zero point.
        assert_eq!(scale_zero_halves(&scales[..4], &zero[..4], 1, 4, 1).unwrap()[..4], [0, h(-8.0), 1, h(-1.0)]);
        // Every int8 zero point converts exactly.
        assert!((-128..=127).all(|z: i32| half::f16::from_bits(h(z as f32)).to_f32() == -16.0 * z as f32));
        // Four groups a chunk do not fit the kernels' 8 bytes of scales a chunk.
        assert!(scale_zero_halves(&scales, &zero, 2, 4, 4).is_none());
    }

    #[test]
    fn tiles_hold_each_pieces_sixteen_rows_together() {
        // 20 rows of 128 bytes (two pieces), each byte its row number: two tiles, the second
        // padded.
        let data: Vec<u8> = (0..20u8).flat_map(|r| [r; 128]).collect();
        let out = tile_rows(&data, 20);
        assert_eq!(out.len(), 2 * 16 * 128);
        for (r, q) in (0..20usize).flat_map(|r| (0..2).map(move |q| (r, q))) {
            // wbyte(r, 64q) in kernels/common.cuh.
            let at = (r / 16) * 16 * 128 + q * 1024 + (r % 16) * 64;
            assert!(out[at..at + 64].iter().all(|&b| b as usize == r), "row {r} piece {q}");
        }
        assert!(out[16 * 128 + 4 * 64..16 * 128 + 1024].iter().all(|&b| b == 0), "padding rows are zeros");
    }

    #[test]
    fn sixteen_bit_scales_become_exact_f16_with_an_exponent() {
        // bf16 scales far below f16's normal range: exact after the shift, the largest in [2^14, 2^15).
        let scales: Vec<f32> = [3.0e-6f32, 1.7e-5, 9.1e-6, 0.0, -2.2e-6].iter().map(|&v| half::bf16::from_f32(v).to_f32()).collect();
        let (bits, exp) = f16_scales(&scales).expect("bf16 scales fit");
        let back: Vec<f32> = bits.iter().map(|&b| half::f16::from_bits(b).to_f32() * 2f32.powi(-exp)).collect();
        assert_eq!(back, scales);
        let top = half::f16::from_bits(bits[1]).to_f32();
        assert!((16384.0..32768.0).contains(&top), "largest scale at {top}");
        // f32 scales with more than 11 significant bits stay f32.
        assert!(f16_scales(&[0.1f32, 0.3]).is_none());
        assert!(f16_scales(&[f32::NAN]).is_none());
        // A range wider than f16's (2^-40 beside 1): not exact, so f32.
        assert!(f16_scales(&[1.0, 1.0 + 2f32.powi(-7), 2f32.powi(-40) * 1.5]).is_none());
    }

    #[test]
    fn large_groups_are_spelled_out_per_128_columns() {
        // Two rows of 512 columns in groups of 256 (2 per row) become groups of 128 (4 per row).
        assert_eq!(regroup(&[1, 2, 3, 4], 2, 4, 2), vec![1, 1, 2, 2, 3, 3, 4, 4]);
        // One group wider than the row: every new group takes it.
        assert_eq!(regroup(&[7.5f32, 9.0], 1, 2, 4), vec![7.5, 7.5, 9.0, 9.0]);
    }

    #[test]
    fn int8_groups_take_the_planes_order_as_twos_complement() {
        let mut data: Vec<u8> = (0..16u8).map(|c| 0x80 + c).collect();
        interleave_int8(&mut data);
        // Columns 0 2 4 6 1 3 5 7 of each 8, as q = stored − 128.
        assert_eq!(data, [0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15]);
    }

    #[test]
    fn int4_pieces_take_each_lanes_words_of_a_group_in_order() {
        // Two pieces whose words are numbered 0..32 (each byte holds its word's number).
        let words: Vec<u8> = (0..32u8).flat_map(|w| [w; 4]).collect();
        let stored = |groups| {
            let mut data = words.clone();
            permute_int4(&mut data, groups);
            move |p: usize, c: usize, j: usize| data[64 * p + 16 * c + 4 * j] as usize - 16 * p
        };
        // Groups of 32 (4 per piece): the 4x4 words transposed, lane c's word j is word 4j + c.
        let g32 = stored(4);
        // Groups of 64: lane c's words 2c, 2c + 1 of the first group, then 8 + 2c, 9 + 2c.
        let g64 = stored(2);
        for (p, c, j) in (0..2).flat_map(|p| (0..4).flat_map(move |c| (0..4).map(move |j| (p, c, j)))) {
            assert_eq!(g32(p, c, j), 4 * j + c);
            assert_eq!(g64(p, c, j), [2 * c, 2 * c + 1, 8 + 2 * c, 9 + 2 * c][j]);
        }
    }
}
