//! Ranks as real processes over real links: any split, transport or world size gives the
//! greedy tokens of one process; a trace of two sequences shows both ranks busy at once; a
//! killed or stopped rank is reported within 2 s, in-flight requests fail, rank 0 stays up and
//! recovers; mismatched ranks are refused at the handshake.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::common::*;

fn greedy(model: &str, prompt: &str, n: usize, extra: &[&str]) -> Vec<u64> {
    let n = n.to_string();
    let mut args = vec!["generate", "--model", model, "--prompt-ids", prompt, "--max-new-tokens", &n, "--temperature", "0", "--ignore-eos", "--json"];
    args.extend_from_slice(extra);
    last_json(&duet_ok(&args))["token_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect()
}

/// A prompt longer than the fixture's index_topk (8), so DSA selections cross rank boundaries.
fn long_prompt() -> String {
    (0..14).map(|i| ((i * 37 + 5) % 250).to_string()).collect::<Vec<_>>().join(",")
}

#[test]
fn any_split_matches_one_process() {
    let fx = fixture("int4-fp8mtp");
    let model = fx.to_str().unwrap();
    let prompt = long_prompt();
    let one = greedy(model, &prompt, 24, &[]);
    // Layers are full, full, shared, full, shared: split 2,4 makes ranks 1 and 2 start with a
    // shared-indexer layer, so the selection itself crosses both links.
    for extra in [
        vec!["--ranks", "2", "--transport", "shm"],
        vec!["--ranks", "2", "--transport", "quic"],
        vec!["--ranks", "3", "--split", "2,4", "--transport", "shm"],
        vec!["--ranks", "3", "--split", "2,4", "--transport", "quic"],
    ] {
        assert_eq!(greedy(model, &prompt, 24, &extra), one, "{extra:?}");
    }
    // Rank 0's prefill chunk sizes every link, also beyond the other ranks' default of 512.
    let long: String = (0..600).map(|i| ((i * 37 + 5) % 250).to_string()).collect::<Vec<_>>().join(",");
    let chunk = ["--prefill-chunk", "600"];
    let one = greedy(model, &long, 4, &chunk);
    assert_eq!(greedy(model, &long, 4, &[&chunk[..], &["--ranks", "2", "--transport", "shm"]].concat()), one);
}

// ---- servers --------------------------------------------------------------------------------

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A child process killed on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(args: &[&str], env: &[(&str, &str)]) -> Proc {
    let mut c = Command::new(env!("CARGO_BIN_EXE_duet"));
    c.args(args).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped()).env("DUET_LOG", "error");
    for (k, v) in env {
        c.env(k, v);
    }
    Proc(c.spawn().unwrap())
}

