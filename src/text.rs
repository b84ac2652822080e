//! Text in and out: `tokenizer.json` through the `tokenizers` crate, and the chat template
//! (`chat_template.jinja`, or `chat_template` in `tokenizer_config.json`) through minijinja with
//! Python-style string and dict methods, rendered as transformers' `apply_chat_template` does
//! (trim_blocks, lstrip_blocks, `raise_exception`, `strftime_now`, `tojson`).

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use minijinja::{Environment, Error as JinjaError, ErrorKind, Value};
use serde::Serialize;
use serde_json::json;

/// A chat message as the OpenAI API and the GLM template know it.
#[derive(Clone, Debug, Default, Serialize, serde::Deserialize, PartialEq)]
pub struct Message {
    pub role: String,
    #[serde(default)]
    pub content: serde_json::Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Message {
        Message { role: role.into(), content: json!(content), ..Default::default() }
    }
}

pub struct TextCodec {
    tokenizer: tokenizers::Tokenizer,
    /// The chat template compiled once (as "chat"), or why it does not compile; None when the
    /// checkpoint has none. A broken template fails chat requests only, not the load.
    template: Option<std::result::Result<Environment<'static>, String>>,
    /// Token strings (bos, eos, ...) the template may reference.
    special: serde_json::Map<String, serde_json::Value>,
}

impl TextCodec {
    /// Loads `tokenizer.json` and the chat template from a checkpoint directory.
    pub fn load(dir: &Path) -> Result<TextCodec> {
        let tok_path = dir.join("tokenizer.json");
        if !tok_path.exists() {
            bail!("{} has no tokenizer.json", dir.display());
        }
        let tokenizer = tokenizers::Tokenizer::from_file(&tok_path)
            .map_err(|e| anyhow!("{}: cannot load tokenizer: {e}", tok_path.display()))?;
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg: serde_json::Value = if cfg_path.exists() {
            let text = std::fs::read_to_string(&cfg_path).with_context(|| format!("cannot read {}", cfg_path.display()))?;
            serde_json::from_str(&text).map_err(|e| anyhow!("{}: bad JSON: {e}", cfg_path.display()))?
        } else {
            json!({})
        };
        let jinja = dir.join("chat_template.jinja");
        let template = if jinja.exists() {
            Some(std::fs::read_to_string(&jinja).with_context(|| format!("cannot read {}", jinja.display()))?)
        } else {
            match cfg.get("chat_template") {
                Some(serde_json::Value::String(s)) => Some(s.clone()),
                // A list of named templates: take "default".
                Some(serde_json::Value::Array(list)) => list
                    .iter()
                    .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                    .and_then(|t| t.get("template").and_then(|s| s.as_str()).map(str::to_string)),
                _ => None,
            }
        };
        let mut special = serde_json::Map::new();
        for key in ["bos_token", "eos_token", "pad_token", "unk_token"] {
            let v = match cfg.get(key) {
                Some(serde_json::Value::String(s)) => json!(s),
                Some(serde_json::Value::Object(o)) => o.get("content").cloned().unwrap_or(json!("")),
                _ => json!(""),
            };
            special.insert(key.into(), v);
        }
        let template = template.map(|src| {
            let mut env = template_env();
            env.add_template_owned("chat", src).map(|_| env).map_err(|e| format!("chat template: {e:#}"))
        });
        Ok(TextCodec { tokenizer, template, special })
    }

