//! The OpenAI-compatible HTTP API on rank 0.

use anyhow::{bail, Result};

use crate::backend::Backend;
use crate::pipeline::RankOptions;

#[derive(Clone, Debug, Default)]
pub struct ServerConfig {
    pub addr: String,
    pub api_key: Option<String>,
}

pub fn serve<B: Backend>(_backend: B, _opts: RankOptions, _cfg: ServerConfig) -> Result<()> {
    bail!("the HTTP server is not built yet")
}
