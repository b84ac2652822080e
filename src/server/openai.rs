//! OpenAI request parsing and validation: every field is checked, and a bad one is a 400 with
//! OpenAI's error JSON naming the parameter.

use serde_json::{json, Map, Value};

use crate::sampling::SamplingParams;
use crate::text::{GenerationDefaults, Message};

/// An API error: HTTP status, OpenAI error type, message and the offending parameter.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: u16,
    pub kind: &'static str,
    pub message: String,
    pub param: Option<String>,
}

impl ApiError {
    pub fn bad(param: &str, message: impl Into<String>) -> ApiError {
        ApiError { status: 400, kind: "invalid_request_error", message: message.into(), param: Some(param.to_string()) }
    }

    pub fn new(status: u16, kind: &'static str, message: impl Into<String>) -> ApiError {
        ApiError { status, kind, message: message.into(), param: None }
    }

    pub fn body(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.status}})
    }
}

/// What a request asks the engine and the text layer for.
#[derive(Clone, Debug)]
pub struct GenParams {
    pub max_tokens: Option<usize>,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    pub stop_token_ids: Vec<u32>,
    pub ignore_eos: bool,
    /// Alternatives per token to report; None = no log-probabilities.
    pub logprobs: Option<usize>,
    pub stream: bool,
    pub include_usage: bool,
}

type Obj = Map<String, Value>;

fn opt_f32(o: &Obj, k: &str) -> Result<Option<f32>, ApiError> {
    match o.get(k) {
        None | Some(Value::Null) => Ok(None),
        // Finite as f32 too (1e39 would become infinity).
        Some(v) => v.as_f64().map(|x| x as f32).filter(|x| x.is_finite()).map(Some).ok_or_else(|| ApiError::bad(k, format!("'{k}' must be a number"))),
    }
}

fn opt_i64(o: &Obj, k: &str) -> Result<Option<i64>, ApiError> {
    match o.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_i64().map(Some).ok_or_else(|| ApiError::bad(k, format!("'{k}' must be an integer"))),
    }
}

fn opt_bool(o: &Obj, k: &str) -> Result<Option<bool>, ApiError> {
    match o.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_bool().map(Some).ok_or_else(|| ApiError::bad(k, format!("'{k}' must be a boolean"))),
    }
}

/// Parses the request body as a JSON object.
pub fn body_object(bytes: &[u8]) -> Result<Obj, ApiError> {
    let v: Value = serde_json::from_slice(bytes).map_err(|e| ApiError::new(400, "invalid_request_error", format!("the body is not valid JSON: {e}")))?;
    match v {
        Value::Object(o) => Ok(o),
        _ => Err(ApiError::new(400, "invalid_request_error", "the body must be a JSON object")),
    }
}

/// Checks `model` against the served name.
pub fn check_model(o: &Obj, served: &str) -> Result<(), ApiError> {
    match o.get("model") {
        None | Some(Value::Null) => Ok(()),
        Some(Value::String(m)) if m == served => Ok(()),
        Some(Value::String(m)) => Err(ApiError::bad("model", format!("the model '{m}' does not exist; this server serves '{served}'"))),
        Some(_) => Err(ApiError::bad("model", "'model' must be a string")),
    }
}

