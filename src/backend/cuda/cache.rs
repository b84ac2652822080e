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
}

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
        Ok(CudaCache { spec: spec.clone(), mla, index, free: (0..blocks as i32).rev().collect(), seqs: HashMap::new() })
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
    _meta_buf: CudaSlice<i32>,
    pub cos: CudaSlice<f32>,
    pub sin: CudaSlice<f32>,
    pub interleaved: bool,
    pub indexer_interleaved: bool,
}

impl CudaStep {
    pub fn new(stream: &Arc<CudaStream>, batch: &Batch, rope: &RopeSpec, cache: &mut CudaCache) -> Result<CudaStep> {
        for s in &batch.segments {
            cache.reserve(s.seq, s.start + s.len)?;
        }
        let positions = batch.positions();
        let t = positions.len();
        let max_blocks = batch.segments.iter().map(|s| cache.blocks_of(s.seq).len()).max().unwrap_or(0).max(1);
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
        let buf = stream.clone_htod(&meta)?;
        let base = buf.device_ptr(stream).0;
        let meta = StepMeta { pos: base, row_seq: base + 4 * t as u64, blocks: base + 8 * t as u64, max_blocks: max_blocks as i32, _pad: 0 };
        let (cos, sin) = rope.angles(&positions);
        Ok(CudaStep {
            batch: batch.clone(),
            positions,
            meta,
            _meta_buf: buf,
            cos: stream.clone_htod(&cos)?,
            sin: stream.clone_htod(&sin)?,
            interleaved: rope.interleaved,
            indexer_interleaved: rope.indexer_interleaved,
        })
    }
}
