//! Token sampling: greedy, temperature, top-k, top-p, min-p, seeded per request.

/// Sampling knobs, as the OpenAI API and vLLM name them.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// 1.0 disables nucleus filtering.
    pub top_p: f32,
    /// 0 disables top-k filtering.
    pub top_k: usize,
    /// 0.0 disables min-p filtering.
    pub min_p: f32,
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams { temperature: 0.0, top_p: 1.0, top_k: 0, min_p: 0.0, seed: None }
    }
}

impl SamplingParams {
    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0 || self.top_k == 1
    }
}

/// xoshiro256** seeded through splitmix64: small, fast and reproducible across platforms.
#[derive(Clone, Debug)]
pub struct Rng([u64; 4]);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        let mut x = seed;
        let mut next = || {
            x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        };
        Rng([next(), next(), next(), next()])
    }

    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.0;
        let result = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = self.uniform().max(1e-300);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }
}

/// Index of the largest value; the first one on ties (as `torch.argmax`).
pub fn argmax(x: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in x.iter().enumerate() {
        if *v > x[best] {
            best = i;
        }
    }
    best as u32
}

pub struct Sampler {
    pub params: SamplingParams,
    rng: Rng,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Sampler {
        let seed = params.seed.unwrap_or_else(|| {
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
        });
        Sampler { params, rng: Rng::new(seed) }
    }

    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.params.is_greedy() {
            return argmax(logits);
        }
        // Every draw takes one uniform, whatever the filters.
        let u = self.rng.uniform();
        draw(&self.params, logits, u)
    }

    /// Whether `device_draw` gives the next pick: greedy, or `sampling_on_device` and a
    /// temperature without top-k.
    pub fn draws_on_device(&self) -> bool {
        let p = &self.params;
        p.is_greedy() || (sampling_on_device() && p.top_k == 0)
    }

    /// The next pick as a draw that a backend can make where the logits are (greedy, or a
    /// temperature with top-p and min-p: what OpenAI clients send), taking its uniform now as
    /// `sample` would; None when the pick needs the logits on the host (top-k), and then
    /// `sample` makes it.
    pub fn device_draw(&mut self) -> Option<Draw> {
        let p = &self.params;
        if p.is_greedy() {
            return Some(Draw::Greedy);
        }
        (p.top_k == 0).then(|| Draw::Temperature { temperature: p.temperature, top_p: p.top_p, min_p: p.min_p, u: self.rng.uniform() })
    }
}

/// Whether temperature draws without top-k are made where the logits are
/// (`DUET_DEVICE_SAMPLING`, default on; 0 copies the logits to the host's sampler): greedy
/// picks always are. On the H200 the device's draws were the host's picks (`duet bench check`,
/// sample rows) and took the INT4 slice's decode at temperature 1 from 2.76 to 1.38 ms/token,
/// the same tokens (performance.md, eighteenth session).
pub fn sampling_on_device() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("DUET_DEVICE_SAMPLING").map_or(true, |v| v != "0"))
}

/// A pick that needs no sampler state (`Sampler::device_draw`): backends make it where the
/// logits are (`Backend::sample_rows`), the host with `pick`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Draw {
    /// The first largest logit (`argmax`).
    Greedy,
    /// `sample`'s pick at a temperature with top-p and min-p (1 and 0: none) and the uniform u
    /// in [0, 1): without them, the token whose share of exp(logit / temperature), in token
    /// order, holds u of the total; with them, the same over the best tokens they keep.
    Temperature { temperature: f32, top_p: f32, min_p: f32, u: f64 },
}

/// `d`'s pick from `logits`, as `Sampler::sample` makes it.
pub fn pick(logits: &[f32], d: &Draw) -> u32 {
    match *d {
        Draw::Greedy => argmax(logits),
        Draw::Temperature { temperature, top_p, min_p, u } => draw(&SamplingParams { temperature, top_p, min_p, ..Default::default() }, logits, u),
    }
}

