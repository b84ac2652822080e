//! Running a rank: start-up (pinning, QUIC endpoint, handshake, loading only the owned layers,
//! links), then the frame loop. Rank 0 serves requests through the [`Engine`]; the other ranks
//! compute what arrives and pass it on.
//!
//! Faults: a peer that dies or stops shows up as a closed link or a QUIC idle timeout (1.5 s).
//! Rank 0 then fails the requests in flight, tells the survivors to abort, and waits for the
//! ranks to be started again; the other ranks exit with an error.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use super::control::Control;
use super::stage::{Stage, StepInput, StepOutput};
use super::trace::{rank_file, Tracer};
use super::{build_id, fingerprint, layer_plan, next_needs_selection, parts_for, RankOptions};
use crate::backend::Backend;
use crate::checkpoint::{Checkpoint, ModelConfig};
use crate::model::Model;
use crate::scheduler::{Engine, Links, Request, SchedulerConfig};
use crate::transport::frame::{FrameHeader, FrameKind, WireSelection};
use crate::transport::quic::{Identity, Node, Purpose, QuicReceiver, QuicSender, Stream};
use crate::transport::shm::{RingSpec, ShmReceiver, ShmSender};
use crate::transport::{f32_bytes, i32_bytes, payload_f32, FrameReceiver, FrameSender, Health, TransportKind};

/// What the outside world sees of rank 0's engine.
#[derive(Default)]
pub struct EngineState {
    /// Every rank is connected and the engine is serving.
    pub ready: AtomicBool,
    pub queue_depth: AtomicUsize,
    pub active: AtomicUsize,
    pub shutdown: AtomicBool,
    pub last_error: std::sync::Mutex<Option<String>>,
}

/// Largest frame payload: `max_rows` rows of activations plus their DSA selection. Every rank
/// sizes its links from rank 0's `max_rows` (sent in `Welcome`), never from its own flags.
fn ring_spec(config: &ModelConfig, max_rows: usize, cache_positions: usize, spin: Duration) -> RingSpec {
    let topk = config.index_topk.min(cache_positions);
    RingSpec { slots: 4, max_payload: max_rows * (config.hidden_size + topk) * 4, spin }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().thread_name("duet-io").build().context("cannot start the I/O runtime")
}

/// The links of one rank: frames in from the previous rank, frames out to the next.
struct RankLinks {
    up: Box<dyn FrameReceiver>,
    down: Box<dyn FrameSender>,
}

/// Sets up this rank's two links: receiving from `from` and sending to `to`. The receiving side
/// is built on a thread of its own, since every rank is at once a consumer and a producer.
fn connect_links(opts: &RankOptions, node: &Arc<Node>, health: &Health, from: usize, to: usize, spec: RingSpec) -> Result<RankLinks> {
    let me = opts.rank;
    // Peers load their layers before linking up: allow for a large checkpoint.
    let timeout = opts.connect_timeout.max(Duration::from_secs(1800));
    match opts.transport {
        TransportKind::Shm => {
            let (path_in, path_out) = (opts.link_socket(from, me), opts.link_socket(me, to));
            let (h_in, numa) = (health.clone(), opts.numa_node);
            let consumer = thread::spawn(move || ShmReceiver::create(&path_in, spec, numa, h_in, &format!("rank {from}"), timeout));
            let down = ShmSender::connect(&path_out, spec.spin, health.clone(), &format!("rank {to}"), timeout);
            let up = consumer.join().map_err(|_| anyhow!("link setup thread panicked"))??;
            Ok(RankLinks { up: Box::new(up), down: Box::new(down?) })
        }
        TransportKind::Quic => {
            let addr = opts.addr(to)?;
            let n = node.clone();
            let (down, up) = node.rt.block_on(async {
                let out = n.connect(addr, Purpose::Data, timeout);
                let inc = n.accept(Purpose::Data, timeout);
                let (out, inc) = tokio::join!(out, inc);
                Ok::<_, anyhow::Error>((out?, inc.ok_or_else(|| anyhow!("rank {from} did not open its data link within {timeout:?}"))?))
            })?;
            if up.from as usize != from {
                bail!("a data link arrived from rank {}, expected rank {from}", up.from);
            }
            Ok(RankLinks {
                down: Box::new(QuicSender::new(node, down, health.clone(), &format!("rank {to}"))),
                up: Box::new(QuicReceiver::new(node, up, health.clone(), &format!("rank {from}"))),
            })
        }
    }
}

