//! Shared-memory link: a ring of fixed slots in a memfd mapped by both processes.
//!
//! The consumer creates the region (so it can bind the pages to its own NUMA node), two
//! eventfds ("data ready" and "space free"), and hands the three fds to the producer over a
//! Unix socket with SCM_RIGHTS. That socket stays open for the link's lifetime: when either
//! process dies the other sees it hang up at once.
//!
//! Layout: a 4 KiB control page (magic, geometry, head and tail counters on their own cache
//! lines, sleep flags), then `slots` slots of `slot_bytes`: the header length and payload length,
//! the rkyv header (16-byte aligned) and, at [`HEADER_AREA`], the payload (256-byte aligned,
//! page-aligned slots), so the region can be registered with CUDA for direct DMA.
//!
//! Waiting: spin briefly on the head/tail counters, then announce sleep and block in poll on
//! the eventfd and the socket; the other side writes the eventfd only when a sleeper is flagged.

use std::num::NonZeroUsize;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::ptr::NonNull;
use std::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::sys::mman::{mmap, munmap, MapFlags, ProtFlags};
use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};

use super::frame::{FrameHeader, HEADER_AREA};
use super::{FrameReceiver, FrameSender, Health};

const MAGIC: u64 = 0x6475_6574_5249_4e47; // "duetRING"
const VERSION: u32 = 1;
const CONTROL: usize = 4096;
/// Offset of the header inside a slot (after the two length words).
const HEADER_OFFSET: usize = 64;

#[repr(C)]
struct Control {
    magic: u64,
    version: u32,
    slots: u32,
    slot_bytes: u64,
    _pad0: [u8; 40],
    head: AtomicU64,
    _pad1: [u8; 56],
    tail: AtomicU64,
    _pad2: [u8; 56],
    consumer_sleeping: AtomicU32,
    producer_sleeping: AtomicU32,
    _pad3: [u8; 56],
}

/// Ring geometry.
#[derive(Clone, Copy, Debug)]
pub struct RingSpec {
    pub slots: u32,
    /// Largest payload one frame may carry.
    pub max_payload: usize,
    /// Spin this long before sleeping in poll.
    pub spin: Duration,
}

impl RingSpec {
    fn slot_bytes(&self) -> usize {
        (HEADER_AREA + self.max_payload).div_ceil(4096) * 4096
    }
}

/// The mapped region (unmapped on drop).
struct Region {
    base: NonNull<u8>,
    len: usize,
}

unsafe impl Send for Region {}

impl Region {
    fn map(fd: &OwnedFd, len: usize) -> Result<Region> {
        let ptr = unsafe {
            mmap(None, NonZeroUsize::new(len).context("empty ring")?, ProtFlags::PROT_READ | ProtFlags::PROT_WRITE, MapFlags::MAP_SHARED, fd, 0)
        }
        .map_err(|e| anyhow!("mmap of the shared ring failed: {e}"))?;
        Ok(Region { base: ptr.cast(), len })
    }

    fn control(&self) -> &Control {
        // Safety: the first page holds the control block, written before the fds are shared.
        unsafe { &*(self.base.as_ptr() as *const Control) }
    }

    fn slot(&self, spec_slot_bytes: usize, i: usize) -> *mut u8 {
        unsafe { self.base.as_ptr().add(CONTROL + i * spec_slot_bytes) }
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        let _ = unsafe { munmap(self.base.cast(), self.len) };
    }
}

/// Binds the pages of a region to a NUMA node (best effort: a warning when the kernel refuses).
fn bind_to_node(region: &Region, node: Option<usize>) {
    let Some(node) = node else { return };
    if let Err(e) = crate::numa::set_memory_policy(node, Some((region.base.as_ptr(), region.len))) {
        tracing::warn!("mbind of the shared ring to NUMA node {node} failed: {e}");
    }
}

fn wait_fd(fds: &[(&dyn AsFd, PollFlags)], timeout: Duration) -> Result<Vec<PollFlags>> {
    let mut pfds: Vec<PollFd> = fds.iter().map(|(fd, ev)| PollFd::new(fd.as_fd(), *ev)).collect();
    let ms = timeout.as_millis().min(10_000) as i32;
    match poll(&mut pfds, PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX)) {
        Ok(_) | Err(nix::errno::Errno::EINTR) => {}
        Err(e) => bail!("poll: {e}"),
    }
    Ok(pfds.iter().map(|p| p.revents().unwrap_or(PollFlags::empty())).collect())
}

