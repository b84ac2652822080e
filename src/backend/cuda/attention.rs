//! MLA attention and the DSA indexer on the GPU: cache writes, absorbed queries, attention over
//! the latent cache, values, and the indexer's top-k selection (kernels/attention.cu).

use anyhow::{anyhow, bail, Result};

use super::cache::{CudaCache, CudaStep};
use super::weights::Fmt;
use super::{check_rows, Arg, CudaBackend, CudaMlaHeads, CudaSelection, CudaTensor, CudaVector, MlaScales};
use crate::backend::{length_bucket, IndexDims, MlaDims};
use crate::checkpoint::{Format, LinearWeight};

/// `kv_b_proj` split per head into `W_UK` and `W_UV` (the absorbed decode's weights, read whole
/// at every step), stored as compactly as loses nothing: bf16 when every value is one (a bf16
/// checkpoint), the checkpoint's FP8 codes with each row's scales (an FP8 checkpoint whose scale
/// blocks span whole 8-column runs), else f32. The kernels compute the oracle's f32 values.
pub(super) fn mla_heads(gpu: &CudaBackend, kv_b: &LinearWeight, dims: &MlaDims) -> Result<CudaMlaHeads> {
    let MlaDims { heads, nope, v, latent, .. } = *dims;
    dims.check_kv_b(kv_b)?;
    // kv_b rows of W_UK (each head's first `nope`) and of W_UV (its next `v`), in order.
    let rows = |first: usize, n: usize| (0..heads).flat_map(move |h| (0..n).map(move |d| h * (nope + v) + first + d));
    let upload = |bytes: &[u8]| gpu.stream.clone_htod(bytes).map_err(|e| anyhow!("{e:?}"));
    let upload_f32 = |vals: &[f32]| gpu.stream.clone_htod(vals).map_err(|e| anyhow!("{e:?}"));
    if let Format::Fp8 { block, .. } = &kv_b.format {
        if block[1] % 8 == 0 && latent % 8 == 0 {
            let (codes, grid) = (kv_b.data.bytes(), kv_b.scale_values());
            let sc = latent.div_ceil(block[1]);
            let pick = |first, n| -> (Vec<u8>, Vec<f32>) {
                let (mut c, mut s) = (Vec::new(), Vec::new());
                for r in rows(first, n) {
                    c.extend_from_slice(&codes[r * latent..(r + 1) * latent]);
                    s.extend_from_slice(&grid[(r / block[0]) * sc..(r / block[0] + 1) * sc]);
                }
                (c, s)
            };
            let ((uk, uk_s), (uv, uv_s)) = (pick(0, nope), pick(nope, v));
            return Ok(CudaMlaHeads {
                wuk: upload(&uk)?,
                wuv: upload(&uv)?,
                scales: Some(MlaScales { uk: upload_f32(&uk_s)?, uv: upload_f32(&uv_s)?, cols: sc, block: block[1] }),
                fmt: Fmt::Fp8,
                dims: *dims,
            });
        }
    }
    let w = kv_b.to_f32();
    let bf16 = w.iter().all(|x| x.to_bits() & 0xffff == 0);
    let pick = |first, n| -> Vec<u8> {
        rows(first, n)
            .flat_map(|r| &w[r * latent..(r + 1) * latent])
            .flat_map(|x| if bf16 { ((x.to_bits() >> 16) as u16).to_le_bytes().to_vec() } else { x.to_le_bytes().to_vec() })
            .collect()
    };
    Ok(CudaMlaHeads { wuk: upload(&pick(0, nope))?, wuv: upload(&pick(nope, v))?, scales: None, fmt: if bf16 { Fmt::Bf16 } else { Fmt::F32 }, dims: *dims })
}

/// The FP8 scale arguments of the absorb and values kernels (W_UK's scales, W_UV's, scale
/// columns, columns per scale); null and unused for the other storages.
fn scale_args(gpu: &CudaBackend, heads: &CudaMlaHeads) -> [Arg; 4] {
    match &heads.scales {
        Some(s) => [Arg::Ptr(gpu.ptr(&s.uk)), Arg::Ptr(gpu.ptr(&s.uv)), Arg::I32(s.cols as i32), Arg::I32(s.block as i32)],
        None => [Arg::Ptr(0), Arg::Ptr(0), Arg::I32(0), Arg::I32(1)],
    }
}

