//! `duet bench kernels`: the CUDA kernels at real GLM-5.2 shapes, random weights made
//! in-process, timed with CUDA events (median of repeats after warm-up), reported as achieved
//! GB/s and as a fraction of the device bandwidth measured in the same run.

use std::sync::Arc;

use anyhow::{anyhow, Result};
use cudarc::driver::{sys::CUevent_flags, CudaContext, CudaStream};

use crate::backend::cuda::weights::Fmt;
use crate::backend::cuda::{timeline, CudaBackend, CudaRouting};
use crate::backend::{Backend, Batch, CacheSpec, ExpertWeights, IndexDims, MlaDims, RopeSpec, RouterParams};
use crate::checkpoint::linear::{Format, LinearWeight};
use crate::checkpoint::safetensors::{DType, OwnedTensor, TensorView};
use crate::model::mlp::Moe;
use crate::sampling::Rng;

/// Times `f` with CUDA events: `warmup` runs, then the median of `reps` timed runs (ms).
fn time_ms(ctx: &Arc<CudaContext>, stream: &Arc<CudaStream>, warmup: usize, reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    for _ in 0..warmup {
        f()?;
    }
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps {
        let start = ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).map_err(|e| anyhow!("{e:?}"))?;
        let end = ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).map_err(|e| anyhow!("{e:?}"))?;
        start.record(stream).map_err(|e| anyhow!("{e:?}"))?;
        f()?;
        end.record(stream).map_err(|e| anyhow!("{e:?}"))?;
        end.synchronize().map_err(|e| anyhow!("{e:?}"))?;
        times.push(start.elapsed_ms(&end).map_err(|e| anyhow!("{e:?}"))? as f64);
    }
    Ok(median(times))
}

/// The median of `times` (not empty).
fn median(mut times: Vec<f64>) -> f64 {
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

/// Times `f` as the GPU runs it, without host launch overhead: `inner` calls are captured in a
/// CUDA graph, the graph is replayed `reps` times between events; returns ms per call.
fn time_graph(gpu: &CudaBackend, inner: usize, reps: usize, f: impl FnMut() -> Result<()>) -> Result<f64> {
    let graph = graph_of(gpu, inner, f)?;
    let ms = time_ms(gpu.context(), gpu.stream(), 2, reps, || graph.launch())?;
    Ok(ms / inner as f64)
}

/// `inner` calls of `f` captured in a CUDA graph, uploaded; `f` runs once outside it first
/// (module load, first allocations: what it frees is then no graph's).
fn graph_of(gpu: &CudaBackend, inner: usize, mut f: impl FnMut() -> Result<()>) -> Result<crate::backend::cuda::graphs::Recorded> {
    f()?;
    gpu.synchronize()?;
    let graph = crate::backend::cuda::graphs::record(gpu, || (0..inner).try_for_each(|_| f()))?;
    graph.upload()?;
    Ok(graph)
}

/// The diagnostic timeline (kernels built with -DTIMELINE=1) of two calls of `f` captured in
/// one graph (the second's kernels follow the first's as a layer's follow the one before):
/// the graph replayed once to warm up, then once with the tables emptied.
fn block_timeline(gpu: &CudaBackend, f: impl FnMut() -> Result<()>) -> Result<String> {
    gpu.timeline_reset()?;
    let graph = graph_of(gpu, 2, f)?;
    graph.launch()?;
    gpu.timeline_rearm()?;
    graph.launch()?;
    Ok(timeline::table(&gpu.timeline_read()?))
}

/// A weight of random bits in its storage format (fast to make at real sizes; the values are
/// finite and the kernels do the same work as on real weights).
fn random_weight(module: &str, rows: usize, cols: usize, fmt: &str, rng: &mut Rng) -> LinearWeight {
    let bytes = |n: usize, rng: &mut Rng| -> Vec<u8> { (0..n.div_ceil(8)).flat_map(|_| rng.next_u64().to_le_bytes()).take(n).collect() };
    let view = |suffix: &str, t: OwnedTensor| TensorView::in_memory(&format!("{module}.{suffix}"), t);
    let (data, format) = match fmt {
        "bf16" => {
            // Random mantissas with exponents near 1/√cols.
            let data: Vec<u8> = (0..rows * cols).flat_map(|_| half::bf16::from_f32(((rng.next_u64() % 2001) as f32 - 1000.0) * 1e-5).to_bits().to_le_bytes()).collect();
            (view("weight", OwnedTensor { dtype: DType::BF16, shape: vec![rows, cols], data }), Format::Plain)
        }
        "fp8" => {
            // Clear bit 6 so no code is NaN (0x7f / 0xff) and magnitudes stay moderate.
            let data: Vec<u8> = bytes(rows * cols, rng).into_iter().map(|b| b & 0xbf).collect();
            let scales = vec![1e-3f32; rows.div_ceil(128) * cols.div_ceil(128)];
            (
                view("weight", OwnedTensor { dtype: DType::F8E4M3, shape: vec![rows, cols], data }),
                Format::Fp8 { scale: view("weight_scale_inv", OwnedTensor::f32(&[rows.div_ceil(128), cols.div_ceil(128)], &scales)), block: [128, 128] },
            )
        }
        _ => {
            // int4 / int8 (packed_layout).
            let (bits, group, asym) = packed_layout(fmt);
            let per_word = 32 / bits;
            let groups = cols / group;
            let data = bytes(rows * cols / per_word * 4, rng);
            let scales = vec![1e-3f32; rows * groups];
            let zero = asym.then(|| {
                let zeros = bytes(rows.div_ceil(per_word) * groups * 4, rng);
                view("weight_zero_point", OwnedTensor { dtype: DType::I32, shape: vec![rows.div_ceil(per_word), groups], data: zeros })
            });
            (
                view("weight_packed", OwnedTensor { dtype: DType::I32, shape: vec![rows, cols / per_word], data }),
                Format::Packed { bits: bits as u32, group, scale: view("weight_scale", OwnedTensor::bf16(&[rows, groups], &scales)), zero },
            )
        }
    };
    LinearWeight { module: module.to_string(), rows, cols, data, format }
}

struct Report<'a> {
    peak: f64,
    /// Only rows whose label contains this are timed (`--case`).
    case: Option<&'a str>,
}

