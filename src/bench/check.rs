//! `duet bench check`: every CUDA operation against the CPU oracle on fresh random inputs, then
//! the reference fixtures end to end on the GPU. Prints one table; fails if any row fails.
//!
//! Both backends compute in f32 on identically dequantized weights, so the normalized error
//! ‖gpu − cpu‖ / ‖cpu‖ should sit near f32 rounding (1e-6); DSA and router choices must be the
//! same sets.

use std::path::Path;

use anyhow::{bail, Result};

use crate::backend::cpu::CpuBackend;
use crate::backend::cuda::CudaBackend;
use crate::backend::{Backend, Batch, CacheSpec, ExpertWeights, IndexDims, MlaDims, MoeBlock, RopeSpec, RouterParams, Segment};
use crate::checkpoint::linear::{Format, LinearWeight};
use crate::checkpoint::quantize::{synthetic_linear, SynthFormat};
use crate::checkpoint::safetensors::{OwnedTensor, TensorView};
use crate::checkpoint::Checkpoint;
use crate::model::{Model, ModelParts};
use crate::sampling::Rng;

/// Normalized error above which a row fails.
const TOLERANCE: f64 = 1e-4;

pub struct Table {
    rows: Vec<(String, String, f64, bool)>,
}

impl Table {
    fn push(&mut self, op: &str, case: String, err: f64) {
        let ok = err.is_finite() && err <= TOLERANCE;
        println!("{:<22} {:<44} {:>10.2e}  {}", op, case, err, if ok { "ok" } else { "FAIL" });
        self.rows.push((op.into(), case, err, ok));
    }

    fn flag(&mut self, op: &str, case: String, ok: bool, note: &str) {
        println!("{:<22} {:<44} {:>10}  {}", op, case, note, if ok { "ok" } else { "FAIL" });
        self.rows.push((op.into(), case, if ok { 0.0 } else { f64::INFINITY }, ok));
    }
}

/// ‖a − b‖ / ‖b‖ (infinite on NaN or a length mismatch; 0 when both are zero).
pub fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    if a.len() != b.len() {
        return f64::INFINITY;
    }
    let (mut num, mut den) = (0f64, 0f64);
    for (x, y) in a.iter().zip(b) {
        if !x.is_finite() || !y.is_finite() {
            return f64::INFINITY;
        }
        num += ((x - y) as f64).powi(2);
        den += (*y as f64).powi(2);
    }
    if den == 0.0 {
        if num == 0.0 { 0.0 } else { f64::INFINITY }
    } else {
        (num / den).sqrt()
    }
}

fn random(rng: &mut Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.normal() as f32).collect()
}

/// The same host data on both backends.
fn pair(cpu: &CpuBackend, gpu: &CudaBackend, rows: usize, cols: usize, data: &[f32]) -> Result<(<CpuBackend as Backend>::Tensor, <CudaBackend as Backend>::Tensor)> {
    Ok((cpu.tensor(rows, cols, data)?, gpu.tensor(rows, cols, data)?))
}

pub fn run(fixtures: &Path, seed: Option<u64>) -> Result<()> {
    let seed = seed.unwrap_or_else(|| std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64));
    let gpu = CudaBackend::new(0)?;
    let cpu = CpuBackend;
    println!("duet bench check: CUDA ({}) against the CPU oracle, seed {seed} ({})", gpu.device_name(), crate::backend::cuda::kernels::settings());
    println!("{:<22} {:<44} {:>10}  status", "op", "case", "rel err");
    let mut t = Table { rows: vec![] };
    let mut rng = Rng::new(seed);
    check_linear(&cpu, &gpu, &mut rng, &mut t)?;
    check_elementwise(&cpu, &gpu, &mut rng, &mut t)?;
    check_attention(&cpu, &gpu, &mut rng, &mut t)?;
    check_moe(&cpu, &gpu, &mut rng, &mut t)?;
    check_wide_router(&cpu, &gpu, &mut rng, &mut t)?;
    drop(gpu);
    check_fixtures(fixtures, &mut t)?;
    let failed = t.rows.iter().filter(|r| !r.3).count();
    println!("{} checks, {} failed", t.rows.len(), failed);
    if failed > 0 {
        bail!("{failed} GPU checks failed");
    }
    Ok(())
}

fn formats() -> Vec<SynthFormat> {
    vec![
        SynthFormat::F32,
        SynthFormat::Bf16,
        SynthFormat::F16,
        SynthFormat::Fp8([128, 128]),
        SynthFormat::Int { bits: 4, group: 32, symmetric: false },
        SynthFormat::Int { bits: 4, group: 64, symmetric: true },
        SynthFormat::Int { bits: 4, group: 128, symmetric: true },
        // Zero points with one or two groups a chunk: the tensor-core kernels read them beside
        // the scales (weights.rs, scale_zero16). Group 128 is AWQ's layout.
        SynthFormat::Int { bits: 4, group: 64, symmetric: false },
        SynthFormat::Int { bits: 4, group: 128, symmetric: false },
        SynthFormat::Int { bits: 8, group: 32, symmetric: true },
        SynthFormat::Int { bits: 8, group: 64, symmetric: false },
        // The attention and shared experts of the real GLM INT4 checkpoints (the tensor-core
        // INT8 tile).
        SynthFormat::Int { bits: 8, group: 64, symmetric: true },
        SynthFormat::Int { bits: 8, group: 128, symmetric: true },
    ]
}

