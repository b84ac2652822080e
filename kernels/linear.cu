// Linear layers y = x·Wᵀ with W in its checkpoint precision, dequantized in registers.
//
// A warp owns one output row: its lanes stream the row in 16-byte units (8 bf16, 16 fp8, 32 int4
// or 16 int8 values), convert each unit to f32 and dot it with up to TOK token rows of x, then
// reduce across the warp. Decode steps (a few tokens) read every weight byte once, which is the
// bandwidth floor. Rows whose length is not a multiple of the unit take a scalar path.

#define TOK 8

enum { FMT_F32 = 0, FMT_BF16 = 1, FMT_F16 = 2, FMT_FP8 = 3, FMT_INT4 = 4, FMT_INT8 = 5 };

// Everything a kernel needs to read one weight matrix. Mirrored by `WDesc` in
// src/backend/cuda/weights.rs.
struct WDesc {
    const void* w;            // raw weight: f32/bf16/f16 elements, e4m3 bytes, or int32 words
    const float* scale;       // fp8: [ceil(rows/br), sc] block scales; int: [rows, sc] group scales
    const signed char* zero;  // int: [rows, sc] zero points, or null when symmetric
    int rows, cols;
    int br, bc;               // fp8 block shape
    int group;                // int group size
    int sc;                   // scale columns
    int vec;                  // 1 when rows can be read in whole 16-byte units
};

template <int FMT> struct Fmt;

template <> struct Fmt<FMT_F32> {
    static constexpr int U = 4;
    __device__ static void unit(const WDesc& d, int r, int u, float* o) {
        float4 v = ((const float4*)d.w)[(size_t)r * (d.cols / 4) + u];
        o[0] = v.x; o[1] = v.y; o[2] = v.z; o[3] = v.w;
    }
    __device__ static float at(const WDesc& d, int r, int c) { return ((const float*)d.w)[(size_t)r * d.cols + c]; }
};

