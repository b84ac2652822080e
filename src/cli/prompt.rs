//! `duet prompt`: sends a prompt to a running rank 0 and prints the reply as it streams, then
//! the time to first token and the decode rate. A small HTTP/1.1 client: no TLS, no proxies.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use serde_json::{json, Value};

#[derive(Args, Debug)]
pub struct PromptArgs {
    /// The user message.
    text: String,
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    server: String,
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    #[arg(long)]
    temperature: Option<f32>,
    #[arg(long, env = "DUET_API_KEY")]
    api_key: Option<String>,
}

fn host_port(url: &str) -> Result<String> {
    let rest = url.strip_prefix("http://").ok_or_else(|| anyhow!("--server {url}: only http:// URLs are supported"))?;
    let hp = rest.split('/').next().unwrap_or(rest);
    Ok(if hp.contains(':') { hp.to_string() } else { format!("{hp}:80") })
}

/// Reads a chunked HTTP body line by line, calling `line` for each text line.
fn read_lines(reader: &mut impl BufRead, chunked: bool, mut line: impl FnMut(&str) -> Result<bool>) -> Result<()> {
    let mut pending = String::new();
    loop {
        let chunk = if chunked {
            let mut size = String::new();
            if reader.read_line(&mut size)? == 0 {
                break;
            }
            let n = usize::from_str_radix(size.trim(), 16).with_context(|| format!("bad chunk size {size:?}"))?;
            if n == 0 {
                break;
            }
            let mut buf = vec![0u8; n + 2];
            reader.read_exact(&mut buf)?;
            buf.truncate(n);
            buf
        } else {
            let mut buf = vec![0u8; 4096];
            let n = reader.read(&mut buf)?;
            if n == 0 {
                break;
            }
            buf.truncate(n);
            buf
        };
        pending.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(i) = pending.find('\n') {
            let l: String = pending.drain(..=i).collect();
            if !line(l.trim_end())? {
                return Ok(());
            }
        }
    }
    if !pending.is_empty() {
        line(pending.trim_end())?;
    }
    Ok(())
}

pub fn run(a: PromptArgs) -> Result<()> {
    let addr = host_port(&a.server)?;
    let mut body = json!({
        "messages": [{"role": "user", "content": a.text}],
        "max_tokens": a.max_tokens,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    if let Some(t) = a.temperature {
        body["temperature"] = json!(t);
    }
    let body = body.to_string();
    let mut stream = TcpStream::connect(&addr).with_context(|| format!("cannot reach {}", a.server))?;
    stream.set_read_timeout(Some(Duration::from_secs(600)))?;
    let auth = a.api_key.as_ref().map_or(String::new(), |k| format!("Authorization: Bearer {k}\r\n"));
    write!(
        stream,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nAccept: text/event-stream\r\n{auth}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let start = Instant::now();
    let mut reader = BufReader::new(stream);
    let mut status = String::new();
    reader.read_line(&mut status)?;
    let code: u16 = status.split_whitespace().nth(1).and_then(|c| c.parse().ok()).ok_or_else(|| anyhow!("bad HTTP status line {status:?}"))?;
    let mut chunked = false;
    loop {
        let mut h = String::new();
        reader.read_line(&mut h)?;
        let h = h.trim_end().to_ascii_lowercase();
        if h.is_empty() {
            break;
        }
        if h.starts_with("transfer-encoding:") && h.contains("chunked") {
            chunked = true;
        }
    }
    if code != 200 {
        let mut rest = String::new();
        let _ = read_lines(&mut reader, chunked, |l| {
            rest.push_str(l);
            Ok(true)
        });
        let msg = serde_json::from_str::<Value>(&rest).ok().and_then(|v| v["error"]["message"].as_str().map(str::to_string)).unwrap_or(rest);
        bail!("server answered {code}: {msg}");
    }
    let mut out = std::io::stdout();
    let (mut first, mut tokens, mut usage) = (None, 0usize, None);
    read_lines(&mut reader, chunked, |l| {
        let Some(data) = l.strip_prefix("data: ") else { return Ok(true) };
        if data == "[DONE]" {
            return Ok(false);
        }
        let v: Value = serde_json::from_str(data).with_context(|| format!("bad event {data:?}"))?;
        if let Some(e) = v.get("error") {
            bail!("server error: {}", e["message"]);
        }
        if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
            usage = Some(u.clone());
        }
        let delta = &v["choices"][0]["delta"];
        for key in ["reasoning_content", "content"] {
            if let Some(t) = delta[key].as_str().filter(|t| !t.is_empty()) {
                first.get_or_insert_with(Instant::now);
                tokens += 1;
                write!(out, "{t}")?;
                out.flush()?;
            }
        }
        Ok(true)
    })?;
    writeln!(out)?;
    let completion = usage.as_ref().and_then(|u| u["completion_tokens"].as_u64()).unwrap_or(tokens as u64);
    match first {
        Some(f) => {
            let decode = f.elapsed().as_secs_f64();
            let rate = if completion > 1 && decode > 0.0 { (completion - 1) as f64 / decode } else { 0.0 };
            eprintln!("[ttft {:.1} ms, {completion} tokens, {rate:.1} tok/s]", (f - start).as_secs_f64() * 1e3);
        }
        None => eprintln!("[no tokens]"),
    }
    Ok(())
}
