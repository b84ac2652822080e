//! The multi-token-prediction (NextN) layer, stored as `model.layers.{num_hidden_layers}`.
//!
//! For slot i it takes the main model's final hidden state at position i (after `model.norm`)
//! and the embedding of token i+1, and predicts token i+2:
//! `u = eh_proj([enorm(e) | hnorm(h)])`, `g = DecoderLayer(u)` at position i with its own
//! caches, `logits = lm_head(shared_head.norm(g))` with the main model's `lm_head`.

use anyhow::Result;

use super::attention::Selected;
use super::layer::DecoderLayer;
use super::Ctx;
use crate::backend::Backend;
use crate::checkpoint::Checkpoint;

pub struct Mtp<B: Backend> {
    enorm: B::Vector,
    hnorm: B::Vector,
    eh_proj: B::Weight,
    layer: DecoderLayer<B>,
    pub head_norm: B::Vector,
    eps: f32,
}

impl<B: Backend> Mtp<B> {
    pub fn load(b: &B, ck: &Checkpoint, index: usize) -> Result<Mtp<B>> {
        let c = &ck.config;
        let h = c.hidden_size;
        let p = format!("model.layers.{index}");
        Ok(Mtp {
            enorm: b.vector(&ck.vector(&format!("{p}.enorm.weight"), h)?)?,
            hnorm: b.vector(&ck.vector(&format!("{p}.hnorm.weight"), h)?)?,
            eh_proj: b.weight(&ck.linear(&format!("{p}.eh_proj"), h, 2 * h)?)?,
            layer: DecoderLayer::load(b, ck, index)?,
            head_norm: b.vector(&ck.vector(&format!("{p}.shared_head.norm.weight"), h)?)?,
            eps: c.rms_norm_eps,
        })
    }

    /// `emb`: embeddings of the next tokens; `hidden`: the main model's normed final hidden
    /// states at the same rows. Returns `shared_head.norm(g)`, ready for `lm_head`.
    pub fn forward(&self, cx: &mut Ctx<'_, B>, emb: &B::Tensor, hidden: &B::Tensor, slot: usize) -> Result<B::Tensor> {
        let b = cx.backend;
        let e = b.rms_norm(emb, &self.enorm, self.eps)?;
        let h = b.rms_norm(hidden, &self.hnorm, self.eps)?;
        let u = b.linear(&b.concat_cols(&e, &h)?, &self.eh_proj)?;
        let mut sel = Selected::Unset;
        let g = self.layer.forward(cx, u, slot, &mut sel)?;
        b.rms_norm(&g, &self.head_norm, self.eps)
    }
}
