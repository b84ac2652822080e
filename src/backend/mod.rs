//! The compute backend: the operations the GLM-5.x forward is made of.
//!
//! The model (`crate::model`) is written once against [`Backend`]; each backend implements the
//! operations for its device. The CPU backend (f32 on dequantized weights) is the oracle every
//! other backend is checked against, operation by operation.
//!
//! Activations are 2-D tensors `[tokens, width]` whose rows follow the segments of a [`Batch`]:
//! one step may carry several sequences, each a run of consecutive positions (a prefill chunk,
//! one decode token, or k+1 tokens to verify). Caches are owned by the backend and addressed by
//! sequence id and cache slot (one slot per owned layer, plus one for the MTP layer).

pub mod cpu;
pub mod cuda;

/// A backend chosen at run time.
pub enum AnyBackend {
    Cpu(cpu::CpuBackend),
    Cuda(cuda::CudaBackend),
}

/// Where to run, as `--device` spells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Device {
    /// The CUDA backend when a usable GPU is present, else the CPU backend (with a warning).
    Auto,
    Cpu,
    Cuda,
}

impl AnyBackend {
    /// Opens the requested device; `auto` falls back to the CPU when no GPU can be used.
    pub fn open(device: Device, gpu: usize) -> Result<AnyBackend> {
        match device {
            Device::Cpu => Ok(AnyBackend::Cpu(cpu::CpuBackend)),
            Device::Cuda => Ok(AnyBackend::Cuda(cuda::CudaBackend::new(gpu)?)),
            Device::Auto => match cuda::CudaBackend::probe() {
                None => Ok(AnyBackend::Cuda(cuda::CudaBackend::new(gpu)?)),
                Some(why) => {
                    tracing::warn!("no usable GPU ({why}); running on the CPU backend");
                    Ok(AnyBackend::Cpu(cpu::CpuBackend))
                }
            },
        }
    }
}

/// Runs `$body` with `$b` bound to the concrete backend inside an [`AnyBackend`].
#[macro_export]
macro_rules! with_backend {
    ($any:expr, $b:ident => $body:expr) => {
        match $any {
            $crate::backend::AnyBackend::Cpu($b) => $body,
            $crate::backend::AnyBackend::Cuda($b) => $body,
        }
    };
}

use anyhow::{bail, Result};

use crate::checkpoint::LinearWeight;

/// One sequence's tokens in a step: positions `start .. start + len`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub seq: u64,
    pub start: usize,
    pub len: usize,
}

/// The tokens of one forward step. Activation rows follow the segments in order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Batch {
    pub segments: Vec<Segment>,
}

impl Batch {
    pub fn single(seq: u64, start: usize, len: usize) -> Batch {
        Batch { segments: vec![Segment { seq, start, len }] }
    }

    pub fn tokens(&self) -> usize {
        self.segments.iter().map(|s| s.len).sum()
    }

    /// Position of every row, in row order.
    pub fn positions(&self) -> Vec<usize> {
        self.segments.iter().flat_map(|s| s.start..s.start + s.len).collect()
    }

    /// Row index of each segment's last token.
    pub fn last_rows(&self) -> Vec<usize> {
        let mut row = 0;
        self.segments
            .iter()
            .map(|s| {
                row += s.len;
                row - 1
            })
            .collect()
    }

    /// The largest number of keys any query of this step can see (its position + 1).
    pub fn max_visible(&self) -> usize {
        self.segments.iter().map(|s| s.start + s.len).max().unwrap_or(0)
    }
}

/// Rotary embedding parameters shared by the MLA and indexer ropes.
#[derive(Clone, Debug)]
pub struct RopeSpec {
    /// One inverse frequency per rotated pair.
    pub inv_freq: Vec<f32>,
    /// Pairs are adjacent elements `(2i, 2i+1)`; otherwise `(i, i + half)`.
    pub interleaved: bool,
    pub indexer_interleaved: bool,
}

