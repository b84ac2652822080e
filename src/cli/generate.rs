//! `duet generate`: one prompt, streamed to the terminal; in this process (`--ranks 1`) or
//! through a pipeline of ranks it starts itself (`--ranks N`, rank 0 in this process).

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;

use super::PipelineArgs;
use crate::backend::{AnyBackend, Backend};
use crate::checkpoint::Checkpoint;
use crate::coordinator::{free_ports, generate_with_engine, remove_run_dir, temp_run_dir, LocalHead, Peers};
use crate::generate::{generate, GenerateOptions, Generation};
use crate::model::{Model, ModelParts};
use crate::sampling::SamplingParams;
use crate::text::{GenerationDefaults, Message, TextCodec};
use crate::tiny;

#[derive(Args, Debug)]
pub struct GenerateArgs {
    #[arg(long)]
    model: PathBuf,
    #[arg(long, conflicts_with = "prompt_ids", required_unless_present = "prompt_ids")]
    prompt: Option<String>,
    /// Wrap the prompt as a user turn of the chat template.
    #[arg(long, requires = "prompt")]
    chat: bool,
    /// Comma-separated prompt token ids.
    #[arg(long, value_delimiter = ',')]
    prompt_ids: Option<Vec<u32>>,
    #[arg(long, default_value_t = 128)]
    max_new_tokens: usize,
    /// 0 = greedy (default: generation_config.json, else greedy).
    #[arg(long)]
    temperature: Option<f32>,
    #[arg(long)]
    top_p: Option<f32>,
    #[arg(long)]
    top_k: Option<usize>,
    #[arg(long, default_value_t = 0.0)]
    min_p: f32,
    #[arg(long)]
    seed: Option<u64>,
    /// Keep generating past end-of-sequence tokens.
    #[arg(long)]
    ignore_eos: bool,
    /// Print a JSON summary as the last line.
    #[arg(long)]
    json: bool,
    /// Pipeline ranks: 1 runs in this process; N > 1 starts ranks 1..N as child processes.
    #[arg(long, default_value_t = 1)]
    ranks: usize,
    #[command(flatten)]
    pipeline: PipelineArgs,
}

pub fn run(a: GenerateArgs) -> Result<()> {
    let dir = tiny::resolve_model(&a.model)?;
    let ck = Checkpoint::open(&dir)?;
    let defaults = GenerationDefaults::load(&dir)?;
    let sampling = SamplingParams {
        temperature: a.temperature.or(defaults.temperature).unwrap_or(0.0),
        top_p: a.top_p.or(defaults.top_p).unwrap_or(1.0),
        top_k: a.top_k.or(defaults.top_k).unwrap_or(0),
        min_p: a.min_p,
        seed: a.seed,
    };
    let codec = if dir.join("tokenizer.json").exists() { Some(TextCodec::load(&dir)?) } else { None };
    let prompt = match (&a.prompt, &a.prompt_ids) {
        (Some(text), _) => {
            let codec = codec.as_ref().with_context(|| format!("{} has no tokenizer.json to encode --prompt", dir.display()))?;
            if a.chat {
                let rendered = codec.apply_chat_template(&[Message::new("user", text)], true, None, &Default::default())?;
                codec.encode(&rendered, false)?
            } else {
                codec.encode(text, true)?
            }
        }
        (None, Some(ids)) => ids.clone(),
        (None, None) => bail!("give --prompt or --prompt-ids"),
    };
    let stop_ids = defaults.eos_ids(&ck.config.eos_token_ids);
    let opts = GenerateOptions { max_new_tokens: a.max_new_tokens, sampling, stop_ids, ignore_eos: a.ignore_eos };
    if a.ranks == 0 {
        bail!("--ranks must be at least 1");
    }
    let backend = AnyBackend::open(a.pipeline.device, a.pipeline.gpu.unwrap_or(0))?;
    if a.ranks == 1 {
        let parts = ModelParts { mtp: false, ..ModelParts::whole(&ck) };
        return crate::with_backend!(backend, b => {
            let model = Model::load(b, &ck, parts)?;
            let name = model.backend.name();
            print_generation(codec.as_ref(), a.json, name, |on| generate(&model, &prompt, &opts, on))
        });
    }
    drop(ck);
    let own_dir = a.pipeline.run_dir.is_none();
    let mut pipeline = a.pipeline.clone();
    pipeline.run_dir = Some(pipeline.run_dir.unwrap_or_else(temp_run_dir));
    let port = match pipeline.port {
        Some(p) => p,
        None => free_ports(&pipeline.host, a.ranks)?,
    };
    let mut rank_opts = pipeline.options(0, a.ranks, dir.clone(), port);
    // One request: the cache only needs its prompt and output.
    rank_opts.cache_positions = rank_opts.cache_positions.max(prompt.len() + a.max_new_tokens);
    let mut peers = Some(Peers::spawn(&rank_opts)?);
    let name = backend_name(&backend);
    let mut head = crate::with_backend!(backend, b => LocalHead::start(b, rank_opts.clone()));
    let result = head.wait_ready(Duration::from_secs(pipeline.connect_timeout + 600), &mut peers).and_then(|_| {
        print_generation(codec.as_ref(), a.json, name, |on| generate_with_engine(&head, &prompt, &opts, on))
    });
    let joined = head.join();
    if let Some(p) = peers.take() {
        p.wait(Duration::from_secs(5));
    }
    if let Some(t) = &rank_opts.trace {
        crate::pipeline::trace::merge(t, a.ranks as u32)?;
    }
    if own_dir {
        remove_run_dir(&rank_opts.run_dir);
    }
    result.and(joined)
}

fn backend_name(b: &AnyBackend) -> &'static str {
    crate::with_backend!(b, x => x.name())
}

/// Streams the generated text to stdout as it completes, then the summary (a JSON line with
/// `--json`, a line on stderr otherwise).
fn print_generation(
    codec: Option<&TextCodec>,
    json: bool,
    device: &str,
    run: impl FnOnce(&mut dyn FnMut(u32) -> Result<()>) -> Result<Generation>,
) -> Result<()> {
    let mut stdout = std::io::stdout();
    let mut ids = Vec::new();
    let mut printed = 0usize;
    let result = run(&mut |tok| {
        ids.push(tok);
        if let Some(c) = codec {
            // Print the newly completed text; a partial UTF-8 sequence waits for the next token.
            let text = c.decode(&ids, true)?;
            if text.len() > printed && !text.ends_with('\u{fffd}') && text.is_char_boundary(printed) {
                write!(stdout, "{}", &text[printed..])?;
                stdout.flush()?;
                printed = text.len();
            }
        }
        Ok(())
    })?;
    let text = match codec {
        Some(c) => c.decode(&result.token_ids, true)?,
        None => String::new(),
    };
    if let Some(rest) = text.get(printed..) {
        write!(stdout, "{rest}")?;
    }
    writeln!(stdout)?;
    if json {
        let summary = serde_json::json!({
            "token_ids": result.token_ids,
            "text": text,
            "prompt_tokens": result.prompt_tokens,
            "completion_tokens": result.token_ids.len(),
            "finish_reason": result.finish_reason,
            "ttft_ms": result.ttft_ms,
            "decode_tok_s": result.decode_tok_s,
            "device": device,
        });
        writeln!(stdout, "{summary}")?;
    } else {
        eprintln!(
            "[{} prompt + {} generated tokens, ttft {:.1} ms, {:.1} tok/s, {}]",
            result.prompt_tokens,
            result.token_ids.len(),
            result.ttft_ms,
            result.decode_tok_s,
            result.finish_reason
        );
    }
    Ok(())
}
