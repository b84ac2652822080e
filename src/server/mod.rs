//! The OpenAI-compatible HTTP API on rank 0 (axum): chat and text completions (plain and SSE),
//! models, tokenize/detokenize, health and Prometheus metrics.
//!
//! Requests go to rank 0's engine as token ids; its events come back per request and become
//! text here. A client that disconnects cancels its generation (the engine frees its cache at
//! the next step). The server binds 127.0.0.1 unless told otherwise, limits request bodies,
//! answers 429 when the queue is full and 503 while a rank is down.

pub mod metrics;
pub mod openai;
pub mod output;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

use self::metrics::Metrics;
use self::openai::{ApiError, GenParams, PromptSpec};
use self::output::{Delta, Output};
use crate::backend::Backend;
use crate::checkpoint::ModelConfig;
use crate::pipeline::rank::{start_engine, EngineHandle, EngineState};
use crate::pipeline::RankOptions;
use crate::scheduler::{Event, FinishReason, Request};
use crate::text::{GenerationDefaults, TextCodec};

#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub addr: String,
    pub api_key: Option<String>,
    /// Name clients use for the model (default: the checkpoint folder's name).
    pub served_name: Option<String>,
    /// Split GLM `<think>` reasoning into `reasoning_content`.
    pub reasoning: bool,
    /// Requests waiting for their first token beyond this get 429.
    pub max_queue: usize,
    pub max_body_bytes: usize,
    /// `max_tokens` when a chat request gives none.
    pub default_max_tokens: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            addr: "127.0.0.1:8000".into(),
            api_key: None,
            served_name: None,
            reasoning: true,
            max_queue: 256,
            max_body_bytes: 4 << 20,
            default_max_tokens: 2048,
        }
    }
}

struct App {
    requests: Mutex<std_mpsc::Sender<Request>>,
    state: Arc<EngineState>,
    codec: Arc<TextCodec>,
    model: String,
    config: ModelConfig,
    defaults: GenerationDefaults,
    /// Tokens that end generation unless the request ignores EOS.
    eos_ids: Vec<u32>,
    cfg: ServerConfig,
    metrics: Metrics,
    cache_positions: usize,
    created: u64,
    /// Requests accepted here that have not produced their first event (waiting or in prefill).
    pending: Arc<std::sync::atomic::AtomicUsize>,
}

type AppState = Arc<App>;

fn error_response(e: ApiError) -> Response {
    (StatusCode::from_u16(e.status).unwrap_or(StatusCode::BAD_REQUEST), Json(e.body())).into_response()
}

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn request_id(prefix: &str) -> String {
    let n = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    format!("{prefix}-{n:x}")
}

impl App {
    fn authorize(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let Some(key) = &self.cfg.api_key else { return Ok(()) };
        let given = headers.get("authorization").and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
        if given == Some(key.as_str()) {
            Ok(())
        } else {
            Err(ApiError::new(401, "authentication_error", "a valid API key is required (Authorization: Bearer ...)"))
        }
    }

    fn check_ready(&self) -> Result<(), ApiError> {
        if !self.state.ready.load(Ordering::SeqCst) {
            return Err(ApiError::new(503, "service_unavailable", "the model is not ready (a rank is loading or down)"));
        }
        Ok(())
    }

    /// Takes a place in the queue, or answers 429.
    fn enqueue(&self) -> Result<Pending, ApiError> {
        if self.pending.fetch_add(1, Ordering::SeqCst) >= self.cfg.max_queue {
            self.pending.fetch_sub(1, Ordering::SeqCst);
            self.metrics.requests_rejected.fetch_add(1, Ordering::Relaxed);
            return Err(ApiError::new(429, "rate_limit_error", format!("the queue is full ({} requests waiting)", self.cfg.max_queue)));
        }
        Ok(Pending(Some(self.pending.clone())))
    }

    fn stop_ids(&self, extra: &[u32], ignore_eos: bool) -> Vec<u32> {
        let mut ids = if ignore_eos { vec![] } else { self.eos_ids.clone() };
        ids.extend_from_slice(extra);
        ids
    }

