// Absorbed multi-head latent attention over a paged latent cache, and the DSA lightning indexer.
// Cache rows: MLA slots keep [c (latent) | k_pe (rope)] per position, indexer slots the indexer
// key; both roped when written. cos/sin are per step row, one value per rotated pair.

// Normalizes the latent half of kv_a output, ropes the rope half, stores the row; grid T.
extern "C" __global__ void mla_cache_write(const float* __restrict__ kv, const float* __restrict__ norm_w, float eps,
                                           const float* __restrict__ cosv, const float* __restrict__ sinv, int interleaved,
                                           const StepMeta m, float* __restrict__ pool, int L, int R) { pdl_entry_small();
    extern __shared__ float row[];
    __shared__ float scratch[32];
    int t = blockIdx.x;
    int W = L + R;
    const float* src = kv + (size_t)t * W;
    float ss = 0.f;
    for (int i = threadIdx.x; i < W; i += blockDim.x) {
        float v = src[i];
        row[i] = v;
        if (i < L) ss = fmaf(v, v, ss);
    }
    ss = block_sum(ss, scratch);
    float r = 1.f / sqrtf(ss / L + eps);
    for (int i = threadIdx.x; i < L; i += blockDim.x) row[i] = norm_w[i] * (row[i] * r);
    __syncthreads();
    int half = R / 2;
    for (int i = threadIdx.x; i < half; i += blockDim.x)
        rope_pair(row + L, i, half, interleaved, cosv[t * half + i], sinv[t * half + i]);
    __syncthreads();
    float* dst = cache_row(pool, W, m.blocks, m.max_blocks, m.row_seq[t], m.pos[t]);
    for (int i = threadIdx.x; i < W; i += blockDim.x) dst[i] = row[i];
}

// The absorbed decode's W_UK / W_UV ([H·rows, L] row-major), stored as f32, as bf16 when that
// loses nothing, or as a checkpoint's FP8 codes with their scale per (row, bc columns): element
// i (at row r, column c), and four in a row from there (c a multiple of 4 inside one scale
// block; 16, 8 or 4 bytes, aligned). Each gives the f32 value the CPU oracle dequantizes
// (an FP8 code times its scale, rounded once), so every storage gives the same sums.
struct MlaF32 {
    const float* w;
    __device__ float one(size_t i, int, int) const { return w[i]; }
    __device__ float4 four(size_t i, int, int) const { return *(const float4*)(w + i); }
};
struct MlaBf16 {
    const u16* w;
    __device__ float one(size_t i, int, int) const { return bf16_to_f32(w[i]); }
    __device__ float4 four(size_t i, int, int) const {
        uint2 u = *(const uint2*)(w + i);
        return make_float4(__uint_as_float(u.x << 16), __uint_as_float(u.x & 0xffff0000u), __uint_as_float(u.y << 16),
                           __uint_as_float(u.y & 0xffff0000u));
    }
};
struct MlaFp8 {
    const u8* w;
    const float* scale;  // [H·rows, sc]
    int sc, bc;
    __device__ float s(int r, int c) const { return scale[(size_t)r * sc + c / bc]; }
    __device__ float one(size_t i, int r, int c) const { return e4m3_to_f32(w[i]) * s(r, c); }
    __device__ float4 four(size_t i, int r, int c) const {
        u32 u = *(const u32*)(w + i);
        float k = s(r, c), a, b, e, f;
        e4m3x2_to_f32((u16)u, a, b);
        e4m3x2_to_f32((u16)(u >> 16), e, f);
        return make_float4(a * k, b * k, e * k, f * k);
    }
};

// q_lat[t,h,:] = W_UK[h]ᵀ q_nope[t,h]; q_pe[t,h] = rope(q_rope[t,h]); grid (T·H, ceil(L / 128)),
// block 32·parts: thread (4 columns, part) sums every parts-th of the N dims with vector loads
// (so each SM keeps many weight bytes in flight), and the parts meet in shared memory.
// smem: N + R + 4·blockDim floats. The same sums in the same order for either storage.
template <class W>
__device__ void mla_queries(const float* __restrict__ q, const W wuk, float* __restrict__ q_lat, float* __restrict__ q_pe,
                            const float* __restrict__ cosv, const float* __restrict__ sinv, int interleaved, int H, int N, int R,
                            int L) {
    // Named apart from the kernels' sm4: NVRTC warns when a template shares an extern's name.
    extern __shared__ float4 queries_sm[];
    float* sm = (float*)queries_sm;  // [N + R] query (padded to a float4), then [parts][128] partial sums
    float* red = sm + (N + R + 3) / 4 * 4;
    int t = blockIdx.x / H, h = blockIdx.x % H;
    const float* qh = q + (size_t)t * H * (N + R) + (size_t)h * (N + R);
    for (int i = threadIdx.x; i < N + R; i += blockDim.x) sm[i] = qh[i];
    __syncthreads();
    int jl = (threadIdx.x & 31) * 4, part = threadIdx.x >> 5, parts = blockDim.x >> 5;
    int j = blockIdx.y * 128 + jl;
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
    if ((L & 3) == 0 && j < L) {
#pragma unroll 4
        for (int d = part; d < N; d += parts) {
            int r = h * N + d;
            float4 v = wuk.four((size_t)r * L + j, r, j);
            float x = sm[d];
            acc.x = fmaf(x, v.x, acc.x);
            acc.y = fmaf(x, v.y, acc.y);
            acc.z = fmaf(x, v.z, acc.z);
            acc.w = fmaf(x, v.w, acc.w);
        }
    } else if (j < L) {
        for (int d = part; d < N; d += parts) {
            int r = h * N + d;
            size_t i = (size_t)r * L + j;
            float x = sm[d];
            acc.x = fmaf(x, wuk.one(i, r, j), acc.x);
            if (j + 1 < L) acc.y = fmaf(x, wuk.one(i + 1, r, j + 1), acc.y);
            if (j + 2 < L) acc.z = fmaf(x, wuk.one(i + 2, r, j + 2), acc.z);
            if (j + 3 < L) acc.w = fmaf(x, wuk.one(i + 3, r, j + 3), acc.w);
        }
    }
    float* r = red + part * 128 + jl;
    r[0] = acc.x; r[1] = acc.y; r[2] = acc.z; r[3] = acc.w;
    __syncthreads();
    int jj = blockIdx.y * 128 + threadIdx.x;
    if (threadIdx.x < 128 && jj < L) {
        float v = 0.f;
        for (int p = 0; p < parts; p++) v += red[p * 128 + threadIdx.x];
        q_lat[((size_t)t * H + h) * L + jj] = v;
    }
    if (blockIdx.y == 0) {
        int half = R / 2;
        for (int i = threadIdx.x; i < half; i += blockDim.x)
            rope_pair(sm + N, i, half, interleaved, cosv[t * half + i], sinv[t * half + i]);
        __syncthreads();
        for (int i = threadIdx.x; i < R; i += blockDim.x) q_pe[((size_t)t * H + h) * R + i] = sm[N + i];
    }
}