    pub fn has_chat_template(&self) -> bool {
        self.template.is_some()
    }

    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self.tokenizer.encode(text, add_special_tokens).map_err(|e| anyhow!("tokenizer: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.tokenizer.decode(ids, skip_special_tokens).map_err(|e| anyhow!("tokenizer: {e}"))
    }

    /// Text of `ids` decoded from `from` on, given the text of `ids[..from]` is already out:
    /// the window starts a few tokens earlier so that tokenizers whose decoding depends on the
    /// preceding token (leading-space rules) give the same text as decoding everything.
    pub fn decode_tail(&self, ids: &[u32], from: usize) -> Result<String> {
        let start = from.saturating_sub(TAIL_CONTEXT);
        let before = self.decode(&ids[start..from], true)?;
        let all = self.decode(&ids[start..], true)?;
        match all.strip_prefix(&before) {
            Some(tail) => Ok(tail.to_string()),
            // The context decodes differently once more tokens follow: fall back to everything.
            None => {
                let whole = self.decode(ids, true)?;
                let done = self.decode(&ids[..from], true)?;
                Ok(whole.strip_prefix(&done).unwrap_or(&whole).to_string())
            }
        }
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.tokenizer.token_to_id(token)
    }

    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    /// Renders the chat template. `extra` holds template switches such as
    /// `enable_thinking`; `tools` the OpenAI tool list.
    pub fn apply_chat_template(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        tools: Option<&serde_json::Value>,
        extra: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<String> {
        let env = self.template.as_ref().context("the checkpoint has no chat template")?.as_ref().map_err(|e| anyhow!("{e}"))?;
        let tmpl = env.get_template("chat").map_err(|e| anyhow!("chat template: {e:#}"))?;
        let mut ctx = self.special.clone();
        ctx.insert("messages".into(), serde_json::to_value(messages)?);
        ctx.insert("add_generation_prompt".into(), json!(add_generation_prompt));
        if let Some(t) = tools {
            ctx.insert("tools".into(), t.clone());
        }
        for (k, v) in extra {
            ctx.insert(k.clone(), v.clone());
        }
        tmpl.render(jinja_value(serde_json::Value::Object(ctx))).map_err(|e| anyhow!("chat template: {e:#}"))
    }
}

/// Tokens of context before a decoded tail (see `TextCodec::decode_tail`).
const TAIL_CONTEXT: usize = 4;

/// Streams the text of a growing token list: each call decodes only the tokens since the last
/// final text (plus a little context), so a long generation costs linear, not quadratic, time.
/// Text ending in a replacement character may be half a UTF-8 sequence and is held back until
/// more tokens complete it (or `finish`).
#[derive(Default)]
pub struct IncrementalText {
    pub ids: Vec<u32>,
    /// Tokens whose text is final and in `text`.
    done: usize,
    /// The final text so far.
    pub text: String,
}

impl IncrementalText {
    /// Moves newly final text into `text`; with `finish`, everything.
    pub fn advance(&mut self, codec: &TextCodec, finish: bool) {
        if self.done == self.ids.len() {
            return;
        }
        let tail = codec.decode_tail(&self.ids, self.done).unwrap_or_default();
        if finish || !tail.ends_with('\u{fffd}') {
            self.text.push_str(&tail);
            self.done = self.ids.len();
        }
    }
}

/// A JSON value as a template value (maps keep their order).
fn jinja_value(v: serde_json::Value) -> Value {
    <Value as serde::Deserialize>::deserialize(v).expect("JSON always converts")
}

/// A minijinja environment configured like transformers' chat-template sandbox.
fn template_env() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_syntax(
        minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .expect("default delimiters are valid"),
    );
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", |msg: String| -> Result<Value, JinjaError> {
        Err(JinjaError::new(ErrorKind::InvalidOperation, msg))
    });
    env.add_function("strftime_now", |fmt: String| -> Result<Value, JinjaError> { Ok(Value::from(strftime_now(&fmt))) });
    env.add_filter("tojson", tojson);
    env
}

/// `json.dumps(value, ensure_ascii=False, indent=indent)` as Python writes it.
fn tojson(value: Value, kwargs: minijinja::value::Kwargs) -> Result<Value, JinjaError> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let _: Option<bool> = kwargs.get("ensure_ascii")?;
    let _: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let v = serde_json::to_value(&value).map_err(|e| JinjaError::new(ErrorKind::InvalidOperation, e.to_string()))?;
    let mut out = String::new();
    python_json(&v, indent, 0, &mut out);
    Ok(Value::from_safe_string(out))
}

fn python_json(v: &serde_json::Value, indent: Option<usize>, level: usize, out: &mut String) {
    let (open_sep, item_sep, close_sep) = match indent {
        Some(n) => (format!("\n{}", " ".repeat(n * (level + 1))), format!(",\n{}", " ".repeat(n * (level + 1))), format!("\n{}", " ".repeat(n * level))),
        None => (String::new(), ", ".to_string(), String::new()),
    };
    match v {
        serde_json::Value::Array(a) if !a.is_empty() => {
            out.push('[');
            out.push_str(&open_sep);
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push_str(&item_sep);
                }
                python_json(x, indent, level + 1, out);
            }
            out.push_str(&close_sep);
            out.push(']');
        }
        serde_json::Value::Object(o) if !o.is_empty() => {
            out.push('{');
            out.push_str(&open_sep);
            for (i, (k, x)) in o.iter().enumerate() {
                if i > 0 {
                    out.push_str(&item_sep);
                }
                out.push_str(&serde_json::to_string(k).unwrap());
                out.push_str(": ");
                python_json(x, indent, level + 1, out);
            }
            out.push_str(&close_sep);
            out.push('}');
        }
        other => out.push_str(&serde_json::to_string(other).unwrap()),
    }
}

