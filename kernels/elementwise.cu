// Norms and elementwise operations on f32 activations.

// y = w ⊙ x / sqrt(mean(x²) + eps), one block per row; rows of up to NORM_VEC float4s per
// thread (norm_row in common.cuh) are held in registers, longer or unaligned ones take the loop.
// With a non-null, the row is x + a (the residual add fused), written to s as well.
extern "C" __global__ void rms_norm(const float* __restrict__ x, const float* __restrict__ w, float* __restrict__ y, int cols,
                                    float eps, const float* __restrict__ a, float* __restrict__ s) {
    int n4 = cols / 4;
    bool regs = cols % 4 == 0 && n4 <= NORM_VEC * (int)blockDim.x;
    float4 g[NORM_VEC];
    if (regs) norm_weights(w, cols, g);
    pdl_entry_small();
    __shared__ float scratch[32];
    size_t off = (size_t)blockIdx.x * cols;
    const float *xr = x + off, *ar = a ? a + off : nullptr;
    float *yr = y + off, *sr = s ? s + off : nullptr;
    if (regs) {
        float4 v[NORM_VEC];
        norm_row(xr, ar, sr, -1, g, cols, eps, v, scratch);
#pragma unroll
        for (int j = 0; j < NORM_VEC; j++) {
            int i = threadIdx.x + j * blockDim.x;
            if (i < n4) ((float4*)yr)[i] = v[j];
        }
        return;
    }
    // Eight columns a thread per step, all loaded before any is stored (a store between them
    // keeps the next loads behind it: a round trip a column).
    constexpr int STEP = 8;
    float ss = 0.f;
    for (int c0 = threadIdx.x; c0 < cols; c0 += STEP * blockDim.x) {
        float v[STEP];
#pragma unroll
        for (int u = 0; u < STEP; u++) {
            int c = c0 + u * blockDim.x;
            v[u] = c < cols ? (ar ? xr[c] + ar[c] : xr[c]) : 0.f;
        }
#pragma unroll
        for (int u = 0; u < STEP; u++) {
            int c = c0 + u * blockDim.x;
            if (ar && c < cols) sr[c] = v[u];
            ss = fmaf(v[u], v[u], ss);
        }
    }
    float r = 1.f / sqrtf(block_sum(ss, scratch) / cols + eps);
    // (The sum is re-read from s, which this thread wrote.)
    const float* vr = ar ? sr : xr;
    for (int c0 = threadIdx.x; c0 < cols; c0 += STEP * blockDim.x) {
        float o[STEP];
#pragma unroll
        for (int u = 0; u < STEP; u++) {
            int c = c0 + u * blockDim.x;
            o[u] = c < cols ? w[c] * (vr[c] * r) : 0.f;
        }
#pragma unroll
        for (int u = 0; u < STEP; u++) {
            int c = c0 + u * blockDim.x;
            if (c < cols) yr[c] = o[u];
        }
    }
}

extern "C" __global__ void fill(float* __restrict__ p, size_t n, float v) { pdl_entry_small();
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) p[i] = v;
}

extern "C" __global__ void add_assign(float* __restrict__ a, const float* __restrict__ b, size_t n) { pdl_entry_small();
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) a[i] += b[i];
}

// y[r, i] = silu(x[r, i]) · x[r, n + i] for x = [rows, 2n].
extern "C" __global__ void swiglu(const float* __restrict__ x, float* __restrict__ y, int rows, int n) { pdl_entry();
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (size_t)rows * n) return;
    size_t r = i / n, j = i % n;
    float g = x[r * 2 * n + j], u = x[r * 2 * n + n + j];
    y[i] = g / (1.f + expf(-g)) * u;
}

// y = [a | b] along columns.
extern "C" __global__ void concat_cols(const float* __restrict__ a, const float* __restrict__ b, float* __restrict__ y, int rows,
                                       int ca, int cb) { pdl_entry();
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    int w = ca + cb;
    if (i >= (size_t)rows * w) return;
    size_t r = i / w;
    int c = i % w;
    y[i] = c < ca ? a[r * ca + c] : b[r * cb + (c - ca)];
}

// y[i] = x[rows[i]]
extern "C" __global__ void select_rows(const float* __restrict__ x, const int* __restrict__ rows, float* __restrict__ y, int n,
                                       int cols) { pdl_entry();
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (size_t)n * cols) return;
    size_t r = i / cols;
    y[i] = x[(size_t)rows[r] * cols + i % cols];
}

