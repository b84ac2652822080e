//! Linear layers on the GPU: which kernel a GEMV takes (tensor cores for FP8/INT4 at decode,
//! CUDA cores otherwise), its block size, and the split activations the tensor-core kernels read.

use std::sync::atomic::Ordering;
use std::sync::OnceLock;

use anyhow::{anyhow, bail, Result};

use super::buffer::DevBuf;
use super::weights::{CudaLinear, CudaWeight, Fmt, WDesc};
use super::{kernels, Arg, CudaBackend, CudaTensor, Kernel, Lane};

impl CudaBackend {
    /// `y[:, yoff .. yoff + w.rows] = x · Wᵀ` for every part of `w`.
    pub(super) fn gemv_into(&self, x: &CudaTensor, w: &CudaWeight, y: &CudaTensor) -> Result<()> {
        let mut yoff = 0;
        // One token (decode) has its own instantiation: fewer registers, no idle token lanes.
        let (nt, kernel) = if x.rows == 1 { (1, "gemv1") } else { (8, "gemv8") };
        for p in &w.parts {
            let (t, ldy, off) = (Arg::I32(x.rows as i32), Arg::I32(y.cols as i32), Arg::I32(yoff as i32));
            if let Some(v) = MmaVariant::of(p.fmt, &p.desc).filter(|_| x.rows <= MMA_MAX_TOKENS) {
                let s = self.split(x, p.fmt)?;
                self.launch_mma(
                    MmaFamily::Gemv,
                    v,
                    x.rows,
                    ((p.rows as u32).div_ceil(16), (x.rows as u32).div_ceil(v.slots(x.rows)), 1),
                    p.cols,
                    &[Arg::Desc(p.desc), Arg::Ptr(self.ptr(&s.data)), Arg::Ptr(s.sums_ptr(self)), Arg::Ptr(self.ptr(&s.exps)), Arg::Ptr(self.ptr(&y.buf)), t, ldy, off],
                )?;
            } else {
                // (gemv's ROWS: kernels::gemv_rows for one token, else 4.)
                let rows_per_block = if nt == 1 { kernels::gemv_rows() } else { 4 };
                self.launch_kernel(
                    (kernel, Some(p.fmt)),
                    ((p.rows as u32).div_ceil(rows_per_block as u32), (x.rows as u32).div_ceil(nt), 1),
                    threads_for(p.cols, p.fmt),
                    0,
                    &[Arg::Desc(p.desc), Arg::Ptr(self.ptr(&x.buf)), Arg::Ptr(self.ptr(&y.buf)), t, ldy, off],
                )?;
            }
            yoff += p.rows;
        }
        Ok(())
    }

    /// Launches tensor-core kernel `family` in variant `v`, its tile width chosen for `tokens`
    /// token rows (the step's tokens, for the grouped expert kernels), for weights with `cols`
    /// columns over `grid` tiles, with the block size from `mma_block`. The expert kernels'
    /// blocks loop over row tiles (every gridDim.x-th of their expert), so those launch
    /// `grid.0 / tiles per block` blocks per expert.
    pub(super) fn launch_mma(&self, family: MmaFamily, v: MmaVariant, tokens: usize, grid: (u32, u32, u32), cols: usize, args: &[Arg]) -> Result<()> {
        let (kernel, fmt) = (v.kernel(family, tokens), v.fmt());
        // Only at one token, where grid.1 (k experts) is exactly the groups the step has: with
        // more, a launch covers k·tokens groups of which fewer run (11 of 16 at two tokens of
        // 32 experts), the tiles spread over fewer blocks than the SMs hold, and the expert
        // GEMVs measured 68% -> 60% of copy bandwidth (four tokens: 65% -> 39%).
        let loops = !matches!(family, MmaFamily::Gemv) && tokens == 1;
        let (threads, per_block) = self.mma_block(kernel, cols, fmt, (grid.0 * grid.1) as usize, loops)?;
        self.launch_kernel(kernel, (grid.0.div_ceil(per_block), grid.1, grid.2), threads, 0, args)
    }

