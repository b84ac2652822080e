//! One rank's share of a step: its model part, its caches, and (on the last rank) the samplers.
//!
//! Rank 0 turns token ids into hidden states; every rank runs its layers; the last rank applies
//! the final norm and `lm_head`, and samples for the segments that end in a sample. Between ranks
//! the residual stream travels as f32, exactly, so any split gives the same numbers as one process.

use std::collections::HashMap;

use anyhow::{bail, Context, Result};

use crate::backend::{Backend, Batch, Segment};
use crate::model::{Model, Selected};
use crate::sampling::{Sampler, SamplingParams};
use crate::transport::frame::{WireSampling, WireSegment, WireSelection, WireToken};

/// The inputs of one step on one rank.
pub struct StepInput<'a> {
    pub segments: &'a [WireSegment],
    pub tokens: &'a [u32],
    /// Hidden states from the previous rank (absent on rank 0).
    pub activations: Option<&'a [f32]>,
    /// The previous rank's DSA choice, when this rank starts with a shared-indexer layer.
    pub selection: WireSelection,
    pub selection_data: Option<&'a [i32]>,
    pub sampling: &'a [WireSampling],
}

pub enum StepOutput {
    /// Hidden states for the next rank, `[rows, hidden]`, and the DSA choice it may need.
    Activations { data: Vec<f32>, selection: WireSelection, selection_data: Vec<i32> },
    /// What the last rank sampled.
    Tokens(Vec<WireToken>),
}

pub struct Stage<B: Backend> {
    pub model: Model<B>,
    cache: B::Cache,
    cache_positions: usize,
    samplers: HashMap<u64, Sampler>,
    /// The next rank starts with a shared-indexer layer and needs this rank's selection.
    pub send_selection: bool,
}

impl<B: Backend> Stage<B> {
    pub fn new(model: Model<B>, cache_positions: usize, send_selection: bool) -> Result<Stage<B>> {
        let cache = model.new_cache(cache_positions)?;
        Ok(Stage { model, cache, cache_positions, samplers: HashMap::new(), send_selection })
    }

    pub fn is_last(&self) -> bool {
        self.model.parts.head
    }

    /// Frees a finished sequence's cache and sampler.
    pub fn release(&mut self, seq: u64) {
        self.model.backend.release(&mut self.cache, seq);
        self.samplers.remove(&seq);
    }

    /// Forgets every sequence (after a fault): a fresh cache, no samplers.
    pub fn reset(&mut self) -> Result<()> {
        self.samplers.clear();
        self.cache = self.model.new_cache(self.cache_positions)?;
        Ok(())
    }

    pub fn cache_positions(&self) -> usize {
        self.cache_positions
    }