// out[r] = the index of row r's largest value, the first on ties: sampling::argmax's answer (a
// value wins only by comparing greater, so NaNs never win, and a NaN first value, which nothing
// compares greater than, is the answer). One block of 1024 threads a row.
__device__ __forceinline__ void argmax_take(float& bv, int& bi, float v, int i) {
    if (v > bv || (v == bv && i < bi)) bv = v, bi = i;
}
// The warp's best (value, index), in every lane.
__device__ __forceinline__ void argmax_warp(float& bv, int& bi) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) argmax_take(bv, bi, __shfl_xor_sync(0xffffffffu, bv, o), __shfl_xor_sync(0xffffffffu, bi, o));
}
// The answer for `row` into *out, by the whole block (every thread calls it; warps other than
// the first are done when it returns to them).
__device__ void row_argmax(const float* __restrict__ row, int cols, int* __restrict__ out) {
    float bv = NEG_INF;
    int bi = 0x7fffffff;  // none yet: loses to every value's index
#pragma unroll 8
    for (int i = threadIdx.x; i < cols; i += blockDim.x) argmax_take(bv, bi, row[i], i);
    argmax_warp(bv, bi);
    __shared__ float wv[32];
    __shared__ int wi[32];
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) wv[warp] = bv, wi[warp] = bi;
    __syncthreads();
    if (warp != 0) return;
    bv = lane < (int)(blockDim.x >> 5) ? wv[lane] : NEG_INF;
    bi = lane < (int)(blockDim.x >> 5) ? wi[lane] : 0x7fffffff;
    argmax_warp(bv, bi);
    // Every value NaN or -inf past a NaN first one: the first index, as the sequential scan.
    if (lane == 0) *out = row[0] != row[0] || bi == 0x7fffffff ? 0 : bi;
}
extern "C" __global__ void argmax_rows(const float* __restrict__ x, int cols, int* __restrict__ out) { pdl_entry_small();
    row_argmax(x + (size_t)blockIdx.x * cols, cols, out + blockIdx.x);
}

// Each row's pick by its draw (sampling::pick), the draw's numbers in params[4r ..]:
// temperature T, top-p, min-p and the uniform u. T = 0: row_argmax's. Else the weights are
// exp(-(max − l) / T) in f64, as the host computes them, and the pick is -1 (the host then
// picks from the row, as sampling::pick does) when the row has a NaN or no finite largest
// value, or when the head top-p and min-p keep holds more than HEAD_CAP tokens.
// - Without top-p and min-p: the token whose share of the weights, in token order, holds u of
//   their total. Thread j weighs a contiguous run of ceil(cols / 1024) tokens, the runs' sums
//   are scanned, and the thread whose run holds the target walks it.
// - With them, sampling.rs's head: the weights' mass in bins of -ln(weight) (HEAD_BINS a unit)
//   finds the bin where top-p's share is reached (or min-p's bin), the tokens of the bins up to
//   it are gathered and sorted (bitonic, by logit, then index) in shared memory, and one thread
//   cuts and draws from them as pick_from_head does.
// The sums round otherwise than the host's sequential ones, and the device's exp and log may
// differ from the host's by an ulp: a pick differs from the host's only when the target lies
// within that rounding of a token's edge (or a bin's). Dynamic shared memory: SAMPLE_SMEM bytes.
#define HEAD_BINS 64     // sampling.rs
#define HEAD_LAST 4096   // sampling.rs: the last bin (64 units of -ln(weight))
#define HEAD_CAP 4096    // the most head tokens sorted here (a power of two)
#define SAMPLE_SMEM ((HEAD_LAST + 1 + HEAD_CAP) * 8 + HEAD_CAP * 8)  // SAMPLE_SMEM in cuda/mod.rs
// Whether the head token (la, ia) comes before (lb, ib): a higher logit, or the same at a lower
// index (sampling.rs `better`, by total_cmp: +0 before -0; no NaNs reach here).
__device__ __forceinline__ bool before(float la, int ia, float lb, int ib) {
    u32 ka = order_key(la), kb = order_key(lb);
    return ka > kb || (ka == kb && ia < ib);
}

