//! The CPU backend against transformers' `GlmMoeDsaForCausalLM` (fixtures made by
//! tests/reference/make_fixtures.py): teacher-forced logits, MTP logits and 32 greedy steps
//! with the KV cache, for the BF16, FP8 and INT4 + FP8-MTP layouts. The fixtures' sequences are
//! longer than `index_topk`, so DSA really selects, and they cover IndexShare and n_group > 1.

use super::common::*;

const TOLERANCE: f32 = 1e-3;

fn check_eval(variant: &str, extra: &[&str]) {
    let dir = fixture(variant);
    let expected = dir.join("expected.safetensors");
    let ids = read_i64(&expected, "eval_ids");
    let tmp = TempDir::new("eval");
    let dump = tmp.join("out.safetensors");
    let tokens = join_ids(&ids);
    let mut args = vec!["eval", "--model", dir.to_str().unwrap(), "--tokens", &tokens, "--dump", dump.to_str().unwrap()];
    args.extend_from_slice(extra);
    duet_ok(&args);
    for name in ["logits", "mtp_logits"] {
        let (shape, got) = read_f32(&dump, name);
        let (want_shape, want) = read_f32(&expected, name);
        assert_eq!(shape, want_shape, "{variant} {name} shape");
        let d = max_abs_diff(&got, &want);
        assert!(d <= TOLERANCE, "{variant} {name} {extra:?}: max |Δ| = {d}");
    }
}

fn check_greedy(variant: &str) {
    let dir = fixture(variant);
    let expected = dir.join("expected.safetensors");
    let prompt = join_ids(&read_i64(&expected, "prompt_ids"));
    let want = read_i64(&expected, "greedy_ids");
    let n = want.len().to_string();
    let out = duet_ok(&[
        "generate", "--model", dir.to_str().unwrap(), "--prompt-ids", &prompt, "--max-new-tokens", &n, "--temperature", "0", "--ignore-eos", "--json",
    ]);
    let got: Vec<i64> = last_json(&out)["token_ids"].as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect();
    assert!(want.len() >= 24);
    assert_eq!(got, want, "{variant}: greedy tokens differ from transformers");
}

#[test]
fn bf16_matches_transformers() {
    check_eval("bf16", &[]);
    check_greedy("bf16");
}

#[test]
fn fp8_matches_transformers() {
    check_eval("fp8", &[]);
    check_greedy("fp8");
}

#[test]
fn int4_fp8_mtp_matches_transformers() {
    check_eval("int4-fp8mtp", &[]);
    check_greedy("int4-fp8mtp");
}

/// Prefill in one pass and decode through the cache (1 token, or k at a time) agree.
#[test]
fn prefill_and_cached_decode_agree() {
    check_eval("fp8", &["--chunk", "1"]);
    check_eval("int4-fp8mtp", &["--chunk", "5"]);
}
