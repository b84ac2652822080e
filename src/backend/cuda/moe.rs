//! The MoE block on the GPU: router, expert plan, grouped expert GEMVs and the combine
//! (kernels/linear.cu, kernels/linear_mma.cu).

use anyhow::{bail, Result};
use cudarc::driver::CudaSlice;

use super::buffer::DevBuf;
use super::linear::{threads_for, MmaFamily, MmaVariant, Split, MMA_MAX_TOKENS};
use super::weights::{experts_from, upload_expert_weights, CudaExperts, CudaLinear, CudaWeight, WDesc};
use super::{Arg, CudaBackend, CudaRouting, CudaTensor, CudaVector};
use crate::backend::{Backend, ExpertWeights, MoeBlock, RouterParams};

/// The router's gate GEMV and the sigmoid / group top-k selection (plus the plan at decode).
pub(super) fn route(gpu: &CudaBackend, x: &CudaTensor, gate: &CudaWeight, bias: &CudaVector, p: &RouterParams) -> Result<CudaRouting> {
    // The plan counts the appended shared expert too.
    route_planned(gpu, x, gate, bias, p, p.shared.map_or(gate.rows, |s| gate.rows.max(s + 1)), None)
}

/// Threads per token of moe_route (ROUTE_THREADS in kernels/linear.cu).
const ROUTE_THREADS: usize = 256;
/// Tokens a router block takes at most (ROUTE_MAX_TOKENS), and experts a lane of
/// moe_route_warp holds (ROUTE_WARP_PER), in kernels/linear.cu.
const ROUTE_MAX_TOKENS: usize = 4;
const ROUTE_WARP_PER: usize = 8;

/// Shared-memory words moe_route gives each token (route_words in kernels/linear.cu): sigmoid
/// and selection scores, an (expert, score) candidate for each of the first min(K, 32) of every
/// run of 32 experts, and the group scores, rounded up to even.
fn route_words(experts: usize, groups: usize, top_k: usize) -> usize {
    (2 * experts + 2 * experts.div_ceil(32) * top_k.min(32) + groups + 1) & !1
}

/// The most tokens of a decode step moe_route takes in one block, which then builds the plan
/// from its own picks (`DUET_ROUTE_TOKENS`, 1 to 4, the kernel's ROUTE_MAX_TOKENS; default 2:
/// with the route of 1b2b2b5 four tokens in one block routed 1 µs slower than a block each,
/// two in one 0.4 µs faster, H200, performance.md; 1: a block a token).
fn route_tokens() -> usize {
    static N: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *N.get_or_init(|| super::kernels::env_usize("DUET_ROUTE_TOKENS", "1 to 4", |n| (1..=ROUTE_MAX_TOKENS).contains(&n)).unwrap_or(2))
}

/// Whether a decode step's router is moe_route_warp (a warp a token, one block): up to
/// ROUTE_MAX_TOKENS tokens, no expert groups (n_group 1, as GLM-5.x), at most 32·ROUTE_WARP_PER
/// experts and 32 picks a token (kernels/linear.cu); `DUET_ROUTE_WARP=0` keeps moe_route.
fn warp_route(tokens: usize, experts: usize, p: &RouterParams) -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let on = *ON.get_or_init(|| super::kernels::env_switch("DUET_ROUTE_WARP", true));
    on && (1..=ROUTE_MAX_TOKENS).contains(&tokens) && p.n_group == 1 && experts <= 32 * ROUTE_WARP_PER && p.top_k <= 32
}

