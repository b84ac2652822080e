//! Feed-forward blocks: the dense SwiGLU MLP of the first layers, and the MoE block (sigmoid
//! router, routed experts, shared expert) of the rest.

use anyhow::Result;

use crate::backend::{Backend, ExpertWeights, MoeBlock, RouterParams};
use crate::checkpoint::{Checkpoint, LinearWeight};

/// `down(silu(gate x) · up x)`, with gate and up stacked into one weight.
pub struct SwiGlu<B: Backend> {
    gate_up: B::Weight,
    down: B::Weight,
}

impl<B: Backend> SwiGlu<B> {
    pub fn load(b: &B, ck: &Checkpoint, prefix: &str, hidden: usize, inter: usize) -> Result<SwiGlu<B>> {
        let gate = ck.linear(&format!("{prefix}.gate_proj"), inter, hidden)?;
        let up = ck.linear(&format!("{prefix}.up_proj"), inter, hidden)?;
        SwiGlu::from_weights(b, &ExpertWeights { gate, up, down: ck.linear(&format!("{prefix}.down_proj"), hidden, inter)? })
    }

    pub fn from_weights(b: &B, w: &ExpertWeights) -> Result<SwiGlu<B>> {
        Ok(SwiGlu { gate_up: b.weight_stacked(&[w.gate.clone(), w.up.clone()])?, down: b.weight(&w.down)? })
    }

    pub fn forward(&self, b: &B, x: &B::Tensor) -> Result<B::Tensor> {
        b.linear(&b.swiglu(&b.linear(x, &self.gate_up)?)?, &self.down)
    }

}

pub struct Moe<B: Backend> {
    pub gate: B::Weight,
    pub bias: B::Vector,
    experts: B::Experts,
    /// The shared expert as a one-expert set, when it could not join the routed experts (a
    /// different width or precision); otherwise it is expert `router.shared` of `experts`.
    shared: Option<B::Experts>,
    pub router: RouterParams,
}

impl<B: Backend> Moe<B> {
    pub fn load(b: &B, ck: &Checkpoint, layer: usize) -> Result<Moe<B>> {
        let c = &ck.config;
        let p = format!("model.layers.{layer}.mlp");
        let (h, e) = (c.hidden_size, c.n_routed_experts);
        let proj = |prefix: &str, inter: usize| -> Result<ExpertWeights> {
            Ok(ExpertWeights {
                gate: ck.linear(&format!("{prefix}.gate_proj"), inter, h)?,
                up: ck.linear(&format!("{prefix}.up_proj"), inter, h)?,
                down: ck.linear(&format!("{prefix}.down_proj"), h, inter)?,
            })
        };
        let experts = (0..e).map(|i| proj(&format!("{p}.experts.{i}"), c.moe_intermediate_size)).collect::<Result<Vec<_>>>()?;
        let shared = proj(&format!("{p}.shared_experts"), c.moe_intermediate_size * c.n_shared_experts)?;
        let router = RouterParams {
            top_k: c.num_experts_per_tok,
            n_group: c.n_group,
            topk_group: c.topk_group,
            norm_topk_prob: c.norm_topk_prob,
            scaling: c.routed_scaling_factor,
            shared: None,
        };
        let gate = ck.linear(&format!("{p}.gate"), e, h)?;
        let bias = ck.vector(&format!("{p}.gate.e_score_correction_bias"), e)?;
        Moe::from_weights(b, &gate, &bias, experts, shared, router)
    }

    /// An MoE block from its weights. A shared expert stored like the routed ones joins them as
    /// one more expert that every token takes with weight 1, so one launch streams all the
    /// block's expert weights (and no separate SwiGLU, split or add runs for it).
    pub fn from_weights(b: &B, gate: &LinearWeight, bias: &[f32], mut experts: Vec<ExpertWeights>, shared: ExpertWeights, mut router: RouterParams) -> Result<Moe<B>> {
        let layout = |w: &ExpertWeights| [&w.gate, &w.up, &w.down].map(|l| (l.rows, l.cols, l.precision()));
        let shared = if experts.first().is_some_and(|e0| layout(e0) == layout(&shared)) {
            router.shared = Some(experts.len());
            experts.push(shared);
            None
        } else {
            Some(b.experts(std::slice::from_ref(&shared))?)
        };
        Moe::from_parts(b, gate, bias, b.experts(&experts)?, shared, router)
    }

    /// An MoE block of experts already on the backend (`router.shared` names the shared expert
    /// among them; `shared` is one kept apart).
    pub fn from_parts(b: &B, gate: &LinearWeight, bias: &[f32], experts: B::Experts, shared: Option<B::Experts>, router: RouterParams) -> Result<Moe<B>> {
        Ok(Moe { gate: b.weight(gate)?, bias: b.vector(bias)?, experts, shared, router })
    }

