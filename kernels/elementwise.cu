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
extern "C" __global__ void argmax_rows(const float* __restrict__ x, int cols, int* __restrict__ out) { pdl_entry_small();
    const float* row = x + (size_t)blockIdx.x * cols;
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
    if (lane == 0) out[blockIdx.x] = row[0] != row[0] || bi == 0x7fffffff ? 0 : bi;
}