/// `route`, with the decode plan made for a set of `plan_experts` experts; with `logits`, the
/// gate's GEMV of `x` already made (by the norm that made `x`: `add_norm_block`).
fn route_planned(gpu: &CudaBackend, x: &CudaTensor, gate: &CudaWeight, bias: &CudaVector, p: &RouterParams, plan_experts: usize, logits: Option<CudaTensor>) -> Result<CudaRouting> {
    let e = gate.rows;
    if bias.0.len() != e {
        bail!("route: bias of {} for {e} experts", bias.0.len());
    }
    if p.n_group > 64 || p.topk_group > 64 || p.top_k > 64 {
        bail!("route: at most 64 expert groups and 64 experts per token are supported");
    }
    if p.top_k > e || p.n_group == 0 || !e.is_multiple_of(p.n_group) {
        bail!("route: top-{} of {e} experts in {} groups", p.top_k, p.n_group);
    }
    let logits = match logits {
        Some(l) => l,
        None => gpu.linear(x, gate)?,
    };
    let k1 = p.top_k + p.shared.is_some() as usize;
    let pairs = x.rows * k1;
    let idx = gpu.alloc_indices(pairs)?;
    let weights = gpu.alloc(pairs)?;
    // Decode steps get their plan from the router (one launch fewer).
    let plan = if x.rows > 0 && x.rows <= MMA_MAX_TOKENS { Some((gpu.alloc_indices(plan_len(pairs))?, plan_experts)) } else { None };
    if let Some((plan, _)) = plan.as_ref().filter(|_| warp_route(x.rows, e, p)) {
        gpu.launch(
            "moe_route_warp",
            (1, 1, 1),
            32 * x.rows as u32,
            plan_experts * 4,
            &[
                Arg::Ptr(gpu.ptr(&logits.buf)),
                Arg::Ptr(gpu.ptr(&bias.0)),
                Arg::Ptr(gpu.ptr(&idx)),
                Arg::Ptr(gpu.ptr(&weights)),
                Arg::I32(e as i32),
                Arg::I32(p.top_k as i32),
                Arg::I32(p.norm_topk_prob as i32),
                Arg::F32(p.scaling),
                Arg::I32(p.shared.map_or(-1, |s| s as i32)),
                Arg::Ptr(gpu.ptr(plan)),
                Arg::I32(plan_experts as i32),
            ],
        )?;
    } else if x.rows > 0 {
        // A decode step of up to route_tokens() tokens in one block, a sub-block a token, so
        // that block builds the plan from its own picks (no count across blocks); the tokens'
        // scores must fit in the default 48 KB of shared memory.
        let per_token = route_words(e, p.n_group, p.top_k) * 4;
        let together = plan.is_some() && x.rows <= route_tokens() && x.rows * per_token <= 48 * 1024;
        let tokens_per_block = if together { x.rows } else { 1 };
        let smem = (tokens_per_block * per_token).max(if plan.is_some() { (plan_experts + pairs) * 4 } else { 0 });
        gpu.launch(
            "moe_route",
            ((x.rows / tokens_per_block) as u32, 1, 1),
            (ROUTE_THREADS * tokens_per_block) as u32,
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
    if t == 0 {
        return gpu.tensor_of(0, h);
    }
    let pairs = t * k;
    let groups = pairs.min(experts.count) as u32;
    // The router's plan when it made one for these experts.
    let built;
    let plan = match &routing.plan {
        Some((plan, n)) if *n == experts.count => plan,
        _ => {
            built = make_plan(gpu, routing, pairs, experts.count)?;
            &built
        }
    };
    if let Some(variants) = experts.mma.filter(|_| t <= MMA_MAX_TOKENS) {
        let xs = gpu.split(x, experts.fmt_gate_up)?;
        let pass = MmaPass::new(gpu, pairs, experts)?;
        pass.run(gpu, experts, variants, xs, plan, k, groups)?;
        return combine(gpu, &pass.part, &routing.weights, None, t, k, h);
    }
    // Decode batches take a group's tokens one per pass (the second read of a tile hits L1/L2,
    // and one token needs the fewest registers); prefill takes eight at a time.
    let act = gpu.alloc(pairs * i)?;
    let part = gpu.alloc(pairs * h)?;
    let (gate_up, down) = if t <= 8 { ("moe_gate_up1", "moe_down1") } else { ("moe_gate_up8", "moe_down8") };
    let [a, b, c] = plan_args(gpu, &experts.gate_up_table, plan, pairs);
    gpu.launch_kernel(
        (gate_up, Some(experts.fmt_gate_up)),
        ((i as u32).div_ceil(2), groups, 1),
        threads_for(h, experts.fmt_gate_up),
        0,
        &[a, b, c, Arg::Ptr(gpu.ptr(&x.buf)), Arg::Ptr(gpu.ptr(&act)), Arg::I32(k as i32), Arg::I32(i as i32)],
    )?;
    let [a, b, c] = plan_args(gpu, &experts.down_table, plan, pairs);
    gpu.launch_kernel(
        (down, Some(experts.fmt_down)),
        ((h as u32).div_ceil(4), groups, 1),
        threads_for(i, experts.fmt_down),
        0,
        &[a, b, c, Arg::Ptr(gpu.ptr(&act)), Arg::Ptr(gpu.ptr(&part)), Arg::I32(h as i32)],
    )?;
    combine(gpu, &part, &routing.weights, None, t, k, h)
}

/// The MoE block of a decode step with the shared expert overlapped with the router. The
/// shared expert needs no routing, so it streams its weights on the side stream while the
/// router's latency-bound chain (gate GEMV, route and plan) runs; the routed experts follow on
/// the main stream, and the combine adds the shared expert's output last, where the folded
/// expert sits in the routing (the same sum in the same order, so the same bits). Other steps
/// (prefill, CUDA-core experts, no shared expert) route and then run `moe`.
pub(super) fn moe_block(gpu: &CudaBackend, x: &CudaTensor, gate: &CudaWeight, bias: &CudaVector, experts: &CudaExperts, p: &RouterParams) -> Result<CudaTensor> {
    match side_expert(x, experts, None, p) {
        Some(side) => overlapped(gpu, x, gate, bias, experts, p, side, None),
        None => moe(gpu, x, experts, &route(gpu, x, gate, bias, p)?),
    }
}

/// `moe_block` plus a shared expert kept apart from the routed ones (`shared`, a one-expert
/// set stored unlike them: INT8 beside INT4 experts in the real GLM INT4 checkpoints),
/// overlapped with the router the same way when both take the tensor-core kernels.
pub(super) fn moe_block_shared(gpu: &CudaBackend, x: &CudaTensor, gate: &CudaWeight, bias: &CudaVector, experts: &CudaExperts, shared: &CudaExperts, p: &RouterParams) -> Result<CudaTensor> {
    if let Some(side) = side_expert(x, experts, Some(shared), p) {
        return overlapped(gpu, x, gate, bias, experts, p, side, None);
    }
    let mut y = moe_block(gpu, x, gate, bias, experts, p)?;
    gpu.add_assign(&mut y, &expert_all(gpu, x, shared)?)?;
    Ok(y)
}

/// `Backend::add_norm_moe_block` with the router's gate GEMV in the norm's launch
/// (rms_norm_split_router; `DUET_NORM_ROUTER=0` turns it off): one launch fewer before the
/// route, for the overlapped decode block with a bf16 gate. None, launching nothing, where
/// it does not apply. The logits' sums run in another order than the GEMV's.
pub(super) fn add_norm_block(gpu: &CudaBackend, x: &mut CudaTensor, a: &CudaTensor, w: &CudaVector, eps: f32, block: &MoeBlock<'_, CudaBackend>) -> Result<Option<CudaTensor>> {
    let Some(side) = side_expert(x, block.experts, block.shared, block.router) else { return Ok(None) };
    let Some((y, logits)) = add_norm_logits(gpu, x, a, w, eps, block, side.0)? else { return Ok(None) };
    overlapped(gpu, &y, block.gate, block.bias, block.experts, block.router, side, Some(logits)).map(Some)
}

/// The add, the norm and the router's logits in the norm's launch, as `add_norm_block` begins
/// (for a block that overlaps its shared expert, `side`: `side_expert`): the norm's output,
/// split for the routed and shared experts' gate/up only, and the logits, or None, launching
/// nothing, where they do not apply.
fn add_norm_logits(gpu: &CudaBackend, x: &mut CudaTensor, a: &CudaTensor, w: &CudaVector, eps: f32, block: &MoeBlock<'_, CudaBackend>, side: &CudaExperts) -> Result<Option<(CudaTensor, CudaTensor)>> {
    if !norm_router() || a.rows != x.rows || a.cols != x.cols || w.0.len() != x.cols {
        return Ok(None);
    }
    let [part] = block.gate.parts.as_slice() else { return Ok(None) };
    if !gpu.norm_router_fits(x, part) {
        return Ok(None);
    }
    let (sum, y, logits) = (gpu.tensor_of(x.rows, x.cols)?, gpu.tensor_of(x.rows, x.cols)?, gpu.tensor_of(x.rows, part.rows)?);
    if !gpu.rms_norm_split(x, w, eps, &y, Some((a, &sum)), Some((part, &logits)), Some(&[block.experts.fmt_gate_up, side.fmt_gate_up]))? {
        return Ok(None);
    }
    gpu.replace_tensor(x, sum);
    Ok(Some((y, logits)))
}

impl CudaBackend {
    /// The first part of `add_norm_moe_block` alone, as the decode block runs it: the add and
    /// norm, the router's logits (in the norm's launch where the block makes them there) and the
    /// route with its plan (the routed experts', as the overlapped block routes them), for
    /// `duet bench kernels` to time the block's chain before the experts.
    pub fn add_norm_route(&self, x: &mut CudaTensor, a: &CudaTensor, w: &CudaVector, eps: f32, block: &MoeBlock<'_, CudaBackend>) -> Result<CudaRouting> {
        let Some((side, _)) = side_expert(x, block.experts, block.shared, block.router) else {
            return self.route(&self.add_rms_norm(x, a, w, eps)?, block.gate, block.bias, block.router);
        };
        let routed = RouterParams { shared: None, ..*block.router };
        let (y, logits) = match add_norm_logits(self, x, a, w, eps, block, side)? {
            Some((y, logits)) => (y, Some(logits)),
            None => (self.add_rms_norm(x, a, w, eps)?, None),
        };
        route_planned(self, &y, block.gate, block.bias, &routed, block.experts.count, logits)
    }
}

/// Whether the router's gate GEMV runs in the decode norm's launch (`DUET_NORM_ROUTER`, default
/// on: INT4 MoE block at two tokens 70.4 -> 72.2% of its floor, performance.md).
fn norm_router() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| super::kernels::env_switch("DUET_NORM_ROUTER", true))
}

