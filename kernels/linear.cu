// Linear layers y = x·Wᵀ with W in its checkpoint precision, dequantized in registers.
//
// A block owns four output rows: its threads split the columns in 16-byte units (8 bf16, 16 fp8,
// 32 int4 or 16 int8 values), so each lane has four independent loads in flight; each unit is
// converted to f32 once and dotted with up to 8 token rows of x, then the block reduces. Decode
// steps (a few tokens) read every weight byte once, which is the bandwidth floor. Rows whose
// length is not a multiple of the unit take a scalar path.

// L2 fetch size of the weight loads (ld_weight16): none, measured best here on H200 (bf16
// 16384->6144 at 94% of copy bandwidth with 256-byte fetches against 101% without).
#ifndef LINEAR_L2_FETCH
#define LINEAR_L2_FETCH 0
#endif
// Units per thread in flight in block_dots (the unroll of its column loop).
#ifndef GEMV_UNR
#define GEMV_UNR 2
#endif

template <int FMT> struct Fmt;

// Each format says how to load a row's 16-byte unit, how to turn the i-th group of 4 elements
// of a loaded unit into floats (the stored codes), and the unit's dequantization parameters:
// w = code·s for FP8 (SCALED), w = code·s + b for integers (SCALED and BIASED), w = code for
// plain floats. The scale and offset are applied once per unit to the unit's dot product:
// Σ x·(c·s + b) = s·Σ x·c + b·Σ x.

// Exact small non-negative integer to float without the slow I2F: 2^23 + n, minus 2^23.
__device__ __forceinline__ float small_int(u32 n) { return __uint_as_float(0x4B000000u | n) - 8388608.f; }

// Plain floats: a unit is U elements read as they are, with no dequantization parameters.
template <int UNIT> struct PlainFmt {
    static constexpr int U = UNIT;
    static constexpr bool SCALED = false, BIASED = false;
    __device__ static uint4 load(const WDesc& d, int r, int u) { return ld_weight16<LINEAR_L2_FETCH>((const uint4*)d.w + (size_t)r * (d.cols / U) + u); }
    __device__ static void param(const WDesc&, int, int, float& s, float& b) { s = 1.f; b = 0.f; }
};

template <> struct Fmt<FMT_F32> : PlainFmt<4> {
    __device__ static float4 chunk(const uint4& v, int) {
        return make_float4(__uint_as_float(v.x), __uint_as_float(v.y), __uint_as_float(v.z), __uint_as_float(v.w));
    }
    __device__ static float at(const WDesc& d, int r, int c) { return ((const float*)d.w)[(size_t)r * d.cols + c]; }
};

template <> struct Fmt<FMT_BF16> : PlainFmt<8> {
    __device__ static float4 chunk(const uint4& v, int i) {
        u32 a = word(v, 2 * i), c = word(v, 2 * i + 1);
        return make_float4(__uint_as_float(a << 16), __uint_as_float(a & 0xffff0000u), __uint_as_float(c << 16), __uint_as_float(c & 0xffff0000u));
    }
    __device__ static float at(const WDesc& d, int r, int c) { return bf16_to_f32(((const u16*)d.w)[(size_t)r * d.cols + c]); }
};

template <> struct Fmt<FMT_F16> : PlainFmt<8> {
    __device__ static float4 chunk(const uint4& v, int i) {
        u32 a = word(v, 2 * i), c = word(v, 2 * i + 1);
        return make_float4(f16_to_f32((u16)(a & 0xffff)), f16_to_f32((u16)(a >> 16)), f16_to_f32((u16)(c & 0xffff)), f16_to_f32((u16)(c >> 16)));
    }
    __device__ static float at(const WDesc& d, int r, int c) { return f16_to_f32(((const u16*)d.w)[(size_t)r * d.cols + c]); }
};

template <> struct Fmt<FMT_FP8> {
    static constexpr int U = 16;
    static constexpr bool SCALED = true, BIASED = false;
    __device__ static uint4 load(const WDesc& d, int r, int u) { return ld_weight16<LINEAR_L2_FETCH>((const uint4*)((const u8*)d.w + wbyte(d, r, 16 * u, d.cols))); }
    __device__ static void param(const WDesc& d, int r, int u, float& s, float& b) {
        s = d.scale[(r / d.br) * d.sc + (u * U) / d.bc];
        b = 0.f;
    }
    __device__ static float4 chunk(const uint4& v, int i) {
        u32 a = word(v, i);
        float f0, f1, f2, f3;
        e4m3x2_to_f32((u16)(a & 0xffff), f0, f1);
        e4m3x2_to_f32((u16)(a >> 16), f2, f3);
        return make_float4(f0, f1, f2, f3);
    }
    __device__ static float at(const WDesc& d, int r, int c) {
        u8 b = ((const u8*)d.w)[wbyte(d, r, c, d.cols)];
        return e4m3_to_f32(b) * d.scale[(r / d.br) * d.sc + c / d.bc];
    }
};