// The no-filter draw (see above); the pick into *out.
__device__ void draw_in_order(const float* __restrict__ row, int cols, double top, double t, double u, int* out) {
    __shared__ double warp_total[32];
    __shared__ int picked, first_any, last_before, claim;
    int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, nw = blockDim.x >> 5;
    if (tid == 0) picked = -1, first_any = 0x7fffffff, last_before = -1, claim = 0x7fffffff;
    int per = (cols + blockDim.x - 1) / blockDim.x, lo = min(tid * per, cols), hi = min(lo + per, cols);
    double sum = 0.0;
    int first = 0x7fffffff, last = -1;
    for (int i = lo; i < hi; i++) {
        double w = exp(-((top - (double)row[i]) / t));
        sum += w;
        if (w > 0.0) first = min(first, i), last = i;
    }
    // The runs' sums scanned: this thread's run spans [lo_sum, hi_sum) of the total, where
    // lo_sum is the thread before's hi_sum, bit for bit, so the spans meet without gap or overlap.
    double incl = warp_scan(sum);
    if (lane == 31) warp_total[warp] = incl;
    __syncthreads();
    if (warp == 0) {
        double v = lane < nw ? warp_total[lane] : 0.0;
        v = warp_scan(v);
        __syncwarp();
        warp_total[lane] = v;
    }
    __syncthreads();
    double hi_sum = (warp > 0 ? warp_total[warp - 1] : 0.0) + incl;
    double lo_sum = __shfl_up_sync(0xffffffffu, hi_sum, 1);
    __syncthreads();  // (every warp has read warp_total)
    if (lane == 31) warp_total[warp] = hi_sum;
    __syncthreads();
    if (lane == 0) lo_sum = warp > 0 ? warp_total[warp - 1] : 0.0;
    double total = warp_total[nw - 1], target = __dmul_rn(u, total);  // (not fused with what follows: the host's product)
    // The thread whose span holds the target (the first, should rounding make two); a run of
    // no weight, whose span the scan's rounding may still give an ulp, never claims. Else the
    // last token of any weight before the target (all of them when rounding left the target
    // past the end, as the host's walk ends), or the first.
    if (sum > 0.0 && target >= lo_sum && target < hi_sum) atomicMin(&claim, tid);
    if (last >= 0 && hi_sum <= target) atomicMax(&last_before, last);
    if (last >= 0) atomicMin(&first_any, first);
    __syncthreads();
    if (tid == claim) {
        double r = target - lo_sum;
        int pick = last;  // (rounding past the run's end: its last token of any weight)
        for (int i = lo; i < hi; i++) {
            double w = exp(-((top - (double)row[i]) / t));
            if (r < w) {
                pick = i;
                break;
            }
            r -= w;
        }
        picked = pick;
    }
    __syncthreads();
    if (tid == 0) *out = picked >= 0 ? picked : last_before >= 0 ? last_before : first_any;
}

