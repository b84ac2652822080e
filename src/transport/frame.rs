//! What travels between ranks: a small header, archived with rkyv and validated on receipt,
//! followed by a raw payload (f32 activations `[rows, cols]`, then optionally a DSA selection
//! `[rows, topk]` of i32). The header says which sequences and positions the rows are, what to
//! sample, which sequences are finished, and (on the way back) what was sampled.

use anyhow::{anyhow, bail, Result};
use rkyv::rancor;

/// Bytes reserved for the archived header in front of the payload (shm slots); a header that
/// does not fit is an error, never a truncation.
pub const HEADER_AREA: usize = 256 * 1024;
/// Payloads start on this boundary, so they can be DMA'd directly.
pub const PAYLOAD_ALIGN: usize = 256;

#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameKind {
    /// Residual stream of a step, flowing to the next stage.
    Activations,
    /// Sampled tokens, from the last stage back to rank 0.
    Tokens,
    /// Orderly stop.
    Shutdown,
    /// Benchmark traffic: payload only.
    Bench,
}

#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct WireSegment {
    pub seq: u64,
    pub start: u32,
    pub len: u32,
}

/// How to sample the token after a segment (present only for segments that end in a sample).
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Clone, Copy, Debug, PartialEq)]
pub struct WireSampling {
    pub seq: u64,
    pub temperature: f32,
    pub top_p: f32,
    pub top_k: u32,
    pub min_p: f32,
    pub seed: u64,
    /// Whether to return the token's log-probability, and how many top alternatives with it.
    pub logprobs: bool,
    pub top_logprobs: u32,
}

#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Clone, Debug, PartialEq)]
pub struct WireToken {
    pub seq: u64,
    pub token: u32,
    /// Log-probability of the token and the top alternatives, when asked for (0 and empty otherwise).
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

/// How the DSA selection of the previous stage travels (needed when a stage starts with an
/// IndexShare "shared" layer).
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum WireSelection {
    None,
    /// Every visible position.
    All,
    /// `[rows, topk]` i32 after the activations.
    Chosen { topk: u32 },
}

#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Clone, Debug, PartialEq)]
pub struct FrameHeader {
    pub kind: FrameKind,
    /// Per-link frame counter; a gap or repeat is an error.
    pub step: u64,
    pub segments: Vec<WireSegment>,
    /// Input token of every row.
    pub tokens: Vec<u32>,
    pub sampling: Vec<WireSampling>,
    /// Sequences finished since the last frame: free their caches.
    pub release: Vec<u64>,
    pub results: Vec<WireToken>,
    pub rows: u32,
    pub cols: u32,
    pub selection: WireSelection,
    pub payload_len: u64,
}

impl FrameHeader {
    pub fn new(kind: FrameKind) -> FrameHeader {
        FrameHeader {
            kind,
            step: 0,
            segments: vec![],
            tokens: vec![],
            sampling: vec![],
            release: vec![],
            results: vec![],
            rows: 0,
            cols: 0,
            selection: WireSelection::None,
            payload_len: 0,
        }
    }

    /// The payload size the header implies.
    pub fn implied_payload(&self) -> u64 {
        let act = self.rows as u64 * self.cols as u64 * 4;
        let sel = match self.selection {
            WireSelection::Chosen { topk } => self.rows as u64 * topk as u64 * 4,
            _ => 0,
        };
        act + sel
    }

    /// Consistency of a received header with itself and with the link.
    pub fn validate(&self, expect_step: u64, hidden: Option<usize>) -> Result<()> {
        if self.step != expect_step {
            bail!("frame out of order: step {} where {expect_step} was expected", self.step);
        }
        if self.payload_len != self.implied_payload() {
            bail!("frame {}: payload of {} bytes, header implies {}", self.step, self.payload_len, self.implied_payload());
        }
        if self.kind == FrameKind::Activations {
            let rows: u64 = self.segments.iter().map(|s| s.len as u64).sum();
            if rows != self.rows as u64 || self.tokens.len() as u64 != rows {
                bail!("frame {}: {} rows, segments cover {rows}, {} tokens", self.step, self.rows, self.tokens.len());
            }
            if let Some(h) = hidden {
                if self.cols as usize != h {
                    bail!("frame {}: activations of width {}, this model's hidden size is {h}", self.step, self.cols);
                }
            }
        }
        Ok(())
    }

    pub fn encode(&self) -> Result<rkyv::util::AlignedVec> {
        rkyv::to_bytes::<rancor::Error>(self).map_err(|e| anyhow!("cannot encode frame header: {e}"))
    }

    /// Decodes and validates the archive structure (bytecheck). `bytes` must be 16-byte aligned.
    pub fn decode(bytes: &[u8]) -> Result<FrameHeader> {
        rkyv::from_bytes::<FrameHeader, rancor::Error>(bytes).map_err(|e| anyhow!("corrupt frame header: {e}"))
    }
}

/// A received frame with its payload copied out (for transports that cannot lend memory).
#[derive(Debug, Clone, PartialEq)]
pub struct Frame {
    pub header: FrameHeader,
    pub payload: Vec<u8>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_validation() {
        let mut h = FrameHeader::new(FrameKind::Activations);
        h.step = 7;
        h.segments = vec![WireSegment { seq: 3, start: 10, len: 2 }];
        h.tokens = vec![5, 6];
        h.rows = 2;
        h.cols = 4;
        h.payload_len = 32;
        let bytes = h.encode().unwrap();
        let back = FrameHeader::decode(&bytes).unwrap();
        assert_eq!(back, h);
        back.validate(7, Some(4)).unwrap();
        assert!(back.validate(8, Some(4)).unwrap_err().to_string().contains("out of order"));
        assert!(back.validate(7, Some(6)).is_err());
        // Flipped bytes are caught by validation, never trusted.
        let mut bad = bytes.to_vec();
        let n = bad.len();
        for b in &mut bad[n - 24..] {
            *b ^= 0xa5;
        }
        let mut aligned = rkyv::util::AlignedVec::<16>::new();
        aligned.extend_from_slice(&bad);
        assert!(FrameHeader::decode(&aligned).is_err() || FrameHeader::decode(&aligned).unwrap() != h);
        let mut short = rkyv::util::AlignedVec::<16>::new();
        short.extend_from_slice(&bytes[..bytes.len() / 2]);
        assert!(FrameHeader::decode(&short).is_err());
    }
}
