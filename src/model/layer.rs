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

    pub fn forward(&self, cx: &mut Ctx<'_, B>, x: B::Tensor, slot: usize, sel: &mut Selected<B>) -> Result<B::Tensor> {
        let (mut x, f) = self.forward_pending(cx, x, None, slot, sel)?;
        cx.backend.add_assign(&mut x, &f)?;
        Ok(x)
    }

    /// The layer over the residual stream `x` with the previous layer's FFN output `pending`
    /// not yet added (it is added with this layer's input norm, in one pass where the backend
    /// fuses them); returns the stream and this layer's FFN output, likewise not yet added.
    pub fn forward_pending(&self, cx: &mut Ctx<'_, B>, mut x: B::Tensor, pending: Option<B::Tensor>, slot: usize, sel: &mut Selected<B>) -> Result<(B::Tensor, B::Tensor)> {
        let b = cx.backend;
        let h = match pending {
            Some(f) => b.add_rms_norm(&mut x, &f, &self.input_norm, self.eps)?,
            None => b.rms_norm(&x, &self.input_norm, self.eps)?,
        };
        let a = self.attn.forward(cx, &h, slot, sel)?;
        let f = self.ffn.forward_add_norm(b, &mut x, &a, &self.post_norm, self.eps)?;
        Ok((x, f))
    }
}