    /// Threads and row tiles per block of a tensor-core launch over `tiles` row tiles.
    /// Threads: the block's warps split the row tile's chunks (64 FP8 or 128 INT4 columns), at
    /// least two chunks each; the most warps per block with which every block is resident at
    /// once, so all SMs stream to the end (a large block per SM left a half-empty second wave);
    /// when no size fits, two warps (the 64 threads that finish a tile). At most MMA_WARPS (16).
    /// A launch on the side stream fits in 1/`side_share()` of each SM, so that the main
    /// stream's latency-bound kernels (the router beside the shared expert) find room to start.
    /// Tiles per block, when the launch `loops` over them (else 1): 1 when every block is
    /// resident at once, else as many as make the two-warp blocks one resident wave, so that each block
    /// reads its plan entry and weight descriptor (a chain of dependent loads) once for several
    /// tiles and no second wave starts late (expert down projections at one token, H200: INT4
    /// group 128 / 64 / 32 65 / 62 / 64% -> 68 / 65 / 68% of copy bandwidth, FP8 82% -> 85%;
    /// gate/up 0.5-1.7 points).
    fn mma_block(&self, kernel: Kernel, cols: usize, fmt: Fmt, tiles: usize, loops: bool) -> Result<(u32, u32)> {
        let chunks = cols / if fmt == Fmt::Fp8 { 64 } else { 128 };
        let most = chunks.div_ceil(2).clamp(2, 16);
        if let Some(w) = forced_mma_warps() {
            return Ok((32 * w.min(most) as u32, 1));
        }
        let share = if self.current_lane() == Lane::Side { side_share() } else { 1 };
        // Decided once per launch shape: the occupancy calculator is not free.
        let key = (kernel, most, tiles, share, loops);
        if let Some(&block) = self.mma_block.read().unwrap().get(&key) {
            return Ok(block);
        }
        let f = self.function(kernel)?;
        let resident = |t: u32| -> Result<usize> {
            let per_sm = f.occupancy_max_active_blocks_per_multiprocessor(t, 0, None).map_err(|e| anyhow!("{e:?}"))? as usize;
            Ok(per_sm / share * self.sms)
        };
        let mut block = (64, if loops { tiles.div_ceil(resident(64)?.max(1)) as u32 } else { 1 });
        for warps in (2..=most).rev() {
            let t = 32 * warps as u32;
            if resident(t)? >= tiles {
                block = (t, 1);
                break;
            }
        }
        self.mma_block.write().unwrap().insert(key, block);
        Ok(block)
    }

    /// A fresh split of `x` for weights of format `fmt` (not kept): the benchmark of the split
    /// kernels alone.
    pub fn split_activation(&self, x: &CudaTensor, fmt: Fmt) -> Result<()> {
        self.split_uncached(x, fmt).map(|_| ())
    }

