//! Links between pipeline ranks: one trait pair, two implementations.
//!
//! - [`shm`]: a single-producer/single-consumer ring of fixed slots in a memfd shared by the
//!   two processes (the fds cross a Unix socket with SCM_RIGHTS), woken by eventfds after a
//!   short spin. The default on one host.
//! - [`quic`]: frames on a QUIC stream (quinn + rustls, a pinned self-signed certificate), for
//!   ranks on different hosts. QUIC also carries the control plane in both cases.
//!
//! A link is one direction. Frames carry a step counter; a gap, a repeat, a corrupt header or a
//! payload that disagrees with its header is an error, never undefined behaviour. Waits end
//! early with an error when the link's [`Health`] says the peer is gone.

pub mod frame;
pub mod quic;
pub mod shm;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Result};

pub use frame::{Frame, FrameHeader, FrameKind};

/// Which data transport links use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TransportKind {
    Shm,
    Quic,
}

/// Liveness of a peer, shared by its links and the control plane: once dead, every wait on
/// the peer's links fails with the reason.
#[derive(Clone, Default)]
pub struct Health {
    dead: Arc<AtomicBool>,
    why: Arc<Mutex<String>>,
}

impl Health {
    pub fn kill(&self, why: impl Into<String>) {
        let mut w = self.why.lock().unwrap();
        if !self.dead.swap(true, Ordering::SeqCst) {
            *w = why.into();
        }
    }

    pub fn is_dead(&self) -> bool {
        self.dead.load(Ordering::SeqCst)
    }

    pub fn check(&self) -> Result<()> {
        if self.is_dead() {
            bail!("{}", self.why.lock().unwrap());
        }
        Ok(())
    }
}

pub trait FrameSender: Send {
    /// Sends one frame (its step is assigned here); blocks while the link is full.
    fn send(&mut self, header: &mut FrameHeader, payload: &[&[u8]]) -> Result<()>;
}

pub trait FrameReceiver: Send {
    /// Waits up to `timeout` for the next frame and hands it to `f` while its payload is still in
    /// the link's memory (zero-copy for shm). Returns false on timeout.
    fn recv_with(&mut self, timeout: Duration, f: &mut dyn FnMut(&FrameHeader, &[u8]) -> Result<()>) -> Result<bool>;
}

/// f32 values as their little-endian bytes (both supported targets are little-endian).
pub fn f32_bytes(v: &[f32]) -> &[u8] {
    #[cfg(target_endian = "big")]
    compile_error!("duet's wire format assumes a little-endian host");
    // Safety: f32 has no padding and any byte view of it is valid.
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
}

pub fn i32_bytes(v: &[i32]) -> &[u8] {
    // Safety: as above.
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
}

/// The payload's activations as f32, copied out of link memory.
pub fn payload_f32(payload: &[u8], n: usize) -> Result<Vec<f32>> {
    if payload.len() < n * 4 {
        bail!("payload of {} bytes holds fewer than {n} floats", payload.len());
    }
    Ok(payload[..n * 4].chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
}
