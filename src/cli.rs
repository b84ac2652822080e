//! The `duet` command line. Each subcommand parses its arguments here and calls into the
//! library; errors print as one line naming the culprit, with a non-zero exit.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

use crate::backend::{AnyBackend, Backend, Batch, Device};
use crate::checkpoint::safetensors::{write_file, OwnedTensor};
use crate::checkpoint::Checkpoint;
use crate::generate::{generate, GenerateOptions};
use crate::model::{Model, ModelParts};
use crate::plan::{split_layers, ModelBytes};
use crate::sampling::SamplingParams;
use crate::text::{GenerationDefaults, Message, TextCodec};
use crate::tiny::{self, TinyQuant, TinySpec};

#[derive(Parser, Debug)]
#[command(name = "duet", version, about = "Serve GLM-5.x across GPU modules, streaming experts from host memory")]
struct Cli {
    #[command(subcommand)]
    command: Command,
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
    Generate {
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
        #[arg(long, value_enum, default_value_t = Device::Auto)]
        device: Device,
    },
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
    /// Write a small random checkpoint in the GLM-5.2 on-disk layout.
    Tiny {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, value_enum, default_value_t = TinyQuant::Bf16)]
        quant: TinyQuant,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
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
    },
}

pub fn main() -> i32 {
    let filter = tracing_subscriber::EnvFilter::try_from_env("DUET_LOG").unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
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
        Command::Eval { model, tokens, dump, chunk, device } => eval(&tiny::resolve_model(&model)?, &tokens, &dump, chunk, device),
        Command::Generate {
            model,
            prompt,
            chat,
            prompt_ids,
            max_new_tokens,
            temperature,
            top_p,
            top_k,
            min_p,
            seed,
            ignore_eos,
            json,
            device,
        } => {
            let dir = tiny::resolve_model(&model)?;
            let defaults = GenerationDefaults::load(&dir)?;
            let sampling = SamplingParams {
                temperature: temperature.or(defaults.temperature).unwrap_or(0.0),
                top_p: top_p.or(defaults.top_p).unwrap_or(1.0),
                top_k: top_k.or(defaults.top_k).unwrap_or(0),
                min_p,
                seed,
            };
            let input = match (prompt, prompt_ids) {
                (Some(p), _) => PromptInput::Text { text: p, chat },
                (None, Some(ids)) => PromptInput::Ids(ids),
                (None, None) => bail!("give --prompt or --prompt-ids"),
            };
            generate_cmd(&dir, input, max_new_tokens, sampling, ignore_eos, json, device, &defaults)
        }
        Command::Inspect { model, ranks } => inspect(&tiny::resolve_model(&model)?, ranks),
        Command::Bench { what: BenchCommand::Check { fixtures, seed } } => crate::bench::check::run(&fixtures, seed),
        Command::Bench { what: BenchCommand::Kernels { reps } } => crate::bench::kernels::run(reps),
        Command::Tiny { out, quant, seed } => {
            tiny::write(&out, &TinySpec::new(quant, seed))?;
            println!("wrote a tiny {quant:?} GLM-5.2-layout checkpoint to {}", out.display());
            Ok(())
        }
    }
}

fn eval(dir: &Path, tokens: &[u32], dump: &Path, chunk: Option<usize>, device: Device) -> Result<()> {
    let ck = Checkpoint::open(dir)?;
    let backend = AnyBackend::open(device, 0)?;
    crate::with_backend!(backend, b => eval_with(Model::load(b, &ck, ModelParts::whole(&ck))?, tokens, dump, chunk))
}

fn eval_with<B: Backend>(model: Model<B>, tokens: &[u32], dump: &Path, chunk: Option<usize>) -> Result<()> {
    let b = &model.backend;
    let t = tokens.len();
    if t == 0 {
        bail!("--tokens is empty");
    }
    let chunk = chunk.unwrap_or(t).max(1);
    let mut cache = model.new_cache(t)?;
    let vocab = model.config.vocab_size;
    let hidden_size = model.config.hidden_size;
    let mut logits = Vec::with_capacity(t * vocab);
    let mut hidden = Vec::with_capacity(t * hidden_size);
    for start in (0..t).step_by(chunk) {
        let end = (start + chunk).min(t);
        let batch = Batch::single(0, start, end - start);
        let h = model.forward(&tokens[start..end], &batch, &mut cache)?;
        logits.extend(b.to_host(&model.logits(&h)?)?);
        hidden.extend(b.to_host(&h)?);
    }
    let mut out = BTreeMap::new();
    out.insert("logits".to_string(), OwnedTensor::f32(&[t, vocab], &logits));
    if model.has_mtp() && t >= 2 {
        let mut mtp = Vec::with_capacity((t - 1) * vocab);
        for start in (0..t - 1).step_by(chunk) {
            let end = (start + chunk).min(t - 1);
            let batch = Batch::single(0, start, end - start);
            let h = b.tensor(end - start, hidden_size, &hidden[start * hidden_size..end * hidden_size])?;
            mtp.extend(b.to_host(&model.mtp_logits(&h, &tokens[start + 1..end + 1], &batch, &mut cache)?)?);
        }
        out.insert("mtp_logits".to_string(), OwnedTensor::f32(&[t - 1, vocab], &mtp));
    }
    write_file(dump, &out)?;
    Ok(())
}