    /// `x` split for the tensor-core kernels (split_act in kernels/linear_mma.cu), laid out
    /// for weights of format `fmt`; made on first use and kept with the tensor.
    pub(super) fn split<'a>(&self, x: &'a CudaTensor, fmt: Fmt) -> Result<&'a Split> {
        let cell = &x.splits[planes(fmt) as usize];
        if let Some(s) = cell.get() {
            return Ok(s);
        }
        let split = self.split_uncached(x, fmt)?;
        Ok(cell.get_or_init(|| split))
    }

    /// Notes that weights of formats `fmts` take the tensor-core kernels.
    pub(super) fn note_mma_fmts(&self, fmts: impl IntoIterator<Item = Fmt>) {
        for f in fmts {
            self.mma_fmts.fetch_or(split_bit(f), Ordering::Relaxed);
        }
    }

    /// RMSNorm of decode rows into `y` with, in the same launch, the splits that the tensor-core
    /// formats of the uploaded weights read (kept with `y`), or with `readers` those that its
    /// readers' formats read (a split no reader takes is work on the step's critical path): a
    /// decode step's norms feed its FP8 or INT4 linears, and each split is a launch saved. The
    /// same bits as `rms_norm` then `split` (kernels/linear_mma.cu). With `add` (a, s), the row
    /// normalized is x + a, written to s too. With `router` (a gate that `norm_router_fits`, and
    /// its logits), the launch also computes the router's logits of the normalized rows. False,
    /// launching nothing, where it does not apply.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn rms_norm_split(&self, x: &CudaTensor, w: &super::CudaVector, eps: f32, y: &CudaTensor, add: Option<(&CudaTensor, &CudaTensor)>, router: Option<(&CudaLinear, &CudaTensor)>, readers: Option<&[Fmt]>) -> Result<bool> {
        let wanted = readers.map_or(!0, |r| r.iter().fold(0, |bits, &f| bits | split_bit(f)));
        let fmts = self.mma_fmts.load(Ordering::Relaxed) & wanted;
        if fmts == 0 || x.rows > MMA_MAX_TOKENS || !x.cols.is_multiple_of(128) || x.cols > NORM_MAX_COLS {
            return Ok(false);
        }
        if let Some((gate, logits)) = router {
            if !self.norm_router_fits(x, gate) || logits.rows != x.rows || logits.cols != gate.rows {
                bail!("internal: a router that rms_norm_split cannot take ({} rows of {}, {:?} gate {}x{})", x.rows, x.cols, gate.fmt, gate.rows, gate.cols);
            }
        }
        let blocks = norm_blocks(x.cols, router.map(|(gate, _)| gate.rows));
        let halves = if fmts & MMA_FP8 != 0 { Some(self.split_alloc(x.rows, x.cols, Fmt::Fp8)?) } else { None };
        let planes = if fmts & MMA_INT4 != 0 { Some(self.split_alloc(x.rows, x.cols, Fmt::Int4)?) } else { None };
        let (hd, he) = halves.as_ref().map_or((0, 0), |s| (self.ptr(&s.data), self.ptr(&s.exps)));
        let (pd, ps, pe) = planes.as_ref().map_or((0, 0, 0), |s| (self.ptr(&s.data), s.sums_ptr(self), self.ptr(&s.exps)));
        let mut args = vec![
            Arg::Ptr(self.ptr(&x.buf)),
            Arg::Ptr(self.ptr(&w.0)),
            Arg::Ptr(self.ptr(&y.buf)),
            Arg::I32(x.cols as i32),
            Arg::F32(eps),
            Arg::Ptr(hd),
            Arg::Ptr(he),
            Arg::Ptr(pd),
            Arg::Ptr(ps),
            Arg::Ptr(pe),
            Arg::Ptr(add.map_or(0, |(a, _)| self.ptr(&a.buf))),
            Arg::Ptr(add.map_or(0, |(_, s)| self.ptr(&s.buf))),
        ];
        let name = match router {
            Some((gate, logits)) => {
                args.extend([Arg::Ptr(gate.desc.w), Arg::I32(gate.rows as i32), Arg::Ptr(self.ptr(&logits.buf))]);
                "rms_norm_split_router"
            }
            None => "rms_norm_split",
        };
        self.launch(name, (x.rows as u32, blocks, 1), 256, 0, &args)?;
        for (cell, split) in y.splits.iter().zip([halves, planes]) {
            if let Some(s) = split {
                let _ = cell.set(s);
            }
        }
        Ok(true)
    }

    /// Whether rms_norm_split can compute the logits of `gate` for the rows of `x` in its launch:
    /// a bf16 gate in the plain layout as wide as the rows, whose blocks (ROUTER_ROWS gate rows
    /// each, a block per SM: the gate's words take registers) fit in `norm_router_waves` waves.
    pub(super) fn norm_router_fits(&self, x: &CudaTensor, gate: &CudaLinear) -> bool {
        let blocks = norm_blocks(x.cols, Some(gate.rows)) as usize;
        gate.fmt == Fmt::Bf16 && gate.desc.mma == 0 && gate.cols == x.cols && x.cols.is_multiple_of(128) && x.cols <= NORM_MAX_COLS && x.rows * blocks <= self.sms * norm_router_waves()
    }

    pub(super) fn split_uncached(&self, x: &CudaTensor, fmt: Fmt) -> Result<Split> {
        let split = self.split_alloc(x.rows, x.cols, fmt)?;
        self.split_into(x, &split)?;
        Ok(split)
    }

    /// Buffers for the split of `rows` activations of `cols` columns for weights of format
    /// `fmt` (filled by `split_into`).
    pub(super) fn split_alloc(&self, rows: usize, cols: usize, fmt: Fmt) -> Result<Split> {
        let exps = self.alloc_indices(rows)?;
        if planes(fmt) {
            if !cols.is_multiple_of(128) {
                bail!("split_planes: {cols} columns are not a multiple of 128");
            }
            let sums = self.alloc_indices(rows * (cols / 32 + cols / 128) * PLANES)?;
            return Ok(Split { data: self.uninit(PLANES * rows * cols)?, sums: Some(sums), exps });
        }
        Ok(Split { data: self.uninit(4 * rows * cols)?, sums: None, exps })
    }

    /// Splits `x` into `s` (from `split_alloc` for its shape): split_planes for INT4 writes
    /// every plane byte and sum, split_act both f16 halves of every element.
    pub(super) fn split_into(&self, x: &CudaTensor, s: &Split) -> Result<()> {
        self.split_rows_into(x, s, 0..x.rows)
    }

    /// `split_into` for `rows` of `x` alone (into the same rows of `s`: every array of a split
    /// is laid out a row after another).
    pub(super) fn split_rows_into(&self, x: &CudaTensor, s: &Split, rows: std::ops::Range<usize>) -> Result<()> {
        if rows.end > x.rows || rows.start > rows.end || x.rows > s.exps.len() {
            bail!("internal: split of rows {rows:?} of {} into a split of {}", x.rows, s.exps.len());
        }
        let (r0, n, cols) = (rows.start as u64, rows.len(), x.cols);
        if n == 0 {
            return Ok(());
        }
        let grid = (n as u32, (cols as u32).div_ceil(SPLIT_SEG), 1);
        let x_ptr = Arg::Ptr(self.ptr(&x.buf) + r0 * 4 * cols as u64);
        let exps = Arg::Ptr(self.ptr(&s.exps) + r0 * 4);
        match &s.sums {
            Some(sums) => {
                // PLANES bytes a value; (cols / 32 + cols / 128) · PLANES sums a row.
                let data = Arg::Ptr(self.ptr(&s.data) + r0 * (PLANES * cols) as u64);
                let sums = Arg::Ptr(self.ptr(sums) + r0 * 4 * ((cols / 32 + cols / 128) * PLANES) as u64);
                self.launch("split_planes", grid, 256, 0, &[x_ptr, Arg::I32(cols as i32), data, sums, exps])
            }
            // Two f16 halves a value.
            None => self.launch("split_act", grid, 256, 0, &[x_ptr, Arg::I32(cols as i32), Arg::Ptr(self.ptr(&s.data) + r0 * (4 * cols) as u64), exps]),
        }
    }
}