// The loops that stage a block's queries in shared memory load from global memory and store
// each value before the next load, so unless unrolled they wait a latency per round (18 rounds
// of a 576-wide head in mla_attend_split, 16 in index_scores). STAGE_UNROLL_BY (a sweep
// setting, for example DUET_KERNEL_DEFINES=-DSTAGE_UNROLL_BY=8; not yet measured) unrolls them
// so that many loads are in flight; unset, the compiler chooses.
#define DUET_PRAGMA(x) _Pragma(#x)
#define DUET_UNROLL(n) DUET_PRAGMA(unroll n)
#ifdef STAGE_UNROLL_BY
#define STAGE_UNROLL DUET_UNROLL(STAGE_UNROLL_BY)
#else
#define STAGE_UNROLL
#endif

// Column col of query row th (token · H + head): the absorbed latent part (L), then the rope
// part (R); four from a multiple of 4 when L and R are multiples of 4.
__device__ __forceinline__ float mla_query(const float* q_lat, const float* q_pe, size_t th, int L, int R, int col) {
    return col < L ? q_lat[th * L + col] : q_pe[th * R + (col - L)];
}
__device__ __forceinline__ float4 mla_query4(const float* q_lat, const float* q_pe, size_t th, int L, int R, int col) {
    return col < L ? *(const float4*)(q_lat + th * L + col) : *(const float4*)(q_pe + th * R + (col - L));
}

// Where split `split` of row t starts: its key range [k0, k1) (ks keys per split, over the DSA
// selection or over positions 0 .. pos), and the running max and sum of its `heads` heads reset
// for softmax_step (made visible by the block barrier that follows).
struct SplitKeys {
    int pos, seq, k0, k1;
};
__device__ __forceinline__ SplitKeys split_start(const StepMeta& m, int t, const int* sel, int topk, int split, int ks, float* mrun, float* lrun, int heads) {
    if (threadIdx.x < heads) {
        mrun[threadIdx.x] = NEG_INF;
        lrun[threadIdx.x] = 0.f;
    }
    int pos = m.pos[t], nk = sel ? topk : pos + 1, k0 = split * ks;
    return SplitKeys{pos, m.row_seq[t], k0, min(nk, k0 + ks)};
}

// One head's online-softmax step over a tile of 32 keys, a lane per key (the whole warp): the
// lane's scaled score (NEG_INF for none) joins the head's running max and sum; returns the
// lane's unnormalized probability, and lane 0 leaves the new max, sum, and the factor that
// rescales the output so far.
__device__ __forceinline__ float softmax_step(float sc, float* mrun, float* lrun, float* fac) {
    float mold = *mrun;
    float mnew = fmaxf(mold, warp_max(sc));
    float p = sc == NEG_INF ? 0.f : expf(sc - mnew);
    float psum = warp_sum(p);
    if ((threadIdx.x & 31) == 0) {
        float f = mold == NEG_INF ? 0.f : expf(mold - mnew);
        *fac = f;
        *mrun = mnew;
        *lrun = *lrun * f + psum;
    }
    return p;
}

// Softmax attention over the latent cache, split over keys (flash-decoding): block (t, head
// group, split) scores MLA_HB heads against its run of keys in tiles of MLA_KT, keeping a
// running max and sum per head, and writes an unnormalized partial output; mla_combine merges
// the splits. Keys are the row's selection (sel != null; entries < 0 or beyond the row's
// position are skipped) or positions 0..pos. All heads of a block share each key tile in
// shared memory, and every key value read from shared memory serves all MLA_HB heads from
// registers (queries and probabilities are stored head-minor so a lane fetches them as float4
// broadcasts): the loop is bound by shared-memory reads, so reuse is what sets its speed.
// Scores: lane = key, warp = a slice of the W dims, partial dots reduced across warps.
// smem: (W·MLA_HB + MLA_KT·(W+1) + warps·MLA_HB·MLA_KT + MLA_KT·MLA_HB + 3·MLA_HB) floats.
#define MLA_HB 8
#define MLA_KT 32
#define MLA_DPT 4  // latent dims per thread (L ≤ 4·blockDim)
static_assert(MLA_HB == 8 && MLA_KT == 32, "the unrolled head loops assume 8 heads, the lane-per-key scores 32 keys");

