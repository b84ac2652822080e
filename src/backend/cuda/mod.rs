//! The CUDA backend: the same operations as the CPU oracle, as NVRTC-compiled kernels on one
//! GPU. Activations are f32; weights stay in checkpoint precision and are dequantized in
//! registers. libcuda and libnvrtc are opened at run time, so this compiles and links on
//! machines without a GPU; [`CudaBackend::probe`] says whether one is usable.

pub mod cache;
pub mod graphs;
pub mod kernels;
pub mod weights;

use std::collections::HashMap;
use std::sync::{Arc, OnceLock, RwLock};

use anyhow::{anyhow, bail, Context, Result};
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr};

use self::cache::{CudaCache, CudaStep, StepMeta};
use self::weights::{upload_experts, upload_stacked, CudaExperts, CudaWeight, Fmt, WDesc};
use super::{length_bucket, Backend, Batch, CacheSpec, ExpertWeights, IndexDims, MlaDims, RopeSpec, RouterParams};
use crate::checkpoint::LinearWeight;

pub struct CudaTensor {
    pub rows: usize,
    pub cols: usize,
    pub buf: CudaSlice<f32>,
    /// The tensor split for the tensor-core kernels (FP8: f16 halves; INT4: int8 planes), made
    /// once for all the linear layers that read it; cleared when the tensor changes.
    splits: [OnceLock<Split>; 2],
}

impl CudaTensor {
    fn new(rows: usize, cols: usize, buf: CudaSlice<f32>) -> CudaTensor {
        CudaTensor { rows, cols, buf, splits: Default::default() }
    }
}

pub struct CudaVector(CudaSlice<f32>);

/// `kv_b_proj` split per head, in f32: `W_UK [H, nope, latent]` and `W_UV [H, v, latent]`.
pub struct CudaMlaHeads {
    wuk: CudaSlice<f32>,
    wuv: CudaSlice<f32>,
    dims: MlaDims,
}

pub struct CudaSelection {
    pub topk: usize,
    pub idx: CudaSlice<i32>,
}

pub struct CudaRouting {
    pub top_k: usize,
    pub idx: CudaSlice<i32>,
    pub weights: CudaSlice<f32>,
    /// The pairs grouped by expert (moe_plan's layout), when the router built it (decode
    /// steps), with the number of experts it counts.
    pub plan: Option<(CudaSlice<i32>, usize)>,
}

/// A kernel argument, passed by value.
#[derive(Clone)]
enum Arg {
    Ptr(u64),
    I32(i32),
    F32(f32),
    Desc(WDesc),
    Meta(StepMeta),
}

