//! Bad checkpoints, configs and inputs: each gives a one-line error naming the culprit and a
//! non-zero exit, never a panic.

use std::collections::BTreeMap;

use duet::checkpoint::safetensors::{write_file, OwnedTensor, SafetensorsFile};

use super::common::*;

const SHARD1: &str = "model-00001-of-00002.safetensors";
const SHARD2: &str = "model-00002-of-00002.safetensors";

/// A writable copy of the BF16 fixture.
fn broken_copy() -> TempDir {
    let t = TempDir::new("broken");
    copy_dir(&fixture("bf16"), t.path());
    t
}

fn eval_args(dir: &TempDir) -> Vec<String> {
    vec!["eval".into(), "--model".into(), dir.s().into(), "--tokens".into(), "1,2,3".into(), "--dump".into(), dir.join("out.safetensors").to_str().unwrap().into()]
}

fn expect_eval_error(dir: &TempDir, needles: &[&str]) {
    let args = eval_args(dir);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    duet_err(&args, needles);
}

/// Rewrites one shard through `edit`, which may change or drop tensors.
fn rewrite_shard(dir: &TempDir, shard: &str, edit: impl Fn(&mut BTreeMap<String, OwnedTensor>)) {
    let path = dir.join(shard);
    let f = SafetensorsFile::open(&path).unwrap();
    let mut tensors: BTreeMap<String, OwnedTensor> = f
        .tensors
        .keys()
        .map(|n| {
            let v = f.view(n).unwrap();
            (n.clone(), OwnedTensor { dtype: v.dtype, shape: v.shape.clone(), data: v.bytes().to_vec() })
        })
        .collect();
    drop(f);
    edit(&mut tensors);
    write_file(&path, &tensors).unwrap();
}

fn index_entry_for(dir: &TempDir, shard: &str, suffix: &str) -> String {
    let index: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("model.safetensors.index.json")).unwrap()).unwrap();
    index["weight_map"]
        .as_object()
        .unwrap()
        .iter()
        .find(|(n, f)| f.as_str() == Some(shard) && n.ends_with(suffix))
        .map(|(n, _)| n.clone())
        .expect("a tensor with that suffix in the shard")
}

#[test]
fn truncated_shard() {
    let d = broken_copy();
    let path = d.join(SHARD2);
    let len = std::fs::metadata(&path).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(len / 2).unwrap();
    expect_eval_error(&d, &[SHARD2, "truncated"]);
}

#[test]
fn bad_safetensors_header() {
    let d = broken_copy();
    let path = d.join(SHARD1);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[8..16].copy_from_slice(b"{garbage");
    std::fs::write(&path, bytes).unwrap();
    expect_eval_error(&d, &[SHARD1, "header"]);
}

#[test]
fn missing_tensor() {
    let d = broken_copy();
    let name = index_entry_for(&d, SHARD2, "o_proj.weight");
    rewrite_shard(&d, SHARD2, |t| {
        t.remove(&name);
    });
    // The index still lists it: the error names the shard that should hold it.
    expect_eval_error(&d, &[&name, SHARD2]);
    // Dropped from the index too: the model cannot find it.
    let ip = d.join("model.safetensors.index.json");
    let mut index: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&ip).unwrap()).unwrap();
    index["weight_map"].as_object_mut().unwrap().remove(&name);
    std::fs::write(&ip, index.to_string()).unwrap();
    expect_eval_error(&d, &[&name, "missing"]);
}

#[test]
fn wrong_shape() {
    let d = broken_copy();
    let name = index_entry_for(&d, SHARD1, "kv_b_proj.weight");
    rewrite_shard(&d, SHARD1, |t| {
        let w = t.get_mut(&name).unwrap();
        let cols = w.shape[1];
        w.shape = vec![w.shape[0] - 1, cols];
        w.data.truncate(w.shape[0] * cols * 2);
    });
    expect_eval_error(&d, &[&name, "shape", SHARD1]);
}

#[test]
fn wrong_dtype() {
    let d = broken_copy();
    let name = index_entry_for(&d, SHARD1, "q_a_layernorm.weight");
    rewrite_shard(&d, SHARD1, |t| {
        let w = t.get_mut(&name).unwrap();
        let n = w.shape[0];
        *w = OwnedTensor::i32(&[n], &vec![1; n]);
    });
    expect_eval_error(&d, &[&name, "dtype"]);
}

#[test]
fn missing_shard_file() {
    let d = broken_copy();
    std::fs::remove_file(d.join(SHARD2)).unwrap();
    expect_eval_error(&d, &[SHARD2, "does not exist"]);
}

#[test]
fn bad_json() {
    let d = broken_copy();
    std::fs::write(d.join("config.json"), "{\"model_type\": \"glm_moe_dsa\", ").unwrap();
    expect_eval_error(&d, &["config.json", "bad JSON"]);

    let d = broken_copy();
    std::fs::write(d.join("model.safetensors.index.json"), "[1, 2").unwrap();
    expect_eval_error(&d, &["model.safetensors.index.json", "bad JSON"]);
}

#[test]
fn inconsistent_config() {
    let edits: &[(&str, serde_json::Value, &str)] = &[
        ("n_group", serde_json::json!(3), "n_group"),
        ("hidden_size", serde_json::json!("wide"), "hidden_size"),
        ("indexer_types", serde_json::json!(["full", "shared"]), "indexer_types"),
        ("mlp_layer_types", serde_json::json!(["dense", "sparse", "dense", "moe", "sparse"]), "mlp_layer_types"),
        ("model_type", serde_json::json!("llama"), "model_type"),
        ("num_experts_per_tok", serde_json::json!(7), "num_experts_per_tok"),
    ];
    for (field, value, needle) in edits {
        let d = broken_copy();
        let p = d.join("config.json");
        let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        cfg[*field] = value.clone();
        std::fs::write(&p, cfg.to_string()).unwrap();
        expect_eval_error(&d, &[needle]);
    }
    // A config that fits together but not with the checkpoint: every tensor is checked.
    let d = broken_copy();
    let p = d.join("config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    cfg["q_lora_rank"] = serde_json::json!(64);
    std::fs::write(&p, cfg.to_string()).unwrap();
    expect_eval_error(&d, &["layer 0", "has shape"]);
}

#[test]
fn bad_inputs() {
    let m = fixture("bf16");
    let m = m.to_str().unwrap();
    duet_err(&["eval", "--model", m, "--tokens", "1,99999", "--dump", "/tmp/never.safetensors"], &["99999", "vocab"]);
    duet_err(&["generate", "--model", "/nonexistent/model", "--prompt-ids", "1"], &["/nonexistent/model"]);
    duet_err(&["generate", "--model", m, "--prompt", "hi"], &["tokenizer.json"]);
}