/// Waves of blocks rms_norm_split_router may take (`DUET_NORM_ROUTER_WAVES`, 1 to 4; default 2:
/// up to four tokens at 256 experts on 132 SMs). At four tokens two waves beat a separate gate
/// GEMV, which waited for SM room behind the shared expert's gate/up on the side stream: the
/// INT4 MoE block 79.7 -> 82.3% (g128), 72.7 -> 74.1% (g32), FP8 94.6 -> 96.2% on the H200
/// (performance.md, sixteenth session).
fn norm_router_waves() -> usize {
    static WAVES: OnceLock<usize> = OnceLock::new();
    *WAVES.get_or_init(|| kernels::env_usize("DUET_NORM_ROUTER_WAVES", "1 to 4", |w| (1..=4).contains(&w)).unwrap_or(2))
}

/// Warps per tensor-core block forced by `DUET_MMA_WARPS` (a tuning knob for sweeps on the
/// device), or None for the occupancy rule of `mma_block`.
fn forced_mma_warps() -> Option<usize> {
    static WARPS: OnceLock<Option<usize>> = OnceLock::new();
    *WARPS.get_or_init(|| kernels::env_usize("DUET_MMA_WARPS", "2 to 16", |w| (2..=16).contains(&w)))
}

/// The share of each SM a side-stream tensor-core launch may fill, as a divisor
/// (`DUET_SIDE_SHARE`, 1 to 8; default 2: half).
fn side_share() -> usize {
    static SHARE: OnceLock<usize> = OnceLock::new();
    *SHARE.get_or_init(|| kernels::env_usize("DUET_SIDE_SHARE", "1 to 8", |w| (1..=8).contains(&w)).unwrap_or(2))
}