/// A kernel entry point: a name, or a family and the weight format whose suffix completes it
/// (`gemv1` + bf16 is `gemv1_bf16`), so launches look kernels up without building names.
type Kernel = (&'static str, Option<Fmt>);

fn kernel_name((family, fmt): Kernel) -> String {
    match fmt {
        Some(f) => format!("{family}_{}", f.name()),
        None => family.to_string(),
    }
}

pub struct CudaBackend {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    modules: Vec<Arc<CudaModule>>,
    functions: RwLock<HashMap<Kernel, CudaFunction>>,
    /// Threads of a tensor-core launch, by (kernel, most warps, blocks): see `mma_threads`.
    mma_block: RwLock<HashMap<(Kernel, usize, usize), u32>>,
    /// moe_route's count of finished blocks (zero between launches: the last block resets it).
    route_done: CudaSlice<i32>,
    sms: usize,
    device_name: String,
}

impl CudaBackend {
    /// Why no GPU can be used, or None when one can.
    pub fn probe() -> Option<String> {
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Some("libcuda is not available".into());
        }
        match CudaContext::device_count() {
            Ok(n) if n > 0 => {}
            Ok(_) => return Some("no CUDA device found".into()),
            Err(e) => return Some(format!("CUDA driver error: {e:?}")),
        }
        if !kernels::nvrtc_available() {
            return Some("libnvrtc is not available".into());
        }
        None
    }

    pub fn new(ordinal: usize) -> Result<CudaBackend> {
        if let Some(why) = CudaBackend::probe() {
            bail!("cannot use CUDA: {why}");
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| anyhow!("cannot open CUDA device {ordinal}: {e:?}"))?;
        // One stream, ordered by us: cudarc's per-buffer events would only add latency.
        unsafe { ctx.disable_event_tracking() };
        let (major, minor) = ctx.compute_capability().map_err(|e| anyhow!("{e:?}"))?;
        if (major, minor) != (9, 0) {
            bail!("CUDA device {ordinal} has compute capability {major}.{minor}; the kernels are built for sm_90a (Hopper)");
        }
        let stream = ctx.new_stream().map_err(|e| anyhow!("{e:?}"))?;
        let mut modules = Vec::new();
        for (name, src) in kernels::SOURCES {
            let cubin = kernels::cubin(name, src)?;
            modules.push(ctx.load_module(cudarc::nvrtc::Ptx::from_binary(cubin)).map_err(|e| anyhow!("loading kernels {name}: {e:?}"))?);
        }
        let device_name = ctx.name().unwrap_or_else(|_| "CUDA device".into());
        let sms = ctx
            .attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(|e| anyhow!("{e:?}"))? as usize;
        let route_done = stream.alloc_zeros::<i32>(1).map_err(|e| anyhow!("{e:?}"))?;
        Ok(CudaBackend { ctx, stream, modules, functions: RwLock::new(HashMap::new()), mma_block: RwLock::new(HashMap::new()), route_done, sms, device_name })
    }

    pub fn device_name(&self) -> &str {
        &self.device_name
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(|e| anyhow!("CUDA: {e:?}"))
    }

    fn function(&self, kernel: Kernel) -> Result<CudaFunction> {
        if let Some(f) = self.functions.read().unwrap().get(&kernel) {
            return Ok(f.clone());
        }
        let name = kernel_name(kernel);
        for m in &self.modules {
            if let Ok(f) = m.load_function(&name) {
                // Allow large dynamic shared memory (attention keeps scores per key there).
                let _ = f.set_attribute(
                    cudarc::driver::sys::CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    200 * 1024,
                );
                self.functions.write().unwrap().insert(kernel, f.clone());
                return Ok(f);
            }
        }
        bail!("no CUDA kernel named {name}")
    }

    fn launch(&self, name: &'static str, grid: (u32, u32, u32), block: u32, smem: usize, args: &[Arg]) -> Result<()> {
        self.launch_kernel((name, None), grid, block, smem, args)
    }

    /// Launches `kernel` on the backend's stream. Every launch allows programmatic dependent
    /// launch (pdl_entry in kernels/common.cuh): the kernel may be scheduled while the one
    /// before it finishes, and waits for it before reading anything. `DUET_PDL=0` launches
    /// with plain stream order instead.
    fn launch_kernel(&self, kernel: Kernel, grid: (u32, u32, u32), block: u32, smem: usize, args: &[Arg]) -> Result<()> {
        use cudarc::driver::sys;
        let f = self.function(kernel)?;
        // The driver reads each parameter through a pointer to its value (it copies them).
        let mut params: Vec<*mut std::ffi::c_void> = args
            .iter()
            .map(|a| match a {
                Arg::Ptr(v) => v as *const u64 as *mut std::ffi::c_void,
                Arg::I32(v) => v as *const i32 as *mut std::ffi::c_void,
                Arg::F32(v) => v as *const f32 as *mut std::ffi::c_void,
                Arg::Desc(v) => v as *const WDesc as *mut std::ffi::c_void,
                Arg::Meta(v) => v as *const StepMeta as *mut std::ffi::c_void,
            })
            .collect();
        // Safety: a zeroed attribute is valid; id and value are set below.
        let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
        attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
        attr.value.programmaticStreamSerializationAllowed = 1;
        let cfg = sys::CUlaunchConfig {
            gridDimX: grid.0,
            gridDimY: grid.1,
            gridDimZ: grid.2,
            blockDimX: block,
            blockDimY: 1,
            blockDimZ: 1,
            sharedMemBytes: smem as u32,
            hStream: self.stream.cu_stream(),
            attrs: &mut attr,
            numAttrs: kernels::pdl() as u32,
        };
        self.ctx.bind_to_thread().map_err(|e| anyhow!("{e:?}"))?;
        // Safety: the parameters match the kernel's signature (each launch site passes them in
        // its order) and every pointer in them is a live device allocation of this context.
        unsafe { sys::cuLaunchKernelEx(&cfg, f.cu_function(), params.as_mut_ptr(), std::ptr::null_mut()) }
            .result()
            .map_err(|e| anyhow!("launching {}: {e:?}", kernel_name(kernel)))
    }

    fn ptr<T>(&self, s: &CudaSlice<T>) -> u64 {
        s.device_ptr(&self.stream).0
    }

    /// An output buffer every element of which the next kernel writes (so it is not cleared:
    /// `duet bench check` compares every element with the CPU oracle).
    fn alloc(&self, n: usize) -> Result<CudaSlice<f32>> {
        // Safety: f32 has no invalid bit patterns; callers write before reading.
        unsafe { self.stream.alloc::<f32>(n.max(1)) }.map_err(|e| anyhow!("CUDA allocation of {n} floats: {e:?}"))
    }

    /// Uninitialized indices, for kernels that write every entry.
    fn alloc_indices(&self, n: usize) -> Result<CudaSlice<i32>> {
        // Safety: i32 has no invalid bit patterns; the kernel filling it writes every entry.
        unsafe { self.stream.alloc::<i32>(n.max(1)) }.map_err(|e| anyhow!("CUDA allocation of {n} indices: {e:?}"))
    }

    fn tensor_of(&self, rows: usize, cols: usize) -> Result<CudaTensor> {
        Ok(CudaTensor::new(rows, cols, self.alloc(rows * cols)?))
    }

    fn ints(&self, v: &[i32]) -> Result<CudaSlice<i32>> {
        self.stream.clone_htod(v).map_err(|e| anyhow!("{e:?}"))
    }

    /// `y[:, yoff .. yoff + w.rows] = x · Wᵀ` for every part of `w`.
    fn gemv_into(&self, x: &CudaTensor, w: &CudaWeight, y: &CudaTensor) -> Result<()> {
        let mut yoff = 0;
        // One token (decode) has its own instantiation: fewer registers, no idle token lanes.
        let (nt, kernel) = if x.rows == 1 { (1, "gemv1") } else { (8, "gemv8") };
        for p in &w.parts {
            let (t, ldy, off) = (Arg::I32(x.rows as i32), Arg::I32(y.cols as i32), Arg::I32(yoff as i32));
            if p.desc.mma != 0 && x.rows <= MMA_MAX_TOKENS {
                let s = self.split(x, p.fmt)?;
                let kernel = ("gemv_mma", Some(p.fmt));
                let grid = ((p.rows as u32).div_ceil(16), (x.rows as u32).div_ceil(MMA_TOKENS), 1);
                self.launch_kernel(
                    kernel,
                    grid,
                    self.mma_threads(kernel, p.cols, p.fmt, (grid.0 * grid.1) as usize)?,
                    0,
                    &[Arg::Desc(p.desc), Arg::Ptr(self.ptr(&s.data)), Arg::Ptr(s.sums_ptr(self)), Arg::Ptr(self.ptr(&s.exps)), Arg::Ptr(self.ptr(&y.buf)), t, ldy, off],
                )?;
            } else {
                self.launch_kernel(
                    (kernel, Some(p.fmt)),
                    ((p.rows as u32).div_ceil(4), (x.rows as u32).div_ceil(nt), 1),
                    threads_for(p.cols, p.fmt),
                    0,
                    &[Arg::Desc(p.desc), Arg::Ptr(self.ptr(&x.buf)), Arg::Ptr(self.ptr(&y.buf)), t, ldy, off],
                )?;
            }
            yoff += p.rows;
        }
        Ok(())
    }

    /// Threads of a tensor-core block (`tiles` of them): its warps split the row tile's chunks
    /// (64 FP8 or 128 INT4 columns), at least two chunks each. The most warps per block with
    /// which every block is resident at once, so all SMs stream to the end (a large block per SM
    /// left a half-empty second wave); when no size fits, two warps (the 64 threads that finish
    /// a tile), whose small blocks balance over the waves. At most MMA_WARPS (16).
    fn mma_threads(&self, kernel: Kernel, cols: usize, fmt: Fmt, tiles: usize) -> Result<u32> {
        let chunks = cols / if fmt == Fmt::Fp8 { 64 } else { 128 };
        let most = chunks.div_ceil(2).clamp(2, 16);
        if let Some(w) = forced_mma_warps() {
            return Ok(32 * w.min(most) as u32);
        }
        // Decided once per launch shape: the occupancy calculator is not free.
        let key = (kernel, most, tiles);
        if let Some(&threads) = self.mma_block.read().unwrap().get(&key) {
            return Ok(threads);
        }
        let f = self.function(kernel)?;
        let mut threads = 64;
        for warps in (2..=most).rev() {
            let t = 32 * warps as u32;
            let per_sm = f.occupancy_max_active_blocks_per_multiprocessor(t, 0, None).map_err(|e| anyhow!("{e:?}"))? as usize;
            if per_sm * self.sms >= tiles {
                threads = t;
                break;
            }
        }
        self.mma_block.write().unwrap().insert(key, threads);
        Ok(threads)
    }

    /// A fresh split of `x` for weights of format `fmt` (not kept): the benchmark of the split
    /// kernels alone.
    pub fn split_activation(&self, x: &CudaTensor, fmt: Fmt) -> Result<()> {
        self.split_uncached(x, fmt).map(|_| ())
    }

    /// `x` split for the tensor-core kernels (split_act in kernels/linear_mma.cu), laid out
    /// for weights of format `fmt`; made on first use and kept with the tensor.
    fn split<'a>(&self, x: &'a CudaTensor, fmt: Fmt) -> Result<&'a Split> {
        let cell = &x.splits[(fmt == Fmt::Int4) as usize];
        if let Some(s) = cell.get() {
            return Ok(s);
        }
        let split = self.split_uncached(x, fmt)?;
        Ok(cell.get_or_init(|| split))
    }

    fn split_uncached(&self, x: &CudaTensor, fmt: Fmt) -> Result<Split> {
        let (rows, cols) = (x.rows, x.cols);
        let exps = self.alloc_indices(rows)?;
        let grid = (rows as u32, (cols as u32).div_ceil(SPLIT_SEG), 1);
        if fmt == Fmt::Int4 {
            if cols % 128 != 0 {
                bail!("split_planes: {cols} columns are not a multiple of 128");
            }
            // Safety: split_planes writes every plane byte and every sum.
            let data = unsafe { self.stream.alloc::<u8>((PLANES * rows * cols).max(1)) }.map_err(|e| anyhow!("CUDA allocation: {e:?}"))?;
            let sums = self.alloc_indices(rows * (cols / 32 + cols / 128) * PLANES)?;
            let args = [Arg::Ptr(self.ptr(&x.buf)), Arg::I32(cols as i32), Arg::Ptr(self.ptr(&data)), Arg::Ptr(self.ptr(&sums)), Arg::Ptr(self.ptr(&exps))];
            self.launch("split_planes", grid, 256, 0, &args)?;
            return Ok(Split { data, sums: Some(sums), exps });
        }
        // Safety: split_act writes both f16 halves of every element.
        let data = unsafe { self.stream.alloc::<u8>((4 * rows * cols).max(1)) }.map_err(|e| anyhow!("CUDA allocation: {e:?}"))?;
        self.launch("split_act", grid, 256, 0, &[Arg::Ptr(self.ptr(&x.buf)), Arg::I32(cols as i32), Arg::Ptr(self.ptr(&data)), Arg::Ptr(self.ptr(&exps))])?;
        Ok(Split { data, sums: None, exps })
    }

    fn elementwise_grid(n: usize) -> (u32, u32, u32) {
        ((n as u32).div_ceil(256).max(1), 1, 1)
    }
}