extern "C" __global__ void mla_attend_split(const float* __restrict__ q_lat, const float* __restrict__ q_pe, const float* __restrict__ pool,
                                            const StepMeta m, const int* __restrict__ sel, int topk, int H, int L, int R, float scale,
                                            int ks, float* __restrict__ part) { pdl_entry();
    extern __shared__ float4 sm4[];
    float* sm = (float*)sm4;
    const int W = L + R, WP = W + 1, nwarps = blockDim.x >> 5;
    float* qs = sm;                                  // [W][HB]
    float* kt = qs + W * MLA_HB;                     // [KT][W+1]
    float* red = kt + MLA_KT * WP;                   // [warps][HB][KT] partial scores
    float* ps = red + nwarps * MLA_HB * MLA_KT;      // [KT][HB] probabilities of the tile
    float* mrun = ps + MLA_KT * MLA_HB;              // [HB] running max
    float* lrun = mrun + MLA_HB;                     // [HB] running sum
    float* fac = lrun + MLA_HB;                      // [HB] rescale of the previous output
    __shared__ const float* rowp[MLA_KT];
    __shared__ float kval[MLA_KT];
    int t = blockIdx.x, hb = blockIdx.y * MLA_HB, split = blockIdx.z, S = gridDim.z;
    int nh = min(MLA_HB, H - hb);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (int hh = warp; hh < MLA_HB; hh += nwarps)
        STAGE_UNROLL
        for (int c = lane; c < W; c += 32) {
            float v = 0.f;
            if (hh < nh) v = mla_query(q_lat, q_pe, (size_t)t * H + hb + hh, L, R, c);
            qs[c * MLA_HB + hh] = v;
        }
    const SplitKeys sk = split_start(m, t, sel, topk, split, ks, mrun, lrun, MLA_HB);
    const int pos = sk.pos, seq = sk.seq, k0 = sk.k0, k1 = sk.k1;
    float o[MLA_HB][MLA_DPT];
#pragma unroll
    for (int hh = 0; hh < MLA_HB; hh++)
#pragma unroll
        for (int j = 0; j < MLA_DPT; j++) o[hh][j] = 0.f;
    int cpw = (W + nwarps - 1) / nwarps, c0 = warp * cpw, c1 = min(W, c0 + cpw);
    __syncthreads();
    for (int base = k0; base < k1; base += MLA_KT) {
        // The tile's key rows (null for invalid ones), then the keys themselves (zeros if invalid),
        // all copies in flight at once; a warp copies whole rows.
        if (threadIdx.x < MLA_KT) {
            int j = base + threadIdx.x;
            int p = j < k1 ? (sel ? sel[(size_t)t * topk + j] : j) : -1;
            bool valid = p >= 0 && p <= pos;
            rowp[threadIdx.x] = valid ? cache_row((float*)pool, W, m.blocks, m.max_blocks, seq, p) : nullptr;
            kval[threadIdx.x] = valid ? 1.f : 0.f;
        }
        __syncthreads();
        for (int k = warp; k < MLA_KT; k += nwarps) {
            const float* r = rowp[k];
            for (int c = lane; c < W; c += 32) copy_async(kt + k * WP + c, r ? r + c : pool, r != nullptr);
        }
        copy_async_wait();
        __syncthreads();
        {
            float acc[MLA_HB];
#pragma unroll
            for (int hh = 0; hh < MLA_HB; hh++) acc[hh] = 0.f;
            const float* krow = kt + lane * WP;
            dot8(acc, sm4, MLA_HB / 4, krow, c0, c1);
#pragma unroll
            for (int hh = 0; hh < MLA_HB; hh++) red[(warp * MLA_HB + hh) * MLA_KT + lane] = acc[hh];
        }
        __syncthreads();
        // Online softmax: warp hh owns head hh's 32 scores, one per lane.
        for (int hh = warp; hh < MLA_HB; hh += nwarps) {
            float s = 0.f;
            for (int w = 0; w < nwarps; w++) s += red[(w * MLA_HB + hh) * MLA_KT + lane];
            float sc = (kval[lane] != 0.f && hh < nh) ? s * scale : NEG_INF;
            ps[lane * MLA_HB + hh] = softmax_step(sc, mrun + hh, lrun + hh, fac + hh);
        }
        __syncthreads();
#pragma unroll
        for (int hh = 0; hh < MLA_HB; hh++) {
            float f = fac[hh];
#pragma unroll
            for (int j = 0; j < MLA_DPT; j++) o[hh][j] *= f;
        }
        const float4* ps4 = (const float4*)ps;
#pragma unroll 4
        for (int k = 0; k < MLA_KT; k++) {
            float4 pa = ps4[k * 2], pb = ps4[k * 2 + 1];
#pragma unroll
            for (int j = 0; j < MLA_DPT; j++) {
                int d = threadIdx.x + j * blockDim.x;
                if (d < L) {
                    float kv = kt[k * WP + d];
                    o[0][j] = fmaf(pa.x, kv, o[0][j]);
                    o[1][j] = fmaf(pa.y, kv, o[1][j]);
                    o[2][j] = fmaf(pa.z, kv, o[2][j]);
                    o[3][j] = fmaf(pa.w, kv, o[3][j]);
                    o[4][j] = fmaf(pb.x, kv, o[4][j]);
                    o[5][j] = fmaf(pb.y, kv, o[5][j]);
                    o[6][j] = fmaf(pb.z, kv, o[6][j]);
                    o[7][j] = fmaf(pb.w, kv, o[7][j]);
                }
            }
        }
        __syncthreads();
    }
    // Partial layout: [t][h][split][L + 2] = unnormalized output, running max, running sum.
    for (int hh = 0; hh < nh; hh++) {
        float* dst = part + (((size_t)t * H + hb + hh) * S + split) * (L + 2);
#pragma unroll
        for (int j = 0; j < MLA_DPT; j++) {
            int d = threadIdx.x + j * blockDim.x;
            if (d < L) dst[d] = o[hh][j];
        }
        if (threadIdx.x == 0) {
            dst[L] = mrun[hh];
            dst[L + 1] = lrun[hh];
        }
    }
}

