//! QUIC between ranks (quinn + rustls with ring): the control plane always, and data links for
//! ranks on different hosts (`--transport quic`).
//!
//! Every rank runs one endpoint that both listens and connects. All ranks share one self-signed
//! certificate (rcgen), written by rank 0 into the run folder and pinned by everyone as the only
//! trusted root, so a stranger cannot join. The first stream of a connection says what it is
//! for (control or data) and which rank opened it. Keep-alives every 200 ms with a 1.5 s idle
//! timeout turn a dead or stopped peer into a closed connection well within 2 s.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::{mpsc, Mutex};

use super::frame::{Frame, FrameHeader};
use super::{FrameReceiver, FrameSender, Health};

const SERVER_NAME: &str = "duet";
/// Largest control message (JSON).
const MAX_CONTROL: usize = 1 << 20;
/// Largest data frame payload accepted from a peer.
const MAX_PAYLOAD: u64 = 1 << 31;

/// The certificate and key every rank shares.
pub struct Identity {
    pub cert: Vec<u8>,
    pub key: Vec<u8>,
}

impl Identity {
    /// Rank 0 writes a fresh identity into `dir`; other ranks wait for it (up to `timeout`).
    pub fn load_or_create(dir: &Path, create: bool, timeout: Duration) -> Result<Identity> {
        let (cp, kp) = (dir.join("cert.der"), dir.join("key.der"));
        if create {
            let ck = rcgen::generate_simple_self_signed(vec![SERVER_NAME.to_string(), "localhost".to_string()])
                .map_err(|e| anyhow!("cannot make a certificate: {e}"))?;
            let id = Identity { cert: ck.cert.der().to_vec(), key: ck.signing_key.serialize_der() };
            std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
            for (path, bytes) in [(&kp, &id.key), (&cp, &id.cert)] {
                let tmp = path.with_extension("tmp");
                std::fs::write(&tmp, bytes).with_context(|| format!("cannot write {}", tmp.display()))?;
                std::fs::rename(&tmp, path)?;
            }
            return Ok(id);
        }
        let deadline = Instant::now() + timeout;
        loop {
            if let (Ok(cert), Ok(key)) = (std::fs::read(&cp), std::fs::read(&kp)) {
                return Ok(Identity { cert, key });
            }
            if Instant::now() > deadline {
                bail!("no certificate from rank 0 in {} after {timeout:?}", dir.display());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn transport_config() -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(Duration::from_millis(200)));
    t.max_idle_timeout(Some(quinn::IdleTimeout::try_from(Duration::from_millis(1500)).unwrap()));
    t.stream_receive_window(quinn::VarInt::from_u32(64 << 20));
    t.receive_window(quinn::VarInt::from_u32(256 << 20));
    t.send_window(256 << 20);
    Arc::new(t)
}

/// What a connection's first stream announced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Purpose {
    Control,
    Data,
}

/// One bidirectional stream with its connection.
pub struct Stream {
    pub conn: quinn::Connection,
    pub send: quinn::SendStream,
    pub recv: quinn::RecvStream,
    pub from: u32,
}

impl Stream {
    pub async fn send_msg<T: Serialize>(&mut self, msg: &T) -> Result<()> {
        let bytes = serde_json::to_vec(msg)?;
        self.send.write_all(&(bytes.len() as u32).to_le_bytes()).await?;
        self.send.write_all(&bytes).await?;
        Ok(())
    }