    /// The block as the backend takes it.
    pub fn block(&self) -> MoeBlock<'_, B> {
        MoeBlock { gate: &self.gate, bias: &self.bias, experts: &self.experts, shared: self.shared.as_ref(), router: &self.router }
    }

    pub fn forward(&self, b: &B, x: &B::Tensor) -> Result<B::Tensor> {
        self.block().run(b, x)
    }
}

pub enum Ffn<B: Backend> {
    Dense(SwiGlu<B>),
    Moe(Moe<B>),
}

impl<B: Backend> Ffn<B> {
    pub fn load(b: &B, ck: &Checkpoint, layer: usize) -> Result<Ffn<B>> {
        let c = &ck.config;
        if c.is_moe_layer(layer) {
            Ok(Ffn::Moe(Moe::load(b, ck, layer)?))
        } else {
            Ok(Ffn::Dense(SwiGlu::load(b, ck, &format!("model.layers.{layer}.mlp"), c.hidden_size, c.intermediate_size)?))
        }
    }

    pub fn forward(&self, b: &B, x: &B::Tensor) -> Result<B::Tensor> {
        match self {
            Ffn::Dense(m) => m.forward(b, x),
            Ffn::Moe(m) => m.forward(b, x),
        }
    }

    /// `x += a`, then the FFN of the RMSNorm (`w`, `eps`) of the sum (as a decoder layer runs
    /// it after attention; the backend may fuse the add and norm with an MoE block's router).
    pub fn forward_add_norm(&self, b: &B, x: &mut B::Tensor, a: &B::Tensor, w: &B::Vector, eps: f32) -> Result<B::Tensor> {
        match self {
            Ffn::Dense(m) => m.forward(b, &b.add_rms_norm(x, a, w, eps)?),
            Ffn::Moe(m) => b.add_norm_moe_block(x, a, w, eps, &m.block()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::CpuBackend;
    use crate::checkpoint::quantize::{synthetic_linear, SynthFormat};
    use crate::sampling::Rng;

    /// A shared expert folded into the routed ones gives the block's defining sum:
    /// Σ w_k · expert_k(x) + shared(x).
    #[test]
    fn folded_shared_expert_equals_a_separate_one() {
        let (e, h, i, t) = (8, 64, 32, 3);
        let mut rng = Rng::new(7);
        let fmt = SynthFormat::Fp8([16, 16]);
        let expert = |name: &str, rng: &mut Rng| ExpertWeights {
            gate: synthetic_linear(&format!("{name}.gate"), i, h, fmt, rng),
            up: synthetic_linear(&format!("{name}.up"), i, h, fmt, rng),
            down: synthetic_linear(&format!("{name}.down"), h, i, fmt, rng),
        };
        let experts: Vec<ExpertWeights> = (0..e).map(|j| expert(&format!("e{j}"), &mut rng)).collect();
        let shared = expert("shared", &mut rng);
        let gate = synthetic_linear("gate", e, h, SynthFormat::F32, &mut rng);
        let bias = vec![0.0; e];
        let router = RouterParams { top_k: 2, n_group: 1, topk_group: 1, norm_topk_prob: true, scaling: 2.5, shared: None };
        let b = CpuBackend;
        let x: Vec<f32> = (0..t * h).map(|_| rng.normal() as f32).collect();
        let x = b.tensor(t, h, &x).unwrap();

        let folded = Moe::from_weights(&b, &gate, &bias, experts.clone(), shared.clone(), router).unwrap();
        assert_eq!(folded.router.shared, Some(e));
        assert!(folded.shared.is_none());
        let y = b.to_host(&folded.forward(&b, &x).unwrap()).unwrap();

        let routing = b.route(&x, &b.weight(&gate).unwrap(), &b.vector(&bias).unwrap(), &router).unwrap();
        let mut want = b.moe(&x, &b.experts(&experts).unwrap(), &routing).unwrap();
        b.add_assign(&mut want, &SwiGlu::from_weights(&b, &shared).unwrap().forward(&b, &x).unwrap()).unwrap();
        let want = b.to_host(&want).unwrap();
        let err = y.iter().zip(&want).map(|(a, w)| (a - w).abs()).fold(0f32, f32::max);
        let scale = want.iter().map(|w| w.abs()).fold(0f32, f32::max);
        assert!(err <= 1e-5 * scale, "max |Δ| {err} for values up to {scale}");
    }
}