// ---- tensor-core attention (an experiment: DUET_MLA_TC=1; not yet run on a GPU) --------------
// The same partials as mla_attend_split from mma.m16n8k8 on TF32 in 3xTF32 form: each f32
// operand is split into a TF32 high part and a TF32 remainder, and hi·hi + hi·lo + lo·hi keeps
// about 22 bits of each product (TF32 keeps f32's exponent, so no scaling is needed), with f32
// accumulators. Block (t, 16 heads, split), 8 warps: the 16 heads are one m16 tile, so each key
// tile serves all of them; key tiles of 32 are double-buffered, the next one's 16-byte async
// copies in flight during the current one's math. Scores: warp w takes keys 8(w % 4) .. + 7
// over half w / 4 of the dims, the halves meet in shared memory; the online softmax is
// mla_attend_split's (a warp per head, a lane per key); P·V: warp w takes the latent n8 tiles
// w, w + 8, ... (L ≤ 512). Rows are padded by 4 floats so a fragment's 32 reads fall on 32
// banks. smem: see mla_attend_tc_smem in src/backend/cuda/attention.rs.
#define TC_HB 16
#define TC_KT 32
#define TC_PAD 4
#define TC_NPW 8  // latent n8 tiles per warp: L ≤ 8 warps · 8 tiles · 8
#define TC_QV 12  // query float4s per thread (16 heads of up to 768 floats)

__device__ __forceinline__ u32 tf32_bits(float x) {
    u32 r;
    asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
    return r;
}
__device__ __forceinline__ void tf32_split(float x, u32& hi, u32& lo) {
    hi = tf32_bits(x);
    lo = tf32_bits(x - __uint_as_float(hi));
}
__device__ __forceinline__ void mma_tf32(float d[4], const u32 a[4], const u32 b[2]) {
    asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
// d += A·B for A given as hi / lo parts and B as f32 (lane fragments of m16n8k8): the small
// products first.
__device__ __forceinline__ void mma_3xtf32(float d[4], const u32 ah[4], const u32 al[4], float b0, float b1) {
    u32 bh[2], bl[2];
    tf32_split(b0, bh[0], bl[0]);
    tf32_split(b1, bh[1], bl[1]);
    mma_tf32(d, al, bh);
    mma_tf32(d, ah, bl);
    mma_tf32(d, ah, bh);
}
// A fragment (rows g, g + 8; columns c, c + 4 from col0) of a row-major f32 matrix with row
// stride ld, split into hi / lo parts.
__device__ __forceinline__ void a_frag(const float* m, int ld, int col0, int g, int c, u32 hi[4], u32 lo[4]) {
    tf32_split(m[g * ld + col0 + c], hi[0], lo[0]);
    tf32_split(m[(g + 8) * ld + col0 + c], hi[1], lo[1]);
    tf32_split(m[g * ld + col0 + c + 4], hi[2], lo[2]);
    tf32_split(m[(g + 8) * ld + col0 + c + 4], hi[3], lo[3]);
}
__device__ __forceinline__ void copy_async16(float* dst, const float* src, bool valid) {
    unsigned d = (unsigned)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src), "r"(valid ? 16 : 0) : "memory");
}

