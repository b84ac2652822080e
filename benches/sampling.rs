//! Host sampling time at GLM-5.2's vocabulary (154880 logits, normal with σ 3): greedy, the
//! temperature settings OpenAI clients send (no top-k: the whole vocabulary), min-p, top-k.
//!
//!     cargo bench --bench sampling

use std::time::Instant;

use duet::sampling::{Rng, Sampler, SamplingParams};

fn main() {
    let vocab = 154_880;
    let mut rng = Rng::new(3);
    let logits: Vec<f32> = (0..vocab).map(|_| (rng.normal() * 3.0) as f32).collect();
    let settings = [
        ("greedy", SamplingParams::default()),
        ("temperature 1", SamplingParams { temperature: 1.0, ..Default::default() }),
        ("temperature 0.7, top-p 0.95", SamplingParams { temperature: 0.7, top_p: 0.95, ..Default::default() }),
        ("temperature 1, top-p 0.9", SamplingParams { temperature: 1.0, top_p: 0.9, ..Default::default() }),
        ("temperature 1, min-p 0.05", SamplingParams { temperature: 1.0, min_p: 0.05, ..Default::default() }),
        ("temperature 0.7, top-k 50", SamplingParams { temperature: 0.7, top_k: 50, ..Default::default() }),
    ];
    println!("sampling one token from {vocab} logits (median of 15 rounds of 20 draws)");
    for (name, params) in settings {
        let mut sampler = Sampler::new(SamplingParams { seed: Some(1), ..params });
        let mut rounds: Vec<f64> = (0..15)
            .map(|_| {
                let t = Instant::now();
                for _ in 0..20 {
                    std::hint::black_box(sampler.sample(std::hint::black_box(&logits)));
                }
                t.elapsed().as_secs_f64() * 1e3 / 20.0
            })
            .collect();
        rounds.sort_by(f64::total_cmp);
        println!("{name:<32} {:>8.3} ms", rounds[rounds.len() / 2]);
    }
}
