#!/usr/bin/env python3
"""Load test of the OpenAI API: N concurrent streaming clients for S seconds against a real
`duet serve`, with the official client. Every reply is greedy and compared with the reply the
same prompt gets alone, and its streamed tokens are counted against `usage`, so a lost or
duplicated token is an error. Reports requests, tokens/s, TTFT percentiles, errors and the
server's memory before and after.

    python3 benches/load_openai.py --duet target/release/duet --model /tmp/tiny --clients 64 --seconds 60
"""

import argparse
import os
import socket
import statistics
import subprocess
import threading
import time
import urllib.request

import openai


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--duet", default="target/release/duet")
    ap.add_argument("--model", required=True)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--ranks", type=int, default=1)
    args = ap.parse_args()

    port = free_port()
    server = subprocess.Popen([args.duet, "serve", "--model", args.model, "--http", f"127.0.0.1:{port}", "--ranks", str(args.ranks),
                               "--max-batch", str(args.clients), "--max-queue", str(4 * args.clients)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "DUET_LOG": "error"})
    base = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if urllib.request.urlopen(base + "/health", timeout=1).status == 200:
                break
        except Exception:
            time.sleep(0.1)
    client = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=300)
    model = client.models.list().data[0].id
    prompts = [f"Client story {i}: the two modules share the work" for i in range(16)]
    greedy = {"temperature": 0, "max_tokens": args.max_tokens, "extra_body": {"ignore_eos": True}}
    reference = {}
    for p in prompts:
        m = client.chat.completions.create(model=model, messages=[{"role": "user", "content": p}], **greedy).choices[0].message
        reference[p] = ((getattr(m, "reasoning_content", None) or ""), m.content or "")
    rss_before = rss_mb(server.pid)

    stop_at = time.time() + args.seconds
    lock = threading.Lock()
    stats = {"requests": 0, "tokens": 0, "errors": [], "ttft": []}

    def worker(k):
        c = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=300)
        i = k
        while time.time() < stop_at:
            p = prompts[i % len(prompts)]
            i += 1
            t0 = time.time()
            first = None
            reasoning, content, pieces, usage = "", "", 0, None
            try:
                for ch in c.chat.completions.create(model=model, messages=[{"role": "user", "content": p}], stream=True,
                                                    stream_options={"include_usage": True}, logprobs=True, **greedy):
                    if ch.usage:
                        usage = ch.usage
                    if not ch.choices:
                        continue
                    if ch.choices[0].logprobs and ch.choices[0].logprobs.content:
                        pieces += len(ch.choices[0].logprobs.content)
                        first = first or time.time()
                    d = ch.choices[0].delta
                    reasoning += getattr(d, "reasoning_content", None) or ""
                    content += d.content or ""
                problems = []
                if (reasoning, content) != reference[p]:
                    problems.append("text differs from the reply alone")
                if usage is None or pieces != usage.completion_tokens or pieces != args.max_tokens:
                    problems.append(f"{pieces} streamed tokens, usage says {usage and usage.completion_tokens}")
                with lock:
                    stats["requests"] += 1
                    stats["tokens"] += pieces
                    stats["ttft"].append((first or time.time()) - t0)
                    stats["errors"].extend(problems)
            except Exception as e:  # noqa: BLE001 - every failure is counted
                with lock:
                    stats["errors"].append(repr(e))

    t0 = time.time()
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.time() - t0
    rss_after = rss_mb(server.pid)
    server.terminate()
    server.wait(timeout=30)
    ttft = sorted(stats["ttft"]) or [0.0]
    print(f"clients {args.clients}, {wall:.1f} s, ranks {args.ranks}, max_tokens {args.max_tokens}")
    print(f"requests {stats['requests']} ({stats['requests'] / wall:.1f}/s), tokens {stats['tokens']} ({stats['tokens'] / wall:.1f} tok/s)")
    print(f"TTFT p50 {1e3 * statistics.median(ttft):.1f} ms, p99 {1e3 * ttft[int(0.99 * (len(ttft) - 1))]:.1f} ms")
    print(f"server RSS {rss_before:.1f} MB before, {rss_after:.1f} MB after")
    print(f"errors {len(stats['errors'])}" + (f": {stats['errors'][:5]}" if stats["errors"] else ""))
    raise SystemExit(1 if stats["errors"] else 0)


if __name__ == "__main__":
    main()
