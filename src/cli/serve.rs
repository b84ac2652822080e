//! `duet serve`: the OpenAI API on rank 0, starting the other ranks locally.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;

use super::PipelineArgs;
use crate::backend::AnyBackend;
use crate::coordinator::{free_ports, remove_run_dir, temp_run_dir, Peers};
use crate::server::{serve_with, ServerConfig};
use crate::pipeline::rank::start_engine;
use crate::tiny;

#[derive(Args, Debug)]
pub struct ServeArgs {
    #[arg(long)]
    model: PathBuf,
    /// Pipeline ranks started on this machine (rank 0 is this process).
    #[arg(long, default_value_t = 1)]
    ranks: usize,
    #[command(flatten)]
    http: HttpArgs,
    #[command(flatten)]
    pipeline: PipelineArgs,
}

/// HTTP options of rank 0.
#[derive(Args, Debug, Clone)]
pub struct HttpArgs {
    /// Address of the HTTP API (loopback unless told otherwise).
    #[arg(long, default_value = "127.0.0.1:8000")]
    pub http: String,
    /// Require `Authorization: Bearer KEY`.
    #[arg(long, env = "DUET_API_KEY")]
    pub api_key: Option<String>,
    /// Model name clients use (default: the checkpoint folder's name).
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// `glm45` returns `<think>` reasoning as `reasoning_content`; `none` leaves it in the text.
    #[arg(long, default_value = "glm45", value_parser = ["glm45", "none"])]
    pub reasoning_parser: String,
    /// Requests waiting beyond this many get 429.
    #[arg(long, default_value_t = 256)]
    pub max_queue: usize,
}

impl HttpArgs {
    pub fn config(&self) -> ServerConfig {
        ServerConfig {
            addr: self.http.clone(),
            api_key: self.api_key.clone(),
            served_name: self.served_model_name.clone(),
            reasoning: self.reasoning_parser == "glm45",
            max_queue: self.max_queue,
            ..Default::default()
        }
    }
}

pub fn run(a: ServeArgs) -> Result<()> {
    if a.ranks == 0 {
        bail!("--ranks must be at least 1");
    }
    let dir = tiny::resolve_model(&a.model)?;
    let own_dir = a.pipeline.run_dir.is_none() && a.ranks > 1;
    let mut pipeline = a.pipeline.clone();
    if a.ranks > 1 {
        pipeline.run_dir = Some(pipeline.run_dir.unwrap_or_else(temp_run_dir));
    }
    let port = match pipeline.port {
        Some(p) => p,
        None if a.ranks > 1 => free_ports(&pipeline.host, a.ranks)?,
        None => 29500,
    };
    let opts = pipeline.options(0, a.ranks, dir, port);
    let peers = if a.ranks > 1 { Some(Peers::spawn(&opts)?) } else { None };
    let backend = AnyBackend::open(pipeline.device, pipeline.gpu.unwrap_or(0))?;
    let (handle, join) = crate::with_backend!(backend, b => start_engine(b, opts.clone()));
    let result = serve_with(handle, &opts, a.http.config(), join);
    if let Some(p) = peers {
        p.wait(std::time::Duration::from_secs(5));
    }
    if let Some(t) = &opts.trace {
        crate::pipeline::trace::merge(t, a.ranks as u32)?;
    }
    if own_dir {
        remove_run_dir(&opts.run_dir);
    }
    result
}