/// Loads this rank's share of the model and logs what it read.
fn load_stage<B: Backend>(backend: B, ck: &Checkpoint, plan: &[std::ops::Range<usize>], opts: &RankOptions, cache_positions: usize) -> Result<Stage<B>> {
    let parts = parts_for(ck, plan, opts.rank);
    let t0 = Instant::now();
    let model = Model::load(backend, ck, parts.clone())?;
    tracing::info!(
        "rank {}: loaded layers {}..{}{}{}{} on {}: {:.1} MB of the checkpoint's {:.1} MB in {:.1} s",
        opts.rank,
        parts.layers.start,
        parts.layers.end,
        if parts.embed { " + embedding" } else { "" },
        if parts.head { " + norm/lm_head" } else { "" },
        if parts.mtp { " + MTP" } else { "" },
        model.backend.name(),
        ck.loaded_bytes() as f64 / 1e6,
        ck.total_bytes() as f64 / 1e6,
        t0.elapsed().as_secs_f64()
    );
    Stage::new(model, cache_positions, next_needs_selection(ck, plan, opts.rank))
}

// ---------------------------------------------------------------------------------------------
// Rank 0

/// The engine thread of rank 0 and what talks to it.
pub struct EngineHandle {
    pub requests: std_mpsc::Sender<Request>,
    pub state: Arc<EngineState>,
}

pub fn start_engine<B: Backend>(backend: B, opts: RankOptions) -> (EngineHandle, std::thread::JoinHandle<Result<()>>) {
    let (tx, rx) = std_mpsc::channel();
    let state = Arc::new(EngineState::default());
    let st = state.clone();
    let join = std::thread::Builder::new()
        .name("duet-engine".into())
        .spawn(move || run_head(backend, &opts, rx, st))
        .expect("spawn the engine thread");
    (EngineHandle { requests: tx, state }, join)
}


/// Rank 0: serves requests from `requests` until `state.shutdown`, reconnecting to the other
/// ranks whenever the pipeline breaks.
pub fn run_head<B: Backend>(backend: B, opts: &RankOptions, requests: std_mpsc::Receiver<Request>, state: Arc<EngineState>) -> Result<()> {
    let placement = crate::numa::pin(0, opts.numa_node, opts.gpu);
    tracing::info!("rank 0: {placement}");
    let ck = Checkpoint::open(&opts.model)?;
    let plan = layer_plan(&ck, opts.world, opts.split.as_deref())?;
    let stage = load_stage(backend, &ck, &plan, opts, opts.cache_positions)?;
    let cfg = SchedulerConfig { max_batch: opts.max_batch, prefill_chunk: opts.prefill_chunk, stages: opts.world };
    let mut engine = Engine::new(stage, cfg, Tracer::new(0, opts.trace.is_some()));
    let result = if opts.world == 1 {
        state.ready.store(true, Ordering::SeqCst);
        serve_loop(&mut engine, None, &requests, &state)
    } else {
        let rt = runtime()?;
        let _ = std::fs::create_dir_all(&opts.run_dir);
        let id = Identity::load_or_create(&opts.run_dir, true, opts.connect_timeout)?;
        let node = Node::bind(rt.handle(), opts.addr(0)?, &id, 0)?;
        let fp = fingerprint(&opts.model)?;
        let build = build_id();
        loop {
            if state.shutdown.load(Ordering::SeqCst) {
                break Ok(());
            }
            state.ready.store(false, Ordering::SeqCst);
            let health = Health::default();
            let (mut links, mut peers) = match connect_peers(opts, &node, &health, &plan, &fp, &build, &ck, &state) {
                Ok(Some(x)) => x,
                Ok(None) => break Ok(()),
                Err(e) => {
                    tracing::error!("rank 0: pipeline set-up failed: {e:#}");
                    *state.last_error.lock().unwrap() = Some(format!("{e:#}"));
                    continue;
                }
            };
            tracing::info!("rank 0: all {} ranks connected; serving", opts.world);
            state.ready.store(true, Ordering::SeqCst);
            match serve_loop(&mut engine, Some(&mut links), &requests, &state) {
                Ok(()) => {
                    shutdown_peers(&node, &mut peers, &mut links);
                    break Ok(());
                }
                Err(e) => {
                    let why = format!("pipeline failed: {e:#}");
                    tracing::error!("rank 0: {why}; waiting for the ranks to be restarted");
                    state.ready.store(false, Ordering::SeqCst);
                    *state.last_error.lock().unwrap() = Some(why.clone());
                    engine.fail_all(&why)?;
                    node.rt.block_on(async {
                        for p in peers.iter_mut() {
                            let _ = tokio::time::timeout(Duration::from_millis(200), p.send_msg(&Control::Abort { reason: why.clone() })).await;
                        }
                    });
                }
            }
        }
    };
    state.ready.store(false, Ordering::SeqCst);
    if let Some(t) = &opts.trace {
        engine.tracer.write(&rank_file(t, 0))?;
    }
    result
}