/// The shared expert a decode step of `x` runs beside the router, as `overlapped` takes it:
/// expert `p.shared` of `experts` (folded in), or the one-expert set `shared` kept apart; None
/// where the block cannot overlap them.
fn side_expert<'a>(x: &CudaTensor, experts: &'a CudaExperts, shared: Option<&'a CudaExperts>, p: &RouterParams) -> Option<(&'a CudaExperts, usize)> {
    match shared {
        None => p.shared.filter(|&s| s < experts.count && overlaps(x, experts, experts)).map(|s| (experts, s)),
        Some(set) => (p.shared.is_none() && set.hidden == experts.hidden && overlaps(x, experts, set)).then_some((set, 0)),
    }
}

/// Whether a decode step of `x` can overlap `shared` with the router of `experts`.
fn overlaps(x: &CudaTensor, experts: &CudaExperts, shared: &CudaExperts) -> bool {
    experts.mma.is_some() && shared.mma.is_some() && (1..=MMA_MAX_TOKENS).contains(&x.rows)
}

/// Expert 0 of `e` over every row of `x`, with weight 1.
pub(super) fn expert_all(gpu: &CudaBackend, x: &CudaTensor, e: &CudaExperts) -> Result<CudaTensor> {
    let t = x.rows;
    // Made on the device (a decode step may be captured into a graph: no host copies).
    let (mut idx, weights) = (gpu.alloc_indices(t)?, gpu.alloc(t)?);
    gpu.stream.memset_zeros(&mut idx).map_err(|e| anyhow::anyhow!("{e:?}"))?;
    if t > 0 {
        gpu.launch("fill", CudaBackend::elementwise_grid(t), 256, 0, &[Arg::Ptr(gpu.ptr(&weights)), Arg::Ptr(t as u64), Arg::F32(1.0)])?;
    }
    moe(gpu, x, e, &CudaRouting { top_k: 1, idx, weights, plan: None })
}