// The top-p / min-p draw (see above); the pick into *out. smem: SAMPLE_SMEM bytes.
__device__ void draw_from_head(const float* __restrict__ row, int cols, double top, double t, double top_p, double min_p, double u, int* out,
                               unsigned char* smem) {
    double* mass = (double*)smem;                    // [HEAD_LAST + 1]
    double* hw = mass + HEAD_LAST + 1;               // [HEAD_CAP] the head's weights,
    float* hl = (float*)(hw + HEAD_CAP);             // logits
    int* hi = (int*)(hl + HEAD_CAP);                 // and indices
    __shared__ double scratch[32];
    __shared__ int n, cut, done;
    int tid = threadIdx.x;
    for (int b = tid; b <= HEAD_LAST; b += blockDim.x) mass[b] = 0.0;
    __syncthreads();
    double part = 0.0;
    for (int i = tid; i < cols; i += blockDim.x) {
        double dist = (top - (double)row[i]) / t, w = exp(-dist);
        part += w;
        atomicAdd(&mass[(int)fmin(dist * HEAD_BINS, (double)HEAD_LAST)], w);
    }
    double total = block_reduce(part, scratch, 0.0, SumOp());
    // (The host's float-to-integer conversion saturates: a min-p above 1 cuts at bin 1.)
    int min_p_cut = min_p > 0.0 ? min((int)fmin(fmax(-log(min_p) * HEAD_BINS, 0.0), (double)HEAD_LAST) + 1, HEAD_LAST) : HEAD_LAST;
    if (tid == 0) {
        int c = min_p_cut;
        if (top_p < 1.0) {
            double target = top_p * total, cum = 0.0;
            int b = 0;
            for (; b <= HEAD_LAST; b++) {
                cum += mass[b];
                if (cum >= target) break;
            }
            c = min(c, min(b, HEAD_LAST));
        }
        cut = c, done = 0;
    }
    __syncthreads();
    while (!done) {
        if (tid == 0) n = 0;
        __syncthreads();
        for (int i = tid; i < cols; i += blockDim.x) {
            double dist = (top - (double)row[i]) / t;
            if ((int)fmin(dist * HEAD_BINS, (double)HEAD_LAST) <= cut) {
                int k = atomicAdd(&n, 1);
                if (k < HEAD_CAP) hw[k] = exp(-dist), hl[k] = row[i], hi[k] = i;
            }
        }
        __syncthreads();
        int count = n;
        if (count > HEAD_CAP) {
            if (tid == 0) *out = -1;  // a head too long for shared memory: the host's
            return;
        }
        int np = 1;
        while (np < count) np <<= 1;
        for (int k = count + tid; k < np; k += blockDim.x) hw[k] = 0.0, hl[k] = NEG_INF, hi[k] = 0x7fffffff;
        __syncthreads();
        // Bitonic sort of the np entries, best first.
        for (int size = 2; size <= np; size <<= 1) {
            for (int stride = size >> 1; stride > 0; stride >>= 1) {
                for (int k = tid; k < np; k += blockDim.x) {
                    int o = k ^ stride;
                    if (o > k) {
                        bool first_half = (k & size) == 0;
                        bool swap = first_half ? before(hl[o], hi[o], hl[k], hi[k]) : before(hl[k], hi[k], hl[o], hi[o]);
                        if (swap) {
                            double w = hw[k];
                            float l = hl[k];
                            int i = hi[k];
                            hw[k] = hw[o], hl[k] = hl[o], hi[k] = hi[o];
                            hw[o] = w, hl[o] = l, hi[o] = i;
                        }
                    }
                }
                __syncthreads();
            }
        }
        if (tid == 0) {
            // Top-p's share within the head, summed as pick_from_head sums it; short of it
            // (rounding), down to min-p's bin (sampling.rs `head`).
            double share = 0.0;
            for (int k = 0; k < count; k++) share += hw[k] / total;
            if (share >= top_p || cut >= min_p_cut) {
                done = 1;
                // pick_from_head: the probabilities, top-p's and min-p's cuts, then the draw.
                for (int k = 0; k < count; k++) hw[k] /= total;
                int keep = count;
                if (top_p < 1.0) {
                    double cum = 0.0;
                    for (int k = 0; k < count; k++) {
                        cum += hw[k];
                        if (cum >= top_p) {
                            keep = k + 1;
                            break;
                        }
                    }
                }
                if (min_p > 0.0) {
                    double floor_p = hw[0] * min_p;
                    int lead = 0;
                    while (lead < count && hw[lead] >= floor_p) lead++;
                    keep = min(keep, max(lead, 1));
                }
                double kept = 0.0;
                for (int k = 0; k < keep; k++) kept += hw[k];
                double r = __dmul_rn(u, kept);
                int pick = hi[keep - 1];
                for (int k = 0; k < keep; k++) {
                    if (r < hw[k]) {
                        pick = hi[k];
                        break;
                    }
                    r -= hw[k];
                }
                *out = pick;
            } else {
                cut = min_p_cut;
            }
        }
        __syncthreads();
    }
}

extern "C" __global__ void __launch_bounds__(1024) sample_rows(const float* __restrict__ x, int cols, const double* __restrict__ params,
                                                               int* __restrict__ out) { pdl_entry_small();
    extern __shared__ __align__(16) unsigned char smem[];
    const float* row = x + (size_t)blockIdx.x * cols;
    const double* p = params + 4 * (size_t)blockIdx.x;
    double t = p[0], top_p = p[1], min_p = p[2], u = p[3];
    int* o = out + blockIdx.x;
    if (t == 0.0) {
        row_argmax(row, cols, o);
        return;
    }
    if (!(t > 0.0 && t < 1e300)) {  // (a temperature no weight can be made with: the host's)
        if (threadIdx.x == 0) *o = -1;
        return;
    }
    __shared__ float scratch[32];
    float m = NEG_INF;
    int nan = 0;
    for (int i = threadIdx.x; i < cols; i += blockDim.x) {
        float v = row[i];
        nan |= v != v;
        m = fmaxf(m, v);
    }
    nan = __syncthreads_or(nan);
    m = block_max(m, scratch);
    if (nan || !(m > NEG_INF && m < -NEG_INF)) {
        if (threadIdx.x == 0) *o = -1;
        return;
    }
    if (top_p >= 1.0 && min_p <= 0.0)
        draw_in_order(row, cols, m, t, u, o);
    else
        draw_from_head(row, cols, m, t, top_p, min_p, u, o, smem);
}
