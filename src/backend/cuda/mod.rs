//! The CUDA backend: the same operations as the CPU oracle, as NVRTC-compiled kernels on one
//! GPU. Activations are f32; weights stay in checkpoint precision and are dequantized in
//! registers. libcuda and libnvrtc are opened at run time, so this compiles and links on
//! machines without a GPU; [`CudaBackend::probe`] says whether one is usable.
//!
//! This module holds the backend, its kernel launches and the `Backend` impl; the linear
//! layers, the MoE block and attention live in `linear`, `moe` and `attention`.

mod attention;
pub mod buffer;
pub mod cache;
pub mod graphs;
pub mod kernels;
mod linear;
mod moe;
pub mod timeline;
pub mod weights;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};

use anyhow::{anyhow, bail, Context, Result};
use cudarc::driver::{CudaContext, CudaEvent, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr, DeviceRepr};

use self::buffer::{DevBuf, Keeper};
use self::cache::{CudaCache, CudaStep, StepMeta};
use self::linear::Split;
use self::weights::{upload_stacked, CudaExperts, CudaWeight, Fmt, WDesc};
use super::{Backend, Batch, CacheSpec, ExpertWeights, IndexDims, MlaDims, MoeBlock, RopeSpec, RouterParams};
use crate::checkpoint::LinearWeight;

pub struct CudaTensor {
    pub rows: usize,
    pub cols: usize,
    pub buf: DevBuf<f32>,
    /// The tensor split for the tensor-core kernels (FP8: f16 halves; INT4: int8 planes), made
    /// once for all the linear layers that read it; cleared when the tensor changes.
    splits: [OnceLock<Split>; 2],
}

impl CudaTensor {
    fn new(rows: usize, cols: usize, buf: DevBuf<f32>) -> CudaTensor {
        CudaTensor { rows, cols, buf, splits: Default::default() }
    }
}

pub struct CudaVector(CudaSlice<f32>);

/// `kv_b_proj` split per head: `W_UK [H, nope, latent]` and `W_UV [H, v, latent]`, as f32, bf16
/// or FP8 elements (`fmt`; see `attention::mla_heads`).
pub struct CudaMlaHeads {
    wuk: CudaSlice<u8>,
    wuv: CudaSlice<u8>,
    /// FP8: each row's scales.
    scales: Option<MlaScales>,
    fmt: Fmt,
    dims: MlaDims,
}

/// The scales of FP8 `W_UK` / `W_UV` rows: `[rows, cols]` each, one per `block` columns.
struct MlaScales {
    uk: CudaSlice<f32>,
    uv: CudaSlice<f32>,
    cols: usize,
    block: usize,
}

pub struct CudaSelection {
    pub topk: usize,
    pub idx: DevBuf<i32>,
}

pub struct CudaRouting {
    pub top_k: usize,
    pub idx: DevBuf<i32>,
    pub weights: DevBuf<f32>,
    /// The pairs grouped by expert (moe_plan's layout), when the router built it (decode
    /// steps), with the number of experts it counts.
    pub plan: Option<(DevBuf<i32>, usize)>,
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

/// What a tensor-core launch's block size depends on: (kernel, most warps, tiles, SM share,
/// whether it loops over tiles).
type MmaLaunchShape = (Kernel, usize, usize, usize, bool);

/// Makes `stream`'s later work wait for the work issued so far on `on` (through `event`).
fn after(stream: &CudaStream, on: &CudaStream, event: &CudaEvent) -> Result<()> {
    event.record(on).and_then(|()| stream.wait(event)).map_err(|e| anyhow!("CUDA stream fork/join: {e:?}"))
}

/// The backend's streams, as a launch picks one (`CudaBackend::lane`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Lane {
    Main = 0,
    Side = 1,
    Aux = 2,
}

impl Lane {
    fn from_u8(v: u8) -> Lane {
        match v {
            1 => Lane::Side,
            2 => Lane::Aux,
            _ => Lane::Main,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Lane::Main => "main",
            Lane::Side => "side",
            Lane::Aux => "aux",
        }
    }
}

