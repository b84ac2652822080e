//! A generation request as the engine sees it, and what it reports back.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use crate::sampling::SamplingParams;
use crate::transport::frame::WireToken;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// A stop token (EOS) was produced.
    Stop,
    /// `max_tokens` were produced.
    Length,
    /// The client went away or asked to stop.
    Cancelled,
}

impl FinishReason {
    /// The OpenAI spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Cancelled => "abort",
        }
    }
}

#[derive(Clone, Debug)]
pub enum Event {
    Token(WireToken),
    Finished(FinishReason),
    Failed(String),
}

pub struct Request {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub stop_ids: Vec<u32>,
    pub ignore_eos: bool,
    /// Report each token's log-probability (None: don't compute it), with this many top alternatives.
    pub logprobs: Option<usize>,
    pub events: tokio::sync::mpsc::UnboundedSender<Event>,
    /// Set by the client side to stop generation at the next step.
    pub cancel: Arc<AtomicBool>,
}

impl Request {
    /// Reports an event; a client that went away is not an error.
    pub fn send(&self, e: Event) {
        let _ = self.events.send(e);
    }
}
