//! Rank 0's engine: requests in, tokens out.
//!
//! Sequences are admitted while the KV cache can hold their prompt plus `max_tokens`, then
//! advance in steps: a prefill chunk, or one decode token. Ready sequences are split into
//! micro-batches (up to one per pipeline stage) so that with several sequences in flight every
//! rank computes at once on different ones. The last rank samples; its tokens come back in step
//! order. New requests join at step boundaries; finished and cancelled ones leave and their
//! caches are freed on every rank.

pub mod request;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

pub use request::{Event, FinishReason, Request};

use crate::backend::Backend;
use crate::pipeline::stage::{Stage, StepInput, StepOutput};
use crate::pipeline::trace::Tracer;
use crate::transport::frame::{FrameHeader, FrameKind, WireSampling, WireSegment, WireSelection, WireToken};
use crate::transport::{f32_bytes, i32_bytes, FrameReceiver, FrameSender};

#[derive(Clone, Debug)]
pub struct SchedulerConfig {
    /// Most sequences decoding at once.
    pub max_batch: usize,
    /// Longest prefill chunk, in tokens.
    pub prefill_chunk: usize,
    /// Pipeline stages (micro-batches in flight).
    pub stages: usize,
}

struct Seq {
    req: Request,
    /// Prompt then generated tokens.
    tokens: Vec<u32>,
    prompt_len: usize,
    /// Positions already sent through the pipeline.
    computed: usize,
    generated: usize,
    in_flight: bool,
    seed: u64,
    started: Instant,
}

/// The links of a multi-rank pipeline as rank 0 sees them.
pub struct Links {
    pub down: Box<dyn FrameSender>,
    pub up: Box<dyn FrameReceiver>,
}

pub struct Engine<B: Backend> {
    pub stage: Stage<B>,
    cfg: SchedulerConfig,
    waiting: VecDeque<Request>,
    active: HashMap<u64, Seq>,
    next_seq: u64,
    /// Positions reserved in the cache by admitted sequences.
    reserved: usize,
    /// Sequences of each step in flight, oldest first.
    steps: VecDeque<Vec<u64>>,
    /// Finished sequences the downstream ranks must still forget.
    to_release: Vec<u64>,
    pub tracer: Tracer,
}

impl<B: Backend> Engine<B> {
    pub fn new(stage: Stage<B>, cfg: SchedulerConfig, tracer: Tracer) -> Engine<B> {
        Engine {
            stage,
            cfg,
            waiting: VecDeque::new(),
            active: HashMap::new(),
            next_seq: 1,
            reserved: 0,
            steps: VecDeque::new(),
            to_release: vec![],
            tracer,
        }
    }

    /// Queues a request after checking it can ever run; a bad one is answered at once.
    pub fn submit(&mut self, req: Request) {
        let need = req.prompt.len() + req.max_tokens;
        let limit = self.stage.model.config.max_position_embeddings;
        let error = if req.prompt.is_empty() {
            Some("the prompt is empty".to_string())
        } else if need > limit {
            Some(format!("prompt of {} tokens plus max_tokens {} exceeds the context of {limit}", req.prompt.len(), req.max_tokens))
        } else if need > self.stage.cache_positions() {
            Some(format!("prompt of {} tokens plus max_tokens {} exceeds the KV cache of {} positions", req.prompt.len(), req.max_tokens, self.stage.cache_positions()))
        } else if let Some(&t) = req.prompt.iter().find(|&&t| t as usize >= self.stage.model.config.vocab_size) {
            Some(format!("token id {t} is outside the vocabulary"))
        } else {
            None
        };
        match error {
            Some(e) => req.send(Event::Failed(e)),
            None => self.waiting.push_back(req),
        }
    }

    pub fn queue_depth(&self) -> usize {
        self.waiting.len()
    }

    pub fn active(&self) -> usize {
        self.active.len()
    }

    pub fn idle(&self) -> bool {
        self.waiting.is_empty() && self.active.is_empty()
    }

