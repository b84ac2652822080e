//! The MoE block on the GPU: router, expert plan, grouped expert GEMVs and the combine
//! (kernels/linear.cu, kernels/linear_mma.cu).

use anyhow::{bail, Result};
use cudarc::driver::CudaSlice;

use super::linear::{threads_for, MMA_MAX_TOKENS};
use super::weights::{CudaExperts, CudaWeight, WDesc};
use super::{Arg, CudaBackend, CudaRouting, CudaTensor, CudaVector};
use crate::backend::{Backend, RouterParams};

/// The router's gate GEMV and the sigmoid / group top-k selection (plus the plan at decode).
pub(super) fn route(gpu: &CudaBackend, x: &CudaTensor, gate: &CudaWeight, bias: &CudaVector, p: &RouterParams) -> Result<CudaRouting> {
    let e = gate.rows;
    if bias.0.len() != e {
        bail!("route: bias of {} for {e} experts", bias.0.len());
    }
    if p.n_group > 64 || p.topk_group > 64 || p.top_k > 64 {
        bail!("route: at most 64 expert groups and 64 experts per token are supported");
    }
    let logits = gpu.linear(x, gate)?;
    let k1 = p.top_k + p.shared.is_some() as usize;
    let pairs = x.rows * k1;
    let idx = gpu.alloc_indices(pairs)?;
    let weights = gpu.alloc(pairs)?;
    // Decode steps get their plan from the router's last block (one launch fewer); the
    // plan counts the appended shared expert too.
    let plan_experts = p.shared.map_or(e, |s| e.max(s + 1));
    let plan = if x.rows > 0 && x.rows <= MMA_MAX_TOKENS { Some((gpu.alloc_indices(2 + 3 * pairs)?, plan_experts)) } else { None };
    if x.rows > 0 {
        let smem = (2 * e + p.n_group).max(if plan.is_some() { plan_experts + pairs } else { 0 }) * 4;
        gpu.launch(
            "moe_route",
            (x.rows as u32, 1, 1),
            256,
            smem,
            &[
                Arg::Ptr(gpu.ptr(&logits.buf)),
                Arg::Ptr(gpu.ptr(&bias.0)),
                Arg::Ptr(gpu.ptr(&idx)),
                Arg::Ptr(gpu.ptr(&weights)),
                Arg::I32(e as i32),
                Arg::I32(p.n_group as i32),
                Arg::I32(p.topk_group as i32),
                Arg::I32(p.top_k as i32),
                Arg::I32(p.norm_topk_prob as i32),
                Arg::F32(p.scaling),
                Arg::I32(p.shared.map_or(-1, |s| s as i32)),
                Arg::Ptr(plan.as_ref().map_or(0, |(b, _)| gpu.ptr(b))),
                Arg::Ptr(gpu.ptr(&gpu.route_done)),
                Arg::I32(plan_experts as i32),
            ],
        )?;
    }
    Ok(CudaRouting { top_k: k1, idx, weights, plan })
}