extern "C" __global__ void mla_attend_tc(const float* __restrict__ q_lat, const float* __restrict__ q_pe, const float* __restrict__ pool,
                                         const StepMeta m, const int* __restrict__ sel, int topk, int H, int L, int R, float scale,
                                         int ks, float* __restrict__ part) { pdl_entry();
    extern __shared__ float4 sm4[];
    const int W = L + R, WS = W + TC_PAD, PS = TC_KT + TC_PAD, nrow = (ks + TC_KT - 1) / TC_KT * TC_KT;
    const float** rowp = (const float**)sm4;                // [nrow] key rows of the block (null: none)
    float* qs = (float*)(rowp + nrow);                      // [TC_HB][WS] queries: latent, then rope
    float* kt = qs + TC_HB * WS;                            // [2][TC_KT][WS] key tiles
    float* red = kt + 2 * TC_KT * WS;                       // [2][TC_HB][TC_KT] scores of each dim half
    float* ps = red + 2 * TC_HB * TC_KT;                    // [TC_HB][PS] probabilities of the tile
    float* mrun = ps + TC_HB * PS;                          // [TC_HB] running max
    float* lrun = mrun + TC_HB;                             // [TC_HB] running sum
    float* fac = lrun + TC_HB;                              // [TC_HB] rescale of the previous output
    int t = blockIdx.x, hb = blockIdx.y * TC_HB, split = blockIdx.z, S = gridDim.z;
    int nh = min(TC_HB, H - hb);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, c = lane & 3;
    // The queries, float4s with every load in flight before the first store (a loop of
    // load-then-store waits a memory latency per step). The launch guarantees L and R multiples
    // of 8 and rows that fit TC_QV float4s per thread (its shared-memory bound keeps W ≤ 640).
    const int W4 = W / 4;
    float4 v[TC_QV];
#pragma unroll
    for (int u = 0; u < TC_QV; u++) {
        int i = threadIdx.x + u * blockDim.x, hh = i / W4, col = 4 * (i % W4);
        v[u] = make_float4(0.f, 0.f, 0.f, 0.f);
        if (i < TC_HB * W4 && hh < nh) v[u] = mla_query4(q_lat, q_pe, (size_t)t * H + hb + hh, L, R, col);
    }
#pragma unroll
    for (int u = 0; u < TC_QV; u++) {
        int i = threadIdx.x + u * blockDim.x;
        if (i < TC_HB * W4) *(float4*)(qs + (i / W4) * WS + 4 * (i % W4)) = v[u];
    }
    const SplitKeys sk = split_start(m, t, sel, topk, split, ks, mrun, lrun, TC_HB);
    const int pos = sk.pos, seq = sk.seq, k0 = sk.k0, k1 = sk.k1;
    for (int j = threadIdx.x; j < nrow; j += blockDim.x) {
        int kk = k0 + j;
        int p = j < ks && kk < k1 ? (sel ? sel[(size_t)t * topk + kk] : kk) : -1;
        rowp[j] = p >= 0 && p <= pos ? cache_row((float*)pool, W, m.blocks, m.max_blocks, seq, p) : nullptr;
    }
    __syncthreads();
    int ntiles = k1 > k0 ? (k1 - k0 + TC_KT - 1) / TC_KT : 0;
    // Tile i into buffer b: a warp copies whole rows in 16-byte pieces (zeros for missing keys).
    auto copy_tile = [&](int i, int b) {
        float* dst = kt + b * TC_KT * WS;
        for (int k = warp; k < TC_KT; k += 8) {
            const float* r = rowp[i * TC_KT + k];
            for (int q = lane; q < W / 4; q += 32) copy_async16(dst + k * WS + 4 * q, r ? r + 4 * q : pool, r != nullptr);
        }
        asm volatile("cp.async.commit_group;\n" ::: "memory");
    };
    float o[TC_NPW][4];
#pragma unroll
    for (int j = 0; j < TC_NPW; j++) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
    if (ntiles > 0) copy_tile(0, 0);
    int steps = W / 8, mid = (steps + 1) / 2;
    for (int i = 0; i < ntiles; i++) {
        copy_async_wait();
        __syncthreads();  // tile i is in; every warp is done with tile i - 1's buffer
        if (i + 1 < ntiles) copy_tile(i + 1, (i + 1) & 1);
        const float* K = kt + (i & 1) * TC_KT * WS;
        {
            int nt = warp & 3, half = warp >> 2;
            float acc[4] = {0.f, 0.f, 0.f, 0.f};
            for (int s = half ? mid : 0; s < (half ? steps : mid); s++) {
                u32 ah[4], al[4];
                a_frag(qs, WS, 8 * s, g, c, ah, al);
                const float* kr = K + (nt * 8 + g) * WS + 8 * s + c;
                mma_3xtf32(acc, ah, al, kr[0], kr[4]);
            }
            float* r = red + half * TC_HB * TC_KT + nt * 8 + 2 * c;
            r[g * TC_KT] = acc[0];
            r[g * TC_KT + 1] = acc[1];
            r[(g + 8) * TC_KT] = acc[2];
            r[(g + 8) * TC_KT + 1] = acc[3];
        }
        __syncthreads();
        for (int hh = warp; hh < TC_HB; hh += 8) {
            float sum = red[hh * TC_KT + lane] + red[(TC_HB + hh) * TC_KT + lane];
            bool valid = hh < nh && rowp[i * TC_KT + lane] != nullptr;
            ps[hh * PS + lane] = softmax_step(valid ? sum * scale : NEG_INF, mrun + hh, lrun + hh, fac + hh);
        }
        __syncthreads();
        float fa = fac[g], fb = fac[g + 8];
#pragma unroll
        for (int j = 0; j < TC_NPW; j++) {
            o[j][0] *= fa;
            o[j][1] *= fa;
            o[j][2] *= fb;
            o[j][3] *= fb;
        }
#pragma unroll
        for (int k8 = 0; k8 < TC_KT; k8 += 8) {
            u32 ah[4], al[4];
            a_frag(ps, PS, k8, g, c, ah, al);
            const float* vr = K + (k8 + c) * WS + g;
#pragma unroll
            for (int j = 0; j < TC_NPW; j++) {
                int n0 = (warp + 8 * j) * 8;
                if (n0 < L) mma_3xtf32(o[j], ah, al, vr[n0], vr[4 * WS + n0]);
            }
        }
    }
    // Partial layout: [t][h][split][L + 2] = unnormalized output, running max, running sum.
    float* base = part + (((size_t)t * H + hb) * S + split) * (L + 2);
    size_t hstride = (size_t)S * (L + 2);
#pragma unroll
    for (int j = 0; j < TC_NPW; j++) {
        int col = (warp + 8 * j) * 8 + 2 * c;
        if (col >= L) continue;
        if (g < nh) {
            base[g * hstride + col] = o[j][0];
            base[g * hstride + col + 1] = o[j][1];
        }
        if (g + 8 < nh) {
            base[(g + 8) * hstride + col] = o[j][2];
            base[(g + 8) * hstride + col + 1] = o[j][3];
        }
    }
    if (threadIdx.x < nh) {
        base[threadIdx.x * hstride + L] = mrun[threadIdx.x];
        base[threadIdx.x * hstride + L + 1] = lrun[threadIdx.x];
    }
}

// Merges the splits of each (row, head): every split's weight exp(m_s - max) once into shared
// memory, then each thread sums its latent dim over the splits; grid (T, H, ceil(L / blockDim)),
// smem S floats.
extern "C" __global__ void mla_combine(const float* __restrict__ part, int H, int L, int S, float* __restrict__ out) { pdl_entry_small();
    extern __shared__ float fs[];
    __shared__ float scratch[32];
    int t = blockIdx.x, h = blockIdx.y;
    const float* src = part + ((size_t)t * H + h) * S * (L + 2);
    float mx = NEG_INF;
    for (int s = threadIdx.x; s < S; s += blockDim.x) mx = fmaxf(mx, src[s * (L + 2) + L]);
    mx = block_max(mx, scratch);
    float den = 0.f;
    for (int s = threadIdx.x; s < S; s += blockDim.x) {
        float ms = src[s * (L + 2) + L];
        float f = ms == NEG_INF ? 0.f : expf(ms - mx);
        fs[s] = f;
        den = fmaf(src[s * (L + 2) + L + 1], f, den);
    }
    den = block_sum(den, scratch);
    int d = blockIdx.z * blockDim.x + threadIdx.x;
    if (d < L) {
        float acc = 0.f;
        for (int s = 0; s < S; s++) acc = fmaf(src[s * (L + 2) + d], fs[s], acc);
        out[((size_t)t * H + h) * L + d] = acc / den;
    }
}