impl Report<'_> {
    fn wants(&self, label: &str) -> bool {
        self.case.is_none_or(|c| label.contains(c))
    }

    fn row(&self, what: &str, bytes: f64, ms: f64) {
        let gbs = bytes / ms / 1e6;
        println!("{what:<58} {:>9.1} µs {:>9.1} GB/s {:>6.1}%", ms * 1e3, gbs, 100.0 * gbs / self.peak);
    }

    /// A time without a byte count (a share of the row above it).
    fn part(&self, what: &str, ms: f64) {
        println!("{what:<58} {:>9.1} µs", ms * 1e3);
    }
}

pub fn run(reps: usize, only: Option<&str>, case: Option<&str>) -> Result<()> {
    let want = |part: &str| only.is_none_or(|o| o.split(',').any(|x| x == part));
    let gpu = CudaBackend::new(0)?;
    let (ctx, stream) = (gpu.context().clone(), gpu.stream().clone());
    let mut rng = Rng::new(42);
    println!(
        "duet bench kernels on {} (CUDA-graph replays, median of {reps}; % of measured copy bandwidth; {})",
        gpu.device_name(),
        crate::backend::cuda::kernels::settings()
    );

    // Device bandwidth: a 2 GiB device-to-device copy, bytes read plus written.
    let n = 1usize << 29;
    let src = stream.alloc_zeros::<f32>(n).map_err(|e| anyhow!("{e:?}"))?;
    let mut dst = stream.alloc_zeros::<f32>(n).map_err(|e| anyhow!("{e:?}"))?;
    let ms = time_ms(&ctx, &stream, 3, reps, || stream.memcpy_dtod(&src, &mut dst).map_err(|e| anyhow!("{e:?}")))?;
    let peak = 2.0 * (n * 4) as f64 / ms / 1e6;
    drop((src, dst));
    println!("{:<58} {:>9.1} µs {:>9.1} GB/s (read + write)", "device copy 2 GiB", ms * 1e3, peak);
    let r = Report { peak, case };

    // Dense GEMV at decode (one token); 256 x 6144 is the router gate of 256 experts.
    let gemvs: &[(usize, usize, &str)] = if want("gemv") { &[(256, 6144, "bf16"), (2048, 6144, "bf16"), (6144, 16384, "bf16"), (2048, 6144, "fp8"), (6144, 16384, "fp8"), (6144, 16384, "int4"), (6144, 16384, "int4-g64"), (6144, 16384, "int4-g32"), (2048, 6144, "int8-g64"), (6144, 16384, "int8-g64")] } else { &[] };
    for &(rows, cols, fmt) in gemvs {
        let label = format!("gemv {fmt} {cols}->{rows} x1");
        if !r.wants(&label) {
            continue;
        }
        // Rotate over copies, about 256 MB in all (8 to 64 of them), so the weight is not
        // served from the 60 MB L2.
        let copies = ((256usize << 20) / (rows * cols * 2)).clamp(8, 64);
        let ws: Vec<_> = (0..copies).map(|i| gpu.weight(&random_weight(&format!("w{i}"), rows, cols, fmt, &mut rng))).collect::<Result<_>>()?;
        let x = gpu.tensor(1, cols, &vec![0.01f32; cols])?;
        let mut i = 0;
        let ms = time_graph(&gpu, ws.len() * 4, reps, || {
            i += 1;
            gpu.linear(&x, &ws[i % ws.len()]).map(|_| ())
        })?;
        let bytes = ws[0].parts.iter().map(|p| p.rows * p.cols).sum::<usize>() as f64 * bytes_per_weight(fmt);
        r.row(&label, bytes, ms);
    }
    // The activation split of the FP8/INT4 tensor-core kernels: once per activation, shared by
    // every linear layer that reads it (the gemv rows above reuse one split x; the MoE layer rows
    // below include their splits).
    for cols in if want("gemv") { vec![6144usize, 16384] } else { vec![] } {
        let x = gpu.tensor(1, cols, &vec![0.01f32; cols])?;
        for (fmt, what, bytes) in [(Fmt::Fp8, "f16 hi/lo", 8), (Fmt::Int4, "4 int8 planes", 8)] {
            let label = format!("activation split 1x{cols} (f32 -> {what})");
            if !r.wants(&label) {
                continue;
            }
            let ms = time_graph(&gpu, 8, reps, || gpu.split_activation(&x, fmt))?;
            r.row(&label, (cols * bytes) as f64, ms);
        }
    }

    // Eight routed experts per token, gate/up 6144->2x2048 and down 2048->6144.
    let (h, inter, n_exp) = (6144usize, 2048usize, 32usize);
    let expert_fmts: &[&str] = if want("experts") { &["fp8", "int4", "int4-g64", "int4-g32"] } else { &[] };
    for &fmt in expert_fmts {
        let experts: Vec<ExpertWeights> = (0..n_exp)
            .map(|e| ExpertWeights {
                gate: random_weight(&format!("e{e}.gate"), inter, h, fmt, &mut rng),
                up: random_weight(&format!("e{e}.up"), inter, h, fmt, &mut rng),
                down: random_weight(&format!("e{e}.down"), h, inter, fmt, &mut rng),
            })
            .collect();
        let expert_bytes = 3.0 * (h * inter) as f64 * bytes_per_weight(fmt);
        // The whole MoE block of a decode step at GLM-5.2's width: a router over 256 experts, 8
        // routed experts and the shared expert (folded in as expert 256), all resident, each in
        // memory of its own (copies of the 32 generated above: bandwidth does not depend on the
        // values), so a step's tokens share experts as often as the real layer's do. (Up to
        // the seventeenth session's tables only 32 could be picked, which made the tokens of
        // a step share experts far more often.) The expert rows below pick from the same 256.
        let routed = 256;
        let shared = ExpertWeights {
            gate: random_weight("shared.gate", inter, h, fmt, &mut rng),
            up: random_weight("shared.up", inter, h, fmt, &mut rng),
            down: random_weight("shared.down", h, inter, fmt, &mut rng),
        };
        let mut distinct = experts;
        distinct.push(shared);
        let table: Vec<usize> = (0..routed).map(|e| e % n_exp).chain([n_exp]).collect();
        let router = RouterParams { top_k: 8, n_group: 1, topk_group: 1, norm_topk_prob: true, scaling: 2.5, shared: Some(routed) };
        let gate = random_weight("gate", routed, h, "bf16", &mut rng);
        let bias = vec![0.0f32; routed];
        let layer = Moe::from_parts(&gpu, &gate, &bias, gpu.experts_indexed(&distinct, &table)?, None, router)?;
        let ex = layer.block().experts;
        let ones = gpu.vector(&vec![1.0; h])?;
        for batch in [1usize, 2, 4] {
            let x: Vec<f32> = (0..batch * h).map(|_| (rng.next_u64() % 2001) as f32 * 1e-3 - 1.0).collect();
            let x = gpu.tensor(batch, h, &x)?;
            // The experts the floor counts are those the timed block routes to: the router over
            // the norm of x, as the block below sees it every time (its residual add adds zeros).
            let routing = gpu.route(&gpu.rms_norm(&x, &ones, 1e-6)?, &layer.gate, &layer.bias, &layer.router)?;
            let mut idx = stream.clone_dtoh(&routing.idx).map_err(|e| anyhow!("{e:?}"))?;
            idx.retain(|&e| Some(e as usize) != layer.router.shared);
            idx.sort_unstable();
            idx.dedup();
            let label = format!("moe layer {fmt} x{batch} (add + norm, router of {routed}, {} routed, shared)", idx.len());
            if !r.wants(&label) {
                continue;
            }
            // As a decoder layer runs it: the attention's output `a` added to the residual
            // stream, the block's input norm of the sum (a fresh activation per call, so its
            // split for the tensor cores is timed too), then the block. `a` is zeros: the add
            // does the same work whatever its values, and each call (the warm-up, the capture)
            // adds it to the stream in place, so any other `a` would move the block's input,
            // and with it the routing, away from the one whose experts the floor counts above.
            let a = gpu.tensor(batch, h, &vec![0.0; batch * h])?;
            let mut resid = gpu.copy(&x)?;
            let ms = time_graph(&gpu, 8, reps, || gpu.add_norm_moe_block(&mut resid, &a, &ones, 1e-6, &layer.block()).map(|_| ()))?;
            let bytes = (routed * h * 2) as f64 + (idx.len() + 1) as f64 * expert_bytes;
            r.row(&label, bytes, ms);
            // Where the block's time goes: its add and norm alone, then those with the router
            // (gate logits, route and plan) as the block runs them (the logits in the norm's
            // launch where the block makes them there); the rest is the experts with their
            // splits and the combine (at decode the shared expert runs beside the router, so the
            // rest is what it did not hide).
            let norm = time_graph(&gpu, 8, reps, || gpu.add_rms_norm(&mut resid, &a, &ones, 1e-6).map(|_| ()))?;
            let router = time_graph(&gpu, 8, reps, || gpu.add_norm_route(&mut resid, &a, &ones, 1e-6, &layer.block()).map(|_| ()))?;
            r.part(&format!("  add + norm {:.1} + router {:.1} µs alone; the rest", norm * 1e3, (router - norm) * 1e3), ms - router);
            if timeline::enabled() {
                print!("{}", block_timeline(&gpu, || gpu.add_norm_moe_block(&mut resid, &a, &ones, 1e-6, &layer.block()).map(|_| ()))?);
                println!("  its add + norm and router alone:");
                print!("{}", block_timeline(&gpu, || gpu.add_norm_route(&mut resid, &a, &ones, 1e-6, &layer.block()).map(|_| ()))?);
            }
        }
        for batch in [1usize, 2, 4] {
            let x = gpu.tensor(batch, h, &vec![0.01f32; batch * h])?;
            // Each token takes 8 distinct experts of the 256; tokens overlap as random routing
            // would.
            let mut idx = Vec::new();
            for _ in 0..batch {
                let mut picks: Vec<i32> = Vec::new();
                while picks.len() < 8 {
                    let e = (rng.next_u64() % routed as u64) as i32;
                    if !picks.contains(&e) {
                        picks.push(e);
                    }
                }
                idx.extend(picks);
            }
            let distinct = {
                let mut d = idx.clone();
                d.sort_unstable();
                d.dedup();
                d.len()
            };
            let label = format!("experts {fmt} 8/token x{batch} ({distinct} distinct)");
            if !r.wants(&label) {
                continue;
            }
            let routing = CudaRouting {
                top_k: 8,
                idx: stream.clone_htod(&idx).map_err(|e| anyhow!("{e:?}"))?.into(),
                weights: stream.clone_htod(&vec![0.125f32; batch * 8]).map_err(|e| anyhow!("{e:?}"))?.into(),
                plan: None,
            };
            let ms = time_graph(&gpu, 8, reps, || gpu.moe(&x, ex, &routing).map(|_| ()))?;
            r.row(&label, distinct as f64 * expert_bytes, ms);
            // The row above runs the plan, both splits and the combine too; each grouped GEMV
            // kernel alone, on inputs made once:
            if ex.tensor_cores() {
                let gemvs = gpu.expert_gemvs(&x, ex, &routing)?;
                let ms = time_graph(&gpu, 8, reps, || gemvs.gate_up())?;
                r.row(&format!("  gate/up GEMV alone, 6144->2x2048 x{batch}"), distinct as f64 * expert_bytes * 2.0 / 3.0, ms);
                let ms = time_graph(&gpu, 8, reps, || gemvs.down())?;
                r.row(&format!("  down GEMV alone, 2048->6144 x{batch}"), distinct as f64 * expert_bytes / 3.0, ms);
            }
        }
    }

    // MLA decode with DSA top-2048: one query over a long latent cache.
    let dims = MlaDims { heads: 64, nope: 192, rope: 64, v: 256, latent: 512, scale: (256f32).powf(-0.5) };
    let rope = RopeSpec { inv_freq: (0..32).map(|i| 1.0 / 8e6f32.powf(i as f32 / 32.0)).collect(), interleaved: true, indexer_interleaved: true };
    // kv_b as a bf16 and as an FP8 checkpoint stores it (W_UK / W_UV kept in that precision).
    let kv_fmts = ["bf16", "fp8"];
    let heads: Vec<_> = kv_fmts.iter().map(|f| gpu.mla_heads(&random_weight("kv_b", 64 * 448, 512, f, &mut rng), &dims)).collect::<Result<_>>()?;
    let idims = IndexDims { heads: 32, head_dim: 128, rope: 64, topk: 2048 };
    let contexts: &[usize] = if want("mla") { &[4096, 32768, 131072] } else { &[] };
    for &ctx_len in contexts {
        let spec = CacheSpec { latent: 512, rope: 64, index_dim: 128, slot_has_index: vec![true], capacity: ctx_len + 1 };
        let mut cache = gpu.new_cache(&spec)?;
        // Fill the cache in chunks (random latents and indexer keys).
        let chunk = 8192;
        let norm = gpu.vector(&vec![1.0; 512])?;
        let (kw, kb) = (gpu.vector(&vec![1.0; 128])?, gpu.vector(&vec![0.0; 128])?);
        for start in (0..ctx_len).step_by(chunk) {
            let len = chunk.min(ctx_len - start);
            let step = gpu.prepare(&Batch::single(0, start, len), &rope, &mut cache)?;
            let kv: Vec<f32> = (0..len * 576).map(|_| (rng.next_u64() % 1000) as f32 * 1e-3 - 0.5).collect();
            gpu.mla_cache_write(&gpu.tensor(len, 576, &kv)?, &norm, 1e-6, &step, &mut cache, 0)?;
            let k: Vec<f32> = (0..len * 128).map(|_| (rng.next_u64() % 1000) as f32 * 1e-3 - 0.5).collect();
            gpu.index_cache_write(&gpu.tensor(len, 128, &k)?, &kw, &kb, 1e-6, &step, &mut cache, 0)?;
        }
        let step = gpu.prepare(&Batch::single(0, ctx_len - 1, 1), &rope, &mut cache)?;
        let q: Vec<f32> = (0..64 * 256).map(|_| (rng.next_u64() % 1000) as f32 * 1e-3 - 0.5).collect();
        let q = gpu.tensor(1, 64 * 256, &q)?;
        let iq = gpu.tensor(1, 32 * 128, &vec![0.01; 32 * 128])?;
        let iw = gpu.tensor(1, 32, &[1.0; 32])?;
        let sel = gpu.index_select(&iq, &iw, &cache, 0, &step, &idims)?;
        let (ql, qp) = gpu.mla_queries(&q, &heads[0], &step)?;
        let keys = 2048.min(ctx_len);
        let label = format!("mla attend top-{keys} of {}K ctx (f32 cache)", ctx_len / 1024);
        if r.wants(&label) {
            let ms = time_graph(&gpu, 8, reps, || gpu.mla_attend(&ql, &qp, &cache, 0, &step, Some(&sel), &dims).map(|_| ()))?;
            r.row(&label, (keys * 576 * 4) as f64, ms);
        }
        for (fmt, heads) in kv_fmts.iter().zip(&heads) {
            let label = format!("mla decode (absorb + attend + values) {}K ctx, {fmt} kv_b", ctx_len / 1024);
            if !r.wants(&label) {
                continue;
            }
            let ms = time_graph(&gpu, 8, reps, || {
                let (ql, qp) = gpu.mla_queries(&q, heads, &step)?;
                let o = gpu.mla_attend(&ql, &qp, &cache, 0, &step, Some(&sel), &dims)?;
                gpu.mla_values(&o, heads).map(|_| ())
            })?;
            let absorb = (64 * (192 + 256) * 512) as f64 * bytes_per_weight(fmt);
            r.row(&label, absorb + (keys * 576 * 4) as f64, ms);
        }
        let label = "indexer scores + top-2048 at 128K ctx (f32 keys)";
        if ctx_len == 131072 && r.wants(label) {
            let ms = time_graph(&gpu, 8, reps, || gpu.index_select(&iq, &iw, &cache, 0, &step, &idims).map(|_| ()))?;
            r.row(label, (ctx_len * 128 * 4) as f64, ms);
        }
    }

    // A decode step's pick from GLM-5.2's 154880 logits, wall time per pick with its copies
    // and synchronization: on the device (greedy, and `sample_rows`' temperature draws) and on
    // the host (the logits copied to it and sampled there). Logits σ 8, peaked as a model's
    // next-token distribution is (the head top-p keeps fits the device's).
    if want("sampling") {
        use crate::sampling::{Draw, Sampler, SamplingParams};
        let vocab = 154_880;
        let logits: Vec<f32> = (0..vocab).map(|_| (rng.normal() * 8.0) as f32).collect();
        let x = gpu.tensor(1, vocab, &logits)?;
        let wall = |f: &mut dyn FnMut() -> Result<()>| -> Result<f64> {
            f()?;
            let times: Vec<f64> = (0..reps)
                .map(|_| {
                    let t = std::time::Instant::now();
                    f().map(|_| t.elapsed().as_secs_f64() * 1e3)
                })
                .collect::<Result<_>>()?;
            Ok(median(times))
        };
        let draw = |top_p: f32| Draw::Temperature { temperature: 1.0, top_p, min_p: 0.0, u: 0.37 };
        for (label, d) in [("greedy", Draw::Greedy), ("temperature 1", draw(1.0)), ("temperature 1, top-p 0.95", draw(0.95))] {
            let what = format!("pick from 1x{vocab} logits on the device: {label}");
            if r.wants(&what) {
                r.part(&what, wall(&mut || gpu.sample_rows(&x, &[d]).map(|_| ()))?);
            }
        }
        let what = format!("pick from 1x{vocab} logits on the host: temperature 1, top-p 0.95");
        if r.wants(&what) {
            let mut sampler = Sampler::new(SamplingParams { temperature: 1.0, top_p: 0.95, seed: Some(1), ..Default::default() });
            r.part(&what, wall(&mut || gpu.to_host(&x).map(|v| {
                sampler.sample(&v);
            }))?);
        }
    }
    Ok(())
}