/// Whether the peer hung up the link socket.
fn peer_gone(flags: PollFlags, sock: &UnixStream) -> bool {
    if flags.intersects(PollFlags::POLLHUP | PollFlags::POLLERR) {
        return true;
    }
    if flags.contains(PollFlags::POLLIN) {
        let mut b = [0u8; 16];
        // The socket carries no data after setup: readable means EOF.
        return matches!(nix::sys::socket::recv(sock.as_raw_fd(), &mut b, MsgFlags::MSG_DONTWAIT), Ok(0));
    }
    false
}

fn drain(efd: &EventFd) {
    let mut b = [0u8; 8];
    let _ = nix::unistd::read(efd, &mut b);
}

/// Which end of the ring is waiting: the producer waits for space, the consumer for data.
#[derive(Clone, Copy)]
enum End {
    Producer,
    Consumer,
}

/// What both ends hold: the mapped ring, its geometry, the two eventfds and the link socket.
struct Ring {
    region: Region,
    slot_bytes: usize,
    slots: usize,
    /// Written by the producer when a sleeping consumer must wake.
    data: EventFd,
    /// Written by the consumer when a sleeping producer must wake.
    space: EventFd,
    sock: UnixStream,
    spin: Duration,
    health: Health,
    peer: String,
}

impl Ring {
    /// The eventfd an end sleeps on.
    fn doorbell(&self, end: End) -> &EventFd {
        match end {
            End::Producer => &self.space,
            End::Consumer => &self.data,
        }
    }

    fn sleeping(&self, end: End) -> &AtomicU32 {
        let c = self.region.control();
        match end {
            End::Producer => &c.producer_sleeping,
            End::Consumer => &c.consumer_sleeping,
        }
    }

    /// Waits until `ready` holds: spins for the spin budget, then announces sleep and blocks in
    /// poll on this end's eventfd and the link socket. Returns false when `timeout` passes
    /// first, and an error when the peer hangs up or the rank is stopping.
    fn wait(&self, end: End, timeout: Duration, ready: impl Fn(&Control) -> bool) -> Result<bool> {
        let c = self.region.control();
        let efd = self.doorbell(end);
        let sleeping = self.sleeping(end);
        let start = Instant::now();
        loop {
            if ready(c) {
                return Ok(true);
            }
            let waited = start.elapsed();
            if waited < self.spin.min(timeout) {
                std::hint::spin_loop();
                continue;
            }
            if waited >= timeout {
                self.health.check()?;
                return Ok(false);
            }
            sleeping.store(1, Ordering::SeqCst);
            if ready(c) {
                sleeping.store(0, Ordering::SeqCst);
                return Ok(true);
            }
            let ev = wait_fd(&[(efd, PollFlags::POLLIN), (&self.sock, PollFlags::POLLIN)], (timeout - waited).min(Duration::from_millis(100)))?;
            sleeping.store(0, Ordering::SeqCst);
            drain(efd);
            if ready(c) {
                return Ok(true);
            }
            if peer_gone(ev[1], &self.sock) {
                bail!("{} closed the link", self.peer);
            }
            self.health.check()?;
        }
    }

    /// Wakes the other end if it announced sleep (after this end moved its counter).
    fn wake(&self, other: End) {
        fence(Ordering::SeqCst);
        if self.sleeping(other).load(Ordering::SeqCst) != 0 {
            let _ = self.doorbell(other).write(1);
        }
    }

    fn slot(&self, counter: u64) -> *mut u8 {
        self.region.slot(self.slot_bytes, (counter % self.slots as u64) as usize)
    }
}

/// The consumer end.
pub struct ShmReceiver {
    ring: Ring,
    expect_step: u64,
}

/// The producer end.
pub struct ShmSender {
    ring: Ring,
    step: u64,
    max_payload: usize,
}