fn check_linear(cpu: &CpuBackend, gpu: &CudaBackend, rng: &mut Rng, t: &mut Table) -> Result<()> {
    for fmt in formats() {
        // 256 columns take the 16-byte path; 200 the scalar path of some formats; 66 rows end
        // in a part of a block (of a 16-row tile, of a one-token GEMV's block of rows).
        for (rows, cols) in [(320, 256), (72, 200), (66, 256)] {
            let w = synthetic_linear("w", rows, cols, fmt, rng);
            let (wc, wg) = (cpu.weight(&w)?, gpu.weight(&w)?);
            // 1 and 2 tokens take the INT4 kernels of two token slots, 3 to 8 those of four
            // (3 and 5: a tile with empty slots), 13 the CUDA-core kernels.
            for tokens in [1, 2, 3, 4, 5, 13] {
                let x = random(rng, tokens * cols);
                let (xc, xg) = pair(cpu, gpu, tokens, cols, &x)?;
                let err = rel_err(&gpu.to_host(&gpu.linear(&xg, &wg)?)?, &cpu.to_host(&cpu.linear(&xc, &wc)?)?);
                t.push("linear", format!("{fmt} [{rows},{cols}] x{tokens}"), err);
            }
        }
    }
    // Activations far from 1 (the tensor-core kernels scale each row by a power of two into
    // f16 range): tiny, huge, and one row of zeros.
    for fmt in [
        SynthFormat::Fp8([128, 128]),
        SynthFormat::Int { bits: 4, group: 64, symmetric: false },
        SynthFormat::Int { bits: 4, group: 256, symmetric: false },
    ] {
        let w = synthetic_linear("w", 48, 512, fmt, rng);
        let (wc, wg) = (cpu.weight(&w)?, gpu.weight(&w)?);
        let mut x = random(rng, 3 * 512);
        x[..512].iter_mut().for_each(|v| *v *= 1e-9);
        x[512..1024].iter_mut().for_each(|v| *v *= 1e9);
        x[1024..].iter_mut().for_each(|v| *v = 0.0);
        let (xc, xg) = pair(cpu, gpu, 3, 512, &x)?;
        let (yc, yg) = (cpu.to_host(&cpu.linear(&xc, &wc)?)?, gpu.to_host(&gpu.linear(&xg, &wg)?)?);
        for (r, what) in ["x·1e-9", "x·1e9", "zeros"].iter().enumerate() {
            t.push("linear x range", format!("{fmt} [48,512] {what}"), rel_err(&yg[r * 48..(r + 1) * 48], &yc[r * 48..(r + 1) * 48]));
        }
    }
    // Group scales that f16 cannot hold exactly (f32 ones of full precision) stay f32 on the GPU
    // and take the CUDA-core kernels (weights.rs f16_scales).
    for fmt in [SynthFormat::Int { bits: 4, group: 64, symmetric: true }, SynthFormat::Int { bits: 8, group: 64, symmetric: true }] {
        let w = with_f32_scales(synthetic_linear("w", 64, 256, fmt, rng));
        let (wc, wg) = (cpu.weight(&w)?, gpu.weight(&w)?);
        for tokens in [1, 3] {
            let x = random(rng, tokens * 256);
            let (xc, xg) = pair(cpu, gpu, tokens, 256, &x)?;
            let err = rel_err(&gpu.to_host(&gpu.linear(&xg, &wg)?)?, &cpu.to_host(&cpu.linear(&xc, &wc)?)?);
            t.push("linear f32 scales", format!("{fmt} [64,256] x{tokens}"), err);
        }
    }
    // Stacked gate‖up: FP8 parts whose rows are not whole 128-row blocks, and INT4 parts.
    for fmt in [SynthFormat::Fp8([128, 128]), SynthFormat::Int { bits: 4, group: 32, symmetric: false }] {
        let parts = [synthetic_linear("gate", 100, 256, fmt, rng), synthetic_linear("up", 100, 256, fmt, rng)];
        let (wc, wg) = (cpu.weight_stacked(&parts)?, gpu.weight_stacked(&parts)?);
        let x = random(rng, 3 * 256);
        let (xc, xg) = pair(cpu, gpu, 3, 256, &x)?;
        let err = rel_err(&gpu.to_host(&gpu.linear(&xg, &wg)?)?, &cpu.to_host(&cpu.linear(&xc, &wc)?)?);
        t.push("linear stacked", format!("{fmt} 2x[100,256] x3"), err);
    }
    // INT4 with 32-column groups is stored interleaved (weights.rs), which the gather must undo.
    for fmt in [SynthFormat::Bf16, SynthFormat::Fp8([128, 128]), SynthFormat::Int { bits: 4, group: 32, symmetric: true }] {
        let w = synthetic_linear("embed", 300, 256, fmt, rng);
        let (wc, wg) = (cpu.weight(&w)?, gpu.weight(&w)?);
        let ids: Vec<u32> = (0..9).map(|_| (rng.next_u64() % 300) as u32).collect();
        let err = rel_err(&gpu.to_host(&gpu.embed(&wg, &ids)?)?, &cpu.to_host(&cpu.embed(&wc, &ids)?)?);
        t.push("embed", format!("{fmt} [300,256] x9"), err);
    }
    Ok(())
}

/// An integer weight with its group scales made F32 of full precision (each nudged by 2^-20 of
/// itself), which f16 cannot hold exactly.
fn with_f32_scales(mut w: LinearWeight) -> LinearWeight {
    let values: Vec<f32> = w.scale_values().iter().map(|s| s * (1.0 + 2f32.powi(-20))).collect();
    if let Format::Packed { scale, .. } = &mut w.format {
        let shape = scale.shape.clone();
        *scale = TensorView::in_memory(&scale.name, OwnedTensor::f32(&shape, &values));
    }
    w
}

