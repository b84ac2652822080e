//! The built-in tiny checkpoint: every layout loads, inspects, evaluates consistently through
//! the cache, and chats through its tokenizer and template.

use std::process::Command;

use super::common::*;

fn eval_dump(model: &str, tokens: &str, chunk: Option<&str>, out: &std::path::Path) -> (Vec<f32>, Vec<f32>) {
    let mut args = vec!["eval", "--model", model, "--tokens", tokens, "--dump", out.to_str().unwrap()];
    if let Some(c) = chunk {
        args.extend(["--chunk", c]);
    }
    duet_ok(&args);
    (read_f32(out, "logits").1, read_f32(out, "mtp_logits").1)
}

#[test]
fn every_layout_loads_and_decodes_like_prefill() {
    // 40 tokens: past index_topk (16), so the indexer selects.
    let tokens: String = (0..40).map(|i| ((i * 37 + 11) % 300).to_string()).collect::<Vec<_>>().join(",");
    for quant in ["bf16", "fp8", "int4-fp8mtp"] {
        let d = TempDir::new(quant);
        duet_ok(&["tiny", "--out", d.s(), "--quant", quant]);
        let info = duet_ok(&["inspect", "--model", d.s()]);
        let label = match quant {
            "bf16" => "bf16",
            "fp8" => "fp8-128x128",
            _ => "int4-g32-asym",
        };
        assert!(info.contains(label), "{quant}: inspect should report {label}:\n{info}");
        assert!(info.contains("rank 1"), "{info}");
        let (full, mtp_full) = eval_dump(d.s(), &tokens, None, &d.join("a.safetensors"));
        let (step, mtp_step) = eval_dump(d.s(), &tokens, Some("1"), &d.join("b.safetensors"));
        let (chunked, _) = eval_dump(d.s(), &tokens, Some("6"), &d.join("c.safetensors"));
        assert!(max_abs_diff(&full, &step) < 1e-4, "{quant}: decode differs from prefill");
        assert!(max_abs_diff(&full, &chunked) < 1e-4, "{quant}: chunked prefill differs");
        assert!(max_abs_diff(&mtp_full, &mtp_step) < 1e-4, "{quant}: MTP decode differs");
        assert!(full.iter().all(|v| v.is_finite()));
    }
}

#[test]
fn builtin_tiny_chats() {
    let cache = TempDir::new("cache");
    let out = Command::new(env!("CARGO_BIN_EXE_duet"))
        .args(["generate", "--model", "tiny", "--prompt", "Hello there", "--chat", "--max-new-tokens", "8", "--temperature", "0", "--json"])
        .env("DUET_CACHE_DIR", cache.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v = last_json(&String::from_utf8(out.stdout).unwrap());
    assert_eq!(v["token_ids"].as_array().unwrap().len(), 8);
    assert!(v["text"].is_string() && v["ttft_ms"].as_f64().unwrap() > 0.0);
    assert!(v["decode_tok_s"].as_f64().unwrap() > 0.0);
    // "[gMASK]<sop><|user|>Hello there<|assistant|><think>": 4 special tokens + the text.
    assert!(v["prompt_tokens"].as_u64().unwrap() >= 6);
    assert!(cache.join("tiny-v1/config.json").exists());
}

#[test]
fn temperature_draws_where_the_logits_are_pick_the_hosts_tokens() {
    // DUET_DEVICE_SAMPLING hands a temperature draw without top-k to the backend
    // (`Backend::sample_rows`) with the uniform the host sampler would have drawn: the same
    // tokens, in one process and through a pipeline of two ranks (the last rank's stage),
    // without filters and with the checkpoint's top-p (generation_config.json's 0.95) and a
    // min-p.
    let d = TempDir::new("draws");
    duet_ok(&["tiny", "--out", d.s()]);
    let run = |device: &str, extra: &[&str]| {
        let mut args = vec!["generate", "--model", d.s(), "--prompt-ids", "5,17,42", "--max-new-tokens", "12", "--temperature", "1.0", "--seed", "3", "--ignore-eos", "--json"];
        args.extend_from_slice(extra);
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_duet")).args(&args).env("DUET_LOG", "error").env("DUET_DEVICE_SAMPLING", device).output().expect("run duet");
        assert!(out.status.success(), "duet {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        last_json(&String::from_utf8(out.stdout).unwrap())["token_ids"].clone()
    };
    for filters in [&["--top-p", "1", "--top-k", "0"][..], &[], &["--min-p", "0.05"]] {
        let host = run("0", filters);
        assert_eq!(run("1", filters), host, "{filters:?}");
        assert_eq!(run("1", &[filters, &["--ranks", "2", "--transport", "shm"]].concat()), host, "{filters:?}, two ranks");
    }
}

#[test]
fn seeded_sampling_is_reproducible() {
    let d = TempDir::new("seed");
    duet_ok(&["tiny", "--out", d.s()]);
    let run = |seed: &str| {
        last_json(&duet_ok(&[
            "generate", "--model", d.s(), "--prompt-ids", "5,17,42", "--max-new-tokens", "12", "--temperature", "1.0", "--top-p", "0.9",
            "--top-k", "50", "--seed", seed, "--ignore-eos", "--json",
        ]))["token_ids"]
            .clone()
    };
    assert_eq!(run("3"), run("3"));
    assert_ne!(run("3"), run("4"));
}