// out[t,h,j] = W_UV[h][j] · o_lat[t,h]; grid (T·H, ceil(V / warps)), a warp per output; lane i
// takes columns 8i .. 8i + 7, 8·32 + 8i .. (vector loads; one at a time when L is not a multiple
// of 8). The same sums in the same order for every storage.
template <class W>
__device__ void mla_values(const float* __restrict__ o_lat, const W wuv, float* __restrict__ out, int H, int V, int L) {
    int t = blockIdx.x / H, h = blockIdx.x % H;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    const float* o = o_lat + ((size_t)t * H + h) * L;
    for (int j = blockIdx.y * nw + warp; j < min(V, (int)(blockIdx.y + 1) * nw); j += nw) {
        int r = h * V + j;
        size_t base = (size_t)r * L;
        float acc = 0.f;
        if ((L & 7) == 0) {
            for (int i = 8 * lane; i < L; i += 256) {
                float4 w0 = wuv.four(base + i, r, i), w1 = wuv.four(base + i + 4, r, i + 4);
                float4 o0 = *(const float4*)(o + i), o1 = *(const float4*)(o + i + 4);
                acc = fmaf(w0.x, o0.x, acc);
                acc = fmaf(w0.y, o0.y, acc);
                acc = fmaf(w0.z, o0.z, acc);
                acc = fmaf(w0.w, o0.w, acc);
                acc = fmaf(w1.x, o1.x, acc);
                acc = fmaf(w1.y, o1.y, acc);
                acc = fmaf(w1.z, o1.z, acc);
                acc = fmaf(w1.w, o1.w, acc);
            }
        } else {
            for (int i = lane; i < L; i += 32) acc = fmaf(wuv.one(base + i, r, i), o[i], acc);
        }
        acc = warp_sum(acc);
        if (lane == 0) out[((size_t)t * H + h) * V + j] = acc;
    }
}

// Entry points per storage; every one takes the FP8 scale table (null for the others).
#define MLA_ENTRIES(NAME, MAKE)                                                                                           \
    extern "C" __global__ void mla_queries_##NAME(const float* q, const void* wuk, const float* scale, int sc, int bc,     \
                                                  float* q_lat, float* q_pe, const float* cosv, const float* sinv,        \
                                                  int interleaved, int H, int N, int R, int L) { pdl_entry();             \
        mla_queries(q, MAKE(wuk), q_lat, q_pe, cosv, sinv, interleaved, H, N, R, L);                                      \
    }                                                                                                                     \
    extern "C" __global__ void mla_values_##NAME(const float* o_lat, const void* wuv, const float* scale, int sc, int bc,   \
                                                 float* out, int H, int V, int L) { pdl_entry();                          \
        mla_values(o_lat, MAKE(wuv), out, H, V, L);                                                                       \
    }
#define MLA_F32(p) (MlaF32{(const float*)(p)})
#define MLA_BF16(p) (MlaBf16{(const u16*)(p)})
#define MLA_FP8(p) (MlaFp8{(const u8*)(p), scale, sc, bc})
MLA_ENTRIES(f32, MLA_F32)
MLA_ENTRIES(bf16, MLA_BF16)
MLA_ENTRIES(fp8, MLA_FP8)

// LayerNorm (weight, bias) of the indexer key, rope on its first R dims, stored; grid T.
extern "C" __global__ void index_cache_write(const float* __restrict__ k, const float* __restrict__ nw_, const float* __restrict__ nb,
                                             float eps, const float* __restrict__ cosv, const float* __restrict__ sinv,
                                             int interleaved, const StepMeta m, float* __restrict__ pool, int D, int R) { pdl_entry();
    extern __shared__ float row[];
    __shared__ float scratch[32];
    int t = blockIdx.x;
    float s = 0.f;
    for (int i = threadIdx.x; i < D; i += blockDim.x) {
        row[i] = k[(size_t)t * D + i];
        s += row[i];
    }
    float mean = block_sum(s, scratch) / D;
    float v = 0.f;
    for (int i = threadIdx.x; i < D; i += blockDim.x) v = fmaf(row[i] - mean, row[i] - mean, v);
    float var = block_sum(v, scratch) / D;
    float r = 1.f / sqrtf(var + eps);
    for (int i = threadIdx.x; i < D; i += blockDim.x) row[i] = (row[i] - mean) * r * nw_[i] + nb[i];
    __syncthreads();
    int half = R / 2;
    for (int i = threadIdx.x; i < half; i += blockDim.x)
        rope_pair(row, i, half, interleaved, cosv[t * half + i], sinv[t * half + i]);
    __syncthreads();
    float* dst = cache_row(pool, D, m.blocks, m.max_blocks, m.row_seq[t], m.pos[t]);
    for (int i = threadIdx.x; i < D; i += blockDim.x) dst[i] = row[i];
}

