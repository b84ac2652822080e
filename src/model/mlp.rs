//! Feed-forward blocks: the dense SwiGLU MLP of the first layers, and the MoE block (sigmoid
//! router, routed experts, shared expert) of the rest.

use anyhow::Result;

use crate::backend::{Backend, ExpertWeights, RouterParams};
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
    shared: SwiGlu<B>,
    pub router: RouterParams,
}

impl<B: Backend> Moe<B> {
    pub fn load(b: &B, ck: &Checkpoint, layer: usize) -> Result<Moe<B>> {
        let c = &ck.config;
        let p = format!("model.layers.{layer}.mlp");
        let (h, e) = (c.hidden_size, c.n_routed_experts);
        let inter = c.moe_intermediate_size;
        let experts = (0..e)
            .map(|i| {
                let ep = format!("{p}.experts.{i}");
                Ok(ExpertWeights {
                    gate: ck.linear(&format!("{ep}.gate_proj"), inter, h)?,
                    up: ck.linear(&format!("{ep}.up_proj"), inter, h)?,
                    down: ck.linear(&format!("{ep}.down_proj"), h, inter)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let router = RouterParams {
            top_k: c.num_experts_per_tok,
            n_group: c.n_group,
            topk_group: c.topk_group,
            norm_topk_prob: c.norm_topk_prob,
            scaling: c.routed_scaling_factor,
        };
        Ok(Moe {
            gate: b.weight(&ck.linear(&format!("{p}.gate"), e, h)?)?,
            bias: b.vector(&ck.vector(&format!("{p}.gate.e_score_correction_bias"), e)?)?,
            experts: b.experts(&experts)?,
            shared: SwiGlu::load(b, ck, &format!("{p}.shared_experts"), h, c.moe_intermediate_size * c.n_shared_experts)?,
            router,
        })
    }

    /// An MoE block from weights in memory (benchmarks build real-width layers this way).
    pub fn from_weights(b: &B, gate: &LinearWeight, bias: &[f32], experts: &[ExpertWeights], shared: &ExpertWeights, router: RouterParams) -> Result<Moe<B>> {
        Ok(Moe { gate: b.weight(gate)?, bias: b.vector(bias)?, experts: b.experts(experts)?, shared: SwiGlu::from_weights(b, shared)?, router })
    }

    pub fn forward(&self, b: &B, x: &B::Tensor) -> Result<B::Tensor> {
        let routing = b.route(x, &self.gate, &self.bias, &self.router)?;
        let mut y = b.moe(x, &self.experts, &routing)?;
        b.add_assign(&mut y, &self.shared.forward(b, x)?)?;
        Ok(y)
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
}