impl RopeSpec {
    /// `cos` and `sin` of every position's angles, `[positions, pairs]` row-major. The angle is
    /// rounded to f32 as transformers computes it; cos and sin of that angle are exact.
    pub fn angles(&self, positions: &[usize]) -> (Vec<f32>, Vec<f32>) {
        let n = positions.len() * self.inv_freq.len();
        let (mut cos, mut sin) = (Vec::with_capacity(n), Vec::with_capacity(n));
        for &p in positions {
            for &f in &self.inv_freq {
                let angle = (p as f32 * f) as f64;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        (cos, sin)
    }
}

/// Shapes of the cache slots a model part needs.
#[derive(Clone, Debug)]
pub struct CacheSpec {
    /// Latent width (kv_lora_rank) and rope width of the MLA cache.
    pub latent: usize,
    pub rope: usize,
    /// Indexer key width, and which slots keep indexer keys.
    pub index_dim: usize,
    pub slot_has_index: Vec<bool>,
    /// Positions the cache must hold over all sequences at once.
    pub capacity: usize,
}

/// Multi-head latent attention dimensions.
#[derive(Clone, Copy, Debug)]
pub struct MlaDims {
    pub heads: usize,
    pub nope: usize,
    pub rope: usize,
    pub v: usize,
    pub latent: usize,
    pub scale: f32,
}

impl MlaDims {
    /// Checks that `kv_b_proj` splits into the heads' nope and value rows over the latent.
    pub fn check_kv_b(&self, kv_b: &LinearWeight) -> Result<()> {
        let MlaDims { heads, nope, v, latent, .. } = *self;
        if kv_b.rows != heads * (nope + v) || kv_b.cols != latent {
            bail!("{}: [{}, {}] does not split into {heads} heads of {nope}+{v} rows", kv_b.module, kv_b.rows, kv_b.cols);
        }
        Ok(())
    }
}

/// Columns of weights stacked by rows (gate ‖ up), which must agree.
pub fn stacked_cols(parts: &[LinearWeight]) -> Result<usize> {
    let cols = parts.first().map_or(0, |p| p.cols);
    if let Some(p) = parts.iter().find(|p| p.cols != cols) {
        bail!("cannot stack {} ({} columns) with weights of {cols} columns", p.module, p.cols);
    }
    Ok(cols)
}

/// Lightning-indexer dimensions.
#[derive(Clone, Copy, Debug)]
pub struct IndexDims {
    pub heads: usize,
    pub head_dim: usize,
    pub rope: usize,
    pub topk: usize,
}

/// MoE router parameters.
#[derive(Clone, Copy, Debug)]
pub struct RouterParams {
    pub top_k: usize,
    pub n_group: usize,
    pub topk_group: usize,
    pub norm_topk_prob: bool,
    pub scaling: f32,
    /// An expert every token takes after its `top_k` choices, with weight 1 (the shared expert
    /// folded into the routed ones); routings then hold `top_k + 1` entries per token.
    pub shared: Option<usize>,
}

/// One routed expert's projections as stored: gate `[I, H]`, up `[I, H]`, down `[H, I]`.
#[derive(Clone)]
pub struct ExpertWeights {
    pub gate: LinearWeight,
    pub up: LinearWeight,
    pub down: LinearWeight,
}

/// An MoE block as a backend runs it: the router's gate and selection bias, the routed
/// experts (with the shared expert among them when `router.shared` names it), a shared expert
/// kept apart (stored unlike the routed ones), and the router's parameters.
pub struct MoeBlock<'a, B: Backend> {
    pub gate: &'a B::Weight,
    pub bias: &'a B::Vector,
    pub experts: &'a B::Experts,
    pub shared: Option<&'a B::Experts>,
    pub router: &'a RouterParams,
}

impl<B: Backend> MoeBlock<'_, B> {
    /// The block over the normalized rows `h`.
    pub fn run(&self, b: &B, h: &B::Tensor) -> Result<B::Tensor> {
        match self.shared {
            Some(s) => b.moe_block_shared(h, self.gate, self.bias, self.experts, s, self.router),
            None => b.moe_block(h, self.gate, self.bias, self.experts, self.router),
        }
    }

    /// `x += a`, the RMSNorm of the sum, then the block, as steps apart (what
    /// `Backend::add_norm_moe_block` does unless a backend fuses them).
    pub fn run_after_add_norm(&self, b: &B, x: &mut B::Tensor, a: &B::Tensor, w: &B::Vector, eps: f32) -> Result<B::Tensor> {
        let h = b.add_rms_norm(x, a, w, eps)?;
        self.run(b, &h)
    }
}