fn check_elementwise(cpu: &CpuBackend, gpu: &CudaBackend, rng: &mut Rng, t: &mut Table) -> Result<()> {
    let (rows, cols) = (7, 384);
    let x = random(rng, rows * cols);
    let y = random(rng, rows * cols);
    let (xc, xg) = pair(cpu, gpu, rows, cols, &x)?;
    let (yc, yg) = pair(cpu, gpu, rows, cols, &y)?;
    let w = random(rng, cols);
    let err = rel_err(&gpu.to_host(&gpu.rms_norm(&xg, &gpu.vector(&w)?, 1e-5)?)?, &cpu.to_host(&cpu.rms_norm(&xc, &cpu.vector(&w)?, 1e-5)?)?);
    t.push("rms_norm", format!("[{rows},{cols}]"), err);
    // Decode rows: the norm makes its output's tensor-core splits in the same launch. A linear
    // reading them matches the oracle, and bit for bit one reading a split made apart (of a copy).
    for fmt in [SynthFormat::Fp8([128, 128]), SynthFormat::Int { bits: 4, group: 128, symmetric: false }] {
        let lin = synthetic_linear("w", 64, cols, fmt, rng);
        let (wc, wg) = (cpu.weight(&lin)?, gpu.weight(&lin)?);
        let normed = gpu.rms_norm(&xg, &gpu.vector(&w)?, 1e-5)?;
        let fused = gpu.to_host(&gpu.linear(&normed, &wg)?)?;
        let want = cpu.to_host(&cpu.linear(&cpu.rms_norm(&xc, &cpu.vector(&w)?, 1e-5)?, &wc)?)?;
        let case = format!("{fmt} [{rows},{cols}] -> 64");
        t.push("rms_norm split", case.clone(), rel_err(&fused, &want));
        let apart = gpu.to_host(&gpu.linear(&gpu.copy(&normed)?, &wg)?)?;
        t.flag("rms_norm split", case, fused == apart, "= apart");
    }
    // The residual add fused with the next norm: against the oracle, and bit for bit against
    // the add and the norm apart. Decode rows (with the splits), 13 rows (the plain norm's
    // register path), 198 columns (its loop) and 4098 (several of the loop's steps).
    for (r, c) in [(rows, cols), (13, cols), (rows, 198), (3, 4098)] {
        let (a, b, w) = (random(rng, r * c), random(rng, r * c), random(rng, c));
        let ((mut sc, mut sg), (bc, bg)) = (pair(cpu, gpu, r, c, &a)?, pair(cpu, gpu, r, c, &b)?);
        let nc = cpu.add_rms_norm(&mut sc, &bc, &cpu.vector(&w)?, 1e-5)?;
        let (ng, wg) = (gpu.add_rms_norm(&mut sg, &bg, &gpu.vector(&w)?, 1e-5)?, gpu.vector(&w)?);
        let case = format!("[{r},{c}]");
        t.push("add + rms_norm", case.clone(), rel_err(&gpu.to_host(&ng)?, &cpu.to_host(&nc)?));
        let (_, mut apart) = pair(cpu, gpu, r, c, &a)?;
        gpu.add_assign(&mut apart, &bg)?;
        let apart_norm = gpu.rms_norm(&apart, &wg, 1e-5)?;
        let same = gpu.to_host(&sg)? == gpu.to_host(&apart)? && gpu.to_host(&ng)? == gpu.to_host(&apart_norm)?;
        t.flag("add + rms_norm", case, same, "= apart");
    }
    let (mut ac, mut ag) = pair(cpu, gpu, rows, cols, &x)?;
    cpu.add_assign(&mut ac, &yc)?;
    gpu.add_assign(&mut ag, &yg)?;
    t.push("add", format!("[{rows},{cols}]"), rel_err(&gpu.to_host(&ag)?, &cpu.to_host(&ac)?));
    t.push("swiglu", format!("[{rows},{cols}]"), rel_err(&gpu.to_host(&gpu.swiglu(&xg)?)?, &cpu.to_host(&cpu.swiglu(&xc)?)?));
    t.push("concat_cols", format!("2x[{rows},{cols}]"), rel_err(&gpu.to_host(&gpu.concat_cols(&xg, &yg)?)?, &cpu.to_host(&cpu.concat_cols(&xc, &yc)?)?));
    let pick = [6, 0, 3, 3];
    t.push("select_rows", format!("{pick:?}"), rel_err(&gpu.to_host(&gpu.select_rows(&xg, &pick)?)?, &cpu.to_host(&cpu.select_rows(&xc, &pick)?)?));
    check_argmax(cpu, gpu, rng, t)?;
    check_sampling(cpu, gpu, rng, t)
}

/// Temperature draws on the device (`sample_rows`): every row's pick the host's for the same
/// uniform, at a real vocabulary's width and at narrow ones; a greedy row, rows without filters
/// and with top-p and min-p, a uniform of 0, and rows the kernel leaves to the host (a NaN,
/// +inf, all -inf). (A pick may differ from the host's where the uniform lies within rounding
/// of a token's edge: next to 1, the weights' sums in another order put the last tokens' edges
/// elsewhere by an ulp, so no such uniform is drawn here; `launch/sample-rows-emulation.py`, the kernel's sums in Python, agrees with the
/// host on 720 of 720 draws away from 1 and differs on 8 of 144 at 1 - 2^-53.)
fn check_sampling(cpu: &CpuBackend, gpu: &CudaBackend, rng: &mut Rng, t: &mut Table) -> Result<()> {
    use crate::sampling::Draw;
    for cols in [154_880, 1, 7, 1000, 1025, 4099] {
        let rows = 15;
        // Logits spread σ 3 (rows 0-4, 9-11 and 13) or peaked as a model's next-token logits are
        // (σ 8: rows 5-8, 12 and 14, with top-p and min-p, so the head they keep fits the
        // kernel's 4096; with σ 3, 0.95 of the mass lies in some 14000 tokens of a real
        // vocabulary, which the device leaves to the host: row 13).
        let mut x: Vec<f32> = random(rng, rows * cols).iter().map(|v| 3.0 * v).collect();
        let row = |r: usize| r * cols..(r + 1) * cols;
        for r in [5, 6, 7, 8, 12, 14] {
            x[row(r)].iter_mut().for_each(|v| *v *= 8.0 / 3.0);
        }
        x[row(9)][cols / 2] = f32::NAN;
        x[row(10)][cols / 3] = f32::INFINITY;
        x[row(11)].iter_mut().for_each(|v| *v = f32::NEG_INFINITY);
        // Row 12: -0 then +0 as the largest (+0 sorts first, as total_cmp has it), and -inf
        // among the rest, which lie 20 below them so that top-p keeps a short head at a real
        // vocabulary's width too (1 below, the 154880 tails outweighed the two zeros and the
        // head was too long for the kernel: the device left the row to the host, H200).
        x[row(12)].iter_mut().enumerate().for_each(|(i, v)| *v = if i % 5 == 4 { f32::NEG_INFINITY } else { -v.abs() - 20.0 });
        x[row(12)][0] = -0.0;
        x[row(12)][cols - 1] = 0.0;
        // Rows 1-4 without filters; 5-8 and 12-13 with top-p and min-p (OpenAI clients' settings
        // and a checkpoint's generation_config.json top-p of 0.95); 14 a min-p above 1.
        let filters = |r: usize| match r {
            1..=4 => (1.0, 0.0),
            12 | 13 => (0.95, 0.0),
            14 => (1.0, 1.5),
            _ => [(0.95, 0.0), (0.9, 0.05), (1.0, 0.1)][r % 3],
        };
        let draws: Vec<Draw> = (0..rows)
            .map(|r| {
                let (top_p, min_p) = filters(r);
                let (temperature, u) = match r {
                    1 | 12 => (1.0, 0.0),
                    2 => (0.7, 0.5),
                    _ => ([0.3, 0.7, 1.0, 1.5][r % 4], rng.uniform()),
                };
                if r == 0 { Draw::Greedy } else { Draw::Temperature { temperature, top_p, min_p, u } }
            })
            .collect();
        let (xc, xg) = pair(cpu, gpu, rows, cols, &x)?;
        let (want, got) = (cpu.sample_rows(&xc, &draws)?, gpu.sample_rows(&xg, &draws)?);
        t.flag("sample rows", format!("[{rows},{cols}]: T 0.3-1.5, top-p, min-p, ±0, NaN, ±inf"), got == want, "= host");
        // The device's own picks: every row made there but the non-finite ones and a head
        // too long for it.
        let raw = gpu.sample_rows_on_device(&xg, &draws)?;
        let left = raw.iter().enumerate().filter(|(_, &p)| p < 0).map(|(r, _)| r).collect::<Vec<_>>();
        let ok = left.starts_with(&[9, 10, 11]) && left.len() <= 4 && left.get(3).is_none_or(|&r| r == 13);
        t.flag("sample rows", format!("[{rows},{cols}]: made on the device ({left:?} left)"), ok, "rows 9-11 (13) to the host");
    }
    Ok(())
}