    /// Checks the prompt fits and starts the generation.
    fn start(&self, prompt: Vec<u32>, p: &GenParams, default_max: usize) -> Result<Running, ApiError> {
        let ctx = self.config.max_position_embeddings.min(self.cache_positions);
        if prompt.is_empty() {
            return Err(ApiError::bad("prompt", "the prompt is empty"));
        }
        if prompt.len() >= ctx {
            return Err(ApiError::bad("prompt", format!("the prompt has {} tokens; the context holds {ctx}", prompt.len())));
        }
        if let Some(&t) = prompt.iter().find(|&&t| t as usize >= self.config.vocab_size) {
            return Err(ApiError::bad("prompt", format!("token id {t} is outside the vocabulary of {}", self.config.vocab_size)));
        }
        let pending = self.enqueue()?;
        let room = ctx - prompt.len();
        let max_tokens = match p.max_tokens {
            Some(m) if m > room => {
                return Err(ApiError::bad("max_tokens", format!("max_tokens {m} plus the prompt's {} tokens exceeds the context of {ctx}", prompt.len())))
            }
            Some(m) => m,
            None => default_max.min(room),
        };
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let cancel = Arc::new(AtomicBool::new(false));
        let stop_ids = self.stop_ids(&p.stop_token_ids, p.ignore_eos);
        let req = Request {
            prompt: prompt.clone(),
            max_tokens,
            sampling: p.sampling.clone(),
            stop_ids: stop_ids.clone(),
            ignore_eos: false,
            logprobs: p.logprobs,
            events: tx,
            cancel: cancel.clone(),
        };
        self.requests.lock().unwrap().send(req).map_err(|_| ApiError::new(503, "service_unavailable", "the engine has stopped"))?;
        self.metrics.prompt_tokens.fetch_add(prompt.len() as u64, Ordering::Relaxed);
        Ok(Running { rx, cancel: CancelOnDrop(cancel), prompt_tokens: prompt.len(), stop_ids, started: Instant::now(), last_token: None, pending })
    }
}

/// Sets the cancel flag when dropped (client gone, or generation over).
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// A place in the queue, given back when the request starts producing (or goes away).
struct Pending(Option<Arc<std::sync::atomic::AtomicUsize>>);

impl Pending {
    fn release(&mut self) {
        if let Some(p) = self.0.take() {
            p.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.release();
    }
}

/// A generation in flight.
struct Running {
    pending: Pending,
    rx: tokio::sync::mpsc::UnboundedReceiver<Event>,
    cancel: CancelOnDrop,
    prompt_tokens: usize,
    stop_ids: Vec<u32>,
    started: Instant,
    last_token: Option<Instant>,
}

/// What one engine event means for the response.
enum Step {
    Delta(Delta),
    Done(FinishReason, Delta),
    Failed(String),
}

impl Running {
    async fn next(&mut self, out: &mut Output, logprobs: bool, metrics: &Metrics) -> Step {
        let event = self.rx.recv().await;
        self.pending.release();
        match event {
            Some(Event::Token(t)) => {
                let now = Instant::now();
                match self.last_token {
                    None => metrics.ttft.observe((now - self.started).as_secs_f64()),
                    Some(prev) => metrics.inter_token.observe((now - prev).as_secs_f64()),
                }
                self.last_token = Some(now);
                metrics.generation_tokens.fetch_add(1, Ordering::Relaxed);
                let d = out.push(&t, logprobs);
                if out.stopped() {
                    // A stop string: end here; the engine stops at its next step.
                    self.cancel.0.store(true, Ordering::SeqCst);
                    return Step::Done(FinishReason::Stop, d);
                }
                Step::Delta(d)
            }
            Some(Event::Finished(r)) => Step::Done(r, out.flush()),
            Some(Event::Failed(e)) => Step::Failed(e),
            None => Step::Failed("the engine stopped".into()),
        }
    }

