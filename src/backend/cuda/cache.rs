//! Paged latent and indexer caches on the GPU, and the per-step metadata kernels read.
//!
//! Every slot (layer) has a pool of fixed blocks of [`BLOCK`] positions; a sequence owns a list
//! of block ids shared by all slots, so one block table per step serves every layer.

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::{bail, Result};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DeviceRepr};

use crate::backend::{Batch, CacheSpec, RopeSpec};

/// Positions per cache block (`CACHE_BLOCK` in kernels/common.cuh).
pub const BLOCK: usize = 64;

pub struct CudaCache {
    pub spec: CacheSpec,
    /// Per slot: `[blocks, BLOCK, latent + rope]`.
    pub mla: Vec<CudaSlice<f32>>,
    /// Per slot with an indexer: `[blocks, BLOCK, index_dim]`.
    pub index: Vec<Option<CudaSlice<f32>>>,
    free: Vec<i32>,
    seqs: HashMap<u64, Vec<i32>>,
    /// Buffers of `prepare_fixed` steps, made on first use.
    fixed: Option<FixedStep>,
    blocks: usize,
    /// Decode steps captured as graphs over this cache.
    pub graphs: super::graphs::StepGraphs,
}

/// A decode-sized step's metadata and rope angles at fixed addresses (for replayed graphs).
struct FixedStep {
    meta: CudaSlice<i32>,
    cos: CudaSlice<f32>,
    sin: CudaSlice<f32>,
}

/// Rows and segments a fixed step can hold.
pub const FIXED_ROWS: usize = 8;

impl CudaCache {
    pub fn new(stream: &Arc<CudaStream>, spec: &CacheSpec) -> Result<CudaCache> {
        // Each sequence may leave its last block part-empty: keep a few spare.
        let blocks = spec.capacity.div_ceil(BLOCK) + 8;
        let width = spec.latent + spec.rope;
        let mut mla = Vec::with_capacity(spec.slot_has_index.len());
        let mut index = Vec::with_capacity(spec.slot_has_index.len());
        for &has_index in &spec.slot_has_index {
            mla.push(stream.alloc_zeros::<f32>(blocks * BLOCK * width)?);
            index.push(if has_index { Some(stream.alloc_zeros::<f32>(blocks * BLOCK * spec.index_dim)?) } else { None });
        }
        Ok(CudaCache { spec: spec.clone(), mla, index, free: (0..blocks as i32).rev().collect(), seqs: HashMap::new(), fixed: None, blocks, graphs: Default::default() })
    }

    /// Makes room for positions `0..len` of `seq`.
    pub fn reserve(&mut self, seq: u64, len: usize) -> Result<()> {
        let have = self.seqs.get(&seq).map_or(0, Vec::len);
        let need = len.div_ceil(BLOCK);
        if need > have && need - have > self.free.len() {
            bail!(
                "KV cache full: sequence {seq} needs {} more blocks of {BLOCK} positions, {} are free (capacity {} positions)",
                need - have,
                self.free.len(),
                self.spec.capacity
            );
        }
        let list = self.seqs.entry(seq).or_default();
        while list.len() < need {
            list.push(self.free.pop().expect("checked above"));
        }
        Ok(())
    }

    pub fn release(&mut self, seq: u64) {
        if let Some(blocks) = self.seqs.remove(&seq) {
            self.free.extend(blocks);
        }
    }

    fn blocks_of(&self, seq: u64) -> &[i32] {
        self.seqs.get(&seq).map_or(&[], Vec::as_slice)
    }
}

/// Mirrors `struct StepMeta` in kernels/common.cuh.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct StepMeta {
    pub pos: u64,
    pub row_seq: u64,
    pub blocks: u64,
    pub max_blocks: i32,
    pub _pad: i32,
}

unsafe impl DeviceRepr for StepMeta {}

