//! Device buffers made by the backend's operations, and how a CUDA graph keeps them.
//!
//! A buffer is a stream-ordered allocation on the main stream, freed when dropped; captured
//! into a graph, that allocation and free would become graph memory nodes. So (`graphs::record`;
//! `DUET_GRAPH_KEEP_BUFFERS=0` turns it off) buffers made during a capture come instead from a
//! stream that is never captured and are kept alive, dropped or not, until the graph is gone:
//! a memory node between two kernels stops the second from launching while the first
//! finishes (programmatic dependent launch needs a kernel-to-kernel edge; benches/pdl_probe.cu
//! measures both). The graph then holds every buffer of the step at its own address, with no
//! reuse inside it.

use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex};

use cudarc::driver::{sys, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DeviceSlice, SyncOnDrop};

/// The buffers of one captured graph. Dropping the last handle waits for the main stream (a
/// replay may still be reading them), then frees them.
#[derive(Clone)]
pub struct Keeper(Arc<Kept>);

struct Kept {
    main: Arc<CudaStream>,
    buffers: Mutex<Vec<Box<dyn Send>>>,
}

impl Keeper {
    pub fn new(main: &Arc<CudaStream>) -> Keeper {
        Keeper(Arc::new(Kept { main: main.clone(), buffers: Mutex::new(Vec::new()) }))
    }

    fn keep(&self, b: Box<dyn Send>) {
        self.0.buffers.lock().unwrap_or_else(|e| e.into_inner()).push(b);
    }
}

impl Drop for Kept {
    fn drop(&mut self) {
        if let Err(e) = self.main.synchronize() {
            tracing::warn!("freeing a CUDA graph's buffers: {e:?}");
        }
    }
}

/// A device buffer; dereferences to the `CudaSlice` it wraps.
pub struct DevBuf<T: 'static> {
    slice: std::mem::ManuallyDrop<CudaSlice<T>>,
    /// Set for a buffer made during a capture: it goes to the graph's keeper, not freed.
    keeper: Option<Keeper>,
}

impl<T: 'static> DevBuf<T> {
    pub fn new(slice: CudaSlice<T>, keeper: Option<Keeper>) -> DevBuf<T> {
        DevBuf { slice: std::mem::ManuallyDrop::new(slice), keeper }
    }

    /// Makes a buffer from outside a capture go to that capture's keeper when dropped: work
    /// being captured may read it, and a free inside a capture must name a graph allocation.
    pub fn keep_for(&mut self, k: &Keeper) {
        if self.keeper.is_none() {
            self.keeper = Some(k.clone());
        }
    }
}

/// A buffer made outside any capture (uploads).
impl<T: 'static> From<CudaSlice<T>> for DevBuf<T> {
    fn from(slice: CudaSlice<T>) -> DevBuf<T> {
        DevBuf::new(slice, None)
    }
}

impl<T: 'static> Deref for DevBuf<T> {
    type Target = CudaSlice<T>;
    fn deref(&self) -> &CudaSlice<T> {
        &self.slice
    }
}

impl<T: 'static> DerefMut for DevBuf<T> {
    fn deref_mut(&mut self) -> &mut CudaSlice<T> {
        &mut self.slice
    }
}

// cudarc's copies take their buffers through these traits.
impl<T: 'static> DeviceSlice<T> for DevBuf<T> {
    fn len(&self) -> usize {
        self.slice.len()
    }
    fn stream(&self) -> &Arc<CudaStream> {
        self.slice.stream()
    }
}

impl<T: 'static> DevicePtr<T> for DevBuf<T> {
    fn device_ptr<'a>(&'a self, stream: &'a CudaStream) -> (sys::CUdeviceptr, SyncOnDrop<'a>) {
        self.slice.device_ptr(stream)
    }
}

impl<T: 'static> DevicePtrMut<T> for DevBuf<T> {
    fn device_ptr_mut<'a>(&'a mut self, stream: &'a CudaStream) -> (sys::CUdeviceptr, SyncOnDrop<'a>) {
        self.slice.device_ptr_mut(stream)
    }
}

impl<T: 'static> Drop for DevBuf<T> {
    fn drop(&mut self) {
        // Safety: `slice` is taken once, here, and not touched again.
        let slice = unsafe { std::mem::ManuallyDrop::take(&mut self.slice) };
        match &self.keeper {
            Some(k) => k.keep(Box::new(slice)),
            None => drop(slice),
        }
    }
}