    fn usage(&self, out: &Output) -> Value {
        json!({"prompt_tokens": self.prompt_tokens, "completion_tokens": out.tokens, "total_tokens": self.prompt_tokens + out.tokens})
    }
}

// ---- handlers ---------------------------------------------------------------------------------

async fn health(State(app): State<AppState>) -> Response {
    if app.state.ready.load(Ordering::SeqCst) {
        (StatusCode::OK, Json(json!({"status": "ok"}))).into_response()
    } else {
        let why = app.state.last_error.lock().unwrap().clone().unwrap_or_else(|| "loading".into());
        (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"status": "unavailable", "reason": why}))).into_response()
    }
}

async fn metrics(State(app): State<AppState>) -> Response {
    let text = app.metrics.render(app.state.queue_depth.load(Ordering::Relaxed), app.state.active.load(Ordering::Relaxed), app.state.ready.load(Ordering::SeqCst));
    ([("content-type", "text/plain; version=0.0.4")], text).into_response()
}

async fn models(State(app): State<AppState>, headers: HeaderMap) -> Response {
    if let Err(e) = app.authorize(&headers) {
        return error_response(e);
    }
    Json(json!({"object": "list", "data": [{
        "id": app.model, "object": "model", "created": app.created, "owned_by": "duet",
        "max_model_len": app.config.max_position_embeddings.min(app.cache_positions),
    }]}))
    .into_response()
}

fn chat_prompt(app: &App, o: &serde_json::Map<String, Value>) -> Result<(Vec<u32>, bool), ApiError> {
    let messages = openai::messages(o)?;
    if !app.codec.has_chat_template() {
        return Err(ApiError::bad("messages", "this model has no chat template; use /v1/completions"));
    }
    let mut extra = match o.get("chat_template_kwargs") {
        None | Some(Value::Null) => serde_json::Map::new(),
        Some(Value::Object(m)) => m.clone(),
        Some(_) => return Err(ApiError::bad("chat_template_kwargs", "'chat_template_kwargs' must be an object")),
    };
    if let Some(v) = o.get("enable_thinking") {
        extra.insert("enable_thinking".into(), v.clone());
    }
    let tools = o.get("tools").filter(|t| !t.is_null());
    let add_generation_prompt = o.get("add_generation_prompt").and_then(Value::as_bool).unwrap_or(true);
    let text = app
        .codec
        .apply_chat_template(&messages, add_generation_prompt, tools, &extra)
        .map_err(|e| ApiError::bad("messages", format!("the chat template failed: {e:#}")))?;
    let ids = app.codec.encode(&text, false).map_err(|e| ApiError::bad("messages", format!("{e:#}")))?;
    Ok((ids, text.trim_end().ends_with("<think>")))
}

async fn tokenize(State(app): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    let r = (|| {
        app.authorize(&headers)?;
        let o = openai::body_object(&body)?;
        openai::check_model(&o, &app.model)?;
        let ids = if o.contains_key("messages") {
            chat_prompt(&app, &o)?.0
        } else {
            match openai::prompt(&o)? {
                PromptSpec::Text(t) => {
                    let add = o.get("add_special_tokens").and_then(Value::as_bool).unwrap_or(true);
                    app.codec.encode(&t, add).map_err(|e| ApiError::bad("prompt", format!("{e:#}")))?
                }
                PromptSpec::Ids(ids) => ids,
            }
        };
        Ok::<_, ApiError>(json!({"count": ids.len(), "tokens": ids, "max_model_len": app.config.max_position_embeddings.min(app.cache_positions)}))
    })();
    match r {
        Ok(v) => Json(v).into_response(),
        Err(e) => error_response(e),
    }
}

async fn detokenize(State(app): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    let r = (|| {
        app.authorize(&headers)?;
        let o = openai::body_object(&body)?;
        let ids: Vec<u32> = o
            .get("tokens")
            .and_then(Value::as_array)
            .and_then(|a| a.iter().map(|v| v.as_u64().map(|x| x as u32)).collect())
            .ok_or_else(|| ApiError::bad("tokens", "'tokens' must be a list of token ids"))?;
        if let Some(&t) = ids.iter().find(|&&t| t as usize >= app.codec.vocab_size().max(app.config.vocab_size)) {
            return Err(ApiError::bad("tokens", format!("token id {t} is outside the vocabulary")));
        }
        let text = app.codec.decode(&ids, false).map_err(|e| ApiError::bad("tokens", format!("{e:#}")))?;
        Ok(json!({"prompt": text}))
    })();
    match r {
        Ok(v) => Json(v).into_response(),
        Err(e) => error_response(e),
    }
}

