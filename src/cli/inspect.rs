//! `duet inspect`: what a checkpoint holds and how it would be placed on ranks.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Result};

use crate::checkpoint::Checkpoint;
use crate::plan::{split_layers, ModelBytes};

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

pub fn inspect(dir: &Path, ranks: usize) -> Result<()> {
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