// (q − zp)·s with q = field − 2^(bits−1) equals field·s + b with b = −(2^(bits−1) + zp)·s.
__device__ __forceinline__ void int_param(const WDesc& d, int r, int u, int U, float offset, float& s, float& b) {
    int g = (u * U) / d.group;
    s = int_scale(d, (size_t)r * d.sc + g);
    float z = d.zero ? (float)d.zero[(size_t)r * d.sc + g] : 0.f;
    b = -(offset + z) * s;
}

template <> struct Fmt<FMT_INT4> {
    static constexpr int U = 32;
    static constexpr bool SCALED = true, BIASED = true;
    __device__ static uint4 load(const WDesc& d, int r, int u) {
        uint4 v;
        if (!d.interleaved) {
            v = ld_weight16<LINEAR_L2_FETCH>((const uint4*)((const u8*)d.w + wbyte(d, r, 16 * u, d.cols / 2)));
        } else {
            // Unit u's words 4u .. 4u + 3, wherever the interleaving put them.
            auto word_at = [&](int w) { return __ldg((const u32*)((const u8*)d.w + wbyte(d, r, 4 * int4_word(d, w), d.cols / 2))); };
            v = make_uint4(word_at(4 * u), word_at(4 * u + 1), word_at(4 * u + 2), word_at(4 * u + 3));
        }
        return make_uint4(int4_unsigned(v.x), int4_unsigned(v.y), int4_unsigned(v.z), int4_unsigned(v.w));
    }
    __device__ static void param(const WDesc& d, int r, int u, float& s, float& b) { int_param(d, r, u, U, 8.f, s, b); }
    __device__ static float4 chunk(const uint4& v, int i) {
        u32 a = word(v, i / 2) >> (16 * (i % 2));
        return make_float4(small_int(a & 15u), small_int((a >> 4) & 15u), small_int((a >> 8) & 15u), small_int((a >> 12) & 15u));
    }
    __device__ static float at(const WDesc& d, int r, int c) {
        int wpr = (d.cols * 4 + 31) / 32;
        u32 w = int4_unsigned(*(const u32*)((const u8*)d.w + wbyte(d, r, 4 * int4_word(d, c / 8), 4 * wpr)));
        int g = c / d.group;
        float s = int_scale(d, (size_t)r * d.sc + g);
        float z = d.zero ? (float)d.zero[(size_t)r * d.sc + g] : 0.f;
        return fmaf(small_int((w >> (4 * (c % 8))) & 15u), s, -(8.f + z) * s);
    }
};

template <> struct Fmt<FMT_INT8> {
    static constexpr int U = 16;
    static constexpr bool SCALED = true, BIASED = true;
    __device__ static uint4 load(const WDesc& d, int r, int u) {
        uint4 v = ld_weight16<LINEAR_L2_FETCH>((const uint4*)((const u8*)d.w + wbyte(d, r, 16 * u, d.cols)));
        if (!d.interleaved) return v;
        // Each 8 columns back in order (int8_pos), and back to offset binary.
        const u32 f = 0x80808080u;
        return make_uint4(__byte_perm(v.x, v.y, 0x5140) ^ f, __byte_perm(v.x, v.y, 0x7362) ^ f, __byte_perm(v.z, v.w, 0x5140) ^ f,
                          __byte_perm(v.z, v.w, 0x7362) ^ f);
    }
    __device__ static void param(const WDesc& d, int r, int u, float& s, float& b) { int_param(d, r, u, U, 128.f, s, b); }
    __device__ static float4 chunk(const uint4& v, int i) {
        u32 a = word(v, i);
        return make_float4(small_int(a & 255u), small_int((a >> 8) & 255u), small_int((a >> 16) & 255u), small_int(a >> 24));
    }
    __device__ static float at(const WDesc& d, int r, int c) {
        int wpr = (d.cols + 3) / 4, p = int8_pos(d, c);
        u32 w = *(const u32*)((const u8*)d.w + wbyte(d, r, 4 * (p / 4), 4 * wpr));
        int g = c / d.group;
        float s = int_scale(d, (size_t)r * d.sc + g);
        float z = d.zero ? (float)d.zero[(size_t)r * d.sc + g] : 0.f;
        u32 b = ((w >> (8 * (p % 4))) & 255u) ^ (d.interleaved ? 128u : 0u);
        return fmaf(small_int(b), s, -(128.f + z) * s);
    }
};

#define MAX_WARPS 8

