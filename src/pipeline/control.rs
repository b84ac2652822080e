//! Control-plane messages between rank 0 and the other ranks (JSON on a QUIC stream).

use serde::{Deserialize, Serialize};

use crate::transport::TransportKind;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type")]
pub enum Control {
    /// A rank introduces itself.
    Hello { rank: usize, world: usize, build: String, fingerprint: String, transport: TransportKind },
    /// Rank 0 accepts it and says which layers each rank owns.
    /// `max_rows`: the most token rows one step carries (rank 0's prefill chunk or batch, whichever
    /// is larger), which sizes every link's frames.
    Welcome { layers: Vec<(usize, usize)>, cache_positions: usize, max_rows: usize },
    /// Rank 0 refuses it (different build or checkpoint, wrong world size...).
    Refuse { reason: String },
    /// The rank has loaded its layers and connected its links.
    Ready { placement: String, loaded_bytes: u64 },
    /// Something failed: drop everything.
    Abort { reason: String },
    /// Orderly stop.
    Shutdown,
}
