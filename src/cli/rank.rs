//! `duet rank`: one rank of a pipeline. Rank 0 serves the OpenAI-compatible API.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;

use super::PipelineArgs;
use crate::backend::AnyBackend;
use crate::pipeline::rank::run_peer;
use crate::tiny;

#[derive(Args, Debug)]
pub struct RankArgs {
    #[arg(long)]
    rank: usize,
    #[arg(long)]
    world: usize,
    #[arg(long)]
    model: PathBuf,
    /// Rank 0's HTTP API.
    #[command(flatten)]
    http: super::serve::HttpArgs,
    #[command(flatten)]
    pipeline: PipelineArgs,
}

pub fn run(a: RankArgs) -> Result<()> {
    if a.world == 0 || a.rank >= a.world {
        bail!("--rank {} does not fit --world {}", a.rank, a.world);
    }
    let dir = tiny::resolve_model(&a.model)?;
    let opts = a.pipeline.options(a.rank, a.world, dir, 29500);
    let backend = AnyBackend::open(a.pipeline.device, a.pipeline.gpu.unwrap_or(a.rank))?;
    if a.rank == 0 {
        crate::with_backend!(backend, b => crate::server::serve(b, opts, a.http.config()))
    } else {
        crate::with_backend!(backend, b => run_peer(b, &opts))
    }
}