// The whole block computes the dot products of ROWS weight rows (`rows`, -1 = unused) with up to
// NT rows of x (`xr[t]`). Threads split the columns in 16-byte units, so every lane keeps ROWS
// independent loads in flight; the results land in `res[rr * NT + t]` (shared), valid after
// the call for every thread.
template <int FMT, int ROWS, int NT>
__device__ __forceinline__ void block_dots(const WDesc& d, const int* rows, const float* const* xr, int nt, float* res) {
    __shared__ float red[MAX_WARPS * ROWS * NT];
    float acc[ROWS][NT];
#pragma unroll
    for (int rr = 0; rr < ROWS; rr++)
#pragma unroll
        for (int t = 0; t < NT; t++) acc[rr][t] = 0.f;
    using F = Fmt<FMT>;
    constexpr int U = F::U;
    if (d.vec) {
        int units = d.cols / U;
        // Unit u's weights and their dequantization parameters.
        auto load = [&](int u, uint4* raw, float* s, float* b) {
#pragma unroll
            for (int rr = 0; rr < ROWS; rr++) {
                if (rows[rr] >= 0) {
                    raw[rr] = F::load(d, rows[rr], u);
                    F::param(d, rows[rr], u, s[rr], b[rr]);
                } else {
                    raw[rr] = make_uint4(0, 0, 0, 0);
                    s[rr] = 0.f;
                    b[rr] = 0.f;
                }
            }
        };
        // Unit u dotted with the token rows into acc.
        auto dot = [&](int u, const uint4* raw, const float* s, const float* b) {
            float ud[ROWS][NT], xs[NT];
#pragma unroll
            for (int t = 0; t < NT; t++) {
                xs[t] = 0.f;
#pragma unroll
                for (int rr = 0; rr < ROWS; rr++) ud[rr][t] = 0.f;
            }
#pragma unroll
            for (int i = 0; i < U / 4; i++) {
                float4 w[ROWS];
#pragma unroll
                for (int rr = 0; rr < ROWS; rr++) w[rr] = F::chunk(raw[rr], i);
#pragma unroll
                for (int t = 0; t < NT; t++) {
                    if (t < nt) {
                        float4 xv = *(const float4*)(xr[t] + u * U + 4 * i);
                        if (F::BIASED) xs[t] += (xv.x + xv.y) + (xv.z + xv.w);
#pragma unroll
                        for (int rr = 0; rr < ROWS; rr++)
                            ud[rr][t] = fmaf(w[rr].x, xv.x, fmaf(w[rr].y, xv.y, fmaf(w[rr].z, xv.z, fmaf(w[rr].w, xv.w, ud[rr][t]))));
                    }
                }
            }
#pragma unroll
            for (int rr = 0; rr < ROWS; rr++)
#pragma unroll
                for (int t = 0; t < NT; t++) {
                    float v = ud[rr][t];
                    if (F::SCALED) v *= s[rr];
                    if (F::BIASED) v = fmaf(b[rr], xs[t], v);
                    acc[rr][t] += v;
                }
        };
#pragma unroll GEMV_UNR
        for (int u = threadIdx.x; u < units; u += blockDim.x) {
            uint4 raw[ROWS];
            float s[ROWS], b[ROWS];
            load(u, raw, s, b);
            dot(u, raw, s, b);
        }
    } else {
        for (int c = threadIdx.x; c < d.cols; c += blockDim.x) {
#pragma unroll
            for (int rr = 0; rr < ROWS; rr++) {
                if (rows[rr] < 0) continue;
                float w = F::at(d, rows[rr], c);
#pragma unroll
                for (int t = 0; t < NT; t++)
                    if (t < nt) acc[rr][t] = fmaf(w, xr[t][c], acc[rr][t]);
            }
        }
    }
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
#pragma unroll
    for (int rr = 0; rr < ROWS; rr++)
#pragma unroll
        for (int t = 0; t < NT; t++) {
            float v = warp_sum(acc[rr][t]);
            if (lane == 0) red[(warp * ROWS + rr) * NT + t] = v;
        }
    __syncthreads();
    for (int i = threadIdx.x; i < ROWS * NT; i += blockDim.x) {
        float v = 0.f;
        for (int w = 0; w < nw; w++) v += red[w * ROWS * NT + i];
        res[i] = v;
    }
    __syncthreads();
}

// Weight rows a block of the one-token GEMV takes (GEMV_ROWS; the host's gemv_rows in
// kernels.rs sets both): each block reads the whole activation row once for its rows, so more
// rows a block read fewer activation bytes per weight byte (at bf16, twice the weights' bytes
// with 4 rows a block).
#ifndef GEMV_ROWS
#define GEMV_ROWS 4
#endif
// Bytes of its rows every block of the GEMV asks L2 for before its wait, in 128-byte lines a
// thread each (prefetch_lines; 0: none). H200 at one token, against prefetch_weights' one bulk
// request from each first-wave block: bf16 6144->2048 79.7 -> 81.5-82.0% of the copy
// bandwidth, 16384->6144 99.5 -> 101%; 16 KB +0.5 point, 32 KB 65% (performance.md).
#ifndef GEMV_LINE_PREFETCH
#define GEMV_LINE_PREFETCH 8192
#endif

