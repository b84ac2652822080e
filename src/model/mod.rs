//! The GLM-5.x (`glm_moe_dsa`) model, written once against [`Backend`].
//!
//! A [`Model`] holds one contiguous part of the network, so that each pipeline rank loads only
//! what it owns: optionally the embedding, a range of decoder layers, optionally the final norm
//! with `lm_head`, and optionally the MTP layer (which needs the embedding and `lm_head` too).

pub mod attention;
pub mod layer;
pub mod mlp;
pub mod mtp;

use std::ops::Range;

use anyhow::{bail, Context, Result};

pub use attention::Selected;
use layer::DecoderLayer;
use mtp::Mtp;

use crate::backend::{length_bucket, Backend, Batch, CacheSpec, RopeSpec};
use crate::checkpoint::config::IndexerKind;
use crate::checkpoint::{Checkpoint, ModelConfig};

/// Which parts of the network a process loads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelParts {
    pub layers: Range<usize>,
    pub embed: bool,
    pub head: bool,
    pub mtp: bool,
}

impl ModelParts {
    /// The whole network, with the MTP layer when the checkpoint has one.
    pub fn whole(ck: &Checkpoint) -> ModelParts {
        let cfg = &ck.config;
        ModelParts { layers: 0..cfg.num_hidden_layers, embed: true, head: true, mtp: ck.has_mtp_layer() }
    }
}

/// Per-step state the layers share: the backend, the prepared positions and the caches.
pub struct Ctx<'a, B: Backend> {
    pub backend: &'a B,
    pub step: &'a B::Step,
    pub cache: &'a mut B::Cache,
    /// The most keys any query of the step can see.
    pub max_visible: usize,
}

pub struct Model<B: Backend> {
    pub config: ModelConfig,
    pub backend: B,
    pub parts: ModelParts,
    embed: Option<B::Weight>,
    layers: Vec<DecoderLayer<B>>,
    norm: Option<B::Vector>,
    lm_head: Option<B::Weight>,
    mtp: Option<Mtp<B>>,
    rope: RopeSpec,
}

impl<B: Backend> Model<B> {
    pub fn load(backend: B, ck: &Checkpoint, parts: ModelParts) -> Result<Model<B>> {
        let c = ck.config.clone();
        if parts.layers.end > c.num_hidden_layers || parts.layers.start > parts.layers.end {
            bail!("layer range {:?} is outside the model's {} layers", parts.layers, c.num_hidden_layers);
        }
        if parts.mtp && c.num_nextn_predict_layers == 0 {
            bail!("the checkpoint has no MTP layer (num_nextn_predict_layers is 0)");
        }
        if let Some(first) = parts.layers.clone().next() {
            if c.indexer_kind(first) == IndexerKind::Shared && parts.layers.start == 0 {
                bail!("layer 0 shares an indexer selection that no earlier layer makes");
            }
        }
        let b = &backend;
        let embed = if parts.embed || parts.mtp {
            Some(b.weight(&ck.linear("model.embed_tokens", c.vocab_size, c.hidden_size)?)?)
        } else {
            None
        };
        let layers = parts
            .layers
            .clone()
            .map(|i| DecoderLayer::load(b, ck, i).with_context(|| format!("loading layer {i}")))
            .collect::<Result<Vec<_>>>()?;
        let (norm, lm_head) = if parts.head || parts.mtp {
            let head_name = if c.tie_word_embeddings && !ck.has("lm_head.weight") { "model.embed_tokens" } else { "lm_head" };
            (
                Some(b.vector(&ck.vector("model.norm.weight", c.hidden_size)?)?),
                Some(b.weight(&ck.linear(head_name, c.vocab_size, c.hidden_size)?)?),
            )
        } else {
            (None, None)
        };
        let mtp = match c.mtp_layer_index() {
            Some(i) if parts.mtp => Some(Mtp::load(b, ck, i).context("loading the MTP layer")?),
            _ => None,
        };
        let rope = RopeSpec {
            inv_freq: c.rope_inv_freq(),
            interleaved: c.rope_interleave,
            indexer_interleaved: c.indexer_rope_interleave,
        };
        Ok(Model { config: c, backend, parts, embed, layers, norm, lm_head, mtp, rope })
    }

    pub fn has_mtp(&self) -> bool {
        self.mtp.is_some()
    }

    /// Cache slots: one per owned layer, then one for the MTP layer; room for `capacity`
    /// positions over all sequences.
    pub fn cache_spec(&self, capacity: usize) -> CacheSpec {
        let c = &self.config;
        let mut slot_has_index: Vec<bool> = self.layers.iter().map(|l| l.attn.has_indexer()).collect();
        if self.mtp.is_some() {
            slot_has_index.push(true);
        }
        CacheSpec { latent: c.kv_lora_rank, rope: c.qk_rope_head_dim, index_dim: c.index_head_dim, slot_has_index, capacity }
    }

    pub fn new_cache(&self, capacity: usize) -> Result<B::Cache> {
        self.backend.new_cache(&self.cache_spec(capacity))
    }

    fn mtp_slot(&self) -> usize {
        self.layers.len()
    }

    pub fn prepare(&self, batch: &Batch, cache: &mut B::Cache) -> Result<B::Step> {
        self.check_positions(batch)?;
        self.backend.prepare(batch, &self.rope, cache)
    }

