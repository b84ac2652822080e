//! Where each part of the model lives: bytes per layer read from the checkpoint headers, and
//! the split of layers over pipeline ranks that balances bytes (not layer counts).

use std::ops::Range;

use crate::checkpoint::Checkpoint;

/// Bytes of one decoder layer, split into what stays resident and the routed experts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LayerBytes {
    pub resident: usize,
    pub experts: usize,
}

impl LayerBytes {
    pub fn total(&self) -> usize {
        self.resident + self.experts
    }
}

/// The model's bytes by part, from the checkpoint headers (nothing is read).
#[derive(Clone, Debug, Default)]
pub struct ModelBytes {
    pub embed: usize,
    /// Final norm and `lm_head`.
    pub head: usize,
    pub layers: Vec<LayerBytes>,
    pub mtp: LayerBytes,
}

impl ModelBytes {
    pub fn of(ck: &Checkpoint) -> ModelBytes {
        let c = &ck.config;
        let mut m = ModelBytes { layers: vec![LayerBytes::default(); c.num_hidden_layers], ..Default::default() };
        for name in ck.tensor_names() {
            let Ok(t) = ck.tensor(name) else { continue };
            let n = t.nbytes();
            if name.starts_with("model.embed_tokens.") {
                m.embed += n;
            } else if name.starts_with("lm_head.") || name.starts_with("model.norm.") {
                m.head += n;
            } else if let Some(rest) = name.strip_prefix("model.layers.") {
                let idx: Option<usize> = rest.split('.').next().and_then(|s| s.parse().ok());
                let expert = rest.contains(".mlp.experts.");
                let slot = match idx {
                    Some(i) if i < c.num_hidden_layers => &mut m.layers[i],
                    Some(_) => &mut m.mtp,
                    None => continue,
                };
                if expert {
                    slot.experts += n;
                } else {
                    slot.resident += n;
                }
            }
        }
        m
    }
}

/// Contiguous layer ranges for `ranks` stages minimizing the largest stage's bytes. Rank 0
/// also holds the embedding; the last rank the head and the MTP layer.
pub fn split_layers(m: &ModelBytes, ranks: usize) -> Vec<Range<usize>> {
    let l = m.layers.len();
    let ranks = ranks.clamp(1, l.max(1));
    let prefix: Vec<usize> = std::iter::once(0).chain(m.layers.iter().scan(0, |s, b| {
        *s += b.total();
        Some(*s)
    })).collect();
    let extra = |rank: usize| {
        let mut e = 0;
        if rank == 0 {
            e += m.embed;
        }
        if rank == ranks - 1 {
            e += m.head + m.mtp.total();
        }
        e
    };
    // best[r][i]: smallest possible max stage bytes placing layers 0..i on ranks 0..r.
    let inf = usize::MAX;
    let mut best = vec![vec![inf; l + 1]; ranks + 1];
    let mut cut = vec![vec![0usize; l + 1]; ranks + 1];
    best[0][0] = 0;
    for r in 1..=ranks {
        for i in 0..=l {
            for j in 0..=i {
                if best[r - 1][j] == inf || (i == j && l > 0) {
                    continue;
                }
                let stage = prefix[i] - prefix[j] + extra(r - 1);
                let v = best[r - 1][j].max(stage);
                if v < best[r][i] {
                    best[r][i] = v;
                    cut[r][i] = j;
                }
            }
        }
    }
    let mut ranges = vec![0..0; ranks];
    let mut end = l;
    for r in (1..=ranks).rev() {
        let start = cut[r][end];
        ranges[r - 1] = start..end;
        end = start;
    }
    ranges
}

/// Parses a `--split` override such as `40` (two ranks) or `26,52` (three ranks): the first
/// layer of every rank after the first.
pub fn parse_split(spec: &str, layers: usize, ranks: usize) -> anyhow::Result<Vec<Range<usize>>> {
    let cuts: Vec<usize> = spec
        .split(',')
        .map(|s| s.trim().parse::<usize>().map_err(|_| anyhow::anyhow!("--split: '{s}' is not a layer index")))
        .collect::<anyhow::Result<_>>()?;
    if cuts.len() + 1 != ranks {
        anyhow::bail!("--split names {} cut points, {ranks} ranks need {}", cuts.len(), ranks - 1);
    }
    let mut bounds = vec![0];
    bounds.extend(&cuts);
    bounds.push(layers);
    if bounds.windows(2).any(|w| w[0] >= w[1]) {
        anyhow::bail!("--split {spec}: cut points must increase strictly within 1..{layers}");
    }
    Ok(bounds.windows(2).map(|w| w[0]..w[1]).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(layers: &[usize], embed: usize, head: usize, mtp: usize) -> ModelBytes {
        ModelBytes {
            embed,
            head,
            layers: layers.iter().map(|&e| LayerBytes { resident: 0, experts: e }).collect(),
            mtp: LayerBytes { resident: mtp, experts: 0 },
        }
    }

    #[test]
    fn balances_bytes_not_layers() {
        // Three small dense layers then heavy MoE layers; the head weighs on the last rank.
        let m = bytes(&[1, 1, 1, 10, 10, 10, 10, 10], 0, 10, 0);
        let r = split_layers(&m, 2);
        assert_eq!(r, vec![0..6, 6..8]);
        let r3 = split_layers(&m, 3);
        assert_eq!(r3.len(), 3);
        assert!(r3.iter().all(|r| !r.is_empty()));
        assert_eq!(r3.last().unwrap().end, 8);
    }

    #[test]
    fn split_override() {
        assert_eq!(parse_split("26,52", 78, 3).unwrap(), vec![0..26, 26..52, 52..78]);
        assert!(parse_split("52,26", 78, 3).is_err());
        assert!(parse_split("40", 78, 3).is_err());
    }
}