// y[t, yoff + r] = x[t] · W[r] for NT tokens per block row; grid (ceil(rows / ROWS), ceil(T / NT))
// with ROWS GEMV_ROWS for one token, else 4.
// (One row per block, to spread the 256-row router gate over more SMs, measured slower in the
// MoE block: performance.md.)
template <int FMT, int NT>
__device__ void gemv(const WDesc d, const float* __restrict__ x, float* __restrict__ y, int T, int ldy, int yoff) {
    constexpr int ROWS = NT == 1 ? GEMV_ROWS : 4;
    __shared__ float res[ROWS * NT];
    int r0 = blockIdx.x * ROWS;
    // The block's rows are contiguous in the plain layout (asked for once, by the blocks of the
    // first token rows).
    if (d.vec && !d.mma && r0 < d.rows && blockIdx.y == 0) {
        size_t rb = (size_t)(d.cols / Fmt<FMT>::U) * 16;
        prefetch_lines((const u8*)d.w + r0 * rb, min(min(ROWS, d.rows - r0) * rb, (size_t)GEMV_LINE_PREFETCH), threadIdx.x, blockDim.x);
    }
    pdl_entry();
    int t0 = blockIdx.y * NT;
    int nt = min(NT, T - t0);
    int rows[ROWS];
#pragma unroll
    for (int rr = 0; rr < ROWS; rr++) rows[rr] = r0 + rr < d.rows ? r0 + rr : -1;
    const float* xr[NT];
#pragma unroll
    for (int t = 0; t < NT; t++) xr[t] = x + (size_t)(t0 + min(t, nt - 1)) * d.cols;
    block_dots<FMT, ROWS, NT>(d, rows, xr, nt, res);
    pdl_late();
    for (int i = threadIdx.x; i < ROWS * NT; i += blockDim.x) {
        int rr = i / NT, t = i % NT;
        if (rows[rr] >= 0 && t < nt) y[(size_t)(t0 + t) * ldy + yoff + rows[rr]] = res[i];
    }
}

// out[t] = W[ids[t]] (embedding gather); grid T.
template <int FMT>
__device__ void embed(const WDesc d, const int* __restrict__ ids, float* __restrict__ out) {
    int t = blockIdx.x;
    int r = ids[t];
    for (int c = threadIdx.x; c < d.cols; c += blockDim.x) out[(size_t)t * d.cols + c] = Fmt<FMT>::at(d, r, c);
}

// ---- mixture of experts (plan layout in common.cuh) ----------------------------------------
// MOE_NT tokens of an expert's group are processed per pass (1 at batch-1 decode keeps
// registers low).

// act[p, r] = silu(gate_e[r]·x_t) · (up_e[r]·x_t) for two consecutive r per block and every pair
// of the block's expert group; gate and up are rows [0, I) and [I, 2I) of the gate_up weight.
template <int FMT, int MOE_NT>
__device__ void moe_gate_up(const WDesc* __restrict__ gu, const int* __restrict__ plan, int P, const float* __restrict__ x,
                            float* __restrict__ act, int K, int I) {
    __shared__ float res[4 * MOE_NT];
    PlanGroup pg;
    if (!plan_group(plan, P, blockIdx.y, pg)) return;
    const WDesc d = gu[pg.expert];
    const int* pairs = pg.pairs;
    int r = blockIdx.x * 2;
    int rows[4] = {r, r + 1 < I ? r + 1 : -1, I + r, r + 1 < I ? I + r + 1 : -1};
    for (int p0 = pg.first; p0 < pg.end; p0 += MOE_NT) {
        int nt = min(MOE_NT, pg.end - p0);
        const float* xr[MOE_NT];
#pragma unroll
        for (int t = 0; t < MOE_NT; t++) xr[t] = x + (size_t)(pairs[p0 + min(t, nt - 1)] / K) * d.cols;
        block_dots<FMT, 4, MOE_NT>(d, rows, xr, nt, res);
        pdl_late();
        for (int i = threadIdx.x; i < 2 * nt; i += blockDim.x) {
            int j = i / nt, t = i % nt;
            if (rows[j] < 0) continue;
            float gv = res[j * MOE_NT + t], uv = res[(2 + j) * MOE_NT + t];
            act[(size_t)pairs[p0 + t] * I + r + j] = gv / (1.f + expf(-gv)) * uv;
        }
        __syncthreads();
    }
}

// part[p, r] = down_e[r] · act[p], four rows per block, every pair of the block's group.
template <int FMT, int MOE_NT>
__device__ void moe_down(const WDesc* __restrict__ dn, const int* __restrict__ plan, int P, const float* __restrict__ act,
                         float* __restrict__ part, int H) {
    __shared__ float res[4 * MOE_NT];
    PlanGroup pg;
    if (!plan_group(plan, P, blockIdx.y, pg)) return;
    const WDesc d = dn[pg.expert];
    const int* pairs = pg.pairs;
    int r0 = blockIdx.x * 4;
    int rows[4];
#pragma unroll
    for (int rr = 0; rr < 4; rr++) rows[rr] = r0 + rr < H ? r0 + rr : -1;
    for (int p0 = pg.first; p0 < pg.end; p0 += MOE_NT) {
        int nt = min(MOE_NT, pg.end - p0);
        const float* xr[MOE_NT];
#pragma unroll
        for (int t = 0; t < MOE_NT; t++) xr[t] = act + (size_t)pairs[p0 + min(t, nt - 1)] * d.cols;
        block_dots<FMT, 4, MOE_NT>(d, rows, xr, nt, res);
        pdl_late();
        for (int i = threadIdx.x; i < 4 * nt; i += blockDim.x) {
            int rr = i / nt, t = i % nt;
            if (rows[rr] >= 0) part[(size_t)pairs[p0 + t] * H + rows[rr]] = res[rr * MOE_NT + t];
        }
        __syncthreads();
    }
}