async fn chat(State(app): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    let setup = (|| {
        app.authorize(&headers)?;
        let o = openai::body_object(&body)?;
        openai::check_model(&o, &app.model)?;
        let p = openai::gen_params(&o, &app.defaults, true)?;
        let (prompt, in_reasoning) = chat_prompt(&app, &o)?;
        app.check_ready()?;
        let run = app.start(prompt, &p, app.cfg.default_max_tokens)?;
        let out = Output::new(app.codec.clone(), app.cfg.reasoning, in_reasoning, p.stop.clone(), run.stop_ids.clone());
        Ok::<_, ApiError>((p, run, out))
    })();
    let (p, run, out) = match setup {
        Ok(x) => x,
        Err(e) => return error_response(e),
    };
    let id = request_id("chatcmpl");
    if p.stream {
        stream_response(app, p, run, out, id, true)
    } else {
        complete_response(app, p, run, out, id, true).await
    }
}

async fn completions(State(app): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    let setup = (|| {
        app.authorize(&headers)?;
        let o = openai::body_object(&body)?;
        openai::check_model(&o, &app.model)?;
        let p = openai::gen_params(&o, &app.defaults, false)?;
        let prompt = match openai::prompt(&o)? {
            PromptSpec::Text(t) => app.codec.encode(&t, true).map_err(|e| ApiError::bad("prompt", format!("{e:#}")))?,
            PromptSpec::Ids(ids) => ids,
        };
        app.check_ready()?;
        let run = app.start(prompt, &p, 16)?;
        let out = Output::new(app.codec.clone(), false, false, p.stop.clone(), run.stop_ids.clone());
        Ok::<_, ApiError>((p, run, out))
    })();
    let (p, run, out) = match setup {
        Ok(x) => x,
        Err(e) => return error_response(e),
    };
    let id = request_id("cmpl");
    if p.stream {
        stream_response(app, p, run, out, id, false)
    } else {
        complete_response(app, p, run, out, id, false).await
    }
}