/// Greedy picks on the device (`sample_rows` with every draw greedy: argmax_rows): every row's
/// argmax the oracle's, at a real vocabulary's width and at narrow ones, with the maximum tied
/// (the first wins, also +0 against -0), rows of -inf, NaN first (it stays the answer) and NaNs
/// elsewhere (they never win, even beside the maximum).
fn check_argmax(cpu: &CpuBackend, gpu: &CudaBackend, rng: &mut Rng, t: &mut Table) -> Result<()> {
    for cols in [154_880, 1, 5, 1000, 1025] {
        let rows = 7;
        let mut x = random(rng, rows * cols);
        let at = |r: usize, i: usize| r * cols + i.min(cols - 1);
        let row = |r: usize| r * cols..(r + 1) * cols;
        // Row 1: its maximum twice (at the full width, the later index in a lower thread).
        let m = x[row(1)].iter().cloned().fold(f32::MIN, f32::max) + 1.0;
        x[at(1, cols / 2 + 1)] = m;
        x[at(1, 1023)] = m;
        // Row 2: all -inf. Row 3: NaN first. Row 4: NaNs from index 1 on, every 7th, one next
        // to its maximum. Row 5: +0 after -0 as the maximum (all else negative).
        x[row(2)].iter_mut().for_each(|v| *v = f32::NEG_INFINITY);
        x[at(3, 0)] = f32::NAN;
        for i in (1..cols).step_by(7) {
            x[at(4, i)] = f32::NAN;
        }
        x[at(4, cols / 2)] = 9.0;
        x[at(4, cols / 2 + 1)] = f32::NAN;
        x[row(5)].iter_mut().for_each(|v| *v = -v.abs() - 1.0);
        x[at(5, cols / 4)] = -0.0;
        x[at(5, cols / 2)] = 0.0;
        let (xc, xg) = pair(cpu, gpu, rows, cols, &x)?;
        let greedy = vec![crate::sampling::Draw::Greedy; rows];
        let (want, got) = (cpu.sample_rows(&xc, &greedy)?, gpu.sample_rows(&xg, &greedy)?);
        t.flag("argmax rows", format!("[{rows},{cols}]: ties, -inf, NaN, ±0"), got == want, "= oracle");
    }
    Ok(())
}

fn sets_equal(a: &[Vec<u32>], b: &[Vec<u32>]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|(x, y)| {
            let (mut x, mut y) = (x.clone(), y.clone());
            x.sort_unstable();
            y.sort_unstable();
            x == y
        })
}

/// The GPU's selection as the CPU backend's (positions per row, empty slots dropped).
fn gpu_selection(cpu: &CpuBackend, gpu: &CudaBackend, s: &<CudaBackend as Backend>::Selection, rows: usize) -> Result<Vec<Vec<u32>>> {
    let (topk, v) = gpu.selection_to_host(s, rows)?;
    Ok(cpu.selection_from_host(rows, topk, &v)?.rows)
}