template <> struct Fmt<FMT_BF16> {
    static constexpr int U = 8;
    __device__ static void unit(const WDesc& d, int r, int u, float* o) {
        uint4 v = ((const uint4*)d.w)[(size_t)r * (d.cols / 8) + u];
        u32 a[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
        for (int i = 0; i < 4; i++) {
            o[2 * i] = __uint_as_float(a[i] << 16);
            o[2 * i + 1] = __uint_as_float(a[i] & 0xffff0000u);
        }
    }
    __device__ static float at(const WDesc& d, int r, int c) { return bf16_to_f32(((const u16*)d.w)[(size_t)r * d.cols + c]); }
};

template <> struct Fmt<FMT_F16> {
    static constexpr int U = 8;
    __device__ static void unit(const WDesc& d, int r, int u, float* o) {
        uint4 v = ((const uint4*)d.w)[(size_t)r * (d.cols / 8) + u];
        u32 a[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
        for (int i = 0; i < 4; i++) {
            o[2 * i] = f16_to_f32((u16)(a[i] & 0xffff));
            o[2 * i + 1] = f16_to_f32((u16)(a[i] >> 16));
        }
    }
    __device__ static float at(const WDesc& d, int r, int c) { return f16_to_f32(((const u16*)d.w)[(size_t)r * d.cols + c]); }
};

template <> struct Fmt<FMT_FP8> {
    static constexpr int U = 16;
    __device__ static void unit(const WDesc& d, int r, int u, float* o) {
        uint4 v = ((const uint4*)d.w)[(size_t)r * (d.cols / 16) + u];
        float s = d.scale[(r / d.br) * d.sc + (u * 16) / d.bc];
        u32 a[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
        for (int i = 0; i < 4; i++) {
            float f0, f1, f2, f3;
            e4m3x2_to_f32((u16)(a[i] & 0xffff), f0, f1);
            e4m3x2_to_f32((u16)(a[i] >> 16), f2, f3);
            o[4 * i] = f0 * s; o[4 * i + 1] = f1 * s; o[4 * i + 2] = f2 * s; o[4 * i + 3] = f3 * s;
        }
    }
    __device__ static float at(const WDesc& d, int r, int c) {
        u8 b = ((const u8*)d.w)[(size_t)r * d.cols + c];
        return e4m3_to_f32(b) * d.scale[(r / d.br) * d.sc + c / d.bc];
    }
};

// (q − zp)·s with q = field − 8 equals field·s − (8 + zp)·s exactly in f32 for 4-bit fields and
// 16-bit scales, so one FMA per element reproduces the reference dequantization bit for bit.
template <> struct Fmt<FMT_INT4> {
    static constexpr int U = 32;
    __device__ static void unit(const WDesc& d, int r, int u, float* o) {
        uint4 v = ((const uint4*)d.w)[(size_t)r * (d.cols / 32) + u];
        int g = (u * 32) / d.group;
        float s = d.scale[(size_t)r * d.sc + g];
        float z = d.zero ? (float)d.zero[(size_t)r * d.sc + g] : 0.f;
        float b = -(8.f + z) * s;
        u32 a[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
        for (int i = 0; i < 4; i++) {
#pragma unroll
            for (int j = 0; j < 8; j++) o[8 * i + j] = fmaf((float)((a[i] >> (4 * j)) & 15u), s, b);
        }
    }
    __device__ static float at(const WDesc& d, int r, int c) {
        int wpr = (d.cols * 4 + 31) / 32;
        u32 word = ((const u32*)d.w)[(size_t)r * wpr + c / 8];
        int g = c / d.group;
        float s = d.scale[(size_t)r * d.sc + g];
        float z = d.zero ? (float)d.zero[(size_t)r * d.sc + g] : 0.f;
        return fmaf((float)((word >> (4 * (c % 8))) & 15u), s, -(8.f + z) * s);
    }
};

template <> struct Fmt<FMT_INT8> {
    static constexpr int U = 16;
    __device__ static void unit(const WDesc& d, int r, int u, float* o) {
        uint4 v = ((const uint4*)d.w)[(size_t)r * (d.cols / 16) + u];
        int g = (u * 16) / d.group;
        float s = d.scale[(size_t)r * d.sc + g];
        float z = d.zero ? (float)d.zero[(size_t)r * d.sc + g] : 0.f;
        float b = -(128.f + z) * s;
        u32 a[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
        for (int i = 0; i < 4; i++) {
#pragma unroll
            for (int j = 0; j < 4; j++) o[4 * i + j] = fmaf((float)((a[i] >> (8 * j)) & 255u), s, b);
        }
    }
    __device__ static float at(const WDesc& d, int r, int c) {
        int wpr = (d.cols + 3) / 4;
        u32 word = ((const u32*)d.w)[(size_t)r * wpr + c / 4];
        int g = c / d.group;
        float s = d.scale[(size_t)r * d.sc + g];
        float z = d.zero ? (float)d.zero[(size_t)r * d.sc + g] : 0.f;
        return fmaf((float)((word >> (8 * (c % 4))) & 255u), s, -(128.f + z) * s);
    }
};

// This lane's partial dot products of row r with `nt` rows of x (stride ldx).
template <int FMT, int NT>
__device__ __forceinline__ void row_dots(const WDesc& d, int r, const float* x, int ldx, int nt, float* acc) {
    int lane = threadIdx.x & 31;
    constexpr int U = Fmt<FMT>::U;
    if (d.vec) {
        int units = d.cols / U;
#pragma unroll 2
        for (int u = lane; u < units; u += 32) {
            float w[U];
            Fmt<FMT>::unit(d, r, u, w);
#pragma unroll
            for (int t = 0; t < NT; t++) {
                if (t < nt) {
                    const float4* xv = (const float4*)(x + (size_t)t * ldx + u * U);
                    float s = 0.f;
#pragma unroll
                    for (int i = 0; i < U / 4; i++) {
                        float4 a = xv[i];
                        s = fmaf(w[4 * i], a.x, s);
                        s = fmaf(w[4 * i + 1], a.y, s);
                        s = fmaf(w[4 * i + 2], a.z, s);
                        s = fmaf(w[4 * i + 3], a.w, s);
                    }
                    acc[t] += s;
                }
            }
        }
    } else {
        for (int c = lane; c < d.cols; c += 32) {
            float w = Fmt<FMT>::at(d, r, c);
#pragma unroll
            for (int t = 0; t < NT; t++)
                if (t < nt) acc[t] = fmaf(w, x[(size_t)t * ldx + c], acc[t]);
        }
    }
}

// y[t, yoff + r] = x[t] · W[r], for T tokens; grid (ceil(rows / warps), ceil(T / TOK)).
template <int FMT>
__device__ void gemv(const WDesc d, const float* __restrict__ x, float* __restrict__ y, int T, int ldy, int yoff) {
    int r = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (r >= d.rows) return;
    int t0 = blockIdx.y * TOK;
    int nt = min(TOK, T - t0);
    float acc[TOK];
#pragma unroll
    for (int t = 0; t < TOK; t++) acc[t] = 0.f;
    row_dots<FMT, TOK>(d, r, x + (size_t)t0 * d.cols, d.cols, nt, acc);
#pragma unroll
    for (int t = 0; t < TOK; t++) {
        float v = warp_sum(acc[t]);
        if ((threadIdx.x & 31) == 0 && t < nt) y[(size_t)(t0 + t) * ldy + yoff + r] = v;
    }
}

// out[t] = W[ids[t]] (embedding gather); grid T.
template <int FMT>
__device__ void embed(const WDesc d, const int* __restrict__ ids, float* __restrict__ out) {
    int t = blockIdx.x;
    int r = ids[t];
    for (int c = threadIdx.x; c < d.cols; c += blockDim.x) out[(size_t)t * d.cols + c] = Fmt<FMT>::at(d, r, c);
}

// ---- mixture of experts: one (token, expert) pair per grid row --------------------------------
// act[p, r] = silu(gate_e[r]·x_t) · (up_e[r]·x_t), with gate and up stacked as rows [0, I) and
// [I, 2I) of the expert's gate_up weight; p = t·K + k and e = idx[p].
template <int FMT>
__device__ void moe_gate_up(const WDesc* __restrict__ gu, const int* __restrict__ idx, const float* __restrict__ x,
                            float* __restrict__ act, int K, int I) {
    int p = blockIdx.y;
    int r = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (r >= I) return;
    const WDesc d = gu[idx[p]];
    const float* xt = x + (size_t)(p / K) * d.cols;
    float g[1] = {0.f}, u[1] = {0.f};
    row_dots<FMT, 1>(d, r, xt, d.cols, 1, g);
    row_dots<FMT, 1>(d, r + I, xt, d.cols, 1, u);
    float gs = warp_sum(g[0]), us = warp_sum(u[0]);
    if ((threadIdx.x & 31) == 0) act[(size_t)p * I + r] = gs / (1.f + expf(-gs)) * us;
}

// part[p, r] = down_e[r] · act[p]
template <int FMT>
__device__ void moe_down(const WDesc* __restrict__ dn, const int* __restrict__ idx, const float* __restrict__ act,
                         float* __restrict__ part, int H) {
    int p = blockIdx.y;
    int r = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (r >= H) return;
    const WDesc d = dn[idx[p]];
    float a[1] = {0.f};
    row_dots<FMT, 1>(d, r, act + (size_t)p * d.cols, d.cols, 1, a);
    float v = warp_sum(a[0]);
    if ((threadIdx.x & 31) == 0) part[(size_t)p * H + r] = v;
}

#define INSTANTIATE(NAME, FMT)                                                                            \
    extern "C" __global__ void gemv_##NAME(const WDesc d, const float* x, float* y, int T, int ldy, int yoff) { \
        gemv<FMT>(d, x, y, T, ldy, yoff);                                                                  \
    }                                                                                                      \
    extern "C" __global__ void embed_##NAME(const WDesc d, const int* ids, float* out) { embed<FMT>(d, ids, out); } \
    extern "C" __global__ void moe_gate_up_##NAME(const WDesc* gu, const int* idx, const float* x, float* act, int K, int I) { \
        moe_gate_up<FMT>(gu, idx, x, act, K, I);                                                           \
    }                                                                                                      \
    extern "C" __global__ void moe_down_##NAME(const WDesc* dn, const int* idx, const float* act, float* part, int H) { \
        moe_down<FMT>(dn, idx, act, part, H);                                                              \
    }

INSTANTIATE(f32, FMT_F32)
INSTANTIATE(bf16, FMT_BF16)
INSTANTIATE(f16, FMT_F16)
INSTANTIATE(fp8, FMT_FP8)
INSTANTIATE(int4, FMT_INT4)
INSTANTIATE(int8, FMT_INT8)

// out[t, r] = Σ_k w[t, k] · part[t·K + k, r]
extern "C" __global__ void moe_combine(const float* __restrict__ part, const float* __restrict__ w, float* __restrict__ out,
                                       int T, int K, int H) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (size_t)T * H) return;
    int t = i / H, r = i % H;
    float s = 0.f;
    for (int k = 0; k < K; k++) s = fmaf(w[t * K + k], part[((size_t)t * K + k) * H + r], s);
    out[i] = s;
}