// Fills `plan` (the layout above plan_group in common.cuh) from the pairs' experts ex[0 .. P)
// over E experts; cnt: E ints of shared scratch. One whole warp. Groups are the used experts in increasing order, and pairs
// keep their order within a group.
// Up to 32 pairs (a decode step's): a lane per pair, and 32 shuffles give each pair the count
// of pairs and of groups of smaller experts: its group's offset, its group, and with the
// earlier pairs of its expert (match_any) its slot; nothing is read per expert (at 256 experts
// the scan below reads 256 counts). Else counts by shared atomics, groups and their offsets by
// warp scans over 32 experts at a time, then each pair's slot, 32 pairs at a time. (One
// thread doing all of it waited on shared memory once per expert.)
__device__ void plan_from(const int* ex, int P, int E, int* cnt, int* plan) {
    const unsigned all = 0xffffffffu;
    int lane = threadIdx.x & 31;
    unsigned below = (1u << lane) - 1;
    int *experts = plan + 1, *offs = plan + 1 + P, *pairs = plan + 2 + 2 * P;
    if (P <= 32) {
        int e = lane < P ? ex[lane] : 0x7fffffff;  // past the end: after every expert
        unsigned same = __match_any_sync(all, e);
        bool first = lane < P && (same & below) == 0;
        unsigned firsts = __ballot_sync(all, first);
        int less = 0, less_groups = 0;
#pragma unroll 8
        for (int j = 0; j < 32; j++) {
            bool lt = __shfl_sync(all, e, j) < e;
            less += lt;
            less_groups += lt && ((firsts >> j) & 1);
        }
        if (first) {
            experts[less_groups] = e;
            offs[less_groups] = less;
        }
        if (lane < P) pairs[less + __popc(same & below)] = lane;
        if (lane == 0) {
            plan[0] = __popc(firsts);
            offs[__popc(firsts)] = P;
        }
        return;
    }
    for (int e = lane; e < E; e += 32) cnt[e] = 0;
    __syncwarp();
    for (int p = lane; p < P; p += 32) atomicAdd(&cnt[ex[p]], 1);
    __syncwarp();
    int groups = 0, off = 0;
    for (int e0 = 0; e0 < E; e0 += 32) {
        int e = e0 + lane, n = e < E ? cnt[e] : 0, incl = n;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            int v = __shfl_up_sync(all, incl, o);
            if (lane >= o) incl += v;
        }
        unsigned used = __ballot_sync(all, n > 0);
        if (n > 0) {
            int gi = groups + __popc(used & below);
            experts[gi] = e;
            offs[gi] = off + incl - n;
            cnt[e] = off + incl - n;  // becomes the next free slot of the group
        }
        groups += __popc(used);
        off += __shfl_sync(all, incl, 31);
    }
    if (lane == 0) {
        offs[groups] = off;
        plan[0] = groups;
    }
    __syncwarp();
    for (int p0 = 0; p0 < P; p0 += 32) {
        int p = p0 + lane, e = p < P ? ex[p] : -1;
        unsigned same = __match_any_sync(all, e);
        if (p < P) pairs[cnt[e] + __popc(same & below)] = p;
        __syncwarp();
        if (p < P && (same >> lane) == 1) cnt[e] += __popc(same);  // the group's last lane
        __syncwarp();
    }
}

// The plan of a step's routes. Shared: a count per expert, then (when `staged`) the pairs'
// experts, read from global in one parallel pass.
extern "C" __global__ void moe_plan(const int* __restrict__ idx, int P, int E, int staged, int* __restrict__ plan) { pdl_entry_small();
    extern __shared__ int cnt[];
    int* ex = cnt + E;
    if (staged)
        for (int p = threadIdx.x; p < P; p += blockDim.x) ex[p] = idx[p];
    __syncthreads();
    if (threadIdx.x < 32) plan_from(staged ? ex : idx, P, E, cnt, plan);
}

#define MOE_NT_KERNELS(NAME, FMT, NT)                                                                      \
    extern "C" __global__ void moe_gate_up##NT##_##NAME(const WDesc* gu, const int* plan, int P, const float* x, float* act, int K, int I) { pdl_entry(); \
        moe_gate_up<FMT, NT>(gu, plan, P, x, act, K, I);                                                   \
    }                                                                                                      \
    extern "C" __global__ void moe_down##NT##_##NAME(const WDesc* dn, const int* plan, int P, const float* act, float* part, int H) { pdl_entry(); \
        moe_down<FMT, NT>(dn, plan, P, act, part, H);                                                      \
    }

#define INSTANTIATE(NAME, FMT)                                                                            \
    extern "C" __global__ void gemv1_##NAME(const WDesc d, const float* x, float* y, int T, int ldy, int yoff) { \
        gemv<FMT, 1>(d, x, y, T, ldy, yoff);                                                               \
    }                                                                                                      \
    extern "C" __global__ void gemv8_##NAME(const WDesc d, const float* x, float* y, int T, int ldy, int yoff) { \
        gemv<FMT, 8>(d, x, y, T, ldy, yoff);                                                               \
    }                                                                                                      \
    extern "C" __global__ void embed_##NAME(const WDesc d, const int* ids, float* out) { pdl_entry(); embed<FMT>(d, ids, out); } \
    MOE_NT_KERNELS(NAME, FMT, 1)                                                                           \
    MOE_NT_KERNELS(NAME, FMT, 8)

