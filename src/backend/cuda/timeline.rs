//! A diagnostic timeline of a captured step's kernels, on the device's global timer: built
//! with `DUET_KERNEL_DEFINES=-DTIMELINE=1`, each kernel that waits in pdl_entry notes when its
//! first block arrived at the wait and when the wait let its first and last block go
//! (kernels/common.cuh, TIMELINE), and some kernels when their blocks ended and (the router)
//! when it passed each of its stages. Reading it beside the launches the host made shows where a
//! latency-bound chain (the MoE block at one token) spends its time: a kernel's first release
//! is when the kernel before it on its stream completed. `duet bench kernels` prints one under
//! each MoE block row when the define is set.

use std::sync::Mutex;

use anyhow::{anyhow, Result};

use super::{CudaBackend, Lane};

/// Stage marks a record holds (TIMELINE_PHASES in kernels/common.cuh).
const PHASES: usize = 4;

/// Bytes of a record: grid id, arrived, first, last, end, the phases (u64); grid x, y, block
/// x, blocks (u32).
const RECORD: usize = 8 * (5 + PHASES) + 16;

/// The most launches the host log keeps (a long run with the timeline on stops logging there).
const LOG_MAX: usize = 1 << 16;

/// Whether the kernels are built with the timeline (`-DTIMELINE` or `-DTIMELINE=N`, N not 0,
/// in DUET_KERNEL_DEFINES, as the kernels' `#if TIMELINE` reads it).
pub fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| super::kernels::define_value("TIMELINE").is_some_and(|v| v != 0))
}

/// One launch the host made while the timeline was on: its kernel, grid, block and stream.
#[derive(Clone, Debug)]
pub struct Launch {
    pub kernel: String,
    pub grid: (u32, u32),
    pub block: u32,
    pub lane: Lane,
}

/// The launches noted since `CudaBackend::timeline_reset` (host order).
#[derive(Default)]
pub(super) struct Log(Mutex<Vec<Launch>>);

impl Log {
    pub(super) fn note(&self, kernel: String, grid: (u32, u32, u32), block: u32, lane: Lane) {
        let mut log = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if log.len() < LOG_MAX {
            log.push(Launch { kernel, grid: (grid.0, grid.1), block, lane });
        }
    }
}

/// One kernel's record, times in µs from the timeline's first release.
#[derive(Clone, Debug)]
pub struct Mark {
    /// The host launch with this grid and block, in order, when one matches.
    pub launch: Option<Launch>,
    pub grid: (u32, u32),
    pub block: u32,
    pub blocks: u32,
    pub arrived: f64,
    pub first: f64,
    pub last: f64,
    /// When its blocks last ended, for the kernels that note it.
    pub end: Option<f64>,
    /// When its blocks last passed each stage mark, for the kernels that have them.
    pub phases: [Option<f64>; PHASES],
}

impl CudaBackend {
    /// Empties the host's log of launches and the device tables.
    pub fn timeline_reset(&self) -> Result<()> {
        self.timeline.0.lock().unwrap_or_else(|p| p.into_inner()).clear();
        self.timeline_rearm()
    }

    /// Empties the device tables (the host's log of launches stays: a graph replays them).
    pub fn timeline_rearm(&self) -> Result<()> {
        for m in &self.modules {
            let mut table = m.get_global("duet_timeline", &self.stream).map_err(|e| anyhow!("the kernels have no timeline (build them with -DTIMELINE=1): {e:?}"))?;
            let mut empty = vec![0u8; table.len()];
            for r in empty.chunks_exact_mut(RECORD) {
                r[..24].fill(0xff); // grid, arrived, first: all ones; last and the counts zero
            }
            self.stream.memcpy_htod(&empty, &mut table).map_err(|e| anyhow!("{e:?}"))?;
        }
        self.synchronize()
    }