/// The step's latents (normalized) and rotated rope keys into the cache pool of layer `slot`.
pub(super) fn mla_cache_write(gpu: &CudaBackend, kv: &CudaTensor, norm: &CudaVector, eps: f32, step: &CudaStep, cache: &mut CudaCache, slot: usize) -> Result<()> {
    let (l, r) = (cache.spec.latent, cache.spec.rope);
    check_rows("mla_cache_write", kv, step.positions.len(), l + r)?;
    if kv.rows == 0 {
        return Ok(());
    }
    let pool = gpu.ptr(&cache.mla[slot]);
    gpu.launch(
        "mla_cache_write",
        (kv.rows as u32, 1, 1),
        128,
        (l + r) * 4,
        &[
            Arg::Ptr(gpu.ptr(&kv.buf)),
            Arg::Ptr(gpu.ptr(&norm.0)),
            Arg::F32(eps),
            Arg::Ptr(step.cos),
            Arg::Ptr(step.sin),
            Arg::I32(step.interleaved as i32),
            Arg::Meta(step.meta),
            Arg::Ptr(pool),
            Arg::I32(l as i32),
            Arg::I32(r as i32),
        ],
    )
}

/// Each head's query absorbed into the latent space (`q_nope · W_UK`) and its rotated rope part.
pub(super) fn mla_queries(gpu: &CudaBackend, q: &CudaTensor, heads: &CudaMlaHeads, step: &CudaStep) -> Result<(CudaTensor, CudaTensor)> {
    let MlaDims { heads: h, nope, rope, latent, .. } = heads.dims;
    check_rows("mla_queries", q, step.positions.len(), h * (nope + rope))?;
    let q_lat = gpu.tensor_of(q.rows, h * latent)?;
    let q_pe = gpu.tensor_of(q.rows, h * rope)?;
    if q.rows > 0 {
        let [uk_scale, _, scale_cols, scale_block] = scale_args(gpu, heads);
        gpu.launch_kernel(
            ("mla_queries", Some(heads.fmt)),
            ((q.rows * h) as u32, (latent as u32).div_ceil(128), 1),
            512,
            ((nope + rope).div_ceil(4) * 4 + 4 * 512) * 4,
            &[
                Arg::Ptr(gpu.ptr(&q.buf)),
                Arg::Ptr(gpu.ptr(&heads.wuk)),
                uk_scale,
                scale_cols,
                scale_block,
                Arg::Ptr(gpu.ptr(&q_lat.buf)),
                Arg::Ptr(gpu.ptr(&q_pe.buf)),
                Arg::Ptr(step.cos),
                Arg::Ptr(step.sin),
                Arg::I32(step.interleaved as i32),
                Arg::I32(h as i32),
                Arg::I32(nope as i32),
                Arg::I32(rope as i32),
                Arg::I32(latent as i32),
            ],
        )?;
    }
    Ok((q_lat, q_pe))
}

/// Attention over the latent cache (all positions, or the DSA selection), split over keys.
pub(super) fn mla_attend(gpu: &CudaBackend, q_lat: &CudaTensor, q_rope: &CudaTensor, cache: &CudaCache, slot: usize, step: &CudaStep, sel: Option<&CudaSelection>, dims: &MlaDims) -> Result<CudaTensor> {
    let MlaDims { heads: h, rope, latent, scale, .. } = *dims;
    let t = step.positions.len();
    check_rows("mla_attend", q_lat, t, h * latent)?;
    let out = gpu.tensor_of(t, h * latent)?;
    if t == 0 {
        return Ok(out);
    }
    let nk = match sel {
        Some(s) => s.topk,
        None => length_bucket(step.positions.iter().max().map_or(0, |p| p + 1)),
    };
    // Splits of 64 keys for parallelism (`DUET_MLA_SPLIT_KEYS` for sweeps), fewer when many
    // rows would make the partials large.
    let budget = 256usize << 20;
    let max_splits = (budget / (t * h * (latent + 2) * 4)).max(1);
    let splits = nk.div_ceil(split_keys()).clamp(1, max_splits);
    let ks = nk.div_ceil(splits);
    let part = gpu.alloc(t * h * splits * (latent + 2))?;
    let w = latent + rope;
    // The tensor-core experiment (DUET_MLA_TC=1) where its shapes and shared memory allow (the
    // bound keeps rows within the kernel's TC_QV query float4s per thread).
    let tc = mla_tc() && w % 8 == 0 && latent % 8 == 0 && latent <= 512 && mla_attend_tc_smem(w, ks) <= 200 * 1024;
    // Shared memory of mla_attend_split (its comment has the layout): 8 heads, 32-key tiles, 8 warps.
    let (kernel, heads_per_block, smem) = if tc {
        ("mla_attend_tc", 16, mla_attend_tc_smem(w, ks))
    } else {
        let (hb, kt, warps) = (8, 32, 8);
        ("mla_attend_split", 8, (w * hb + kt * (w + 1) + warps * hb * kt + kt * hb + 3 * hb) * 4)
    };
    if latent > 4 * 256 {
        bail!("mla_attend: latent width {latent} exceeds the kernel's 1024");
    }
    gpu.launch(
        kernel,
        (t as u32, (h as u32).div_ceil(heads_per_block), splits as u32),
        256,
        smem,
        &[
            Arg::Ptr(gpu.ptr(&q_lat.buf)),
            Arg::Ptr(gpu.ptr(&q_rope.buf)),
            Arg::Ptr(gpu.ptr(&cache.mla[slot])),
            Arg::Meta(step.meta),
            Arg::Ptr(sel.map_or(0, |s| gpu.ptr(&s.idx))),
            Arg::I32(sel.map_or(0, |s| s.topk as i32)),
            Arg::I32(h as i32),
            Arg::I32(latent as i32),
            Arg::I32(rope as i32),
            Arg::F32(scale),
            Arg::I32(ks as i32),
            Arg::Ptr(gpu.ptr(&part)),
        ],
    )?;
    gpu.launch(
        "mla_combine",
        (t as u32, h as u32, (latent as u32).div_ceil(128)),
        128,
        splits * 4,
        &[Arg::Ptr(gpu.ptr(&part)), Arg::I32(h as i32), Arg::I32(latent as i32), Arg::I32(splits as i32), Arg::Ptr(gpu.ptr(&out.buf))],
    )?;
    Ok(out)
}

