// Tensor-core linear layers for decode: FP8 and INT4 weights times up to four token rows.
//
// The CUDA-core kernels of linear.cu turn every weight into an f32 before its multiply-add, and
// for FP8 and INT4 that arithmetic, not memory, bounds them. Here weight codes become f16
// exactly (an e4m3 value has 3 mantissa bits; q − zp of INT4 is a small integer) and are
// multiplied on the tensor cores (mma.sync m16n8k16, f32 accumulation) with each activation
// row split into two f16 halves: hi = f16(x·2^k), lo = f16(x·2^k − hi), with 2^k putting the
// row's largest |x| in [2^14, 2^15). hi + lo keeps 22 bits of every x (f32 keeps 24), so the
// products and sums stay within f32 rounding of the CUDA-core path. The checkpoint's scales are
// applied in f32 to each (row, scale block) sum, as the format defines them.
//
// Fragments: a warp multiplies a 16-row tile of W by an 8-column B; column n = 2t + part is token
// t's hi or lo half. The order of k inside a fragment is free as long as A and B agree, so each
// lane reads its weights in whole pieces (16 bytes of FP8, 4 or 16 bytes of INT4) and split_act
// lays the activations out in the matching order. A block's warps split the columns and reduce
// their tiles through shared memory.

#define MMA_WARPS 16
#define MMA_TOKENS 4  // tokens per B tile (two halves each)
// Registers per thread (__maxnreg__), per format: at most 128 so 16-warp blocks fit; INT4
// capped at 80 so more small blocks fit per SM (its 106 left 16 warps per SM streaming; at 80,
// 24: INT4 experts 45-49% -> 48-55%), while FP8 measured slower under the same cap (62-74%
// against 75-82%) and keeps the compiler's choice.

__device__ __forceinline__ u32 f16_bits(float v) {
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v));
    return h;
}

// 2^k for |k| ≤ 126, exactly.
__device__ __forceinline__ float pow2(int k) { return __int_as_float((127 + k) << 23); }

// d += A·B for one m16n8k16 tile (A row-major f16, B column-major f16, f32 accumulators).
__device__ __forceinline__ void mma_f16(float d[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// Two e4m3 codes (low byte first) as an f16 pair, exactly.
__device__ __forceinline__ u32 e4m3x2_f16x2(u32 pair) {
    u32 h;
    asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(h) : "h"((unsigned short)pair));
    return h;
}

// What int4_pairs removes from a raw nibble to give q − zp (q = n − 8), as f16 pairs: 1024 + 8 +
// zp after the 0x6400 magic, and 64 + 8 + zp (negated) after the 1/16 scaling.
struct Int4Off {
    u32 sub, fma;
};

__device__ __forceinline__ Int4Off int4_offset(const WDesc& d, size_t at) {
    float z = d.zero ? (float)d.zero[at] : 0.f;
    u32 s = f16_bits(1032.f + z), f = f16_bits(-72.f - z);
    return {s | (s << 16), f | (f << 16)};
}

// The nibble pairs (n_i, n_{i+4}), i = 0..3, of an INT4 word as exact f16 pairs of q − zp.
// Nibbles at bits 0-3 of a half become 0x6400 | n = 1024 + n, minus 1032 + zp; nibbles at bits
// 4-7 become 0x6400 | 16n = 1024 + 16n, times 1/16 minus 72 + zp in one fused multiply-add.
// So one shift (by 8) serves the word instead of one per pair.
__device__ __forceinline__ void int4_pairs(u32 w, Int4Off o, u32 p[4]) {
    const u32 magic = 0x64006400u, sixteenth = 0x2c002c00u;
    u32 hi = w >> 8;
    u32 v0 = (w & 0x000f000fu) | magic, v1 = (w & 0x00f000f0u) | magic;
    u32 v2 = (hi & 0x000f000fu) | magic, v3 = (hi & 0x00f000f0u) | magic;
    asm("sub.rn.f16x2 %0, %1, %2;" : "=r"(p[0]) : "r"(v0), "r"(o.sub));
    asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(p[1]) : "r"(v1), "r"(sixteenth), "r"(o.fma));
    asm("sub.rn.f16x2 %0, %1, %2;" : "=r"(p[2]) : "r"(v2), "r"(o.sub));
    asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(p[3]) : "r"(v3), "r"(sixteenth), "r"(o.fma));
}

