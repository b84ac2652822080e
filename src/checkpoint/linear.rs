//! A linear layer's weight `W [rows = out, cols = in]` in its on-disk precision, and the exact
//! dequantization of any run of its rows to f32.
//!
//! Formats:
//! - plain F32 / BF16 / F16;
//! - FP8 e4m3 with block scales: `W[r,c] = f8[r,c] · S[r / bo, c / bi]` (`weight_scale_inv` is the
//!   multiplying scale despite its name; partial blocks use a ceil-div grid);
//! - compressed-tensors `pack-quantized` INT4/INT8: element c of row r lives at bit `c·bits` of the
//!   row's int32 words, stored offset-binary (`q + 2^(bits-1)`); `W = (q − zp) · scale[r, c / g]`, with
//!   zero points (asymmetric only) packed the same way along rows.
//!
//! The products are formed in f32, where they are exact for INT4/INT8 with 16-bit scales.

use std::fmt;

use anyhow::{bail, Result};

use super::safetensors::{decode_f32, DType, TensorView};

#[derive(Clone)]
pub enum Format {
    Plain,
    Fp8 {
        scale: TensorView,
        /// Rows and columns covered by one scale.
        block: [usize; 2],
    },
    Packed {
        bits: u32,
        group: usize,
        scale: TensorView,
        zero: Option<TensorView>,
    },
}

/// A linear weight that stays in its checkpoint precision (memory-mapped).
#[derive(Clone)]
pub struct LinearWeight {
    /// Module name, e.g. `model.layers.3.self_attn.q_b_proj`.
    pub module: String,
    pub rows: usize,
    pub cols: usize,
    pub data: TensorView,
    pub format: Format,
}

impl fmt::Debug for LinearWeight {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} [{}, {}] {}", self.module, self.rows, self.cols, self.precision())
    }
}

/// Decodes a scale tensor element (F32, BF16, F16 or UE8M0 exponents).
fn scale_at(scale: &TensorView, idx: usize) -> f32 {
    let b = scale.bytes();
    match scale.dtype {
        DType::F32 => f32::from_le_bytes(b[4 * idx..4 * idx + 4].try_into().unwrap()),
        DType::BF16 => f32::from_bits((u16::from_le_bytes([b[2 * idx], b[2 * idx + 1]]) as u32) << 16),
        DType::F16 => half::f16::from_bits(u16::from_le_bytes([b[2 * idx], b[2 * idx + 1]])).to_f32(),
        // UE8M0: a bare power-of-two exponent with bias 127.
        DType::F8E8M0 => 2f32.powi(b[idx] as i32 - 127),
        _ => f32::NAN,
    }
}

fn i32_at(t: &TensorView, idx: usize) -> u32 {
    let b = t.bytes();
    u32::from_le_bytes(b[4 * idx..4 * idx + 4].try_into().unwrap())
}

impl LinearWeight {
    /// Short precision label, e.g. `bf16`, `fp8-128x128`, `int4-g32-asym`.
    pub fn precision(&self) -> String {
        match &self.format {
            Format::Plain => self.data.dtype.name().to_lowercase(),
            Format::Fp8 { block, .. } if *block == [self.rows, self.cols] => "fp8-tensor".into(),
            Format::Fp8 { block, .. } => format!("fp8-{}x{}", block[0], block[1]),
            Format::Packed { bits, group, zero, .. } => {
                format!("int{bits}-g{group}-{}", if zero.is_some() { "asym" } else { "sym" })
            }
        }
    }

    /// Bytes the weight occupies on disk, scales and zero points included.
    pub fn nbytes(&self) -> usize {
        self.data.nbytes()
            + match &self.format {
                Format::Plain => 0,
                Format::Fp8 { scale, .. } => scale.nbytes(),
                Format::Packed { scale, zero, .. } => scale.nbytes() + zero.as_ref().map_or(0, |z| z.nbytes()),
            }
    }

