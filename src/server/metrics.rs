//! Prometheus metrics of the API, written by hand in the text exposition format.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

/// A histogram with fixed bucket bounds (seconds).
pub struct Histogram {
    bounds: &'static [f64],
    counts: Vec<AtomicU64>,
    sum_us: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Histogram {
        Histogram { bounds, counts: bounds.iter().map(|_| AtomicU64::new(0)).collect(), sum_us: AtomicU64::new(0), count: AtomicU64::new(0) }
    }

    pub fn observe(&self, secs: f64) {
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            if secs <= *b {
                c.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.sum_us.fetch_add((secs * 1e6) as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    fn write(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {}", c.load(Ordering::Relaxed));
        }
        let n = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {n}");
        let _ = writeln!(out, "{name}_sum {}", self.sum_us.load(Ordering::Relaxed) as f64 / 1e6);
        let _ = writeln!(out, "{name}_count {n}");
    }
}

const TTFT_BOUNDS: &[f64] = &[0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];
const ITL_BOUNDS: &[f64] = &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0];

pub struct Metrics {
    pub requests_ok: AtomicU64,
    pub requests_error: AtomicU64,
    pub requests_rejected: AtomicU64,
    pub prompt_tokens: AtomicU64,
    pub generation_tokens: AtomicU64,
    pub ttft: Histogram,
    pub inter_token: Histogram,
    /// Draft tokens proposed and accepted by speculative decoding (0 until MTP serving exists).
    pub spec_proposed: AtomicU64,
    pub spec_accepted: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            requests_ok: AtomicU64::new(0),
            requests_error: AtomicU64::new(0),
            requests_rejected: AtomicU64::new(0),
            prompt_tokens: AtomicU64::new(0),
            generation_tokens: AtomicU64::new(0),
            ttft: Histogram::new(TTFT_BOUNDS),
            inter_token: Histogram::new(ITL_BOUNDS),
            spec_proposed: AtomicU64::new(0),
            spec_accepted: AtomicU64::new(0),
        }
    }
}

impl Metrics {
    /// The exposition text; gauges come from the engine's live state.
    pub fn render(&self, queue_depth: usize, running: usize, ready: bool) -> String {
        let mut out = String::new();
        let counter = |out: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
        };
        let _ = writeln!(out, "# HELP duet_requests_total Finished requests by outcome.\n# TYPE duet_requests_total counter");
        let _ = writeln!(out, "duet_requests_total{{outcome=\"ok\"}} {}", self.requests_ok.load(Ordering::Relaxed));
        let _ = writeln!(out, "duet_requests_total{{outcome=\"error\"}} {}", self.requests_error.load(Ordering::Relaxed));
        let _ = writeln!(out, "duet_requests_total{{outcome=\"rejected\"}} {}", self.requests_rejected.load(Ordering::Relaxed));
        counter(&mut out, "duet_prompt_tokens_total", "Prompt tokens processed.", self.prompt_tokens.load(Ordering::Relaxed));
        counter(&mut out, "duet_generation_tokens_total", "Tokens generated.", self.generation_tokens.load(Ordering::Relaxed));
        self.ttft.write(&mut out, "duet_time_to_first_token_seconds", "Time from request to first token.");
        self.inter_token.write(&mut out, "duet_inter_token_latency_seconds", "Time between consecutive tokens of a request.");
        let _ = writeln!(out, "# HELP duet_queue_depth Requests waiting for admission.\n# TYPE duet_queue_depth gauge\nduet_queue_depth {queue_depth}");
        let _ = writeln!(out, "# HELP duet_batch_size Sequences being generated.\n# TYPE duet_batch_size gauge\nduet_batch_size {running}");
        let _ = writeln!(out, "# HELP duet_ready Whether every rank is up.\n# TYPE duet_ready gauge\nduet_ready {}", ready as u8);
        counter(&mut out, "duet_spec_draft_tokens_total", "Speculative draft tokens proposed.", self.spec_proposed.load(Ordering::Relaxed));
        counter(&mut out, "duet_spec_accepted_tokens_total", "Speculative draft tokens accepted.", self.spec_accepted.load(Ordering::Relaxed));
        out
    }
}
