//! The reference backend: f32 arithmetic on weights dequantized on the fly, on every core.
//! It runs in CI and is the oracle for every faster backend.

pub mod attention;
pub mod gemm;
pub mod moe;

use anyhow::{bail, Result};

use self::attention::{CpuCache, CpuMlaHeads, CpuSelection};
use self::gemm::Stacked;
use self::moe::CpuRouting;
use super::{stacked_cols, Backend, Batch, CacheSpec, ExpertWeights, IndexDims, MlaDims, RopeSpec, RouterParams};
use crate::checkpoint::LinearWeight;

#[derive(Clone, Debug, PartialEq)]
pub struct CpuTensor {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f32>,
}

impl CpuTensor {
    pub fn new(rows: usize, cols: usize, data: Vec<f32>) -> CpuTensor {
        debug_assert_eq!(rows * cols, data.len());
        CpuTensor { rows, cols, data }
    }

    pub fn row(&self, r: usize) -> &[f32] {
        &self.data[r * self.cols..(r + 1) * self.cols]
    }
}

/// Positions and rope angles (`cos`/`sin` per row, one per rotated pair).
pub struct CpuStep {
    pub batch: Batch,
    pub positions: Vec<usize>,
    half: usize,
    cos: Vec<f32>,
    sin: Vec<f32>,
    pub interleaved: bool,
    pub indexer_interleaved: bool,
}

impl CpuStep {
    pub fn cos(&self, row: usize) -> &[f32] {
        &self.cos[row * self.half..(row + 1) * self.half]
    }

    pub fn sin(&self, row: usize) -> &[f32] {
        &self.sin[row * self.half..(row + 1) * self.half]
    }
}

/// `silu(x[:, :n]) · x[:, n:]` over `rows` rows of width `2n`.
pub fn swiglu_rows(x: &[f32], rows: usize, width: usize) -> Vec<f32> {
    let n = width / 2;
    let mut out = vec![0f32; rows * n];
    for r in 0..rows {
        let (g, u) = x[r * width..(r + 1) * width].split_at(n);
        for i in 0..n {
            out[r * n + i] = g[i] / (1.0 + (-g[i]).exp()) * u[i];
        }
    }
    out
}

#[derive(Clone, Copy, Debug, Default)]
pub struct CpuBackend;

fn same_shape(op: &str, a: &CpuTensor, b: &CpuTensor) -> Result<()> {
    if a.rows != b.rows || a.cols != b.cols {
        bail!("{op}: shapes [{}, {}] and [{}, {}] differ", a.rows, a.cols, b.rows, b.cols);
    }
    Ok(())
}

impl Backend for CpuBackend {
    type Tensor = CpuTensor;
    type Weight = Stacked;
    type Vector = Vec<f32>;
    type MlaHeads = CpuMlaHeads;
    type Experts = Vec<(Stacked, Stacked)>;
    type Cache = CpuCache;
    type Step = CpuStep;
    type Selection = CpuSelection;
    type Routing = CpuRouting;