fn check_attention(cpu: &CpuBackend, gpu: &CudaBackend, rng: &mut Rng, t: &mut Table) -> Result<()> {
    let dims = MlaDims { heads: 12, nope: 32, rope: 16, v: 32, latent: 64, scale: (48f32).powf(-0.5) };
    let idims = IndexDims { heads: 12, head_dim: 32, rope: 16, topk: 8 };
    let rope = RopeSpec { inv_freq: (0..8).map(|i| 1.0 / 10000f32.powf(i as f32 / 8.0)).collect(), interleaved: true, indexer_interleaved: true };
    let spec = CacheSpec { latent: 64, rope: 16, index_dim: 32, slot_has_index: vec![true], capacity: 256 };
    let kv_b = synthetic_linear("kv_b", dims.heads * (dims.nope + dims.v), dims.latent, SynthFormat::Bf16, rng);
    let (hc, hg) = (cpu.mla_heads(&kv_b, &dims)?, gpu.mla_heads(&kv_b, &dims)?);
    // The GPU keeps W_UK / W_UV as bf16 above; as FP8 codes with row scales, and as f32 (values
    // that are not bf16), here.
    let mut other_heads = Vec::new();
    for fmt in [SynthFormat::Fp8([128, 128]), SynthFormat::F32] {
        let w = synthetic_linear("kv_b", dims.heads * (dims.nope + dims.v), dims.latent, fmt, rng);
        other_heads.push((fmt, cpu.mla_heads(&w, &dims)?, gpu.mla_heads(&w, &dims)?));
    }
    let (mut cc, mut cg) = (cpu.new_cache(&spec)?, gpu.new_cache(&spec)?);
    let norm = random(rng, 64);
    let (kn_w, kn_b) = (random(rng, 32), random(rng, 32));
    let (vc, vg) = ((cpu.vector(&norm)?, cpu.vector(&kn_w)?, cpu.vector(&kn_b)?), (gpu.vector(&norm)?, gpu.vector(&kn_w)?, gpu.vector(&kn_b)?));
    // A prefill of two sequences, then one decode step each.
    let steps = [
        Batch { segments: vec![Segment { seq: 1, start: 0, len: 40 }, Segment { seq: 2, start: 0, len: 17 }] },
        Batch { segments: vec![Segment { seq: 1, start: 40, len: 1 }, Segment { seq: 2, start: 17, len: 1 }] },
    ];
    for (si, batch) in steps.iter().enumerate() {
        let n = batch.tokens();
        let (sc, sg) = (cpu.prepare(batch, &rope, &mut cc)?, gpu.prepare(batch, &rope, &mut cg)?);
        let kv = random(rng, n * 80);
        let (kvc, kvg) = pair(cpu, gpu, n, 80, &kv)?;
        cpu.mla_cache_write(&kvc, &vc.0, 1e-6, &sc, &mut cc, 0)?;
        gpu.mla_cache_write(&kvg, &vg.0, 1e-6, &sg, &mut cg, 0)?;
        let q = random(rng, n * dims.heads * 48);
        let (qc, qg) = pair(cpu, gpu, n, dims.heads * 48, &q)?;
        let (qlc, qpc) = cpu.mla_queries(&qc, &hc, &sc)?;
        let (qlg, qpg) = gpu.mla_queries(&qg, &hg, &sg)?;
        t.push("mla_queries", format!("step {si}: latent, {n} rows"), rel_err(&gpu.to_host(&qlg)?, &cpu.to_host(&qlc)?));
        t.push("mla_queries", format!("step {si}: rope, {n} rows"), rel_err(&gpu.to_host(&qpg)?, &cpu.to_host(&qpc)?));
        let oc = cpu.mla_attend(&qlc, &qpc, &cc, 0, &sc, None, &dims)?;
        let og = gpu.mla_attend(&qlg, &qpg, &cg, 0, &sg, None, &dims)?;
        t.push("mla_attend dense", format!("step {si}: {n} rows"), rel_err(&gpu.to_host(&og)?, &cpu.to_host(&oc)?));
        t.push("mla_values", format!("step {si}: {n} rows"), rel_err(&gpu.to_host(&gpu.mla_values(&og, &hg)?)?, &cpu.to_host(&cpu.mla_values(&oc, &hc)?)?));
        for (fmt, hc2, hg2) in &other_heads {
            let (qlc2, qlg2) = (cpu.mla_queries(&qc, hc2, &sc)?.0, gpu.mla_queries(&qg, hg2, &sg)?.0);
            t.push("mla_queries", format!("step {si}: latent, {n} rows, {fmt} kv_b"), rel_err(&gpu.to_host(&qlg2)?, &cpu.to_host(&qlc2)?));
            t.push("mla_values", format!("step {si}: {n} rows, {fmt} kv_b"), rel_err(&gpu.to_host(&gpu.mla_values(&og, hg2)?)?, &cpu.to_host(&cpu.mla_values(&oc, hc2)?)?));
        }
        let k = random(rng, n * 32);
        let (kc, kg) = pair(cpu, gpu, n, 32, &k)?;
        cpu.index_cache_write(&kc, &vc.1, &vc.2, 1e-6, &sc, &mut cc, 0)?;
        gpu.index_cache_write(&kg, &vg.1, &vg.2, 1e-6, &sg, &mut cg, 0)?;
        let ih = idims.heads;
        let iq = random(rng, n * ih * 32);
        let iw = random(rng, n * ih);
        let (iqc, iqg) = pair(cpu, gpu, n, ih * 32, &iq)?;
        let (iwc, iwg) = pair(cpu, gpu, n, ih, &iw)?;
        let selc = cpu.index_select(&iqc, &iwc, &cc, 0, &sc, &idims)?;
        let selg = gpu.index_select(&iqg, &iwg, &cg, 0, &sg, &idims)?;
        let same = sets_equal(&gpu_selection(cpu, gpu, &selg, n)?, &selc.rows);
        t.flag("index_select", format!("step {si}: top-{} over {n} rows", idims.topk), same, "same sets");
        let oc = cpu.mla_attend(&qlc, &qpc, &cc, 0, &sc, Some(&selc), &dims)?;
        let og = gpu.mla_attend(&qlg, &qpg, &cg, 0, &sg, Some(&selg), &dims)?;
        t.push("mla_attend sparse", format!("step {si}: top-{}, {n} rows", idims.topk), rel_err(&gpu.to_host(&og)?, &cpu.to_host(&oc)?));
    }
    Ok(())
}

/// One router on both backends, the CPU's weights and the GPU's.
struct Router<'a> {
    cpu: (&'a <CpuBackend as Backend>::Weight, &'a <CpuBackend as Backend>::Vector),
    gpu: (&'a <CudaBackend as Backend>::Weight, &'a <CudaBackend as Backend>::Vector),
}

type Routings = (<CpuBackend as Backend>::Routing, <CudaBackend as Backend>::Routing);

/// Routes `x` on both backends and compares (expert, weight) pairs per row, sorted by expert;
/// returns both routings when every row chose the same experts.
fn check_route(
    (cpu, gpu): (&CpuBackend, &CudaBackend),
    (xc, xg): (&<CpuBackend as Backend>::Tensor, &<CudaBackend as Backend>::Tensor),
    router: &Router<'_>,
    p: &RouterParams,
    t: &mut Table,
) -> Result<Option<Routings>> {
    let tokens = xc.rows;
    let c_route = cpu.route(xc, router.cpu.0, router.cpu.1, p)?;
    let g_route = gpu.route(xg, router.gpu.0, router.gpu.1, p)?;
    let gi = gpu.stream().clone_dtoh(&g_route.idx).map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let gw = gpu.stream().clone_dtoh(&g_route.weights).map_err(|e| anyhow::anyhow!("{e:?}"))?;
    gpu.synchronize()?;
    let k1 = c_route.top_k;
    let rows = |idx: Vec<u32>, w: Vec<f32>| -> Vec<Vec<(u32, f32)>> {
        (0..tokens)
            .map(|r| {
                let mut v: Vec<(u32, f32)> = (0..k1).map(|k| (idx[r * k1 + k], w[r * k1 + k])).collect();
                v.sort_by_key(|a| a.0);
                v
            })
            .collect()
    };
    let c = rows(c_route.experts.clone(), c_route.weights.clone());
    let g = rows(gi.iter().map(|&v| v as u32).collect(), gw);
    let ok = g_route.top_k == k1 && c.iter().zip(&g).all(|(a, b)| a.iter().map(|x| x.0).eq(b.iter().map(|x| x.0)));
    let what = if p.shared.is_some() { " + shared" } else { "" };
    t.flag("route", format!("{} experts, {} groups keep {}, top-{}{what} x{tokens}", router.cpu.1.len(), p.n_group, p.topk_group, p.top_k), ok, "same sets");
    if !ok {
        return Ok(None);
    }
    let cw: Vec<f32> = c.iter().flatten().map(|x| x.1).collect();
    let gw: Vec<f32> = g.iter().flatten().map(|x| x.1).collect();
    t.push("route weights", format!("{tokens} rows{what}"), rel_err(&gw, &cw));
    // Decode steps: the plan the router built (in one block up to two tokens, else by the last
    // block) against moe_plan's of the same routes.
    if let Some([built, made]) = gpu.route_plans(&g_route)? {
        t.flag("route plan", format!("{} experts, top-{}{what} x{tokens} ({} pairs)", router.cpu.1.len(), p.top_k, tokens * k1), built == made, "= moe_plan");
    }
    Ok(Some((c_route, g_route)))
}

