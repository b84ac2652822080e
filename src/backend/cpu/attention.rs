//! Absorbed multi-head latent attention and the DSA lightning indexer on the CPU.
//!
//! The cache keeps, per sequence and slot, the normalized latent `c_t` with the roped key
//! `k_pe_t` (one row of `latent + rope` values per position), and the indexer key of full
//! indexer layers. Attention of query position p reads positions 0..=p (or its DSA selection).

use std::collections::HashMap;

use anyhow::{bail, Result};
use rayon::prelude::*;

use super::gemm::{axpy, dot};
use super::{CpuStep, CpuTensor};
use crate::backend::{CacheSpec, IndexDims, MlaDims};

/// Rotates `x` (length 2·half) by the row's angles: adjacent pairs when `interleaved`, else
/// the halves `(i, i + half)`.
pub fn rope(x: &mut [f32], cos: &[f32], sin: &[f32], interleaved: bool) {
    let half = cos.len();
    for i in 0..half {
        let (a, b) = if interleaved { (2 * i, 2 * i + 1) } else { (i, i + half) };
        let (xa, xb) = (x[a], x[b]);
        x[a] = xa * cos[i] - xb * sin[i];
        x[b] = xb * cos[i] + xa * sin[i];
    }
}

/// `w ⊙ x / sqrt(mean(x²) + eps)`, in f32 as transformers computes it.
pub fn rms_norm_row(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let ms = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let r = 1.0 / (ms + eps).sqrt();
    for ((o, v), g) in out.iter_mut().zip(x).zip(w) {
        *o = g * (v * r);
    }
}

#[derive(Default)]
struct SlotCache {
    /// `[positions, latent + rope]`
    mla: Vec<f32>,
    /// `[positions, index_dim]`
    index: Vec<f32>,
}

pub struct CpuCache {
    spec: CacheSpec,
    seqs: HashMap<u64, Vec<SlotCache>>,
}

impl CpuCache {
    pub fn new(spec: &CacheSpec) -> CpuCache {
        CpuCache { spec: spec.clone(), seqs: HashMap::new() }
    }

    pub fn release(&mut self, seq: u64) {
        self.seqs.remove(&seq);
    }

    fn slot_mut(&mut self, seq: u64, slot: usize) -> &mut SlotCache {
        let n = self.spec.slot_has_index.len();
        &mut self.seqs.entry(seq).or_insert_with(|| (0..n).map(|_| SlotCache::default()).collect())[slot]
    }

    fn slot(&self, seq: u64, slot: usize) -> Result<&SlotCache> {
        match self.seqs.get(&seq) {
            Some(s) => Ok(&s[slot]),
            None => bail!("no cache for sequence {seq}"),
        }
    }
}

/// Writes `row` at `pos` of a `[positions, width]` buffer, growing it as needed.
fn put_row(buf: &mut Vec<f32>, width: usize, pos: usize, row: &[f32]) {
    if buf.len() < (pos + 1) * width {
        buf.resize((pos + 1) * width, 0.0);
    }
    buf[pos * width..(pos + 1) * width].copy_from_slice(row);
}

/// The sequence id of every row of the step.
fn row_seqs(step: &CpuStep) -> Vec<u64> {
    step.batch.segments.iter().flat_map(|s| std::iter::repeat_n(s.seq, s.len)).collect()
}

pub fn mla_cache_write(kv: &CpuTensor, norm: &[f32], eps: f32, step: &CpuStep, cache: &mut CpuCache, slot: usize) -> Result<()> {
    let (latent, rope_w) = (cache.spec.latent, cache.spec.rope);
    let width = latent + rope_w;
    if kv.cols != width || kv.rows != step.positions.len() {
        bail!("mla_cache_write: kv is [{}, {}], expected [{}, {width}]", kv.rows, kv.cols, step.positions.len());
    }
    let seqs = row_seqs(step);
    let mut row = vec![0f32; width];
    for t in 0..kv.rows {
        let src = &kv.data[t * width..(t + 1) * width];
        rms_norm_row(&src[..latent], norm, eps, &mut row[..latent]);
        row[latent..].copy_from_slice(&src[latent..]);
        rope(&mut row[latent..], step.cos(t), step.sin(t), step.interleaved);
        put_row(&mut cache.slot_mut(seqs[t], slot).mla, width, step.positions[t], &row);
    }
    Ok(())
}

/// `kv_b_proj` dequantized and split per head: rows `h·(nope+v) ..` are `W_UK_h` (nope rows)
/// then `W_UV_h` (v rows), each `latent` wide.
pub struct CpuMlaHeads {
    pub w: Vec<f32>,
    pub dims: MlaDims,
}

