//! The `duet` command line: argument parsing and dispatch. Each subcommand's work lives in a
//! small module here or in the library; errors print as one line naming the culprit, with a
//! non-zero exit.

mod eval;
mod generate;
mod inspect;
mod prompt;
mod rank;
mod serve;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Result};
use clap::{Args, Parser, Subcommand};

use crate::backend::Device;
use crate::pipeline::RankOptions;
use crate::tiny::{self, TinyQuant, TinySpec};
use crate::transport::TransportKind;

#[derive(Parser, Debug)]
#[command(name = "duet", version, about = "Serve GLM-5.x across GPU modules, streaming experts from host memory")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Where and how ranks run; shared by `rank`, `serve` and `generate --ranks`.
#[derive(Args, Debug, Clone)]
pub struct PipelineArgs {
    #[arg(long, value_enum, default_value_t = Device::Auto)]
    pub device: Device,
    /// GPU of this rank (rank r of a local pipeline uses GPU + r).
    #[arg(long)]
    pub gpu: Option<usize>,
    /// NUMA node to pin to (default: the GPU's node, else rank modulo the nodes).
    #[arg(long)]
    pub numa_node: Option<usize>,
    /// Data transport between ranks.
    #[arg(long, value_enum, default_value_t = TransportKind::Shm)]
    pub transport: TransportKind,
    /// First layer of every rank after the first, e.g. `40` or `26,52` (default: balanced by bytes).
    #[arg(long)]
    pub split: Option<String>,
    /// Folder shared by the ranks (certificate, sockets); default under the temp dir.
    #[arg(long)]
    pub run_dir: Option<PathBuf>,
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Rank r listens for QUIC on port + r (default: free ports for local pipelines, else 29500).
    #[arg(long)]
    pub port: Option<u16>,
    /// Explicit QUIC address of every rank, for ranks on several hosts.
    #[arg(long, value_delimiter = ',')]
    pub peers: Option<Vec<SocketAddr>>,
    /// Most sequences decoding together.
    #[arg(long, default_value_t = 32)]
    pub max_batch: usize,
    /// Longest prefill chunk in tokens.
    #[arg(long, default_value_t = 512)]
    pub prefill_chunk: usize,
    /// KV-cache positions per rank over all sequences.
    #[arg(long, default_value_t = 65536)]
    pub cache_positions: usize,
    /// Write a Chrome-trace timeline of every rank here.
    #[arg(long)]
    pub trace: Option<PathBuf>,
    /// Spin this many microseconds on the shared-memory ring before sleeping.
    #[arg(long, default_value_t = 50)]
    pub spin_us: u64,
    /// Seconds to wait for the other ranks to appear.
    #[arg(long, default_value_t = 60)]
    pub connect_timeout: u64,
}

