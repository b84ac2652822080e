//! Writing weights in the quantized on-disk formats that [`super::linear`] reads: FP8 e4m3
//! with block scales, and compressed-tensors `pack-quantized` INT4/INT8.

use super::fp8::{e4m3_table, encode_e4m3, E4M3_MAX};
use super::safetensors::{DType, OwnedTensor};

/// FP8 e4m3 weight `[rows, cols]` with one f32 scale per `block` (ceil-div grid):
/// returns (`weight`, `weight_scale_inv`).
pub fn fp8_block(w: &[f32], rows: usize, cols: usize, block: [usize; 2]) -> (OwnedTensor, OwnedTensor) {
    let (sr, sc) = (rows.div_ceil(block[0]), cols.div_ceil(block[1]));
    let mut scales = vec![0f32; sr * sc];
    for (i, s) in scales.iter_mut().enumerate() {
        let (bi, bj) = (i / sc, i % sc);
        let mut amax = 0f32;
        for r in bi * block[0]..((bi + 1) * block[0]).min(rows) {
            for c in bj * block[1]..((bj + 1) * block[1]).min(cols) {
                amax = amax.max(w[r * cols + c].abs());
            }
        }
        *s = if amax > 0.0 { amax / E4M3_MAX } else { 1.0 };
    }
    let q: Vec<u8> = (0..rows * cols)
        .map(|i| {
            let (r, c) = (i / cols, i % cols);
            encode_e4m3(w[i] / scales[(r / block[0]) * sc + c / block[1]])
        })
        .collect();
    debug_assert!(q.iter().all(|&b| e4m3_table()[b as usize].is_finite()));
    (
        OwnedTensor { dtype: DType::F8E4M3, shape: vec![rows, cols], data: q },
        OwnedTensor::f32(&[sr, sc], &scales),
    )
}

/// Packs signed `bits`-bit values (row-major `[rows, cols]`) offset-binary into int32 words,
/// element c of a row at bit c·bits, along rows (`along_rows = false`) or down columns.
pub fn pack_int(q: &[i32], rows: usize, cols: usize, bits: usize, along_rows: bool) -> OwnedTensor {
    let offset = 1i32 << (bits - 1);
    let mask = (1u32 << bits) - 1;
    let (outer, inner) = if along_rows { (cols, rows) } else { (rows, cols) };
    let words = (inner * bits).div_ceil(32);
    let mut packed = vec![0u32; outer * words];
    for o in 0..outer {
        for i in 0..inner {
            let v = if along_rows { q[i * cols + o] } else { q[o * cols + i] };
            let field = ((v + offset) as u32) & mask;
            packed[o * words + i * bits / 32] |= field << ((i * bits) % 32);
        }
    }
    let (shape, data): (Vec<usize>, Vec<u32>) = if along_rows {
        // Stored [words, cols]: transpose back.
        let mut t = vec![0u32; words * cols];
        for c in 0..cols {
            for w in 0..words {
                t[w * cols + c] = packed[c * words + w];
            }
        }
        (vec![words, cols], t)
    } else {
        (vec![rows, words], packed)
    };
    OwnedTensor { dtype: DType::I32, shape, data: data.iter().flat_map(|v| v.to_le_bytes()).collect() }
}