/// Warps per tensor-core block forced by `DUET_MMA_WARPS` (a tuning knob for sweeps on the
/// device), or None for the occupancy rule of `mma_threads`.
fn forced_mma_warps() -> Option<usize> {
    static WARPS: OnceLock<Option<usize>> = OnceLock::new();
    *WARPS.get_or_init(|| kernels::env_usize("DUET_MMA_WARPS", "2 to 16", |w| (2..=16).contains(&w)))
}

/// Token rows up to which linear layers take the tensor-core kernels (decode, MTP verify);
/// beyond, the CUDA-core kernels serve prefill chunks.
const MMA_MAX_TOKENS: usize = 8;
/// Tokens per tensor-core tile (MMA_TOKENS in kernels/linear_mma.cu).
const MMA_TOKENS: u32 = 4;

/// Columns per block of split_act (SPLIT_SEG in kernels/linear_mma.cu).
const SPLIT_SEG: u32 = 1024;

/// Int8 planes per activation row of the INT4 kernels (PLANES in kernels/linear_mma.cu).
const PLANES: usize = 4;

/// Activations split for the tensor-core kernels with a power-of-two exponent per row: f16 hi
/// and lo halves (split_act, FP8), or int8 planes with their sums per 32 and 128 columns
/// (split_planes, INT4).
struct Split {
    data: CudaSlice<u8>,
    sums: Option<CudaSlice<i32>>,
    exps: CudaSlice<i32>,
}