/// Log-probabilities in the completions layout.
fn completion_logprobs(entries: &[Value]) -> Value {
    let tokens: Vec<Value> = entries.iter().map(|e| e["token"].clone()).collect();
    let lps: Vec<Value> = entries.iter().map(|e| e["logprob"].clone()).collect();
    let tops: Vec<Value> = entries
        .iter()
        .map(|e| {
            let mut m = serde_json::Map::new();
            for t in e["top_logprobs"].as_array().into_iter().flatten() {
                m.insert(t["token"].as_str().unwrap_or_default().to_string(), t["logprob"].clone());
            }
            Value::Object(m)
        })
        .collect();
    json!({"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops})
}

async fn complete_response(app: AppState, p: GenParams, mut run: Running, mut out: Output, id: String, chat: bool) -> Response {
    let (mut reasoning, mut content, mut lps) = (String::new(), String::new(), Vec::new());
    let finish = loop {
        match run.next(&mut out, p.logprobs.is_some(), &app.metrics).await {
            Step::Delta(d) => {
                reasoning.push_str(&d.reasoning);
                content.push_str(&d.content);
                lps.extend(d.logprobs);
            }
            Step::Done(r, d) => {
                reasoning.push_str(&d.reasoning);
                content.push_str(&d.content);
                lps.extend(d.logprobs);
                break r;
            }
            Step::Failed(e) => {
                app.metrics.requests_error.fetch_add(1, Ordering::Relaxed);
                return error_response(ApiError::new(500, "server_error", format!("generation failed: {e}")));
            }
        }
    };
    app.metrics.requests_ok.fetch_add(1, Ordering::Relaxed);
    let usage = run.usage(&out);
    let body = if chat {
        let mut message = json!({"role": "assistant", "content": content});
        if !reasoning.is_empty() {
            message["reasoning_content"] = json!(reasoning);
        }
        let logprobs = p.logprobs.map(|_| json!({"content": lps}));
        json!({"id": id, "object": "chat.completion", "created": now_secs(), "model": app.model,
               "choices": [{"index": 0, "message": message, "logprobs": logprobs, "finish_reason": finish.as_str()}], "usage": usage})
    } else {
        let logprobs = p.logprobs.map(|_| completion_logprobs(&lps));
        json!({"id": id, "object": "text_completion", "created": now_secs(), "model": app.model,
               "choices": [{"index": 0, "text": content, "logprobs": logprobs, "finish_reason": finish.as_str()}], "usage": usage})
    };
    Json(body).into_response()
}

fn stream_response(app: AppState, p: GenParams, run: Running, out: Output, id: String, chat: bool) -> Response {
    let created = now_secs();
    let model = app.model.clone();
    let usage_id = id.clone();
    let chunk = move |delta: Option<&Delta>, finish: Option<FinishReason>, role: bool, usage_null: bool| -> Value {
        let mut c = if chat {
            let mut d = serde_json::Map::new();
            if role {
                d.insert("role".into(), json!("assistant"));
                d.insert("content".into(), json!(""));
            }
            if let Some(x) = delta {
                if !x.reasoning.is_empty() {
                    d.insert("reasoning_content".into(), json!(x.reasoning));
                }
                if !x.content.is_empty() {
                    d.insert("content".into(), json!(x.content));
                }
            }
            let lp = delta.filter(|x| !x.logprobs.is_empty()).map(|x| json!({"content": x.logprobs}));
            json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                   "choices": [{"index": 0, "delta": Value::Object(d), "logprobs": lp, "finish_reason": finish.map(FinishReason::as_str)}]})
        } else {
            let lp = delta.filter(|x| !x.logprobs.is_empty()).map(|x| completion_logprobs(&x.logprobs));
            json!({"id": id, "object": "text_completion", "created": created, "model": model,
                   "choices": [{"index": 0, "text": delta.map_or(String::new(), |x| x.content.clone()), "logprobs": lp, "finish_reason": finish.map(FinishReason::as_str)}]})
        };
        if usage_null {
            c["usage"] = Value::Null;
        }
        c
    };
    let include_usage = p.include_usage;
    let logprobs = p.logprobs.is_some();
    let events = async_stream(move |tx| async move {
        let (mut run, mut out) = (run, out);
        let send = |v: Value| tx.send(Ok::<_, std::convert::Infallible>(SseEvent::default().data(v.to_string())));
        if chat && send(chunk(None, None, true, include_usage)).is_err() {
            return;
        }
        loop {
            match run.next(&mut out, logprobs, &app.metrics).await {
                Step::Delta(d) => {
                    if !d.is_empty() && send(chunk(Some(&d), None, false, include_usage)).is_err() {
                        return; // client gone: dropping `run` cancels the generation
                    }
                }
                Step::Done(r, d) => {
                    let _ = send(chunk(Some(&d), Some(r), false, include_usage));
                    if include_usage {
                        let _ = send(json!({"id": usage_id, "object": if chat { "chat.completion.chunk" } else { "text_completion" },
                                            "created": created, "model": app.model, "choices": [], "usage": run.usage(&out)}));
                    }
                    app.metrics.requests_ok.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                Step::Failed(e) => {
                    app.metrics.requests_error.fetch_add(1, Ordering::Relaxed);
                    let _ = send(json!({"error": {"message": format!("generation failed: {e}"), "type": "server_error", "code": 500}}));
                    break;
                }
            }
        }
        let _ = tx.send(Ok(SseEvent::default().data("[DONE]")));
    });
    Sse::new(events).keep_alive(KeepAlive::default()).into_response()
}

/// A stream fed by a task through a channel; dropping the stream (client gone) ends the task at
/// its next send.
fn async_stream<F, Fut>(f: F) -> impl futures_core::Stream<Item = Result<SseEvent, std::convert::Infallible>>
where
    F: FnOnce(tokio::sync::mpsc::UnboundedSender<Result<SseEvent, std::convert::Infallible>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(f(tx));
    ReceiverStream(rx)
}

struct ReceiverStream<T>(tokio::sync::mpsc::UnboundedReceiver<T>);

impl<T> futures_core::Stream for ReceiverStream<T> {
    type Item = T;
    fn poll_next(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Option<T>> {
        self.0.poll_recv(cx)
    }
}

fn router(app: AppState) -> Router {
    let limit = app.cfg.max_body_bytes;
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        .layer(DefaultBodyLimit::max(limit))
        .layer(axum::middleware::from_fn_with_state(app.clone(), refuse_oversized))
        .with_state(app)
}

/// Answers a request whose declared body is over the limit with 413 after reading and dropping
/// that body (up to 16 times the limit). Answering first and closing with the body unread makes
/// the kernel reset the connection, and a client still sending it sees a broken pipe instead of
/// the answer.
async fn refuse_oversized(State(app): State<AppState>, req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    use futures_core::Stream;
    let limit = app.cfg.max_body_bytes;
    let declared = req.headers().get(axum::http::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<usize>().ok());
    let Some(size) = declared.filter(|&n| n > limit) else { return next.run(req).await };
    let mut body = req.into_body().into_data_stream();
    let mut read = 0usize;
    while read <= 16 * limit {
        match std::future::poll_fn(|cx| std::pin::Pin::new(&mut body).poll_next(cx)).await {
            Some(Ok(chunk)) => read += chunk.len(),
            _ => break,
        }
    }
    error_response(ApiError::new(413, "invalid_request_error", format!("the request body of {size} bytes is over the {limit}-byte limit")))
}

/// Rank 0 with the HTTP API: starts the engine thread and serves until SIGINT/SIGTERM.
pub fn serve<B: Backend>(backend: B, opts: RankOptions, cfg: ServerConfig) -> Result<()> {
    let (handle, join) = start_engine(backend, opts.clone());
    serve_with(handle, &opts, cfg, join)
}

/// Serves HTTP for a running engine until a signal, then stops the engine.
pub fn serve_with(engine: EngineHandle, opts: &RankOptions, cfg: ServerConfig, join: std::thread::JoinHandle<Result<()>>) -> Result<()> {
    let ck_config = ModelConfig::load(&opts.model.join("config.json"))?;
    let codec = Arc::new(TextCodec::load(&opts.model)?);
    let defaults = GenerationDefaults::load(&opts.model)?;
    let model = cfg.served_name.clone().unwrap_or_else(|| {
        opts.model.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "duet".into())
    });
    let addr: SocketAddr = cfg.addr.parse().with_context(|| format!("--http {}: not an address like 127.0.0.1:8000", cfg.addr))?;
    let state = engine.state.clone();
    let app = Arc::new(App {
        requests: Mutex::new(engine.requests),
        state: state.clone(),
        codec,
        model,
        eos_ids: defaults.eos_ids(&ck_config.eos_token_ids),
        config: ck_config,
        defaults,
        cfg,
        metrics: Metrics::default(),
        cache_positions: opts.cache_positions,
        created: now_secs(),
        pending: Default::default(),
    });
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(4).enable_all().thread_name("duet-http").build()?;
    let result = rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("cannot listen on {addr}"))?;
        tracing::info!("serving the OpenAI API on http://{addr}");
        eprintln!("duet: serving on http://{addr}");
        let shutdown = async {
            let ctrl_c = tokio::signal::ctrl_c();
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
            tokio::select! {
                _ = ctrl_c => {},
                _ = term.recv() => {},
            }
        };
        axum::serve(listener, router(app)).with_graceful_shutdown(shutdown).await.context("HTTP server")
    });
    state.shutdown.store(true, Ordering::SeqCst);
    let engine = join.join().map_err(|_| anyhow::anyhow!("the engine thread panicked"))?;
    // Give the other ranks a moment to see the shutdown.
    std::thread::sleep(Duration::from_millis(50));
    result.and(engine)
}
