// Tensor-core linear layers for decode: FP8 and INT4 weights times up to four token rows.
//
// The CUDA-core kernels of linear.cu turn every weight into an f32 before its multiply-add, and
// for FP8 and INT4 that arithmetic, not memory, bounds them. Here the weights go through the
// tensor cores in their own precision, exactly:
// - FP8: e4m3 codes become f16 exactly (3 mantissa bits) for mma.sync m16n8k16 with f32
//   accumulation, each activation row split into two f16 halves: hi = f16(x·2^k), lo =
//   f16(x·2^k − hi), with 2^k putting the row's largest |x| in [2^14, 2^15). hi + lo keeps 22
//   bits of every x (f32 keeps 24), so the results stay within f32 rounding of the CUDA-core
//   path.
// - INT4: nibbles become int8 for mma.sync m16n8k32.s8 against int8 planes of the activations
//   (see "INT4 on the integer tensor cores" below), summed exactly in int32 per group.
// The checkpoint's scales are applied in f32 to each (row, scale block or group) sum, as the
// format defines them. Integer group scales are read as the f16 bits of scale·2^scale_exp
// (WDesc.scale16: the checkpoint's 16-bit scales exactly, at half the bytes of f32; 6% of the
// bytes of group-64 INT4), and the results multiplied back by 2^-scale_exp.
//
// Fragments: a warp multiplies a 16-row tile of W by 8-column B tiles whose columns are token
// slots' halves or planes. The order of k inside a fragment is free as long as A and B agree,
// so each lane reads its weights in whole pieces (16 bytes, or 4 bytes of INT4 with groups
// under 128) and the split kernels lay the activations out in the matching order. A block's
// warps split the columns and reduce their tiles through shared memory.

#define MMA_WARPS 16
#define MMA_TOKENS 4  // token slots per tile
// Tuning constants (DUET_KERNEL_DEFINES overrides them for sweeps). Registers per thread
// (__maxnreg__): at most 128 so 16-warp blocks fit (FP8 measured slower capped at 80: 62-74%
// of bandwidth against 75-82%). Chunks in flight per warp: measured per format. (Group 64 and
// 32 at one token: 4 chunks a run, once lanes of empty slots stopped loading activations and a
// run's scales came in one load, gate/up alone 81 -> 89%, experts x1 71 -> 74.5%, though the
// group-64 gate/up kernel then spills 8 bytes; before those, 2, 3 and 4 measured alike. Group
// 128 with zero points: 3 was best for the experts and 4 for the GEMV, until the tiled weights
// made 4 the better for both: GEMV 81 -> 85%, down alone at 1/2/4 tokens 76/77/80 -> 79/82/85%.)
#ifndef FP8_REGS
#define FP8_REGS 128
#endif
#ifndef INT4_REGS
#define INT4_REGS 128
#endif
#ifndef INT4_REGS_WIDE
#define INT4_REGS_WIDE INT4_REGS  // the four-slot variants' (three or four tokens), to tune apart
#endif
#define INT4_REGS_SLOTS2 INT4_REGS
#define INT4_REGS_SLOTS4 INT4_REGS_WIDE
#ifndef FP8_UNR
#define FP8_UNR 4
#endif
#ifndef INT4_UNR_SYM
#define INT4_UNR_SYM 4   // groups of 128+, symmetric, up to two token slots
#endif
#ifndef INT4_UNR_ASYM
#define INT4_UNR_ASYM 4  // the same with zero points
#endif
#ifndef INT4_UNR_SMALL
#define INT4_UNR_SMALL 4  // groups of 32 or 64, up to two token slots
#endif
#ifndef INT4_UNR_WIDE
#define INT4_UNR_WIDE 2  // groups of 128+, three or four token slots (two B tiles)
#endif
#ifndef INT4_UNR_SMALL_WIDE
#define INT4_UNR_SMALL_WIDE 2  // groups of 32 or 64, three or four token slots (1 -> 2: g64 experts x4 77 -> 83%)
#endif
#ifndef INT8_REGS
#define INT8_REGS 128
#endif
#ifndef INT8_UNR
#define INT8_UNR 4  // INT8 chunks (64 columns) a round
#endif
// L2 fetch size of the weight loads (ld_weight16): a chunk reads 64 bytes of each of 16 rows,
// half an L2 line each; fetching whole lines measured FP8 16384->6144 87% of copy bandwidth
// against 77%, FP8 experts 83% against 80%, INT4 63% against 60% (256 bytes: the same).
// Explicit per-lane L2 prefetches of later chunks, or bulk prefetches of a tile's rows, measured
// slower (FP8 experts 68-71%).
#ifndef MMA_L2_FETCH
#define MMA_L2_FETCH 128
#endif

__device__ __forceinline__ u32 f16_bits(float v) {
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v));
    return h;
}

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

// ---- one warp's share of a tile ------------------------------------------------------------
// Rows ra (A rows g = lane / 4) and rb (A rows g + 8), −1 for none, times the tile's token slots
// (trow: activation row of each, −1 for none). Each warp of a block takes runs of UNR chunks of
// the columns (tile_dots): the weight pieces, scales and zero points of all UNR chunks are
// loaded into registers before the first multiply, so each warp keeps a few kilobytes in
// flight (the activation pieces, L1 hits, follow one multiply ahead; tile_run). (A per-lane cp.async pipeline through shared memory measured slower on H200: FP8
// 16384->6144 44% of bandwidth against 78%; so did loading x where it is used.) The tile
// functions return, for lane (g, c = lane % 4), the scaled dot products of ra and rb with token
// slot c over the warp's chunks.

// Chunk order: warp w takes the runs of UNR consecutive chunks w·UNR, then every nw·UNR chunks
// further, so a run's loads are its first chunk's addresses (the tile's cursors, moved by seek)
// plus constants, and only the last run checks bounds. (Taking every nw-th chunk instead spent
// about 60 of INT4's 110-143 instructions per chunk on 64-bit address arithmetic and
// predicates; runs measured INT4 experts 62% -> 69% of bandwidth, FP8 16384->6144 82% -> 94%.)
// A Tile loads chunk q into a Chunk (load_w<CHECK> its weights, load_x<CHECK> its
// activations: zeros past the last chunk or for missing rows; load_scales<CHECK> the scales of
// a run's chunks at once), folds a chunk into its
// accumulators (dot) and them into the lane's result (result).
// (Issuing the next UNR chunks' loads before multiplying the current ones, in two register
// sets, measured slower on H200: FP8 16384->6144 64% against 82%, INT4 experts 33% against 59%.)

// One run of UNR chunks from qb: all its weights first, then each chunk's activation pieces
// (L1 hits) one multiply ahead, so only two chunks' pieces hold registers at a time (measured
// 0.3-0.7 points of bandwidth above loading each chunk's weights and activations together, on
// every FP8 and INT4 row). CHECK: the run may pass the last chunk.
// (Measured and not kept: issuing a block's first weight loads before the wait on the kernel
// before, in the GEMVs and in the expert down projection, and the epilogue's loads before the
// main loop: within noise or up to 3 points slower.)
template <bool CHECK, class Tile> __device__ __forceinline__ void tile_run(Tile& tile, int qb, int nq) {
    constexpr int UNR = Tile::UNR;
    typename Tile::Chunk ch[UNR];
    tile.seek(qb);
#pragma unroll
    for (int u = 0; u < UNR; u++) tile.template load_w<CHECK>(qb + u, ch[u]);
    tile.template load_scales<CHECK>(qb, ch);
    tile.template load_x<CHECK>(qb, ch[0]);
#pragma unroll
    for (int u = 0; u < UNR; u++) {
        if (u + 1 < UNR) tile.template load_x<CHECK>(qb + u + 1, ch[u + 1]);
        if (!CHECK || qb + u < nq) tile.dot(qb + u, ch[u]);
    }
}