/// Accepts every other rank's handshake and builds rank 0's links. None when asked to stop.
#[allow(clippy::too_many_arguments)]
fn connect_peers(
    opts: &RankOptions,
    node: &Arc<Node>,
    health: &Health,
    plan: &[std::ops::Range<usize>],
    fp: &str,
    build: &str,
    ck: &Checkpoint,
    state: &EngineState,
) -> Result<Option<(Links, Vec<Stream>)>> {
    let mut peers: Vec<Option<Stream>> = (0..opts.world).map(|_| None).collect();
    let layers: Vec<(usize, usize)> = plan.iter().map(|r| (r.start, r.end)).collect();
    let max_rows = opts.prefill_chunk.max(opts.max_batch);
    while peers.iter().skip(1).any(Option::is_none) {
        if state.shutdown.load(Ordering::SeqCst) {
            return Ok(None);
        }
        let Some(mut s) = node.rt.block_on(node.accept(Purpose::Control, Duration::from_millis(200))) else { continue };
        let hello: Control = match node.rt.block_on(async { tokio::time::timeout(Duration::from_secs(5), s.recv_msg()).await }) {
            Ok(Ok(m)) => m,
            _ => continue,
        };
        let Control::Hello { rank, world, build: their_build, fingerprint: their_fp, transport } = hello else { continue };
        let refuse = if their_build != build {
            Some(format!("build mismatch: rank {rank} runs build {their_build}, rank 0 runs {build}"))
        } else if their_fp != fp {
            Some(format!("checkpoint mismatch: rank {rank} has checkpoint {their_fp}, rank 0 has {fp} ({})", opts.model.display()))
        } else if world != opts.world || rank == 0 || rank >= opts.world {
            Some(format!("rank {rank} of {world} does not fit a pipeline of {} ranks", opts.world))
        } else if transport != opts.transport {
            Some(format!("rank {rank} uses transport {transport:?}, rank 0 uses {:?}", opts.transport))
        } else if peers[rank].is_some() {
            Some(format!("rank {rank} is already connected"))
        } else {
            None
        };
        let reply = match &refuse {
            Some(reason) => Control::Refuse { reason: reason.clone() },
            None => Control::Welcome { layers: layers.clone(), cache_positions: opts.cache_positions, max_rows },
        };
        let _ = node.rt.block_on(s.send_msg(&reply));
        match refuse {
            Some(reason) => {
                tracing::warn!("rank 0: refused a rank: {reason}");
                let _ = s.send.finish();
                // Keep the connection open long enough for the refusal to arrive.
                node.rt.spawn(async move {
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    drop(s);
                });
            }
            None => {
                node.watch(&s.conn, health.clone(), format!("rank {rank}"));
                peers[rank] = Some(s);
            }
        }
    }
    let mut peers: Vec<Stream> = peers.into_iter().flatten().collect();
    let links = connect_links(opts, node, health, opts.world - 1, 1, ring_spec(&ck.config, max_rows, opts.cache_positions, opts.spin))?;
    for p in peers.iter_mut() {
        let from = p.from;
        match node.rt.block_on(async { tokio::time::timeout(opts.connect_timeout + Duration::from_secs(1800), p.recv_msg::<Control>()).await }) {
            Ok(Ok(Control::Ready { placement, loaded_bytes })) => {
                tracing::info!("rank {from} ready: {placement}, {:.1} MB loaded", loaded_bytes as f64 / 1e6);
            }
            other => bail!("rank {from} did not become ready: {other:?}"),
        }
    }
    Ok(Some((Links { down: links.down, up: links.up }, peers)))
}