    pub async fn recv_msg<T: DeserializeOwned>(&mut self) -> Result<T> {
        let mut len = [0u8; 4];
        self.recv.read_exact(&mut len).await.map_err(|e| anyhow!("control stream: {e}"))?;
        let len = u32::from_le_bytes(len) as usize;
        if len > MAX_CONTROL {
            bail!("control message of {len} bytes refused");
        }
        let mut buf = vec![0u8; len];
        self.recv.read_exact(&mut buf).await.map_err(|e| anyhow!("control stream: {e}"))?;
        serde_json::from_slice(&buf).map_err(|e| anyhow!("malformed control message: {e}"))
    }
}

/// A rank's QUIC endpoint.
pub struct Node {
    pub endpoint: quinn::Endpoint,
    pub rt: tokio::runtime::Handle,
    pub rank: u32,
    control_rx: Mutex<mpsc::Receiver<Stream>>,
    data_rx: Mutex<mpsc::Receiver<Stream>>,
}

impl Node {
    /// Binds `addr` and starts accepting connections (on `rt`).
    pub fn bind(rt: &tokio::runtime::Handle, addr: SocketAddr, id: &Identity, rank: u32) -> Result<Arc<Node>> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let cert = rustls::pki_types::CertificateDer::from(id.cert.clone());
        let key = rustls::pki_types::PrivateKeyDer::try_from(id.key.clone()).map_err(|e| anyhow!("bad private key: {e}"))?;
        let mut server = quinn::ServerConfig::with_single_cert(vec![cert.clone()], key).map_err(|e| anyhow!("TLS server config: {e}"))?;
        server.transport_config(transport_config());
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert).map_err(|e| anyhow!("pinning the certificate: {e}"))?;
        let mut client = quinn::ClientConfig::with_root_certificates(Arc::new(roots)).map_err(|e| anyhow!("TLS client config: {e}"))?;
        client.transport_config(transport_config());
        let endpoint = {
            let _guard = rt.enter();
            let mut e = quinn::Endpoint::server(server, addr).with_context(|| format!("cannot bind QUIC on {addr}"))?;
            e.set_default_client_config(client);
            e
        };
        let (ctl_tx, ctl_rx) = mpsc::channel(16);
        let (data_tx, data_rx) = mpsc::channel(16);
        let ep = endpoint.clone();
        rt.spawn(async move {
            while let Some(incoming) = ep.accept().await {
                let (ctl_tx, data_tx) = (ctl_tx.clone(), data_tx.clone());
                tokio::spawn(async move {
                    let Ok(conn) = incoming.await else { return };
                    let Ok((send, mut recv)) = conn.accept_bi().await else { return };
                    let mut tag = [0u8; 5];
                    if recv.read_exact(&mut tag).await.is_err() {
                        return;
                    }
                    let from = u32::from_le_bytes([tag[1], tag[2], tag[3], tag[4]]);
                    let s = Stream { conn, send, recv, from };
                    let _ = match tag[0] {
                        b'C' => ctl_tx.send(s).await,
                        b'D' => data_tx.send(s).await,
                        _ => Ok(()),
                    };
                });
            }
        });
        Ok(Arc::new(Node { endpoint, rt: rt.clone(), rank, control_rx: Mutex::new(ctl_rx), data_rx: Mutex::new(data_rx) }))
    }

    /// Opens a stream to `addr` for `purpose`, retrying until `timeout`.
    pub async fn connect(&self, addr: SocketAddr, purpose: Purpose, timeout: Duration) -> Result<Stream> {
        let deadline = Instant::now() + timeout;
        let conn = loop {
            match self.endpoint.connect(addr, SERVER_NAME)?.await {
                Ok(c) => break c,
                Err(e) => {
                    if Instant::now() > deadline {
                        bail!("cannot reach {addr} over QUIC: {e}");
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        };
        let (mut send, recv) = conn.open_bi().await.map_err(|e| anyhow!("opening a stream to {addr}: {e}"))?;
        let mut tag = vec![if purpose == Purpose::Control { b'C' } else { b'D' }];
        tag.extend_from_slice(&self.rank.to_le_bytes());
        send.write_all(&tag).await?;
        Ok(Stream { conn, send, recv, from: self.rank })
    }

    /// The next incoming stream for `purpose` (None on timeout).
    pub async fn accept(&self, purpose: Purpose, timeout: Duration) -> Option<Stream> {
        let rx = match purpose {
            Purpose::Control => &self.control_rx,
            Purpose::Data => &self.data_rx,
        };
        tokio::time::timeout(timeout, async { rx.lock().await.recv().await }).await.ok().flatten()
    }

    /// Marks `health` dead when `conn` closes (peer gone, stopped or idle too long).
    pub fn watch(&self, conn: &quinn::Connection, health: Health, peer: String) {
        let conn = conn.clone();
        self.rt.spawn(async move {
            let reason = conn.closed().await;
            health.kill(format!("{peer} is unreachable ({reason})"));
        });
    }
}

/// Data link, producer end: frames on a QUIC stream.
pub struct QuicSender {
    rt: tokio::runtime::Handle,
    send: quinn::SendStream,
    step: u64,
    health: Health,
    peer: String,
}

impl QuicSender {
    pub fn new(node: &Node, stream: Stream, health: Health, peer: &str) -> QuicSender {
        node.watch(&stream.conn, health.clone(), peer.to_string());
        // The receive half is unused: dropping it would reset the peer's sending side only.
        std::mem::forget(stream.recv);
        QuicSender { rt: node.rt.clone(), send: stream.send, step: 0, health, peer: peer.to_string() }
    }
}

impl FrameSender for QuicSender {
    fn send(&mut self, header: &mut FrameHeader, payload: &[&[u8]]) -> Result<()> {
        self.health.check()?;
        header.step = self.step;
        header.payload_len = payload.iter().map(|p| p.len() as u64).sum();
        let bytes = header.encode()?;
        let send = &mut self.send;
        self.rt
            .block_on(async {
                send.write_all(&(bytes.len() as u32).to_le_bytes()).await?;
                send.write_all(&header.payload_len.to_le_bytes()).await?;
                send.write_all(&bytes).await?;
                for p in payload {
                    send.write_all(p).await?;
                }
                Ok::<_, quinn::WriteError>(())
            })
            .map_err(|e| anyhow!("sending to {}: {e}", self.peer))?;
        self.step += 1;
        Ok(())
    }
}

impl Drop for QuicSender {
    fn drop(&mut self) {
        // Let frames already written reach the peer before the stream goes away.
        let _ = self.send.finish();
        let send = &mut self.send;
        let _ = self.rt.block_on(async { tokio::time::timeout(Duration::from_millis(500), send.stopped()).await });
    }
}

/// Data link, consumer end: a task reads frames into a bounded queue.
pub struct QuicReceiver {
    rt: tokio::runtime::Handle,
    rx: mpsc::Receiver<Result<Frame>>,
    expect_step: u64,
    health: Health,
    peer: String,
}

impl QuicReceiver {
    pub fn new(node: &Node, stream: Stream, health: Health, peer: &str) -> QuicReceiver {
        node.watch(&stream.conn, health.clone(), peer.to_string());
        let (tx, rx) = mpsc::channel(4);
        let mut recv = stream.recv;
        let keep = (stream.conn, stream.send);
        let who = peer.to_string();
        node.rt.spawn(async move {
            let _keep = keep;
            loop {
                let r = read_frame(&mut recv).await.with_context(|| format!("frame from {who}"));
                let stop = r.is_err();
                if tx.send(r).await.is_err() || stop {
                    break;
                }
            }
        });
        QuicReceiver { rt: node.rt.clone(), rx, expect_step: 0, health, peer: peer.to_string() }
    }
}

async fn read_frame(recv: &mut quinn::RecvStream) -> Result<Frame> {
    let mut pre = [0u8; 12];
    recv.read_exact(&mut pre).await.map_err(|e| anyhow!("{e}"))?;
    let hlen = u32::from_le_bytes(pre[..4].try_into().unwrap()) as usize;
    let plen = u64::from_le_bytes(pre[4..].try_into().unwrap());
    if hlen > super::frame::HEADER_AREA || plen > MAX_PAYLOAD {
        bail!("corrupt frame: header {hlen} bytes, payload {plen} bytes");
    }
    let mut hbuf = rkyv::util::AlignedVec::<16>::with_capacity(hlen);
    hbuf.resize(hlen, 0);
    recv.read_exact(&mut hbuf).await.map_err(|e| anyhow!("truncated frame header: {e}"))?;
    let header = FrameHeader::decode(&hbuf)?;
    if header.payload_len != plen {
        bail!("corrupt frame: header says {} payload bytes, prefix says {plen}", header.payload_len);
    }
    let mut payload = vec![0u8; plen as usize];
    recv.read_exact(&mut payload).await.map_err(|e| anyhow!("truncated frame payload: {e}"))?;
    Ok(Frame { header, payload })
}

impl FrameReceiver for QuicReceiver {
    fn recv_with(&mut self, timeout: Duration, f: &mut dyn FnMut(&FrameHeader, &[u8]) -> Result<()>) -> Result<bool> {
        let deadline = Instant::now() + timeout;
        let frame = loop {
            // A frame already queued is taken without entering the runtime.
            let next = match self.rx.try_recv() {
                Ok(r) => Some(Some(r)),
                Err(mpsc::error::TryRecvError::Disconnected) => Some(None),
                Err(mpsc::error::TryRecvError::Empty) => {
                    let left = deadline.saturating_duration_since(Instant::now()).min(Duration::from_millis(100));
                    let rx = &mut self.rx;
                    self.rt.block_on(async { tokio::time::timeout(left, rx.recv()).await.ok() })
                }
            };
            match next {
                Some(Some(r)) => break r?,
                Some(None) => bail!("{} closed the link", self.peer),
                None => {
                    self.health.check()?;
                    if Instant::now() >= deadline {
                        return Ok(false);
                    }
                }
            }
        };
        frame.header.validate(self.expect_step, None).with_context(|| format!("frame from {}", self.peer))?;
        self.expect_step += 1;
        f(&frame.header, &frame.payload)?;
        Ok(true)
    }
}