    /// The kernels noted since `timeline_rearm`, in order of their first release, each matched
    /// to the first unmatched host launch of the same grid and block. (The records know no
    /// kernel or stream: two launches of one shape on the two streams may swap names, and the
    /// host logs a fork's side launches before its main ones.)
    pub fn timeline_read(&self) -> Result<Vec<Mark>> {
        self.synchronize()?;
        let mut raw = Vec::new();
        for m in &self.modules {
            let table = m.get_global("duet_timeline", &self.stream).map_err(|e| anyhow!("{e:?}"))?;
            let bytes = self.stream.clone_dtoh(&table).map_err(|e| anyhow!("{e:?}"))?;
            for r in bytes.chunks_exact(RECORD) {
                let u64_at = |i: usize| u64::from_le_bytes(r[8 * i..8 * i + 8].try_into().unwrap());
                let u32_at = |i: usize| {
                    let at = 8 * (5 + PHASES) + 4 * i;
                    u32::from_le_bytes(r[at..at + 4].try_into().unwrap())
                };
                if u64_at(0) != u64::MAX {
                    let marks: [u64; PHASES + 1] = std::array::from_fn(|k| u64_at(4 + k));
                    raw.push((u64_at(1), u64_at(2), u64_at(3), marks, (u32_at(0), u32_at(1)), u32_at(2), u32_at(3)));
                }
            }
        }
        raw.sort_by_key(|r| r.1);
        let t0 = raw.first().map_or(0, |r| r.1);
        let mut launches: Vec<Option<Launch>> = self.timeline.0.lock().unwrap_or_else(|p| p.into_inner()).iter().cloned().map(Some).collect();
        let us = |t: u64| (t as i64 - t0 as i64) as f64 * 1e-3;
        // (A mark never set reads 0.)
        let noted = |t: u64| (t != 0).then(|| us(t));
        Ok(raw
            .into_iter()
            .map(|(arrived, first, last, marks, grid, block, blocks)| {
                let launch = launches.iter_mut().find(|l| l.as_ref().is_some_and(|l| l.grid == grid && l.block == block)).and_then(Option::take);
                let phases = std::array::from_fn(|k| noted(marks[k + 1]));
                Mark { launch, grid, block, blocks, arrived: us(arrived), first: us(first), last: us(last), end: noted(marks[0]), phases }
            })
            .collect())
    }
}

/// The marks as a table: kernel, stream, grid, when it arrived and was released (first, last),
/// when it ended (for the kernels that note it), and the time from its first release to the
/// next kernel's on the same stream; then the stage marks of the kernels that have them. A
/// record with more blocks than its grid holds two launches' notes (their ids' slots met).
pub fn table(marks: &[Mark]) -> String {
    let mut out = String::from("    kernel                                     stream  grid        blocks  arrived   first    last     end  -> next on stream\n");
    for (i, m) in marks.iter().enumerate() {
        // (A mark without its launch counts as the main stream's.)
        let lane_of = |m: &Mark| m.launch.as_ref().map_or(Lane::Main, |l| l.lane);
        let lane = lane_of(m);
        let next = marks[i + 1..].iter().find(|n| lane_of(n) == lane).map_or(String::new(), |n| format!("{:7.2}", n.first - m.first));
        let mut name = m.launch.as_ref().map_or("?", |l| l.kernel.as_str()).to_string();
        if m.blocks as u64 > m.grid.0 as u64 * m.grid.1 as u64 {
            name += " (two launches' notes)";
        }
        let end = m.end.map_or("       ".into(), |e| format!("{e:7.2}"));
        out += &format!(
            "    {name:<42} {:<6}  {:>4}x{:<4}  {:>6}  {:7.2} {:7.2} {:7.2} {end}  {next}\n",
            lane.name(),
            m.grid.0,
            m.grid.1,
            m.blocks,
            m.arrived,
            m.first,
            m.last
        );
    }
    for m in marks.iter().filter(|m| m.phases.iter().any(Option::is_some)) {
        let name = m.launch.as_ref().map_or("?", |l| l.kernel.as_str());
        let stages: Vec<String> = m.phases.iter().enumerate().filter_map(|(k, t)| t.map(|t| format!("{k}: {t:.2}"))).collect();
        out += &format!("    {name} released {:.2}, stages {}\n", m.first, stages.join(", "));
    }
    out
}
