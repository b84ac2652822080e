//! `duet eval`: teacher-forced logits (and MTP logits) of a token sequence.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Result};

use crate::backend::{AnyBackend, Backend, Batch, Device};
use crate::checkpoint::safetensors::{write_file, OwnedTensor};
use crate::checkpoint::Checkpoint;
use crate::model::{Model, ModelParts};

pub fn eval(dir: &Path, tokens: &[u32], dump: &Path, chunk: Option<usize>, device: Device) -> Result<()> {
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

