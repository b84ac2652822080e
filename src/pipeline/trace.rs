//! `--trace FILE`: each rank's compute, transfer and idle spans as a Chrome trace (open in
//! chrome://tracing or Perfetto). Timestamps are wall-clock microseconds, so the files of
//! ranks on one host line up; [`merge`] joins them into one timeline.

use std::path::Path;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use serde_json::{json, Value};

pub struct Tracer {
    rank: u32,
    events: Option<Vec<Value>>,
}

impl Tracer {
    pub fn new(rank: u32, enabled: bool) -> Tracer {
        let events = enabled.then(|| vec![json!({"name": "process_name", "ph": "M", "pid": rank, "args": {"name": format!("rank {rank}")}})]);
        Tracer { rank, events }
    }

    /// Records a span from `start` to now (`detail` is formatted only when tracing is on).
    pub fn span(&mut self, name: &str, start: Instant, detail: impl std::fmt::Display) {
        let Some(ev) = self.events.as_mut() else { return };
        let dur = start.elapsed();
        let end_us = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64);
        let ts = end_us.saturating_sub(dur.as_micros() as u64);
        let cat = match name {
            "compute" => "compute",
            "send" | "recv" => "transfer",
            _ => "idle",
        };
        ev.push(json!({"name": name, "cat": cat, "ph": "X", "ts": ts, "dur": dur.as_micros() as u64, "pid": self.rank, "tid": 0, "args": {"detail": detail.to_string()}}));
    }

    pub fn write(&self, path: &Path) -> Result<()> {
        let Some(ev) = &self.events else { return Ok(()) };
        std::fs::write(path, serde_json::to_vec(&json!({"traceEvents": ev, "displayTimeUnit": "ms"}))?).with_context(|| format!("cannot write trace {}", path.display()))
    }
}

/// Per-rank trace file next to `path`.
pub fn rank_file(path: &Path, rank: u32) -> std::path::PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(format!(".rank{rank}"));
    s.into()
}

/// Joins per-rank traces into `path` (missing ones are skipped).
pub fn merge(path: &Path, ranks: u32) -> Result<()> {
    let mut all = Vec::new();
    for r in 0..ranks {
        let f = rank_file(path, r);
        let Ok(text) = std::fs::read_to_string(&f) else { continue };
        let v: Value = serde_json::from_str(&text).with_context(|| format!("bad trace {}", f.display()))?;
        if let Some(ev) = v["traceEvents"].as_array() {
            all.extend(ev.iter().cloned());
        }
        let _ = std::fs::remove_file(&f);
    }
    std::fs::write(path, serde_json::to_vec(&json!({"traceEvents": all, "displayTimeUnit": "ms"}))?).with_context(|| format!("cannot write trace {}", path.display()))
}