/// The overlapped block: expert `index` of `shared` (the routed set itself, when the shared
/// expert is folded into it) on the side stream, the router and the routed experts (without
/// the shared one) on the main stream; with `logits`, the router's gate GEMV already made.
#[allow(clippy::too_many_arguments)]
fn overlapped(gpu: &CudaBackend, x: &CudaTensor, gate: &CudaWeight, bias: &CudaVector, experts: &CudaExperts, p: &RouterParams, (shared, index): (&CudaExperts, usize), logits: Option<CudaTensor>) -> Result<CudaTensor> {
    let t = x.rows;
    let (Some(variants), Some(shared_variants)) = (experts.mma, shared.mma) else { bail!("internal: an overlapped MoE block needs the tensor-core kernels") };
    if x.cols != experts.hidden {
        bail!("moe: input has {} columns, experts expect {}", x.cols, experts.hidden);
    }
    // Everything the side stream touches exists before it forks.
    let xs = gpu.split(x, experts.fmt_gate_up)?;
    let shared_xs = gpu.split(x, shared.fmt_gate_up)?;
    let shared_plan = solo_plan(gpu, index, t)?;
    let shared_pass = MmaPass::new(gpu, t, shared)?;
    let routed = RouterParams { shared: None, ..*p };
    // With `late_shared_down`, the shared expert's down projection waits for the routed gate/up
    // and streams while the routed activations are split (where nothing else streams) and
    // beside the routed down; else the side stream runs the shared expert through, beside the
    // router and the routed gate/up.
    let late = late_shared_down(t);
    let shared_down = || shared_pass.down(gpu, shared, shared_variants.1, &shared_plan, 1, 1);
    let (routing, pass) = gpu.concurrently(
        || {
            if let SoloPlan::Step(plan) = &shared_plan {
                fill_solo_plan(gpu, index, t, plan)?;
            }
            shared_pass.gate_up_split(gpu, shared, shared_variants.0, shared_xs, &shared_plan, 1, 1)?;
            if late {
                return Ok(());
            }
            shared_down()
        },
        || {
            let routing = route_planned(gpu, x, gate, bias, &routed, experts.count, logits)?;
            let pass = MmaPass::new(gpu, t * routing.top_k, experts)?;
            let groups = (t * routing.top_k).min(experts.count) as u32;
            let split = waves(t, groups);
            let plan = decode_plan(&routing)?;
            pass.gate_up_groups(gpu, experts, variants.0, xs, plan, routing.top_k, 0..split.unwrap_or(groups), true)?;
            // Waves run at one token alone, the late shared down above it (`late_shared_down`).
            if let Some(split) = split {
                pass.second_wave(gpu, experts, variants, xs, plan, routing.top_k, groups, split)?;
                return Ok((routing, pass));
            }
            if late {
                gpu.side_after_main(shared_down)?;
            }
            if !skipped(Skip::Split) {
                gpu.split_into(&pass.act, &pass.acts)?;
            }
            pass.down(gpu, experts, variants.1, plan, routing.top_k, groups)?;
            Ok((routing, pass))
        },
    )?;
    if skipped(Skip::Combine) {
        return gpu.tensor_of(t, experts.hidden);
    }
    combine(gpu, &pass.part, &routing.weights, Some(&shared_pass.part), t, routing.top_k, experts.hidden)
}