impl Split {
    fn sums_ptr(&self, gpu: &CudaBackend) -> u64 {
        self.sums.as_ref().map_or(0, |s| gpu.ptr(s))
    }
}

/// Threads of a block-split dot product: one 16-byte unit of the row per thread, between two
/// and eight warps.
fn threads_for(cols: usize, fmt: weights::Fmt) -> u32 {
    let units = cols.div_ceil(fmt.unit());
    (units.div_ceil(32) * 32).clamp(64, 256) as u32
}

fn check_rows(op: &str, t: &CudaTensor, rows: usize, cols: usize) -> Result<()> {
    if t.rows != rows || t.cols != cols {
        bail!("{op}: tensor is [{}, {}], expected [{rows}, {cols}]", t.rows, t.cols);
    }
    Ok(())
}

impl Backend for CudaBackend {
    type Tensor = CudaTensor;
    type Weight = CudaWeight;
    type Vector = CudaVector;
    type MlaHeads = CudaMlaHeads;
    type Experts = CudaExperts;
    type Cache = CudaCache;
    type Step = CudaStep;
    type Selection = CudaSelection;
    type Routing = CudaRouting;

    fn name(&self) -> &'static str {
        "cuda"
    }

    fn weight(&self, w: &LinearWeight) -> Result<CudaWeight> {
        upload_stacked(&self.stream, std::slice::from_ref(w)).with_context(|| format!("uploading {}", w.module))
    }

    fn weight_stacked(&self, parts: &[LinearWeight]) -> Result<CudaWeight> {
        upload_stacked(&self.stream, parts)
    }

    fn vector(&self, v: &[f32]) -> Result<CudaVector> {
        Ok(CudaVector(self.stream.clone_htod(v).map_err(|e| anyhow!("{e:?}"))?))
    }

    fn mla_heads(&self, kv_b: &LinearWeight, dims: &MlaDims) -> Result<CudaMlaHeads> {
        let MlaDims { heads, nope, v, latent, .. } = *dims;
        dims.check_kv_b(kv_b)?;
        let w = kv_b.to_f32();
        let (mut uk, mut uv) = (Vec::with_capacity(heads * nope * latent), Vec::with_capacity(heads * v * latent));
        for h in 0..heads {
            let base = h * (nope + v) * latent;
            uk.extend_from_slice(&w[base..base + nope * latent]);
            uv.extend_from_slice(&w[base + nope * latent..base + (nope + v) * latent]);
        }
        Ok(CudaMlaHeads {
            wuk: self.stream.clone_htod(&uk).map_err(|e| anyhow!("{e:?}"))?,
            wuv: self.stream.clone_htod(&uv).map_err(|e| anyhow!("{e:?}"))?,
            dims: *dims,
        })
    }

    fn experts(&self, experts: &[ExpertWeights]) -> Result<CudaExperts> {
        upload_experts(&self.stream, experts)
    }

    fn new_cache(&self, spec: &CacheSpec) -> Result<CudaCache> {
        CudaCache::new(&self.stream, spec)
    }

    fn release(&self, cache: &mut CudaCache, seq: u64) {
        cache.release(seq);
    }

    fn prepare(&self, batch: &Batch, rope: &RopeSpec, cache: &mut CudaCache) -> Result<CudaStep> {
        CudaStep::new(&self.stream, batch, rope, cache, false)
    }

    fn prepare_fixed(&self, batch: &Batch, rope: &RopeSpec, cache: &mut CudaCache) -> Result<CudaStep> {
        CudaStep::new(&self.stream, batch, rope, cache, true)
    }

    fn graph(
        &self,
        key: u64,
        step: &CudaStep,
        cache: &mut CudaCache,
        input: &CudaTensor,
        body: &mut dyn FnMut(&mut CudaCache, &CudaTensor) -> Result<CudaTensor>,
    ) -> Result<CudaTensor> {
        if !step.fixed {
            // Its metadata lives in buffers of its own: a replay would read stale addresses.
            return body(cache, input);
        }
        let mut graphs = std::mem::take(&mut cache.graphs);
        let y = graphs.run(self, key, cache, input, body);
        cache.graphs = graphs;
        y
    }

    fn tensor(&self, rows: usize, cols: usize, data: &[f32]) -> Result<CudaTensor> {
        if data.len() != rows * cols {
            bail!("tensor: {} values for [{rows}, {cols}]", data.len());
        }
        let buf = if data.is_empty() { self.alloc(0)? } else { self.stream.clone_htod(data).map_err(|e| anyhow!("{e:?}"))? };
        Ok(CudaTensor::new(rows, cols, buf))
    }

    fn selection_to_host(&self, sel: &CudaSelection, rows: usize) -> Result<(usize, Vec<i32>)> {
        let mut v = self.stream.clone_dtoh(&sel.idx).map_err(|e| anyhow!("CUDA: {e:?}"))?;
        self.synchronize()?;
        v.truncate(rows * sel.topk);
        Ok((sel.topk, v))
    }

    fn selection_from_host(&self, rows: usize, topk: usize, data: &[i32]) -> Result<CudaSelection> {
        if data.len() != rows * topk {
            bail!("selection of {} values for [{rows}, {topk}]", data.len());
        }
        let idx = if data.is_empty() { self.stream.alloc_zeros::<i32>(1).map_err(|e| anyhow!("{e:?}"))? } else { self.ints(data)? };
        Ok(CudaSelection { topk, idx })
    }

    fn to_host(&self, t: &CudaTensor) -> Result<Vec<f32>> {
        let mut v = self.stream.clone_dtoh(&t.buf).map_err(|e| anyhow!("CUDA: {e:?}"))?;
        self.synchronize()?;
        v.truncate(t.rows * t.cols);
        Ok(v)
    }

    fn shape(&self, t: &CudaTensor) -> (usize, usize) {
        (t.rows, t.cols)
    }

    fn embed(&self, table: &CudaWeight, ids: &[u32]) -> Result<CudaTensor> {
        let [p] = table.parts.as_slice() else { bail!("embedding tables must be one matrix") };
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= table.rows) {
            bail!("token id {bad} is outside the vocabulary ({} rows)", table.rows);
        }
        let out = self.tensor_of(ids.len(), table.cols)?;
        if ids.is_empty() {
            return Ok(out);
        }
        let ids_d = self.ints(&ids.iter().map(|&i| i as i32).collect::<Vec<_>>())?;
        self.launch_kernel(("embed", Some(p.fmt)), (ids.len() as u32, 1, 1), 256, 0, &[Arg::Desc(p.desc), Arg::Ptr(self.ptr(&ids_d)), Arg::Ptr(self.ptr(&out.buf))])?;
        Ok(out)
    }

    fn linear(&self, x: &CudaTensor, w: &CudaWeight) -> Result<CudaTensor> {
        if x.cols != w.cols {
            let name = w.parts.first().map_or("?", |p| p.module.as_str());
            bail!("linear {name}: input has {} columns, weight expects {}", x.cols, w.cols);
        }
        let y = self.tensor_of(x.rows, w.rows)?;
        if x.rows > 0 {
            self.gemv_into(x, w, &y)?;
        }
        Ok(y)
    }

    fn rms_norm(&self, x: &CudaTensor, w: &CudaVector, eps: f32) -> Result<CudaTensor> {
        if w.0.len() != x.cols {
            bail!("rms_norm: weight of {} for rows of {}", w.0.len(), x.cols);
        }
        let y = self.tensor_of(x.rows, x.cols)?;
        if x.rows > 0 {
            self.launch("rms_norm", (x.rows as u32, 1, 1), 256, 0, &[Arg::Ptr(self.ptr(&x.buf)), Arg::Ptr(self.ptr(&w.0)), Arg::Ptr(self.ptr(&y.buf)), Arg::I32(x.cols as i32), Arg::F32(eps)])?;
        }
        Ok(y)
    }

    fn add_assign(&self, a: &mut CudaTensor, b: &CudaTensor) -> Result<()> {
        check_rows("add", b, a.rows, a.cols)?;
        a.splits = Default::default();
        let n = a.rows * a.cols;
        if n > 0 {
            self.launch("add_assign", Self::elementwise_grid(n), 256, 0, &[Arg::Ptr(self.ptr(&a.buf)), Arg::Ptr(self.ptr(&b.buf)), Arg::Ptr(n as u64)])?;
        }
        Ok(())
    }

    fn swiglu(&self, x: &CudaTensor) -> Result<CudaTensor> {
        if x.cols % 2 != 0 {
            bail!("swiglu: odd width {}", x.cols);
        }
        let n = x.cols / 2;
        let y = self.tensor_of(x.rows, n)?;
        if x.rows * n > 0 {
            self.launch("swiglu", Self::elementwise_grid(x.rows * n), 256, 0, &[Arg::Ptr(self.ptr(&x.buf)), Arg::Ptr(self.ptr(&y.buf)), Arg::I32(x.rows as i32), Arg::I32(n as i32)])?;
        }
        Ok(y)
    }

    fn concat_cols(&self, a: &CudaTensor, b: &CudaTensor) -> Result<CudaTensor> {
        if a.rows != b.rows {
            bail!("concat: {} rows and {} rows", a.rows, b.rows);
        }
        let y = self.tensor_of(a.rows, a.cols + b.cols)?;
        let n = a.rows * (a.cols + b.cols);
        if n > 0 {
            self.launch(
                "concat_cols",
                Self::elementwise_grid(n),
                256,
                0,
                &[Arg::Ptr(self.ptr(&a.buf)), Arg::Ptr(self.ptr(&b.buf)), Arg::Ptr(self.ptr(&y.buf)), Arg::I32(a.rows as i32), Arg::I32(a.cols as i32), Arg::I32(b.cols as i32)],
            )?;
        }
        Ok(y)
    }

    fn select_rows(&self, x: &CudaTensor, rows: &[usize]) -> Result<CudaTensor> {
        if let Some(&r) = rows.iter().find(|&&r| r >= x.rows) {
            bail!("select_rows: row {r} of {}", x.rows);
        }
        let y = self.tensor_of(rows.len(), x.cols)?;
        let n = rows.len() * x.cols;
        if n > 0 {
            let idx = self.ints(&rows.iter().map(|&r| r as i32).collect::<Vec<_>>())?;
            self.launch("select_rows", Self::elementwise_grid(n), 256, 0, &[Arg::Ptr(self.ptr(&x.buf)), Arg::Ptr(self.ptr(&idx)), Arg::Ptr(self.ptr(&y.buf)), Arg::I32(rows.len() as i32), Arg::I32(x.cols as i32)])?;
        }
        Ok(y)
    }

    fn copy(&self, x: &CudaTensor) -> Result<CudaTensor> {
        let mut y = self.tensor_of(x.rows, x.cols)?;
        if x.rows * x.cols > 0 {
            self.stream.memcpy_dtod(&x.buf, &mut y.buf).map_err(|e| anyhow!("CUDA copy: {e:?}"))?;
        }
        Ok(y)
    }

    fn mla_cache_write(&self, kv: &CudaTensor, norm: &CudaVector, eps: f32, step: &CudaStep, cache: &mut CudaCache, slot: usize) -> Result<()> {
        let (l, r) = (cache.spec.latent, cache.spec.rope);
        check_rows("mla_cache_write", kv, step.positions.len(), l + r)?;
        if kv.rows == 0 {
            return Ok(());
        }
        let pool = self.ptr(&cache.mla[slot]);
        self.launch(
            "mla_cache_write",
            (kv.rows as u32, 1, 1),
            128,
            (l + r) * 4,
            &[
                Arg::Ptr(self.ptr(&kv.buf)),
                Arg::Ptr(self.ptr(&norm.0)),
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

    fn mla_queries(&self, q: &CudaTensor, heads: &CudaMlaHeads, step: &CudaStep) -> Result<(CudaTensor, CudaTensor)> {
        let MlaDims { heads: h, nope, rope, latent, .. } = heads.dims;
        check_rows("mla_queries", q, step.positions.len(), h * (nope + rope))?;
        let q_lat = self.tensor_of(q.rows, h * latent)?;
        let q_pe = self.tensor_of(q.rows, h * rope)?;
        if q.rows > 0 {
            self.launch(
                "mla_queries",
                ((q.rows * h) as u32, (latent as u32).div_ceil(128), 1),
                512,
                ((nope + rope).div_ceil(4) * 4 + 4 * 512) * 4,
                &[
                    Arg::Ptr(self.ptr(&q.buf)),
                    Arg::Ptr(self.ptr(&heads.wuk)),
                    Arg::Ptr(self.ptr(&q_lat.buf)),
                    Arg::Ptr(self.ptr(&q_pe.buf)),
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

    fn mla_attend(
        &self,
        q_lat: &CudaTensor,
        q_rope: &CudaTensor,
        cache: &CudaCache,
        slot: usize,
        step: &CudaStep,
        sel: Option<&CudaSelection>,
        dims: &MlaDims,
    ) -> Result<CudaTensor> {
        let MlaDims { heads: h, rope, latent, scale, .. } = *dims;
        let t = step.positions.len();
        check_rows("mla_attend", q_lat, t, h * latent)?;
        let out = self.tensor_of(t, h * latent)?;
        if t == 0 {
            return Ok(out);
        }
        let nk = match sel {
            Some(s) => s.topk,
            None => length_bucket(step.positions.iter().max().map_or(0, |p| p + 1)),
        };
        // Splits of 64 keys for parallelism, fewer when many rows would make the partials large.
        let budget = 256usize << 20;
        let max_splits = (budget / (t * h * (latent + 2) * 4)).max(1);
        let splits = nk.div_ceil(64).clamp(1, max_splits);
        let ks = nk.div_ceil(splits);
        let part = self.alloc(t * h * splits * (latent + 2))?;
        // Shared memory of mla_attend_split (its comment has the layout): 8 heads, 32-key tiles, 8 warps.
        let (w, hb, kt, warps) = (latent + rope, 8, 32, 8);
        let smem = (w * hb + kt * (w + 1) + warps * hb * kt + kt * hb + 3 * hb) * 4;
        if latent > 4 * 256 {
            bail!("mla_attend: latent width {latent} exceeds the kernel's 1024");
        }
        self.launch(
            "mla_attend_split",
            (t as u32, (h as u32).div_ceil(8), splits as u32),
            256,
            smem,
            &[
                Arg::Ptr(self.ptr(&q_lat.buf)),
                Arg::Ptr(self.ptr(&q_rope.buf)),
                Arg::Ptr(self.ptr(&cache.mla[slot])),
                Arg::Meta(step.meta),
                Arg::Ptr(sel.map_or(0, |s| self.ptr(&s.idx))),
                Arg::I32(sel.map_or(0, |s| s.topk as i32)),
                Arg::I32(h as i32),
                Arg::I32(latent as i32),
                Arg::I32(rope as i32),
                Arg::F32(scale),
                Arg::I32(ks as i32),
                Arg::Ptr(self.ptr(&part)),
            ],
        )?;
        self.launch(
            "mla_combine",
            (t as u32, h as u32, (latent as u32).div_ceil(128)),
            128,
            splits * 4,
            &[Arg::Ptr(self.ptr(&part)), Arg::I32(h as i32), Arg::I32(latent as i32), Arg::I32(splits as i32), Arg::Ptr(self.ptr(&out.buf))],
        )?;
        Ok(out)
    }

    fn mla_values(&self, o_lat: &CudaTensor, heads: &CudaMlaHeads) -> Result<CudaTensor> {
        let MlaDims { heads: h, v, latent, .. } = heads.dims;
        if o_lat.cols != h * latent {
            bail!("mla_values: input has {} columns, expected {}", o_lat.cols, h * latent);
        }
        let out = self.tensor_of(o_lat.rows, h * v)?;
        if o_lat.rows > 0 {
            self.launch(
                "mla_values",
                ((o_lat.rows * h) as u32, (v as u32).div_ceil(8), 1),
                256,
                0,
                &[Arg::Ptr(self.ptr(&o_lat.buf)), Arg::Ptr(self.ptr(&heads.wuv)), Arg::Ptr(self.ptr(&out.buf)), Arg::I32(h as i32), Arg::I32(v as i32), Arg::I32(latent as i32)],
            )?;
        }
        Ok(out)
    }

    fn index_cache_write(
        &self,
        k: &CudaTensor,
        norm_w: &CudaVector,
        norm_b: &CudaVector,
        eps: f32,
        step: &CudaStep,
        cache: &mut CudaCache,
        slot: usize,
    ) -> Result<()> {
        let d = cache.spec.index_dim;
        check_rows("index_cache_write", k, step.positions.len(), d)?;
        let pool = cache.index[slot].as_ref().ok_or_else(|| anyhow!("index_cache_write: slot {slot} keeps no indexer keys"))?;
        if k.rows == 0 {
            return Ok(());
        }
        self.launch(
            "index_cache_write",
            (k.rows as u32, 1, 1),
            128,
            d * 4,
            &[
                Arg::Ptr(self.ptr(&k.buf)),
                Arg::Ptr(self.ptr(&norm_w.0)),
                Arg::Ptr(self.ptr(&norm_b.0)),
                Arg::F32(eps),
                Arg::Ptr(step.cos),
                Arg::Ptr(step.sin),
                Arg::I32(step.indexer_interleaved as i32),
                Arg::Meta(step.meta),
                Arg::Ptr(self.ptr(pool)),
                Arg::I32(d as i32),
                Arg::I32(cache.spec.rope as i32),
            ],
        )
    }

    fn index_select(&self, q: &CudaTensor, w: &CudaTensor, cache: &CudaCache, slot: usize, step: &CudaStep, dims: &IndexDims) -> Result<CudaSelection> {
        let IndexDims { heads: nh, head_dim: d, rope, topk } = *dims;
        let t = step.positions.len();
        check_rows("index_select q", q, t, nh * d)?;
        check_rows("index_select w", w, t, nh)?;
        if d % 4 != 0 {
            bail!("index_select: indexer heads of {d} dims are not supported (a multiple of 4 is needed)");
        }
        let pool = cache.index[slot].as_ref().ok_or_else(|| anyhow!("index_select: slot {slot} keeps no indexer keys"))?;
        // topk_finish writes every row's k entries (-1 where a row has fewer positions).
        let idx = self.alloc_indices(t * topk)?;
        if t == 0 {
            return Ok(CudaSelection { topk, idx });
        }
        let ld = length_bucket(step.positions.iter().max().map_or(1, |p| p + 1));
        let scores = self.alloc(t * ld)?;
        self.launch(
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
                Arg::Ptr(self.ptr(&q.buf)),
                Arg::Ptr(self.ptr(&w.buf)),
                Arg::Ptr(self.ptr(pool)),
                Arg::Meta(step.meta),
                Arg::Ptr(step.cos),
                Arg::Ptr(step.sin),
                Arg::I32(step.indexer_interleaved as i32),
                Arg::I32(nh as i32),
                Arg::I32(d as i32),
                Arg::I32(rope as i32),
                Arg::I32(ld as i32),
                Arg::Ptr(self.ptr(&scores)),
            ],
        )?;
        // Top-k across many blocks: histogram, threshold bin, collect, finish.
        let chunks = (ld as u32).div_ceil(1024); // TOPK_CHUNK in attention.cu
        let hist = self.stream.alloc_zeros::<u32>(t * 4096).map_err(|e| anyhow!("{e:?}"))?;
        let meta = self.stream.alloc_zeros::<i32>(t * 4).map_err(|e| anyhow!("{e:?}"))?;
        let cand = unsafe { self.stream.alloc::<i32>(t * ld) }.map_err(|e| anyhow!("{e:?}"))?;
        let base = [Arg::Ptr(self.ptr(&scores)), Arg::Meta(step.meta), Arg::I32(ld as i32), Arg::I32(topk as i32)];
        let with = |extra: &[Arg]| base.iter().cloned().chain(extra.iter().cloned()).collect::<Vec<Arg>>();
        self.launch("topk_hist", (t as u32, chunks, 1), 256, 0, &with(&[Arg::Ptr(self.ptr(&hist))]))?;
        self.launch(
            "topk_threshold",
            (t as u32, 1, 1),
            1024,
            0,
            &[Arg::Ptr(self.ptr(&hist)), Arg::Meta(step.meta), Arg::I32(ld as i32), Arg::I32(topk as i32), Arg::Ptr(self.ptr(&meta))],
        )?;
        self.launch("topk_collect", (t as u32, chunks, 1), 256, 0, &with(&[Arg::Ptr(self.ptr(&meta)), Arg::Ptr(self.ptr(&idx)), Arg::Ptr(self.ptr(&cand))]))?;
        self.launch("topk_finish", (t as u32, 1, 1), 256, 0, &with(&[Arg::Ptr(self.ptr(&meta)), Arg::Ptr(self.ptr(&cand)), Arg::Ptr(self.ptr(&idx))]))?;
        Ok(CudaSelection { topk, idx })
    }

    fn route(&self, x: &CudaTensor, gate: &CudaWeight, bias: &CudaVector, p: &RouterParams) -> Result<CudaRouting> {
        let e = gate.rows;
        if bias.0.len() != e {
            bail!("route: bias of {} for {e} experts", bias.0.len());
        }
        if p.n_group > 64 || p.topk_group > 64 || p.top_k > 64 {
            bail!("route: at most 64 expert groups and 64 experts per token are supported");
        }
        let logits = self.linear(x, gate)?;
        let k1 = p.top_k + p.shared.is_some() as usize;
        let pairs = x.rows * k1;
        let idx = self.alloc_indices(pairs)?;
        let weights = self.alloc(pairs)?;
        // Decode steps get their plan from the router's last block (one launch fewer); the
        // plan counts the appended shared expert too.
        let plan_experts = p.shared.map_or(e, |s| e.max(s + 1));
        let plan = if x.rows > 0 && x.rows <= MMA_MAX_TOKENS { Some((self.alloc_indices(2 + 3 * pairs)?, plan_experts)) } else { None };
        if x.rows > 0 {
            let smem = (2 * e + p.n_group).max(if plan.is_some() { plan_experts + pairs } else { 0 }) * 4;
            self.launch(
                "moe_route",
                (x.rows as u32, 1, 1),
                256,
                smem,
                &[
                    Arg::Ptr(self.ptr(&logits.buf)),
                    Arg::Ptr(self.ptr(&bias.0)),
                    Arg::Ptr(self.ptr(&idx)),
                    Arg::Ptr(self.ptr(&weights)),
                    Arg::I32(e as i32),
                    Arg::I32(p.n_group as i32),
                    Arg::I32(p.topk_group as i32),
                    Arg::I32(p.top_k as i32),
                    Arg::I32(p.norm_topk_prob as i32),
                    Arg::F32(p.scaling),
                    Arg::I32(p.shared.map_or(-1, |s| s as i32)),
                    Arg::Ptr(plan.as_ref().map_or(0, |(b, _)| self.ptr(b))),
                    Arg::Ptr(self.ptr(&self.route_done)),
                    Arg::I32(plan_experts as i32),
                ],
            )?;
        }
        Ok(CudaRouting { top_k: k1, idx, weights, plan })
    }

    fn moe(&self, x: &CudaTensor, experts: &CudaExperts, routing: &CudaRouting) -> Result<CudaTensor> {
        let (t, k, i, h) = (x.rows, routing.top_k, experts.inter, experts.hidden);
        if x.cols != h {
            bail!("moe: input has {} columns, experts expect {h}", x.cols);
        }
        let out = self.tensor_of(t, h)?;
        if t == 0 {
            return Ok(out);
        }
        let pairs = t * k;
        let groups = pairs.min(experts.count) as u32;
        // Pairs grouped by expert: [groups | expert per group | offsets | pairs], from the
        // router when it made one for these experts.
        let built;
        let plan = match &routing.plan {
            Some((plan, n)) if *n == experts.count => plan,
            _ => {
                built = self.alloc_indices(2 + 3 * pairs)?;
                // The routes are staged in shared memory when they fit in 64 KB with the counts.
                let staged = (experts.count + pairs) * 4 <= 64 * 1024;
                self.launch(
                    "moe_plan",
                    (1, 1, 1),
                    256,
                    (experts.count + if staged { pairs } else { 0 }) * 4,
                    &[Arg::Ptr(self.ptr(&routing.idx)), Arg::I32(pairs as i32), Arg::I32(experts.count as i32), Arg::I32(staged as i32), Arg::Ptr(self.ptr(&built))],
                )?;
                &built
            }
        };
        let act = self.alloc(pairs * i)?;
        let part = self.alloc(pairs * h)?;
        let plan_args = |table: &CudaSlice<WDesc>| [Arg::Ptr(self.ptr(table)), Arg::Ptr(self.ptr(plan)), Arg::I32(pairs as i32)];
        if experts.mma && t <= MMA_MAX_TOKENS {
            // Tensor cores: 8 gate rows with their up rows per tile, then 16 down rows.
            let xs = self.split(x, experts.fmt_gate_up)?;
            let [a, b, c] = plan_args(&experts.gate_up_table);
            let kernel = ("moe_gate_up_mma", Some(experts.fmt_gate_up));
            let grid = ((i as u32).div_ceil(8), groups, 1);
            self.launch_kernel(
                kernel,
                grid,
                self.mma_threads(kernel, h, experts.fmt_gate_up, (grid.0 * grid.1) as usize)?,
                0,
                &[a, b, c, Arg::Ptr(self.ptr(&xs.data)), Arg::Ptr(xs.sums_ptr(self)), Arg::Ptr(self.ptr(&xs.exps)), Arg::Ptr(self.ptr(&act)), Arg::I32(k as i32), Arg::I32(i as i32)],
            )?;
            let act = CudaTensor::new(pairs, i, act);
            let acts = self.split(&act, experts.fmt_down)?;
            let [a, b, c] = plan_args(&experts.down_table);
            let kernel = ("moe_down_mma", Some(experts.fmt_down));
            let grid = ((h as u32).div_ceil(16), groups, 1);
            self.launch_kernel(
                kernel,
                grid,
                self.mma_threads(kernel, i, experts.fmt_down, (grid.0 * grid.1) as usize)?,
                0,
                &[a, b, c, Arg::Ptr(self.ptr(&acts.data)), Arg::Ptr(acts.sums_ptr(self)), Arg::Ptr(self.ptr(&acts.exps)), Arg::Ptr(self.ptr(&part)), Arg::I32(h as i32)],
            )?;
        } else {
            // Decode batches take a group's tokens one per pass (the second read of a tile hits
            // L1/L2, and one token needs the fewest registers); prefill takes eight at a time.
            let (gate_up, down) = if t <= 8 { ("moe_gate_up1", "moe_down1") } else { ("moe_gate_up8", "moe_down8") };
            let [a, b, c] = plan_args(&experts.gate_up_table);
            self.launch_kernel(
                (gate_up, Some(experts.fmt_gate_up)),
                ((i as u32).div_ceil(2), groups, 1),
                threads_for(h, experts.fmt_gate_up),
                0,
                &[a, b, c, Arg::Ptr(self.ptr(&x.buf)), Arg::Ptr(self.ptr(&act)), Arg::I32(k as i32), Arg::I32(i as i32)],
            )?;
            let [a, b, c] = plan_args(&experts.down_table);
            self.launch_kernel(
                (down, Some(experts.fmt_down)),
                ((h as u32).div_ceil(4), groups, 1),
                threads_for(i, experts.fmt_down),
                0,
                &[a, b, c, Arg::Ptr(self.ptr(&act)), Arg::Ptr(self.ptr(&part)), Arg::I32(h as i32)],
            )?;
        }
        self.launch(
            "moe_combine",
            Self::elementwise_grid(t * h),
            256,
            0,
            &[Arg::Ptr(self.ptr(&part)), Arg::Ptr(self.ptr(&routing.weights)), Arg::Ptr(self.ptr(&out.buf)), Arg::I32(t as i32), Arg::I32(k as i32), Arg::I32(h as i32)],
        )?;
        Ok(out)
    }
}