pub struct CudaStep {
    pub batch: Batch,
    pub positions: Vec<usize>,
    pub meta: StepMeta,
    /// Device addresses of the rope angles `[T, rope / 2]`.
    pub cos: u64,
    pub sin: u64,
    /// The buffers behind `meta`, `cos` and `sin` when the step owns them (a fixed step's live
    /// in the cache).
    _owned: Option<(CudaSlice<i32>, CudaSlice<f32>, CudaSlice<f32>)>,
    /// Whether the step lives in the cache's fixed buffers (so a graph may replay it).
    pub fixed: bool,
    pub interleaved: bool,
    pub indexer_interleaved: bool,
}

impl CudaStep {
    /// With `fixed`, a step of at most FIXED_ROWS rows and segments writes into the cache's
    /// fixed buffers, with the block table as wide as the pool, so every address and argument
    /// a kernel gets from it is the same from step to step.
    pub fn new(stream: &Arc<CudaStream>, batch: &Batch, rope: &RopeSpec, cache: &mut CudaCache, fixed: bool) -> Result<CudaStep> {
        for s in &batch.segments {
            cache.reserve(s.seq, s.start + s.len)?;
        }
        let positions = batch.positions();
        let t = positions.len();
        let fixed = fixed && t <= FIXED_ROWS && batch.segments.len() <= FIXED_ROWS;
        let max_blocks = if fixed {
            cache.blocks
        } else {
            batch.segments.iter().map(|s| cache.blocks_of(s.seq).len()).max().unwrap_or(0).max(1)
        };
        // One buffer: positions [T] | row → segment [T] | block table [segments, max_blocks].
        let mut meta: Vec<i32> = positions.iter().map(|&p| p as i32).collect();
        for (i, s) in batch.segments.iter().enumerate() {
            meta.extend(std::iter::repeat_n(i as i32, s.len));
        }
        for s in &batch.segments {
            let b = cache.blocks_of(s.seq);
            meta.extend(b);
            meta.extend(std::iter::repeat_n(0, max_blocks - b.len()));
        }
        let (cos, sin) = rope.angles(&positions);
        let (base, cos_at, sin_at, owned) = if fixed {
            let angles = FIXED_ROWS * rope.inv_freq.len().max(1);
            if cache.fixed.is_none() {
                cache.fixed = Some(FixedStep {
                    meta: stream.alloc_zeros::<i32>(2 * FIXED_ROWS + FIXED_ROWS * cache.blocks)?,
                    cos: stream.alloc_zeros::<f32>(angles)?,
                    sin: stream.alloc_zeros::<f32>(angles)?,
                });
            }
            let f = cache.fixed.as_mut().expect("made above");
            if cos.len() > f.cos.len() {
                bail!("rope angles of {} values exceed the fixed step's {}", cos.len(), f.cos.len());
            }
            stream.memcpy_htod(&meta, &mut f.meta)?;
            stream.memcpy_htod(&cos, &mut f.cos)?;
            stream.memcpy_htod(&sin, &mut f.sin)?;
            let at = (f.meta.device_ptr(stream).0, f.cos.device_ptr(stream).0, f.sin.device_ptr(stream).0);
            (at.0, at.1, at.2, None)
        } else {
            let (m, c, s) = (stream.clone_htod(&meta)?, stream.clone_htod(&cos)?, stream.clone_htod(&sin)?);
            let at = (m.device_ptr(stream).0, c.device_ptr(stream).0, s.device_ptr(stream).0);
            (at.0, at.1, at.2, Some((m, c, s)))
        };
        let meta = StepMeta { pos: base, row_seq: base + 4 * t as u64, blocks: base + 8 * t as u64, max_blocks: max_blocks as i32, _pad: 0 };
        Ok(CudaStep {
            batch: batch.clone(),
            positions,
            meta,
            cos: cos_at,
            sin: sin_at,
            _owned: owned,
            fixed,
            interleaved: rope.interleaved,
            indexer_interleaved: rope.indexer_interleaved,
        })
    }
}