/// Threads of a block-split dot product: one 16-byte unit of the row per thread, between two
/// and eight warps.
pub(super) fn threads_for(cols: usize, fmt: Fmt) -> u32 {
    let units = cols.div_ceil(fmt.unit());
    (units.div_ceil(32) * 32).clamp(64, 256) as u32
}

/// Token rows up to which linear layers take the tensor-core kernels (decode, MTP verify);
/// beyond, the CUDA-core kernels serve prefill chunks.
pub(super) const MMA_MAX_TOKENS: usize = 8;
/// Token slots per tensor-core tile (MMA_TOKENS in kernels/linear_mma.cu); the INT4 kernels
/// for one or two tokens take two.
const MMA_TOKENS: u32 = 4;

/// Which member of a tensor-core kernel family a weight takes: FP8's one, or the INT4 kernel
/// for its group size and zero points (kernels/linear_mma.cu instantiates each, so each gets
/// the registers it needs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum MmaVariant {
    Fp8,
    Int4 { group: u32, zeros: bool },
    /// Symmetric, groups of 64 (the upload splits larger ones).
    Int8,
}

impl MmaVariant {
    /// The variant for an uploaded weight of format `fmt`, if the tensor-core kernels can read
    /// it (INT4 groups are then 32, 64 or 128 columns: the upload splits larger ones).
    pub(super) fn of(fmt: Fmt, desc: &WDesc) -> Option<MmaVariant> {
        match fmt {
            _ if desc.mma == 0 => None,
            Fmt::Fp8 => Some(MmaVariant::Fp8),
            Fmt::Int4 => Some(MmaVariant::Int4 { group: desc.group.min(128) as u32, zeros: desc.zero != 0 }),
            Fmt::Int8 => Some(MmaVariant::Int8),
            _ => None,
        }
    }

    fn fmt(self) -> Fmt {
        match self {
            MmaVariant::Fp8 => Fmt::Fp8,
            MmaVariant::Int4 { .. } => Fmt::Int4,
            MmaVariant::Int8 => Fmt::Int8,
        }
    }

    /// Token slots per tile at `tokens` tokens.
    pub(super) fn slots(self, tokens: usize) -> u32 {
        match self {
            MmaVariant::Int4 { .. } | MmaVariant::Int8 if tokens <= 2 => 2,
            _ => MMA_TOKENS,
        }
    }

    /// The kernel of `family` at `tokens` tokens: `gemv_mma_fp8`, or `gemv_mma_g64s2_int4`
    /// (group 64, no zero points, 2 slots; INT8's are `..._g64s2_int8`).
    fn kernel(self, family: MmaFamily, tokens: usize) -> Kernel {
        let (group, zeros) = match self {
            MmaVariant::Fp8 => return (family.names()[0], Some(Fmt::Fp8)),
            MmaVariant::Int4 { group, zeros } => (group, zeros),
            MmaVariant::Int8 => (64, false),
        };
        let g = match group {
            128 => 0,
            64 => 1,
            _ => 2,
        };
        (family.names()[1 + 4 * g + 2 * (!zeros as usize) + (self.slots(tokens) == MMA_TOKENS) as usize], Some(self.fmt()))
    }
}

/// The tensor-core kernel families of kernels/linear_mma.cu.
#[derive(Clone, Copy, Debug)]
pub(super) enum MmaFamily {
    Gemv,
    GateUp,
    Down,
}

/// A family's entry-point prefixes (the format's suffix completes them): FP8's, then the
/// integer variants' by group (128, 64, 32), zero points (a, s) and token slots (2, 4).
macro_rules! mma_names {
    ($f:literal) => {
        [
            $f,
            concat!($f, "_g128a2"),
            concat!($f, "_g128a4"),
            concat!($f, "_g128s2"),
            concat!($f, "_g128s4"),
            concat!($f, "_g64a2"),
            concat!($f, "_g64a4"),
            concat!($f, "_g64s2"),
            concat!($f, "_g64s4"),
            concat!($f, "_g32a2"),
            concat!($f, "_g32a4"),
            concat!($f, "_g32s2"),
            concat!($f, "_g32s4"),
        ]
    };
}