enum PromptInput {
    Text { text: String, chat: bool },
    Ids(Vec<u32>),
}

#[allow(clippy::too_many_arguments)]
fn generate_cmd(
    dir: &Path,
    input: PromptInput,
    max_new_tokens: usize,
    sampling: SamplingParams,
    ignore_eos: bool,
    json: bool,
    device: Device,
    defaults: &GenerationDefaults,
) -> Result<()> {
    let ck = Checkpoint::open(dir)?;
    let codec = if dir.join("tokenizer.json").exists() { Some(TextCodec::load(dir)?) } else { None };
    let prompt = match input {
        PromptInput::Ids(ids) => ids,
        PromptInput::Text { text, chat } => {
            let codec = codec.as_ref().with_context(|| format!("{} has no tokenizer.json to encode --prompt", dir.display()))?;
            if chat {
                let rendered = codec.apply_chat_template(&[Message::new("user", &text)], true, None, &Default::default())?;
                codec.encode(&rendered, false)?
            } else {
                codec.encode(&text, true)?
            }
        }
    };
    let mut stop_ids = ck.config.eos_token_ids.clone();
    stop_ids.extend(defaults.eos_token_ids.iter().filter(|id| !ck.config.eos_token_ids.contains(id)));
    let opts = GenerateOptions { max_new_tokens, sampling, stop_ids, ignore_eos };
    let parts = ModelParts { mtp: false, ..ModelParts::whole(&ck) };
    let backend = AnyBackend::open(device, 0)?;
    crate::with_backend!(backend, b => generate_with(Model::load(b, &ck, parts)?, &prompt, &opts, codec.as_ref(), json))
}