impl CpuMlaHeads {
    fn uk(&self, h: usize, d: usize) -> &[f32] {
        let MlaDims { nope, v, latent, .. } = self.dims;
        let r = h * (nope + v) + d;
        &self.w[r * latent..(r + 1) * latent]
    }

    fn uv(&self, h: usize, j: usize) -> &[f32] {
        let MlaDims { nope, v, latent, .. } = self.dims;
        let r = h * (nope + v) + nope + j;
        &self.w[r * latent..(r + 1) * latent]
    }
}

pub fn mla_queries(q: &CpuTensor, heads: &CpuMlaHeads, step: &CpuStep) -> Result<(CpuTensor, CpuTensor)> {
    let MlaDims { heads: nh, nope, rope: rw, latent, .. } = heads.dims;
    let qd = nope + rw;
    if q.cols != nh * qd || q.rows != step.positions.len() {
        bail!("mla_queries: q is [{}, {}], expected [{}, {}]", q.rows, q.cols, step.positions.len(), nh * qd);
    }
    let t_rows = q.rows;
    let mut q_lat = vec![0f32; t_rows * nh * latent];
    q_lat.par_chunks_mut(latent).enumerate().for_each(|(i, out)| {
        let (t, h) = (i / nh, i % nh);
        let qn = &q.data[t * nh * qd + h * qd..t * nh * qd + h * qd + nope];
        for (d, &v) in qn.iter().enumerate() {
            axpy(out, v, heads.uk(h, d));
        }
    });
    let mut q_pe = vec![0f32; t_rows * nh * rw];
    for t in 0..t_rows {
        for h in 0..nh {
            let src = &q.data[t * nh * qd + h * qd + nope..t * nh * qd + (h + 1) * qd];
            let dst = &mut q_pe[(t * nh + h) * rw..(t * nh + h + 1) * rw];
            dst.copy_from_slice(src);
            rope(dst, step.cos(t), step.sin(t), step.interleaved);
        }
    }
    Ok((CpuTensor::new(t_rows, nh * latent, q_lat), CpuTensor::new(t_rows, nh * rw, q_pe)))
}

/// The DSA choice of every query row: the cached positions it attends to.
pub struct CpuSelection {
    pub rows: Vec<Vec<u32>>,
}

pub fn mla_attend(
    q_lat: &CpuTensor,
    q_pe: &CpuTensor,
    cache: &CpuCache,
    slot: usize,
    step: &CpuStep,
    sel: Option<&CpuSelection>,
    dims: &MlaDims,
) -> Result<CpuTensor> {
    let MlaDims { heads: nh, rope: rw, latent, scale, .. } = *dims;
    let width = latent + rw;
    let t_rows = q_lat.rows;
    let seqs = row_seqs(step);
    // Resolve each row's cache and DSA key list up front, once for all heads (errors are
    // reported, not panicked).
    let mut per_row = Vec::with_capacity(t_rows);
    for t in 0..t_rows {
        let c = &cache.slot(seqs[t], slot)?.mla;
        let pos = step.positions[t];
        if c.len() < (pos + 1) * width {
            bail!("mla_attend: sequence {} has {} cached positions, query at {pos}", seqs[t], c.len() / width);
        }
        let selected: Option<Vec<usize>> = sel.map(|s| s.rows[t].iter().map(|&p| p as usize).filter(|&p| p <= pos).collect());
        per_row.push((c, selected));
    }
    let mut out = vec![0f32; t_rows * nh * latent];
    out.par_chunks_mut(latent).enumerate().for_each(|(i, o)| {
        let (t, h) = (i / nh, i % nh);
        let (c, selected) = &per_row[t];
        let pos = step.positions[t];
        let ql = &q_lat.data[(t * nh + h) * latent..(t * nh + h + 1) * latent];
        let qp = &q_pe.data[(t * nh + h) * rw..(t * nh + h + 1) * rw];
        // Dense attention lists every position (built per head: one list per row of a long
        // prefill would take T·pos memory).
        let all: Vec<usize>;
        let keys: &[usize] = match selected {
            Some(k) => k,
            None => {
                all = (0..=pos).collect();
                &all
            }
        };
        let mut scores: Vec<f32> = keys
            .iter()
            .map(|&p| {
                let row = &c[p * width..(p + 1) * width];
                (dot(ql, &row[..latent]) + dot(qp, &row[latent..])) * scale
            })
            .collect();
        let max = scores.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0f32;
        for s in scores.iter_mut() {
            *s = (*s - max).exp();
            sum += *s;
        }
        for (s, &p) in scores.iter().zip(keys) {
            axpy(o, s / sum, &c[p * width..p * width + latent]);
        }
    });
    Ok(CpuTensor::new(t_rows, nh * latent, out))
}