INSTANTIATE(f32, FMT_F32)
INSTANTIATE(bf16, FMT_BF16)
INSTANTIATE(f16, FMT_F16)
INSTANTIATE(fp8, FMT_FP8)
INSTANTIATE(int4, FMT_INT4)
INSTANTIATE(int8, FMT_INT8)

// out[t, r] = Σ_k w[t, k] · part[t·K + k, r], then + shared[t, r] when given (the shared expert
// run apart from the routed ones: the same rounding as a last pair of weight 1).
extern "C" __global__ void moe_combine(const float* __restrict__ part, const float* __restrict__ w, float* __restrict__ out,
                                       int T, int K, int H, const float* __restrict__ shared) { pdl_entry_small();
    TIMELINE_END;
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (size_t)T * H) return;
    int t = i / H, r = i % H;
    float s = 0.f;
#pragma unroll 8
    for (int k = 0; k < K; k++) s = fmaf(w[t * K + k], part[((size_t)t * K + k) * H + r], s);
    if (shared) s += shared[i];
    out[i] = s;
}

// The plan of expert e alone over P pairs, pair p being token p (moe_plan's layout): the shared
// expert run apart from the routed ones.
extern "C" __global__ void moe_plan_one(int e, int P, int* __restrict__ plan) { pdl_entry_small();
    for (int p = threadIdx.x; p < P; p += blockDim.x) plan[2 + 2 * P + p] = p;
    if (threadIdx.x == 0) {
        plan[0] = 1;
        plan[1] = e;
        plan[1 + P] = 0;
        plan[2 + P] = P;
    }
}

