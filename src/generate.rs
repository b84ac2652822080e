//! Single-sequence generation in one process: prefill the prompt, then decode one token per
//! step against the cache. Used by `duet generate` and as the reference the multi-rank pipeline
//! must reproduce token for token.

use std::time::Instant;

use anyhow::{bail, Context, Result};

use crate::backend::{Backend, Batch};
use crate::model::Model;
use crate::sampling::{Sampler, SamplingParams};

#[derive(Clone, Debug)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    /// Token ids that end generation (EOS from config.json and generation_config.json).
    pub stop_ids: Vec<u32>,
    pub ignore_eos: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Generation {
    pub prompt_tokens: usize,
    pub token_ids: Vec<u32>,
    pub finish_reason: &'static str,
    pub ttft_ms: f64,
    pub decode_tok_s: f64,
}

/// Cache sequence id used for single-sequence generation.
const SEQ: u64 = 0;

pub fn generate<B: Backend>(
    model: &Model<B>,
    prompt: &[u32],
    opts: &GenerateOptions,
    mut on_token: impl FnMut(u32) -> Result<()>,
) -> Result<Generation> {
    if prompt.is_empty() {
        bail!("the prompt is empty");
    }
    let limit = model.config.max_position_embeddings;
    if prompt.len() + opts.max_new_tokens > limit {
        bail!(
            "prompt of {} tokens plus {} new tokens exceeds the context of {limit} positions",
            prompt.len(),
            opts.max_new_tokens
        );
    }
    let start = Instant::now();
    let mut cache = model.new_cache(prompt.len() + opts.max_new_tokens)?;
    let mut sampler = Sampler::new(opts.sampling.clone());
    let mut out = Vec::new();
    let mut first_token_at = None;
    let mut finish_reason = "length";
    let mut batch = Batch::single(SEQ, 0, prompt.len());
    let mut input = prompt.to_vec();
    while out.len() < opts.max_new_tokens {
        let logits = if out.is_empty() {
            let hidden = model.forward(&input, &batch, &mut cache)?;
            model.logits(&model.backend.select_rows(&hidden, &batch.last_rows())?)?
        } else {
            // Decode steps replay one graph per length bucket on the GPU.
            model.decode_logits(&input, &batch, &mut cache)?
        };
        // Greedy decoding (and temperature draws without top-k, `sampling_on_device`) reads
        // only the token from the device, not the vocabulary's logits.
        let token = if sampler.draws_on_device() {
            let draw = sampler.device_draw().context("internal: no device draw")?;
            model.backend.sample_rows(&logits, &[draw])?.first().copied().context("no logits row to pick from")?
        } else {
            sampler.sample(&model.backend.to_host(&logits)?)
        };
        first_token_at.get_or_insert_with(Instant::now);
        out.push(token);
        on_token(token)?;
        if !opts.ignore_eos && opts.stop_ids.contains(&token) {
            finish_reason = "stop";
            break;
        }
        batch = Batch::single(SEQ, prompt.len() + out.len() - 1, 1);
        input = vec![token];
    }
    let ttft = first_token_at.map_or(0.0, |t| (t - start).as_secs_f64());
    let decode_secs = first_token_at.map_or(0.0, |t| t.elapsed().as_secs_f64());
    let decode_tok_s = if out.len() > 1 && decode_secs > 0.0 { (out.len() - 1) as f64 / decode_secs } else { 0.0 };
    Ok(Generation {
        prompt_tokens: prompt.len(),
        token_ids: out,
        finish_reason,
        ttft_ms: ttft * 1e3,
        decode_tok_s,
    })
}