/// Group-quantized integer weight in compressed-tensors' `pack-quantized` layout: returns
/// `weight_packed`, `weight_scale` (bf16), `weight_zero_point` (asymmetric only) and `weight_shape`.
pub fn pack_quantized(
    w: &[f32],
    rows: usize,
    cols: usize,
    bits: usize,
    group: usize,
    symmetric: bool,
) -> Vec<(&'static str, OwnedTensor)> {
    let groups = cols.div_ceil(group);
    let (qmin, qmax) = (-(1i32 << (bits - 1)), (1i32 << (bits - 1)) - 1);
    let mut scales = vec![0f32; rows * groups];
    let mut zeros = vec![0i32; rows * groups];
    let mut q = vec![0i32; rows * cols];
    for r in 0..rows {
        for g in 0..groups {
            let cs = g * group..((g + 1) * group).min(cols);
            let vals = &w[r * cols + cs.start..r * cols + cs.end];
            let (lo, hi) = vals.iter().fold((0f32, 0f32), |(lo, hi), &v| (lo.min(v), hi.max(v)));
            let (scale, zp) = if symmetric {
                let amax = lo.abs().max(hi.abs());
                (amax / ((qmax - qmin) as f32 / 2.0), 0)
            } else {
                let s = (hi - lo) / (qmax - qmin) as f32;
                let s = if s > 0.0 { s } else { 1.0 };
                (s, 0)
            };
            // Round the scale to bf16 first: it is stored as bf16 and must dequantize exactly.
            let scale = half::bf16::from_f32(if scale > 0.0 { scale } else { 1.0 }).to_f32();
            let zp = if symmetric { zp } else { ((qmin as f32) - lo / scale).round().clamp(qmin as f32, qmax as f32) as i32 };
            scales[r * groups + g] = scale;
            zeros[r * groups + g] = zp;
            for c in cs {
                q[r * cols + c] = ((w[r * cols + c] / scale).round() as i32 + zp).clamp(qmin, qmax);
            }
        }
    }
    let mut out = vec![
        ("weight_packed", pack_int(&q, rows, cols, bits, false)),
        ("weight_scale", OwnedTensor::bf16(&[rows, groups], &scales)),
        ("weight_shape", OwnedTensor::i64(&[2], &[rows as i64, cols as i64])),
    ];
    if !symmetric {
        out.push(("weight_zero_point", pack_int(&zeros, rows, groups, bits, true)));
    }
    out
}

/// Storage formats for weights made in-process.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum SynthFormat {
    F32,
    Bf16,
    F16,
    /// FP8 e4m3 with block scales of this shape.
    Fp8([usize; 2]),
    Int { bits: usize, group: usize, symmetric: bool },
}

impl std::fmt::Display for SynthFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SynthFormat::F32 => write!(f, "f32"),
            SynthFormat::Bf16 => write!(f, "bf16"),
            SynthFormat::F16 => write!(f, "f16"),
            SynthFormat::Fp8(b) => write!(f, "fp8-{}x{}", b[0], b[1]),
            SynthFormat::Int { bits, group, symmetric } => write!(f, "int{bits}-g{group}-{}", if *symmetric { "sym" } else { "asym" }),
        }
    }
}

/// A random linear weight `[rows, cols]` (values N(0, 1/cols)) stored in `fmt`, held in memory.
pub fn synthetic_linear(module: &str, rows: usize, cols: usize, fmt: SynthFormat, rng: &mut crate::sampling::Rng) -> super::LinearWeight {
    use super::linear::{Format, LinearWeight};
    use super::safetensors::TensorView;
    let std = (1.0 / cols as f64).sqrt();
    let w: Vec<f32> = (0..rows * cols).map(|_| (rng.normal() * std) as f32).collect();
    let view = |suffix: &str, t: OwnedTensor| TensorView::in_memory(&format!("{module}.{suffix}"), t);
    let (data, format) = match fmt {
        SynthFormat::F32 => (view("weight", OwnedTensor::f32(&[rows, cols], &w)), Format::Plain),
        SynthFormat::Bf16 => (view("weight", OwnedTensor::bf16(&[rows, cols], &w)), Format::Plain),
        SynthFormat::F16 => {
            let data = w.iter().flat_map(|v| half::f16::from_f32(*v).to_bits().to_le_bytes()).collect();
            (view("weight", OwnedTensor { dtype: DType::F16, shape: vec![rows, cols], data }), Format::Plain)
        }
        SynthFormat::Fp8(block) => {
            let (q, s) = fp8_block(&w, rows, cols, block);
            (view("weight", q), Format::Fp8 { scale: view("weight_scale_inv", s), block })
        }
        SynthFormat::Int { bits, group, symmetric } => {
            let mut parts: std::collections::HashMap<&str, OwnedTensor> = pack_quantized(&w, rows, cols, bits, group, symmetric).into_iter().collect();
            let data = view("weight_packed", parts.remove("weight_packed").unwrap());
            let scale = view("weight_scale", parts.remove("weight_scale").unwrap());
            let zero = parts.remove("weight_zero_point").map(|z| view("weight_zero_point", z));
            (data, Format::Packed { bits: bits as u32, group, scale, zero })
        }
    };
    LinearWeight { module: module.to_string(), rows, cols, data, format }
}
