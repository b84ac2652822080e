//! Multi-head latent attention with DeepSeek sparse attention (DSA).
//!
//! Decode and prefill share one path, the absorbed form over the latent cache: each query head
//! is folded through `W_UK` into the 512-wide latent space, attends over the cached `c_t` and
//! `k_pe_t` of the positions the indexer picked, and is unfolded through `W_UV`.
//!
//! The lightning indexer of a "full" layer scores every visible position and keeps the top
//! `index_topk`; a "shared" layer (GLM-5.2 IndexShare) reuses the previous full layer's choice.

use anyhow::{anyhow, Result};

use super::Ctx;
use crate::backend::{Backend, IndexDims, MlaDims};
use crate::checkpoint::config::{IndexerKind, INDEXER_NORM_EPS, LORA_NORM_EPS};
use crate::checkpoint::Checkpoint;

pub struct Indexer<B: Backend> {
    wq_b: B::Weight,
    wk: B::Weight,
    k_norm_w: B::Vector,
    k_norm_b: B::Vector,
    weights_proj: B::Weight,
    dims: IndexDims,
}

pub struct Attention<B: Backend> {
    q_a: B::Weight,
    q_a_norm: B::Vector,
    q_b: B::Weight,
    kv_a: B::Weight,
    kv_a_norm: B::Vector,
    heads: B::MlaHeads,
    o_proj: B::Weight,
    indexer: Option<Indexer<B>>,
    dims: MlaDims,
}

impl<B: Backend> Attention<B> {
    pub fn load(b: &B, ck: &Checkpoint, layer: usize) -> Result<Attention<B>> {
        let c = &ck.config;
        let p = format!("model.layers.{layer}.self_attn");
        let h = c.hidden_size;
        let nh = c.num_attention_heads;
        let dims = MlaDims {
            heads: nh,
            nope: c.qk_nope_head_dim,
            rope: c.qk_rope_head_dim,
            v: c.v_head_dim,
            latent: c.kv_lora_rank,
            scale: c.attn_scale(),
        };
        let indexer = match c.indexer_kind(layer) {
            IndexerKind::Shared => None,
            IndexerKind::Full => {
                let ip = format!("{p}.indexer");
                let (ih, id) = (c.index_n_heads, c.index_head_dim);
                Some(Indexer {
                    wq_b: b.weight(&ck.linear(&format!("{ip}.wq_b"), ih * id, c.q_lora_rank)?)?,
                    wk: b.weight(&ck.linear(&format!("{ip}.wk"), id, h)?)?,
                    k_norm_w: b.vector(&ck.vector(&format!("{ip}.k_norm.weight"), id)?)?,
                    k_norm_b: b.vector(&ck.vector(&format!("{ip}.k_norm.bias"), id)?)?,
                    weights_proj: b.weight(&ck.linear(&format!("{ip}.weights_proj"), ih, h)?)?,
                    dims: IndexDims { heads: ih, head_dim: id, rope: c.qk_rope_head_dim, topk: c.index_topk },
                })
            }
        };
        let kv_b = ck.linear(&format!("{p}.kv_b_proj"), nh * (dims.nope + dims.v), dims.latent)?;
        Ok(Attention {
            q_a: b.weight(&ck.linear(&format!("{p}.q_a_proj"), c.q_lora_rank, h)?)?,
            q_a_norm: b.vector(&ck.vector(&format!("{p}.q_a_layernorm.weight"), c.q_lora_rank)?)?,
            q_b: b.weight(&ck.linear(&format!("{p}.q_b_proj"), nh * (dims.nope + dims.rope), c.q_lora_rank)?)?,
            kv_a: b.weight(&ck.linear(&format!("{p}.kv_a_proj_with_mqa"), dims.latent + dims.rope, h)?)?,
            kv_a_norm: b.vector(&ck.vector(&format!("{p}.kv_a_layernorm.weight"), dims.latent)?)?,
            heads: b.mla_heads(&kv_b, &dims)?,
            o_proj: b.weight(&ck.linear(&format!("{p}.o_proj"), h, nh * dims.v)?)?,
            indexer,
            dims,
        })
    }

    pub fn has_indexer(&self) -> bool {
        self.indexer.is_some()
    }

    /// `x` is the normed input `[T, hidden]`. `selection` carries the latest full layer's DSA
    /// choice in and out (None = every visible position).
    pub fn forward(&self, cx: &mut Ctx<'_, B>, x: &B::Tensor, slot: usize, selection: &mut Selected<B>) -> Result<B::Tensor> {
        let b = cx.backend;
        let q_resid = b.rms_norm(&b.linear(x, &self.q_a)?, &self.q_a_norm, LORA_NORM_EPS)?;
        let q = b.linear(&q_resid, &self.q_b)?;
        let kv = b.linear(x, &self.kv_a)?;
        b.mla_cache_write(&kv, &self.kv_a_norm, LORA_NORM_EPS, cx.step, cx.cache, slot)?;
        if let Some(ix) = &self.indexer {
            *selection = Selected::Ready(ix.select(cx, x, &q_resid, slot)?);
        }
        let sel = match selection {
            Selected::Unset => return Err(anyhow!("a shared-indexer layer ran before any full indexer layer")),
            Selected::Ready(s) => s.as_ref(),
        };
        let (q_lat, q_rope) = b.mla_queries(&q, &self.heads, cx.step)?;
        let o_lat = b.mla_attend(&q_lat, &q_rope, cx.cache, slot, cx.step, sel, &self.dims)?;
        let o = b.mla_values(&o_lat, &self.heads)?;
        b.linear(&o, &self.o_proj)
    }
}

/// The DSA choice flowing from a full indexer layer to the shared layers after it.
pub enum Selected<B: Backend> {
    /// No full indexer layer has run yet in this step.
    Unset,
    /// The positions each query attends to; None means every visible position (DSA is dense
    /// while no query sees more than `index_topk` keys).
    Ready(Option<B::Selection>),
}

impl<B: Backend> Indexer<B> {
    fn select(&self, cx: &mut Ctx<'_, B>, x: &B::Tensor, q_resid: &B::Tensor, slot: usize) -> Result<Option<B::Selection>> {
        let b = cx.backend;
        let k = b.linear(x, &self.wk)?;
        b.index_cache_write(&k, &self.k_norm_w, &self.k_norm_b, INDEXER_NORM_EPS, cx.step, cx.cache, slot)?;
        // When no query sees more than top-k keys, every key is selected: skip the scoring.
        if cx.max_visible <= self.dims.topk {
            return Ok(None);
        }
        let q = b.linear(q_resid, &self.wq_b)?;
        let w = b.linear(x, &self.weights_proj)?;
        Ok(Some(b.index_select(&q, &w, cx.cache, slot, cx.step, &self.dims)?))
    }
}
