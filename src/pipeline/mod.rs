//! The pipeline of ranks: which layers each owns, how they find each other, and the loops that
//! move frames through them.
//!
//! Rank 0 holds the embedding, the first layers and the scheduler; the last rank the remaining
//! layers, the final norm, `lm_head`, the MTP layer and sampling; middle ranks (N ≥ 3) a run of
//! layers. Activations flow 0 → 1 → … → N-1 and sampled tokens come back N-1 → 0.

pub mod control;
pub mod rank;
pub mod stage;
pub mod trace;

use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::backend::Device;
use crate::checkpoint::config::IndexerKind;
use crate::checkpoint::{Checkpoint, INDEX_FILE, SINGLE_FILE};
use crate::model::ModelParts;
use crate::plan::{parse_split, split_layers, ModelBytes};
use crate::transport::TransportKind;

/// Everything a rank process needs to know.
#[derive(Clone, Debug)]
pub struct RankOptions {
    pub rank: usize,
    pub world: usize,
    pub model: PathBuf,
    pub device: Device,
    pub gpu: Option<usize>,
    pub numa_node: Option<usize>,
    pub transport: TransportKind,
    /// `--split`: first layer of every rank after the first.
    pub split: Option<String>,
    /// Folder shared by the ranks of one pipeline (certificate, sockets, traces).
    pub run_dir: PathBuf,
    pub host: String,
    /// Rank r listens on `port + r` (unless `peers` names every address).
    pub port: u16,
    pub peers: Option<Vec<SocketAddr>>,
    pub max_batch: usize,
    pub prefill_chunk: usize,
    /// Positions of KV cache per rank, over all sequences.
    pub cache_positions: usize,
    pub trace: Option<PathBuf>,
    /// Spin this long on a shared-memory ring before sleeping.
    pub spin: Duration,
    /// How long to wait for the other ranks to appear.
    pub connect_timeout: Duration,
}

impl RankOptions {
    pub fn addr(&self, rank: usize) -> Result<SocketAddr> {
        if let Some(p) = &self.peers {
            return p.get(rank).copied().with_context(|| format!("--peers names {} addresses, rank {rank} has none", p.len()));
        }
        format!("{}:{}", self.host, self.port as usize + rank).parse().with_context(|| format!("bad address {}:{}", self.host, self.port as usize + rank))
    }

    pub fn link_socket(&self, from: usize, to: usize) -> PathBuf {
        self.run_dir.join(format!("link-{from}-{to}.sock"))
    }
}

/// The layer ranges of every rank: `--split` if given, else balanced by bytes.
pub fn layer_plan(ck: &Checkpoint, world: usize, split: Option<&str>) -> Result<Vec<Range<usize>>> {
    let layers = ck.config.num_hidden_layers;
    if world == 0 || world > layers {
        bail!("--world {world}: the model has {layers} layers, each rank needs at least one");
    }
    let plan = match split {
        Some(s) => parse_split(s, layers, world)?,
        None => split_layers(&ModelBytes::of(ck), world),
    };
    if plan.iter().any(|r| r.is_empty()) {
        bail!("the layer split {plan:?} leaves a rank without layers");
    }
    Ok(plan)
}

/// What rank `rank` of `plan` loads.
pub fn parts_for(ck: &Checkpoint, plan: &[Range<usize>], rank: usize) -> ModelParts {
    let last = rank + 1 == plan.len();
    ModelParts { layers: plan[rank].clone(), embed: rank == 0, head: last, mtp: last && ck.has_mtp_layer() }
}

/// Whether the rank after `rank` starts with a shared-indexer layer (and so needs this rank's
/// DSA selection).
pub fn next_needs_selection(ck: &Checkpoint, plan: &[Range<usize>], rank: usize) -> bool {
    plan.get(rank + 1).is_some_and(|r| ck.config.indexer_kind(r.start) == IndexerKind::Shared)
}

fn fnv(h: &mut u64, bytes: &[u8]) {
    for b in bytes {
        *h ^= *b as u64;
        *h = h.wrapping_mul(0x0100_0000_01b3);
    }
}

/// Identifies a checkpoint: its config, its index, and for every shard its size and a sample
/// of its bytes (header, start and end of the data), so two checkpoints of the same shape with
/// different weights differ.
pub fn fingerprint(dir: &Path) -> Result<String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    fnv(&mut h, &std::fs::read(dir.join("config.json")).with_context(|| format!("cannot read {}/config.json", dir.display()))?);
    let index = dir.join(INDEX_FILE);
    let mut shards: Vec<PathBuf> = if index.exists() {
        let text = std::fs::read(&index)?;
        fnv(&mut h, &text);
        let v: serde_json::Value = serde_json::from_slice(&text).with_context(|| format!("{}: bad JSON", index.display()))?;
        let mut files: Vec<String> = v["weight_map"].as_object().map(|m| m.values().filter_map(|f| f.as_str().map(str::to_string)).collect()).unwrap_or_default();
        files.sort();
        files.dedup();
        files.into_iter().map(|f| dir.join(f)).collect()
    } else {
        vec![dir.join(SINGLE_FILE)]
    };
    shards.sort();
    const SAMPLE: u64 = 64 * 1024;
    for path in shards {
        let mut f = std::fs::File::open(&path).with_context(|| format!("cannot open {}", path.display()))?;
        let len = f.metadata()?.len();
        fnv(&mut h, &len.to_le_bytes());
        let mut buf = vec![0u8; SAMPLE.min(len) as usize];
        f.read_exact(&mut buf)?;
        fnv(&mut h, &buf);
        f.seek(SeekFrom::Start(len.saturating_sub(SAMPLE)))?;
        f.read_exact(&mut buf)?;
        fnv(&mut h, &buf);
    }
    Ok(format!("{h:016x}"))
}

/// Identifies this build: a hash of the running executable (`DUET_BUILD_ID` overrides it).
pub fn build_id() -> String {
    if let Ok(id) = std::env::var("DUET_BUILD_ID") {
        return id;
    }
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    match std::fs::read("/proc/self/exe") {
        Ok(bytes) => fnv(&mut h, &bytes),
        Err(_) => fnv(&mut h, env!("CARGO_PKG_VERSION").as_bytes()),
    }
    format!("{}-{h:016x}", env!("CARGO_PKG_VERSION"))
}