/// Lengths that size kernel launches (the keys an attention row may see) are rounded up to
/// these buckets: multiples of 64, in steps of an eighth of the next power of two once that is
/// larger (so under a quarter is wasted past 512). The kernels bound each
/// row by its own position, so the rounding changes no result, and a decode step's launches
/// stay the same while its context grows (a captured graph replays them).
pub fn length_bucket(n: usize) -> usize {
    if n <= 64 {
        return 64;
    }
    let step = (n.next_power_of_two() / 8).max(64);
    n.div_ceil(step) * step
}

pub trait Backend: Send + Sync + Sized + 'static {
    /// Activations `[rows, cols]`.
    type Tensor: Send + Sync;
    /// A linear weight `[out, in]` in its checkpoint precision.
    type Weight: Send + Sync;
    /// A small f32 parameter vector (norm weights and biases).
    type Vector: Send + Sync;
    /// `kv_b_proj` split per head for the absorbed MLA form.
    type MlaHeads: Send + Sync;
    /// The routed experts of one MoE layer.
    type Experts: Send + Sync;
    /// Latent and indexer caches of many sequences.
    type Cache: Send;
    /// A step's token positions and rope angles, prepared once per forward.
    type Step: Send + Sync;
    /// The DSA top-k positions of every query row.
    type Selection: Send + Sync;
    /// Each row's chosen experts and their weights.
    type Routing: Send + Sync;

    fn name(&self) -> &'static str;

    // ---- uploads -------------------------------------------------------------------------
    fn weight(&self, w: &LinearWeight) -> Result<Self::Weight>;
    /// Several weights with equal `cols`, stacked along rows (e.g. gate ‖ up).
    fn weight_stacked(&self, parts: &[LinearWeight]) -> Result<Self::Weight>;
    fn vector(&self, v: &[f32]) -> Result<Self::Vector>;
    fn mla_heads(&self, kv_b: &LinearWeight, dims: &MlaDims) -> Result<Self::MlaHeads>;
    fn experts(&self, experts: &[ExpertWeights]) -> Result<Self::Experts>;
    fn new_cache(&self, spec: &CacheSpec) -> Result<Self::Cache>;
    /// Forgets a sequence's cached positions.
    fn release(&self, cache: &mut Self::Cache, seq: u64);
    /// Prepares a step: reserves cache room for its positions and computes its rope angles.
    fn prepare(&self, batch: &Batch, rope: &RopeSpec, cache: &mut Self::Cache) -> Result<Self::Step>;
    /// As `prepare`, for a step whose device work may run as a replayed graph (see `graph`):
    /// a decode-sized step's data goes to buffers kept with the cache at fixed addresses, so
    /// it stays valid only until the next `prepare_fixed` on that cache.
    fn prepare_fixed(&self, batch: &Batch, rope: &RopeSpec, cache: &mut Self::Cache) -> Result<Self::Step> {
        self.prepare(batch, rope, cache)
    }
    /// Runs `body` on `input` as a replayable graph where the backend has them (CUDA graphs,
    /// kept with `cache`): `key` must determine every launch `body` makes (shapes and
    /// arguments), and `body` must read per-step data only through `input` and `step`, a
    /// `prepare_fixed` step of `cache` (a step too large for fixed buffers runs without a
    /// graph). The default runs it.
    #[allow(clippy::type_complexity)]
    fn graph(
        &self,
        _key: u64,
        _step: &Self::Step,
        cache: &mut Self::Cache,
        input: &Self::Tensor,
        body: &mut dyn FnMut(&mut Self::Cache, &Self::Tensor) -> Result<Self::Tensor>,
    ) -> Result<Self::Tensor> {
        body(cache, input)
    }

    // ---- host transfers ------------------------------------------------------------------
    fn tensor(&self, rows: usize, cols: usize, data: &[f32]) -> Result<Self::Tensor>;
    /// A selection as `[rows, topk]` positions padded with -1 (to cross a pipeline boundary).
    fn selection_to_host(&self, sel: &Self::Selection, rows: usize) -> Result<(usize, Vec<i32>)>;
    fn selection_from_host(&self, rows: usize, topk: usize, data: &[i32]) -> Result<Self::Selection>;
    fn to_host(&self, t: &Self::Tensor) -> Result<Vec<f32>>;
    fn shape(&self, t: &Self::Tensor) -> (usize, usize);
    /// Each row's pick by its draw (`sampling::pick`: greedy, the first largest value as
    /// `sampling::argmax`, or a temperature draw with top-p and min-p): a backend may make them
    /// where the logits are, and copy only the tokens.
    fn sample_rows(&self, t: &Self::Tensor, draws: &[crate::sampling::Draw]) -> Result<Vec<u32>> {
        let (rows, cols) = self.shape(t);
        if draws.len() != rows {
            anyhow::bail!("{} draws for {rows} rows of logits", draws.len());
        }
        let v = self.to_host(t)?;
        Ok(draws.iter().enumerate().map(|(r, d)| crate::sampling::pick(&v[r * cols..(r + 1) * cols], d)).collect())
    }

    // ---- elementwise and layout ----------------------------------------------------------
    /// Rows of `table` for each id.
    fn embed(&self, table: &Self::Weight, ids: &[u32]) -> Result<Self::Tensor>;
    /// `x · Wᵀ`.
    fn linear(&self, x: &Self::Tensor, w: &Self::Weight) -> Result<Self::Tensor>;
    fn rms_norm(&self, x: &Self::Tensor, w: &Self::Vector, eps: f32) -> Result<Self::Tensor>;
    /// `a += b`.
    fn add_assign(&self, a: &mut Self::Tensor, b: &Self::Tensor) -> Result<()>;
    /// `x += a`, then the RMSNorm of the sum: a residual add and the next norm, which a backend
    /// may do in one pass (the same values as the two steps).
    fn add_rms_norm(&self, x: &mut Self::Tensor, a: &Self::Tensor, w: &Self::Vector, eps: f32) -> Result<Self::Tensor> {
        self.add_assign(x, a)?;
        self.rms_norm(x, w, eps)
    }
    /// `silu(x[:, :n]) * x[:, n:]` for `x = [rows, 2n]`.
    fn swiglu(&self, x: &Self::Tensor) -> Result<Self::Tensor>;
    /// `[a | b]` along columns.
    fn concat_cols(&self, a: &Self::Tensor, b: &Self::Tensor) -> Result<Self::Tensor>;
    /// The listed rows, in order.
    fn select_rows(&self, x: &Self::Tensor, rows: &[usize]) -> Result<Self::Tensor>;
    /// A copy of `x`.
    fn copy(&self, x: &Self::Tensor) -> Result<Self::Tensor>;

    // ---- multi-head latent attention -----------------------------------------------------
    /// Normalizes the latent half of `kv_a` output `[T, latent + rope]`, ropes the rope half,
    /// and stores both at each row's position in `slot`.
    fn mla_cache_write(
        &self,
        kv: &Self::Tensor,
        norm: &Self::Vector,
        eps: f32,
        step: &Self::Step,
        cache: &mut Self::Cache,
        slot: usize,
    ) -> Result<()>;
    /// From `q_b_proj` output `[T, H·(nope+rope)]`: the absorbed queries `[T, H·latent]`
    /// (`W_UKᵀ q_nope` per head) and the roped queries `[T, H·rope]`.
    fn mla_queries(&self, q: &Self::Tensor, heads: &Self::MlaHeads, step: &Self::Step) -> Result<(Self::Tensor, Self::Tensor)>;
    /// Softmax attention of each query row over the cached positions it may see (the
    /// selection's, or every position up to its own when `sel` is None). Output `[T, H·latent]`.
    #[allow(clippy::too_many_arguments)]
    fn mla_attend(
        &self,
        q_lat: &Self::Tensor,
        q_rope: &Self::Tensor,
        cache: &Self::Cache,
        slot: usize,
        step: &Self::Step,
        sel: Option<&Self::Selection>,
        dims: &MlaDims,
    ) -> Result<Self::Tensor>;
    /// `W_UV ō` per head: `[T, H·latent]` → `[T, H·v]`.
    fn mla_values(&self, o_lat: &Self::Tensor, heads: &Self::MlaHeads) -> Result<Self::Tensor>;

    // ---- DSA lightning indexer -----------------------------------------------------------
    /// LayerNorm (with bias) of `wk` output `[T, D]`, rope on its first `rope` dims, stored at
    /// each row's position in `slot`.
    #[allow(clippy::too_many_arguments)]
    fn index_cache_write(
        &self,
        k: &Self::Tensor,
        norm_w: &Self::Vector,
        norm_b: &Self::Vector,
        eps: f32,
        step: &Self::Step,
        cache: &mut Self::Cache,
        slot: usize,
    ) -> Result<()>;
    /// Scores `Σ_h w_h · relu(q_h · k_t / √D)` over every visible cached position and keeps the
    /// top `topk`. `q` is `wq_b` output `[T, heads·D]` (roped here), `w` is `weights_proj`
    /// output `[T, heads]` (scaled here by heads^-0.5).
    #[allow(clippy::too_many_arguments)]
    fn index_select(
        &self,
        q: &Self::Tensor,
        w: &Self::Tensor,
        cache: &Self::Cache,
        slot: usize,
        step: &Self::Step,
        dims: &IndexDims,
    ) -> Result<Self::Selection>;

    // ---- mixture of experts --------------------------------------------------------------
    /// Sigmoid router in f32 with the selection-only correction bias and group-limited top-k.
    fn route(&self, x: &Self::Tensor, gate: &Self::Weight, bias: &Self::Vector, p: &RouterParams) -> Result<Self::Routing>;
    /// `Σ_k g_k · E_k(x)` over each row's routing: its routed experts, and the shared expert
    /// when the router appends it (`RouterParams::shared`).
    fn moe(&self, x: &Self::Tensor, experts: &Self::Experts, routing: &Self::Routing) -> Result<Self::Tensor>;
    /// The whole block, `moe` over `route`: backends may overlap the two (the shared expert
    /// needs no routing), with the same result.
    fn moe_block(&self, x: &Self::Tensor, gate: &Self::Weight, bias: &Self::Vector, experts: &Self::Experts, p: &RouterParams) -> Result<Self::Tensor> {
        let routing = self.route(x, gate, bias, p)?;
        self.moe(x, experts, &routing)
    }
    /// Expert 0 of `e` over every row of `x`, with weight 1 (a shared expert kept apart).
    fn expert_all(&self, x: &Self::Tensor, e: &Self::Experts) -> Result<Self::Tensor>;
    /// `moe_block`, plus `shared`: a one-expert set every row takes with weight 1, for a shared
    /// expert stored unlike the routed ones (which cannot join them); backends may overlap it
    /// with the router too, with the same result.
    fn moe_block_shared(&self, x: &Self::Tensor, gate: &Self::Weight, bias: &Self::Vector, experts: &Self::Experts, shared: &Self::Experts, p: &RouterParams) -> Result<Self::Tensor> {
        let mut y = self.moe_block(x, gate, bias, experts, p)?;
        self.add_assign(&mut y, &self.expert_all(x, shared)?)?;
        Ok(y)
    }
    /// `x += a`, then `block` over the RMSNorm (`w`, `eps`) of the sum: a layer's
    /// post-attention residual add, norm and MoE block, which a backend may run in fewer
    /// launches (the same values as the steps apart, up to the rounding of the router's logits).
    fn add_norm_moe_block(&self, x: &mut Self::Tensor, a: &Self::Tensor, w: &Self::Vector, eps: f32, block: &MoeBlock<'_, Self>) -> Result<Self::Tensor> {
        block.run_after_add_norm(self, x, a, w, eps)
    }
}

#[cfg(test)]
mod tests {
    use super::length_bucket;

    #[test]
    fn length_buckets_cover_their_lengths_and_stay_fine() {
        let mut last = 0;
        for n in 1..300_000usize {
            let b = length_bucket(n);
            assert!(b >= n && b >= last, "bucket({n}) = {b}");
            assert_eq!(length_bucket(b), b, "a bucket is its own bucket");
            assert!(b.is_multiple_of(64) && b - n < 64.max(n / 4), "bucket({n}) = {b}");
            last = b;
        }
        assert_eq!(length_bucket(1), 64);
        assert_eq!(length_bucket(65), 128);
        assert_eq!(length_bucket(5000), 5120);
    }
}