/// Routers at GLM-5.2's width (256 experts, several runs of 32 in moe_route's ranking, 8 a
/// lane in moe_route_warp's) and at 200 (a width no multiple of 32), with ties: the gate
/// repeats 96 distinct rows and the bias repeats likewise, so every score comes two or three
/// times, in one run and across runs, and the picks depend on the tie order (the lower index
/// first, on both backends). Decode steps of one to four tokens without groups take
/// moe_route_warp, the rest moe_route.
fn check_wide_router(cpu: &CpuBackend, gpu: &CudaBackend, rng: &mut Rng, t: &mut Table) -> Result<()> {
    let (h, distinct) = (256, 96);
    let glm = RouterParams { top_k: 8, n_group: 1, topk_group: 1, norm_topk_prob: true, scaling: 2.5, shared: None };
    let grouped = RouterParams { n_group: 8, topk_group: 4, ..glm };
    let rows = random(rng, distinct * h);
    let b = random(rng, distinct);
    let tied_router = |e: usize| -> Result<_> {
        let w: Vec<f32> = (0..e).flat_map(|r| rows[(r % distinct) * h..(r % distinct + 1) * h].iter().map(|v| v / 16.0)).collect();
        let data = TensorView::in_memory("wide.gate.weight", OwnedTensor::bf16(&[e, h], &w));
        let gate = LinearWeight { module: "wide.gate".into(), rows: e, cols: h, data, format: Format::Plain };
        let bias: Vec<f32> = (0..e).map(|r| b[r % distinct] * 0.1).collect();
        Ok((cpu.weight(&gate)?, cpu.vector(&bias)?, gpu.weight(&gate)?, gpu.vector(&bias)?))
    };
    {
        let (gate_c, bias_c, gate_g, bias_g) = tied_router(200)?;
        let router = Router { cpu: (&gate_c, &bias_c), gpu: (&gate_g, &bias_g) };
        for tokens in [1, 3] {
            let (xc, xg) = pair(cpu, gpu, tokens, h, &random(rng, tokens * h))?;
            for p in [glm, RouterParams { shared: Some(200), ..glm }, RouterParams { top_k: 32, ..glm }] {
                check_route((cpu, gpu), (&xc, &xg), &router, &p, t)?;
            }
        }
    }
    let e = 256;
    let (gate_c, bias_c, gate_g, bias_g) = tied_router(e)?;
    let router = Router { cpu: (&gate_c, &bias_c), gpu: (&gate_g, &bias_g) };
    for tokens in [1, 2, 3, 4, 13] {
        let (xc, xg) = pair(cpu, gpu, tokens, h, &random(rng, tokens * h))?;
        for p in [glm, RouterParams { shared: Some(e), ..glm }, grouped, RouterParams { top_k: 40, ..glm }] {
            check_route((cpu, gpu), (&xc, &xg), &router, &p, t)?;
        }
    }
    // A one-token decode block at this width and with these ties (its router overlapped with
    // the shared expert): against the oracle, and bit for bit against the shared expert folded
    // into the routed ones on one stream.
    let (i, fmt) = (128, SynthFormat::Int { bits: 4, group: 128, symmetric: false });
    let ws: Vec<ExpertWeights> = (0..=e).map(|j| synthetic_expert(&format!("wide.e{j}"), i, h, fmt, rng)).collect();
    let (ex_c, ex_g) = (cpu.experts(&ws)?, gpu.experts(&ws)?);
    let (xc, xg) = pair(cpu, gpu, 1, h, &random(rng, h))?;
    for p in [glm, grouped].map(|p| RouterParams { shared: Some(e), ..p }) {
        let case = format!("{fmt} {e}x[{i},{h}] top-{}, {} groups keep {} + shared x1", p.top_k, p.n_group, p.topk_group);
        let yc = cpu.to_host(&cpu.moe_block(&xc, &gate_c, &bias_c, &ex_c, &p)?)?;
        let yg = gpu.to_host(&gpu.moe_block(&xg, &gate_g, &bias_g, &ex_g, &p)?)?;
        t.push("moe block", case.clone(), rel_err(&yg, &yc));
        let folded = gpu.to_host(&gpu.moe(&xg, &ex_g, &gpu.route(&xg, &gate_g, &bias_g, &p)?)?)?;
        t.flag("moe block", case, yg == folded, "= folded");
    }
    Ok(())
}

/// Random weights of expert `name` in `fmt`: gate and up [i, h], down [h, i].
fn synthetic_expert(name: &str, i: usize, h: usize, fmt: SynthFormat, rng: &mut Rng) -> ExpertWeights {
    ExpertWeights {
        gate: synthetic_linear(&format!("{name}.gate"), i, h, fmt, rng),
        up: synthetic_linear(&format!("{name}.up"), i, h, fmt, rng),
        down: synthetic_linear(&format!("{name}.down"), h, i, fmt, rng),
    }
}

