// Absorbed multi-head latent attention over a paged latent cache, and the DSA lightning indexer.
// Cache rows: MLA slots keep [c (latent) | k_pe (rope)] per position, indexer slots the indexer
// key; both roped when written. cos/sin are per step row, one value per rotated pair.

// Normalizes the latent half of kv_a output, ropes the rope half, stores the row; grid T.
extern "C" __global__ void mla_cache_write(const float* __restrict__ kv, const float* __restrict__ norm_w, float eps,
                                           const float* __restrict__ cosv, const float* __restrict__ sinv, int interleaved,
                                           const StepMeta m, float* __restrict__ pool, int L, int R) {
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

// q_lat[t,h,:] = W_UK[h]ᵀ q_nope[t,h]; q_pe[t,h] = rope(q_rope[t,h]); grid T·H.
extern "C" __global__ void mla_queries(const float* __restrict__ q, const float* __restrict__ wuk, float* __restrict__ q_lat,
                                       float* __restrict__ q_pe, const float* __restrict__ cosv, const float* __restrict__ sinv,
                                       int interleaved, int H, int N, int R, int L) {
    extern __shared__ float sm[];  // N + R
    int t = blockIdx.x / H, h = blockIdx.x % H;
    const float* qh = q + (size_t)t * H * (N + R) + (size_t)h * (N + R);
    for (int i = threadIdx.x; i < N + R; i += blockDim.x) sm[i] = qh[i];
    __syncthreads();
    int half = R / 2;
    for (int i = threadIdx.x; i < half; i += blockDim.x)
        rope_pair(sm + N, i, half, interleaved, cosv[t * half + i], sinv[t * half + i]);
    const float* w = wuk + (size_t)h * N * L;
    for (int j = threadIdx.x; j < L; j += blockDim.x) {
        float acc = 0.f;
        for (int d = 0; d < N; d++) acc = fmaf(sm[d], w[(size_t)d * L + j], acc);
        q_lat[((size_t)t * H + h) * L + j] = acc;
    }
    __syncthreads();
    for (int i = threadIdx.x; i < R; i += blockDim.x) q_pe[((size_t)t * H + h) * R + i] = sm[N + i];
}

// Softmax attention of one (row, head) over its keys: the selection's (sel != null, entries
// beyond the row's position or negative are skipped) or positions 0..pos. grid (T, H);
// smem: L + R + nk floats.
extern "C" __global__ void mla_attend(const float* __restrict__ q_lat, const float* __restrict__ q_pe, const float* __restrict__ pool,
                                      const StepMeta m, const int* __restrict__ sel, int topk, int H, int L, int R, float scale,
                                      float* __restrict__ out) {
    extern __shared__ float sm[];
    __shared__ float scratch[32];
    int t = blockIdx.x, h = blockIdx.y;
    int W = L + R;
    float* q = sm;
    float* sc = sm + W;
    for (int i = threadIdx.x; i < L; i += blockDim.x) q[i] = q_lat[((size_t)t * H + h) * L + i];
    for (int i = threadIdx.x; i < R; i += blockDim.x) q[L + i] = q_pe[((size_t)t * H + h) * R + i];
    __syncthreads();
    int pos = m.pos[t], seq = m.row_seq[t];
    int nk = sel ? topk : pos + 1;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    for (int j = warp; j < nk; j += nw) {
        int p = sel ? sel[(size_t)t * topk + j] : j;
        float s = NEG_INF;
        if (p >= 0 && p <= pos) {
            const float* k = cache_row((float*)pool, W, m.blocks, m.max_blocks, seq, p);
            float acc = 0.f;
            for (int i = lane; i < W; i += 32) acc = fmaf(q[i], k[i], acc);
            s = warp_sum(acc) * scale;
        }
        if (lane == 0) sc[j] = s;
    }
    __syncthreads();
    float mx = NEG_INF;
    for (int j = threadIdx.x; j < nk; j += blockDim.x) mx = fmaxf(mx, sc[j]);
    mx = block_max(mx, scratch);
    float sum = 0.f;
    for (int j = threadIdx.x; j < nk; j += blockDim.x) {
        float e = sc[j] == NEG_INF ? 0.f : expf(sc[j] - mx);
        sc[j] = e;
        sum += e;
    }
    sum = block_sum(sum, scratch);
    for (int d = threadIdx.x; d < L; d += blockDim.x) {
        float acc = 0.f;
        for (int j = 0; j < nk; j++) {
            float e = sc[j];
            if (e == 0.f) continue;
            int p = sel ? sel[(size_t)t * topk + j] : j;
            acc = fmaf(e, cache_row((float*)pool, W, m.blocks, m.max_blocks, seq, p)[d], acc);
        }
        out[((size_t)t * H + h) * L + d] = acc / sum;
    }
}

// out[t,h,j] = W_UV[h][j] · o_lat[t,h]; grid T·H, a warp per output.
extern "C" __global__ void mla_values(const float* __restrict__ o_lat, const float* __restrict__ wuv, float* __restrict__ out, int H,
                                      int V, int L) {
    int t = blockIdx.x / H, h = blockIdx.x % H;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    const float* o = o_lat + ((size_t)t * H + h) * L;
    for (int j = warp; j < V; j += nw) {
        const float* w = wuv + ((size_t)h * V + j) * L;
        float acc = 0.f;
        for (int i = lane; i < L; i += 32) acc = fmaf(w[i], o[i], acc);
        acc = warp_sum(acc);
        if (lane == 0) out[((size_t)t * H + h) * V + j] = acc;
    }
}

// LayerNorm (weight, bias) of the indexer key, rope on its first R dims, stored; grid T.
extern "C" __global__ void index_cache_write(const float* __restrict__ k, const float* __restrict__ nw_, const float* __restrict__ nb,
                                             float eps, const float* __restrict__ cosv, const float* __restrict__ sinv,
                                             int interleaved, const StepMeta m, float* __restrict__ pool, int D, int R) {
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

#define MAX_INDEX_HEADS 64

// scores[t, s] = Σ_h w_h·nh^-½ · relu(q_h·k_s · D^-½) for s ≤ pos[t], -inf beyond;
// grid (T, ceil(ld / blockDim)); smem NH·D + NH floats. D must be a multiple of 4.
extern "C" __global__ void index_scores(const float* __restrict__ q, const float* __restrict__ w, const float* __restrict__ pool,
                                        const StepMeta m, const float* __restrict__ cosv, const float* __restrict__ sinv,
                                        int interleaved, int NH, int D, int R, int ld, float* __restrict__ scores) {
    extern __shared__ float sm[];
    float* qs = sm;
    float* ws = sm + NH * D;
    int t = blockIdx.x;
    for (int i = threadIdx.x; i < NH * D; i += blockDim.x) qs[i] = q[(size_t)t * NH * D + i];
    float wscale = rsqrtf((float)NH);
    for (int i = threadIdx.x; i < NH; i += blockDim.x) ws[i] = w[(size_t)t * NH + i] * wscale;
    __syncthreads();
    int half = R / 2;
    for (int i = threadIdx.x; i < NH * half; i += blockDim.x) {
        int h = i / half, p = i % half;
        rope_pair(qs + h * D, p, half, interleaved, cosv[t * half + p], sinv[t * half + p]);
    }
    __syncthreads();
    int s = blockIdx.y * blockDim.x + threadIdx.x;
    if (s >= ld) return;
    int pos = m.pos[t];
    if (s > pos) {
        scores[(size_t)t * ld + s] = NEG_INF;
        return;
    }
    const float4* k4 = (const float4*)cache_row((float*)pool, D, m.blocks, m.max_blocks, m.row_seq[t], s);
    float acc[MAX_INDEX_HEADS];
#pragma unroll
    for (int h = 0; h < MAX_INDEX_HEADS; h++) acc[h] = 0.f;
    const float4* q4 = (const float4*)qs;
    for (int d = 0; d < D / 4; d++) {
        float4 kv = k4[d];
#pragma unroll
        for (int h = 0; h < MAX_INDEX_HEADS; h++) {
            if (h < NH) {
                float4 qv = q4[h * (D / 4) + d];
                acc[h] = fmaf(qv.x, kv.x, fmaf(qv.y, kv.y, fmaf(qv.z, kv.z, fmaf(qv.w, kv.w, acc[h]))));
            }
        }
    }
    float qscale = rsqrtf((float)D);
    float score = 0.f;
#pragma unroll
    for (int h = 0; h < MAX_INDEX_HEADS; h++)
        if (h < NH) score = fmaf(ws[h], fmaxf(acc[h] * qscale, 0.f), score);
    scores[(size_t)t * ld + s] = score;
}

__device__ __forceinline__ u32 order_key(float f) {
    u32 b = __float_as_uint(f);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

// The top-k positions of each row's scores (positions 0..pos), by radix select on the float
// bits: four 8-bit passes find the k-th largest key, then keys above it are taken and ties at
// it are taken in position order. grid T; rows with at most k keys take them all, padded with -1.
extern "C" __global__ void index_topk(const float* __restrict__ scores, const StepMeta m, int ld, int topk, int* __restrict__ sel) {
    __shared__ u32 hist[256];
    __shared__ u32 prefix_s, remain_s, count_gt;
    __shared__ u32 warp_tot[32];
    int t = blockIdx.x;
    int n = m.pos[t] + 1;
    if (n > ld) n = ld;
    int* out = sel + (size_t)t * topk;
    const float* row = scores + (size_t)t * ld;
    if (n <= topk) {
        for (int j = threadIdx.x; j < topk; j += blockDim.x) out[j] = j < n ? j : -1;
        return;
    }
    u32 prefix = 0, mask = 0;
    if (threadIdx.x == 0) remain_s = topk;
    for (int pass = 0; pass < 4; pass++) {
        int shift = 24 - 8 * pass;
        for (int i = threadIdx.x; i < 256; i += blockDim.x) hist[i] = 0;
        __syncthreads();
        for (int s = threadIdx.x; s < n; s += blockDim.x) {
            u32 key = order_key(row[s]);
            if ((key & mask) == prefix) atomicAdd(&hist[(key >> shift) & 255u], 1u);
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            u32 need = remain_s, cum = 0;
            int d = 255;
            for (; d > 0; d--) {
                if (cum + hist[d] >= need) break;
                cum += hist[d];
            }
            remain_s = need - cum;
            prefix_s = prefix | ((u32)d << shift);
        }
        __syncthreads();
        prefix = prefix_s;
        mask |= 255u << shift;
    }
    u32 thr = prefix, ties = remain_s;  // take every key > thr, and `ties` keys == thr
    if (threadIdx.x == 0) count_gt = 0;
    __syncthreads();
    for (int s = threadIdx.x; s < n; s += blockDim.x) {
        if (order_key(row[s]) > thr) out[atomicAdd(&count_gt, 1u)] = s;
    }
    __syncthreads();
    u32 base = topk - ties;
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    for (int start = 0; start < n && base < (u32)topk; start += blockDim.x) {
        int s = start + threadIdx.x;
        bool eq = s < n && order_key(row[s]) == thr;
        u32 ballot = __ballot_sync(0xffffffffu, eq);
        if (lane == 0) warp_tot[w] = __popc(ballot);
        __syncthreads();
        u32 before = 0, total = 0;
        for (int i = 0; i < nw; i++) {
            if (i < w) before += warp_tot[i];
            total += warp_tot[i];
        }
        before += __popc(ballot & ((1u << lane) - 1u));
        if (eq && base + before < (u32)topk) out[base + before] = s;
        base += total;
        __syncthreads();
    }
}
