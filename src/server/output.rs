//! From sampled tokens to the text a client sees: incremental detokenization, GLM reasoning
//! (`<think>…</think>` → `reasoning_content`, as vLLM's glm45 parser), stop strings (the text
//! ends before them, and text that may still grow into one is held back), log-probabilities.

use std::sync::Arc;

use serde_json::{json, Value};

use crate::text::{IncrementalText, TextCodec};
use crate::transport::frame::WireToken;

/// Text produced by one token (or by the final flush).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Delta {
    pub reasoning: String,
    pub content: String,
    /// Log-probability entries of the tokens behind this delta.
    pub logprobs: Vec<Value>,
}

impl Delta {
    pub fn is_empty(&self) -> bool {
        self.reasoning.is_empty() && self.content.is_empty() && self.logprobs.is_empty()
    }
}

/// One stream of generated text.
pub struct Output {
    codec: Arc<TextCodec>,
    /// `</think>` ends reasoning; None when the reasoning parser is off.
    think_end: Option<u32>,
    think_start: Option<u32>,
    in_reasoning: bool,
    reasoning: IncrementalText,
    content: IncrementalText,
    reasoning_sent: usize,
    content_sent: usize,
    stop: Vec<String>,
    /// Tokens that end generation and stay out of the text.
    stop_ids: Vec<u32>,
    /// A stop string was reached: the content ends at this byte.
    stopped_at: Option<usize>,
    pub tokens: usize,
}

impl Output {
    /// `reasoning`: parse GLM reasoning; `starts_in_reasoning`: the prompt ended with `<think>`.
    pub fn new(codec: Arc<TextCodec>, reasoning: bool, starts_in_reasoning: bool, stop: Vec<String>, stop_ids: Vec<u32>) -> Output {
        let think_end = if reasoning { codec.token_id("</think>") } else { None };
        let think_start = if reasoning { codec.token_id("<think>") } else { None };
        Output {
            codec,
            in_reasoning: think_end.is_some() && starts_in_reasoning,
            think_end,
            think_start,
            reasoning: IncrementalText::default(),
            content: IncrementalText::default(),
            reasoning_sent: 0,
            content_sent: 0,
            stop,
            stop_ids,
            stopped_at: None,
            tokens: 0,
        }
    }

    /// Whether a stop string has ended the output.
    pub fn stopped(&self) -> bool {
        self.stopped_at.is_some()
    }

    /// Log-probability entry in the chat format.
    pub fn logprob_entry(&self, t: &WireToken) -> Value {
        let piece = |id: u32| self.codec.decode(&[id], false).unwrap_or_default();
        let tok = piece(t.token);
        json!({
            "token": tok,
            "logprob": t.logprob,
            "bytes": tok.as_bytes(),
            "top_logprobs": t.top.iter().map(|(id, lp)| { let s = piece(*id); json!({"token": s, "logprob": lp, "bytes": s.as_bytes()}) }).collect::<Vec<_>>(),
        })
    }

    /// Adds a sampled token; returns the text that became final.
    pub fn push(&mut self, t: &WireToken, with_logprobs: bool) -> Delta {
        let mut d = Delta::default();
        if self.stopped() {
            return d;
        }
        self.tokens += 1;
        if with_logprobs {
            d.logprobs.push(self.logprob_entry(t));
        }
        if self.stop_ids.contains(&t.token) {
            return d;
        }
        if Some(t.token) == self.think_end {
            self.in_reasoning = false;
        } else if Some(t.token) == self.think_start && self.content.ids.is_empty() {
            self.in_reasoning = true;
        } else if self.in_reasoning {
            self.reasoning.ids.push(t.token);
        } else {
            self.content.ids.push(t.token);
        }
        self.collect(&mut d, false);
        d
    }

    /// Everything still held back (at the end of generation).
    pub fn flush(&mut self) -> Delta {
        let mut d = Delta::default();
        self.collect(&mut d, true);
        d
    }

    fn collect(&mut self, d: &mut Delta, last: bool) {
        self.reasoning.advance(&self.codec, last);
        let reasoning = &self.reasoning.text;
        if reasoning.len() > self.reasoning_sent {
            d.reasoning.push_str(&reasoning[self.reasoning_sent..]);
            self.reasoning_sent = reasoning.len();
        }
        self.content.advance(&self.codec, last);
        let content = &self.content.text;
        // A stop string ends the content before it. Text before the last one sent was searched
        // already, so a new match ends in the unsent part.
        let longest = self.stop.iter().map(String::len).max().unwrap_or(0);
        let mut from = self.content_sent.saturating_sub(longest);
        while !content.is_char_boundary(from) {
            from -= 1;
        }
        if let Some(pos) = self.stop.iter().filter_map(|s| content[from..].find(s.as_str())).min().map(|p| from + p) {
            self.stopped_at = Some(pos);
            if pos > self.content_sent {
                d.content.push_str(&content[self.content_sent..pos]);
                self.content_sent = pos;
            }
            return;
        }
        let mut ready = content.len();
        if !last {
            // Hold back a tail that could still become a stop string.
            for s in &self.stop {
                for k in (1..s.len()).rev() {
                    if s.is_char_boundary(k) && content.ends_with(&s[..k]) {
                        ready = ready.min(content.len() - k);
                        break;
                    }
                }
            }
        }
        if ready > self.content_sent {
            d.content.push_str(&content[self.content_sent..ready]);
            self.content_sent = ready;
        }
    }
}