// Sigmoid router with the selection-only bias and group-limited top-k (ties go to the lower
// index); ROUTE_THREADS threads per token: a block of blockDim.x / ROUTE_THREADS sub-blocks,
// each taking one token with its own share of shared memory (up to ROUTE_MAX_TOKENS fit; the
// host puts a decode step of one or two tokens in one block, else one token a block). With
// shared ≥ 0 that expert (the shared expert folded into the routed ones) follows every token's
// K choices with weight 1, so idx and wout hold K + 1 entries per token. With `plan` non-null the step's
// plan over PE experts is built here too (moe_plan's work, without its launch): by the only
// block from its tokens' picks, or by the last block of several to finish: blocks count
// themselves done in `done`, which the last one resets to zero for the next step. Dynamic
// shared memory: the larger of sub-blocks·route_words(E, G, K) words and (PE + T·K1) ints.
// A sub-block's words: sigmoid scores [E], selection scores [E], candidates [2·runs·KC] (an
// (expert, score) pair each: KC = min(K, 32) a run of 32 experts), group scores [G], rounded up
// to even so every sub-block's candidates stay 8-byte aligned. route_words in moe.rs matches.
#define ROUTE_THREADS 256   // ROUTE_THREADS in moe.rs
#define ROUTE_MAX_TOKENS 4  // sub-blocks a block at most (1024 threads)
__device__ __forceinline__ int route_words(int E, int G, int K) { return (2 * E + 2 * ((E + 31) / 32) * min(K, 32) + G + 1) & ~1; }
extern "C" __global__ void __launch_bounds__(ROUTE_THREADS * ROUTE_MAX_TOKENS) moe_route(const float* __restrict__ logits, const float* __restrict__ bias, int* __restrict__ idx,
                                     float* __restrict__ wout, int E, int G, int TG, int K, int norm, float scaling, int shared,
                                     int* __restrict__ plan, int* __restrict__ done, int PE) { pdl_entry_small();
    TIMELINE_END;
    extern __shared__ __align__(16) float sm[];  // (the candidates are int2)
    // Sub-block `sub` takes token t with threads tid; every barrier below is reached by all
    // sub-blocks alike (their control flow differs only within warps' loops).
    int tpb = blockDim.x / ROUTE_THREADS, sub = threadIdx.x / ROUTE_THREADS, tid = threadIdx.x % ROUTE_THREADS;
    int t = blockIdx.x * tpb + sub, K1 = K + (shared >= 0), KC = min(K, 32), NC = (E + 31) / 32 * KC;
    float* s = sm + sub * route_words(E, G, K);  // sigmoid scores
    float* c = s + E;                            // selection scores
    int2* cand = (int2*)(c + E);                 // candidates: (expert, score bits)
    float* gs = (float*)(cand + NC);             // group scores
    __shared__ int chosen_all[ROUTE_MAX_TOKENS][64];
    int* chosen = chosen_all[sub];
    for (int e = tid; e < E; e += ROUTE_THREADS) {
        float z = logits[(size_t)t * E + e];
        float v = 1.f / (1.f + expf(-z));
        s[e] = v;
        c[e] = v + bias[e];
        if (!(c[e] == c[e])) c[e] = NEG_INF;  // NaN ranks last (every rank stays distinct)
    }
    __syncthreads();
    timeline_phase(0);
    int per = E / G;
    if (G > 1) {
        for (int g = tid; g < G; g += ROUTE_THREADS) {
            float a = NEG_INF, b = NEG_INF;
            for (int j = 0; j < per; j++) {
                float v = c[g * per + j];
                if (v > a) { b = a; a = v; } else if (v > b) { b = v; }
            }
            gs[g] = a + b;
        }
        __syncthreads();
        if (tid == 0) {
            for (int k = 0; k < TG; k++) {
                int bi = -1;
                for (int g = 0; g < G; g++)
                    if (gs[g] > NEG_INF && (bi < 0 || gs[g] > gs[bi])) bi = g;
                if (bi >= 0) gs[bi] = NEG_INF;
                chosen[k] = bi;
            }
            // Mark kept groups by 1 in gs (all others were not chosen).
            for (int g = 0; g < G; g++) gs[g] = 0.f;
            for (int k = 0; k < TG; k++) if (chosen[k] >= 0) gs[chosen[k]] = 1.f;
        }
        __syncthreads();
        for (int e = tid; e < E; e += ROUTE_THREADS)
            if (gs[e / per] == 0.f) c[e] = NEG_INF;
        __syncthreads();
    }
    // Top-K by rank: expert e is pick number `rank`, the count of experts that come before it
    // (a higher score, or the same at a lower index: the CPU's order), when that is below K.
    // (K rounds of a warp arg-max measured slower: K chains of shuffles.) In two passes, so a
    // thread compares against far fewer than E scores: each run of 32 experts ranks itself
    // within the run by shuffles, and its first KC become candidates, at slot run·KC + rank (an
    // expert's rank within its run is at most its rank overall, so every pick is a candidate);
    // then each candidate's rank among the candidates is its rank overall for the K picks
    // (whatever comes before a pick is a pick) and at least K for the others (the K picks come
    // before). A candidate carries its score, so the second pass's loads do not wait on each
    // other. Lanes past E (the last run's) rank after every expert, so they fill their run's
    // remaining slots and never come before an expert: at least K experts are candidates.
    // (Whole warps: ROUTE_THREADS is a multiple of 32, and base is the same across a warp.)
    for (int base = (tid >> 5) * 32; base < E; base += ROUTE_THREADS) {
        int l = tid & 31, e = base + l;
        float v = e < E ? c[e] : NEG_INF;  // past the end: last, behind every expert (index)
        int rank = 0;
#pragma unroll 8
        for (int j = 0; j < 32; j++) {
            float u = __shfl_sync(0xffffffffu, v, j);
            rank += u > v || (u == v && j < l);
        }
        if (rank < KC) cand[base / 32 * KC + rank] = make_int2(e, __float_as_int(v));
    }
    __syncthreads();
    timeline_phase(1);
    // Four threads a candidate, each comparing it with every fourth candidate (whole warps
    // through the loop: i0 is the same across the sub-block).
    for (int i0 = 0; i0 < NC; i0 += ROUTE_THREADS / 4) {
        int i = i0 + (tid >> 2), rank = 0;
        int2 me = cand[i < NC ? i : 0];
        float v = __int_as_float(me.y);
        if (i < NC) {
#pragma unroll 4
            for (int j = tid & 3; j < NC; j += 4) {
                int2 o = cand[j];
                float u = __int_as_float(o.y);
                rank += u > v || (u == v && o.x < me.x);
            }
        }
        rank += __shfl_xor_sync(0xffffffffu, rank, 1);
        rank += __shfl_xor_sync(0xffffffffu, rank, 2);
        if (i < NC && (tid & 3) == 0 && rank < K) chosen[rank] = me.x;
    }
    __syncthreads();
    timeline_phase(2);
    // The token's picks and weights, by the sub-block's first warp: each lane loads its picks'
    // scores at once, and every lane sums them in pick order (the CPU's sum, bit for bit).
    if (tid < 32) {
        int lane = tid;
        float sum = 0.f;
        for (int k0 = 0; k0 < K; k0 += 32) {
            float v = k0 + lane < K ? s[chosen[k0 + lane]] : 0.f;
            for (int j = 0; j < min(32, K - k0); j++) sum += __shfl_sync(0xffffffffu, v, j);
        }
        float denom = norm ? sum + 1e-20f : 1.f;
        for (int k = lane; k < K; k += 32) {
            idx[t * K1 + k] = chosen[k];
            wout[t * K1 + k] = s[chosen[k]] / denom * scaling;
        }
        if (lane == 0 && shared >= 0) {
            idx[t * K1 + K] = shared;
            wout[t * K1 + K] = 1.f;
        }
    }
    timeline_phase(3);
    if (!plan) return;
    int P = gridDim.x * tpb * K1;
    int* cnt = (int*)sm;
    int* ex = cnt + PE;
    if (gridDim.x == 1) {
        // The only block: its tokens' picks are the step's.
        __syncthreads();  // (every sub-block's reads of its scores come before ex's writes over them)
        if (threadIdx.x >= 32) return;
        for (int p = threadIdx.x; p < P; p += 32) {
            int j = p / K1, k = p % K1;
            ex[p] = k < K ? chosen_all[j][k] : shared;
        }
        __syncwarp();
        plan_from(ex, P, PE, cnt, plan);
        return;
    }
    // Several blocks (one token each: the host puts tokens together only in a block alone).
    if (threadIdx.x >= 32) return;
    int lane = threadIdx.x;
    __syncwarp();  // (the lanes' reads of s above come before ex's writes over it)
    __shared__ int last;
    __threadfence();  // every lane's picks are visible before the block counts itself done
    __syncwarp();
    if (lane == 0) last = atomicAdd(done, 1) == (int)gridDim.x - 1;
    __syncwarp();
    if (!last) return;
    __threadfence();
    for (int p = lane; p < P; p += 32) ex[p] = __ldcg(idx + p);  // other blocks' writes, from L2
    __syncwarp();
    plan_from(ex, P, PE, cnt, plan);
    if (lane == 0) *done = 0;
}