/// Where a one-token overlapped block splits its `groups` routed experts into two waves
/// (`MmaPass::second_wave`), or None for one pass: `DUET_MOE_WAVES`, the first wave's share in
/// eighths of the groups (1 to 7; 0 turns waves off; default 4, half). H200, INT4 block at one
/// token over four alternations: group 64 +1.0-1.6 points, group 32 +0.5, group 128 +0.1-0.6,
/// FP8 +0.4-0.9; 2, 3 and 5 eighths lost, 6 tied (performance.md, eighteenth session).
fn waves(tokens: usize, groups: u32) -> Option<u32> {
    static EIGHTHS: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    let eighths = *EIGHTHS.get_or_init(|| super::kernels::env_usize("DUET_MOE_WAVES", "0 to 7", |n| n <= 7).unwrap_or(4) as u32);
    let split = (groups * eighths / 8).max(1);
    (tokens == 1 && eighths > 0 && groups >= 2 && !skipped(Skip::Split)).then_some(split.min(groups - 1))
}

/// Whether the second wave's gate/up starts without waiting for the first wave's
/// (`DUET_WAVE_NOWAIT`, default on; 0 makes it wait as every other launch does: H200, 1-1.5
/// points lower at one token). Sound because (1) it is launched right after the first wave's
/// gate/up, whose blocks all wait for the kernels before them at entry and trigger the next
/// launch only after that wait, so it starts after the route and the split input are complete;
/// (2) it reads only those and writes only its own groups' activation rows; (3) nothing later
/// on the main stream needs the first wave's gate/up but through the aux stream's fork and
/// join, which wait for its completion.
fn second_wave_early() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| super::kernels::env_switch("DUET_WAVE_NOWAIT", true))
}

/// Launches of the overlapped block that `DUET_DIAG_SKIP` leaves out (`split`, `combine`, or
/// both, comma-separated): a diagnostic for `duet bench kernels` that bounds what a block
/// without them (one kernel from the routed gate/up to the combine) could gain. The block's
/// output is then wrong; nothing but a timing sweep may set it.
#[derive(Clone, Copy)]
enum Skip {
    Split,
    Combine,
}

fn skipped(what: Skip) -> bool {
    static SKIP: std::sync::OnceLock<(bool, bool)> = std::sync::OnceLock::new();
    let (split, combine) = *SKIP.get_or_init(|| {
        let v = std::env::var("DUET_DIAG_SKIP").unwrap_or_default();
        let set = |name: &str| v.split(',').any(|p| p.trim() == name);
        if !v.is_empty() {
            tracing::warn!("DUET_DIAG_SKIP={v}: MoE block launches left out for timing; its output is wrong");
        }
        (set("split"), set("combine"))
    });
    match what {
        Skip::Split => split,
        Skip::Combine => combine,
    }
}

/// The plan the router made for a decode step.
fn decode_plan(routing: &CudaRouting) -> Result<&CudaSlice<i32>> {
    match &routing.plan {
        Some((plan, _)) => Ok(plan),
        None => bail!("internal: the router made no plan for a decode step"),
    }
}

/// Whether the overlapped block's shared expert runs its down projection late, once the routed
/// gate/up is done: above one token. Then it streams while the routed experts' activations are
/// split, not beside their gate/up. H200 (performance.md, nineteenth session): +1 to +1.4 points
/// at two and four tokens; at one token, where the routed experts go in two waves (`waves`) and
/// the late point is after both waves' gate/up, 1 point lower for INT4 (0.5 higher for FP8).
fn late_shared_down(tokens: usize) -> bool {
    tokens > 1
}

/// The plan of one expert alone over a decode step's tokens (the shared expert's beside the
/// router): constant, so made once per (expert, tokens) and kept by the backend, and the side
/// stream's first launch is the expert's gate/up (one launch fewer before it, each step). A
/// first use inside a graph capture, which cannot allocate a lasting buffer, gets a buffer of
/// the step that the side stream fills.
enum SoloPlan {
    Kept(std::sync::Arc<CudaSlice<i32>>),
    Step(DevBuf<i32>),
}

impl std::ops::Deref for SoloPlan {
    type Target = CudaSlice<i32>;
    fn deref(&self) -> &CudaSlice<i32> {
        match self {
            SoloPlan::Kept(p) => p,
            SoloPlan::Step(p) => p,
        }
    }
}

fn solo_plan(gpu: &CudaBackend, e: usize, t: usize) -> Result<SoloPlan> {
    let mut plans = gpu.solo_plans.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(p) = plans.get(&(e, t)) {
        return Ok(SoloPlan::Kept(p.clone()));
    }
    if gpu.capturing() {
        return Ok(SoloPlan::Step(gpu.alloc_indices(plan_len(t))?));
    }
    let plan = gpu.stream.alloc_zeros::<i32>(plan_len(t)).map_err(|e| anyhow::anyhow!("{e:?}"))?;
    fill_solo_plan(gpu, e, t, &plan)?;
    let plan = std::sync::Arc::new(plan);
    plans.insert((e, t), plan.clone());
    Ok(SoloPlan::Kept(plan))
}

impl CudaBackend {
    /// Drops the kept plans of `solo_plan`, so that the next use makes them again (`duet bench
    /// check` has a capture make one, the path a first use inside a graph takes). Only while no
    /// live graph has captured one: graphs hold their pointers, not the plans.
    pub(crate) fn forget_solo_plans(&self) {
        self.solo_plans.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }
}