    pub fn step(&mut self, input: StepInput<'_>) -> Result<StepOutput> {
        let batch = Batch {
            segments: input.segments.iter().map(|s| Segment { seq: s.seq, start: s.start as usize, len: s.len as usize }).collect(),
        };
        let rows = batch.tokens();
        if input.tokens.len() != rows {
            bail!("step: {} tokens for {rows} rows", input.tokens.len());
        }
        let b = &self.model.backend;
        let hidden = self.model.config.hidden_size;
        let x = match input.activations {
            None => self.model.embed(input.tokens)?,
            Some(a) => {
                if a.len() != rows * hidden {
                    bail!("step: {} activations for {rows} rows of {hidden}", a.len());
                }
                b.tensor(rows, hidden, a)?
            }
        };
        let mut sel = match (input.selection, input.selection_data) {
            (WireSelection::None, _) => Selected::Unset,
            (WireSelection::All, _) => Selected::Ready(None),
            (WireSelection::Chosen { topk }, Some(d)) => Selected::Ready(Some(b.selection_from_host(rows, topk as usize, d)?)),
            (WireSelection::Chosen { .. }, None) => bail!("step: a selection is announced but not carried"),
        };
        let step = self.model.prepare(&batch, &mut self.cache)?;
        let x = self.model.forward_layers(x, &batch, &step, &mut self.cache, &mut sel)?;
        if !self.is_last() {
            let (selection, selection_data) = match (&sel, self.send_selection) {
                (Selected::Ready(Some(s)), true) => {
                    let (topk, data) = b.selection_to_host(s, rows)?;
                    (WireSelection::Chosen { topk: topk as u32 }, data)
                }
                (Selected::Ready(None), true) => (WireSelection::All, vec![]),
                _ => (WireSelection::None, vec![]),
            };
            return Ok(StepOutput::Activations { data: b.to_host(&x)?, selection, selection_data });
        }
        // Last rank: logits only for the rows that sample.
        let last_rows = batch.last_rows();
        let mut picks = Vec::new();
        let mut rows_to_sample = Vec::new();
        for s in input.sampling {
            let i = batch.segments.iter().position(|g| g.seq == s.seq).with_context(|| format!("sampling for sequence {} outside the step", s.seq))?;
            rows_to_sample.push(last_rows[i]);
            picks.push(*s);
        }
        if picks.is_empty() {
            return Ok(StepOutput::Tokens(vec![]));
        }
        let h = self.model.final_norm(&b.select_rows(&x, &rows_to_sample)?)?;
        let logits = self.model.logits(&h)?;
        let vocab = self.model.config.vocab_size;
        for s in &picks {
            self.samplers.entry(s.seq).or_insert_with(|| {
                Sampler::new(SamplingParams { temperature: s.temperature, top_p: s.top_p, top_k: s.top_k as usize, min_p: s.min_p, seed: Some(s.seed) })
            });
        }
        // Greedy picks and temperature draws without top-k (`sampling_on_device`), without
        // log-probabilities, are made on the device (`Backend::sample_rows`); when a pick needs
        // the logits on the host, they serve every pick (the sampler's picks are the same).
        let on_host = picks.iter().any(|s| s.logprobs || !self.samplers[&s.seq].draws_on_device());
        let host = if on_host { Some(b.to_host(&logits)?) } else { None };
        let device_picks = if on_host {
            vec![]
        } else {
            let draws = picks.iter().map(|s| self.samplers.get_mut(&s.seq).and_then(|m| m.device_draw()).context("internal: no device draw")).collect::<Result<Vec<_>>>()?;
            b.sample_rows(&logits, &draws)?
        };
        let mut out = Vec::with_capacity(picks.len());
        for (i, s) in picks.iter().enumerate() {
            let Some(host) = &host else {
                out.push(WireToken { seq: s.seq, token: device_picks[i], logprob: 0.0, top: vec![] });
                continue;
            };
            let row = &host[i * vocab..(i + 1) * vocab];
            let token = self.samplers.get_mut(&s.seq).context("internal: no sampler")?.sample(row);
            out.push(if s.logprobs {
                token_with_logprobs(s.seq, token, row, s.top_logprobs as usize)
            } else {
                WireToken { seq: s.seq, token, logprob: 0.0, top: vec![] }
            });
        }
        Ok(StepOutput::Tokens(out))
    }
}

/// The token's log-probability under the model's distribution, and the `top` most likely
/// alternatives.
pub fn token_with_logprobs(seq: u64, token: u32, logits: &[f32], top: usize) -> WireToken {
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = max + logits.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln();
    let lp = |t: usize| (logits[t] as f64 - lse) as f32;
    let top = if top == 0 {
        vec![]
    } else {
        let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
        let k = top.min(idx.len());
        idx.select_nth_unstable_by(k - 1, |a, b| logits[*b as usize].total_cmp(&logits[*a as usize]));
        idx.truncate(k);
        idx.sort_by(|a, b| logits[*b as usize].total_cmp(&logits[*a as usize]));
        idx.into_iter().map(|t| (t, lp(t as usize))).collect()
    };
    WireToken { seq, token, logprob: lp(token as usize), top }
}