// Sigmoid router with the selection-only bias and group-limited top-k; one block per token.
// Ties go to the lower index. smem: 2·E + G floats.
extern "C" __global__ void moe_route(const float* __restrict__ logits, const float* __restrict__ bias, int* __restrict__ idx,
                                     float* __restrict__ wout, int E, int G, int TG, int K, int norm, float scaling) {
    extern __shared__ float sm[];
    float* s = sm;           // sigmoid scores
    float* c = sm + E;       // selection scores
    float* gs = sm + 2 * E;  // group scores
    __shared__ float best_v[32];
    __shared__ int best_i[32];
    __shared__ int chosen[64];
    int t = blockIdx.x;
    for (int e = threadIdx.x; e < E; e += blockDim.x) {
        float z = logits[(size_t)t * E + e];
        float v = 1.f / (1.f + expf(-z));
        s[e] = v;
        c[e] = v + bias[e];
    }
    __syncthreads();
    int per = E / G;
    if (G > 1) {
        for (int g = threadIdx.x; g < G; g += blockDim.x) {
            float a = NEG_INF, b = NEG_INF;
            for (int j = 0; j < per; j++) {
                float v = c[g * per + j];
                if (v > a) { b = a; a = v; } else if (v > b) { b = v; }
            }
            gs[g] = a + b;
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            for (int k = 0; k < TG; k++) {
                int bi = -1;
                for (int g = 0; g < G; g++)
                    if (gs[g] > NEG_INF && (bi < 0 || gs[g] > gs[bi])) bi = g;
                if (bi >= 0) gs[bi] = NEG_INF;
                chosen[k] = bi;
            }
            // Mark kept groups by +inf in gs (all others were not chosen).
            for (int g = 0; g < G; g++) gs[g] = 0.f;
            for (int k = 0; k < TG; k++) if (chosen[k] >= 0) gs[chosen[k]] = 1.f;
        }
        __syncthreads();
        for (int e = threadIdx.x; e < E; e += blockDim.x)
            if (gs[e / per] == 0.f) c[e] = NEG_INF;
        __syncthreads();
    }
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    for (int k = 0; k < K; k++) {
        float bv = NEG_INF;
        int bi = 0x7fffffff;
        for (int e = threadIdx.x; e < E; e += blockDim.x) {
            float v = c[e];
            if (v > bv || (v == bv && e < bi)) { bv = v; bi = e; }
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            float ov = __shfl_xor_sync(0xffffffffu, bv, o);
            int oi = __shfl_xor_sync(0xffffffffu, bi, o);
            if (ov > bv || (ov == bv && oi < bi)) { bv = ov; bi = oi; }
        }
        if (lane == 0) { best_v[w] = bv; best_i[w] = bi; }
        __syncthreads();
        if (threadIdx.x == 0) {
            float v = best_v[0];
            int i = best_i[0];
            for (int j = 1; j < nw; j++)
                if (best_v[j] > v || (best_v[j] == v && best_i[j] < i)) { v = best_v[j]; i = best_i[j]; }
            idx[t * K + k] = i;
            c[i] = NEG_INF;
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        float sum = 0.f;
        for (int k = 0; k < K; k++) sum += s[idx[t * K + k]];
        float denom = norm ? sum + 1e-20f : 1.f;
        for (int k = 0; k < K; k++) wout[t * K + k] = s[idx[t * K + k]] / denom * scaling;
    }
}