/// A non-greedy pick of `p` from `logits` with the uniform `u`.
fn draw(p: &SamplingParams, logits: &[f32], u: f64) -> u32 {
    let n = logits.len();
    let top_k = p.top_k > 0 && p.top_k < n;
    // The largest logit, where weights can be made of it (finite, and no NaN anywhere).
    let max = if top_k { None } else { finite_max(logits) };
    let Some(max) = max else {
        // Top-k (or logits no weight can be made of): the k best, sorted. With top-k only
        // the k best are selected, then sorted, instead of sorting the whole vocabulary.
        let mut idx: Vec<u32> = (0..n as u32).collect();
        if top_k {
            idx.select_nth_unstable_by(p.top_k - 1, |a, b| better(logits, a, b));
            idx.truncate(p.top_k);
        }
        idx.sort_unstable_by(|a, b| better(logits, a, b));
        let max = logits[idx[0] as usize] as f64;
        let probs: Vec<f64> = idx.iter().map(|&i| ((logits[i as usize] as f64 - max) / p.temperature as f64).exp()).collect();
        let total: f64 = probs.iter().sum();
        return pick_from_head(p, &idx, probs, total, u);
    };
    // The whole vocabulary: every token's weight exp((l - max) / T) (the best token's is 1)
    // in one pass, and only the head that top-p and min-p keep is sorted (sorting all of a
    // real vocabulary took 5.5 ms a token on one core).
    let t = p.temperature as f64;
    let dist = |l: f32| (max as f64 - l as f64) / t; // -ln(weight)
    let weights: Vec<f64> = logits.iter().map(|&l| (-dist(l)).exp()).collect();
    let total: f64 = weights.iter().sum();
    if p.top_p >= 1.0 && p.min_p <= 0.0 {
        // No filter: the inverse distribution function in token order (the last token of
        // any weight when rounding leaves u past the end).
        let mut u = u * total;
        let mut last = 0;
        for (i, &w) in weights.iter().enumerate() {
            if u < w {
                return i as u32;
            }
            if w > 0.0 {
                last = i;
            }
            u -= w;
        }
        return last as u32;
    }
    let idx = head(logits, &weights, total, dist, p);
    let probs: Vec<f64> = idx.iter().map(|&i| weights[i as usize]).collect();
    pick_from_head(p, &idx, probs, total, u)
}

/// The pick among `idx` (the best tokens, sorted, with their unnormalized probabilities of
/// `total`): top-p and min-p cut the head, then the draw `u` from what they keep.
fn pick_from_head(p: &SamplingParams, idx: &[u32], mut probs: Vec<f64>, total: f64, u: f64) -> u32 {
    probs.iter_mut().for_each(|x| *x /= total);
    let mut keep = probs.len();
    if p.top_p < 1.0 {
        let mut cum = 0.0;
        for (i, x) in probs.iter().enumerate() {
            cum += x;
            if cum >= p.top_p as f64 {
                keep = i + 1;
                break;
            }
        }
    }
    if p.min_p > 0.0 {
        let floor = probs[0] * p.min_p as f64;
        keep = keep.min(probs.iter().take_while(|&&x| x >= floor).count().max(1));
    }
    let total: f64 = probs[..keep].iter().sum();
    let mut u = u * total;
    for (i, x) in probs[..keep].iter().enumerate() {
        if u < *x {
            return idx[i];
        }
        u -= x;
    }
    idx[keep - 1]
}

