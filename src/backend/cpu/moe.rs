//! The MoE router and routed experts on the CPU.

use anyhow::{bail, Result};

use super::gemm::{linear, Stacked};
use super::{swiglu_rows, CpuTensor};
use crate::backend::RouterParams;

/// Each row's experts (`top_k` per row) and their combine weights.
pub struct CpuRouting {
    pub top_k: usize,
    pub experts: Vec<u32>,
    pub weights: Vec<f32>,
}

/// Picks experts for one row of sigmoid scores. Selection uses `scores + bias`, limited to the
/// `topk_group` groups with the largest sum of their two best biased scores; the combine weights
/// come from the unbiased scores, optionally normalized, times the routed scaling factor.
pub fn route_row(scores: &[f32], bias: &[f32], p: &RouterParams) -> (Vec<u32>, Vec<f32>) {
    let n = scores.len();
    let mut choice: Vec<f32> = scores.iter().zip(bias).map(|(s, b)| s + b).collect();
    if p.n_group > 1 {
        let per = n / p.n_group;
        let group_scores: Vec<f32> = choice
            .chunks(per)
            .map(|g| {
                let best = super::attention::top_k(g, 2);
                best.iter().map(|&i| g[i as usize]).sum()
            })
            .collect();
        let keep = super::attention::top_k(&group_scores, p.topk_group);
        for g in 0..p.n_group {
            if !keep.contains(&(g as u32)) {
                choice[g * per..(g + 1) * per].iter_mut().for_each(|v| *v = f32::NEG_INFINITY);
            }
        }
    }
    let idx = super::attention::top_k(&choice, p.top_k);
    let mut w: Vec<f32> = idx.iter().map(|&i| scores[i as usize]).collect();
    if p.norm_topk_prob {
        let denom = w.iter().sum::<f32>() + 1e-20;
        w.iter_mut().for_each(|v| *v /= denom);
    }
    w.iter_mut().for_each(|v| *v *= p.scaling);
    (idx, w)
}

pub fn route(x: &CpuTensor, gate: &Stacked, bias: &[f32], p: &RouterParams) -> Result<CpuRouting> {
    if gate.cols != x.cols || bias.len() != gate.rows {
        bail!("route: gate [{}, {}] / bias {} do not fit input width {}", gate.rows, gate.cols, bias.len(), x.cols);
    }
    let logits = linear(&x.data, x.rows, gate);
    let n = gate.rows;
    let k1 = p.top_k + p.shared.is_some() as usize;
    let mut experts = Vec::with_capacity(x.rows * k1);
    let mut weights = Vec::with_capacity(x.rows * k1);
    for t in 0..x.rows {
        let scores: Vec<f32> = logits[t * n..(t + 1) * n].iter().map(|z| 1.0 / (1.0 + (-z).exp())).collect();
        let (i, w) = route_row(&scores, bias, p);
        experts.extend(i);
        weights.extend(w);
        if let Some(s) = p.shared {
            experts.push(s as u32);
            weights.push(1.0);
        }
    }
    Ok(CpuRouting { top_k: k1, experts, weights })
}

pub fn moe(x: &CpuTensor, experts: &[(Stacked, Stacked)], r: &CpuRouting) -> Result<CpuTensor> {
    let h = x.cols;
    let mut out = vec![0f32; x.rows * h];
    // Group rows by expert so each expert's weights are read once per step.
    let mut rows_of: Vec<Vec<(usize, f32)>> = vec![Vec::new(); experts.len()];
    for t in 0..x.rows {
        for k in 0..r.top_k {
            let e = r.experts[t * r.top_k + k] as usize;
            if e >= experts.len() {
                bail!("moe: routed to expert {e} of {}", experts.len());
            }
            rows_of[e].push((t, r.weights[t * r.top_k + k]));
        }
    }
    for (e, rows) in rows_of.iter().enumerate() {
        if rows.is_empty() {
            continue;
        }
        let (gate_up, down) = &experts[e];
        let xs: Vec<f32> = rows.iter().flat_map(|(t, _)| x.data[t * h..(t + 1) * h].iter().copied()).collect();
        let gu = linear(&xs, rows.len(), gate_up);
        let act = swiglu_rows(&gu, rows.len(), gate_up.rows);
        let y = linear(&act, rows.len(), down);
        for (i, (t, g)) in rows.iter().enumerate() {
            for (o, v) in out[t * h..(t + 1) * h].iter_mut().zip(&y[i * h..(i + 1) * h]) {
                *o += v * g;
            }
        }
    }
    Ok(CpuTensor::new(x.rows, h, out))
}