    /// Fails every request (after a fault) and forgets all sequences.
    pub fn fail_all(&mut self, why: &str) -> Result<()> {
        for (_, s) in self.active.drain() {
            s.req.send(Event::Failed(why.to_string()));
        }
        self.steps.clear();
        self.to_release.clear();
        self.reserved = 0;
        self.stage.reset()
    }

    fn admit(&mut self) {
        while self.active.len() < self.cfg.max_batch {
            let Some(req) = self.waiting.front() else { break };
            let need = req.prompt.len() + req.max_tokens;
            if self.reserved + need > self.stage.cache_positions() {
                break;
            }
            let req = self.waiting.pop_front().unwrap();
            if req.cancel.load(Ordering::SeqCst) {
                req.send(Event::Finished(FinishReason::Cancelled));
                continue;
            }
            self.reserved += need;
            let id = self.next_seq;
            self.next_seq += 1;
            let seed = req.sampling.seed.unwrap_or_else(|| {
                std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(id, |d| d.as_nanos() as u64 ^ id)
            });
            let prompt_len = req.prompt.len();
            let tokens = req.prompt.clone();
            self.active.insert(id, Seq { req, tokens, prompt_len, computed: 0, generated: 0, in_flight: false, seed, started: Instant::now() });
        }
    }

    fn finish(&mut self, id: u64, reason: FinishReason) {
        if let Some(s) = self.active.remove(&id) {
            self.reserved -= s.prompt_len + s.req.max_tokens;
            s.req.send(Event::Finished(reason));
            self.stage.release(id);
            self.to_release.push(id);
        }
    }

    /// Applies what the last rank sampled for one step.
    fn apply(&mut self, step_seqs: &[u64], tokens: Vec<WireToken>) {
        for id in step_seqs {
            if let Some(s) = self.active.get_mut(id) {
                s.in_flight = false;
            }
        }
        for t in tokens {
            let seq = t.seq;
            let Some(s) = self.active.get_mut(&seq) else { continue };
            s.tokens.push(t.token);
            s.generated += 1;
            let stop = !s.req.ignore_eos && s.req.stop_ids.contains(&t.token);
            if s.generated == 1 {
                tracing::debug!("sequence {seq}: first token after {:?}", s.started.elapsed());
            }
            s.req.send(Event::Token(t));
            if stop {
                self.finish(seq, FinishReason::Stop);
            }
        }
        // Length and cancellation are checked for every sequence of the step.
        for id in step_seqs {
            let Some(s) = self.active.get(id) else { continue };
            if s.in_flight {
                continue;
            }
            if s.generated >= s.req.max_tokens {
                self.finish(*id, FinishReason::Length);
            } else if s.req.cancel.load(Ordering::SeqCst) {
                self.finish(*id, FinishReason::Cancelled);
            }
        }
    }

    /// The next micro-batch: ready sequences, at most a fair share so every stage has work.
    fn next_batch(&mut self) -> Option<(FrameHeader, Vec<u64>)> {
        let ready: Vec<u64> = {
            let mut v: Vec<u64> = self.active.iter().filter(|(_, s)| !s.in_flight).map(|(id, _)| *id).collect();
            v.sort_unstable();
            v
        };
        // Cancelled sequences leave at the step boundary.
        for id in &ready {
            if self.active[id].req.cancel.load(Ordering::SeqCst) {
                self.finish(*id, FinishReason::Cancelled);
            }
        }
        let ready: Vec<u64> = ready.into_iter().filter(|id| self.active.contains_key(id)).collect();
        if ready.is_empty() {
            return None;
        }
        let share = self.active.len().div_ceil(self.cfg.stages.max(1)).max(1);
        let mut h = FrameHeader::new(FrameKind::Activations);
        let mut ids = Vec::new();
        let mut budget = self.cfg.prefill_chunk.max(1);
        for id in ready.into_iter().take(share) {
            let s = self.active.get_mut(&id).unwrap();
            let (start, len, sample) = if s.computed < s.prompt_len {
                let len = (s.prompt_len - s.computed).min(budget);
                if len == 0 {
                    continue;
                }
                (s.computed, len, s.computed + len == s.prompt_len)
            } else {
                (s.tokens.len() - 1, 1, true)
            };
            budget = budget.saturating_sub(len);
            h.segments.push(WireSegment { seq: id, start: start as u32, len: len as u32 });
            h.tokens.extend_from_slice(&s.tokens[start..start + len]);
            if sample {
                let p = &s.req.sampling;
                h.sampling.push(WireSampling {
                    seq: id,
                    temperature: p.temperature,
                    top_p: p.top_p,
                    top_k: p.top_k as u32,
                    min_p: p.min_p,
                    seed: s.seed,
                    logprobs: s.req.logprobs.is_some(),
                    top_logprobs: s.req.logprobs.unwrap_or(0) as u32,
                });
            }
            s.computed = start + len;
            s.in_flight = true;
            ids.push(id);
        }
        if ids.is_empty() {
            return None;
        }
        h.rows = h.tokens.len() as u32;
        Some((h, ids))
    }