// scores[t, s] = Σ_h w_h·nh^-½ · relu(q_h·k_s · D^-½) for s ≤ pos[t], -inf beyond.
// grid (T, ceil(ld / (IDX_KT·IDX_TILES))), block 256: the block stages the queries once, then
// walks IDX_TILES tiles of keys; each tile of IDX_KT keys is copied asynchronously into
// shared memory (rows padded by one float, so threads on different keys hit different banks);
// thread (key, head group) accumulates IDX_HP heads at a time over the key, reading the queries
// (stored dim-major, heads padded to a multiple of IDX_HP with zeros) as float4 broadcasts, and
// the groups' sums meet in shared memory.
// smem: D·NHP + NHP + IDX_KT·(D+1) + IDX_KT·groups floats, NHP = NH rounded up to IDX_HP.
#define IDX_KT 64
#define IDX_HP 8
#define IDX_TILES 4
static_assert(IDX_HP == 8, "the unrolled head loop assumes 8 heads per pass");
extern "C" __global__ void index_scores(const float* __restrict__ q, const float* __restrict__ w, const float* __restrict__ pool,
                                        const StepMeta m, const float* __restrict__ cosv, const float* __restrict__ sinv,
                                        int interleaved, int NH, int D, int R, int ld, float* __restrict__ scores) { pdl_entry();
    extern __shared__ float4 sm4[];
    float* sm = (float*)sm4;
    const int groups = blockDim.x / IDX_KT;  // head groups per key
    const int NHP = (NH + IDX_HP - 1) / IDX_HP * IDX_HP;
    float* qs = sm;                      // [D][NHP]
    float* ws = qs + D * NHP;            // [NHP]
    float* ks = ws + NHP;                // [IDX_KT][D+1]
    float* part = ks + IDX_KT * (D + 1); // [IDX_KT][groups]
    __shared__ const float* rowp[IDX_KT];
    int t = blockIdx.x;
    int pos = m.pos[t], seq = m.row_seq[t];
    // The queries, roped on their first R dims; consecutive threads take consecutive heads.
    const int half = R / 2;
    STAGE_UNROLL
    for (int i = threadIdx.x; i < D * NHP; i += blockDim.x) {
        int c = i / NHP, h = i % NHP;
        float v = 0.f;
        if (h < NH) {
            const float* x = q + ((size_t)t * NH + h) * D;
            v = c < R ? rope_at(x, c, half, interleaved, cosv + t * half, sinv + t * half) : x[c];
        }
        qs[i] = v;
    }
    float wscale = rsqrtf((float)NH);
    for (int i = threadIdx.x; i < NHP; i += blockDim.x) ws[i] = i < NH ? w[(size_t)t * NH + i] * wscale : 0.f;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    const int k = threadIdx.x % IDX_KT, g = threadIdx.x / IDX_KT;
    const float qscale = rsqrtf((float)D);
    for (int tile = 0; tile < IDX_TILES; tile++) {
        int s0 = (blockIdx.y * IDX_TILES + tile) * IDX_KT;
        if (s0 >= ld) break;
        if (threadIdx.x < IDX_KT) {
            int s = s0 + threadIdx.x;
            rowp[threadIdx.x] = s <= pos && s < ld ? cache_row((float*)pool, D, m.blocks, m.max_blocks, seq, s) : nullptr;
        }
        __syncthreads();
        // The tile's keys (zeros beyond the row's position), all copies in flight at once.
        for (int kk = warp; kk < IDX_KT; kk += nwarps) {
            const float* r = rowp[kk];
            for (int c = lane; c < D; c += 32) copy_async(ks + kk * (D + 1) + c, r ? r + c : pool, r != nullptr);
        }
        copy_async_wait();
        __syncthreads();
        const float* kr = ks + k * (D + 1);
        float score = 0.f;
        for (int h0 = g * IDX_HP; h0 < NHP; h0 += groups * IDX_HP) {
            float acc[IDX_HP];
#pragma unroll
            for (int j = 0; j < IDX_HP; j++) acc[j] = 0.f;
            dot8(acc, sm4 + h0 / 4, NHP / 4, kr, 0, D);
#pragma unroll
            for (int j = 0; j < IDX_HP; j++) score = fmaf(ws[h0 + j], fmaxf(acc[j] * qscale, 0.f), score);
        }
        part[k * groups + g] = score;
        __syncthreads();
        if (threadIdx.x < IDX_KT) {
            int s = s0 + threadIdx.x;
            if (s < ld) {
                float v = 0.f;
                for (int j = 0; j < groups; j++) v += part[threadIdx.x * groups + j];
                scores[(size_t)t * ld + s] = s <= pos ? v : NEG_INF;
            }
        }
    }
}

// ---- top-k of long score rows, across many blocks ---------------------------------------------
// The k largest scores of each row (positions 0..pos): a histogram of the top 12 bits of every
// score's order key (many blocks), the bin holding the k-th largest (one block per row), then
// every score above that bin is taken and those in it become candidates (many blocks), and the
// candidates are finished by radix select (one block per row). meta per row: [bin, taken above,
// candidates, n]. Ties at the very threshold are taken in no particular order.
#define TOPK_BINS 4096
#define TOPK_CHUNK 1024  // scores per block in topk_hist and topk_collect

__device__ __forceinline__ int row_len(const StepMeta& m, int t, int ld) { return min(m.pos[t] + 1, ld); }

extern "C" __global__ void topk_hist(const float* __restrict__ scores, const StepMeta m, int ld, int topk, u32* __restrict__ hist) { pdl_entry();
    __shared__ u32 h[TOPK_BINS];
    int t = blockIdx.x, n = row_len(m, t, ld);
    if (n <= topk) return;
    for (int i = threadIdx.x; i < TOPK_BINS; i += blockDim.x) h[i] = 0;
    __syncthreads();
    int s1 = min(n, (int)(blockIdx.y + 1) * TOPK_CHUNK);
    for (int s = blockIdx.y * TOPK_CHUNK + threadIdx.x; s < s1; s += blockDim.x) atomicAdd(&h[order_key(scores[(size_t)t * ld + s]) >> 20], 1u);
    __syncthreads();
    for (int i = threadIdx.x; i < TOPK_BINS; i += blockDim.x)
        if (h[i]) atomicAdd(&hist[(size_t)t * TOPK_BINS + i], h[i]);
}