impl ShmReceiver {
    /// Creates the ring, listens on `path` and hands the ring to the producer that connects
    /// (waiting up to `timeout`).
    pub fn create(path: &Path, spec: RingSpec, numa_node: Option<usize>, health: Health, peer: &str, timeout: Duration) -> Result<ShmReceiver> {
        let slot_bytes = spec.slot_bytes();
        let len = CONTROL + slot_bytes * spec.slots as usize;
        let fd = nix::sys::memfd::memfd_create(c"duet-ring", nix::sys::memfd::MFdFlags::MFD_CLOEXEC).map_err(|e| anyhow!("memfd_create: {e}"))?;
        nix::unistd::ftruncate(&fd, len as i64).map_err(|e| anyhow!("sizing the shared ring to {len} bytes: {e}"))?;
        let region = Region::map(&fd, len)?;
        bind_to_node(&region, numa_node);
        unsafe {
            let c = region.base.as_ptr() as *mut Control;
            std::ptr::write_bytes(c as *mut u8, 0, CONTROL);
            (*c).magic = MAGIC;
            (*c).version = VERSION;
            (*c).slots = spec.slots;
            (*c).slot_bytes = slot_bytes as u64;
        }
        let data = EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK).map_err(|e| anyhow!("eventfd: {e}"))?;
        let space = EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK).map_err(|e| anyhow!("eventfd: {e}"))?;
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path).with_context(|| format!("cannot listen on {}", path.display()))?;
        listener.set_nonblocking(true)?;
        let deadline = Instant::now() + timeout;
        let sock = loop {
            match listener.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    health.check()?;
                    if Instant::now() > deadline {
                        bail!("{peer} did not connect to {} within {timeout:?}", path.display());
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => bail!("accept on {}: {e}", path.display()),
            }
        };
        sock.set_nonblocking(false)?;
        let fds = [fd.as_raw_fd(), data.as_raw_fd(), space.as_raw_fd()];
        let hello = MAGIC.to_le_bytes();
        sendmsg::<()>(sock.as_raw_fd(), &[std::io::IoSlice::new(&hello)], &[ControlMessage::ScmRights(&fds)], MsgFlags::empty(), None)
            .map_err(|e| anyhow!("passing the ring to {peer}: {e}"))?;
        let _ = std::fs::remove_file(path);
        let ring = Ring { region, slot_bytes, slots: spec.slots as usize, data, space, sock, spin: spec.spin, health, peer: peer.to_string() };
        Ok(ShmReceiver { ring, expect_step: 0 })
    }
}

impl ShmSender {
    /// Connects to a consumer listening on `path` (retrying until `timeout`) and maps its ring.
    pub fn connect(path: &Path, spin: Duration, health: Health, peer: &str, timeout: Duration) -> Result<ShmSender> {
        let deadline = Instant::now() + timeout;
        let sock = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) => {
                    health.check()?;
                    if Instant::now() > deadline {
                        bail!("cannot reach {peer} at {}: {e}", path.display());
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        };
        let mut hello = [0u8; 8];
        let mut cmsg = nix::cmsg_space!([RawFd; 3]);
        let fds: Vec<RawFd> = {
            let mut iov = [std::io::IoSliceMut::new(&mut hello)];
            let msg = recvmsg::<()>(sock.as_raw_fd(), &mut iov, Some(&mut cmsg), MsgFlags::empty()).map_err(|e| anyhow!("receiving the ring from {peer}: {e}"))?;
            let mut fds = vec![];
            for c in msg.cmsgs().map_err(|e| anyhow!("{e}"))? {
                if let ControlMessageOwned::ScmRights(f) = c {
                    fds.extend(f);
                }
            }
            fds
        };
        if u64::from_le_bytes(hello) != MAGIC || fds.len() != 3 {
            bail!("{peer} sent a malformed ring handshake ({} fds)", fds.len());
        }
        // Safety: the fds were just received and are owned by no one else in this process.
        let (fd, data, space) = unsafe { (OwnedFd::from_raw_fd(fds[0]), EventFd::from_owned_fd(OwnedFd::from_raw_fd(fds[1])), EventFd::from_owned_fd(OwnedFd::from_raw_fd(fds[2]))) };
        let len = nix::sys::stat::fstat(&fd).map_err(|e| anyhow!("fstat of the ring: {e}"))?.st_size as usize;
        if len < CONTROL {
            bail!("the ring from {peer} is only {len} bytes");
        }
        let region = Region::map(&fd, len)?;
        let (slots, slot_bytes) = {
            let c = region.control();
            if c.magic != MAGIC || c.version != VERSION {
                bail!("the ring from {peer} has magic {:#x} version {}, expected {MAGIC:#x} version {VERSION}", c.magic, c.version);
            }
            (c.slots as usize, c.slot_bytes as usize)
        };
        if slots == 0 || slot_bytes <= HEADER_AREA || CONTROL + slots * slot_bytes > len {
            bail!("the ring from {peer} has an inconsistent geometry: {slots} slots of {slot_bytes} bytes in {len}");
        }
        let ring = Ring { region, slot_bytes, slots, data, space, sock, spin, health, peer: peer.to_string() };
        Ok(ShmSender { ring, step: 0, max_payload: slot_bytes - HEADER_AREA })
    }
}

