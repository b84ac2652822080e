//! A small byte-level BPE tokenizer in the GLM-5 mould, for the built-in tiny checkpoint:
//! 256 byte tokens, merges learned deterministically from a built-in corpus, then GLM-5's
//! special tokens in their usual order, and a GLM-5-style chat template.

use std::collections::{BTreeMap, HashMap};

use serde_json::json;

/// GLM-5's special tokens, in vocabulary order (the first is the base of the special range).
pub const SPECIAL_TOKENS: &[&str] = &[
    "<|endoftext|>",
    "[MASK]",
    "[gMASK]",
    "[sMASK]",
    "<sop>",
    "<eop>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
    "<|begin_of_image|>",
    "<|end_of_image|>",
    "<|begin_of_video|>",
    "<|end_of_video|>",
    "<|begin_of_audio|>",
    "<|end_of_audio|>",
    "<|begin_of_transcription|>",
    "<|end_of_transcription|>",
    "<|code_prefix|>",
    "<|code_middle|>",
    "<|code_suffix|>",
    "<think>",
    "</think>",
    "<tool_call>",
    "</tool_call>",
    "<tool_response>",
    "</tool_response>",
    "<arg_key>",
    "</arg_key>",
    "<arg_value>",
    "</arg_value>",
    "/nothink",
];

/// GPT-2's reversible map from bytes to printable characters.
fn bytes_to_unicode() -> Vec<char> {
    let mut printable: Vec<u32> = (b'!' as u32..=b'~' as u32).chain(0xA1..=0xAC).chain(0xAE..=0xFF).collect();
    let mut map = vec!['\0'; 256];
    for &b in &printable {
        map[b as usize] = char::from_u32(b).unwrap();
    }
    let mut n = 0;
    for b in 0..256u32 {
        if !printable.contains(&b) {
            map[b as usize] = char::from_u32(256 + n).unwrap();
            printable.push(b);
            n += 1;
        }
    }
    map
}

pub struct BuiltTokenizer {
    /// tokenizer.json contents.
    pub json: serde_json::Value,
    /// Id of each special token, by name.
    pub special_ids: HashMap<&'static str, u32>,
    /// Tokens in the vocabulary (bytes, merges and specials).
    pub len: usize,
}

/// Learns `merges` BPE merges on the built-in corpus.
pub fn build(merges: usize) -> BuiltTokenizer {
    let b2u = bytes_to_unicode();
    let corpus = include_str!("corpus.txt");
    // Pre-split like GPT-2 (a leading space sticks to the word after it).
    let re = fancy_regex::Regex::new(r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+").unwrap();
    let mut word_counts: BTreeMap<Vec<String>, usize> = BTreeMap::new();
    for m in re.find_iter(corpus) {
        let piece = m.unwrap().as_str();
        let symbols: Vec<String> = piece.bytes().map(|b| b2u[b as usize].to_string()).collect();
        *word_counts.entry(symbols).or_default() += 1;
    }
    let mut vocab: Vec<String> = (0..256).map(|b| b2u[b].to_string()).collect();
    let mut merge_list: Vec<(String, String)> = Vec::new();
    let mut words: Vec<(Vec<String>, usize)> = word_counts.into_iter().collect();
    for _ in 0..merges {
        let mut pairs: BTreeMap<(String, String), usize> = BTreeMap::new();
        for (w, c) in &words {
            for p in w.windows(2) {
                *pairs.entry((p[0].clone(), p[1].clone())).or_default() += c;
            }
        }
        // Most frequent pair; the BTreeMap order breaks ties deterministically.
        let Some((best, count)) = pairs.into_iter().max_by(|a, b| a.1.cmp(&b.1).then(b.0.cmp(&a.0))) else { break };
        if count < 2 {
            break;
        }
        let joined = format!("{}{}", best.0, best.1);
        for (w, _) in words.iter_mut() {
            let mut i = 0;
            while i + 1 < w.len() {
                if w[i] == best.0 && w[i + 1] == best.1 {
                    w[i] = joined.clone();
                    w.remove(i + 1);
                }
                i += 1;
            }
        }
        vocab.push(joined);
        merge_list.push(best);
    }
    let mut vocab_json = serde_json::Map::new();
    for (i, t) in vocab.iter().enumerate() {
        vocab_json.insert(t.clone(), json!(i));
    }
    let mut special_ids = HashMap::new();
    let added: Vec<serde_json::Value> = SPECIAL_TOKENS
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let id = vocab.len() + i;
            special_ids.insert(*t, id as u32);
            json!({"id": id, "content": t, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let json = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab_json,
            "merges": merge_list.iter().map(|(a, b)| format!("{a} {b}")).collect::<Vec<_>>(),
        }
    });
    BuiltTokenizer { json, special_ids, len: vocab.len() + SPECIAL_TOKENS.len() }
}