    /// Writes rows `r0 .. r0 + n` as f32 into `out` (`n * cols` values).
    pub fn dequant_rows(&self, r0: usize, n: usize, out: &mut [f32]) {
        let cols = self.cols;
        debug_assert!(r0 + n <= self.rows && out.len() >= n * cols);
        match &self.format {
            Format::Plain => {
                let es = self.data.dtype.size();
                let bytes = &self.data.bytes()[r0 * cols * es..(r0 + n) * cols * es];
                decode_f32(self.data.dtype, bytes, &mut out[..n * cols]).expect("validated float dtype");
            }
            Format::Fp8 { scale, block } => {
                let bytes = &self.data.bytes()[r0 * cols..(r0 + n) * cols];
                decode_f32(DType::F8E4M3, bytes, &mut out[..n * cols]).expect("fp8");
                let scale_cols = cols.div_ceil(block[1]);
                for i in 0..n {
                    let srow = (r0 + i) / block[0];
                    let row = &mut out[i * cols..(i + 1) * cols];
                    for (bj, chunk) in row.chunks_mut(block[1]).enumerate() {
                        let s = scale_at(scale, srow * scale_cols + bj);
                        chunk.iter_mut().for_each(|v| *v *= s);
                    }
                }
            }
            Format::Packed { bits, group, scale, zero } => {
                let bits = *bits as usize;
                let words_per_row = (cols * bits).div_ceil(32);
                let groups = cols.div_ceil(*group);
                let mask = (1u32 << bits) - 1;
                let offset = 1i32 << (bits - 1);
                for i in 0..n {
                    let r = r0 + i;
                    let row = &mut out[i * cols..(i + 1) * cols];
                    for g in 0..groups {
                        let s = scale_at(scale, r * groups + g);
                        let z = zero.as_ref().map_or(0, |zp| zero_point_at(zp, bits, groups, r, g));
                        let c_end = ((g + 1) * group).min(cols);
                        for c in g * group..c_end {
                            let word = i32_at(&self.data, r * words_per_row + c * bits / 32);
                            let q = ((word >> ((c * bits) % 32)) & mask) as i32 - offset;
                            row[c] = (q - z) as f32 * s;
                        }
                    }
                }
            }
        }
    }

    /// The scales as f32: the FP8 block grid `[ceil(rows/br), ceil(cols/bc)]` (one value for a
    /// per-tensor scale) or the integer group scales `[rows, groups]`; empty for plain weights.
    pub fn scale_values(&self) -> Vec<f32> {
        match &self.format {
            Format::Plain => vec![],
            Format::Fp8 { scale, .. } | Format::Packed { scale, .. } => (0..scale.numel()).map(|i| scale_at(scale, i)).collect(),
        }
    }

    /// Signed zero points `[rows, groups]` of an asymmetric integer weight.
    pub fn zero_points(&self) -> Option<Vec<i8>> {
        let Format::Packed { bits, group, zero: Some(zp), .. } = &self.format else { return None };
        let groups = self.cols.div_ceil(*group);
        Some((0..self.rows * groups).map(|i| zero_point_at(zp, *bits as usize, groups, i / groups, i % groups) as i8).collect())
    }

    /// The whole weight as f32, row-major.
    pub fn to_f32(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        self.dequant_rows(0, self.rows, &mut out);
        out
    }
}

/// The signed zero point of row `r`, group `g`. Zero points are packed along rows: element
/// (r, g) sits at bit r·bits of column g in word row (r·bits)/32.
fn zero_point_at(zp: &TensorView, bits: usize, groups: usize, r: usize, g: usize) -> i32 {
    let word = i32_at(zp, (r * bits / 32) * groups + g);
    ((word >> ((r * bits) % 32)) & ((1u32 << bits) - 1)) as i32 - (1i32 << (bits - 1))
}

/// Validates that a scale tensor has a supported dtype.
pub fn check_scale_dtype(t: &TensorView) -> Result<()> {
    match t.dtype {
        DType::F32 | DType::BF16 | DType::F16 | DType::F8E8M0 => Ok(()),
        other => bail!(
            "tensor '{}' in {}: scale dtype {other} is not supported (expected F32, BF16, F16 or F8_E8M0)",
            t.name,
            t.file.display()
        ),
    }
}