/// Sampling and output parameters shared by chat and completions.
pub fn gen_params(o: &Obj, defaults: &GenerationDefaults, chat: bool) -> Result<GenParams, ApiError> {
    let max_tokens = match opt_i64(o, "max_completion_tokens")?.or(opt_i64(o, "max_tokens")?) {
        Some(n) if n < 1 => return Err(ApiError::bad("max_tokens", "'max_tokens' must be at least 1")),
        Some(n) => Some(n as usize),
        None => None,
    };
    if let Some(n) = opt_i64(o, "n")? {
        if n != 1 {
            return Err(ApiError::bad("n", "only n = 1 is supported"));
        }
    }
    for k in ["presence_penalty", "frequency_penalty"] {
        if opt_f32(o, k)?.is_some_and(|v| v != 0.0) {
            return Err(ApiError::bad(k, format!("'{k}' other than 0 is not supported")));
        }
    }
    if opt_f32(o, "repetition_penalty")?.is_some_and(|v| v != 1.0) {
        return Err(ApiError::bad("repetition_penalty", "'repetition_penalty' other than 1 is not supported"));
    }
    if opt_bool(o, "echo")? == Some(true) {
        return Err(ApiError::bad("echo", "'echo' is not supported"));
    }
    let temperature = opt_f32(o, "temperature")?.or(defaults.temperature).unwrap_or(1.0);
    if temperature < 0.0 {
        return Err(ApiError::bad("temperature", "'temperature' must be at least 0"));
    }
    let top_p = opt_f32(o, "top_p")?.or(defaults.top_p).unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::bad("top_p", "'top_p' must be in (0, 1]"));
    }
    let top_k = match opt_i64(o, "top_k")? {
        Some(k) if k < -1 => return Err(ApiError::bad("top_k", "'top_k' must be -1, 0 or positive")),
        Some(k) if k <= 0 => 0,
        Some(k) => k as usize,
        None => defaults.top_k.unwrap_or(0),
    };
    let min_p = opt_f32(o, "min_p")?.unwrap_or(0.0);
    if !(0.0..=1.0).contains(&min_p) {
        return Err(ApiError::bad("min_p", "'min_p' must be in [0, 1]"));
    }
    let seed = match o.get("seed") {
        None | Some(Value::Null) => None,
        Some(v) => Some(v.as_i64().map(|s| s as u64).or_else(|| v.as_u64()).ok_or_else(|| ApiError::bad("seed", "'seed' must be an integer"))?),
    };
    let stop = match o.get("stop") {
        None | Some(Value::Null) => vec![],
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .map(|s| s.as_str().map(str::to_string).ok_or_else(|| ApiError::bad("stop", "'stop' must be a string or a list of strings")))
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(ApiError::bad("stop", "'stop' must be a string or a list of strings")),
    };
    if stop.iter().any(String::is_empty) {
        return Err(ApiError::bad("stop", "stop strings must not be empty"));
    }
    let stop_token_ids = match o.get("stop_token_ids") {
        None | Some(Value::Null) => vec![],
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| v.as_u64().map(|x| x as u32).ok_or_else(|| ApiError::bad("stop_token_ids", "'stop_token_ids' must be a list of token ids")))
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(ApiError::bad("stop_token_ids", "'stop_token_ids' must be a list of token ids")),
    };
    let logprobs = if chat {
        let want = opt_bool(o, "logprobs")?.unwrap_or(false);
        let top = opt_i64(o, "top_logprobs")?;
        match (want, top) {
            (_, Some(t)) if !(0..=20).contains(&t) => return Err(ApiError::bad("top_logprobs", "'top_logprobs' must be between 0 and 20")),
            (false, Some(t)) if t > 0 => return Err(ApiError::bad("top_logprobs", "'top_logprobs' needs 'logprobs': true")),
            (true, t) => Some(t.unwrap_or(0) as usize),
            (false, _) => None,
        }
    } else {
        match opt_i64(o, "logprobs")? {
            Some(t) if !(0..=20).contains(&t) => return Err(ApiError::bad("logprobs", "'logprobs' must be between 0 and 20")),
            Some(t) => Some(t as usize),
            None => None,
        }
    };
    let stream = opt_bool(o, "stream")?.unwrap_or(false);
    let include_usage = match o.get("stream_options") {
        None | Some(Value::Null) => false,
        Some(Value::Object(so)) => opt_bool(so, "include_usage")?.unwrap_or(false),
        Some(_) => return Err(ApiError::bad("stream_options", "'stream_options' must be an object")),
    };
    Ok(GenParams {
        max_tokens,
        sampling: SamplingParams { temperature, top_p, top_k, min_p, seed },
        stop,
        stop_token_ids,
        ignore_eos: opt_bool(o, "ignore_eos")?.unwrap_or(false),
        logprobs,
        stream,
        include_usage,
    })
}

/// The `messages` of a chat request.
pub fn messages(o: &Obj) -> Result<Vec<Message>, ApiError> {
    let list = o.get("messages").and_then(Value::as_array).ok_or_else(|| ApiError::bad("messages", "'messages' must be a non-empty list"))?;
    if list.is_empty() {
        return Err(ApiError::bad("messages", "'messages' must be a non-empty list"));
    }
    list.iter()
        .enumerate()
        .map(|(i, m)| {
            let msg: Message = serde_json::from_value(m.clone()).map_err(|e| ApiError::bad(&format!("messages[{i}]"), format!("invalid message: {e}")))?;
            if !["system", "developer", "user", "assistant", "tool", "observation"].contains(&msg.role.as_str()) {
                return Err(ApiError::bad(&format!("messages[{i}].role"), format!("unknown role '{}'", msg.role)));
            }
            match &msg.content {
                Value::String(_) | Value::Null | Value::Array(_) => Ok(msg),
                _ => Err(ApiError::bad(&format!("messages[{i}].content"), "content must be a string or a list of parts")),
            }
        })
        .collect()
}

/// The `prompt` of a completions request: text, or token ids.
pub enum PromptSpec {
    Text(String),
    Ids(Vec<u32>),
}

pub fn prompt(o: &Obj) -> Result<PromptSpec, ApiError> {
    match o.get("prompt") {
        Some(Value::String(s)) => Ok(PromptSpec::Text(s.clone())),
        Some(Value::Array(a)) if !a.is_empty() && a.iter().all(Value::is_u64) => Ok(PromptSpec::Ids(a.iter().map(|v| v.as_u64().unwrap() as u32).collect())),
        Some(Value::Array(a)) if a.len() == 1 && a[0].is_string() => Ok(PromptSpec::Text(a[0].as_str().unwrap().to_string())),
        Some(Value::Array(_)) => Err(ApiError::bad("prompt", "'prompt' must be a string, one string in a list, or a list of token ids (batches are not supported)")),
        _ => Err(ApiError::bad("prompt", "'prompt' is required: a string or a list of token ids")),
    }
}