pub struct CudaBackend {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    /// A second stream for work that overlaps the main stream's (the shared expert while the
    /// router runs; see `concurrently`), with the events that fork it from the main stream and
    /// join it back.
    side: Arc<CudaStream>,
    fork_event: CudaEvent,
    join_event: CudaEvent,
    /// Where `side_after_main`'s work waits for the main stream.
    late_event: CudaEvent,
    /// Set while `concurrently` has the side stream forked (until its join).
    side_forked: AtomicBool,
    /// A third stream, for a one-token MoE block's routed experts in two waves (`moe::waves`):
    /// the first wave's split and down projection run on it while the second wave's gate/up
    /// streams on the main stream; with the events that fork it and join it back.
    aux: Arc<CudaStream>,
    aux_fork: CudaEvent,
    aux_join: CudaEvent,
    /// The stream launches go to (a `Lane` as u8): `Side` while `concurrently` runs a side
    /// part, `Aux` while `beside_aux` runs its aux part.
    lane: AtomicU8,
    /// Set while a graph is captured: buffers come from `alloc_stream`, never captured, and the
    /// keeper holds them for the graph (see `buffer`).
    capture: Mutex<Option<Keeper>>,
    alloc_stream: Arc<CudaStream>,
    /// The tensor-core formats among the uploaded weights (MMA_FP8 | MMA_INT4 in `linear`): the
    /// splits a decode step's norms make for their readers.
    mma_fmts: AtomicU8,
    modules: Vec<Arc<CudaModule>>,
    functions: RwLock<HashMap<Kernel, CudaFunction>>,
    /// Threads and row tiles per block of a tensor-core launch, by (kernel, most warps, tiles,
    /// SM share, whether it loops over tiles): see `mma_block`.
    mma_block: RwLock<HashMap<MmaLaunchShape, (u32, u32)>>,
    /// The plans of one expert alone over a decode step's tokens, by (expert, tokens): the
    /// shared expert's, constant, made once (`moe::solo_plan`).
    solo_plans: Mutex<HashMap<(usize, usize), Arc<CudaSlice<i32>>>>,
    /// moe_route's count of finished blocks (zero between launches: the last block resets it).
    route_done: CudaSlice<i32>,
    /// The launches made while the diagnostic timeline is on (`timeline`).
    timeline: timeline::Log,
    sms: usize,
    device_name: String,
}