/// Writes the plan of expert `e` alone over `t` pairs into `plan` (moe_plan_one).
fn fill_solo_plan(gpu: &CudaBackend, e: usize, t: usize, plan: &CudaSlice<i32>) -> Result<()> {
    gpu.launch("moe_plan_one", (1, 1, 1), 32, 0, &[Arg::I32(e as i32), Arg::I32(t as i32), Arg::Ptr(gpu.ptr(plan))])
}

/// The step's `pairs` routes grouped by expert over `count` experts: [groups | expert per
/// group | offsets | pairs] (moe_plan's layout), for when the router made none for them.
fn make_plan(gpu: &CudaBackend, routing: &CudaRouting, pairs: usize, count: usize) -> Result<DevBuf<i32>> {
    let plan = gpu.alloc_indices(plan_len(pairs))?;
    // The routes are staged in shared memory when they fit in 64 KB with the counts.
    let staged = (count + pairs) * 4 <= 64 * 1024;
    gpu.launch(
        "moe_plan",
        (1, 1, 1),
        256,
        (count + if staged { pairs } else { 0 }) * 4,
        &[Arg::Ptr(gpu.ptr(&routing.idx)), Arg::I32(pairs as i32), Arg::I32(count as i32), Arg::I32(staged as i32), Arg::Ptr(gpu.ptr(&plan))],
    )?;
    Ok(plan)
}

/// Ints in a plan of `pairs` pairs (moe_plan's layout).
fn plan_len(pairs: usize) -> usize {
    2 + 3 * pairs
}

/// The leading arguments of the grouped expert kernels: the weight table, the plan, the pairs.
fn plan_args(gpu: &CudaBackend, table: &CudaSlice<WDesc>, plan: &CudaSlice<i32>, pairs: usize) -> [Arg; 3] {
    [Arg::Ptr(gpu.ptr(table)), Arg::Ptr(gpu.ptr(plan)), Arg::I32(pairs as i32)]
}

/// One tensor-core pass of grouped experts over `pairs` (token, expert) pairs: the buffers of
/// its SwiGLU activations, their split and each pair's down projection, made before any
/// launch so that a pass can run on the side stream.
struct MmaPass {
    act: CudaTensor,
    acts: Split,
    part: DevBuf<f32>,
}

impl MmaPass {
    fn new(gpu: &CudaBackend, pairs: usize, experts: &CudaExperts) -> Result<MmaPass> {
        Ok(MmaPass { act: gpu.tensor_of(pairs, experts.inter)?, acts: gpu.split_alloc(pairs, experts.inter, experts.fmt_down)?, part: gpu.alloc(pairs * experts.hidden)? })
    }

    /// Gate/up with SiLU·up (8 gate rows with their up rows per tile), the split of the
    /// activations, then down (16 rows per tile), for the pairs of `plan` (at most `groups`
    /// experts), `k` pairs per token of `xs`, with the experts' kernel variants (gate/up, down).
    #[allow(clippy::too_many_arguments)]
    fn run(&self, gpu: &CudaBackend, experts: &CudaExperts, (gate_up, down): (MmaVariant, MmaVariant), xs: &Split, plan: &CudaSlice<i32>, k: usize, groups: u32) -> Result<()> {
        self.gate_up_split(gpu, experts, gate_up, xs, plan, k, groups)?;
        self.down(gpu, experts, down, plan, k, groups)
    }

    /// `run` up to the down projection: gate/up and the split of its activations.
    #[allow(clippy::too_many_arguments)]
    fn gate_up_split(&self, gpu: &CudaBackend, experts: &CudaExperts, gate_up: MmaVariant, xs: &Split, plan: &CudaSlice<i32>, k: usize, groups: u32) -> Result<()> {
        self.gate_up(gpu, experts, gate_up, xs, plan, k, groups)?;
        gpu.split_into(&self.act, &self.acts)
    }

    #[allow(clippy::too_many_arguments)]
    fn gate_up(&self, gpu: &CudaBackend, experts: &CudaExperts, v: MmaVariant, xs: &Split, plan: &CudaSlice<i32>, k: usize, groups: u32) -> Result<()> {
        self.gate_up_groups(gpu, experts, v, xs, plan, k, 0..groups, true)
    }