    fn name(&self) -> &'static str {
        "cpu"
    }

    fn weight(&self, w: &LinearWeight) -> Result<Stacked> {
        self.weight_stacked(std::slice::from_ref(w))
    }

    fn weight_stacked(&self, parts: &[LinearWeight]) -> Result<Stacked> {
        let cols = stacked_cols(parts)?;
        Ok(Stacked { parts: parts.to_vec(), rows: parts.iter().map(|p| p.rows).sum(), cols })
    }

    fn vector(&self, v: &[f32]) -> Result<Vec<f32>> {
        Ok(v.to_vec())
    }

    fn mla_heads(&self, kv_b: &LinearWeight, dims: &MlaDims) -> Result<CpuMlaHeads> {
        dims.check_kv_b(kv_b)?;
        Ok(CpuMlaHeads { w: kv_b.to_f32(), dims: *dims })
    }

    fn experts(&self, experts: &[ExpertWeights]) -> Result<Vec<(Stacked, Stacked)>> {
        experts
            .iter()
            .map(|e| Ok((self.weight_stacked(&[e.gate.clone(), e.up.clone()])?, self.weight(&e.down)?)))
            .collect()
    }

    fn new_cache(&self, spec: &CacheSpec) -> Result<CpuCache> {
        Ok(CpuCache::new(spec))
    }

    fn release(&self, cache: &mut CpuCache, seq: u64) {
        cache.release(seq);
    }

    fn prepare(&self, batch: &Batch, rope: &RopeSpec, _cache: &mut CpuCache) -> Result<CpuStep> {
        let positions = batch.positions();
        let half = rope.inv_freq.len();
        let (cos, sin) = rope.angles(&positions);
        Ok(CpuStep {
            batch: batch.clone(),
            positions,
            half,
            cos,
            sin,
            interleaved: rope.interleaved,
            indexer_interleaved: rope.indexer_interleaved,
        })
    }

    fn tensor(&self, rows: usize, cols: usize, data: &[f32]) -> Result<CpuTensor> {
        if data.len() != rows * cols {
            bail!("tensor: {} values for [{rows}, {cols}]", data.len());
        }
        Ok(CpuTensor::new(rows, cols, data.to_vec()))
    }

    fn selection_to_host(&self, sel: &CpuSelection, rows: usize) -> Result<(usize, Vec<i32>)> {
        if sel.rows.len() != rows {
            bail!("selection has {} rows, expected {rows}", sel.rows.len());
        }
        let topk = sel.rows.iter().map(Vec::len).max().unwrap_or(0);
        let mut out = vec![-1i32; rows * topk];
        for (r, picks) in sel.rows.iter().enumerate() {
            for (j, &p) in picks.iter().enumerate() {
                out[r * topk + j] = p as i32;
            }
        }
        Ok((topk, out))
    }

    fn selection_from_host(&self, rows: usize, topk: usize, data: &[i32]) -> Result<CpuSelection> {
        if data.len() != rows * topk {
            bail!("selection of {} values for [{rows}, {topk}]", data.len());
        }
        Ok(CpuSelection { rows: data.chunks(topk.max(1)).take(rows).map(|r| r.iter().filter(|&&p| p >= 0).map(|&p| p as u32).collect()).collect() })
    }

    fn to_host(&self, t: &CpuTensor) -> Result<Vec<f32>> {
        Ok(t.data.clone())
    }

    fn shape(&self, t: &CpuTensor) -> (usize, usize) {
        (t.rows, t.cols)
    }

    fn embed(&self, table: &Stacked, ids: &[u32]) -> Result<CpuTensor> {
        let h = table.cols;
        let mut out = vec![0f32; ids.len() * h];
        for (i, &id) in ids.iter().enumerate() {
            if id as usize >= table.rows {
                bail!("token id {id} is outside the vocabulary ({} rows)", table.rows);
            }
            table.dequant_rows(id as usize, 1, &mut out[i * h..(i + 1) * h]);
        }
        Ok(CpuTensor::new(ids.len(), h, out))
    }

    fn linear(&self, x: &CpuTensor, w: &Stacked) -> Result<CpuTensor> {
        if x.cols != w.cols {
            let name = w.parts.first().map_or("?", |p| p.module.as_str());
            bail!("linear {name}: input has {} columns, weight expects {}", x.cols, w.cols);
        }
        Ok(CpuTensor::new(x.rows, w.rows, gemm::linear(&x.data, x.rows, w)))
    }

    fn rms_norm(&self, x: &CpuTensor, w: &Vec<f32>, eps: f32) -> Result<CpuTensor> {
        if w.len() != x.cols {
            bail!("rms_norm: weight of {} for rows of {}", w.len(), x.cols);
        }
        let mut out = vec![0f32; x.data.len()];
        for r in 0..x.rows {
            attention::rms_norm_row(x.row(r), w, eps, &mut out[r * x.cols..(r + 1) * x.cols]);
        }
        Ok(CpuTensor::new(x.rows, x.cols, out))
    }

    fn add_assign(&self, a: &mut CpuTensor, b: &CpuTensor) -> Result<()> {
        same_shape("add", a, b)?;
        a.data.iter_mut().zip(&b.data).for_each(|(x, y)| *x += y);
        Ok(())
    }

    fn swiglu(&self, x: &CpuTensor) -> Result<CpuTensor> {
        if !x.cols.is_multiple_of(2) {
            bail!("swiglu: odd width {}", x.cols);
        }
        Ok(CpuTensor::new(x.rows, x.cols / 2, swiglu_rows(&x.data, x.rows, x.cols)))
    }

    fn concat_cols(&self, a: &CpuTensor, b: &CpuTensor) -> Result<CpuTensor> {
        if a.rows != b.rows {
            bail!("concat: {} rows and {} rows", a.rows, b.rows);
        }
        let mut out = Vec::with_capacity(a.data.len() + b.data.len());
        for r in 0..a.rows {
            out.extend_from_slice(a.row(r));
            out.extend_from_slice(b.row(r));
        }
        Ok(CpuTensor::new(a.rows, a.cols + b.cols, out))
    }

    fn select_rows(&self, x: &CpuTensor, rows: &[usize]) -> Result<CpuTensor> {
        let mut out = Vec::with_capacity(rows.len() * x.cols);
        for &r in rows {
            if r >= x.rows {
                bail!("select_rows: row {r} of {}", x.rows);
            }
            out.extend_from_slice(x.row(r));
        }
        Ok(CpuTensor::new(rows.len(), x.cols, out))
    }

    fn copy(&self, x: &CpuTensor) -> Result<CpuTensor> {
        Ok(x.clone())
    }

    fn mla_cache_write(&self, kv: &CpuTensor, norm: &Vec<f32>, eps: f32, step: &CpuStep, cache: &mut CpuCache, slot: usize) -> Result<()> {
        attention::mla_cache_write(kv, norm, eps, step, cache, slot)
    }

    fn mla_queries(&self, q: &CpuTensor, heads: &CpuMlaHeads, step: &CpuStep) -> Result<(CpuTensor, CpuTensor)> {
        attention::mla_queries(q, heads, step)
    }

    fn mla_attend(
        &self,
        q_lat: &CpuTensor,
        q_rope: &CpuTensor,
        cache: &CpuCache,
        slot: usize,
        step: &CpuStep,
        sel: Option<&CpuSelection>,
        dims: &MlaDims,
    ) -> Result<CpuTensor> {
        attention::mla_attend(q_lat, q_rope, cache, slot, step, sel, dims)
    }

    fn mla_values(&self, o_lat: &CpuTensor, heads: &CpuMlaHeads) -> Result<CpuTensor> {
        attention::mla_values(o_lat, heads)
    }

    fn index_cache_write(
        &self,
        k: &CpuTensor,
        norm_w: &Vec<f32>,
        norm_b: &Vec<f32>,
        eps: f32,
        step: &CpuStep,
        cache: &mut CpuCache,
        slot: usize,
    ) -> Result<()> {
        attention::index_cache_write(k, norm_w, norm_b, eps, step, cache, slot)
    }

    fn index_select(&self, q: &CpuTensor, w: &CpuTensor, cache: &CpuCache, slot: usize, step: &CpuStep, dims: &IndexDims) -> Result<CpuSelection> {
        attention::index_select(q, w, cache, slot, step, dims)
    }

    fn route(&self, x: &CpuTensor, gate: &Stacked, bias: &Vec<f32>, p: &RouterParams) -> Result<CpuRouting> {
        moe::route(x, gate, bias, p)
    }

    fn moe(&self, x: &CpuTensor, experts: &Vec<(Stacked, Stacked)>, routing: &CpuRouting) -> Result<CpuTensor> {
        moe::moe(x, experts, routing)
    }

    fn expert_all(&self, x: &CpuTensor, e: &Vec<(Stacked, Stacked)>) -> Result<CpuTensor> {
        moe::moe(x, e, &CpuRouting { top_k: 1, experts: vec![0; x.rows], weights: vec![1.0; x.rows] })
    }
}