fn check_moe(cpu: &CpuBackend, gpu: &CudaBackend, rng: &mut Rng, t: &mut Table) -> Result<()> {
    let (e, h, i) = (16, 256, 128);
    let p = RouterParams { top_k: 4, n_group: 4, topk_group: 2, norm_topk_prob: true, scaling: 2.5, shared: None };
    let gate = synthetic_linear("gate", e, h, SynthFormat::Bf16, rng);
    let bias: Vec<f32> = random(rng, e).iter().map(|v| v * 0.1).collect();
    let (gate_c, bias_c, gate_g, bias_g) = (cpu.weight(&gate)?, cpu.vector(&bias)?, gpu.weight(&gate)?, gpu.vector(&bias)?);
    let router = Router { cpu: (&gate_c, &bias_c), gpu: (&gate_g, &bias_g) };
    let fmts = [
        SynthFormat::Bf16,
        SynthFormat::Fp8([128, 128]),
        SynthFormat::Int { bits: 4, group: 32, symmetric: false },
        SynthFormat::Int { bits: 4, group: 64, symmetric: true },
        SynthFormat::Int { bits: 4, group: 128, symmetric: true },
        SynthFormat::Int { bits: 4, group: 128, symmetric: false },
    ];
    // Each format's experts, uploaded once to both backends; expert `e` is the shared one.
    let mut experts = Vec::new();
    for &fmt in &fmts {
        let ws: Vec<ExpertWeights> = (0..=e).map(|j| synthetic_expert(&format!("e{j}"), i, h, fmt, rng)).collect();
        experts.push((fmt, cpu.experts(&ws)?, gpu.experts(&ws)?));
    }
    // Shared experts of other formats, each a one-expert set.
    let mut apart = Vec::new();
    for sfmt in [SynthFormat::Int { bits: 8, group: 64, symmetric: true }, SynthFormat::Fp8([128, 128])] {
        let w = synthetic_expert("s", i, h, sfmt, rng);
        apart.push((sfmt, cpu.experts(std::slice::from_ref(&w))?, gpu.experts(std::slice::from_ref(&w))?));
    }
    // 1 to 4 and 8 tokens take the tensor-core kernels for FP8 and INT4 (INT4 at 1 and 2 those
    // of two token slots; 8 tokens: experts chosen by more than four tokens take two passes); up
    // to two tokens the router builds the plan in one block, from three the last of several
    // blocks does (with the shared expert, 3 and 4 tokens give 15 and 20 pairs); 13 the
    // CUDA-core prefill kernels.
    for tokens in [1, 2, 3, 4, 8, 13] {
        let x = random(rng, tokens * h);
        let (xc, xg) = pair(cpu, gpu, tokens, h, &x)?;
        // An attention output and a norm for the blocks run as a layer runs them (x the
        // residual stream).
        let norm: Vec<f32> = random(rng, h).iter().map(|v| 1.0 + 0.25 * v).collect();
        let a = pair(cpu, gpu, tokens, h, &random(rng, tokens * h))?;
        let add = AddNorm { a: (&a.0, &a.1), norm: (&cpu.vector(&norm)?, &gpu.vector(&norm)?) };
        // With an always-on shared expert appended too (the folded shared expert of a real block).
        let with_shared = RouterParams { shared: Some(e), ..p };
        let Some((_, rg_shared)) = check_route((cpu, gpu), (&xc, &xg), &router, &with_shared, t)? else { continue };
        let Some((rc, rg)) = check_route((cpu, gpu), (&xc, &xg), &router, &p, t)? else { continue };
        for (fmt, ex_c, ex_g) in &experts {
            let yc = cpu.moe(&xc, ex_c, &rc)?;
            let yg = gpu.moe(&xg, ex_g, &rg)?;
            t.push("moe", format!("{fmt} {e}x[{i},{h}] top-{} x{tokens}", p.top_k), rel_err(&gpu.to_host(&yg)?, &cpu.to_host(&yc)?));
            // The whole block as a layer runs it (at decode the shared expert overlaps the
            // router on a second stream): against the oracle, and bit for bit against the
            // shared expert folded into the routed ones on one stream.
            let yc = cpu.to_host(&cpu.moe_block(&xc, &gate_c, &bias_c, ex_c, &with_shared)?)?;
            let yg = gpu.to_host(&gpu.moe_block(&xg, &gate_g, &bias_g, ex_g, &with_shared)?)?;
            let case = format!("{fmt} {e}x[{i},{h}] top-{} + shared x{tokens}", p.top_k);
            t.push("moe block", case.clone(), rel_err(&yg, &yc));
            let folded = gpu.to_host(&gpu.moe(&xg, ex_g, &rg_shared)?)?;
            t.flag("moe block", case.clone(), yg == folded, "= folded");
            // Decode steps replay as CUDA graphs, the side stream a parallel branch of them.
            let replay = replayed(gpu, || gpu.moe_block(&xg, &gate_g, &bias_g, ex_g, &with_shared))?;
            t.flag("moe block graph", case.clone(), replay == yg, "= eager");
            // The same with the shared expert's kept plan first made inside the capture (the
            // graph then fills a plan of its own).
            let replay = replayed_with(gpu, || gpu.moe_block(&xg, &gate_g, &bias_g, ex_g, &with_shared), || gpu.forget_solo_plans())?;
            t.flag("moe block graph", format!("{case}, plan made in the graph"), replay == yg, "= eager");
            let blocks = (MoeBlock { gate: &gate_c, bias: &bias_c, experts: ex_c, shared: None, router: &with_shared }, MoeBlock { gate: &gate_g, bias: &bias_g, experts: ex_g, shared: None, router: &with_shared });
            check_add_norm_block((cpu, gpu), (&xc, &xg), &add, blocks, &case, t)?;
        }
        // A shared expert stored unlike the routed ones, kept apart (INT8 or FP8 beside INT4
        // experts, as in the real GLM INT4 checkpoints): against the oracle, and replayed.
        for (fmt, ex_c, ex_g) in experts.iter().filter(|(f, ..)| matches!(f, SynthFormat::Int { bits: 4, group: 64, .. })) {
            for (sfmt, sc, sg) in &apart {
                let yc = cpu.to_host(&cpu.moe_block_shared(&xc, &gate_c, &bias_c, ex_c, sc, &p)?)?;
                let yg = gpu.to_host(&gpu.moe_block_shared(&xg, &gate_g, &bias_g, ex_g, sg, &p)?)?;
                let case = format!("{fmt} {e}x[{i},{h}] top-{} + {sfmt} shared x{tokens}", p.top_k);
                t.push("moe block", case.clone(), rel_err(&yg, &yc));
                let replay = replayed(gpu, || gpu.moe_block_shared(&xg, &gate_g, &bias_g, ex_g, sg, &p))?;
                t.flag("moe block graph", case.clone(), replay == yg, "= eager");
                let blocks = (MoeBlock { gate: &gate_c, bias: &bias_c, experts: ex_c, shared: Some(sc), router: &p }, MoeBlock { gate: &gate_g, bias: &bias_g, experts: ex_g, shared: Some(sg), router: &p });
                check_add_norm_block((cpu, gpu), (&xc, &xg), &add, blocks, &case, t)?;
            }
        }
    }
    Ok(())
}