pub fn mla_values(o_lat: &CpuTensor, heads: &CpuMlaHeads) -> Result<CpuTensor> {
    let MlaDims { heads: nh, v, latent, .. } = heads.dims;
    if o_lat.cols != nh * latent {
        bail!("mla_values: input has {} columns, expected {}", o_lat.cols, nh * latent);
    }
    let t_rows = o_lat.rows;
    let mut out = vec![0f32; t_rows * nh * v];
    out.par_chunks_mut(v).enumerate().for_each(|(i, o)| {
        let (t, h) = (i / nh, i % nh);
        let ol = &o_lat.data[(t * nh + h) * latent..(t * nh + h + 1) * latent];
        for (j, oj) in o.iter_mut().enumerate() {
            *oj = dot(heads.uv(h, j), ol);
        }
    });
    Ok(CpuTensor::new(t_rows, nh * v, out))
}

#[allow(clippy::too_many_arguments)]
pub fn index_cache_write(
    k: &CpuTensor,
    norm_w: &[f32],
    norm_b: &[f32],
    eps: f32,
    step: &CpuStep,
    cache: &mut CpuCache,
    slot: usize,
) -> Result<()> {
    let d = cache.spec.index_dim;
    let rw = cache.spec.rope;
    if k.cols != d || k.rows != step.positions.len() {
        bail!("index_cache_write: k is [{}, {}], expected [{}, {d}]", k.rows, k.cols, step.positions.len());
    }
    if !cache.spec.slot_has_index[slot] {
        bail!("index_cache_write: slot {slot} keeps no indexer keys");
    }
    let seqs = row_seqs(step);
    let mut row = vec![0f32; d];
    for t in 0..k.rows {
        let src = &k.data[t * d..(t + 1) * d];
        let mean = src.iter().sum::<f32>() / d as f32;
        let var = src.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / d as f32;
        let r = 1.0 / (var + eps).sqrt();
        for i in 0..d {
            row[i] = (src[i] - mean) * r * norm_w[i] + norm_b[i];
        }
        rope(&mut row[..rw], step.cos(t), step.sin(t), step.indexer_interleaved);
        put_row(&mut cache.slot_mut(seqs[t], slot).index, d, step.positions[t], &row);
    }
    Ok(())
}

/// Indices of the `k` largest scores (ties broken towards earlier positions).
pub fn top_k(scores: &[f32], k: usize) -> Vec<u32> {
    let mut idx: Vec<u32> = (0..scores.len() as u32).collect();
    if k < idx.len() {
        let cmp = |a: &u32, b: &u32| scores[*b as usize].total_cmp(&scores[*a as usize]).then(a.cmp(b));
        idx.select_nth_unstable_by(k - 1, cmp);
        idx.truncate(k);
    }
    idx
}

pub fn index_select(q: &CpuTensor, w: &CpuTensor, cache: &CpuCache, slot: usize, step: &CpuStep, dims: &IndexDims) -> Result<CpuSelection> {
    let IndexDims { heads: nh, head_dim: d, rope: rw, topk } = *dims;
    if q.cols != nh * d || w.cols != nh || q.rows != step.positions.len() || w.rows != q.rows {
        bail!("index_select: q [{}, {}] / w [{}, {}] do not match {nh} heads of {d}", q.rows, q.cols, w.rows, w.cols);
    }
    let seqs = row_seqs(step);
    let mut keys = Vec::with_capacity(q.rows);
    for t in 0..q.rows {
        let k = &cache.slot(seqs[t], slot)?.index;
        if k.len() < (step.positions[t] + 1) * d {
            bail!("index_select: sequence {} lacks indexer keys up to position {}", seqs[t], step.positions[t]);
        }
        keys.push(k);
    }
    let q_scale = (d as f32).powf(-0.5);
    let w_scale = (nh as f32).powf(-0.5);
    let rows = (0..q.rows)
        .into_par_iter()
        .map(|t| {
            let pos = step.positions[t];
            let n = pos + 1;
            if n <= topk {
                return (0..n as u32).collect();
            }
            let mut qh = q.data[t * nh * d..(t + 1) * nh * d].to_vec();
            for h in 0..nh {
                rope(&mut qh[h * d..h * d + rw], step.cos(t), step.sin(t), step.indexer_interleaved);
            }
            let wt: Vec<f32> = w.data[t * nh..(t + 1) * nh].iter().map(|v| v * w_scale).collect();
            let scores: Vec<f32> = (0..n)
                .map(|s| {
                    let ks = &keys[t][s * d..(s + 1) * d];
                    (0..nh).map(|h| wt[h] * (dot(&qh[h * d..(h + 1) * d], ks) * q_scale).max(0.0)).sum()
                })
                .collect();
            top_k(&scores, topk)
        })
        .collect();
    Ok(CpuSelection { rows })
}