    /// `gate_up` for the plan's groups `groups` alone. Without `wait` the kernel does not wait
    /// for the kernel before it on the stream: only `second_wave` launches so, right after the
    /// first wave's gate/up (see `second_wave_early`).
    #[allow(clippy::too_many_arguments)]
    fn gate_up_groups(&self, gpu: &CudaBackend, experts: &CudaExperts, v: MmaVariant, xs: &Split, plan: &CudaSlice<i32>, k: usize, groups: std::ops::Range<u32>, wait: bool) -> Result<()> {
        let (i, h, pairs) = (experts.inter, experts.hidden, self.act.rows);
        check_groups(&groups, pairs)?;
        let [a, b, c] = plan_args(gpu, &experts.gate_up_table, plan, pairs);
        // The tile width follows the tokens (pairs / k), as an expert's group has at most one
        // pair per token (the kernels loop over a group's pairs, so any count is still right).
        gpu.launch_mma(
            MmaFamily::GateUp,
            v,
            pairs / k,
            ((i as u32).div_ceil(8), groups.len() as u32, 1),
            h,
            &[
                a,
                b,
                c,
                Arg::Ptr(gpu.ptr(&xs.data)),
                Arg::Ptr(xs.sums_ptr(gpu)),
                Arg::Ptr(gpu.ptr(&xs.exps)),
                Arg::Ptr(gpu.ptr(&self.act.buf)),
                Arg::I32(k as i32),
                Arg::I32(i as i32),
                Arg::I32(groups.start as i32),
                Arg::I32(wait as i32),
            ],
        )
    }

    fn down(&self, gpu: &CudaBackend, experts: &CudaExperts, v: MmaVariant, plan: &CudaSlice<i32>, k: usize, groups: u32) -> Result<()> {
        self.down_groups(gpu, experts, v, plan, k, 0..groups)
    }

    /// `down` for the plan's groups `groups` alone.
    fn down_groups(&self, gpu: &CudaBackend, experts: &CudaExperts, v: MmaVariant, plan: &CudaSlice<i32>, k: usize, groups: std::ops::Range<u32>) -> Result<()> {
        let (i, h, pairs) = (experts.inter, experts.hidden, self.act.rows);
        check_groups(&groups, pairs)?;
        let [a, b, c] = plan_args(gpu, &experts.down_table, plan, pairs);
        gpu.launch_mma(
            MmaFamily::Down,
            v,
            pairs / k,
            ((h as u32).div_ceil(16), groups.len() as u32, 1),
            i,
            &[
                a,
                b,
                c,
                Arg::Ptr(gpu.ptr(&self.acts.data)),
                Arg::Ptr(self.acts.sums_ptr(gpu)),
                Arg::Ptr(gpu.ptr(&self.acts.exps)),
                Arg::Ptr(gpu.ptr(&self.part)),
                Arg::I32(h as i32),
                Arg::I32(groups.start as i32),
            ],
        )
    }

    /// The rest of a one-token step's routed experts after the first wave's gate/up (groups
    /// `0..split`, launched by the caller): the first wave's split and down projection on the
    /// aux stream, streaming beside the second wave's gate/up (groups `split..groups`) instead
    /// of after it, then the second wave's split and down. The second wave's gate/up starts as
    /// the first's blocks drain (it does not wait for the first: `gate_up_groups`). At one
    /// token a group is one pair, so a wave's activations are the rows of its groups (gate/up
    /// writes them in plan order). See `waves`.
    #[allow(clippy::too_many_arguments)]
    fn second_wave(
        &self,
        gpu: &CudaBackend,
        experts: &CudaExperts,
        (gate_up, down): (MmaVariant, MmaVariant),
        xs: &Split,
        plan: &CudaSlice<i32>,
        k: usize,
        groups: u32,
        split: u32,
    ) -> Result<()> {
        if self.act.rows != k || split == 0 || split >= groups {
            bail!("internal: two waves of {split} and {groups} groups over {} pairs of {k} a token", self.act.rows);
        }
        let first = 0..split as usize;
        let second = split as usize..groups as usize;
        gpu.beside_aux(
            || {
                gpu.split_rows_into(&self.act, &self.acts, first)?;
                self.down_groups(gpu, experts, down, plan, k, 0..split)
            },
            || {
                self.gate_up_groups(gpu, experts, gate_up, xs, plan, k, split..groups, !second_wave_early())?;
                gpu.split_rows_into(&self.act, &self.acts, second)?;
                self.down_groups(gpu, experts, down, plan, k, split..groups)
            },
        )
    }
}

/// A launch's range of plan groups: within the plan's `pairs` entries (a plan holds at most a
/// group a pair), and not empty (a grid of no blocks cannot launch).
fn check_groups(groups: &std::ops::Range<u32>, pairs: usize) -> Result<()> {
    if groups.is_empty() || groups.end as usize > pairs {
        bail!("internal: expert launch over plan groups {groups:?} of at most {pairs}");
    }
    Ok(())
}

/// The two grouped expert GEMVs of a decode step on the tensor cores, their inputs (plan,
/// splits, activations) made once, so that a benchmark times each kernel alone.
pub struct ExpertGemvs<'a> {
    gpu: &'a CudaBackend,
    experts: &'a CudaExperts,
    variants: (MmaVariant, MmaVariant),
    xs: &'a Split,
    plan: DevBuf<i32>,
    pass: MmaPass,
    k: usize,
    groups: u32,
}

impl ExpertGemvs<'_> {
    /// Gate/up with SiLU·up over the step's pairs.
    pub fn gate_up(&self) -> Result<()> {
        self.pass.gate_up(self.gpu, self.experts, self.variants.0, self.xs, &self.plan, self.k, self.groups)
    }

    /// Down over the step's pairs.
    pub fn down(&self) -> Result<()> {
        self.pass.down(self.gpu, self.experts, self.variants.1, &self.plan, self.k, self.groups)
    }
}

