#!/usr/bin/env python3
"""An emulation of the CUDA kernel sample_rows (kernels/elementwise.cu) against the host's draw
(sampling::pick, a temperature without filters), in Python's f64, without a GPU: the kernel
splits the row into 1024 contiguous runs, sums each run's weights, scans the sums as its warps
do (Hillis-Steele within a warp, then over the warp totals) and walks the run whose span holds
u times the total. Picks differ from the host's sequential walk only within rounding of a
token's edge (next to u = 1).

    python3 launch/sample-rows-emulation.py
"""
import math
import random


def host(logits, t, u):
    m = max(logits)
    w = [math.exp(-((m - l) / t)) for l in logits]
    total = 0.0
    for x in w:
        total += x
    r, last = u * total, 0
    for i, x in enumerate(w):
        if r < x:
            return i
        if x > 0:
            last = i
        r -= x
    return last


def warp_scan(v):
    v = list(v)
    o = 1
    while o < 32:
        v = [v[i] + v[i - o] if i >= o else v[i] for i in range(32)]
        o <<= 1
    return v


def kernel(logits, t, u, threads=1024):
    n, m = len(logits), max(logits)
    per = (n + threads - 1) // threads
    sums, firsts, lasts, runs = [], [], [], []
    for j in range(threads):
        lo = min(j * per, n)
        hi = min(lo + per, n)
        s, first, last = 0.0, None, -1
        for i in range(lo, hi):
            w = math.exp(-((m - logits[i]) / t))
            s += w
            if w > 0:
                first = i if first is None else first
                last = i
        sums.append(s)
        firsts.append(first)
        lasts.append(last)
        runs.append((lo, hi))
    warps = threads // 32
    incl = []
    for w in range(warps):
        incl += warp_scan(sums[32 * w:32 * w + 32])
    totals = warp_scan([incl[32 * w + 31] for w in range(warps)] + [0.0] * (32 - warps))
    hi_sum = [(totals[j // 32 - 1] if j >= 32 else 0.0) + incl[j] for j in range(threads)]
    lo_sum = [hi_sum[j - 1] if j > 0 else 0.0 for j in range(threads)]
    target = u * hi_sum[-1]
    claim = next((j for j in range(threads) if sums[j] > 0 and lo_sum[j] <= target < hi_sum[j]), None)
    if claim is None:
        before = [lasts[j] for j in range(threads) if lasts[j] >= 0 and hi_sum[j] <= target]
        return max(before) if before else min(f for f in firsts if f is not None)
    r, (lo, hi), pick = target - lo_sum[claim], runs[claim], lasts[claim]
    for i in range(lo, hi):
        w = math.exp(-((m - logits[i]) / t))
        if r < w:
            return i
        r -= w
    return pick


def main():
    rnd = random.Random(1)
    for name, uniforms in [("u in [0, 1)", lambda: [0.0, 0.5, rnd.random(), rnd.random(), rnd.random()]), ("u = 1 - 2^-53", lambda: [1 - 2**-53])]:
        trials = differ = 0
        for n in [1, 7, 1000, 1025, 4099, 40000]:
            for _ in range(6):
                logits = [3 * rnd.gauss(0, 1) for _ in range(n)]
                for t in [0.3, 0.7, 1.0, 1.5]:
                    for u in uniforms():
                        trials += 1
                        differ += host(logits, t, u) != kernel(logits, t, u)
        print(f"{name}: {differ} of {trials} picks differ from the host's")


if __name__ == "__main__":
    main()
