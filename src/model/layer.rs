//! One GLM-5.x decoder layer: `h = x + Attn(norm(x))`, `y = h + FFN(norm(h))`.

use anyhow::Result;

use super::attention::{Attention, Selected};
use super::mlp::Ffn;
use super::Ctx;
use crate::backend::Backend;
use crate::checkpoint::Checkpoint;

pub struct DecoderLayer<B: Backend> {
    /// Index in checkpoint names (`model.layers.{index}`).
    pub index: usize,
    input_norm: B::Vector,
    post_norm: B::Vector,
    pub attn: Attention<B>,
    ffn: Ffn<B>,
    eps: f32,
}

impl<B: Backend> DecoderLayer<B> {
    pub fn load(b: &B, ck: &Checkpoint, index: usize) -> Result<DecoderLayer<B>> {
        let c = &ck.config;
        let p = format!("model.layers.{index}");
        Ok(DecoderLayer {
            index,
            input_norm: b.vector(&ck.vector(&format!("{p}.input_layernorm.weight"), c.hidden_size)?)?,
            post_norm: b.vector(&ck.vector(&format!("{p}.post_attention_layernorm.weight"), c.hidden_size)?)?,
            attn: Attention::load(b, ck, index)?,
            ffn: Ffn::load(b, ck, index)?,
            eps: c.rms_norm_eps,
        })
    }

    pub fn forward(&self, cx: &mut Ctx<'_, B>, mut x: B::Tensor, slot: usize, sel: &mut Selected<B>) -> Result<B::Tensor> {
        let b = cx.backend;
        let a = self.attn.forward(cx, &b.rms_norm(&x, &self.input_norm, self.eps)?, slot, sel)?;
        b.add_assign(&mut x, &a)?;
        let f = self.ffn.forward(b, &b.rms_norm(&x, &self.post_norm, self.eps)?)?;
        b.add_assign(&mut x, &f)?;
        Ok(x)
    }
}