fn serve_loop<B: Backend>(engine: &mut Engine<B>, mut links: Option<&mut Links>, requests: &std_mpsc::Receiver<Request>, state: &EngineState) -> Result<()> {
    loop {
        if state.shutdown.load(Ordering::SeqCst) && engine.idle() {
            return Ok(());
        }
        while let Ok(r) = requests.try_recv() {
            engine.submit(r);
        }
        let busy = engine.turn(links.as_deref_mut(), Duration::from_millis(2))?;
        state.queue_depth.store(engine.queue_depth(), Ordering::Relaxed);
        state.active.store(engine.active(), Ordering::Relaxed);
        if !busy && engine.idle() {
            // Nothing in flight: sleep until a request arrives.
            match requests.recv_timeout(Duration::from_millis(50)) {
                Ok(r) => engine.submit(r),
                Err(std_mpsc::RecvTimeoutError::Timeout) => {}
                Err(std_mpsc::RecvTimeoutError::Disconnected) => {
                    state.shutdown.store(true, Ordering::SeqCst);
                }
            }
        }
    }
}

fn shutdown_peers(node: &Arc<Node>, peers: &mut [Stream], links: &mut Links) {
    let mut h = FrameHeader::new(FrameKind::Shutdown);
    let _ = links.down.send(&mut h, &[]);
    node.rt.block_on(async {
        for p in peers.iter_mut() {
            let _ = tokio::time::timeout(Duration::from_millis(500), p.send_msg(&Control::Shutdown)).await;
            let _ = p.send.finish();
        }
        // Let the messages leave before the endpoint closes.
        tokio::time::sleep(Duration::from_millis(50)).await;
    });
}

// ---------------------------------------------------------------------------------------------
// Ranks 1..N-1

/// A rank after 0: joins the pipeline, then computes until shutdown or failure.
pub fn run_peer<B: Backend>(backend: B, opts: &RankOptions) -> Result<()> {
    let placement = crate::numa::pin(opts.rank, opts.numa_node, opts.gpu);
    tracing::info!("rank {}: {placement}", opts.rank);
    let rt = runtime()?;
    let id = Identity::load_or_create(&opts.run_dir, false, opts.connect_timeout)?;
    let node = Node::bind(rt.handle(), opts.addr(opts.rank)?, &id, opts.rank as u32)?;
    let ck = Checkpoint::open(&opts.model)?;
    let mut ctl = rt.block_on(node.connect(opts.addr(0)?, Purpose::Control, opts.connect_timeout)).context("cannot reach rank 0")?;
    let hello = Control::Hello { rank: opts.rank, world: opts.world, build: build_id(), fingerprint: fingerprint(&opts.model)?, transport: opts.transport };
    let (layers, cache_positions, max_rows) = rt.block_on(async {
        ctl.send_msg(&hello).await?;
        match ctl.recv_msg::<Control>().await? {
            Control::Welcome { layers, cache_positions, max_rows } => Ok((layers, cache_positions, max_rows)),
            Control::Refuse { reason } => bail!("rank 0 refused this rank: {reason}"),
            other => bail!("unexpected reply from rank 0: {other:?}"),
        }
    })?;
    let plan: Vec<std::ops::Range<usize>> = layers.iter().map(|&(a, b)| a..b).collect();
    if plan.len() != opts.world {
        bail!("rank 0 sent a plan for {} ranks, this is a pipeline of {}", plan.len(), opts.world);
    }
    let mut stage = load_stage(backend, &ck, &plan, opts, cache_positions)?;
    let health = Health::default();
    node.watch(&ctl.conn, health.clone(), "rank 0".into());
    let last = opts.rank + 1 == opts.world;
    let to = if last { 0 } else { opts.rank + 1 };
    let mut links = connect_links(opts, &node, &health, opts.rank - 1, to, ring_spec(&ck.config, max_rows, cache_positions, opts.spin))?;
    rt.block_on(ctl.send_msg(&Control::Ready { placement: placement.to_string(), loaded_bytes: ck.loaded_bytes() as u64 }))?;
    // Control messages from rank 0 end the loop through `health`.
    let stopping = Arc::new(AtomicBool::new(false));
    let (h2, stop2, recv) = (health.clone(), stopping.clone(), ctl.recv);
    let mut ctl_recv = Stream { conn: ctl.conn.clone(), send: ctl.send, recv, from: 0 };
    rt.spawn(async move {
        loop {
            match ctl_recv.recv_msg::<Control>().await {
                Ok(Control::Abort { reason }) => break h2.kill(format!("rank 0 aborted the pipeline: {reason}")),
                Ok(Control::Shutdown) => {
                    stop2.store(true, Ordering::SeqCst);
                    break h2.kill("shutdown");
                }
                Ok(_) => continue,
                Err(e) => break h2.kill(format!("rank 0 is gone ({e})")),
            }
        }
    });
    let mut tracer = Tracer::new(opts.rank as u32, opts.trace.is_some());
    let result = peer_loop(&mut stage, &mut links, &health, &mut tracer, last);
    if let Some(t) = &opts.trace {
        tracer.write(&rank_file(t, opts.rank as u32))?;
    }
    drop(links);
    // An orderly shutdown may race the last frames; it is not a failure.
    let result = if stopping.load(Ordering::SeqCst) { Ok(()) } else { result };
    rt.block_on(async { tokio::time::timeout(Duration::from_millis(500), node.endpoint.wait_idle()).await }).ok();
    result
}