/// The handful of `strftime` codes chat templates use, for the current UTC date.
fn strftime_now(fmt: &str) -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()) as i64;
    let days = secs.div_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + if m <= 2 { 1 } else { 0 };
    const MONTHS: [&str; 12] = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October", "November", "December"];
    let secs_of_day = secs.rem_euclid(86_400);
    fmt.replace("%Y", &format!("{y:04}"))
        .replace("%m", &format!("{m:02}"))
        .replace("%d", &format!("{d:02}"))
        .replace("%B", MONTHS[(m - 1) as usize])
        .replace("%b", &MONTHS[(m - 1) as usize][..3])
        .replace("%H", &format!("{:02}", secs_of_day / 3600))
        .replace("%M", &format!("{:02}", secs_of_day / 60 % 60))
}

/// Generation defaults from `generation_config.json`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GenerationDefaults {
    pub eos_token_ids: Vec<u32>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<usize>,
}

impl GenerationDefaults {
    /// The tokens that end generation: config.json's EOS ids, then generation_config.json's
    /// others.
    pub fn eos_ids(&self, config_eos: &[u32]) -> Vec<u32> {
        let mut ids = config_eos.to_vec();
        ids.extend(self.eos_token_ids.iter().filter(|i| !config_eos.contains(i)));
        ids
    }

    pub fn load(dir: &Path) -> Result<GenerationDefaults> {
        let path = dir.join("generation_config.json");
        if !path.exists() {
            return Ok(GenerationDefaults::default());
        }
        let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| anyhow!("{}: bad JSON: {e}", path.display()))?;
        let eos = match v.get("eos_token_id") {
            Some(serde_json::Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
            Some(serde_json::Value::Array(a)) => a.iter().filter_map(|x| x.as_u64().map(|x| x as u32)).collect(),
            _ => vec![],
        };
        Ok(GenerationDefaults {
            eos_token_ids: eos,
            temperature: v.get("temperature").and_then(|x| x.as_f64()).map(|x| x as f32),
            top_p: v.get("top_p").and_then(|x| x.as_f64()).map(|x| x as f32),
            top_k: v.get("top_k").and_then(|x| x.as_u64()).map(|x| x as usize),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Streaming text equals decoding everything at once, over random byte-level BPE tokens
    /// (single bytes split UTF-8 sequences, specials are skipped), and is final as it goes.
    #[test]
    fn incremental_text_equals_full_decode() {
        let tok = crate::tiny::tokenizer::build(200);
        let dir = std::env::temp_dir().join(format!("duet-text-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("tokenizer.json"), tok.json.to_string()).unwrap();
        let codec = TextCodec::load(&dir).unwrap();
        let mut rng = crate::sampling::Rng::new(3);
        for _ in 0..20 {
            let mut inc = IncrementalText::default();
            for _ in 0..60 {
                inc.ids.push((rng.next_u64() % tok.len as u64) as u32);
                inc.advance(&codec, false);
                let full = codec.decode(&inc.ids, true).unwrap();
                assert!(full.starts_with(&inc.text), "{:?} is not final in {full:?}", inc.text);
            }
            inc.advance(&codec, true);
            assert_eq!(inc.text, codec.decode(&inc.ids, true).unwrap());
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn python_style_json() {
        let mut s = String::new();
        python_json(&json!({"a": [1, "é"], "b": {}}), None, 0, &mut s);
        assert_eq!(s, r#"{"a": [1, "é"], "b": {}}"#);
    }

    #[test]
    fn template_methods_and_trimming() {
        let env = template_env();
        let t = env
            .template_from_str("{% for m in messages %}\n  <{{ m.role|upper }}>{{ m.content.strip() }}\n{% endfor %}{{ x|tojson }}")
            .unwrap();
        let out = t
            .render(jinja_value(json!({"messages": [{"role": "user", "content": "  hi "}], "x": {"k": "<v>"}})))
            .unwrap();
        assert_eq!(out, "  <USER>hi\n{\"k\": \"<v>\"}");
    }
}