/// Bits, group size and asymmetry of the bench's integer formats: "int4" 4 bits, group 128
/// asymmetric (AWQ-style); "int4-gN" and "int8-gN" group N symmetric (the real GLM INT4
/// checkpoints: experts int4 group 64, attention and shared experts int8 group 64).
fn packed_layout(fmt: &str) -> (usize, usize, bool) {
    let group = |rest: &str| rest.strip_prefix("-g").and_then(|g| g.parse().ok());
    match (fmt.strip_prefix("int4").and_then(group), fmt.strip_prefix("int8").and_then(group)) {
        (Some(g), _) => (4, g, false),
        (_, Some(g)) => (8, g, false),
        _ => (4, 128, true),
    }
}

/// Checkpoint bytes per weight: the bandwidth floor counts what the format stores.
fn bytes_per_weight(fmt: &str) -> f64 {
    match fmt {
        "bf16" => 2.0,
        "fp8" => 1.0 + 4.0 / (128.0 * 128.0),
        _ => {
            // The packed value, a bf16 scale and (asymmetric) a packed zero point per group.
            let (bits, group, asym) = packed_layout(fmt);
            bits as f64 / 8.0 + (2.0 + if asym { bits as f64 / 8.0 } else { 0.0 }) / group as f64
        }
    }
}