template <class Tile> __device__ float2 tile_dots(Tile& tile) {
    constexpr int UNR = Tile::UNR;
    int warp = threadIdx.x >> 5, nw = blockDim.x >> 5, nq = tile.chunks();
    int qb = warp * UNR;
    // Rows of whole runs (every expert and GEMV of GLM-5.x) take a loop of their own, in which
    // the compiler knows it and drops the scales' chunk-by-chunk path (run_scales): H200, with
    // zero points beside the scales, +0.5-1 point at one token, +1-2.5 at four (performance.md).
    if (nq % UNR == 0) {
        for (; qb < nq; qb += nw * UNR) tile_run<false>(tile, qb, nq);
        return tile.result();
    }
    for (; qb + UNR <= nq; qb += nw * UNR) tile_run<false>(tile, qb, nq);
    if (qb < nq) tile_run<true>(tile, qb, nq);
    return tile.result();
}

// Where a lane reads chunk q of a tile's rows a and b (64 bytes of each per chunk, from its
// 16-byte piece), kept at chunk qc so a run's loads are these plus constants. A missing row
// (−1) reads row 0: its results are never stored, and no load needs a predicate. The weights
// are stored in 16-row tiles (wbyte in common.cuh; weights.rs, tile_rows), so a chunk's 8 rows
// of a warp's load are 512 contiguous bytes, not 8 pieces 64 bytes long a row apart: half the
// L1 lines a load touches (3-8 points on every tensor-core GEMV, docs/performance.md).
#define CHUNK_STRIDE 1024  // from a row's chunk to its next: a tile's 16 rows of 64 bytes
struct RowCursor {
    int qc;
    const u8 *la, *lb;
    __device__ void init(const void* w, size_t row_bytes, int ra, int rb) {
        qc = 0;
        la = (const u8*)w + row_start(max(ra, 0), row_bytes) + 16 * (threadIdx.x & 3);
        lb = (const u8*)w + row_start(max(rb, 0), row_bytes) + 16 * (threadIdx.x & 3);
    }
    // Where row r's first chunk is (wbyte's).
    static __device__ size_t row_start(int r, size_t row_bytes) { return (size_t)(r >> 4) * 16 * row_bytes + (size_t)(r & 15) * 64; }
    // Moves to chunk qb; returns by how many chunks, for the tile's other cursors.
    __device__ int seek(int qb) {
        int dq = qb - qc;
        qc = qb;
        la += CHUNK_STRIDE * dq;
        lb += CHUNK_STRIDE * dq;
        return dq;
    }
    __device__ const u8* a(int q) const { return la + CHUNK_STRIDE * (q - qc); }
    __device__ const u8* b(int q) const { return lb + CHUNK_STRIDE * (q - qc); }
    // The lane's pieces of chunk q of rows ra and rb (each tile's load_w). CHECK: q may be past
    // the last of nq chunks, and rows may be missing (−1): zeros then.
    template <bool CHECK> __device__ void load_pair(int q, int nq, int ra, int rb, uint4& wa, uint4& wb) const {
        bool ok = !CHECK || q < nq;
        const uint4 z = make_uint4(0, 0, 0, 0);
        wa = ok && (!CHECK || ra >= 0) ? ld_weight16<MMA_L2_FETCH>(a(q)) : z;
        wb = ok && (!CHECK || rb >= 0) ? ld_weight16<MMA_L2_FETCH>(b(q)) : z;
    }
};

// The activation row of token slot t, or of slot 0 for an empty slot (its results are not
// stored), so no activation load needs a null check. Selects, not an indexed array, so trow
// stays in registers.
__device__ __forceinline__ int slot_row(const int* trow, int t) {
    int r = t == 0 ? trow[0] : t == 1 ? trow[1] : t == 2 ? trow[2] : trow[3];
    return r >= 0 ? r : trow[0];
}

// Whether token slot t holds a row. A lane whose B column is an empty slot's loads no
// activations (zeros instead: its products are not stored), which at one token is half the
// INT4 lanes' activation loads and three quarters of FP8's, as many L1 bytes as the weights'.
__device__ __forceinline__ bool slot_used(const int* trow, int t) { return (t == 0 ? trow[0] : t == 1 ? trow[1] : t == 2 ? trow[2] : trow[3]) >= 0; }

// BYTES (4, 8 or 16) bytes from p (aligned to them) as words, the rest zero: one vector load.
template <int BYTES> __device__ __forceinline__ void load_words(const void* p, u32 (&w)[4]) {
    w[0] = w[1] = w[2] = w[3] = 0;
    if (BYTES == 16) {
        uint4 t = __ldg((const uint4*)p);
        w[0] = t.x, w[1] = t.y, w[2] = t.z, w[3] = t.w;
    } else if (BYTES == 8) {
        uint2 t = __ldg((const uint2*)p);
        w[0] = t.x, w[1] = t.y;
    } else {
        w[0] = __ldg((const u32*)p);
    }
}

// A run's BYTES bytes from p in one vector load (load_words), when they fill 4, 8 or 16 bytes,
// the run is not checked and `whole` (the rows hold whole runs, so p is aligned to them); false,
// loading nothing, otherwise (the caller then loads chunk by chunk).
template <int BYTES, bool CHECK> __device__ __forceinline__ bool run_words(const void* p, bool whole, u32 (&w)[4]) {
    if constexpr (!CHECK && (BYTES == 4 || BYTES == 8 || BYTES == 16)) {
        if (whole) {
            load_words<BYTES>(p, w);
            return true;
        }
    }
    return false;
}

// A run of UNR chunks' 16-bit scales of one row from p (the run's first chunk's), PER to a
// chunk (1, 2 or 4), as chunk u's halves in v[u] (half s: bits 16s of .x, then of .y). One
// vector load when they fill 4, 8 or 16 bytes and `whole` (the rows hold whole runs, so p is
// aligned to them), else one load per chunk; CHECK: chunks from qb + u ≥ nq, or all when !ok,
// are zeros.
template <int PER, int UNR, bool CHECK> __device__ __forceinline__ void run_scales(const u16* p, bool whole, bool ok, int qb, int nq, uint2 (&v)[UNR]) {
    u32 w[4];
    if (run_words<2 * PER * UNR, CHECK>(p, whole, w)) {
#pragma unroll
        for (int u = 0; u < UNR; u++) {
            int h = u * PER;  // the chunk's first half
            v[u] = PER == 1 ? make_uint2(w[h / 2] >> (16 * (h & 1)), 0) : make_uint2(w[h / 2], PER == 4 ? w[h / 2 + 1] : 0);
        }
        return;
    }
#pragma unroll
    for (int u = 0; u < UNR; u++) {
        const u16* q = p + PER * u;
        bool in = ok && (!CHECK || qb + u < nq);
        v[u] = !in ? make_uint2(0, 0)
             : PER == 4 ? __ldg((const uint2*)q)
             : PER == 2 ? make_uint2(__ldg((const u32*)q), 0)
                        : make_uint2(__ldg(q), 0);
    }
}

// The run's scales of rows ra and rb from their scale rows at the run's first chunk (the INT4
// and INT8 tiles' load_scales), into each chunk's sa and sb.
template <int PER, int UNR, bool CHECK, class Chunk>
__device__ __forceinline__ void run_scale_pair(const u16* sra, const u16* srb, int ra, int rb, int qb, int nq, Chunk (&ch)[UNR]) {
    uint2 va[UNR], vb[UNR];
    bool whole = nq % UNR == 0;
    run_scales<PER, UNR, CHECK>(sra, whole, !CHECK || ra >= 0, qb, nq, va);
    run_scales<PER, UNR, CHECK>(srb, whole, !CHECK || rb >= 0, qb, nq, vb);
#pragma unroll
    for (int u = 0; u < UNR; u++) ch[u].sa = va[u], ch[u].sb = vb[u];
}