/// The attended latents back to each head's values (`o · W_UVᵀ`).
pub(super) fn mla_values(gpu: &CudaBackend, o_lat: &CudaTensor, heads: &CudaMlaHeads) -> Result<CudaTensor> {
    let MlaDims { heads: h, v, latent, .. } = heads.dims;
    if o_lat.cols != h * latent {
        bail!("mla_values: input has {} columns, expected {}", o_lat.cols, h * latent);
    }
    let out = gpu.tensor_of(o_lat.rows, h * v)?;
    if o_lat.rows > 0 {
        let [_, uv_scale, scale_cols, scale_block] = scale_args(gpu, heads);
        gpu.launch_kernel(
            ("mla_values", Some(heads.fmt)),
            ((o_lat.rows * h) as u32, (v as u32).div_ceil(8), 1),
            256,
            0,
            &[
                Arg::Ptr(gpu.ptr(&o_lat.buf)),
                Arg::Ptr(gpu.ptr(&heads.wuv)),
                uv_scale,
                scale_cols,
                scale_block,
                Arg::Ptr(gpu.ptr(&out.buf)),
                Arg::I32(h as i32),
                Arg::I32(v as i32),
                Arg::I32(latent as i32),
            ],
        )?;
    }
    Ok(out)
}

/// The indexer's keys (LayerNorm, rope) into the cache of layer `slot`.
pub(super) fn index_cache_write(gpu: &CudaBackend, k: &CudaTensor, norm_w: &CudaVector, norm_b: &CudaVector, eps: f32, step: &CudaStep, cache: &mut CudaCache, slot: usize) -> Result<()> {
    let d = cache.spec.index_dim;
    check_rows("index_cache_write", k, step.positions.len(), d)?;
    let pool = cache.index[slot].as_ref().ok_or_else(|| anyhow!("index_cache_write: slot {slot} keeps no indexer keys"))?;
    if k.rows == 0 {
        return Ok(());
    }
    gpu.launch(
        "index_cache_write",
        (k.rows as u32, 1, 1),
        128,
        d * 4,
        &[
            Arg::Ptr(gpu.ptr(&k.buf)),
            Arg::Ptr(gpu.ptr(&norm_w.0)),
            Arg::Ptr(gpu.ptr(&norm_b.0)),
            Arg::F32(eps),
            Arg::Ptr(step.cos),
            Arg::Ptr(step.sin),
            Arg::I32(step.indexer_interleaved as i32),
            Arg::Meta(step.meta),
            Arg::Ptr(gpu.ptr(pool)),
            Arg::I32(d as i32),
            Arg::I32(cache.spec.rope as i32),
        ],
    )
}

