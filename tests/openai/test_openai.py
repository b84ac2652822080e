#!/usr/bin/env python3
"""The official `openai` client against a real `duet serve` started here.

Environment: DUET_BIN (the duet binary), DUET_TEST_MODEL (a checkpoint folder with a tokenizer
and chat template, e.g. from `duet tiny`). Run by tests/duet/openai.rs; runnable alone:
    DUET_BIN=target/release/duet DUET_TEST_MODEL=/tmp/tiny python3 tests/openai/test_openai.py
"""

import json
import os
import socket
import subprocess
import sys
import threading
import time
import unittest
import urllib.error
import urllib.request

import jinja2
import openai
import tokenizers

BIN = os.environ["DUET_BIN"]
MODEL = os.environ["DUET_TEST_MODEL"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, *extra):
        self.port = free_port()
        self.proc = subprocess.Popen(
            [BIN, "serve", "--model", MODEL, "--http", f"127.0.0.1:{self.port}", *extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "DUET_LOG": "error"})
        self.base = f"http://127.0.0.1:{self.port}"
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(self.base + "/health", timeout=1) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            if self.proc.poll() is not None:
                raise RuntimeError("server exited: " + self.proc.stderr.read().decode())
            time.sleep(0.05)
        raise RuntimeError("server not ready")

    def client(self, key="unused"):
        return openai.OpenAI(base_url=self.base + "/v1", api_key=key, max_retries=0, timeout=120)

    def raw(self, method, path, body=None, headers=None):
        data = body.encode() if isinstance(body, str) else body
        req = urllib.request.Request(self.base + path, data=data, method=method, headers=headers or {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def template_token_count(messages):
    """The chat template rendered by jinja2 as transformers does, counted by HF tokenizers."""
    with open(os.path.join(MODEL, "chat_template.jinja")) as f:
        src = f.read()
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    text = env.from_string(src).render(messages=messages, add_generation_prompt=True)
    tok = tokenizers.Tokenizer.from_file(os.path.join(MODEL, "tokenizer.json"))
    return len(tok.encode(text, add_special_tokens=False).ids)


GREEDY = {"temperature": 0, "extra_body": {"ignore_eos": True}}


class Api(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.server = Server("--max-batch", "32")
        cls.c = cls.server.client()
        cls.model = cls.c.models.list().data[0].id

    @classmethod
    def tearDownClass(cls):
        cls.server.stop()

    def chat(self, content, **kw):
        return self.c.chat.completions.create(model=self.model, messages=[{"role": "user", "content": content}], **kw)

    def test_models(self):
        ids = [m.id for m in self.c.models.list().data]
        self.assertEqual(ids, [self.model])

    def test_chat_usage_matches_the_template(self):
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello, how are you?"}]
        r = self.c.chat.completions.create(model=self.model, messages=messages, max_tokens=5, **GREEDY)
        self.assertEqual(r.usage.prompt_tokens, template_token_count(messages))
        self.assertEqual(r.usage.completion_tokens, 5)
        self.assertEqual(r.usage.total_tokens, r.usage.prompt_tokens + 5)
        self.assertEqual(r.choices[0].finish_reason, "length")

    def test_stream_equals_non_stream(self):
        for prompt in ["Tell me about the sea.", "Numbers: 1 2 3", "fn main() {"]:
            full = self.chat(prompt, max_tokens=24, **GREEDY)
            msg = full.choices[0].message
            reasoning, content, finish, usage = "", "", None, None
            for ch in self.chat(prompt, max_tokens=24, stream=True, stream_options={"include_usage": True}, **GREEDY):
                if ch.usage:
                    usage = ch.usage
                if not ch.choices:
                    continue
                d = ch.choices[0].delta
                reasoning += getattr(d, "reasoning_content", None) or ""
                content += d.content or ""
                finish = ch.choices[0].finish_reason or finish
            self.assertEqual(content, msg.content or "")
            self.assertEqual(reasoning, getattr(msg, "reasoning_content", None) or "")
            self.assertEqual(finish, full.choices[0].finish_reason)
            self.assertEqual(usage.completion_tokens, full.usage.completion_tokens)
            self.assertEqual(usage.prompt_tokens, full.usage.prompt_tokens)

    def test_max_tokens_is_exact(self):
        for n in [1, 7, 33]:
            r = self.chat("Go on.", max_tokens=n, **GREEDY)
            self.assertEqual(r.usage.completion_tokens, n)
            self.assertEqual(r.choices[0].finish_reason, "length")

    def test_completions(self):
        r = self.c.completions.create(model=self.model, prompt="The quick brown fox", max_tokens=10, **GREEDY)
        self.assertEqual(r.usage.completion_tokens, 10)
        text = "".join(ch.choices[0].text for ch in self.c.completions.create(model=self.model, prompt="The quick brown fox", max_tokens=10, stream=True, **GREEDY) if ch.choices)
        self.assertEqual(text, r.choices[0].text)
        ids = self.c.completions.create(model=self.model, prompt=[5, 17, 42], max_tokens=3, **GREEDY)
        self.assertEqual(ids.usage.prompt_tokens, 3)

    def test_stop_string(self):
        r = self.c.completions.create(model=self.model, prompt="Hello", max_tokens=40, **GREEDY)
        text = r.choices[0].text
        stop = next((text[i:i + 2] for i in range(4, len(text) - 2) if text[i:i + 2].isprintable() and text[i:i + 2].strip()), None)
        if stop is None:
            self.skipTest("no printable stop candidate in this model's output")
        cut = self.c.completions.create(model=self.model, prompt="Hello", max_tokens=40, stop=[stop], **GREEDY)
        self.assertEqual(cut.choices[0].text, text[: text.index(stop)])
        self.assertEqual(cut.choices[0].finish_reason, "stop")

    def test_logprobs(self):
        r = self.chat("Hi", max_tokens=6, logprobs=True, top_logprobs=3, **GREEDY)
        lp = r.choices[0].logprobs.content
        self.assertEqual(len(lp), 6)
        for e in lp:
            self.assertEqual(len(e.top_logprobs), 3)
            self.assertLessEqual(e.logprob, 0.0)
            # Greedy: the chosen token is the most likely one.
            self.assertAlmostEqual(e.logprob, e.top_logprobs[0].logprob, places=4)

    def test_seeded_sampling_repeats(self):
        a = self.chat("Say something", max_tokens=16, temperature=1.0, seed=11)
        b = self.chat("Say something", max_tokens=16, temperature=1.0, seed=11)
        self.assertEqual(a.choices[0].message.content, b.choices[0].message.content)

    def test_tokenize_round_trip(self):
        s, body = self.server.raw("POST", "/tokenize", json.dumps({"prompt": "Hello world", "add_special_tokens": False}))
        self.assertEqual(s, 200)
        toks = json.loads(body)["tokens"]
        s, body = self.server.raw("POST", "/detokenize", json.dumps({"tokens": toks}))
        self.assertEqual(json.loads(body)["prompt"], "Hello world")

    def test_errors_are_400(self):
        with self.assertRaises(openai.BadRequestError):
            self.chat("x", temperature=-1)
        with self.assertRaises(openai.BadRequestError):
            self.chat("x", top_p=0)
        with self.assertRaises(openai.BadRequestError):
            self.chat("x", temperature=1e39)  # finite as JSON, infinite as f32
        with self.assertRaises(openai.BadRequestError):
            self.c.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
        with self.assertRaises(openai.BadRequestError):
            self.chat("x", n=2)
        with self.assertRaises(openai.BadRequestError):
            self.chat("x", max_tokens=0)
        with self.assertRaises(openai.BadRequestError):
            self.c.chat.completions.create(model=self.model, messages=[])
        with self.assertRaises(openai.BadRequestError):
            self.chat("word " * 5000, max_tokens=4)
        s, body = self.server.raw("POST", "/v1/chat/completions", "{not json")
        self.assertEqual(s, 400)
        self.assertIn("error", json.loads(body))
        s, _ = self.server.raw("POST", "/v1/completions", "x" * (5 << 20))
        self.assertEqual(s, 413)

    def test_concurrent_streams_match_alone(self):
        prompts = [f"Story number {i}: once upon a time" for i in range(32)]
        alone = [self.chat(p, max_tokens=20, **GREEDY).choices[0].message for p in prompts]
        results = [None] * len(prompts)

        def run(i):
            c = self.server.client()
            text, reasoning = "", ""
            for ch in c.chat.completions.create(model=self.model, messages=[{"role": "user", "content": prompts[i]}], max_tokens=20, stream=True, **GREEDY):
                if ch.choices:
                    text += ch.choices[0].delta.content or ""
                    reasoning += getattr(ch.choices[0].delta, "reasoning_content", None) or ""
            results[i] = (reasoning, text)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for i, m in enumerate(alone):
            self.assertEqual(results[i], (getattr(m, "reasoning_content", None) or "", m.content or ""), prompts[i])

    def test_disconnect_cancels(self):
        stream = self.chat("A very long answer please", max_tokens=3000, stream=True, **GREEDY)
        for i, _ in enumerate(stream):
            if i == 3:
                break
        stream.close()
        deadline = time.time() + 10
        while time.time() < deadline:
            s, body = self.server.raw("GET", "/metrics")
            if "duet_batch_size 0" in body:
                break
            time.sleep(0.05)
        self.assertIn("duet_batch_size 0", body)

    def test_health_and_metrics(self):
        s, body = self.server.raw("GET", "/health")
        self.assertEqual(s, 200)
        s, body = self.server.raw("GET", "/metrics")
        for name in ["duet_requests_total", "duet_time_to_first_token_seconds_bucket", "duet_inter_token_latency_seconds_count",
                     "duet_prompt_tokens_total", "duet_generation_tokens_total", "duet_queue_depth", "duet_batch_size", "duet_spec_accepted_tokens_total"]:
            self.assertIn(name, body)


class Hardening(unittest.TestCase):
    def test_api_key(self):
        srv = Server("--api-key", "sekret")
        try:
            with self.assertRaises(openai.AuthenticationError):
                srv.client("wrong").models.list()
            self.assertTrue(srv.client("sekret").models.list().data)
            s, _ = srv.raw("GET", "/health")
            self.assertEqual(s, 200)
        finally:
            srv.stop()

    def test_full_queue_is_429(self):
        srv = Server("--max-batch", "1", "--max-queue", "1")
        codes = []
        try:
            def run():
                c = srv.client()
                try:
                    c.completions.create(model=c.models.list().data[0].id, prompt="x", max_tokens=400, temperature=0, extra_body={"ignore_eos": True})
                    codes.append(200)
                except openai.RateLimitError:
                    codes.append(429)

            threads = [threading.Thread(target=run) for _ in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        finally:
            srv.stop()
        self.assertIn(429, codes)
        self.assertIn(200, codes)


if __name__ == "__main__":
    result = unittest.main(exit=False, verbosity=2).result
    sys.exit(0 if result.wasSuccessful() else 1)