// FP8, block scales with bc a power-of-two multiple of 64. A chunk is 64 columns: lane c holds
// bytes [16c, 16c + 16) of both rows; mma j takes its bytes 4j .. 4j + 3, and the x pieces of
// the lane's B column (slot g / 2, half g % 2 of split_act).
struct Fp8Tile {
    static constexpr int UNR = FP8_UNR;
    struct Chunk {
        uint4 a, b, x[2];
        float sa, sb;
    };
    const WDesc& d;
    int ra, rb, lq;        // lq: log2(chunks per scale column)
    const float *sa, *sb;  // scale rows of ra and rb
    RowCursor rc;          // the rows' weights at chunk rc.qc,
    const uint4* xc;       // and the lane's x pieces there (its B column, in 16-byte pieces)
    bool xv;               // whether that column's slot is used
    float2 acc;
    __device__ Fp8Tile(const WDesc& d, int ra, int rb, const int* trow, const void* xs)
        : d(d), ra(ra), rb(rb), lq(__ffs(d.bc >> 6) - 1), acc(make_float2(0.f, 0.f)) {
        sa = d.scale + (size_t)(max(ra, 0) / d.br) * d.sc;
        sb = d.scale + (size_t)(max(rb, 0) / d.br) * d.sc;
        int g = (threadIdx.x & 31) >> 2, t = slot_row(trow, g / 2);
        xv = slot_used(trow, g / 2);
        rc.init(d.w, d.cols, ra, rb);
        xc = (const uint4*)((const u16*)xs + ((size_t)t * 2 + (g & 1)) * d.cols) + 2 * (threadIdx.x & 3);
    }
    // Moves the cursors to chunk qb.
    __device__ void seek(int qb) { xc += 8 * rc.seek(qb); }
    __device__ int chunks() const { return d.cols >> 6; }
    // Chunk q's weights (load_w), the run's scales from qb (load_scales) and chunk q's activation
    // pieces (load_x). CHECK: q may be past the last chunk, and rows may be missing (zeros then).
    template <bool CHECK> __device__ void load_w(int q, Chunk& ch) const { rc.template load_pair<CHECK>(q, chunks(), ra, rb, ch.a, ch.b); }
    template <bool CHECK> __device__ void load_scales(int qb, Chunk (&ch)[UNR]) const {
#pragma unroll
        for (int u = 0; u < UNR; u++) {
            int q = qb + u;
            bool ok = !CHECK || q < chunks(), oa = ok && (!CHECK || ra >= 0), ob = ok && (!CHECK || rb >= 0);
            ch[u].sa = oa ? __ldg(sa + (q >> lq)) : 0.f;
            ch[u].sb = ob ? __ldg(sb + (q >> lq)) : 0.f;
        }
    }
    template <bool CHECK> __device__ void load_x(int q, Chunk& ch) const {
        bool ok = (!CHECK || q < chunks()) && xv;
        const uint4 z = make_uint4(0, 0, 0, 0), *x = xc + 8 * (q - rc.qc);
        ch.x[0] = ok ? x[0] : z;
        ch.x[1] = ok ? x[1] : z;
    }
    __device__ void dot(int, const Chunk& ch) {
        float t[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
        for (int j = 0; j < 4; j++) {
            u32 a = word(ch.a, j), b = word(ch.b, j);
            mma_f16(t, e4m3x2_f16x2(a & 0xffff), e4m3x2_f16x2(b & 0xffff), e4m3x2_f16x2(a >> 16), e4m3x2_f16x2(b >> 16),
                    word(ch.x[j / 2], 2 * (j % 2)), word(ch.x[j / 2], 2 * (j % 2) + 1));
        }
        acc.x = fmaf(ch.sa, t[0] + t[1], acc.x);
        acc.y = fmaf(ch.sb, t[2] + t[3], acc.y);
    }
    __device__ float2 result() const { return acc; }
};

// ---- INT4 on the integer tensor cores ------------------------------------------------------
// A nibble n (q = n − 8) becomes the exact int8 16·q with one AND-XOR per four nibbles: n ^ 8
// in a byte's high half reads as a signed 16·(n − 8). Activations come as PLANES int8 planes
// (split_planes): x·2^k = Σ_p 2^(−7p)·x_p + ε with |x_p| ≤ 127 and 2^k putting the row's
// largest |x| in [64, 128), so |ε| ≤ 2^−21 and every x keeps 27 bits relative to its row's
// largest. mma.sync m16n8k32.s8 sums a group's products exactly in int32; the group's scale
// (and zero point, through the planes' precomputed sums) is applied in f32 to that sum. B
// column n = PLANES·(token slot) + plane, two token slots per 8-column tile. Against the f16
// route this takes a third of the instructions per weight word.

#define PLANES 4
#define PLANE_BITS 7

__device__ __forceinline__ void mma_s8(int d[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    asm("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// Accumulators start at the bits of 1.5·2^23, so while |sum| < 2^22 (a 128-column chunk stays
// under 128·128·127 < 2^21) the int32 result read as a float is 1.5·2^23 + sum exactly: one
// add instead of the slow int-to-float conversion.
#define ACC_BASE 0x4B400000
__device__ __forceinline__ float acc_float(int v) { return __int_as_float(v) - 12582912.f; }

// The even nibbles (0, 2, 4, 6) and the odd ones (1, 3, 5, 7) of a word as four int8 16·q each:
// the upload stores every nibble as q = n − 8 in two's complement (n ^ 8, int4_unsigned), so
// in a byte's high half it reads as 16·q.
__device__ __forceinline__ void int4_s8(u32 w, u32& even, u32& odd) {
    even = (w << 4) & 0xf0f0f0f0u;
    odd = w & 0xf0f0f0f0u;
}

// The order of a plane's columns (plane_pos, as store_planes writes them): each 8 columns
// ordered 0 2 4 6 1 3 5 7, column c at (c & ~7) | (c & 1) << 2 | (c >> 1 & 3), so the bytes of
// one word's even nibbles and then its odd ones are adjacent.

// An integer tile's result from its accumulators (acc[n]: B tile n's C fragment, the planes of
// two token slots): lane c holds planes 2(c % 2), 2(c % 2) + 1 of slot 2n + c/2, its partner
// c ^ 1 the other two; then lane c takes slot c's value from lane (g, 2(c % 2)) of tile c/2.
template <int NT> __device__ __forceinline__ float2 planes_result(const float (&acc)[NT][4]) {
    const float step = 1.f / (1 << PLANE_BITS), far = step * step;
    int lane = threadIdx.x & 31, c = lane & 3, src = (lane & ~3) | (2 * (c & 1));
    float2 res = make_float2(0.f, 0.f);
#pragma unroll
    for (int n = 0; n < NT; n++) {
        float va = fmaf(step, acc[n][1], acc[n][0]), vb = fmaf(step, acc[n][3], acc[n][2]);
        float oa = __shfl_xor_sync(0xffffffffu, va, 1), ob = __shfl_xor_sync(0xffffffffu, vb, 1);
        float ta = (c & 1) ? fmaf(far, va, oa) : fmaf(far, oa, va);
        float tb = (c & 1) ? fmaf(far, vb, ob) : fmaf(far, ob, vb);
        ta = __shfl_sync(0xffffffffu, ta, src);
        tb = __shfl_sync(0xffffffffu, tb, src);
        if (c / 2 == n) res = make_float2(ta, tb);
    }
    return res;
}

// INT4, columns in chunks of 128 holding GPC scale groups (1 for groups of 128 or more, 2 for
// 64, 4 for 32). Lane c reads bytes [16c, 16c + 16) of a chunk's row and mma i takes word i of
// every lane. With one group (CONTIG) those are the row's words 4c + i, all in the chunk's
// group. Smaller groups are stored interleaved (int4_word in common.cuh), so the 4 / GPC mmas
// of group s take the lanes' words of its 128 / GPC columns, each lane's consecutive (group 64:
// lane c's words 2c, 2c + 1, then 8 + 2c, 9 + 2c; group 32: word 4i + c), and sum into one
// int32 result before the group's scale is applied (one epilogue per group, not per 32
// columns). A lane's activations are then 32 / GPC consecutive bytes per group of each plane
// (group 64: two 16-byte loads, as group 128's). (Reading the words in place, 4 bytes at a
// time, measured g64 experts at 43-46% of bandwidth.) NT 8-column B tiles, two token slots each. xq: planes
// [row][PLANES][cols] in plane_pos order; sums: per activation row, each plane's sum over every
// 32 columns, then over every 128 ([row][cols/32 + cols/128][PLANES]), read for zero points
// only. The result is times 16·2^k·2^scale_exp (split_planes folds the 16 into the row's exponent).
template <int GPC, int NT, bool ASYM> struct Int4Tile {
    static constexpr bool CONTIG = GPC == 1;
    // Zero points beside the scales (WDesc.scale_zero16, which the upload makes for one or two
    // groups a chunk): a chunk's PER halves, its GPC scales then its GPC zero points, in the
    // scales' one vector load; no zero-point load a chunk and row (group 128's main loop 305 ->
    // 272 instructions; H200, +1-1.5 points at one token; performance.md). Four groups a chunk
    // would need more than the 8 bytes a chunk's scales fill: group 32 loads its zero points.
    static constexpr bool ZS = ASYM && GPC <= 2;
    static constexpr int PER = ZS ? 2 * GPC : GPC;
    static constexpr int UNR = CONTIG ? (NT == 1 ? (ASYM ? INT4_UNR_ASYM : INT4_UNR_SYM) : INT4_UNR_WIDE) : (NT == 1 ? INT4_UNR_SMALL : INT4_UNR_SMALL_WIDE);
    struct Chunk {
        uint4 a, b, x[NT][2];
        uint2 sa, sb;            // the chunk's PER halves of ra and rb: its GPC group scales (f16
                                 // bits), then with ZS its GPC zero points (f16 −16·zp),
        u32 za, zb;              // ASYM without ZS: the zero points (byte s: group s),
        int2 sums[NT][GPC];      // and the plane sums of the lane's C columns per group
    };
    const WDesc& d;
    int ra, rb;
    // Cursors at chunk rc.qc (seek) for the rows' weights, scales and zero points, and the
    // lane's activations and plane sums, so a run's loads are these plus constants.
    RowCursor rc;
    const u16 *sra, *srb;
    const signed char *zra, *zrb;
    const u8* xb[NT];   // this lane's B column per tile (slot 2n + g/4, plane g % 4)
    const int* sm[NT];  // plane sums of its C columns 2c, 2c + 1 (slot 2n + c/2, planes 2(c % 2), +1)
    bool xv[NT], sv[NT];  // whether those slots are used
    float acc[NT][4];
    __device__ Int4Tile(const WDesc& d, int ra, int rb, const int* trow, const u8* xq, const int* sums) : d(d), ra(ra), rb(rb) {
        // The upload keeps groups to at most 128 columns (weights.rs), so chunk q's groups are
        // q·GPC onwards.
        rc.init(d.w, d.cols / 2, ra, rb);
        sra = ZS ? d.scale_zero16 + (size_t)max(ra, 0) * 2 * d.sc : d.scale16 + (size_t)max(ra, 0) * d.sc;
        srb = ZS ? d.scale_zero16 + (size_t)max(rb, 0) * 2 * d.sc : d.scale16 + (size_t)max(rb, 0) * d.sc;
        zra = d.zero + (size_t)max(ra, 0) * d.sc;
        zrb = d.zero + (size_t)max(rb, 0) * d.sc;
        int lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3, spans = (d.cols >> 5) + (d.cols >> 7);
#pragma unroll
        for (int n = 0; n < NT; n++) {
            xb[n] = xq + ((size_t)slot_row(trow, 2 * n + g / 4) * PLANES + g % 4) * d.cols;
            sm[n] = sums + (size_t)slot_row(trow, 2 * n + c / 2) * spans * PLANES + 2 * (c & 1) + (CONTIG ? (d.cols >> 5) * PLANES : 0);
            xv[n] = slot_used(trow, 2 * n + g / 4);
            sv[n] = slot_used(trow, 2 * n + c / 2);
            acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;
        }
    }
    __device__ int chunks() const { return d.cols >> 7; }
    // Moves the cursors to chunk qb.
    __device__ void seek(int qb) {
        int dq = rc.seek(qb);
        sra += PER * dq;
        srb += PER * dq;
        zra += GPC * dq;
        zrb += GPC * dq;
#pragma unroll
        for (int n = 0; n < NT; n++) {
            xb[n] += 128 * dq;
            if (ASYM) sm[n] += (CONTIG ? 1 : 4) * PLANES * dq;
        }
    }
    // GPC zero points from p (aligned to their count), byte s of the result holding the s-th.
    __device__ u32 zeros(const signed char* p) const {
        if (GPC == 4) return __ldg((const u32*)p);
        if (GPC == 2) return __ldg((const unsigned short*)p);
        return (u32)(u8)__ldg(p);
    }
    // The run's scales (after seek(qb): the cursors are at qb).
    template <bool CHECK> __device__ void load_scales(int qb, Chunk (&ch)[UNR]) const {
        run_scale_pair<PER, UNR, CHECK>(sra, srb, ra, rb, qb, chunks(), ch);
    }
    // Scale s of a chunk's scales (half s of its PER halves).
    static __device__ __forceinline__ float scale(uint2 v, int s) { return f16_to_f32((u16)((s < 2 ? v.x : v.y) >> (16 * (s & 1)))); }
    // Chunk q's weights and (ASYM without ZS) zero points (load_w), the run's scales (with ZS
    // and zero points) from qb (load_scales) and chunk q's activation planes and plane sums
    // (load_x). CHECK: q may be past the last chunk,
    // and rows may be missing (zeros then).
    template <bool CHECK> __device__ void load_w(int q, Chunk& ch) const {
        rc.template load_pair<CHECK>(q, chunks(), ra, rb, ch.a, ch.b);
        if (ASYM && !ZS) {
            int r = q - rc.qc;  // chunk q from the cursors
            bool ok = !CHECK || q < chunks(), oa = ok && (!CHECK || ra >= 0), ob = ok && (!CHECK || rb >= 0);
            ch.za = oa ? zeros(zra + GPC * r) : 0;
            ch.zb = ob ? zeros(zrb + GPC * r) : 0;
        }
    }
    template <bool CHECK> __device__ void load_x(int q, Chunk& ch) const {
        int c = threadIdx.x & 3, r = q - rc.qc;
        bool ok = !CHECK || q < chunks();
        const uint4 z = make_uint4(0, 0, 0, 0);
#pragma unroll
        for (int n = 0; n < NT; n++) {
            // Word i's plane bytes are x words 2i, 2i + 1.
            const u8* xp = xb[n] + 128 * r;
            if (!ok || !xv[n]) {
                ch.x[n][0] = ch.x[n][1] = z;
            } else if (CONTIG) {
                ch.x[n][0] = *(const uint4*)(xp + 32 * c);
                ch.x[n][1] = *(const uint4*)(xp + 32 * c + 16);
            } else if (GPC == 2) {
                ch.x[n][0] = *(const uint4*)(xp + 16 * c);
                ch.x[n][1] = *(const uint4*)(xp + 64 + 16 * c);
            } else {
                uint2 x0 = *(const uint2*)(xp + 8 * c), x1 = *(const uint2*)(xp + 32 + 8 * c);
                uint2 x2 = *(const uint2*)(xp + 64 + 8 * c), x3 = *(const uint2*)(xp + 96 + 8 * c);
                ch.x[n][0] = make_uint4(x0.x, x0.y, x1.x, x1.y);
                ch.x[n][1] = make_uint4(x2.x, x2.y, x3.x, x3.y);
            }
        }
        if (ASYM) {
#pragma unroll
            for (int n = 0; n < NT; n++)
#pragma unroll
                for (int s = 0; s < GPC; s++) {
                    // A group's sums: the chunk's 128-column sum, or its 32-column ones added.
                    int2 v = make_int2(0, 0);
                    if (ok && sv[n] && CONTIG) {
                        v = *(const int2*)(sm[n] + r * PLANES);
                    } else if (ok && sv[n]) {
#pragma unroll
                        for (int i = 0; i < 4 / GPC; i++) {
                            int2 p = *(const int2*)(sm[n] + (4 * r + s * (4 / GPC) + i) * PLANES);
                            v.x += p.x;
                            v.y += p.y;
                        }
                    }
                    ch.sums[n][s] = v;
                }
        }
    }
    __device__ void dot(int, const Chunk& ch) {
#pragma unroll
        for (int s = 0; s < GPC; s++) {
            int C[NT][4];
#pragma unroll
            for (int n = 0; n < NT; n++) C[n][0] = C[n][1] = C[n][2] = C[n][3] = ACC_BASE;
#pragma unroll
            for (int i = s * (4 / GPC); i < (s + 1) * (4 / GPC); i++) {
                u32 ae, ao, be, bo;
                int4_s8(word(ch.a, i), ae, ao);
                int4_s8(word(ch.b, i), be, bo);
#pragma unroll
                for (int n = 0; n < NT; n++) {
                    const uint4& x = ch.x[n][i / 2];
                    mma_s8(C[n], ae, be, ao, bo, word(x, 2 * (i % 2)), word(x, 2 * (i % 2) + 1));
                }
            }
            // Group s of the chunk: its scales, and its zero points below.
            float sa = scale(ch.sa, s), sb = scale(ch.sb, s);
            float za = 0.f, zb = 0.f;
            if (ZS) {
                // Σ 16(q − zp)·x = Σ 16q·x − 16zp·Σx, −16·zp stored as f16 after the scales.
                za = scale(ch.sa, GPC + s);
                zb = scale(ch.sb, GPC + s);
            } else if (ASYM) {
                za = -16.f * (float)(signed char)(ch.za >> (8 * s));
                zb = -16.f * (float)(signed char)(ch.zb >> (8 * s));
            }
#pragma unroll
            for (int n = 0; n < NT; n++) {
                float f0 = acc_float(C[n][0]), f1 = acc_float(C[n][1]), f2 = acc_float(C[n][2]), f3 = acc_float(C[n][3]);
                if (ASYM) {
                    float x0 = (float)ch.sums[n][s].x, x1 = (float)ch.sums[n][s].y;
                    f0 = fmaf(za, x0, f0);
                    f1 = fmaf(za, x1, f1);
                    f2 = fmaf(zb, x0, f2);
                    f3 = fmaf(zb, x1, f3);
                }
                acc[n][0] = fmaf(sa, f0, acc[n][0]);
                acc[n][1] = fmaf(sa, f1, acc[n][1]);
                acc[n][2] = fmaf(sb, f2, acc[n][2]);
                acc[n][3] = fmaf(sb, f3, acc[n][3]);
            }
        }
    }
    __device__ float2 result() const { return planes_result<NT>(acc); }
};

// INT8, symmetric, one scale group per 64-column chunk (the upload spells larger groups out per
// 64 columns). Lane c holds bytes [16c, 16c + 16) of a chunk's rows, uploaded with every 8
// columns in plane_pos order and as two's complement (weights.rs), so its words 2j and 2j + 1
// are mma j's A registers (columns 0 2 4 6, then 1 3 5 7, of an 8-column group) for the x words
// 2j, 2j + 1 of the INT4 planes split, which it reads as is. The split's exponent includes
// INT4's 16 (16·q), so the scales are applied times 16.
template <int NT> struct Int8Tile {
    static constexpr int UNR = INT8_UNR;
    struct Chunk {
        uint4 a, b, x[NT];
        uint2 sa, sb;  // f16 bits (low half of .x)
    };
    const WDesc& d;
    int ra, rb;
    RowCursor rc;          // the rows' weights at chunk rc.qc,
    const u16 *sra, *srb;  // their scales there,
    const u8* xb[NT];      // and this lane's 16 plane bytes per B tile (slot 2n + g/4, plane g % 4)
    bool xv[NT];           // whether those slots are used
    float acc[NT][4];
    __device__ Int8Tile(const WDesc& d, int ra, int rb, const int* trow, const u8* xq, const int*) : d(d), ra(ra), rb(rb) {
        rc.init(d.w, d.cols, ra, rb);
        sra = d.scale16 + (size_t)max(ra, 0) * d.sc;
        srb = d.scale16 + (size_t)max(rb, 0) * d.sc;
        int lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
#pragma unroll
        for (int n = 0; n < NT; n++) {
            xb[n] = xq + ((size_t)slot_row(trow, 2 * n + g / 4) * PLANES + g % 4) * d.cols + 16 * c;
            xv[n] = slot_used(trow, 2 * n + g / 4);
            acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;
        }
    }
    __device__ int chunks() const { return d.cols >> 6; }
    // Moves the cursors to chunk qb.
    __device__ void seek(int qb) {
        int dq = rc.seek(qb);
        sra += dq;
        srb += dq;
#pragma unroll
        for (int n = 0; n < NT; n++) xb[n] += 64 * dq;
    }
    // Chunk q's weights (load_w), the run's scales from qb (load_scales) and chunk q's plane
    // bytes (load_x). CHECK: q may be past the last chunk, and rows may be missing (zeros then).
    template <bool CHECK> __device__ void load_w(int q, Chunk& ch) const { rc.template load_pair<CHECK>(q, chunks(), ra, rb, ch.a, ch.b); }
    template <bool CHECK> __device__ void load_scales(int qb, Chunk (&ch)[UNR]) const {
        run_scale_pair<1, UNR, CHECK>(sra, srb, ra, rb, qb, chunks(), ch);
    }
    template <bool CHECK> __device__ void load_x(int q, Chunk& ch) const {
        int r = q - rc.qc;
        bool ok = !CHECK || q < chunks();
#pragma unroll
        for (int n = 0; n < NT; n++) ch.x[n] = ok && xv[n] ? *(const uint4*)(xb[n] + 64 * r) : make_uint4(0, 0, 0, 0);
    }
    __device__ void dot(int, const Chunk& ch) {
        float sa = 16.f * f16_to_f32((u16)ch.sa.x), sb = 16.f * f16_to_f32((u16)ch.sb.x);
#pragma unroll
        for (int n = 0; n < NT; n++) {
            int C[4] = {ACC_BASE, ACC_BASE, ACC_BASE, ACC_BASE};
#pragma unroll
            for (int j = 0; j < 2; j++)
                mma_s8(C, word(ch.a, 2 * j), word(ch.b, 2 * j), word(ch.a, 2 * j + 1), word(ch.b, 2 * j + 1), word(ch.x[n], 2 * j), word(ch.x[n], 2 * j + 1));
            acc[n][0] = fmaf(sa, acc_float(C[0]), acc[n][0]);
            acc[n][1] = fmaf(sa, acc_float(C[1]), acc[n][1]);
            acc[n][2] = fmaf(sb, acc_float(C[2]), acc[n][2]);
            acc[n][3] = fmaf(sb, acc_float(C[3]), acc[n][3]);
        }
    }
    __device__ float2 result() const { return planes_result<NT>(acc); }
};

template <class Tile, class... Args> __device__ __forceinline__ float2 run_tile(const Args&... args) {
    Tile t(args...);
    return tile_dots(t);
}

// What a kernel instantiation multiplies: SLOTS token slots per tile (4, or 2 for the INT4
// kernels of one or two tokens), and part(), the tile's share for lane (g, c). Each INT4
// variant (group size, zero points, slots) is its own kernel, compiled for just its loop (one
// kernel branching to all twelve measured 2-5 points slower: INT4 experts x1 70.6% against
// 72.5%, group-64 GEMV 68% against 74%). (Capping the group-64 and -32 kernels at the 80 or 96
// registers they fit without spilling, for more warps per SM, measured slower at one token:
// group-64 experts 57% against 65%.)
struct Fp8Mma {
    static constexpr int SLOTS = MMA_TOKENS, BITS = 8;
    static __device__ __forceinline__ float2 part(const WDesc& d, int ra, int rb, const int* trow, const void* xs, const int*) {
        return run_tile<Fp8Tile>(d, ra, rb, trow, xs);
    }
};
// INT4 with GPC groups per 128-column chunk, zero points or not; with SLOTS 4 a tile takes a
// second B tile when its slots 2 and 3 are used.
template <int GPC, bool ASYM, int SLOTS_> struct Int4Mma {
    static constexpr int SLOTS = SLOTS_, BITS = 4;
    static __device__ __forceinline__ float2 part(const WDesc& d, int ra, int rb, const int* trow, const void* xs, const int* sums) {
        const u8* xq = (const u8*)xs;
        if (SLOTS > 2 && (trow[2] >= 0 || trow[3] >= 0)) return run_tile<Int4Tile<GPC, 2, ASYM>>(d, ra, rb, trow, xq, sums);
        return run_tile<Int4Tile<GPC, 1, ASYM>>(d, ra, rb, trow, xq, sums);
    }
};
// INT8 (symmetric, groups of 64), as INT4.
template <int SLOTS_> struct Int8Mma {
    static constexpr int SLOTS = SLOTS_, BITS = 8;
    static __device__ __forceinline__ float2 part(const WDesc& d, int ra, int rb, const int* trow, const void* xs, const int* sums) {
        const u8* xq = (const u8*)xs;
        if (SLOTS > 2 && (trow[2] >= 0 || trow[3] >= 0)) return run_tile<Int8Tile<2>>(d, ra, rb, trow, xq, sums);
        return run_tile<Int8Tile<1>>(d, ra, rb, trow, xq, sums);
    }
};

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

// ---- entry points ----------------------------------------------------------------------------

// Largest |x| of row xr (n4 float4s), for every thread of the block: n4 loads in flight across
// the threads (from L2).
__device__ float row_absmax(const float4* xr, int n4, float* scratch) {
    float m = 0.f;
#pragma unroll 4
    for (int i = threadIdx.x; i < n4; i += blockDim.x) {
        float4 v = xr[i];
        m = fmaxf(m, fmaxf(fmaxf(fabsf(v.x), fabsf(v.y)), fmaxf(fabsf(v.z), fabsf(v.w))));
    }
    return block_max(m, scratch);
}

// The k with m·2^k in [2^(top − 1), 2^top) (0 for a zero or non-finite m), clamped to [lo, hi].
__device__ __forceinline__ int row_exponent(float m, int top, int lo, int hi) {
    if (!(m > 0.f && m <= 3.4e38f)) return 0;
    int e;
    frexpf(m, &e);  // m = f·2^e with f in [0.5, 1)
    return min(max(top - e, lo), hi);
}

// FP8: the hi / lo f16 halves of columns 4i .. 4i + 3 of a row (v4, times s = 2^k) into the
// row's halves hi and lo.
__device__ __forceinline__ void store_halves(float4 v4, float s, u16* hi, u16* lo, int i) {
    float v[4] = {v4.x * s, v4.y * s, v4.z * s, v4.w * s};
#pragma unroll
    for (int j = 0; j < 4; j++) {
        u32 h = f16_bits(v[j]);
        hi[4 * i + j] = (u16)h;
        lo[4 * i + j] = (u16)f16_bits(v[j] - f16_to_f32((u16)h));
    }
}

// INT4: the int8 planes of columns 4i .. 4i + 3 of row r (v4, times s = 2^k), and with the rest
// of the warp (32 consecutive i: whole 128-column chunks) each plane's sums over every 32 and
// every 128 columns. Each plane takes the rounded remainder of the ones before it, scaled by
// 2^PLANE_BITS.
__device__ __forceinline__ void store_planes(float4 v4, float s, int i, int r, int cols, u8* q, int* sums) {
    int lane = threadIdx.x & 31, n32 = cols / 32, spans = n32 + cols / 128;
    float v[4] = {v4.x * s, v4.y * s, v4.z * s, v4.w * s};
    int part[PLANES];
    u32 b[PLANES][4];  // plane p's byte of column 4i + j
#pragma unroll
    for (int p = 0; p < PLANES; p++) part[p] = 0;
#pragma unroll
    for (int j = 0; j < 4; j++) {
        float rem = v[j];
#pragma unroll
        for (int p = 0; p < PLANES; p++) {
            float t = fminf(fmaxf(rintf(rem), -127.f), 127.f);
            b[p][j] = (u8)(signed char)(int)t;
            part[p] += (int)t;
            rem = (rem - t) * (float)(1 << PLANE_BITS);  // exact: rem and t are within 1
        }
    }
    // In plane_pos order the columns 4i .. 4i + 3 sit at positions o, o + 4, o + 1, o + 5 of
    // their 8 (o = 0 for even i, 2 for odd): two 2-byte stores a plane, not four of a byte.
    size_t at = (size_t)(4 * i & ~7) + 2 * (i & 1);
#pragma unroll
    for (int p = 0; p < PLANES; p++) {
        u8* qp = q + ((size_t)r * PLANES + p) * cols + at;
        *(u16*)qp = (u16)(b[p][0] | b[p][2] << 8);
        *(u16*)(qp + 4) = (u16)(b[p][1] | b[p][3] << 8);
    }
    int* rs = sums + (size_t)r * spans * PLANES;
#pragma unroll
    for (int p = 0; p < PLANES; p++) {
        int v32 = part[p];
        for (int o = 1; o < 8; o <<= 1) v32 += __shfl_xor_sync(0xffffffffu, v32, o);
        int v128 = v32;
        for (int o = 8; o < 32; o <<= 1) v128 += __shfl_xor_sync(0xffffffffu, v128, o);
        if ((lane & 7) == 0) rs[(i / 8) * PLANES + p] = v32;
        if (lane == 0) rs[(n32 + i / 32) * PLANES + p] = v128;
    }
}

// The exponents of the splits: FP8 halves put a row's largest |x| in [2^14, 2^15) (f16 range),
// INT4 planes in [2^6, 2^7) (int8), both within float's range.
__device__ __forceinline__ int halves_exponent(float m) { return row_exponent(m, 15, -126, 126); }
__device__ __forceinline__ int planes_exponent(float m) { return row_exponent(m, 7, -126, 122); }

// FP8: xs[(r·2 + part)·cols + c] = hi / lo half of x[r, c]·2^k as f16, exps[r] = k. Grid (rows,
// segments of SPLIT_SEG columns), 256 threads: every block finds its row's max and converts its
// segment, 4 columns per thread. cols is a multiple of 64.
#define SPLIT_SEG 1024
extern "C" __global__ void split_act(const float* __restrict__ x, int cols, u16* __restrict__ xs, int* __restrict__ exps) {
    pdl_entry_small();
    __shared__ float scratch[32];
    int r = blockIdx.x;
    const float4* xr = (const float4*)(x + (size_t)r * cols);
    int n4 = cols / 4;
    int k = halves_exponent(row_absmax(xr, n4, scratch));
    u16* hi = xs + (size_t)r * 2 * cols;
    int i = blockIdx.y * (SPLIT_SEG / 4) + threadIdx.x;
    if (threadIdx.x < SPLIT_SEG / 4 && i < n4) store_halves(xr[i], pow2(k), hi, hi + cols, i);
    if (threadIdx.x == 0 && blockIdx.y == 0) exps[r] = k;
}

// INT4: q[(r·PLANES + p)·cols + plane_pos(c)] = plane p of x[r, c]·2^k (int8), exps[r] = k + 4
// (the 16 of the weights' 16·q folded in), and each plane's sums over every 32 and every 128
// columns (see int4_dots). Same grid as split_act; cols is a multiple of 128, so each warp
// covers whole 128-column chunks.
extern "C" __global__ void split_planes(const float* __restrict__ x, int cols, u8* __restrict__ q, int* __restrict__ sums, int* __restrict__ exps) {
    pdl_entry_small();
    TIMELINE_END;
    __shared__ float scratch[32];
    int r = blockIdx.x;
    const float4* xr = (const float4*)(x + (size_t)r * cols);
    int n4 = cols / 4;
    int k = planes_exponent(row_absmax(xr, n4, scratch));
    int i = blockIdx.y * (SPLIT_SEG / 4) + threadIdx.x;
    if (i >= n4) return;  // whole warps (n4 is a multiple of 32)
    store_planes(xr[i], pow2(k), i, r, cols, q, sums);
    if (threadIdx.x == 0 && blockIdx.y == 0) exps[r] = k + 4;
}

// RMSNorm (rms_norm's register path, the same bits) fused with the splits of its output for
// the tensor-core kernels: with xs non-null the FP8 halves and their exponents (split_act's),
// with q non-null the INT4 planes, sums and exponents (split_planes'). Grid (rows, segments of
// SPLIT_SEG columns), 256 threads: every block normalizes its whole row in registers and takes
// its maximum, then writes its segment (float4s 256·seg + t: the thread's register seg), so the
// stores spread over the SMs (one block per row took 8.5 µs for a 6144-wide row on H200, the
// stores of one SM). cols a multiple of 128, at most NORM_VEC·1024. A decode step's norms feed
// FP8/INT4 linears, so this saves each a split launch.
// With a non-null, the row is x + a (the residual add fused), each block writing its segment
// of the sum to s. ROUTER (rms_norm_split_router): block (r, b) also takes the gate rows
// [ROUTER_ROWS·b, ROUTER_ROWS·(b + 1)) of an MoE router's gate (bf16 rows of cols, plain
// layout): logits[r, e] = the normalized row · gate[e], so the router's GEMV runs in the norm's
// launch, not after it (the grid then has enough blocks for the gate's rows; those past the
// segments write no segment). The gate's words are loaded before the wait: they depend on no
// kernel. (Its own entry point: the words take 64 registers.)
#define ROUTER_ROWS 4  // ROUTER_ROWS in linear.rs
template <bool ROUTER>
__device__ __forceinline__ void norm_split(const float* __restrict__ x, const float* __restrict__ w, float* __restrict__ y, int cols, float eps,
                                           u16* __restrict__ xs, int* __restrict__ xs_exps, u8* __restrict__ q, int* __restrict__ sums,
                                           int* __restrict__ q_exps, const float* __restrict__ a, float* __restrict__ s,
                                           const u16* __restrict__ gate, int gate_rows, float* __restrict__ logits) {
    float4 g[NORM_VEC];
    norm_weights(w, cols, g);
    // The thread's gate words (4 bf16 a float4 of the row) of the block's gate rows.
    uint2 gw[ROUTER ? ROUTER_ROWS : 1][NORM_VEC];
    int e0 = blockIdx.y * ROUTER_ROWS;
    if constexpr (ROUTER) {
#pragma unroll
        for (int rr = 0; rr < ROUTER_ROWS; rr++)
#pragma unroll
            for (int j = 0; j < NORM_VEC; j++) {
                int i = threadIdx.x + j * blockDim.x;
                gw[rr][j] = e0 + rr < gate_rows && i < cols / 4 ? __ldg((const uint2*)(gate + (size_t)(e0 + rr) * cols) + i) : make_uint2(0, 0);
            }
    }
    pdl_entry_small();
    __shared__ float scratch[32];
    int r = blockIdx.x, seg = blockIdx.y, n4 = cols / 4;
    size_t off = (size_t)r * cols;
    float4 v[NORM_VEC];
    norm_row(x + off, a ? a + off : nullptr, s ? s + off : nullptr, seg, g, cols, eps, v, scratch);
    timeline_phase(0);
    float m = 0.f;
#pragma unroll
    for (int j = 0; j < NORM_VEC; j++)
        if (threadIdx.x + j * blockDim.x < n4)
            m = fmaxf(m, fmaxf(fmaxf(fabsf(v[j].x), fabsf(v[j].y)), fmaxf(fabsf(v[j].z), fabsf(v[j].w))));
    m = block_max(m, scratch);
    int kh = halves_exponent(m), kq = planes_exponent(m);
    u16* hi = xs ? xs + (size_t)r * 2 * cols : nullptr;
    // The block's segment, register seg's float4s, by selects (an index unknown at compile time
    // would put v in local memory), so the stores below are compiled once: with a copy under
    // each register's test the kernel was 87 KB of code, cold in the instruction cache at each
    // call, for the one copy a block runs.
    float4 mine = v[0];
#pragma unroll
    for (int j = 1; j < NORM_VEC; j++)
        if (j == seg) mine = v[j];
    int i = threadIdx.x + seg * blockDim.x;
    if (seg < NORM_VEC && i < n4) {
        ((float4*)(y + (size_t)r * cols))[i] = mine;
        if (xs) store_halves(mine, pow2(kh), hi, hi + cols, i);
        if (q) store_planes(mine, pow2(kq), i, r, cols, q, sums);  // whole warps: n4 is a multiple of 32
    }
    if (threadIdx.x == 0 && seg == 0) {
        if (xs) xs_exps[r] = kh;
        if (q) q_exps[r] = kq + 4;
    }
    timeline_phase(1);
    if constexpr (ROUTER) {
        float dot[ROUTER_ROWS];
#pragma unroll
        for (int rr = 0; rr < ROUTER_ROWS; rr++) {
            dot[rr] = 0.f;
#pragma unroll
            for (int j = 0; j < NORM_VEC; j++) {
                uint2 u = gw[rr][j];
                float4 e = make_float4(bf16_to_f32((u16)u.x), bf16_to_f32((u16)(u.x >> 16)), bf16_to_f32((u16)u.y), bf16_to_f32((u16)(u.y >> 16)));
                dot[rr] = fmaf(v[j].x, e.x, fmaf(v[j].y, e.y, fmaf(v[j].z, e.z, fmaf(v[j].w, e.w, dot[rr]))));
            }
        }
        __shared__ float red[ROUTER_ROWS][32];
        int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
#pragma unroll
        for (int rr = 0; rr < ROUTER_ROWS; rr++) {
            float d = warp_sum(dot[rr]);
            if (lane == 0) red[rr][warp] = d;
        }
        __syncthreads();
        if (threadIdx.x < ROUTER_ROWS && e0 + threadIdx.x < gate_rows) {
            float t = 0.f;
            for (int k = 0; k < nw; k++) t += red[threadIdx.x][k];
            logits[(size_t)r * gate_rows + e0 + threadIdx.x] = t;
        }
    }
}
extern "C" __global__ void rms_norm_split(const float* __restrict__ x, const float* __restrict__ w, float* __restrict__ y, int cols,
                                          float eps, u16* __restrict__ xs, int* __restrict__ xs_exps, u8* __restrict__ q,
                                          int* __restrict__ sums, int* __restrict__ q_exps, const float* __restrict__ a,
                                          float* __restrict__ s) {
    norm_split<false>(x, w, y, cols, eps, xs, xs_exps, q, sums, q_exps, a, s, nullptr, 0, nullptr);
}
extern "C" __global__ void rms_norm_split_router(const float* __restrict__ x, const float* __restrict__ w, float* __restrict__ y, int cols,
                                                 float eps, u16* __restrict__ xs, int* __restrict__ xs_exps, u8* __restrict__ q,
                                                 int* __restrict__ sums, int* __restrict__ q_exps, const float* __restrict__ a,
                                                 float* __restrict__ s, const u16* __restrict__ gate, int gate_rows,
                                                 float* __restrict__ logits) {
    TIMELINE_END;
    norm_split<true>(x, w, y, cols, eps, xs, xs_exps, q, sums, q_exps, a, s, gate, gate_rows, logits);
}

// The activation rows of a tile's token slots: slot j is row base[j]/div for j < n, else none.
__device__ __forceinline__ void slot_rows(int* trow, const int* base, int n, int div) {
#pragma unroll
    for (int j = 0; j < MMA_TOKENS; j++) trow[j] = j < n ? base[j] / div : -1;
}

// The weights of the 16-row storage tile holding row r (r < d.rows), and their bytes.
template <class V> __device__ __forceinline__ const u8* storage_tile(const WDesc& d, int r, size_t& bytes) {
    size_t rb = (size_t)d.cols * V::BITS / 8;
    bytes = 16 * rb;
    return (const u8*)d.w + wbyte(d, r & ~15, 0, rb);
}

// Asks L2 for the start of the 16-row tile at row r0 (prefetch_weights), before the kernel's
// wait.
template <class V> __device__ __forceinline__ void prefetch_tile(const WDesc& d, int r0) {
    size_t bytes;
    if (r0 < d.rows) prefetch_weights(storage_tile<V>(d, r0, bytes), bytes);
}

// y[t, yoff + r] = x[t] · W[r]; grid (ceil(rows / 16), ceil(T / V::SLOTS)).
template <class V> __device__ void gemv_mma(const WDesc d, const void* xs, const int* sums, const int* exps, float* y, int T, int ldy, int yoff) {
    __shared__ float res[16 * MMA_TOKENS];
    int r0 = blockIdx.x * 16, t0 = blockIdx.y * V::SLOTS, nt = min(V::SLOTS, T - t0);
    prefetch_tile<V>(d, r0);
    pdl_entry();
    int g = (threadIdx.x & 31) >> 2;
    int ra = r0 + g < d.rows ? r0 + g : -1, rb = r0 + 8 + g < d.rows ? r0 + 8 + g : -1;
    int trow[MMA_TOKENS];
#pragma unroll
    for (int j = 0; j < MMA_TOKENS; j++) trow[j] = j < nt ? t0 + j : -1;
    int i = threadIdx.x, r = i / MMA_TOKENS, t = i % MMA_TOKENS;
    bool mine = i < 16 * MMA_TOKENS && t < nt && r0 + r < d.rows;
    float2 v = V::part(d, ra, rb, trow, xs, sums);
    pdl_late();
    tile_reduce(v, res);
    if (mine) y[(size_t)(t0 + t) * ldy + yoff + r0 + r] = res[i] * pow2(-d.scale_exp) * pow2(-exps[t0 + t]);
}

// The expert kernels' blocks each take every gridDim.x-th row tile of their group's expert, so
// a block reads its plan entry and weight descriptor (a chain of dependent loads) once for
// several tiles when the host launches fewer blocks than tiles (mma_block in linear.rs).

// act[j, r] = silu(gate_e[r]·x_t) · (up_e[r]·x_t) for the plan's j-th pair p (token t = p / K):
// the activations in plan order, so that a group's rows are contiguous (the one-token block
// splits and projects its experts in two waves: moe.rs). The tile's rows are 8 gate rows and
// the matching up rows; grid (up to ceil(I / 8), groups from group g0); x split for the format
// (T rows).
template <class V> __device__ void moe_gate_up_mma(const WDesc* gu, const int* plan, int P, const void* xs, const int* sums, const int* exps, float* act, int K, int I, int g0) {
    __shared__ float res[16 * MMA_TOKENS];
    PlanGroup pg;
    if (!plan_group(plan, P, g0 + blockIdx.y, pg)) return;
    const WDesc d = gu[pg.expert];
    const int* pairs = pg.pairs;
    int g = (threadIdx.x & 31) >> 2;
    for (int r0 = blockIdx.x * 8; r0 < I; r0 += gridDim.x * 8) {
    int ra = r0 + g < I ? r0 + g : -1, rb = ra >= 0 ? I + ra : -1;
    for (int p0 = pg.first; p0 < pg.end; p0 += V::SLOTS) {
        int nt = min(V::SLOTS, pg.end - p0), trow[MMA_TOKENS];
        slot_rows(trow, pairs + p0, nt, K);
        int i = threadIdx.x, r = i / MMA_TOKENS, t = i % MMA_TOKENS;
        bool mine = i < 8 * MMA_TOKENS && t < nt && r0 + r < I;
        float2 v = V::part(d, ra, rb, trow, xs, sums);
        pdl_late();
        tile_reduce(v, res);
        if (mine) {
            int p = pairs[p0 + t];
            float u = pow2(-d.scale_exp), s = pow2(-exps[p / K]), gv = res[i] * u * s, uv = res[i + 8 * MMA_TOKENS] * u * s;
            act[(size_t)(p0 + t) * I + r0 + r] = gv / (1.f + expf(-gv)) * uv;
        }
    }
    }
}

// part[p, r] = down_e[r] · act[j] for the plan's j-th pair p (act in plan order, as gate/up
// writes it); grid (up to ceil(H / 16), groups from group g0); act split for the format (P rows).
template <class V> __device__ void moe_down_mma(const WDesc* dn, const int* plan, int P, const void* acts, const int* sums, const int* exps, float* part, int H, int g0) {
    __shared__ float res[16 * MMA_TOKENS];
    PlanGroup pg;
    if (!plan_group(plan, P, g0 + blockIdx.y, pg)) return;
    const WDesc d = dn[pg.expert];
    const int* pairs = pg.pairs;
    int g = (threadIdx.x & 31) >> 2;
    for (int r0 = blockIdx.x * 16; r0 < H; r0 += gridDim.x * 16) {
    int ra = r0 + g < H ? r0 + g : -1, rb = r0 + 8 + g < H ? r0 + 8 + g : -1;
    for (int p0 = pg.first; p0 < pg.end; p0 += V::SLOTS) {
        int nt = min(V::SLOTS, pg.end - p0), trow[MMA_TOKENS];
#pragma unroll
        for (int j = 0; j < MMA_TOKENS; j++) trow[j] = j < nt ? p0 + j : -1;
        float2 v = V::part(d, ra, rb, trow, acts, sums);
        int i = threadIdx.x, r = i / MMA_TOKENS, t = i % MMA_TOKENS;
        bool mine = i < 16 * MMA_TOKENS && t < nt && r0 + r < H;
        pdl_late();
        tile_reduce(v, res);
        if (mine) {
            int p = pairs[p0 + t];
            part[(size_t)p * H + r0 + r] = res[i] * pow2(-d.scale_exp) * pow2(-exps[p0 + t]);
        }
    }
    }
}

#define INSTANTIATE_MMA(NAME, V, REGS)                                                                                        \
    extern "C" __global__ void __maxnreg__(REGS) gemv_mma_##NAME(const WDesc d, const void* xs, const int* sums, const int* exps, float* y, int T, int ldy, int yoff) { \
        gemv_mma<V>(d, xs, sums, exps, y, T, ldy, yoff);                                                                \
    }                                                                                                                   \
    extern "C" __global__ void __maxnreg__(REGS) moe_gate_up_mma_##NAME(const WDesc* gu, const int* plan, int P, const void* xs, const int* sums, const int* exps, float* act, int K, int I, int g0, int wait) { \
        if (wait) pdl_entry(); else pdl_nowait();                                                                       \
        TIMELINE_END;                                                                                                   \
        moe_gate_up_mma<V>(gu, plan, P, xs, sums, exps, act, K, I, g0);                                        \
    }                                                                                                                   \
    extern "C" __global__ void __maxnreg__(REGS) moe_down_mma_##NAME(const WDesc* dn, const int* plan, int P, const void* acts, const int* sums, const int* exps, float* part, int H, int g0) { \
        pdl_entry();                                                                                                    \
        TIMELINE_END;                                                                                                   \
        moe_down_mma<V>(dn, plan, P, acts, sums, exps, part, H, g0);                                                    \
    }

// The INT4 variants' names: g<group><a: zero points | s: none><slots>_int4 (linear.rs builds
// them the same way).
#define INSTANTIATE_INT4(G, GPC, SLOTS)                                           \
    typedef Int4Mma<GPC, true, SLOTS> Int4_g##G##a##SLOTS;                        \
    typedef Int4Mma<GPC, false, SLOTS> Int4_g##G##s##SLOTS;                       \
    INSTANTIATE_MMA(g##G##a##SLOTS##_int4, Int4_g##G##a##SLOTS, INT4_REGS_SLOTS##SLOTS) \
    INSTANTIATE_MMA(g##G##s##SLOTS##_int4, Int4_g##G##s##SLOTS, INT4_REGS_SLOTS##SLOTS)

INSTANTIATE_MMA(fp8, Fp8Mma, FP8_REGS)
INSTANTIATE_INT4(128, 1, 2)
INSTANTIATE_INT4(128, 1, 4)
INSTANTIATE_INT4(64, 2, 2)
INSTANTIATE_INT4(64, 2, 4)
INSTANTIATE_INT4(32, 4, 2)
INSTANTIATE_INT4(32, 4, 4)
typedef Int8Mma<2> Int8_g64s2;
typedef Int8Mma<4> Int8_g64s4;
INSTANTIATE_MMA(g64s2_int8, Int8_g64s2, INT8_REGS)
INSTANTIATE_MMA(g64s4_int8, Int8_g64s4, INT8_REGS)