impl FrameSender for ShmSender {
    fn send(&mut self, header: &mut FrameHeader, payload: &[&[u8]]) -> Result<()> {
        header.step = self.step;
        let total: usize = payload.iter().map(|p| p.len()).sum();
        header.payload_len = total as u64;
        if total > self.max_payload {
            bail!("frame of {total} bytes exceeds the ring's {}-byte slots", self.max_payload);
        }
        let bytes = header.encode()?;
        if bytes.len() > HEADER_AREA - HEADER_OFFSET {
            bail!("frame header of {} bytes exceeds the {}-byte header area", bytes.len(), HEADER_AREA - HEADER_OFFSET);
        }
        let ring = &self.ring;
        let c = ring.region.control();
        let slots = ring.slots as u64;
        ring.wait(End::Producer, Duration::MAX, |c| c.head.load(Ordering::Relaxed) - c.tail.load(Ordering::Acquire) < slots)?;
        let head = c.head.load(Ordering::Relaxed);
        let slot = ring.slot(head);
        // Safety: the slot is ours until head advances; bounds were checked above.
        unsafe {
            (slot as *mut u64).write(bytes.len() as u64);
            (slot.add(8) as *mut u64).write(total as u64);
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), slot.add(HEADER_OFFSET), bytes.len());
            let mut off = HEADER_AREA;
            for p in payload {
                std::ptr::copy_nonoverlapping(p.as_ptr(), slot.add(off), p.len());
                off += p.len();
            }
        }
        c.head.store(head + 1, Ordering::Release);
        ring.wake(End::Consumer);
        self.step += 1;
        Ok(())
    }
}

impl FrameReceiver for ShmReceiver {
    fn recv_with(&mut self, timeout: Duration, f: &mut dyn FnMut(&FrameHeader, &[u8]) -> Result<()>) -> Result<bool> {
        let ring = &self.ring;
        let c = ring.region.control();
        let tail = c.tail.load(Ordering::Relaxed);
        if !ring.wait(End::Consumer, timeout, |c| c.head.load(Ordering::Acquire) != tail)? {
            return Ok(false);
        }
        let slot = ring.slot(tail);
        // Safety: the slot is ours until tail advances; lengths are checked before use.
        let (hlen, plen) = unsafe { ((slot as *const u64).read() as usize, (slot.add(8) as *const u64).read() as usize) };
        if hlen > HEADER_AREA - HEADER_OFFSET || plen > ring.slot_bytes - HEADER_AREA {
            bail!("corrupt frame from {}: header {hlen} bytes, payload {plen} bytes", ring.peer);
        }
        let hbytes = unsafe { std::slice::from_raw_parts(slot.add(HEADER_OFFSET), hlen) };
        let header = FrameHeader::decode(hbytes).with_context(|| format!("frame from {}", ring.peer))?;
        if header.payload_len != plen as u64 {
            bail!("corrupt frame from {}: header says {} payload bytes, slot holds {plen}", ring.peer, header.payload_len);
        }
        header.validate(self.expect_step, None).with_context(|| format!("frame from {}", ring.peer))?;
        let payload = unsafe { std::slice::from_raw_parts(slot.add(HEADER_AREA), plen) };
        let r = f(&header, payload);
        c.tail.store(tail + 1, Ordering::Release);
        ring.wake(End::Producer);
        self.expect_step += 1;
        r.map(|_| true)
    }
}
