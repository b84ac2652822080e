//! Transport benchmark: one-way latency of 12 KiB and 24 KiB frames (a decode step's hidden
//! state, without and with the residual) as half the round trip of a ping-pong between two
//! processes, and the throughput of 48 MiB frames (a prefill chunk), for the shared-memory ring
//! and QUIC on loopback.
//!
//!     cargo bench --bench transport
//!
//! The benchmark starts a copy of itself as the peer process.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use duet::transport::frame::{FrameHeader, FrameKind};
use duet::transport::quic::{Identity, Node, Purpose, QuicReceiver, QuicSender};
use duet::transport::shm::{RingSpec, ShmReceiver, ShmSender};
use duet::transport::{FrameReceiver, FrameSender, Health};

const SIZES: [usize; 2] = [12 * 1024, 24 * 1024];
const BIG: usize = 48 << 20;
const ROUND_TRIPS: usize = 20_000;
const WARMUP: usize = 2_000;
const BIG_FRAMES: usize = 40;

type Links = (Box<dyn FrameSender>, Box<dyn FrameReceiver>);

fn spec() -> RingSpec {
    RingSpec { slots: 4, max_payload: BIG, spin: Duration::from_micros(200) }
}

fn shm_links(dir: &std::path::Path, me: &str, peer: &str) -> Links {
    let (inp, out) = (dir.join(format!("{peer}-to-{me}.sock")), dir.join(format!("{me}-to-{peer}.sock")));
    let consumer = std::thread::spawn(move || ShmReceiver::create(&inp, spec(), None, Health::default(), "peer", Duration::from_secs(30)).unwrap());
    let sender = ShmSender::connect(&out, spec().spin, Health::default(), "peer", Duration::from_secs(30)).unwrap();
    (Box::new(sender), Box::new(consumer.join().unwrap()))
}

fn quic_links(rt: &tokio::runtime::Runtime, dir: &std::path::Path, me: u32, ports: [u16; 2]) -> (Arc<Node>, Links) {
    let id = Identity::load_or_create(dir, me == 0, Duration::from_secs(30)).unwrap();
    let node = Node::bind(rt.handle(), format!("127.0.0.1:{}", ports[me as usize]).parse().unwrap(), &id, me).unwrap();
    let peer_addr = format!("127.0.0.1:{}", ports[1 - me as usize]).parse().unwrap();
    let n = node.clone();
    let (out, inc) = rt.block_on(async {
        let out = n.connect(peer_addr, Purpose::Data, Duration::from_secs(30));
        let inc = n.accept(Purpose::Data, Duration::from_secs(30));
        let (o, i) = tokio::join!(out, inc);
        (o.unwrap(), i.unwrap())
    });
    let s: Box<dyn FrameSender> = Box::new(QuicSender::new(&node, out, Health::default(), "peer"));
    let r: Box<dyn FrameReceiver> = Box::new(QuicReceiver::new(&node, inc, Health::default(), "peer"));
    (node, (s, r))
}

fn header(bytes: usize) -> FrameHeader {
    let mut h = FrameHeader::new(FrameKind::Bench);
    h.rows = 1;
    h.cols = (bytes / 4) as u32;
    h
}

/// The peer: echoes every small frame, and acknowledges big ones with a small frame.
fn echo(links: &mut Links) {
    let (tx, rx) = links;
    let ack = vec![0u8; 16];
    loop {
        let mut reply: Option<Vec<u8>> = None;
        let mut stop = false;
        let got = rx
            .recv_with(Duration::from_secs(60), &mut |h, p| {
                match h.kind {
                    FrameKind::Shutdown => stop = true,
                    _ if p.len() >= BIG => reply = Some(ack.clone()),
                    _ => reply = Some(p.to_vec()),
                }
                Ok(())
            })
            .unwrap();
        if stop || !got {
            return;
        }
        if let Some(r) = reply {
            tx.send(&mut header(r.len()), &[&r]).unwrap();
        }
    }
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p) as usize]
}

fn measure(name: &str, links: &mut Links) {
    let (tx, rx) = links;
    for size in SIZES {
        let payload = vec![7u8; size];
        let mut times = Vec::with_capacity(ROUND_TRIPS);
        for i in 0..WARMUP + ROUND_TRIPS {
            let t0 = Instant::now();
            tx.send(&mut header(size), &[&payload]).unwrap();
            let mut n = 0;
            assert!(rx.recv_with(Duration::from_secs(10), &mut |_, p| {
                n = p.len();
                Ok(())
            })
            .unwrap());
            assert_eq!(n, size);
            if i >= WARMUP {
                times.push(t0.elapsed().as_secs_f64() * 1e6 / 2.0);
            }
        }
        let (p50, p99) = (percentile(&mut times, 0.5), percentile(&mut times, 0.99));
        println!("{name:<5} one-way latency {:>3} KiB frames: p50 {p50:>7.2} µs  p99 {p99:>7.2} µs  ({ROUND_TRIPS} round trips / 2)", size / 1024);
    }
    let payload = vec![1u8; BIG];
    let t0 = Instant::now();
    for _ in 0..BIG_FRAMES {
        tx.send(&mut header(BIG), &[&payload]).unwrap();
        assert!(rx.recv_with(Duration::from_secs(30), &mut |_, _| Ok(())).unwrap());
    }
    let secs = t0.elapsed().as_secs_f64();
    println!("{name:<5} throughput 48 MiB frames: {:>6.2} GB/s  ({BIG_FRAMES} frames, each acknowledged, {:.2} ms per frame)", (BIG * BIG_FRAMES) as f64 / secs / 1e9, secs * 1e3 / BIG_FRAMES as f64);
    tx.send(&mut FrameHeader::new(FrameKind::Shutdown), &[]).unwrap();
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--list") {
        return; // `cargo test --benches` probes benchmarks this way.
    }
    if let Ok(role) = std::env::var("DUET_BENCH_PEER") {
        let dir = PathBuf::from(std::env::var("DUET_BENCH_DIR").unwrap());
        if role == "shm" {
            echo(&mut shm_links(&dir, "b", "a"));
        } else {
            let ports: Vec<u16> = std::env::var("DUET_BENCH_PORTS").unwrap().split(',').map(|p| p.parse().unwrap()).collect();
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
            let (_node, mut links) = quic_links(&rt, &dir, 1, [ports[0], ports[1]]);
            echo(&mut links);
        }
        return;
    }
    let exe = std::env::current_exe().unwrap();
    for transport in ["shm", "quic"] {
        let dir = std::env::temp_dir().join(format!("duet-bench-{}-{transport}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ports = [duet::coordinator::free_ports("127.0.0.1", 2).unwrap(); 2];
        let ports = [ports[0], ports[1] + 1];
        let mut child = std::process::Command::new(&exe)
            .env("DUET_BENCH_PEER", transport)
            .env("DUET_BENCH_DIR", &dir)
            .env("DUET_BENCH_PORTS", format!("{},{}", ports[0], ports[1]))
            .spawn()
            .unwrap();
        if transport == "shm" {
            measure("shm", &mut shm_links(&dir, "a", "b"));
        } else {
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
            let (_node, mut links) = quic_links(&rt, &dir, 0, ports);
            measure("quic", &mut links);
        }
        let _ = child.wait();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