impl CudaBackend {
    /// A layer's expert set whose expert e holds the weights of `distinct[table[e]]`, each in
    /// device memory of its own (a repeated entry is a copy: benchmarks stand a few generated
    /// experts for a real layer's 256, every one resident and read from its own memory;
    /// `experts` is the identity table).
    pub fn experts_indexed(&self, distinct: &[ExpertWeights], table: &[usize]) -> Result<CudaExperts> {
        // Each entry's weights: the upload itself at its first use, a copy of it after.
        let mut uploads: Vec<Option<(CudaLinear, CudaLinear)>> = upload_expert_weights(&self.stream, distinct)?.into_iter().map(Some).collect();
        let mut first_use = vec![0; uploads.len()];
        let mut weights: Vec<(CudaLinear, CudaLinear)> = Vec::with_capacity(table.len());
        for (e, &i) in table.iter().enumerate() {
            let Some(upload) = uploads.get_mut(i) else { bail!("expert table names upload {i} of {}", distinct.len()) };
            let w = match upload.take() {
                Some(w) => {
                    first_use[i] = e;
                    w
                }
                None => {
                    let (gu, dn) = &weights[first_use[i]];
                    (gu.replica(&self.stream)?, dn.replica(&self.stream)?)
                }
            };
            weights.push(w);
        }
        let e = experts_from(&self.stream, weights)?;
        if e.mma.is_some() {
            self.note_mma_fmts([e.fmt_gate_up, e.fmt_down]);
        }
        Ok(e)
    }

    /// The plan the router built for `routing` (None if it built none) beside moe_plan's of the
    /// same routes, each as (experts per group, group offsets, pairs): `duet bench check`
    /// compares them.
    #[allow(clippy::type_complexity)]
    pub fn route_plans(&self, routing: &CudaRouting) -> Result<Option<[(Vec<i32>, Vec<i32>, Vec<i32>); 2]>> {
        let Some((built, n)) = &routing.plan else { return Ok(None) };
        let pairs = routing.idx.len();
        let made = make_plan(self, routing, pairs, *n)?;
        let parts = |b: &CudaSlice<i32>| -> Result<(Vec<i32>, Vec<i32>, Vec<i32>)> {
            let v = self.stream.clone_dtoh(b).map_err(|e| anyhow::anyhow!("{e:?}"))?;
            // Only the used groups' entries are written (the layout above plan_group in kernels/common.cuh).
            let groups = (v[0].max(0) as usize).min(pairs);
            Ok((v[1..1 + groups].to_vec(), v[1 + pairs..2 + pairs + groups].to_vec(), v[2 + 2 * pairs..2 + 3 * pairs].to_vec()))
        };
        Ok(Some([parts(built)?, parts(&made)?]))
    }

    /// The grouped expert GEMVs of `x` routed by `routing`, ready to launch one at a time (the
    /// experts take the tensor-core kernels and `x` is a decode batch).
    pub fn expert_gemvs<'a>(&'a self, x: &'a CudaTensor, experts: &'a CudaExperts, routing: &CudaRouting) -> Result<ExpertGemvs<'a>> {
        let Some(variants) = experts.mma.filter(|_| (1..=MMA_MAX_TOKENS).contains(&x.rows)) else {
            bail!("expert_gemvs: {} token rows on experts without tensor-core kernels at that size", x.rows)
        };
        let (k, pairs) = (routing.top_k, x.rows * routing.top_k);
        let plan = make_plan(self, routing, pairs, experts.count)?;
        let xs = self.split(x, experts.fmt_gate_up)?;
        let pass = MmaPass::new(self, pairs, experts)?;
        let g = ExpertGemvs { gpu: self, experts, variants, xs, plan, pass, k, groups: pairs.min(experts.count) as u32 };
        // Down reads real activations.
        g.gate_up()?;
        self.split_into(&g.pass.act, &g.pass.acts)?;
        Ok(g)
    }
}

/// `out[t] = Σ_k w[t, k] · part[t·k + k]`, then `+ shared[t]` when given.
fn combine(gpu: &CudaBackend, part: &CudaSlice<f32>, weights: &CudaSlice<f32>, shared: Option<&CudaSlice<f32>>, t: usize, k: usize, h: usize) -> Result<CudaTensor> {
    let out = gpu.tensor_of(t, h)?;
    gpu.launch(
        "moe_combine",
        CudaBackend::elementwise_grid(t * h),
        256,
        0,
        &[
            Arg::Ptr(gpu.ptr(part)),
            Arg::Ptr(gpu.ptr(weights)),
            Arg::Ptr(gpu.ptr(&out.buf)),
            Arg::I32(t as i32),
            Arg::I32(k as i32),
            Arg::I32(h as i32),
            Arg::Ptr(shared.map_or(0, |s| gpu.ptr(s))),
        ],
    )?;
    Ok(out)
}