// ---- one warp's share of a tile ------------------------------------------------------------
// Rows ra (A rows g = lane / 4) and rb (A rows g + 8), −1 for none; xp is this lane's B column
// (token (g / 2)'s plane `g % 2` of split_act), null for an empty column. Warp w of a block
// takes chunks w, w + nw, ... of the columns, UNR at a time, so each warp keeps a few kilobytes
// in flight. The tile functions return, for lane (g, c = lane % 4),
// the scaled dot products of ra and rb with token c over the warp's chunks (hi + lo halves).

// Streaming 16-byte weight load (read once; kept out of L1).
__device__ __forceinline__ uint4 ld_stream(const void* p) {
    uint4 v;
    asm("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}

// FP8, block scales with bc a power-of-two multiple of 64. A chunk is 64 columns: lane c holds
// bytes [16c, 16c + 16) of both rows; mma j takes its bytes 4j .. 4j + 3.
struct Fp8Tile {
    static constexpr int XN = 2;   // 16-byte pieces of x per lane and chunk
    static constexpr int UNR = 4;  // chunks in flight per warp
    const WDesc& d;
    int lq;                       // log2(chunks per scale column)
    const float *sa, *sb;         // scale rows of ra and rb
    __device__ Fp8Tile(const WDesc& d, int ra, int rb)
        : d(d), lq(__ffs(d.bc >> 6) - 1), sa(ra >= 0 ? d.scale + (size_t)(ra / d.br) * d.sc : nullptr),
          sb(rb >= 0 ? d.scale + (size_t)(rb / d.br) * d.sc : nullptr) {}
    __device__ int chunks() const { return d.cols >> 6; }
    __device__ uint4 load(int r, int q, int c) const { return ld_stream((const u8*)d.w + (size_t)r * d.cols + 64 * q + 16 * c); }
    // Where this lane's x pieces of chunk q lie in its x plane (in 16-byte pieces).
    __device__ static void x_at(int q, int c, int* at) {
        at[0] = 8 * q + 2 * c;
        at[1] = 8 * q + 2 * c + 1;
    }
    __device__ void dot(int q, uint4 A, uint4 B, const uint4* X, float2& acc) const {
        float t[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
        for (int j = 0; j < 4; j++) {
            u32 a = word(A, j), b = word(B, j);
            mma_f16(t, e4m3x2_f16x2(a & 0xffff), e4m3x2_f16x2(b & 0xffff), e4m3x2_f16x2(a >> 16), e4m3x2_f16x2(b >> 16),
                    word(X[j / 2], 2 * (j % 2)), word(X[j / 2], 2 * (j % 2) + 1));
        }
        acc.x = fmaf(sa ? sa[q >> lq] : 0.f, t[0] + t[1], acc.x);
        acc.y = fmaf(sb ? sb[q >> lq] : 0.f, t[2] + t[3], acc.y);
    }
};

// The two mma of one INT4 word (8 columns; split_act interleaves x to match int4_pairs).
__device__ __forceinline__ void int4_word_mma(float t[4], u32 a, u32 b, Int4Off offa, Int4Off offb, const uint4& x) {
    u32 pa[4], pb[4];
    int4_pairs(a, offa, pa);
    int4_pairs(b, offb, pb);
    mma_f16(t, pa[0], pb[0], pa[1], pb[1], x.x, x.y);
    mma_f16(t, pa[2], pb[2], pa[3], pb[3], x.z, x.w);
}

// INT4, group scales (group a power of two ≥ 32). A chunk is 128 columns, four words per lane.
// With groups of 128 or more (CONTIG) lane c holds the 16 bytes [16c, 16c + 16), all in one
// group; with smaller groups every mma must stay inside one group, so lane c holds word c of
// each 16-byte piece (a quad still reads whole 16-byte pieces).
template <bool CONTIG> struct Int4Tile {
    static constexpr int XN = 4;
    static constexpr int UNR = 2;
    const WDesc& d;
    int lg;          // log2(group)
    int ra, rb;
    size_t ga, gb;   // scale rows of ra and rb
    __device__ Int4Tile(const WDesc& d, int ra, int rb)
        : d(d), lg(__ffs(d.group) - 1), ra(ra), rb(rb), ga((size_t)max(ra, 0) * d.sc), gb((size_t)max(rb, 0) * d.sc) {}
    __device__ int chunks() const { return d.cols >> 7; }
    // Column of word i of chunk q for lane c.
    __device__ static int col(int q, int c, int i) { return 128 * q + (CONTIG ? 32 * c + 8 * i : 32 * i + 8 * c); }
    __device__ uint4 load(int r, int q, int c) const {
        const u32* row = (const u32*)d.w + (size_t)r * (d.cols >> 3);
        if (CONTIG) return ld_stream(row + col(q, c, 0) / 8);
        return make_uint4(__ldg(row + col(q, c, 0) / 8), __ldg(row + col(q, c, 1) / 8), __ldg(row + col(q, c, 2) / 8), __ldg(row + col(q, c, 3) / 8));
    }
    __device__ static void x_at(int q, int c, int* at) {
#pragma unroll
        for (int i = 0; i < 4; i++) at[i] = col(q, c, i) / 8;
    }
    // Scaled sums of words i0 .. i0 + n − 1 (one group) into acc.
    __device__ void group_dot(int q, int i0, int n, uint4 A, uint4 B, const uint4* X, float2& acc) const {
        size_t g = (size_t)(128 * q + (CONTIG ? 0 : 32 * i0)) >> lg;
        Int4Off offa = int4_offset(d, ga + g), offb = int4_offset(d, gb + g);
        float t[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
        for (int i = i0; i < i0 + n; i++) int4_word_mma(t, word(A, i), word(B, i), offa, offb, X[i]);
        acc.x = fmaf(ra >= 0 ? d.scale[ga + g] : 0.f, t[0] + t[1], acc.x);
        acc.y = fmaf(rb >= 0 ? d.scale[gb + g] : 0.f, t[2] + t[3], acc.y);
    }
    __device__ void dot(int q, uint4 A, uint4 B, const uint4* X, float2& acc) const {
        if (CONTIG) {
            group_dot(q, 0, 4, A, B, X, acc);
        } else {
#pragma unroll
            for (int i = 0; i < 4; i++) group_dot(q, i, 1, A, B, X, acc);
        }
    }
};

// The loop over this warp's chunks: all loads of UNR chunks (weights and x pieces) are issued
// before the first multiply. (Loading x where it is used saved registers but measured slower
// on H200, as did a cp.async pipeline through shared memory.)
template <class Tile> __device__ float2 tile_dots(const Tile& tile, int ra, int rb, const uint4* __restrict__ xp) {
    constexpr int UNR = Tile::UNR, XN = Tile::XN;
    int lane = threadIdx.x & 31, c = lane & 3, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    int nq = tile.chunks();
    float2 acc = make_float2(0.f, 0.f);
    const uint4 zero = make_uint4(0, 0, 0, 0);
    for (int q0 = warp; q0 < nq; q0 += UNR * nw) {
        uint4 A[UNR], B[UNR], X[UNR][XN];
#pragma unroll
        for (int u = 0; u < UNR; u++) {
            int q = q0 + u * nw, at[XN];
            bool ok = q < nq;
            A[u] = ok && ra >= 0 ? tile.load(ra, q, c) : zero;
            B[u] = ok && rb >= 0 ? tile.load(rb, q, c) : zero;
            tile.x_at(q, c, at);
#pragma unroll
            for (int i = 0; i < XN; i++) X[u][i] = ok && xp ? xp[at[i]] : zero;
        }
#pragma unroll
        for (int u = 0; u < UNR; u++)
            if (q0 + u * nw < nq) tile.dot(q0 + u * nw, A[u], B[u], X[u], acc);
    }
    return acc;
}

template <int FMT> __device__ __forceinline__ float2 tile_part(const WDesc& d, int ra, int rb, const uint4* xp) {
    if (FMT == FMT_FP8) return tile_dots(Fp8Tile(d, ra, rb), ra, rb, xp);
    if (d.group >= 128) return tile_dots(Int4Tile<true>(d, ra, rb), ra, rb, xp);
    return tile_dots(Int4Tile<false>(d, ra, rb), ra, rb, xp);
}

// Sums the warps' shares: res[r·4 + t] = row r of the tile (0..15) with token t. Every thread
// of the block calls it; res is valid for all after it returns.
__device__ void tile_reduce(float2 v, float* res) {
    __shared__ float2 red[MMA_WARPS][32];
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    red[warp][lane] = v;
    __syncthreads();
    if (threadIdx.x < 16 * MMA_TOKENS) {
        int r = threadIdx.x / MMA_TOKENS, t = threadIdx.x % MMA_TOKENS, l = (r & 7) * 4 + t;
        float s = 0.f;
        for (int w = 0; w < nw; w++) s += r < 8 ? red[w][l].x : red[w][l].y;
        res[threadIdx.x] = s;
    }
    __syncthreads();
}

// This lane's B column: plane (g % 2) of activation row `row` (−1: none), as 16-byte pieces.
__device__ __forceinline__ const uint4* b_column(const u16* xs, int cols, int row) {
    int g = (threadIdx.x & 31) >> 2;
    return row >= 0 ? (const uint4*)(xs + ((size_t)row * 2 + (g & 1)) * cols) : nullptr;
}

// ---- entry points ----------------------------------------------------------------------------

// xs[(r·2 + part)·cols + pos(c)] = hi / lo half of x[r, c]·2^k as f16, exps[r] = k. pos
// interleaves each 8 columns as 0 4 1 5 2 6 3 7 for INT4 (the nibble pairs of a word). Grid
// (rows, segments of SPLIT_SEG columns), 256 threads: every block finds its row's max (cols / 4
// float4 loads in flight across its threads, from L2) and converts its segment, 4 columns per
// thread. cols is a multiple of 64.
#define SPLIT_SEG 1024
extern "C" __global__ void split_act(const float* __restrict__ x, int cols, int interleave, u16* __restrict__ xs, int* __restrict__ exps) {
    __shared__ float scratch[32];
    int r = blockIdx.x;
    const float4* xr = (const float4*)(x + (size_t)r * cols);
    int n4 = cols / 4;
    float m = 0.f;
#pragma unroll 4
    for (int i = threadIdx.x; i < n4; i += blockDim.x) {
        float4 v = xr[i];
        m = fmaxf(m, fmaxf(fmaxf(fabsf(v.x), fabsf(v.y)), fmaxf(fabsf(v.z), fabsf(v.w))));
    }
    m = block_max(m, scratch);
    int k = 0;
    if (m > 0.f && m <= 3.4e38f) {
        int e;
        frexpf(m, &e);  // m = f·2^e with f in [0.5, 1)
        k = min(max(15 - e, -126), 126);
    }
    float s = pow2(k);
    u16* hi = xs + (size_t)r * 2 * cols;
    u16* lo = hi + cols;
    int i = blockIdx.y * (SPLIT_SEG / 4) + threadIdx.x;
    if (threadIdx.x < SPLIT_SEG / 4 && i < n4) {
        float4 v4 = xr[i];
        float v[4] = {v4.x * s, v4.y * s, v4.z * s, v4.w * s};
#pragma unroll
        for (int j = 0; j < 4; j++) {
            int col = 4 * i + j;
            u32 h = f16_bits(v[j]);
            int pos = interleave ? (col & ~7) | ((col & 3) << 1) | ((col >> 2) & 1) : col;
            hi[pos] = (u16)h;
            lo[pos] = (u16)f16_bits(v[j] - f16_to_f32((u16)h));
        }
    }
    if (threadIdx.x == 0 && blockIdx.y == 0) exps[r] = k;
}

// y[t, yoff + r] = x[t] · W[r]; grid (ceil(rows / 16), ceil(T / 4)).
template <int FMT> __device__ void gemv_mma(const WDesc d, const u16* xs, const int* exps, float* y, int T, int ldy, int yoff) {
    __shared__ float res[16 * MMA_TOKENS];
    int r0 = blockIdx.x * 16, t0 = blockIdx.y * MMA_TOKENS, nt = min(MMA_TOKENS, T - t0);
    int g = (threadIdx.x & 31) >> 2;
    int ra = r0 + g < d.rows ? r0 + g : -1, rb = r0 + 8 + g < d.rows ? r0 + 8 + g : -1;
    float2 v = tile_part<FMT>(d, ra, rb, b_column(xs, d.cols, g < 2 * nt ? t0 + g / 2 : -1));
    tile_reduce(v, res);
    int i = threadIdx.x, r = i / MMA_TOKENS, t = i % MMA_TOKENS;
    if (i < 16 * MMA_TOKENS && t < nt && r0 + r < d.rows) y[(size_t)(t0 + t) * ldy + yoff + r0 + r] = res[i] * pow2(-exps[t0 + t]);
}

// act[p, r] = silu(gate_e[r]·x_t) · (up_e[r]·x_t): the tile's rows are 8 gate rows and the
// matching up rows; grid (ceil(I / 8), groups); x split by split_act (T rows).
template <int FMT> __device__ void moe_gate_up_mma(const WDesc* gu, const int* plan, int P, const u16* xs, const int* exps, float* act, int K, int I) {
    __shared__ float res[16 * MMA_TOKENS];
    const int *experts, *offs, *pairs;
    plan_parts(plan, P, experts, offs, pairs);
    int grp = blockIdx.y;
    if (grp >= plan[0]) return;
    const WDesc d = gu[experts[grp]];
    int r0 = blockIdx.x * 8, g = (threadIdx.x & 31) >> 2;
    int ra = r0 + g < I ? r0 + g : -1, rb = ra >= 0 ? I + ra : -1;
    for (int p0 = offs[grp]; p0 < offs[grp + 1]; p0 += MMA_TOKENS) {
        int nt = min(MMA_TOKENS, offs[grp + 1] - p0);
        float2 v = tile_part<FMT>(d, ra, rb, b_column(xs, d.cols, g < 2 * nt ? pairs[p0 + g / 2] / K : -1));
        tile_reduce(v, res);
        int i = threadIdx.x, r = i / MMA_TOKENS, t = i % MMA_TOKENS;
        if (i < 8 * MMA_TOKENS && t < nt && r0 + r < I) {
            int p = pairs[p0 + t];
            float s = pow2(-exps[p / K]), gv = res[i] * s, uv = res[i + 8 * MMA_TOKENS] * s;
            act[(size_t)p * I + r0 + r] = gv / (1.f + expf(-gv)) * uv;
        }
    }
}

// part[p, r] = down_e[r] · act[p]; grid (ceil(H / 16), groups); act split by split_act (P rows).
template <int FMT> __device__ void moe_down_mma(const WDesc* dn, const int* plan, int P, const u16* acts, const int* exps, float* part, int H) {
    __shared__ float res[16 * MMA_TOKENS];
    const int *experts, *offs, *pairs;
    plan_parts(plan, P, experts, offs, pairs);
    int grp = blockIdx.y;
    if (grp >= plan[0]) return;
    const WDesc d = dn[experts[grp]];
    int r0 = blockIdx.x * 16, g = (threadIdx.x & 31) >> 2;
    int ra = r0 + g < H ? r0 + g : -1, rb = r0 + 8 + g < H ? r0 + 8 + g : -1;
    for (int p0 = offs[grp]; p0 < offs[grp + 1]; p0 += MMA_TOKENS) {
        int nt = min(MMA_TOKENS, offs[grp + 1] - p0);
        float2 v = tile_part<FMT>(d, ra, rb, b_column(acts, d.cols, g < 2 * nt ? pairs[p0 + g / 2] : -1));
        tile_reduce(v, res);
        int i = threadIdx.x, r = i / MMA_TOKENS, t = i % MMA_TOKENS;
        if (i < 16 * MMA_TOKENS && t < nt && r0 + r < H) {
            int p = pairs[p0 + t];
            part[(size_t)p * H + r0 + r] = res[i] * pow2(-exps[p]);
        }
    }
}

#define INSTANTIATE_MMA(NAME, FMT, REGS)                                                                                      \
    extern "C" __global__ void __maxnreg__(REGS) gemv_mma_##NAME(const WDesc d, const u16* xs, const int* exps, float* y, int T, int ldy, int yoff) { \
        gemv_mma<FMT>(d, xs, exps, y, T, ldy, yoff);                                                                    \
    }                                                                                                                   \
    extern "C" __global__ void __maxnreg__(REGS) moe_gate_up_mma_##NAME(const WDesc* gu, const int* plan, int P, const u16* xs, const int* exps, float* act, int K, int I) { \
        moe_gate_up_mma<FMT>(gu, plan, P, xs, exps, act, K, I);                                                         \
    }                                                                                                                   \
    extern "C" __global__ void __maxnreg__(REGS) moe_down_mma_##NAME(const WDesc* dn, const int* plan, int P, const u16* acts, const int* exps, float* part, int H) { \
        moe_down_mma<FMT>(dn, plan, P, acts, exps, part, H);                                                            \
    }

INSTANTIATE_MMA(fp8, FMT_FP8, 128)
INSTANTIATE_MMA(int4, FMT_INT4, 80)