/// The best tokens, sorted, as far down as top-p and min-p of `p` can keep (`weights` the
/// tokens' exp(-dist), of `total`): the tokens of the bins of -ln(weight) (HEAD_BINS a unit) from
/// the best down to the bin where the mass reaches top-p's share, or down to min-p's weight (one
/// bin of margin), whichever comes first. Should rounding leave top-p's share short within them,
/// down to min-p's bin (then min-p keeps fewer than top-p would), or the whole vocabulary.
fn head(logits: &[f32], weights: &[f64], total: f64, dist: impl Fn(f32) -> f64, p: &SamplingParams) -> Vec<u32> {
    let bins: Vec<u16> = logits.iter().map(|&l| (dist(l) * HEAD_BINS).min(HEAD_LAST as f64) as u16).collect();
    let min_p_cut = if p.min_p > 0.0 { ((-(p.min_p as f64).ln() * HEAD_BINS) as usize + 1).min(HEAD_LAST) } else { HEAD_LAST };
    let mut cut = min_p_cut;
    if p.top_p < 1.0 {
        let mut mass = vec![0f64; HEAD_LAST + 1];
        for (&b, &w) in bins.iter().zip(weights) {
            mass[b as usize] += w;
        }
        let target = p.top_p as f64 * total;
        let mut cum = 0.0;
        let top_p_cut = mass
            .iter()
            .position(|&m| {
                cum += m;
                cum >= target
            })
            .unwrap_or(HEAD_LAST);
        cut = cut.min(top_p_cut);
    }
    loop {
        let mut idx: Vec<u32> = (0..logits.len() as u32).filter(|&i| bins[i as usize] as usize <= cut).collect();
        idx.sort_unstable_by(|a, b| better(logits, a, b));
        // Top-p's share within the head, summed as pick_from_head sums it.
        let share: f64 = idx.iter().map(|&i| weights[i as usize] / total).sum();
        if share >= p.top_p as f64 || cut >= min_p_cut {
            return idx;
        }
        cut = min_p_cut;
    }
}

/// Bins a unit of -ln(weight) when finding the head top-p and min-p keep, and the last bin
/// (weights below e^-64 and zeros).
const HEAD_BINS: f64 = 64.0;
const HEAD_LAST: usize = 64 * 64;

/// The largest of `logits` if it is finite and none is NaN.
fn finite_max(logits: &[f32]) -> Option<f32> {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    (max.is_finite() && !logits.iter().any(|v| v.is_nan())).then_some(max)
}