// moe_route for a decode step of up to ROUTE_MAX_TOKENS tokens without expert groups (n_group
// 1, as GLM-5.x), at most 32·ROUTE_WARP_PER experts and 32 picks a token: a warp a token, one
// block. Lane l holds experts l·per .. l·per + per − 1 (per = ⌈E/32⌉) as order keys in
// registers, and each of the K picks is one warp arg-max: the lane's best key by a scan of its
// keys, then redux.sync over the lanes (the lowest lane with the top key holds the lowest index
// among equals, and the scan keeps its lowest slot, so ties go to the lower index as the CPU's
// order has it). The picks, their weights (summed in pick order: moe_route's bits) and the plan
// are moe_route's. No barrier but the one before the plan: moe_route's five barriers and
// shared-memory passes took 4.6 µs from its release to its end inside the INT4 block at one
// token on the H200, this 3.4 (kernel timeline; each lane's keys sorted once so that a pick
// pops the winner's head, not a scan, took 4.3: the sort costs more than the scans it saves;
// performance.md).
#define ROUTE_WARP_PER 8
extern "C" __global__ void __launch_bounds__(32 * ROUTE_MAX_TOKENS) moe_route_warp(const float* __restrict__ logits, const float* __restrict__ bias, int* __restrict__ idx,
                                                                               float* __restrict__ wout, int E, int K, int norm, float scaling, int shared,
                                                                               int* __restrict__ plan, int PE) {
    const unsigned all = 0xffffffffu;
    int t = threadIdx.x >> 5, lane = threadIdx.x & 31, per = (E + 31) / 32, e0 = lane * per;
    // The bias depends on no kernel: loaded before the wait.
    float b[ROUTE_WARP_PER];
#pragma unroll
    for (int j = 0; j < ROUTE_WARP_PER; j++) b[j] = j < per && e0 + j < E ? __ldg(bias + e0 + j) : 0.f;
    pdl_entry_small();
    TIMELINE_END;
    float s[ROUTE_WARP_PER];
    u32 key[ROUTE_WARP_PER];
#pragma unroll
    for (int j = 0; j < ROUTE_WARP_PER; j++) {
        bool in = j < per && e0 + j < E;
        float z = in ? logits[(size_t)t * E + e0 + j] : 0.f;
        s[j] = 1.f / (1.f + expf(-z));
        float c = s[j] + b[j];
        if (!(c == c)) c = NEG_INF;  // NaN ranks last
        // (−0 as +0: they compare equal.) Key 0, which no float has: no expert, or taken.
        key[j] = in ? order_key(c + 0.f) : 0u;
    }
    timeline_phase(0);
    int my_e = -1;
    float my_s = 0.f, sum = 0.f;
    for (int k = 0; k < K; k++) {
        u32 best = 0;
        int bj = 0;
#pragma unroll
        for (int j = 0; j < ROUTE_WARP_PER; j++)
            if (key[j] > best) best = key[j], bj = j;
        u32 top = __reduce_max_sync(all, best);
        int wl = __ffs(__ballot_sync(all, best == top)) - 1;
        float sv = 0.f;
#pragma unroll
        for (int j = 0; j < ROUTE_WARP_PER; j++) {
            if (j == bj) sv = s[j];
            if (j == bj && lane == wl) key[j] = 0u;
        }
        int e = __shfl_sync(all, e0 + bj, wl);
        float v = __shfl_sync(all, sv, wl);
        sum += v;
        if (lane == k) my_e = e, my_s = v;
    }
    timeline_phase(1);
    int K1 = K + (shared >= 0), P = blockDim.x / 32 * K1;
    float denom = norm ? sum + 1e-20f : 1.f;
    __shared__ int ex[ROUTE_MAX_TOKENS * 33];
    if (lane < K) {
        idx[t * K1 + lane] = my_e;
        wout[t * K1 + lane] = my_s / denom * scaling;
        ex[t * K1 + lane] = my_e;
    }
    if (lane == 0 && shared >= 0) {
        idx[t * K1 + K] = shared;
        wout[t * K1 + K] = 1.f;
        ex[t * K1 + K] = shared;
    }
    __syncthreads();
    timeline_phase(2);
    extern __shared__ int cnt[];  // PE ints (plan_from's scratch above 32 pairs)
    if (t == 0) plan_from(ex, P, PE, cnt, plan);
    timeline_phase(3);
}