    fn run_local(&mut self, h: &FrameHeader) -> Result<StepOutput> {
        let t0 = Instant::now();
        let out = self.stage.step(StepInput {
            segments: &h.segments,
            tokens: &h.tokens,
            activations: None,
            selection: WireSelection::None,
            selection_data: None,
            sampling: &h.sampling,
        });
        self.tracer.span("compute", t0, format_args!("{} rows", h.rows));
        out
    }

    /// One turn of the loop: take results, admit, issue at most one micro-batch. Returns
    /// whether anything happened.
    pub fn turn(&mut self, links: Option<&mut Links>, wait: Duration) -> Result<bool> {
        let mut progressed = false;
        match links {
            None => {
                self.admit();
                if let Some((h, ids)) = self.next_batch() {
                    match self.run_local(&h)? {
                        StepOutput::Tokens(t) => self.apply(&ids, t),
                        StepOutput::Activations { .. } => bail!("a single rank must end in tokens"),
                    }
                    progressed = true;
                }
            }
            Some(links) => {
                // Results first, without waiting while there is work to issue.
                let can_issue = self.steps.len() < self.cfg.stages && (self.active.values().any(|s| !s.in_flight) || !self.waiting.is_empty());
                let timeout = if can_issue { Duration::ZERO } else { wait };
                let mut got = None;
                let t0 = Instant::now();
                links.up.recv_with(timeout, &mut |h, _| {
                    if h.kind != FrameKind::Tokens {
                        bail!("rank 0 expected tokens, got {:?}", h.kind);
                    }
                    got = Some(h.results.clone());
                    Ok(())
                })?;
                if let Some(results) = got {
                    self.tracer.span("wait", t0, "");
                    let ids = self.steps.pop_front().ok_or_else(|| anyhow::anyhow!("tokens for a step that was never sent"))?;
                    self.apply(&ids, results);
                    progressed = true;
                }
                self.admit();
                if self.steps.len() < self.cfg.stages {
                    if let Some((mut h, ids)) = self.next_batch() {
                        let StepOutput::Activations { data, selection, selection_data } = self.run_local(&h)? else {
                            bail!("rank 0 of a pipeline must produce activations");
                        };
                        h.cols = self.stage.model.config.hidden_size as u32;
                        h.selection = selection;
                        h.release = std::mem::take(&mut self.to_release);
                        let t0 = Instant::now();
                        links.down.send(&mut h, &[f32_bytes(&data), i32_bytes(&selection_data)])?;
                        self.tracer.span("send", t0, "");
                        self.steps.push_back(ids);
                        progressed = true;
                    } else if !self.to_release.is_empty() && self.steps.is_empty() {
                        // Nothing to run: ship the releases alone.
                        let mut h = FrameHeader::new(FrameKind::Activations);
                        h.cols = self.stage.model.config.hidden_size as u32;
                        h.release = std::mem::take(&mut self.to_release);
                        links.down.send(&mut h, &[])?;
                        self.steps.push_back(vec![]);
                    }
                }
            }
        }
        Ok(progressed)
    }
}