/// Candidates best first: by logit, then by id (a total order).
fn better(logits: &[f32], a: &u32, b: &u32) -> std::cmp::Ordering {
    logits[*b as usize].total_cmp(&logits[*a as usize]).then(a.cmp(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_first_maximum() {
        let mut s = Sampler::new(SamplingParams::default());
        assert_eq!(s.sample(&[0.5, 2.0, 2.0, -1.0]), 1);
    }

    /// The sampler's definition: the whole vocabulary sorted (what `sample` did before it
    /// sorted only the head), then top-p, min-p and the draw.
    fn sorted_reference(s: &mut Sampler, logits: &[f32]) -> u32 {
        let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
        idx.sort_unstable_by(|a, b| better(logits, a, b));
        let max = logits[idx[0] as usize] as f64;
        let probs: Vec<f64> = idx.iter().map(|&i| ((logits[i as usize] as f64 - max) / s.params.temperature as f64).exp()).collect();
        let total: f64 = probs.iter().sum();
        pick_from_head(&s.params, &idx, probs, total, s.rng.uniform())
    }

    #[test]
    fn head_sampling_picks_what_the_full_sort_picks() {
        let mut gen = Rng::new(5);
        let vocab = 20_000;
        for (t, top_p, min_p) in [(1.0, 0.9, 0.0), (0.7, 0.95, 0.0), (0.3, 0.5, 0.0), (1.0, 1.0, 0.05), (1.5, 0.8, 0.1), (1.0, 0.999, 0.0)] {
            let logits: Vec<f32> = (0..vocab).map(|i| if i % 97 == 0 { f32::NEG_INFINITY } else { (gen.normal() * 2.5) as f32 }).collect();
            let params = SamplingParams { temperature: t, top_p, min_p, seed: Some(9), ..Default::default() };
            let mut s = Sampler::new(params.clone());
            let mut reference = Sampler::new(params);
            for draw in 0..200 {
                let want = sorted_reference(&mut reference, &logits);
                assert_eq!(s.sample(&logits), want, "T {t}, top-p {top_p}, min-p {min_p}, draw {draw}");
            }
        }
    }

    #[test]
    fn the_head_is_a_short_prefix_of_the_order_holding_what_is_kept() {
        let mut gen = Rng::new(6);
        let vocab = 20_000;
        let logits: Vec<f32> = (0..vocab).map(|_| (gen.normal() * 2.5) as f32).collect();
        let mut order: Vec<u32> = (0..vocab as u32).collect();
        order.sort_unstable_by(|a, b| better(&logits, a, b));
        let max = logits[order[0] as usize] as f64;
        for (t, top_p, min_p) in [(1.0, 0.9, 0.0), (0.7, 0.5, 0.0), (1.0, 1.0, 0.01), (1.0, 0.99, 0.2)] {
            let p = SamplingParams { temperature: t, top_p, min_p, ..Default::default() };
            let dist = |l: f32| (max - l as f64) / t as f64;
            let weights: Vec<f64> = logits.iter().map(|&l| (-dist(l)).exp()).collect();
            let total: f64 = weights.iter().sum();
            let head = head(&logits, &weights, total, dist, &p);
            assert_eq!(head[..], order[..head.len()], "a prefix of the order (T {t}, top-p {top_p}, min-p {min_p})");
            let share: f64 = head.iter().map(|&i| weights[i as usize] / total).sum();
            let min_p_kept = weights.iter().filter(|&&w| w >= min_p as f64).count();
            assert!(share >= top_p as f64 || head.len() >= min_p_kept, "holds what top-p or min-p keeps");
            assert!(head.len() < vocab / 4, "{} of {vocab} tokens: the head, not the vocabulary", head.len());
        }
    }

    #[test]
    fn unfiltered_sampling_follows_the_distribution() {
        let logits = [0.0f32, 1.0, -1.0, 2.0, f32::NEG_INFINITY, 0.5];
        let mut s = Sampler::new(SamplingParams { temperature: 1.0, seed: Some(3), ..Default::default() });
        let draws = 40_000;
        let mut seen = [0usize; 6];
        for _ in 0..draws {
            seen[s.sample(&logits) as usize] += 1;
        }
        let weights: Vec<f64> = logits.iter().map(|&l| (l as f64 - 2.0).exp()).collect();
        let total: f64 = weights.iter().sum();
        for (i, w) in weights.iter().enumerate() {
            let (got, want) = (seen[i] as f64 / draws as f64, w / total);
            assert!((got - want).abs() < 0.01, "token {i}: {got} drawn, {want} expected");
        }
        assert_eq!(seen[4], 0, "a -inf logit is never drawn");
    }

    #[test]
    fn device_draws_pick_what_the_sampler_picks() {
        let mut gen = Rng::new(8);
        let normal: Vec<f32> = (0..5000).map(|_| (gen.normal() * 2.0) as f32).collect();
        let mut with_nan = normal.clone();
        with_nan[17] = f32::NAN;
        let mut with_inf = normal.clone();
        with_inf[99] = f32::INFINITY;
        for logits in [&normal, &with_nan, &with_inf] {
            for (temperature, top_p, min_p) in [(0.0, 1.0, 0.0), (0.3, 1.0, 0.0), (1.0, 1.0, 0.0), (1.7, 1.0, 0.0), (1.0, 0.9, 0.0), (0.7, 0.95, 0.05)] {
                let params = SamplingParams { temperature, top_p, min_p, seed: Some(11), ..Default::default() };
                let (mut a, mut b) = (Sampler::new(params.clone()), Sampler::new(params));
                for _ in 0..100 {
                    let d = b.device_draw().expect("no top-k: a device draw");
                    assert_eq!(pick(logits, &d), a.sample(logits), "T {temperature}, top-p {top_p}, min-p {min_p}");
                }
            }
        }
        let top_k = SamplingParams { temperature: 1.0, top_k: 40, ..Default::default() };
        assert_eq!(Sampler::new(top_k).device_draw(), None, "top-k needs the host's logits");
    }

    #[test]
    fn seeded_sampling_repeats_and_respects_top_k() {
        let params = SamplingParams { temperature: 1.0, top_k: 2, seed: Some(7), ..Default::default() };
        let logits = [0.1, 3.0, 2.9, 0.0, -5.0];
        let draw = |p: &SamplingParams| {
            let mut s = Sampler::new(p.clone());
            (0..200).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        let a = draw(&params);
        assert_eq!(a, draw(&params));
        assert!(a.iter().all(|&t| t == 1 || t == 2));
        assert!(a.contains(&1) && a.contains(&2));
    }
}