/// The routed (and folded shared) experts of a step, grouped by expert, and their weighted sum.
pub(super) fn moe(gpu: &CudaBackend, x: &CudaTensor, experts: &CudaExperts, routing: &CudaRouting) -> Result<CudaTensor> {
    let (t, k, i, h) = (x.rows, routing.top_k, experts.inter, experts.hidden);
    if x.cols != h {
        bail!("moe: input has {} columns, experts expect {h}", x.cols);
    }
    let out = gpu.tensor_of(t, h)?;
    if t == 0 {
        return Ok(out);
    }
    let pairs = t * k;
    let groups = pairs.min(experts.count) as u32;
    // Pairs grouped by expert: [groups | expert per group | offsets | pairs], from the
    // router when it made one for these experts.
    let built;
    let plan = match &routing.plan {
        Some((plan, n)) if *n == experts.count => plan,
        _ => {
            built = gpu.alloc_indices(2 + 3 * pairs)?;
            // The routes are staged in shared memory when they fit in 64 KB with the counts.
            let staged = (experts.count + pairs) * 4 <= 64 * 1024;
            gpu.launch(
                "moe_plan",
                (1, 1, 1),
                256,
                (experts.count + if staged { pairs } else { 0 }) * 4,
                &[Arg::Ptr(gpu.ptr(&routing.idx)), Arg::I32(pairs as i32), Arg::I32(experts.count as i32), Arg::I32(staged as i32), Arg::Ptr(gpu.ptr(&built))],
            )?;
            &built
        }
    };
    let act = gpu.alloc(pairs * i)?;
    let part = gpu.alloc(pairs * h)?;
    let plan_args = |table: &CudaSlice<WDesc>| [Arg::Ptr(gpu.ptr(table)), Arg::Ptr(gpu.ptr(plan)), Arg::I32(pairs as i32)];
    if experts.mma && t <= MMA_MAX_TOKENS {
        // Tensor cores: 8 gate rows with their up rows per tile, then 16 down rows.
        let xs = gpu.split(x, experts.fmt_gate_up)?;
        let [a, b, c] = plan_args(&experts.gate_up_table);
        gpu.launch_mma(
            "moe_gate_up_mma",
            experts.fmt_gate_up,
            ((i as u32).div_ceil(8), groups, 1),
            h,
            &[a, b, c, Arg::Ptr(gpu.ptr(&xs.data)), Arg::Ptr(xs.sums_ptr(gpu)), Arg::Ptr(gpu.ptr(&xs.exps)), Arg::Ptr(gpu.ptr(&act)), Arg::I32(k as i32), Arg::I32(i as i32)],
        )?;
        let act = CudaTensor::new(pairs, i, act);
        let acts = gpu.split(&act, experts.fmt_down)?;
        let [a, b, c] = plan_args(&experts.down_table);
        gpu.launch_mma(
            "moe_down_mma",
            experts.fmt_down,
            ((h as u32).div_ceil(16), groups, 1),
            i,
            &[a, b, c, Arg::Ptr(gpu.ptr(&acts.data)), Arg::Ptr(acts.sums_ptr(gpu)), Arg::Ptr(gpu.ptr(&acts.exps)), Arg::Ptr(gpu.ptr(&part)), Arg::I32(h as i32)],
        )?;
    } else {
        // Decode batches take a group's tokens one per pass (the second read of a tile hits
        // L1/L2, and one token needs the fewest registers); prefill takes eight at a time.
        let (gate_up, down) = if t <= 8 { ("moe_gate_up1", "moe_down1") } else { ("moe_gate_up8", "moe_down8") };
        let [a, b, c] = plan_args(&experts.gate_up_table);
        gpu.launch_kernel(
            (gate_up, Some(experts.fmt_gate_up)),
            ((i as u32).div_ceil(2), groups, 1),
            threads_for(h, experts.fmt_gate_up),
            0,
            &[a, b, c, Arg::Ptr(gpu.ptr(&x.buf)), Arg::Ptr(gpu.ptr(&act)), Arg::I32(k as i32), Arg::I32(i as i32)],
        )?;
        let [a, b, c] = plan_args(&experts.down_table);
        gpu.launch_kernel(
            (down, Some(experts.fmt_down)),
            ((h as u32).div_ceil(4), groups, 1),
            threads_for(i, experts.fmt_down),
            0,
            &[a, b, c, Arg::Ptr(gpu.ptr(&act)), Arg::Ptr(gpu.ptr(&part)), Arg::I32(h as i32)],
        )?;
    }
    gpu.launch(
        "moe_combine",
        CudaBackend::elementwise_grid(t * h),
        256,
        0,
        &[Arg::Ptr(gpu.ptr(&part)), Arg::Ptr(gpu.ptr(&routing.weights)), Arg::Ptr(gpu.ptr(&out.buf)), Arg::I32(t as i32), Arg::I32(k as i32), Arg::I32(h as i32)],
    )?;
    Ok(out)
}
