//! Starting ranks locally (`generate --ranks N`, `serve --ranks N`) and running a request
//! through rank 0's engine in this process.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::{mpsc as std_mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use crate::backend::{Backend, Device};
use crate::generate::{GenerateOptions, Generation};
use crate::pipeline::rank::{start_engine, EngineState};
use crate::pipeline::RankOptions;
use crate::scheduler::{Event, Request};

/// The other ranks of a local pipeline, as child processes (killed on drop).
pub struct Peers {
    children: Vec<(usize, Child)>,
}

impl Peers {
    /// Starts ranks 1..world of `opts` from this executable.
    pub fn spawn(opts: &RankOptions) -> Result<Peers> {
        let exe = std::env::current_exe().context("cannot find the duet executable")?;
        let mut children = Vec::new();
        for r in 1..opts.world {
            let mut c = Command::new(&exe);
            c.arg("rank").args(["--rank", &r.to_string(), "--world", &opts.world.to_string()]);
            c.arg("--model").arg(&opts.model);
            c.args(["--transport", match opts.transport {
                crate::transport::TransportKind::Shm => "shm",
                crate::transport::TransportKind::Quic => "quic",
            }]);
            c.arg("--run-dir").arg(&opts.run_dir);
            c.args(["--host", &opts.host, "--port", &opts.port.to_string()]);
            c.args(["--device", match opts.device {
                Device::Auto => "auto",
                Device::Cpu => "cpu",
                Device::Cuda => "cuda",
            }]);
            if let Some(g) = opts.gpu {
                c.args(["--gpu", &(g + r).to_string()]);
            }
            c.args(["--spin-us", &opts.spin.as_micros().to_string()]);
            if let Some(t) = &opts.trace {
                c.arg("--trace").arg(t);
            }
            c.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::inherit());
            children.push((r, c.spawn().with_context(|| format!("cannot start rank {r}"))?));
        }
        Ok(Peers { children })
    }

    /// Fails if a rank has already exited.
    pub fn check(&mut self) -> Result<()> {
        for (r, c) in &mut self.children {
            if let Some(status) = c.try_wait()? {
                bail!("rank {r} exited ({status})");
            }
        }
        Ok(())
    }

    /// Waits for the ranks to exit (after a shutdown), killing stragglers after `grace`.
    pub fn wait(mut self, grace: Duration) {
        let deadline = Instant::now() + grace;
        for (_, c) in &mut self.children {
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

impl Drop for Peers {
    fn drop(&mut self) {
        for (_, c) in &mut self.children {
            if let Ok(None) = c.try_wait() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

/// A base port with `n` consecutive free UDP ports on `host`.
pub fn free_ports(host: &str, n: usize) -> Result<u16> {
    let seed = std::process::id() as u64 ^ std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    let mut rng = crate::sampling::Rng::new(seed);
    for _ in 0..200 {
        let base = 20000 + (rng.next_u64() % 40000) as u16;
        let ok = (0..n).all(|i| std::net::UdpSocket::bind((host, base + i as u16)).is_ok());
        if ok {
            return Ok(base);
        }
    }
    bail!("no {n} consecutive free UDP ports on {host}")
}

/// A fresh run folder under the temp dir.
pub fn temp_run_dir() -> PathBuf {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    std::env::temp_dir().join(format!("duet-run-{}-{nanos}", std::process::id()))
}

/// Rank 0's engine on a thread of this process.
pub struct LocalHead {
    pub requests: Option<std_mpsc::Sender<Request>>,
    pub state: Arc<EngineState>,
    thread: Option<JoinHandle<Result<()>>>,
}

impl LocalHead {
    pub fn start<B: Backend>(backend: B, opts: RankOptions) -> LocalHead {
        let (handle, thread) = start_engine(backend, opts);
        LocalHead { requests: Some(handle.requests), state: handle.state, thread: Some(thread) }
    }

    /// Waits until every rank is connected; fails if rank 0 stopped or a peer exited.
    pub fn wait_ready(&mut self, timeout: Duration, peers: &mut Option<Peers>) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while !self.state.ready.load(Ordering::SeqCst) {
            if self.thread.as_ref().is_some_and(|t| t.is_finished()) {
                return self.join().and_then(|_| Err(anyhow!("rank 0 stopped before serving")));
            }
            if let Some(p) = peers {
                p.check()?;
            }
            if let Some(e) = self.state.last_error.lock().unwrap().clone() {
                bail!("{e}");
            }
            if Instant::now() > deadline {
                bail!("the pipeline was not ready within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    /// Stops the engine (after the requests in flight) and waits for it.
    pub fn join(&mut self) -> Result<()> {
        self.state.shutdown.store(true, Ordering::SeqCst);
        self.requests = None;
        match self.thread.take() {
            Some(t) => t.join().map_err(|_| anyhow!("rank 0 panicked"))?,
            None => Ok(()),
        }
    }
}

/// Runs one request through a running engine, reporting each token as it arrives.
pub fn generate_with_engine(head: &LocalHead, prompt: &[u32], opts: &GenerateOptions, mut on_token: impl FnMut(u32) -> Result<()>) -> Result<Generation> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let req = Request {
        prompt: prompt.to_vec(),
        max_tokens: opts.max_new_tokens,
        sampling: opts.sampling.clone(),
        stop_ids: opts.stop_ids.clone(),
        ignore_eos: opts.ignore_eos,
        logprobs: None,
        events: tx,
        cancel: Default::default(),
    };
    let start = Instant::now();
    head.requests.as_ref().context("the engine has stopped")?.send(req).map_err(|_| anyhow!("the engine has stopped"))?;
    let mut ids = Vec::new();
    let mut first = None;
    let finish = loop {
        match rx.blocking_recv() {
            Some(Event::Token(t)) => {
                first.get_or_insert_with(Instant::now);
                ids.push(t.token);
                on_token(t.token)?;
            }
            Some(Event::Finished(r)) => break r,
            Some(Event::Failed(e)) => bail!("generation failed: {e}"),
            None => bail!("the engine stopped during generation"),
        }
    };
    let decode = first.map_or(0.0, |t| t.elapsed().as_secs_f64());
    Ok(Generation {
        prompt_tokens: prompt.len(),
        finish_reason: finish.as_str(),
        ttft_ms: first.map_or(0.0, |t| (t - start).as_secs_f64() * 1e3),
        decode_tok_s: if ids.len() > 1 && decode > 0.0 { (ids.len() - 1) as f64 / decode } else { 0.0 },
        token_ids: ids,
    })
}

/// Removes a run folder made by [`temp_run_dir`].
pub fn remove_run_dir(dir: &Path) {
    let _ = std::fs::remove_dir_all(dir);
}