/// Dynamic shared memory of sample_rows (SAMPLE_SMEM in kernels/elementwise.cu): the head's
/// bins of mass (4097 f64) and up to 4096 head tokens' weights, logits and indices.
const SAMPLE_SMEM: usize = (4096 + 1 + 4096) * 8 + 4096 * 8;

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
        let side = ctx.new_stream().map_err(|e| anyhow!("{e:?}"))?;
        let alloc_stream = ctx.new_stream().map_err(|e| anyhow!("{e:?}"))?;
        let event = || ctx.new_event(None).map_err(|e| anyhow!("{e:?}"));
        let (fork_event, join_event, late_event) = (event()?, event()?, event()?);
        let aux = ctx.new_stream().map_err(|e| anyhow!("{e:?}"))?;
        let (aux_fork, aux_join) = (event()?, event()?);
        Ok(CudaBackend {
            ctx,
            stream,
            side,
            fork_event,
            join_event,
            late_event,
            side_forked: AtomicBool::new(false),
            aux,
            aux_fork,
            aux_join,
            lane: AtomicU8::new(Lane::Main as u8),
            capture: Mutex::new(None),
            alloc_stream,
            mma_fmts: AtomicU8::new(0),
            modules,
            functions: RwLock::new(HashMap::new()),
            mma_block: RwLock::new(HashMap::new()),
            solo_plans: Mutex::new(HashMap::new()),
            route_done,
            timeline: Default::default(),
            sms,
            device_name,
        })
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

    /// The picks of `sample_rows` as the device makes them: -1 for a row it leaves to the host
    /// (a NaN, no finite largest logit, or a top-p / min-p head longer than HEAD_CAP; never a
    /// greedy row). Greedy steps (every draw greedy) take argmax_rows, which needs no
    /// parameters copied; others take sample_rows, whose greedy rows run the same row_argmax.
    pub fn sample_rows_on_device(&self, t: &CudaTensor, draws: &[crate::sampling::Draw]) -> Result<Vec<i32>> {
        use crate::sampling::Draw;
        if draws.len() != t.rows {
            bail!("{} draws for {} rows of logits", draws.len(), t.rows);
        }
        if t.rows == 0 {
            return Ok(vec![]);
        }
        if draws.iter().all(|d| *d == Draw::Greedy) {
            return self.row_picks(t, "argmax_rows", 0, &[]);
        }
        // Each row's temperature, top-p, min-p and uniform (sample_rows' params).
        let params: Vec<f64> = draws
            .iter()
            .flat_map(|d| match *d {
                Draw::Greedy => [0.0; 4],
                Draw::Temperature { temperature, top_p, min_p, u } => [temperature as f64, top_p as f64, min_p as f64, u],
            })
            .collect();
        let params = self.stream.clone_htod(&params).map_err(|e| anyhow!("CUDA: {e:?}"))?;
        self.row_picks(t, "sample_rows", SAMPLE_SMEM, &[Arg::Ptr(self.ptr(&params))])
    }

    /// One index per row of `t` by `kernel` (a block of 1024 threads a row; its arguments the
    /// rows, their width, `extra`, then the indices), copied to the host.
    fn row_picks(&self, t: &CudaTensor, kernel: &'static str, smem: usize, extra: &[Arg]) -> Result<Vec<i32>> {
        // (The kernels' column index, an int, steps by their 1024 threads past the last column.)
        if t.cols == 0 || t.cols > (i32::MAX - 1024) as usize {
            bail!("{kernel} over rows of {} values", t.cols);
        }
        let idx = self.alloc_indices(t.rows)?;
        let mut args = vec![Arg::Ptr(self.ptr(&t.buf)), Arg::I32(t.cols as i32)];
        args.extend_from_slice(extra);
        args.push(Arg::Ptr(self.ptr(&idx)));
        self.launch(kernel, (t.rows as u32, 1, 1), 1024, smem, &args)?;
        let mut v = self.stream.clone_dtoh(&idx).map_err(|e| anyhow!("CUDA: {e:?}"))?;
        self.synchronize()?;
        v.truncate(t.rows);
        Ok(v)
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

    /// Runs `side` with its launches on the side stream, after everything issued so far, while
    /// `main` issues on the main stream; `main` may add side work that waits for the main
    /// stream's work so far (`side_after_main`: the shared expert's down projection once the
    /// routed gate/up is done). The main stream then waits for all the side's work, so what
    /// follows sees both. In a graph capture the two become parallel branches. The side parts
    /// may only launch into buffers allocated before this call: allocations and frees are
    /// ordered on the main stream, and `uninit` refuses while a side part runs. (The backend is
    /// driven by one thread at a time, as a stage's loop drives it: the lane belongs to that
    /// thread's launches.)
    fn concurrently<R>(&self, side: impl FnOnce() -> Result<()>, main: impl FnOnce() -> Result<R>) -> Result<R> {
        if self.side_forked.swap(true, Ordering::Relaxed) {
            bail!("internal: concurrently inside concurrently");
        }
        let result = self.forked(Lane::Side, (&self.fork_event, &self.join_event), side, main);
        self.side_forked.store(false, Ordering::Relaxed);
        result
    }

    /// `part` with its launches on `lane`'s stream once everything issued so far on the main
    /// stream is done, then `main` on the main stream beside it; the main stream then waits for
    /// `part`'s work (joined whatever happened, so a capture never ends with a stream apart).
    fn forked<R>(&self, lane: Lane, (fork, join): (&CudaEvent, &CudaEvent), part: impl FnOnce() -> Result<()>, main: impl FnOnce() -> Result<R>) -> Result<R> {
        self.main_lane_only("a fork")?;
        let stream = self.lane_stream(lane);
        after(stream, &self.stream, fork)?;
        let result = self.on_lane(lane, part).and_then(|()| main());
        let joined = after(&self.stream, stream, join);
        result.and_then(|r| joined.map(|()| r))
    }

    /// The stream of `lane`.
    fn lane_stream(&self, lane: Lane) -> &CudaStream {
        match lane {
            Lane::Main => &self.stream,
            Lane::Side => &self.side,
            Lane::Aux => &self.aux,
        }
    }

    /// Inside `concurrently`'s main part: `f` with its launches on the side stream, once the
    /// work issued so far on the main stream is done.
    fn side_after_main(&self, f: impl FnOnce() -> Result<()>) -> Result<()> {
        if !self.side_forked.load(Ordering::Relaxed) {
            bail!("internal: side_after_main outside concurrently");
        }
        self.main_lane_only("side_after_main")?;
        after(&self.side, &self.stream, &self.late_event)?;
        self.on_lane(Lane::Side, f)
    }

    /// An error unless launches go to the main stream now (`what` forks from it).
    fn main_lane_only(&self, what: &str) -> Result<()> {
        match self.current_lane() {
            Lane::Main => Ok(()),
            lane => bail!("internal: {what} called from the {} stream's part", lane.name()),
        }
    }

    /// `f` with its launches on `lane`'s stream (then back to the stream they went to before).
    fn on_lane(&self, lane: Lane, f: impl FnOnce() -> Result<()>) -> Result<()> {
        let before = self.lane.swap(lane as u8, Ordering::Relaxed);
        let r = f();
        self.lane.store(before, Ordering::Relaxed);
        r
    }

    /// The stream launches go to now.
    fn current_lane(&self) -> Lane {
        Lane::from_u8(self.lane.load(Ordering::Relaxed))
    }

    /// `forked` on the aux stream: in a graph capture the two become parallel branches. Like
    /// `concurrently`'s side parts, `aux` may only launch into buffers allocated before this call.
    fn beside_aux<R>(&self, aux: impl FnOnce() -> Result<()>, main: impl FnOnce() -> Result<R>) -> Result<R> {
        self.forked(Lane::Aux, (&self.aux_fork, &self.aux_join), aux, main)
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
        let lane = self.current_lane();
        if timeline::enabled() {
            self.timeline.note(kernel_name(kernel), grid, block, lane);
        }
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
            hStream: self.lane_stream(lane).cu_stream(),
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

    /// `n` uninitialized values on the main stream, for a kernel that writes every one before
    /// anything reads it (so buffers are not cleared: `duet bench check` compares every
    /// element with the CPU oracle).
    /// While a graph is captured they come from the allocation stream and live as long as the
    /// graph (see `buffer`).
    fn uninit<T: AnyBits>(&self, n: usize) -> Result<DevBuf<T>> {
        if self.current_lane() != Lane::Main {
            bail!("internal: a buffer allocated inside a side or aux stream's part (allocate it before `concurrently` or `beside_aux`)");
        }
        // (The lock only when captures may keep buffers: this is every operation's allocation.)
        let keeper = if graphs::keep_buffers() { self.capture.lock().unwrap_or_else(|e| e.into_inner()).clone() } else { None };
        let stream = if keeper.is_some() { &self.alloc_stream } else { &self.stream };
        // Safety: every bit pattern of T is a value (AnyBits).
        let slice = unsafe { stream.alloc::<T>(n.max(1)) }.map_err(|e| anyhow!("CUDA allocation of {n} x {}: {e:?}", std::any::type_name::<T>()))?;
        Ok(DevBuf::new(slice, keeper))
    }

    fn alloc(&self, n: usize) -> Result<DevBuf<f32>> {
        self.uninit(n)
    }

    fn alloc_indices(&self, n: usize) -> Result<DevBuf<i32>> {
        self.uninit(n)
    }

    /// Whether the main stream is being captured into a graph (or its state cannot be read).
    fn capturing(&self) -> bool {
        !matches!(self.stream.capture_status(), Ok(cudarc::driver::sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE))
    }

    /// Runs `f` (which captures a graph on the main stream) with the buffers it makes kept for
    /// the graph; returns its result and their keeper, every allocation complete.
    pub(crate) fn keeping_buffers<R>(&self, f: impl FnOnce() -> Result<R>) -> Result<(R, Keeper)> {
        let keeper = Keeper::new(&self.stream);
        *self.capture.lock().unwrap_or_else(|e| e.into_inner()) = Some(keeper.clone());
        let r = f();
        *self.capture.lock().unwrap_or_else(|e| e.into_inner()) = None;
        let r = r?;
        self.alloc_stream.synchronize().map_err(|e| anyhow!("CUDA: {e:?}"))?;
        Ok((r, keeper))
    }

    /// Puts `new` in `x`'s place (an operation that writes its update of a tensor to a fresh
    /// buffer, as the residual add does). While a graph is captured the old buffers go to its
    /// keeper, not freed: the captured work may read them (the first layer's residual, or a
    /// benchmark's input).
    fn replace_tensor(&self, x: &mut CudaTensor, new: CudaTensor) {
        let mut old = std::mem::replace(x, new);
        if let Some(k) = self.capture.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            old.buf.keep_for(k);
            for split in old.splits.iter_mut().filter_map(OnceLock::get_mut) {
                split.keep_for(k);
            }
        }
    }

    fn tensor_of(&self, rows: usize, cols: usize) -> Result<CudaTensor> {
        Ok(CudaTensor::new(rows, cols, self.alloc(rows * cols)?))
    }

    fn ints(&self, v: &[i32]) -> Result<CudaSlice<i32>> {
        self.stream.clone_htod(v).map_err(|e| anyhow!("{e:?}"))
    }

    fn elementwise_grid(n: usize) -> (u32, u32, u32) {
        ((n as u32).div_ceil(256).max(1), 1, 1)
    }

    /// The RMSNorm of `x`, or with `add` (a, s) of x + a, the sum written to s in the same
    /// launch (the residual add fused): with the tensor-core splits where they apply.
    fn norm_of(&self, x: &CudaTensor, add: Option<(&CudaTensor, &CudaTensor)>, w: &CudaVector, eps: f32) -> Result<CudaTensor> {
        if w.0.len() != x.cols {
            bail!("rms_norm: weight of {} for rows of {}", w.0.len(), x.cols);
        }
        let y = self.tensor_of(x.rows, x.cols)?;
        if x.rows == 0 {
            return Ok(y);
        }
        if !self.rms_norm_split(x, w, eps, &y, add, None, None)? {
            let (a, s) = add.map_or((0, 0), |(a, s)| (self.ptr(&a.buf), self.ptr(&s.buf)));
            self.launch(
                "rms_norm",
                (x.rows as u32, 1, 1),
                256,
                0,
                &[Arg::Ptr(self.ptr(&x.buf)), Arg::Ptr(self.ptr(&w.0)), Arg::Ptr(self.ptr(&y.buf)), Arg::I32(x.cols as i32), Arg::F32(eps), Arg::Ptr(a), Arg::Ptr(s)],
            )?;
        }
        Ok(y)
    }
}