impl MmaFamily {
    fn names(self) -> &'static [&'static str; 13] {
        const GEMV: [&str; 13] = mma_names!("gemv_mma");
        const GATE_UP: [&str; 13] = mma_names!("moe_gate_up_mma");
        const DOWN: [&str; 13] = mma_names!("moe_down_mma");
        match self {
            MmaFamily::Gemv => &GEMV,
            MmaFamily::GateUp => &GATE_UP,
            MmaFamily::Down => &DOWN,
        }
    }
}

/// Whether the tensor-core kernels of weights of format `fmt` read the activation as int8
/// planes (INT4, INT8), else as f16 halves (FP8).
fn planes(fmt: Fmt) -> bool {
    matches!(fmt, Fmt::Int4 | Fmt::Int8)
}

/// Bits of `CudaBackend::mma_fmts` (MMA_INT4: the planes, for INT4 and INT8).
const MMA_FP8: u8 = 1;
const MMA_INT4: u8 = 2;

/// The `mma_fmts` bit of the split that weights of format `fmt` read.
fn split_bit(fmt: Fmt) -> u8 {
    if planes(fmt) {
        MMA_INT4
    } else {
        MMA_FP8
    }
}

/// The widest row rms_norm_split takes: each of its 256 threads holds NORM_VEC (8) float4s of
/// the row (kernels/common.cuh); each block writes the SPLIT_SEG columns of its register index.
const NORM_MAX_COLS: usize = 256 * 8 * 4;

/// Columns per block of split_act (SPLIT_SEG in kernels/linear_mma.cu).
const SPLIT_SEG: u32 = 1024;

/// Gate rows per block of rms_norm_split_router (ROUTER_ROWS in kernels/linear_mma.cu).
const ROUTER_ROWS: u32 = 4;

/// Blocks per row of rms_norm_split over `cols` columns: one per SPLIT_SEG-column segment, or
/// with a router of `gate_rows` rows, enough for ROUTER_ROWS of them each too.
fn norm_blocks(cols: usize, gate_rows: Option<usize>) -> u32 {
    let segments = (cols as u32).div_ceil(SPLIT_SEG);
    gate_rows.map_or(segments, |r| segments.max((r as u32).div_ceil(ROUTER_ROWS)))
}

/// Int8 planes per activation row of the INT4 kernels (PLANES in kernels/linear_mma.cu).
const PLANES: usize = 4;

/// Activations split for the tensor-core kernels with a power-of-two exponent per row: f16 hi
/// and lo halves (split_act, FP8), or int8 planes with their sums per 32 and 128 columns
/// (split_planes, INT4).
pub(super) struct Split {
    pub(super) data: DevBuf<u8>,
    sums: Option<DevBuf<i32>>,
    pub(super) exps: DevBuf<i32>,
}

impl Split {
    pub(super) fn sums_ptr(&self, gpu: &CudaBackend) -> u64 {
        self.sums.as_ref().map_or(0, |s| gpu.ptr(s))
    }

    /// `DevBuf::keep_for` for each of its buffers.
    pub(super) fn keep_for(&mut self, k: &super::buffer::Keeper) {
        self.data.keep_for(k);
        self.exps.keep_for(k);
        if let Some(s) = self.sums.as_mut() {
            s.keep_for(k);
        }
    }
}


#[cfg(test)]
mod tests {
    use super::super::kernel_name;
    use super::{MmaFamily, MmaVariant};

    #[test]
    fn variants_name_their_kernel_entry_points() {
        let name = |f, v: MmaVariant, t| kernel_name(v.kernel(f, t));
        assert_eq!(name(MmaFamily::Gemv, MmaVariant::Fp8, 1), "gemv_mma_fp8");
        assert_eq!(name(MmaFamily::Gemv, MmaVariant::Int4 { group: 64, zeros: false }, 1), "gemv_mma_g64s2_int4");
        assert_eq!(name(MmaFamily::GateUp, MmaVariant::Int4 { group: 128, zeros: true }, 3), "moe_gate_up_mma_g128a4_int4");
        assert_eq!(name(MmaFamily::Down, MmaVariant::Int4 { group: 32, zeros: true }, 2), "moe_down_mma_g32a2_int4");
        assert_eq!(name(MmaFamily::Down, MmaVariant::Int8, 8), "moe_down_mma_g64s4_int8");
    }
}