impl PipelineArgs {
    pub fn options(&self, rank: usize, world: usize, model: PathBuf, default_port: u16) -> RankOptions {
        let port = self.port.unwrap_or(default_port);
        RankOptions {
            rank,
            world,
            model,
            device: self.device,
            gpu: self.gpu,
            numa_node: self.numa_node,
            transport: self.transport,
            split: self.split.clone(),
            run_dir: self.run_dir.clone().unwrap_or_else(|| std::env::temp_dir().join(format!("duet-{port}"))),
            host: self.host.clone(),
            port,
            peers: self.peers.clone(),
            max_batch: self.max_batch.max(1),
            prefill_chunk: self.prefill_chunk.max(1),
            cache_positions: self.cache_positions.max(1),
            trace: self.trace.clone(),
            spin: Duration::from_micros(self.spin_us),
            connect_timeout: Duration::from_secs(self.connect_timeout),
        }
    }
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Teacher-forced logits (and MTP logits) for a token sequence, written as safetensors.
    Eval {
        #[arg(long)]
        model: PathBuf,
        /// Comma-separated token ids.
        #[arg(long, value_delimiter = ',', required = true)]
        tokens: Vec<u32>,
        #[arg(long)]
        dump: PathBuf,
        /// Feed the tokens through the cache this many at a time (default: all at once).
        #[arg(long)]
        chunk: Option<usize>,
        #[arg(long, value_enum, default_value_t = Device::Auto)]
        device: Device,
    },
    /// Generate text from a prompt, streaming it to the terminal.
    Generate(generate::GenerateArgs),
    /// Run one rank of a pipeline (the launch script starts one per GPU module).
    Rank(rank::RankArgs),
    /// Serve the OpenAI-compatible API, starting `--ranks` ranks on this machine.
    Serve(serve::ServeArgs),
    /// Send a prompt to a running server and stream the reply.
    Prompt(prompt::PromptArgs),
    /// Summarize a checkpoint: config, precision per module, bytes, memory plan per rank.
    Inspect {
        #[arg(long)]
        model: PathBuf,
        /// Plan for this many pipeline ranks.
        #[arg(long, default_value_t = 2)]
        ranks: usize,
    },
    /// GPU measurements: `check` (every CUDA op against the CPU oracle, then the reference
    /// fixtures end to end) or `kernels` (bandwidth at real GLM-5.2 shapes).
    Bench {
        #[command(subcommand)]
        what: BenchCommand,
    },
    /// Write a small random checkpoint in the GLM-5.2 on-disk layout (or, with `--shape glm52`,
    /// a slice of GLM-5.2 at full width, for benchmarks).
    Tiny {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, value_enum, default_value_t = TinyQuant::Bf16)]
        quant: TinyQuant,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long, value_enum, default_value_t = TinyShape::Tiny)]
        shape: TinyShape,
        /// Decoder layers of the `glm52` slice (the first dense, the rest MoE; default 4).
        #[arg(long, value_parser = clap::value_parser!(u64).range(2..=78))]
        layers: Option<u64>,
        /// Routed experts per MoE layer of the `glm52` slice (default 32).
        #[arg(long, value_parser = clap::value_parser!(u64).range(8..=256))]
        experts: Option<u64>,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum TinyShape {
    /// The built-in tiny shape (hidden 128, 4 layers, 16 experts).
    Tiny,
    /// GLM-5.2's full width (hidden 6144, 64 heads, experts of width 2048, 8 routed per token,
    /// vocabulary 154880) with `--layers` layers of `--experts` experts.
    Glm52,
}

#[derive(Subcommand, Debug)]
enum BenchCommand {
    /// Every CUDA operation against the CPU backend on fresh random inputs, then the fixtures.
    Check {
        #[arg(long, default_value = "tests/fixtures")]
        fixtures: PathBuf,
        #[arg(long)]
        seed: Option<u64>,
    },
    /// Kernel bandwidth at real GLM-5.2 shapes.
    Kernels {
        #[arg(long, default_value_t = 20)]
        reps: usize,
        /// Only these parts: gemv, experts, mla, sampling (comma-separated).
        #[arg(long)]
        only: Option<String>,
        /// Only the rows whose label contains this text, e.g. "experts int4 8/token x1" (so a
        /// profiler's first launch of a kernel is that row's).
        #[arg(long)]
        case: Option<String>,
    },
}

pub fn main() -> i32 {
    let filter = tracing_subscriber::EnvFilter::try_from_env("DUET_LOG").unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(std::io::stderr).init();
    let cli = Cli::parse();
    match run(cli.command) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("error: {}", format!("{e:#}").replace('\n', " "));
            1
        }
    }
}

fn run(cmd: Command) -> Result<()> {
    match cmd {
        Command::Eval { model, tokens, dump, chunk, device } => eval::eval(&tiny::resolve_model(&model)?, &tokens, &dump, chunk, device),
        Command::Generate(args) => generate::run(args),
        Command::Rank(args) => rank::run(args),
        Command::Serve(args) => serve::run(args),
        Command::Prompt(args) => prompt::run(args),
        Command::Inspect { model, ranks } => inspect::inspect(&tiny::resolve_model(&model)?, ranks),
        Command::Bench { what: BenchCommand::Check { fixtures, seed } } => crate::bench::check::run(&fixtures, seed),
        Command::Bench { what: BenchCommand::Kernels { reps, only, case } } => crate::bench::kernels::run(reps, only.as_deref(), case.as_deref()),
        Command::Tiny { out, quant, seed, shape, layers, experts } => {
            let spec = match shape {
                TinyShape::Tiny if layers.is_some() || experts.is_some() => bail!("--layers and --experts shape the glm52 slice (--shape glm52); the tiny shape is fixed"),
                TinyShape::Tiny => TinySpec::new(quant, seed),
                TinyShape::Glm52 => TinySpec::glm52(quant, seed, layers.unwrap_or(4) as usize, experts.unwrap_or(32) as usize),
            };
            tiny::write(&out, &spec)?;
            println!("wrote a {shape:?}-shaped {quant:?} GLM-5.2-layout checkpoint to {}", out.display());
            Ok(())
        }
    }
}