/// Status and body of a plain HTTP request.
fn http(port: u16, method: &str, path: &str, body: &str) -> (u16, String) {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else { return (0, String::new()) };
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let _ = write!(s, "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let code = out.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (code, out.split("\r\n\r\n").nth(1).unwrap_or_default().to_string())
}

fn wait_health(port: u16, want: u16, timeout: Duration) -> Duration {
    let t0 = Instant::now();
    loop {
        if http(port, "GET", "/health", "").0 == want {
            return t0.elapsed();
        }
        assert!(t0.elapsed() < timeout, "/health did not answer {want} within {timeout:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn rank_args<'a>(rank: &'a str, model: &'a str, dir: &'a str, port: &'a str, http: &'a str, transport: &'a str) -> Vec<&'a str> {
    let mut a = vec!["rank", "--rank", rank, "--world", "2", "--model", model, "--run-dir", dir, "--port", port, "--transport", transport];
    if rank == "0" {
        a.extend(["--http", http]);
    }
    a
}

fn prompt_proc(http_port: u16, max_tokens: usize) -> Proc {
    let server = format!("http://127.0.0.1:{http_port}");
    let n = max_tokens.to_string();
    spawn(&["prompt", "tell me a long story", "--server", &server, "--max-tokens", &n, "--temperature", "0"], &[])
}

fn wait_exit(p: &mut Proc, timeout: Duration) -> Option<(std::process::ExitStatus, String)> {
    let t0 = Instant::now();
    while t0.elapsed() < timeout {
        if let Some(st) = p.0.try_wait().unwrap() {
            let mut err = String::new();
            let _ = p.0.stderr.take().unwrap().read_to_string(&mut err);
            return Some((st, err));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    None
}

fn signal(p: &Proc, sig: &str) {
    Command::new("kill").args([sig, &p.0.id().to_string()]).status().unwrap();
}

/// Kill or stop rank 1 in the middle of a generation: the request fails with an error within
/// 2 s, rank 0 reports unhealthy, and serves again once rank 1 is restarted.
fn fault(transport: &str, sig: &str) {
    let model_dir = TempDir::new("fault-model");
    duet_ok(&["tiny", "--out", model_dir.s()]);
    let dir = TempDir::new("fault-run");
    let (qport, hport) = (free_port().to_string(), free_port());
    let hs = format!("127.0.0.1:{hport}");
    let _r0 = spawn(&rank_args("0", model_dir.s(), dir.s(), &qport, &hs, transport), &[]);
    let r1 = spawn(&rank_args("1", model_dir.s(), dir.s(), &qport, &hs, transport), &[]);
    wait_health(hport, 200, Duration::from_secs(30));
    let mut client = prompt_proc(hport, 4000);
    std::thread::sleep(Duration::from_millis(300));
    assert!(client.0.try_wait().unwrap().is_none(), "the generation should still be running");
    let t0 = Instant::now();
    signal(&r1, sig);
    let (status, err) = wait_exit(&mut client, Duration::from_secs(2)).expect("the in-flight request must end within 2 s");
    assert!(!status.success(), "a request cut by a fault must fail, not end short: {err}");
    assert!(err.contains("error"), "{err}");
    let to_503 = wait_health(hport, 503, Duration::from_secs(2));
    assert!(t0.elapsed() < Duration::from_secs(3), "fault reported after {:?} ({to_503:?})", t0.elapsed());
    drop(r1);
    let _r1b = spawn(&rank_args("1", model_dir.s(), dir.s(), &qport, &hs, transport), &[]);
    wait_health(hport, 200, Duration::from_secs(30));
    let mut again = prompt_proc(hport, 8);
    let (status, err) = wait_exit(&mut again, Duration::from_secs(30)).expect("a request after recovery");
    assert!(status.success(), "after recovery: {err}");
}

#[test]
fn killed_rank_is_reported_and_recovered_shm() {
    fault("shm", "-KILL");
}

#[test]
fn stopped_rank_is_reported_and_recovered_quic() {
    fault("quic", "-STOP");
}

#[test]
fn mismatched_ranks_are_refused() {
    let (a, b) = (TempDir::new("mm-a"), TempDir::new("mm-b"));
    duet_ok(&["tiny", "--out", a.s()]);
    duet_ok(&["tiny", "--out", b.s(), "--seed", "1"]);
    let dir = TempDir::new("mm-run");
    let (qport, hport) = (free_port().to_string(), free_port());
    let hs = format!("127.0.0.1:{hport}");
    let _r0 = spawn(&rank_args("0", a.s(), dir.s(), &qport, &hs, "shm"), &[]);
    for (model, env, needle) in [(b.s(), vec![], "checkpoint mismatch"), (a.s(), vec![("DUET_BUILD_ID", "some-other-build")], "build mismatch")] {
        let mut r1 = spawn(&rank_args("1", model, dir.s(), &qport, &hs, "shm"), &env);
        let (status, err) = wait_exit(&mut r1, Duration::from_secs(30)).expect("a refused rank exits");
        assert!(!status.success());
        assert!(err.contains("refused") && err.contains(needle), "{err}");
    }
    assert_eq!(http(hport, "GET", "/health", "").0, 503);
}

#[test]
fn trace_shows_both_ranks_busy_at_once() {
    let model = TempDir::new("trace-model");
    duet_ok(&["tiny", "--out", model.s()]);
    let dir = TempDir::new("trace");
    let trace = dir.join("trace.json");
    let hport = free_port();
    let hs = format!("127.0.0.1:{hport}");
    let mut server = spawn(&["serve", "--model", model.s(), "--ranks", "2", "--http", &hs, "--trace", trace.to_str().unwrap()], &[]);
    wait_health(hport, 200, Duration::from_secs(30));
    let mut a = prompt_proc(hport, 200);
    let mut b = prompt_proc(hport, 200);
    for p in [&mut a, &mut b] {
        let (st, err) = wait_exit(p, Duration::from_secs(60)).unwrap();
        assert!(st.success(), "{err}");
    }
    signal(&server, "-TERM");
    wait_exit(&mut server, Duration::from_secs(20)).expect("serve stops on SIGTERM");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&trace).unwrap()).unwrap();
    let spans = |pid: u64| -> Vec<(u64, u64)> {
        v["traceEvents"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["pid"] == pid && e["name"] == "compute")
            .map(|e| (e["ts"].as_u64().unwrap(), e["ts"].as_u64().unwrap() + e["dur"].as_u64().unwrap()))
            .collect()
    };
    let (r0, r1) = (spans(0), spans(1));
    assert!(!r0.is_empty() && !r1.is_empty(), "both ranks record compute spans");
    let overlap = r0.iter().any(|a| r1.iter().any(|b| a.0 < b.1 && b.0 < a.1));
    assert!(overlap, "with two sequences in flight, rank 0 and rank 1 must compute at the same time");
}