/// The residual add and norm before an MoE block in a layer: the attention output and the
/// norm's weight, on each backend.
struct AddNorm<'a> {
    a: (&'a <CpuBackend as Backend>::Tensor, &'a <CudaBackend as Backend>::Tensor),
    norm: (&'a <CpuBackend as Backend>::Vector, &'a <CudaBackend as Backend>::Vector),
}

/// The post-attention add, norm and MoE block as a layer runs them (`add_norm_moe_block`:
/// the router's logits in the norm's launch unless `DUET_NORM_ROUTER=0`) over the residual `x`:
/// the block's output and the updated residual against the oracle, and replayed as a graph.
fn check_add_norm_block(
    (cpu, gpu): (&CpuBackend, &CudaBackend),
    (xc, xg): (&<CpuBackend as Backend>::Tensor, &<CudaBackend as Backend>::Tensor),
    add: &AddNorm<'_>,
    (block_c, block_g): (MoeBlock<'_, CpuBackend>, MoeBlock<'_, CudaBackend>),
    case: &str,
    t: &mut Table,
) -> Result<()> {
    let (mut rc, mut rg) = (cpu.copy(xc)?, gpu.copy(xg)?);
    let yc = cpu.to_host(&cpu.add_norm_moe_block(&mut rc, add.a.0, add.norm.0, 1e-6, &block_c)?)?;
    let yg = gpu.to_host(&gpu.add_norm_moe_block(&mut rg, add.a.1, add.norm.1, 1e-6, &block_g)?)?;
    t.push("add + norm + moe block", case.to_string(), rel_err(&yg, &yc));
    t.push("add + norm + moe block", format!("{case}: residual"), rel_err(&gpu.to_host(&rg)?, &cpu.to_host(&rc)?));
    let replay = replayed(gpu, || {
        let mut r = gpu.copy(xg)?;
        gpu.add_norm_moe_block(&mut r, add.a.1, add.norm.1, 1e-6, &block_g)
    })?;
    t.flag("add + norm + moe block graph", case.to_string(), replay == yg, "= eager");
    Ok(())
}

/// The output of `f` captured into a CUDA graph and replayed once (into a buffer made outside the
/// graph, zeroed, so a replay that wrote nothing shows).
fn replayed(gpu: &CudaBackend, f: impl Fn() -> Result<<CudaBackend as Backend>::Tensor>) -> Result<Vec<f32>> {
    replayed_with(gpu, f, || ())
}

/// `replayed`, with `before` run between the eager call and the capture.
fn replayed_with(gpu: &CudaBackend, f: impl Fn() -> Result<<CudaBackend as Backend>::Tensor>, before: impl FnOnce()) -> Result<Vec<f32>> {
    let cuda = |e: cudarc::driver::DriverError| anyhow::anyhow!("CUDA graph: {e:?}");
    let probe = f()?;
    let mut out = gpu.tensor(probe.rows, probe.cols, &vec![0.0; probe.rows * probe.cols])?;
    drop(probe);
    gpu.synchronize()?;
    before();
    let stream = gpu.stream();
    let graph = crate::backend::cuda::graphs::record(gpu, || f().and_then(|y| stream.memcpy_dtod(&y.buf, &mut out.buf).map_err(cuda)))?;
    graph.launch()?;
    gpu.to_host(&out)
}

/// The transformers fixtures through the whole model on the GPU.
fn check_fixtures(dir: &Path, t: &mut Table) -> Result<()> {
    for variant in ["bf16", "fp8", "int4-fp8mtp"] {
        let d = dir.join(variant);
        if !d.exists() {
            t.flag("fixture", format!("{variant}: {} missing", d.display()), false, "missing");
            continue;
        }
        let ck = Checkpoint::open(&d)?;
        let expected = crate::checkpoint::safetensors::SafetensorsFile::open(&d.join("expected.safetensors"))?;
        let get = |n: &str| expected.view(n).ok_or_else(|| anyhow::anyhow!("expected.safetensors lacks {n}"));
        let ids: Vec<u32> = get("eval_ids")?.to_i64()?.iter().map(|&v| v as u32).collect();
        let want_logits = get("logits")?.to_f32()?;
        let model = Model::load(CudaBackend::new(0)?, &ck, ModelParts::whole(&ck))?;
        let mut cache = model.new_cache(ids.len() + 64)?;
        let h = model.forward(&ids, &Batch::single(0, 0, ids.len()), &mut cache)?;
        let logits = model.backend.to_host(&model.logits(&h)?)?;
        let max = logits.iter().zip(&want_logits).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        t.push("fixture logits", format!("{variant}: {} tokens vs transformers (max {max:.1e})", ids.len()), rel_err(&logits, &want_logits));
        let prompt: Vec<u32> = get("prompt_ids")?.to_i64()?.iter().map(|&v| v as u32).collect();
        let want: Vec<u32> = get("greedy_ids")?.to_i64()?.iter().map(|&v| v as u32).collect();
        let opts = crate::generate::GenerateOptions {
            max_new_tokens: want.len(),
            sampling: Default::default(),
            stop_ids: vec![],
            ignore_eos: true,
        };
        let got = crate::generate::generate(&model, &prompt, &opts, |_| Ok(()))?;
        t.flag("fixture greedy", format!("{variant}: {} tokens with the cache", want.len()), got.token_ids == want, "identical");
        // Decode steps replayed as CUDA graphs against the same steps run eagerly.
        let (mut graphed, mut eager) = (model.new_cache(prompt.len() + 16)?, model.new_cache(prompt.len() + 16)?);
        let whole = Batch::single(0, 0, prompt.len());
        model.forward(&prompt, &whole, &mut graphed)?;
        model.forward(&prompt, &whole, &mut eager)?;
        let mut worst = 0f64;
        for (i, &id) in want.iter().take(6).enumerate() {
            let batch = Batch::single(0, prompt.len() + i, 1);
            let g = model.backend.to_host(&model.decode_logits(&[id], &batch, &mut graphed)?)?;
            let e = model.backend.to_host(&model.logits(&model.forward(&[id], &batch, &mut eager)?)?)?;
            worst = worst.max(rel_err(&g, &e));
        }
        let replays = graphed.graphs.replays;
        t.push("decode graph", format!("{variant}: 6 steps ({replays} replayed) vs eager"), worst);
        if crate::backend::cuda::graphs::enabled() {
            t.flag("decode graph", format!("{variant}: steps 2-6 replayed"), replays == 5, &format!("{replays} of 5"));
        }
    }
    Ok(())
}
