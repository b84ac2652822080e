//! Linear layers on the CPU: weights stay in their checkpoint precision and are dequantized a
//! tile of rows at a time into f32, then multiplied in f32. Tiles run in parallel on every core.

use rayon::prelude::*;

use crate::checkpoint::LinearWeight;

/// Rows of a weight dequantized together; enough to amortize the dequantization over tokens
/// while keeping the scratch tile in L2.
const TILE_ROWS: usize = 16;

/// f32 dot product with eight independent accumulators, so the compiler vectorizes it.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f32; 8];
    let ca = a.chunks_exact(8);
    let cb = b.chunks_exact(8);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for j in 0..8 {
            acc[j] += x[j] * y[j];
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// `y += alpha * x`.
#[inline]
pub fn axpy(y: &mut [f32], alpha: f32, x: &[f32]) {
    for (a, b) in y.iter_mut().zip(x) {
        *a += alpha * b;
    }
}

/// A weight made of row-stacked parts with equal column counts.
pub struct Stacked {
    pub parts: Vec<LinearWeight>,
    pub rows: usize,
    pub cols: usize,
}

impl Stacked {
    /// (part, row within part) of global row `r`.
    fn locate(&self, mut r: usize) -> (&LinearWeight, usize) {
        for p in &self.parts {
            if r < p.rows {
                return (p, r);
            }
            r -= p.rows;
        }
        unreachable!("row out of range")
    }

    /// Dequantizes global rows `r0 .. r0 + n` into `out`.
    pub fn dequant_rows(&self, r0: usize, n: usize, out: &mut [f32]) {
        let mut done = 0;
        while done < n {
            let (p, pr) = self.locate(r0 + done);
            let take = (p.rows - pr).min(n - done);
            p.dequant_rows(pr, take, &mut out[done * self.cols..(done + take) * self.cols]);
            done += take;
        }
    }
}

/// `y[t, r] = Σ_c x[t, c] · W[r, c]` for `x = [tokens, cols]`; returns `[tokens, rows]`.
pub fn linear(x: &[f32], tokens: usize, w: &Stacked) -> Vec<f32> {
    let (rows, cols) = (w.rows, w.cols);
    debug_assert_eq!(x.len(), tokens * cols);
    if tokens == 0 || rows == 0 {
        return vec![];
    }
    // Computed transposed ([rows, tokens]) so each tile writes one contiguous chunk.
    let mut yt = vec![0f32; rows * tokens];
    yt.par_chunks_mut(TILE_ROWS * tokens).enumerate().for_each(|(tile, out)| {
        let r0 = tile * TILE_ROWS;
        let n = out.len() / tokens.max(1);
        let mut wt = vec![0f32; n * cols];
        w.dequant_rows(r0, n, &mut wt);
        for i in 0..n {
            let wrow = &wt[i * cols..(i + 1) * cols];
            for t in 0..tokens {
                out[i * tokens + t] = dot(&x[t * cols..(t + 1) * cols], wrow);
            }
        }
    });
    if tokens == 1 {
        return yt;
    }
    let mut y = vec![0f32; tokens * rows];
    for r in 0..rows {
        for t in 0..tokens {
            y[t * rows + r] = yt[r * tokens + t];
        }
    }
    y
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_matches_naive_sum() {
        let a: Vec<f32> = (0..37).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..37).map(|i| (i as f32 * 0.11).cos()).collect();
        let naive: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
        assert!((dot(&a, &b) as f64 - naive).abs() < 1e-5);
    }
}