/// A GLM-5-style chat template: `[gMASK]<sop>`, each turn a role token directly followed by its
/// content, reasoning in `<think>…</think>`, and `<|assistant|><think>` (or `</think>` when
/// `enable_thinking` is false) as the generation prompt.
pub const CHAT_TEMPLATE: &str = r#"[gMASK]<sop>
{%- if tools -%}
<|system|>
# Tools

You may call one or more functions to assist with the user query.

<tools>
{% for tool in tools %}
{{ tool | tojson(ensure_ascii=False) }}
{% endfor %}
</tools>
{%- endif -%}
{%- macro text(content) -%}
{%- if content is string -%}{{ content }}
{%- elif content is iterable -%}{%- for part in content -%}{%- if part.type == 'text' -%}{{ part.text }}{%- endif -%}{%- endfor -%}
{%- endif -%}
{%- endmacro -%}
{%- for m in messages -%}
{%- if m.role == 'system' -%}
<|system|>{{ text(m.content) }}
{%- elif m.role == 'user' -%}
<|user|>{{ text(m.content) }}
{%- elif m.role == 'assistant' -%}
<|assistant|>
{%- if m.reasoning_content -%}<think>{{ m.reasoning_content.strip() }}</think>{%- else -%}</think>{%- endif -%}
{{ text(m.content).strip() }}
{%- if m.tool_calls -%}
{%- for tc in m.tool_calls -%}
{%- set f = tc.function if tc.function else tc -%}
<tool_call>{{ f.name }}
{%- set args = f.arguments if f.arguments is mapping else {} -%}
{%- for k, v in args.items() -%}<arg_key>{{ k }}</arg_key><arg_value>{{ v if v is string else v | tojson(ensure_ascii=False) }}</arg_value>{%- endfor -%}
</tool_call>
{%- endfor -%}
{%- endif -%}
{%- elif m.role == 'tool' or m.role == 'observation' -%}
<|observation|><tool_response>{{ text(m.content) }}</tool_response>
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
<|assistant|>{%- if enable_thinking is defined and not enable_thinking -%}</think>{%- else -%}<think>{%- endif -%}
{%- endif -%}"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_a_loadable_deterministic_tokenizer() {
        let a = build(120);
        let b = build(120);
        assert_eq!(a.json, b.json);
        let tok: tokenizers::Tokenizer = a.json.to_string().parse().unwrap();
        let ids = tok.encode("Hello world, the model moves.", false).unwrap().get_ids().to_vec();
        assert!(ids.len() < 20, "merges should compress common words: {ids:?}");
        assert_eq!(tok.decode(&ids, false).unwrap(), "Hello world, the model moves.");
        let g = a.special_ids["[gMASK]"];
        let ids = tok.encode("[gMASK]<sop><|user|>hi", false).unwrap().get_ids().to_vec();
        assert_eq!(ids[0], g);
        assert_eq!(ids[1], a.special_ids["<sop>"]);
    }
}