/// The indexer's scores over the cached keys and the top-k positions per query.
pub(super) fn index_select(gpu: &CudaBackend, q: &CudaTensor, w: &CudaTensor, cache: &CudaCache, slot: usize, step: &CudaStep, dims: &IndexDims) -> Result<CudaSelection> {
    let IndexDims { heads: nh, head_dim: d, rope, topk } = *dims;
    let t = step.positions.len();
    check_rows("index_select q", q, t, nh * d)?;
    check_rows("index_select w", w, t, nh)?;
    if d % 4 != 0 {
        bail!("index_select: indexer heads of {d} dims are not supported (a multiple of 4 is needed)");
    }
    let pool = cache.index[slot].as_ref().ok_or_else(|| anyhow!("index_select: slot {slot} keeps no indexer keys"))?;
    // topk_finish writes every row's k entries (-1 where a row has fewer positions).
    let idx = gpu.alloc_indices(t * topk)?;
    if t == 0 {
        return Ok(CudaSelection { topk, idx });
    }
    let ld = length_bucket(step.positions.iter().max().map_or(1, |p| p + 1));
    let scores = gpu.alloc(t * ld)?;
    gpu.launch(
        "index_scores",
        // 64-key tiles, 4 per block.
        (t as u32, (ld as u32).div_ceil(64 * 4), 1),
        256,
        {
            // index_scores' shared memory (its comment has the layout): heads padded to 8, 64-key tiles, 4 groups.
            let nhp = nh.div_ceil(8) * 8;
            (d * nhp + nhp + 64 * (d + 1) + 64 * 4) * 4
        },
        &[
            Arg::Ptr(gpu.ptr(&q.buf)),
            Arg::Ptr(gpu.ptr(&w.buf)),
            Arg::Ptr(gpu.ptr(pool)),
            Arg::Meta(step.meta),
            Arg::Ptr(step.cos),
            Arg::Ptr(step.sin),
            Arg::I32(step.indexer_interleaved as i32),
            Arg::I32(nh as i32),
            Arg::I32(d as i32),
            Arg::I32(rope as i32),
            Arg::I32(ld as i32),
            Arg::Ptr(gpu.ptr(&scores)),
        ],
    )?;
    // Top-k across many blocks: histogram, threshold bin, collect, finish.
    let chunks = (ld as u32).div_ceil(1024); // TOPK_CHUNK in attention.cu
    // (Through the backend's allocator, so a graph capture keeps them like its other buffers.)
    let (mut hist, mut meta, cand) = (gpu.uninit::<u32>(t * 4096)?, gpu.uninit::<i32>(t * 4)?, gpu.uninit::<i32>(t * ld)?);
    gpu.stream.memset_zeros(&mut hist).map_err(|e| anyhow!("{e:?}"))?;
    gpu.stream.memset_zeros(&mut meta).map_err(|e| anyhow!("{e:?}"))?;
    let base = [Arg::Ptr(gpu.ptr(&scores)), Arg::Meta(step.meta), Arg::I32(ld as i32), Arg::I32(topk as i32)];
    let with = |extra: &[Arg]| base.iter().cloned().chain(extra.iter().cloned()).collect::<Vec<Arg>>();
    gpu.launch("topk_hist", (t as u32, chunks, 1), 256, 0, &with(&[Arg::Ptr(gpu.ptr(&hist))]))?;
    gpu.launch(
        "topk_threshold",
        (t as u32, 1, 1),
        1024,
        0,
        &[Arg::Ptr(gpu.ptr(&hist)), Arg::Meta(step.meta), Arg::I32(ld as i32), Arg::I32(topk as i32), Arg::Ptr(gpu.ptr(&meta))],
    )?;
    gpu.launch("topk_collect", (t as u32, chunks, 1), 256, 0, &with(&[Arg::Ptr(gpu.ptr(&meta)), Arg::Ptr(gpu.ptr(&idx)), Arg::Ptr(gpu.ptr(&cand))]))?;
    gpu.launch("topk_finish", (t as u32, 1, 1), 256, 0, &with(&[Arg::Ptr(gpu.ptr(&meta)), Arg::Ptr(gpu.ptr(&cand)), Arg::Ptr(gpu.ptr(&idx))]))?;
    Ok(CudaSelection { topk, idx })
}

/// Keys per split of `mla_attend` (`DUET_MLA_SPLIT_KEYS`, a multiple of 32 up to 1024; 64 by
/// default).
fn split_keys() -> usize {
    static KEYS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *KEYS.get_or_init(|| super::kernels::env_usize("DUET_MLA_SPLIT_KEYS", "a multiple of 32 up to 1024", |k| k % 32 == 0 && (32..=1024).contains(&k)).unwrap_or(64))
}

/// Whether attention takes the tensor-core experiment `mla_attend_tc` (`DUET_MLA_TC=1`; not yet
/// measured).
fn mla_tc() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| super::kernels::env_switch("DUET_MLA_TC", false))
}

/// Shared memory of `mla_attend_tc` for rows of `w` floats and `ks` keys per split (the
/// kernel's layout: key row pointers, 16 query rows and two 32-key tiles padded by 4 floats,
/// the scores of two dim halves, the probabilities, and three values per head).
fn mla_attend_tc_smem(w: usize, ks: usize) -> usize {
    let (hb, kt, pad) = (16, 32, 4);
    ks.div_ceil(kt) * kt * 8 + (hb * (w + pad) + 2 * kt * (w + pad) + 2 * hb * kt + hb * (kt + pad) + 3 * hb) * 4
}