    fn check_positions(&self, batch: &Batch) -> Result<()> {
        for s in &batch.segments {
            if s.start + s.len > self.config.max_position_embeddings {
                bail!(
                    "sequence {} reaches position {}, beyond max_position_embeddings = {}",
                    s.seq,
                    s.start + s.len,
                    self.config.max_position_embeddings
                );
            }
        }
        Ok(())
    }

    fn check_ids(&self, ids: &[u32]) -> Result<()> {
        if let Some(&bad) = ids.iter().find(|&&t| t as usize >= self.config.vocab_size) {
            bail!("token id {bad} is outside the vocabulary (vocab_size = {})", self.config.vocab_size);
        }
        Ok(())
    }

    pub fn embed(&self, ids: &[u32]) -> Result<B::Tensor> {
        self.check_ids(ids)?;
        let table = self.embed.as_ref().context("this model part holds no embedding")?;
        self.backend.embed(table, ids)
    }

    /// Runs the owned decoder layers over `x` (rows follow `batch`).
    pub fn forward_layers(&self, x: B::Tensor, batch: &Batch, step: &B::Step, cache: &mut B::Cache, sel: &mut Selected<B>) -> Result<B::Tensor> {
        let mut cx = Ctx { backend: &self.backend, step, cache, max_visible: batch.max_visible() };
        // Each layer's FFN output joins the stream with the next layer's input norm.
        let (mut x, mut pending) = (x, None);
        for (slot, layer) in self.layers.iter().enumerate() {
            (x, pending) = layer.forward_pending(&mut cx, x, pending, slot, sel).map(|(x, f)| (x, Some(f))).with_context(|| format!("layer {}", layer.index))?;
        }
        if let Some(f) = pending {
            self.backend.add_assign(&mut x, &f)?;
        }
        Ok(x)
    }

    /// Final RMSNorm of the residual stream.
    pub fn final_norm(&self, x: &B::Tensor) -> Result<B::Tensor> {
        let norm = self.norm.as_ref().context("this model part holds no final norm")?;
        self.backend.rms_norm(x, norm, self.config.rms_norm_eps)
    }

    /// `lm_head` over normed hidden states.
    pub fn logits(&self, h: &B::Tensor) -> Result<B::Tensor> {
        let head = self.lm_head.as_ref().context("this model part holds no lm_head")?;
        self.backend.linear(h, head)
    }

    /// The whole model over one step: returns the normed final hidden states of every row.
    pub fn forward(&self, ids: &[u32], batch: &Batch, cache: &mut B::Cache) -> Result<B::Tensor> {
        if ids.len() != batch.tokens() {
            bail!("{} token ids for a batch of {} tokens", ids.len(), batch.tokens());
        }
        let step = self.prepare(batch, cache)?;
        let x = self.embed(ids)?;
        let x = self.forward_layers(x, batch, &step, cache, &mut Selected::Unset)?;
        self.final_norm(&x)
    }

    /// The logits of every row of a decode-sized step (one token per sequence, or a few for MTP
    /// verification): the whole model (embedding, layers, final norm, lm_head), with the device
    /// work after the embedding run as one replayable graph (`Backend::graph`). The key is what
    /// shapes that work's launches: rows and segments, the length bucket of the longest
    /// context, and whether DSA selects.
    pub fn decode_logits(&self, ids: &[u32], batch: &Batch, cache: &mut B::Cache) -> Result<B::Tensor> {
        if ids.len() != batch.tokens() {
            bail!("{} token ids for a batch of {} tokens", ids.len(), batch.tokens());
        }
        self.check_positions(batch)?;
        let step = self.backend.prepare_fixed(batch, &self.rope, cache)?;
        let x = self.embed(ids)?;
        let key = {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            let lens: Vec<usize> = batch.segments.iter().map(|s| s.len).collect();
            (lens, length_bucket(batch.max_visible()), batch.max_visible() <= self.config.index_topk).hash(&mut h);
            h.finish()
        };
        let b = &self.backend;
        b.graph(key, &step, cache, &x, &mut |cache, x| {
            let h = self.forward_layers(b.copy(x)?, batch, &step, cache, &mut Selected::Unset)?;
            self.logits(&self.final_norm(&h)?)
        })
    }

    /// The MTP head over one step: row r combines `hidden` row r (the main model's normed output
    /// at that row's position) with the embedding of `next_ids[r]`. Returns the MTP logits.
    pub fn mtp_logits(&self, hidden: &B::Tensor, next_ids: &[u32], batch: &Batch, cache: &mut B::Cache) -> Result<B::Tensor> {
        let mtp = self.mtp.as_ref().context("this model part holds no MTP layer")?;
        if next_ids.len() != batch.tokens() {
            bail!("{} token ids for a batch of {} tokens", next_ids.len(), batch.tokens());
        }
        let step = self.prepare(batch, cache)?;
        let emb = self.embed(next_ids)?;
        let mut cx = Ctx { backend: &self.backend, step: &step, cache, max_visible: batch.max_visible() };
        let g = mtp.forward(&mut cx, &emb, hidden, self.mtp_slot())?;
        self.logits(&g)
    }
}
