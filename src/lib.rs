#![recursion_limit = "256"]
//! duet: serves GLM-5.x (`glm_moe_dsa`) across GPU modules when the model does not fit in
//! GPU memory.
//!
//! Data flows one way through the modules, downwards in this list:
//! - [`cli`]: the `duet` subcommands (thin);
//! - [`generate`]: prefill + decode loops and sampling over a loaded model;
//! - [`model`]: the GLM-5.x forward (MLA + DSA, MoE, MTP) written against [`backend::Backend`];
//! - [`backend`]: the operations, implemented by the CPU reference backend;
//! - [`checkpoint`]: config, safetensors shards, BF16/FP8/INT4 weights, per-module precision;
//! - [`text`]: tokenizer and chat template;
//! - [`plan`]: bytes per layer and the split of layers over ranks;
//! - [`tiny`]: the built-in tiny checkpoint writer;
//! - [`bench`]: GPU correctness table and kernel benchmarks.

pub mod backend;
pub mod bench;
pub mod checkpoint;
pub mod cli;
pub mod coordinator;
pub mod generate;
pub mod model;
pub mod numa;
pub mod pipeline;
pub mod plan;
pub mod scheduler;
pub mod server;
pub mod transport;
pub mod sampling;
pub mod text;
pub mod tiny;