// One block of 1024 threads per row; each thread owns 4 bins, counted from the top.
extern "C" __global__ void topk_threshold(const u32* __restrict__ hist, const StepMeta m, int ld, int topk, int* __restrict__ meta) { pdl_entry();
    __shared__ u32 warp_tot[32];
    int t = blockIdx.x, n = row_len(m, t, ld);
    int* mt = meta + t * 4;
    if (n <= topk) {
        if (threadIdx.x == 0) { mt[0] = -1; mt[3] = n; }
        return;
    }
    const u32* h = hist + (size_t)t * TOPK_BINS;
    int i = threadIdx.x;
    int top = TOPK_BINS - 1 - 4 * i;  // this thread's bins: top, top-1, top-2, top-3
    u32 c[4], sum = 0;
#pragma unroll
    for (int j = 0; j < 4; j++) { c[j] = h[top - j]; sum += c[j]; }
    // Exclusive prefix over threads (higher bins first).
    u32 before = block_scan(sum, warp_tot) - sum;
    if (before < (u32)topk && before + sum >= (u32)topk) {
        u32 acc = before;
        for (int j = 0; j < 4; j++) {
            if (acc + c[j] >= (u32)topk) {
                mt[0] = top - j;
                mt[1] = 0;  // filled by topk_collect
                mt[2] = 0;
                mt[3] = n;
                break;
            }
            acc += c[j];
        }
    }
}

extern "C" __global__ void topk_collect(const float* __restrict__ scores, const StepMeta m, int ld, int topk, int* __restrict__ meta,
                                        int* __restrict__ sel, int* __restrict__ cand) { pdl_entry();
    int t = blockIdx.x;
    int* mt = meta + t * 4;
    int bin = mt[0], n = mt[3];
    if (bin < 0) return;
    int s1 = min(n, (int)(blockIdx.y + 1) * TOPK_CHUNK);
    int lane = threadIdx.x & 31;
    u32 below = (1u << lane) - 1;
    // One atomic per warp and list: the warp's hits are counted by ballot and placed by rank.
    for (int s0 = blockIdx.y * TOPK_CHUNK; s0 < s1; s0 += blockDim.x) {
        int s = s0 + threadIdx.x;
        int b = s < s1 ? (int)(order_key(scores[(size_t)t * ld + s]) >> 20) : -1;
        u32 above = __ballot_sync(0xffffffffu, b > bin), tie = __ballot_sync(0xffffffffu, b == bin);
        int base_above = 0, base_tie = 0;
        if (lane == 0) {
            if (above) base_above = atomicAdd(&mt[1], __popc(above));
            if (tie) base_tie = atomicAdd(&mt[2], __popc(tie));
        }
        base_above = __shfl_sync(0xffffffffu, base_above, 0);
        base_tie = __shfl_sync(0xffffffffu, base_tie, 0);
        if (b > bin) sel[(size_t)t * topk + base_above + __popc(above & below)] = s;
        else if (b == bin) cand[(size_t)t * ld + base_tie + __popc(tie & below)] = s;
    }
}

// One radix pass over the candidates: narrows `prefix` by the `bits` bits below `shift`.
__device__ void radix_pass(const float* row, const int* c, int nc, int shift, int bits, u32& prefix, u32& mask, u32* hist, u32* scan_s, u32* prefix_s,
                           u32* remain_s) {
    u32 digits = 1u << bits;
    for (u32 i = threadIdx.x; i < digits; i += blockDim.x) hist[i] = 0;
    __syncthreads();
    for (int i = threadIdx.x; i < nc; i += blockDim.x) {
        u32 key = order_key(row[c[i]]);
        if ((key & mask) == prefix) atomicAdd(&hist[(key >> shift) & (digits - 1)], 1u);
    }
    __syncthreads();
    // The digit holding the r-th largest remaining key: a scan over the digits from the top
    // (thread i owns digit digits-1-i; the block has at least `digits` threads).
    u32 r = *remain_s;
    u32 dgt = digits - 1 - threadIdx.x;
    u32 cnt = threadIdx.x < digits ? hist[dgt] : 0u;
    u32 incl = block_scan(cnt, scan_s);
    if (threadIdx.x < digits && incl - cnt < r && (incl >= r || dgt == 0)) {
        *remain_s = r - (incl - cnt);
        *prefix_s = prefix | (dgt << shift);
    }
    __syncthreads();
    prefix = *prefix_s;
    mask |= (digits - 1) << shift;
}

// Finishes each row: all of it when it has at most k positions, else the best candidates
// (whose top 12 bits are equal) by radix select on the low 20 bits.
extern "C" __global__ void topk_finish(const float* __restrict__ scores, const StepMeta m, int ld, int topk, const int* __restrict__ meta,
                                       const int* __restrict__ cand, int* __restrict__ sel) { pdl_entry();
    __shared__ u32 hist[256], scan_s[32];
    __shared__ u32 prefix_s, remain_s, count_gt, count_tie;
    int t = blockIdx.x;
    const int* mt = meta + t * 4;
    int* out = sel + (size_t)t * topk;
    if (mt[0] < 0) {
        int n = mt[3];
        for (int j = threadIdx.x; j < topk; j += blockDim.x) out[j] = j < n ? j : -1;
        return;
    }
    int taken = mt[1], nc = mt[2];
    const int* c = cand + (size_t)t * ld;
    const float* row = scores + (size_t)t * ld;
    u32 prefix = (u32)mt[0] << 20, mask = 0xfff00000u;
    if (threadIdx.x == 0) {
        remain_s = topk - taken;
        count_gt = 0;
        count_tie = 0;
    }
    __syncthreads();
    radix_pass(row, c, nc, 12, 8, prefix, mask, hist, scan_s, &prefix_s, &remain_s);
    radix_pass(row, c, nc, 4, 8, prefix, mask, hist, scan_s, &prefix_s, &remain_s);
    radix_pass(row, c, nc, 0, 4, prefix, mask, hist, scan_s, &prefix_s, &remain_s);
    u32 thr = prefix, ties = remain_s;
    u32 above = topk - taken - ties;  // candidates strictly above the threshold
    for (int i = threadIdx.x; i < nc; i += blockDim.x) {
        u32 key = order_key(row[c[i]]);
        if (key > thr) {
            out[taken + atomicAdd(&count_gt, 1u)] = c[i];
        } else if (key == thr) {
            u32 k = atomicAdd(&count_tie, 1u);
            if (k < ties) out[taken + above + k] = c[i];
        }
    }
}
