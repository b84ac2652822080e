//! Decode steps as CUDA graphs (`Backend::graph`). The first step with a key runs eagerly
//! (loading kernels, filling caches, noting the output's shape); the second is captured into a
//! graph, which is then launched; later steps with the key copy their input into the graph's
//! input buffer and replay it, so a step costs one launch instead of hundreds. A key whose
//! capture fails runs eagerly from then on (with a warning). `DUET_CUDA_GRAPHS=0` turns
//! graphs off.
//!
//! The graphs of a cache live in it: they write its pools and read its fixed step buffers, so
//! they must not outlive it or serve another one.

use std::collections::HashMap;

use anyhow::{anyhow, bail, Result};
use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::CudaGraph;

use super::buffer::Keeper;
use super::cache::CudaCache;
use super::{CudaBackend, CudaTensor};
use crate::backend::Backend;

/// Graphs kept per cache; past this all are dropped (a long generation crosses many length
/// buckets, each needing its own graph once).
const MAX_GRAPHS: usize = 16;

#[derive(Default)]
pub struct StepGraphs {
    states: HashMap<u64, State>,
    /// Steps served by replaying a graph (including the launch right after a capture).
    pub replays: usize,
}

enum State {
    /// Ran once eagerly, with these input and output shapes.
    Seen { input: (usize, usize), output: (usize, usize) },
    Ready(Captured),
    /// Capture failed: run eagerly.
    Eager,
}

struct Captured {
    graph: Recorded,
    /// The graph reads its input from here and leaves its output there.
    input: CudaTensor,
    output: CudaTensor,
}

type Body<'a> = &'a mut dyn FnMut(&mut CudaCache, &CudaTensor) -> Result<CudaTensor>;

/// Whether decode steps may become graphs (`DUET_CUDA_GRAPHS` unset or not 0).
pub fn enabled() -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ENABLED.get_or_init(|| super::kernels::env_switch("DUET_CUDA_GRAPHS", true))
}

impl StepGraphs {
    pub fn run(&mut self, gpu: &CudaBackend, key: u64, cache: &mut CudaCache, input: &CudaTensor, body: Body<'_>) -> Result<CudaTensor> {
        if !enabled() {
            return body(cache, input);
        }
        let shape = (input.rows, input.cols);
        match self.states.get_mut(&key) {
            None => {
                if self.states.len() >= MAX_GRAPHS {
                    self.states.clear();
                }
                let y = body(cache, input)?;
                self.states.insert(key, State::Seen { input: shape, output: (y.rows, y.cols) });
                Ok(y)
            }
            Some(State::Seen { input: seen, output }) if *seen == shape => {
                let output = *output;
                match capture(gpu, cache, input, output, body) {
                    Ok(c) => {
                        let y = gpu.copy(&c.output)?;
                        self.states.insert(key, State::Ready(c));
                        self.replays += 1;
                        Ok(y)
                    }
                    Err(e) => {
                        tracing::warn!("a decode step could not be captured as a CUDA graph ({e:#}); it runs without one");
                        self.states.insert(key, State::Eager);
                        body(cache, input)
                    }
                }
            }
            Some(State::Ready(c)) if (c.input.rows, c.input.cols) == shape => {
                gpu.stream.memcpy_dtod(&input.buf, &mut c.input.buf).map_err(|e| anyhow!("CUDA copy: {e:?}"))?;
                c.graph.launch()?;
                self.replays += 1;
                gpu.copy(&c.output)
            }
            // A key seen with another input shape, or one that could not be captured.
            Some(_) => body(cache, input),
        }
    }
}

/// Records `body` on a copy of `input` into a graph whose allocations all end inside it (or are
/// kept with it: `record`), and launches it once (capturing records work without running it).
fn capture(gpu: &CudaBackend, cache: &mut CudaCache, input: &CudaTensor, output: (usize, usize), body: Body<'_>) -> Result<Captured> {
    let graph_input = gpu.copy(input)?;
    let mut graph_output = gpu.tensor_of(output.0, output.1)?;
    let stream = &gpu.stream;
    let graph = record(gpu, || {
        let y = body(cache, &graph_input)?;
        if (y.rows, y.cols) != output {
            bail!("the step's output is [{}, {}], its first run's was {output:?}", y.rows, y.cols);
        }
        stream.memcpy_dtod(&y.buf, &mut graph_output.buf).map_err(|e| anyhow!("CUDA copy: {e:?}"))
    })?;
    graph.launch()?;
    Ok(Captured { graph, input: graph_input, output: graph_output })
}

/// A recorded graph with the buffers its kernels use (made while it was captured; see
/// `buffer`). The graph goes first when dropped, then the buffers, after the main stream.
pub struct Recorded {
    graph: CudaGraph,
    _buffers: Option<Keeper>,
}

// Safety: a CUDA graph may move between threads; CUDA asks only that calls on one graph be
// serialized, which holding it without `Sync` ensures.
unsafe impl Send for Recorded {}

impl Recorded {
    pub fn launch(&self) -> Result<()> {
        self.graph.launch().map_err(|e| anyhow!("CUDA graph launch: {e:?}"))
    }

    pub fn upload(&self) -> Result<()> {
        self.graph.upload().map_err(|e| anyhow!("CUDA graph upload: {e:?}"))
    }
}

/// The work `f` issues on the main stream, captured into a CUDA graph and instantiated. The
/// buffers `f` makes are kept with the graph (`buffer`), so no memory node stands between two
/// kernels and each may launch while the one before it finishes (programmatic dependent
/// launch, docs/cuda-backend.md). With `DUET_GRAPH_KEEP_BUFFERS=0` they become graph memory
/// nodes instead, freed when the graph is launched again. The capture ends whatever `f`
/// returned, so the stream leaves capture mode.
pub fn record(gpu: &CudaBackend, f: impl FnOnce() -> Result<()>) -> Result<Recorded> {
    let stream = &gpu.stream;
    let capture = |mode| {
        stream.begin_capture(mode).map_err(|e| anyhow!("begin capture: {e:?}"))?;
        let recorded = f();
        let graph = stream.end_capture(CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH);
        recorded?;
        graph.map_err(|e| anyhow!("end capture: {e:?}"))?.ok_or_else(|| anyhow!("the capture recorded no work"))
    };
    if !keep_buffers() {
        let graph = capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)?;
        return Ok(Recorded { graph, _buffers: None });
    }
    // Relaxed: the buffers are allocated on the uncaptured allocation stream meanwhile, which
    // the stricter modes forbid the capturing thread.
    let (graph, buffers) = gpu.keeping_buffers(|| capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED))?;
    Ok(Recorded { graph, _buffers: Some(buffers) })
}

/// Whether captured graphs keep their buffers outside the graph (on unless
/// `DUET_GRAPH_KEEP_BUFFERS=0`).
pub fn keep_buffers() -> bool {
    static KEEP: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *KEEP.get_or_init(|| super::kernels::env_switch("DUET_GRAPH_KEEP_BUFFERS", true))
}