fn peer_loop<B: Backend>(stage: &mut Stage<B>, links: &mut RankLinks, health: &Health, tracer: &mut Tracer, last: bool) -> Result<()> {
    let hidden = stage.model.config.hidden_size;
    let mut done = false;
    while !done {
        let t_wait = Instant::now();
        let down = &mut links.down;
        let got = links.up.recv_with(Duration::from_millis(100), &mut |h, payload| {
            tracer.span("wait", t_wait, "");
            match h.kind {
                FrameKind::Shutdown => {
                    if !last {
                        let mut out = FrameHeader::new(FrameKind::Shutdown);
                        down.send(&mut out, &[])?;
                    }
                    done = true;
                    Ok(())
                }
                FrameKind::Activations => {
                    h.validate(h.step, Some(hidden))?;
                    for &seq in &h.release {
                        stage.release(seq);
                    }
                    let t0 = Instant::now();
                    let out = if h.rows == 0 {
                        None
                    } else {
                        let acts = payload_f32(payload, h.rows as usize * hidden)?;
                        let sel = match h.selection {
                            WireSelection::Chosen { topk } => {
                                let n = h.rows as usize * topk as usize;
                                let off = h.rows as usize * hidden * 4;
                                Some(payload[off..off + n * 4].chunks_exact(4).map(|c| i32::from_le_bytes(c.try_into().unwrap())).collect::<Vec<i32>>())
                            }
                            _ => None,
                        };
                        Some(stage.step(StepInput {
                            segments: &h.segments,
                            tokens: &h.tokens,
                            activations: Some(&acts),
                            selection: h.selection,
                            selection_data: sel.as_deref(),
                            sampling: &h.sampling,
                        })?)
                    };
                    tracer.span("compute", t0, format_args!("{} rows", h.rows));
                    let t1 = Instant::now();
                    match out {
                        Some(StepOutput::Activations { data, selection, selection_data }) => {
                            let mut o = h.clone();
                            o.cols = hidden as u32;
                            o.selection = selection;
                            down.send(&mut o, &[f32_bytes(&data), i32_bytes(&selection_data)])?;
                        }
                        Some(StepOutput::Tokens(results)) => {
                            let mut o = FrameHeader::new(FrameKind::Tokens);
                            o.results = results;
                            down.send(&mut o, &[])?;
                        }
                        None if last => {
                            let mut o = FrameHeader::new(FrameKind::Tokens);
                            down.send(&mut o, &[])?;
                        }
                        None => {
                            let mut o = h.clone();
                            down.send(&mut o, &[])?;
                        }
                    }
                    tracer.span("send", t1, "");
                    Ok(())
                }
                other => bail!("unexpected {other:?} frame"),
            }
        })?;
        if !got && health.is_dead() {
            health.check()?;
        }
    }
    Ok(())
}