fn generate_with<B: Backend>(model: Model<B>, prompt: &[u32], opts: &GenerateOptions, codec: Option<&TextCodec>, json: bool) -> Result<()> {
    let mut stdout = std::io::stdout();
    let mut ids = Vec::new();
    let mut printed = 0usize;
    let result = generate(&model, prompt, opts, |tok| {
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
            "device": model.backend.name(),
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

fn human(bytes: usize) -> String {
    let b = bytes as f64;
    if b >= 1e9 {
        format!("{:.2} GB", b / 1e9)
    } else if b >= 1e6 {
        format!("{:.2} MB", b / 1e6)
    } else {
        format!("{:.1} kB", b / 1e3)
    }
}

fn inspect(dir: &Path, ranks: usize) -> Result<()> {
    let ck = Checkpoint::open(dir)?;
    let c = &ck.config;
    println!("checkpoint   {}", dir.display());
    println!("shards       {} ({} tensors, {})", ck.shard_count(), ck.tensor_names().count(), human(ck.total_bytes()));
    println!(
        "model        glm_moe_dsa: {} layers ({} dense, {} MoE){}, hidden {}, vocab {}",
        c.num_hidden_layers,
        c.mlp_layer_types.iter().filter(|k| **k == crate::checkpoint::config::MlpKind::Dense).count(),
        c.mlp_layer_types.iter().filter(|k| **k == crate::checkpoint::config::MlpKind::Sparse).count(),
        if c.num_nextn_predict_layers > 0 { " + 1 MTP layer" } else { "" },
        c.hidden_size,
        c.vocab_size
    );
    println!(
        "attention    MLA {} heads, q_lora {}, kv_lora {}, nope/rope/v {}/{}/{}, rope theta {}",
        c.num_attention_heads, c.q_lora_rank, c.kv_lora_rank, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim, c.rope_theta
    );
    let full = c.indexer_types.iter().filter(|k| **k == crate::checkpoint::config::IndexerKind::Full).count();
    println!(
        "DSA          top-{} of {} indexer heads x {}; indexer on {full} layers, {} share (IndexShare)",
        c.index_topk,
        c.index_n_heads,
        c.index_head_dim,
        c.num_hidden_layers - full
    );
    println!(
        "MoE          {} routed experts (top {}, {} groups keep {}), {} shared, width {}, scaling {}",
        c.n_routed_experts, c.num_experts_per_tok, c.n_group, c.topk_group, c.n_shared_experts, c.moe_intermediate_size, c.routed_scaling_factor
    );
    if let Some(q) = &c.quantization {
        println!("quantization {}", q.describe());
    }
    if let Some(q) = &c.mtp_quantization {
        println!("mtp quant    {}", q.describe());
    }

    // Precision per module kind, read from the tensors themselves.
    let mut kinds: BTreeMap<String, BTreeMap<String, usize>> = BTreeMap::new();
    let mut params = (0usize, 0usize);
    let mut names: Vec<&String> = ck.tensor_names().collect();
    names.sort();
    for name in names {
        let module = if let Some(m) = name.strip_suffix(".weight_packed") {
            m
        } else if let Some(m) = name.strip_suffix(".weight") {
            let t = ck.tensor(name)?;
            if t.shape.len() != 2 {
                continue;
            }
            m
        } else {
            continue;
        };
        let (rows, cols) = module_shape(&ck, module)?;
        let w = ck.linear(module, rows, cols)?;
        let kind: String = module
            .split('.')
            .map(|p| if p.chars().all(|ch| ch.is_ascii_digit()) { "N" } else { p })
            .collect::<Vec<_>>()
            .join(".");
        let kind = if module.starts_with(&format!("model.layers.{}.", c.num_hidden_layers)) {
            kind.replacen("model.layers.N", "mtp", 1)
        } else {
            kind
        };
        *kinds.entry(kind).or_default().entry(w.precision()).or_default() += 1;
        if module.contains(".mlp.experts.") {
            params.1 += rows * cols;
        } else {
            params.0 += rows * cols;
        }
    }
    println!("precision per module kind:");
    for (kind, precs) in &kinds {
        let list: Vec<String> = precs.iter().map(|(p, n)| format!("{p} x{n}")).collect();
        println!("  {kind:<52} {}", list.join(", "));
    }
    let bytes = ModelBytes::of(&ck);
    let resident: usize = bytes.embed + bytes.head + bytes.layers.iter().map(|l| l.resident).sum::<usize>() + bytes.mtp.resident;
    let experts: usize = bytes.layers.iter().map(|l| l.experts).sum::<usize>() + bytes.mtp.experts;
    println!(
        "parameters   {:.3} B in linear layers: {:.3} B resident, {:.3} B routed experts",
        (params.0 + params.1) as f64 / 1e9,
        params.0 as f64 / 1e9,
        params.1 as f64 / 1e9
    );
    println!("bytes        resident weights {}, routed experts {}", human(resident), human(experts));
    let ranges = split_layers(&bytes, ranks);
    println!("memory plan for {} ranks (layers split by bytes):", ranges.len());
    let last = ranges.len() - 1;
    for (r, range) in ranges.iter().enumerate() {
        let mut res: usize = bytes.layers[range.clone()].iter().map(|l| l.resident).sum();
        let mut exp: usize = bytes.layers[range.clone()].iter().map(|l| l.experts).sum();
        let mut parts = vec![format!("layers {}..{}", range.start, range.end)];
        if r == 0 {
            res += bytes.embed;
            parts.insert(0, "embed".into());
        }
        if r == last {
            res += bytes.head + bytes.mtp.resident;
            exp += bytes.mtp.experts;
            parts.push("norm + lm_head".into());
            if c.num_nextn_predict_layers > 0 {
                parts.push("MTP".into());
            }
        }
        println!("  rank {r}: {:<44} resident {:>10}, experts {:>10}", parts.join(", "), human(res), human(exp));
    }
    Ok(())
}

/// `[rows, cols]` of a linear module from its weight or `weight_shape`.
fn module_shape(ck: &Checkpoint, module: &str) -> Result<(usize, usize)> {
    if let Ok(s) = ck.tensor(&format!("{module}.weight_shape")) {
        let v = s.to_i64()?;
        if v.len() == 2 && v[0] > 0 && v[1] > 0 {
            return Ok((v[0] as usize, v[1] as usize));
        }
        bail!("tensor '{module}.weight_shape' in {} is not a 2-D shape", s.file.display());
    }
    let t = ck.tensor(&format!("{module}.weight"))?;
    Ok((t.shape[0], t.shape[1]))
}