/// Device element types every bit pattern of which is a value, so a buffer of them may start
/// uninitialized.
trait AnyBits: DeviceRepr {}
impl AnyBits for f32 {}
impl AnyBits for i32 {}
impl AnyBits for u8 {}
impl AnyBits for u32 {}

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
        self.weight_stacked(std::slice::from_ref(w)).with_context(|| format!("uploading {}", w.module))
    }

    fn weight_stacked(&self, parts: &[LinearWeight]) -> Result<CudaWeight> {
        let w = upload_stacked(&self.stream, parts)?;
        self.note_mma_fmts(w.parts.iter().filter(|p| p.desc.mma != 0).map(|p| p.fmt));
        Ok(w)
    }

    fn vector(&self, v: &[f32]) -> Result<CudaVector> {
        Ok(CudaVector(self.stream.clone_htod(v).map_err(|e| anyhow!("{e:?}"))?))
    }

    fn mla_heads(&self, kv_b: &LinearWeight, dims: &MlaDims) -> Result<CudaMlaHeads> {
        attention::mla_heads(self, kv_b, dims)
    }

    fn experts(&self, experts: &[ExpertWeights]) -> Result<CudaExperts> {
        self.experts_indexed(experts, &(0..experts.len()).collect::<Vec<_>>())
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
        let buf = if data.is_empty() { self.alloc(0)? } else { self.stream.clone_htod(data).map_err(|e| anyhow!("{e:?}"))?.into() };
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
        let idx = if data.is_empty() { self.stream.alloc_zeros::<i32>(1).map_err(|e| anyhow!("{e:?}"))? } else { self.ints(data)? }.into();
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

    fn sample_rows(&self, t: &CudaTensor, draws: &[crate::sampling::Draw]) -> Result<Vec<u32>> {
        let v = self.sample_rows_on_device(t, draws)?;
        let cuda = |e: cudarc::driver::DriverError| anyhow!("CUDA: {e:?}");
        // Rows with a NaN or no finite largest value (-1) are picked on the host.
        let mut picks = Vec::with_capacity(t.rows);
        for (r, (&i, d)) in v.iter().zip(draws).enumerate() {
            picks.push(match u32::try_from(i) {
                Ok(i) => i,
                Err(_) => {
                    let row = self.stream.clone_dtoh(&t.buf.slice(r * t.cols..(r + 1) * t.cols)).map_err(cuda)?;
                    self.synchronize()?;
                    crate::sampling::pick(&row, d)
                }
            });
        }
        Ok(picks)
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
        self.norm_of(x, None, w, eps)
    }

    fn add_rms_norm(&self, x: &mut CudaTensor, a: &CudaTensor, w: &CudaVector, eps: f32) -> Result<CudaTensor> {
        check_rows("add", a, x.rows, x.cols)?;
        // The sum goes to a new tensor: the norm's blocks each read the whole row.
        let sum = self.tensor_of(x.rows, x.cols)?;
        let y = self.norm_of(x, Some((a, &sum)), w, eps)?;
        self.replace_tensor(x, sum);
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
        if !x.cols.is_multiple_of(2) {
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
        attention::mla_cache_write(self, kv, norm, eps, step, cache, slot)
    }

    fn mla_queries(&self, q: &CudaTensor, heads: &CudaMlaHeads, step: &CudaStep) -> Result<(CudaTensor, CudaTensor)> {
        attention::mla_queries(self, q, heads, step)
    }

    fn mla_attend(&self, q_lat: &CudaTensor, q_rope: &CudaTensor, cache: &CudaCache, slot: usize, step: &CudaStep, sel: Option<&CudaSelection>, dims: &MlaDims) -> Result<CudaTensor> {
        attention::mla_attend(self, q_lat, q_rope, cache, slot, step, sel, dims)
    }

    fn mla_values(&self, o_lat: &CudaTensor, heads: &CudaMlaHeads) -> Result<CudaTensor> {
        attention::mla_values(self, o_lat, heads)
    }

    fn index_cache_write(&self, k: &CudaTensor, norm_w: &CudaVector, norm_b: &CudaVector, eps: f32, step: &CudaStep, cache: &mut CudaCache, slot: usize) -> Result<()> {
        attention::index_cache_write(self, k, norm_w, norm_b, eps, step, cache, slot)
    }

    fn index_select(&self, q: &CudaTensor, w: &CudaTensor, cache: &CudaCache, slot: usize, step: &CudaStep, dims: &IndexDims) -> Result<CudaSelection> {
        attention::index_select(self, q, w, cache, slot, step, dims)
    }

    fn route(&self, x: &CudaTensor, gate: &CudaWeight, bias: &CudaVector, p: &RouterParams) -> Result<CudaRouting> {
        moe::route(self, x, gate, bias, p)
    }

    fn moe(&self, x: &CudaTensor, experts: &CudaExperts, routing: &CudaRouting) -> Result<CudaTensor> {
        moe::moe(self, x, experts, routing)
    }

    fn moe_block(&self, x: &CudaTensor, gate: &CudaWeight, bias: &CudaVector, experts: &CudaExperts, p: &RouterParams) -> Result<CudaTensor> {
        moe::moe_block(self, x, gate, bias, experts, p)
    }

    fn expert_all(&self, x: &CudaTensor, e: &CudaExperts) -> Result<CudaTensor> {
        moe::expert_all(self, x, e)
    }

    fn moe_block_shared(&self, x: &CudaTensor, gate: &CudaWeight, bias: &CudaVector, experts: &CudaExperts, shared: &CudaExperts, p: &RouterParams) -> Result<CudaTensor> {
        moe::moe_block_shared(self, x, gate, bias, experts, shared, p)
    }

    fn add_norm_moe_block(&self, x: &mut CudaTensor, a: &CudaTensor, w: &CudaVector, eps: f32, block: &MoeBlock<'_, Self>) -> Result<CudaTensor> {
        match moe::add_norm_block(self, x, a, w, eps, block)? {
            Some(y) => Ok(y),
            None => block.run_after_add_norm(self, x, a, w, eps),
        }
    }
}
