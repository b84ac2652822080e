// Shared helpers for duet's kernels. Prepended to every kernels/*.cu source before NVRTC
// compiles it for sm_90a, so no file needs an #include.
//
// Conventions: activations are f32, row-major [rows, cols]; weights stay in checkpoint precision
// (bf16/f16/f32 raw bits, FP8 e4m3 with f32 block scales, INT4/INT8 in int32 words with f32 group
// scales and int8 zero points); accumulation is f32. Entry points are extern "C".

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

#define WARP 32
#define NEG_INF __int_as_float(0xff800000)

__device__ __forceinline__ float bf16_to_f32(u16 v) { return __uint_as_float(((u32)v) << 16); }

__device__ __forceinline__ float f16_to_f32(u16 v) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v));
    return f;
}

// Two e4m3 values (low byte first) to two floats, through the f16x2 converter of sm_89+.
__device__ __forceinline__ void e4m3x2_to_f32(u16 pair, float& lo, float& hi) {
    u32 h2;
    asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(h2) : "h"(pair));
    lo = f16_to_f32((u16)(h2 & 0xffff));
    hi = f16_to_f32((u16)(h2 >> 16));
}

__device__ __forceinline__ float e4m3_to_f32(u8 v) {
    float lo, hi;
    e4m3x2_to_f32((u16)v, lo, hi);
    return lo;
}

// Weight loads: read once per call, so kept out of L1. FETCH (64, 128 or 256; 0 for none) asks
// L2 to fetch that many bytes around each miss, so the rest of a line is on its way before the
// warp that reads it asks: more bytes in flight without more registers.
#define LD_WEIGHT16(HINT) \
    asm("ld.global.nc.L1::no_allocate" HINT ".v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p))
template <int FETCH> __device__ __forceinline__ uint4 ld_weight16(const void* p) {
    uint4 v;
    if (FETCH == 64) LD_WEIGHT16(".L2::64B");
    else if (FETCH == 128) LD_WEIGHT16(".L2::128B");
    else if (FETCH == 256) LD_WEIGHT16(".L2::256B");
    else LD_WEIGHT16("");
    return v;
}
#undef LD_WEIGHT16

struct SumOp {
    template <typename T> __device__ T operator()(T a, T b) const { return a + b; }
};
struct MaxOp {
    __device__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

// Reduces over the warp with `op`; every lane gets the result.
template <typename T, typename Op> __device__ __forceinline__ T warp_reduce(T v, Op op) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

__device__ __forceinline__ float warp_sum(float v) { return warp_reduce(v, SumOp()); }
__device__ __forceinline__ float warp_max(float v) { return warp_reduce(v, MaxOp()); }

// Reduces over the block with `op` (identity `init`); `scratch` holds one value per warp. Every
// thread gets the result, the warps' values taken in warp order (the same bits in every thread).
template <typename T, typename Op> __device__ __forceinline__ T block_reduce(T v, T* scratch, T init, Op op) {
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    v = warp_reduce(v, op);
    __syncthreads();
    if (lane == 0) scratch[w] = v;
    __syncthreads();
    T r = init;
    for (int i = 0; i < nw; i++) r = op(r, scratch[i]);
    return r;
}

__device__ __forceinline__ float block_sum(float v, float* scratch) { return block_reduce(v, scratch, 0.f, SumOp()); }
__device__ __forceinline__ float block_max(float v, float* scratch) { return block_reduce(v, scratch, NEG_INF, MaxOp()); }

// RMSNorm of one row in registers: thread t takes float4s t, t + blockDim, ... (NORM_VEC of
// them; cols a multiple of 4, at most NORM_VEC·4·blockDim) and gets them back as
// w ⊙ x / sqrt(mean(x²) + eps). All the loads are in flight at once: a loop of loads into a
// running sum waited a memory latency per step (21 µs for one 6144-wide row on H200, against
// 2-3 µs). Shared by rms_norm and rms_norm_split, so both give the same bits.
#define NORM_VEC 8
// With ar, the row normalized is xr + ar (the residual add fused), and the sum goes to sr: all
// of it (seg < 0), or register seg's float4s of each thread (the block's segment). g holds the
// thread's float4s of w (norm_weights), loaded before the kernel's wait: they depend on no
// kernel, so their latency passes while the kernel before finishes, not after x's.
__device__ __forceinline__ void norm_weights(const float* w, int cols, float4 (&g)[NORM_VEC]) {
#pragma unroll
    for (int j = 0; j < NORM_VEC; j++) {
        int i = threadIdx.x + j * blockDim.x;
        g[j] = i < cols / 4 ? ((const float4*)w)[i] : make_float4(0.f, 0.f, 0.f, 0.f);
    }
}
// (Every load is issued before the first store of the sum: with a store between them, the
// compiler ordered each float4's loads after the store before, which waits on the loads before
// it, so the row came in NORM_VEC round trips from L2, not one.)
__device__ __forceinline__ void norm_row(const float* xr, const float* ar, float* sr, int seg, const float4 (&g)[NORM_VEC], int cols,
                                         float eps, float4 (&v)[NORM_VEC], float* scratch) {
    int n4 = cols / 4;
    float ss = 0.f;
    float4 a[NORM_VEC];
    const float4 zero = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
    for (int j = 0; j < NORM_VEC; j++) {
        int i = threadIdx.x + j * blockDim.x;
        v[j] = i < n4 ? ((const float4*)xr)[i] : zero;
        a[j] = ar && i < n4 ? ((const float4*)ar)[i] : zero;
    }
    if (ar) {
#pragma unroll
        for (int j = 0; j < NORM_VEC; j++) {
            int i = threadIdx.x + j * blockDim.x;
            v[j] = make_float4(v[j].x + a[j].x, v[j].y + a[j].y, v[j].z + a[j].z, v[j].w + a[j].w);
            if (i < n4 && (seg < 0 || seg == j)) ((float4*)sr)[i] = v[j];
        }
    }
#pragma unroll
    for (int j = 0; j < NORM_VEC; j++) ss += v[j].x * v[j].x + v[j].y * v[j].y + v[j].z * v[j].z + v[j].w * v[j].w;
    float r = 1.f / sqrtf(block_sum(ss, scratch) / cols + eps);
#pragma unroll
    for (int j = 0; j < NORM_VEC; j++) {
        int i = threadIdx.x + j * blockDim.x;
        if (i < n4) v[j] = make_float4(g[j].x * (v[j].x * r), g[j].y * (v[j].y * r), g[j].z * (v[j].z * r), g[j].w * (v[j].w * r));
    }
}

// Inclusive prefix sum over the warp, lane by lane in order of the steps below.
template <typename T> __device__ __forceinline__ T warp_scan(T v) {
    int lane = threadIdx.x & 31;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        T n = __shfl_up_sync(0xffffffffu, v, o);
        if (lane >= o) v += n;
    }
    return v;
}

// Inclusive prefix sum over the block (blockDim a multiple of 32); `scratch` holds one value
// per warp. Every thread of the block must call it.
__device__ __forceinline__ u32 block_scan(u32 v, u32* scratch) {
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    v = warp_scan(v);
    __syncthreads();
    if (lane == 31) scratch[w] = v;
    __syncthreads();
    for (int j = 0; j < w; j++) v += scratch[j];
    return v;
}

// A float's place in total order (total_cmp: -0 before +0) as an unsigned key: larger keys
// for larger floats.
__device__ __forceinline__ u32 order_key(float f) {
    u32 b = __float_as_uint(f);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

// acc[j] += Σ_c q[c][j]·k[c] over dims c0..c1 for 8 heads j: q is dim-major (stride4 float4s per
// dim, the 8 heads adjacent), k one key's values. Each value of k is read once for all 8 heads
// and the queries come as two float4 broadcasts: shared-memory reads bound these loops.
__device__ __forceinline__ void dot8(float acc[8], const float4* q, int stride4, const float* k, int c0, int c1) {
    for (int c = c0; c < c1; c++) {
        float kv = k[c];
        float4 qa = q[c * stride4], qb = q[c * stride4 + 1];
        acc[0] = fmaf(qa.x, kv, acc[0]);
        acc[1] = fmaf(qa.y, kv, acc[1]);
        acc[2] = fmaf(qa.z, kv, acc[2]);
        acc[3] = fmaf(qa.w, kv, acc[3]);
        acc[4] = fmaf(qb.x, kv, acc[4]);
        acc[5] = fmaf(qb.y, kv, acc[5]);
        acc[6] = fmaf(qb.z, kv, acc[6]);
        acc[7] = fmaf(qb.w, kv, acc[7]);
    }
}

// Element e of rope(x) for a vector of 2·half values, reading its pair partner from x; cs and sn
// hold one value per pair. Same rotation as rope_pair.
__device__ __forceinline__ float rope_at(const float* x, int e, int half, bool interleaved, const float* cs, const float* sn) {
    bool first = interleaved ? (e & 1) == 0 : e < half;
    int i = interleaved ? e >> 1 : (first ? e : e - half);
    int partner = interleaved ? e ^ 1 : (first ? e + half : e - half);
    return first ? x[e] * cs[i] - x[partner] * sn[i] : x[e] * cs[i] + x[partner] * sn[i];
}

// Asynchronous copy of one float from global to shared memory (cp.async): a loop of these keeps
// every load in flight at once, where a load-then-store loop through a pointer the compiler
// cannot prove distinct from shared memory waits for each load in turn. With `valid` false the
// destination gets a zero and src is not read (it must still be a global address).
__device__ __forceinline__ void copy_async(float* dst, const float* src, bool valid) {
    unsigned d = (unsigned)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(d), "l"(src), "r"(valid ? 4 : 0) : "memory");
}

// Waits for this thread's asynchronous copies (a __syncthreads must follow before others read).
__device__ __forceinline__ void copy_async_wait() { asm volatile("cp.async.wait_all;\n" ::: "memory"); }

// Rotates one pair of a rope vector in place.
__device__ __forceinline__ void rope_pair(float* x, int i, int half, bool interleaved, float c, float s) {
    int a = interleaved ? 2 * i : i;
    int b = interleaved ? 2 * i + 1 : i + half;
    float xa = x[a], xb = x[b];
    x[a] = xa * c - xb * s;
    x[b] = xb * c + xa * s;
}

// ---- paged caches -----------------------------------------------------------------------------
// A cache slot is a pool of blocks of CACHE_BLOCK positions, each `width` floats. A step carries
// per row its position and its sequence's row of the block table.
#define CACHE_BLOCK 64

struct StepMeta {
    const int* pos;        // [T] position of each row
    const int* row_seq;    // [T] index of the row's sequence in the block table
    const int* blocks;     // [n_seq, max_blocks] block ids
    int max_blocks;
};

__device__ __forceinline__ float* cache_row(float* pool, int width, const int* blocks, int max_blocks, int seq, int p) {
    int b = blocks[seq * max_blocks + p / CACHE_BLOCK];
    return pool + ((size_t)b * CACHE_BLOCK + (p % CACHE_BLOCK)) * width;
}

// ---- weights -----------------------------------------------------------------------------------
enum { FMT_F32 = 0, FMT_BF16 = 1, FMT_F16 = 2, FMT_FP8 = 3, FMT_INT4 = 4, FMT_INT8 = 5 };

// Everything a kernel needs to read one weight matrix. Mirrored by `WDesc` in
// src/backend/cuda/weights.rs.
struct WDesc {
    const void* w;            // raw weight: f32/bf16/f16 elements, e4m3 bytes, or int32 words
    const float* scale;       // fp8: [ceil(rows/br), sc] block scales; int: [rows, sc] group scales
                              // when scale16 is null
    const u16* scale16;       // int: [rows, sc] group scales as f16 bits of scale·2^scale_exp, when
                              // every one is exact so (the checkpoints' bf16 and f16 scales): half
                              // the bytes of f32, as the checkpoint stores them
    const signed char* zero;  // int: [rows, sc] zero points, or null when symmetric
    const u16* scale_zero16;  // INT4 with zero points and at most 2 groups a 128-column chunk, for
                              // linear_mma.cu's tensor-core kernels: [rows, 2·sc] halves, each
                              // chunk's scale16 values then its zero points as f16 −16·zp
    int rows, cols;
    int br, bc;               // fp8 block shape
    int group;                // int group size
    int sc;                   // scale columns
    int vec;                  // 1 when rows can be read in whole 16-byte units
    int mma;                  // 1 when the tensor-core kernels of linear_mma.cu can read it
    int interleaved;          // INT4: G > 0 when each 64-byte piece of a row holds its words in
                              // lane order for G groups per 128 columns (int4_word); INT8: 1
                              // when stored in the planes' order (int8_pos); for linear_mma.cu
    int scale_exp;            // see scale16
};

// Where byte b of row r of a weight with rb bytes a row is stored: in place, or (mma, the
// tensor-core kernels' layout: linear_mma.cu, RowCursor) with every 16 rows stored as their
// 64-byte pieces in piece order, piece q of the 16 rows at q·1 KB and row j's at 64j within it,
// so a warp's loads of a chunk's 8 rows read 512 contiguous bytes.
__device__ __forceinline__ size_t wbyte(const WDesc& d, int r, size_t b, size_t rb) {
    if (!d.mma) return (size_t)r * rb + b;
    return (size_t)(r >> 4) * 16 * rb + (b >> 6) * 1024 + (size_t)(r & 15) * 64 + (b & 63);
}

// 2^k for |k| ≤ 126, exactly.
__device__ __forceinline__ float pow2(int k) { return __int_as_float((127 + k) << 23); }

// Group scale i of an integer weight (row-major [rows, sc]), from whichever table it has.
__device__ __forceinline__ float int_scale(const WDesc& d, size_t i) {
    return d.scale16 ? f16_to_f32(d.scale16[i]) * pow2(-d.scale_exp) : d.scale[i];
}

// Where word w of an INT4 row is stored: in place, or (interleaved, G groups of 128 / G columns
// per 64-byte piece) as four lanes' words: lane c's word j, at 4c + j, is the piece's word
// s·16/G + c·4/G + j % (4/G) with s = j / (4/G), so each lane's words of one group are
// consecutive columns (G = 4: the piece's 4x4 words transposed). weights.rs permute_int4 makes it.
__device__ __forceinline__ int int4_word(const WDesc& d, int w) {
    int G = d.interleaved;
    if (!G) return w;
    int wi = w & 15, per = 4 / G, span = 16 / G, s = wi / span, rem = wi % span;
    return (w & ~15) | (4 * (rem / per) + s * per + rem % per);
}

// Where column c of an INT8 row is stored: in place, or (interleaved, for linear_mma.cu's INT8
// tile) with each 8 columns in the order 0 2 4 6 1 3 5 7 (plane_pos there) and as two's
// complement (the checkpoint's offset-binary byte ^ 0x80).
__device__ __forceinline__ int int8_pos(const WDesc& d, int c) {
    return d.interleaved ? (c & ~7) | ((c & 1) << 2) | ((c >> 1) & 3) : c;
}

// The upload stores every INT4 nibble n as n ^ 8, the signed q = n − 8 in two's complement,
// which the tensor-core kernels read as int8 without an XOR (int4_s8); the CUDA-core readers
// take words back to the checkpoint's unsigned nibbles with this.
__device__ __forceinline__ u32 int4_unsigned(u32 w) { return w ^ 0x88888888u; }

// Word j of a 16-byte load.
__device__ __forceinline__ u32 word(const uint4& v, int j) { return j == 0 ? v.x : j == 1 ? v.y : j == 2 ? v.z : v.w; }

// ---- mixture of experts ------------------------------------------------------------------
// The (token, expert) pairs p = t·K + k of a step are grouped by expert (moe_plan), so each
// expert's weights are read once per step however many tokens chose it. plan layout (ints):
// [0] groups, [1 .. 1+P) expert of each group, [1+P .. 2+2P) group offsets, [2+2P .. 2+3P) pairs.

// Group grp of a plan of P pairs, as a grouped expert kernel's block takes it: its expert (the
// index into the weight tables) and its pairs pairs[first .. end). False when the plan has no
// group grp (a block with nothing to do). All but the pairs are loaded at once (grp is below P,
// so each read lies inside the plan whatever the count; past the count the entries may be
// unwritten, and are read but not used), so a block's weight descriptor and its pairs come two
// dependent loads after the kernel's wait, not four. (The answer reads them all, every group
// of a plan having an expert ≥ 0 and first < end: with the count alone deciding it, the
// compiler put the other loads behind that branch.)
struct PlanGroup {
    int expert, first, end;
    const int* pairs;
};
__device__ __forceinline__ bool plan_group(const int* plan, int P, int grp, PlanGroup& g) {
    int groups = plan[0];
    g.expert = plan[1 + grp];
    g.first = plan[1 + P + grp];
    g.end = plan[2 + P + grp];
    g.pairs = plan + 2 + 2 * P;
    return grp < groups && g.expert >= 0 && g.first < g.end;
}


// ---- programmatic dependent launch -----------------------------------------------------------
// Every kernel is launched so that it may start while the kernel before it on the stream is
// still finishing (CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION). Its first act (after
// asking L2 for weights: prefetch_weights, prefetch_lines) is to wait until that kernel has
// completed and its writes are visible, so no kernel reads an input before it is complete.
// When a kernel lets the next one launch is the PDL_TRIGGER knob:
//   0: at entry, right after the wait;
//   1: only at exit (the implicit trigger);
//   2: after the main loop of the linear kernels (pdl_late), right after the wait in the kernels
//      of a few short blocks (pdl_entry_small, PDL_EARLY), at exit elsewhere.
// At entry, the next kernel's blocks fill the SM slots beside this one's and then those of its
// earliest-finishing blocks, so a one-wave GEMV lands unevenly on the SMs (docs/cuda-backend.md).
// (All are no-ops for a kernel launched without the attribute.)
#ifndef PDL_TRIGGER
#define PDL_TRIGGER 2
#endif
__device__ __forceinline__ void pdl_trigger() { asm volatile("griddepcontrol.launch_dependents;" ::: "memory"); }

// TIMELINE=1 (a diagnostic build: DUET_KERNEL_DEFINES=-DTIMELINE=1, read by `duet bench kernels`,
// src/backend/cuda/timeline.rs): each launch that waits in pdl_entry notes, in its module's
// duet_timeline table (its slot found from %gridid), when its first block arrived at the wait,
// when the wait first and last let a block go (the kernel before it had completed) and how many
// blocks passed, on the device's global timer; a kernel holding a TIMELINE_END object also notes
// when its blocks' first threads last left it (its end), and timeline_phase(k) when a block's
// first thread last passed point k (a short kernel's stages). Every note is a store or an
// atomic whose result is not used (a reduction: no round trip), so a note does not hold its
// thread up (atomics that return, as a claimed slot needs, delayed every block's first thread
// by a round trip, and with it every barrier after). A launch's slot is its grid id's hash
// modulo the slots, not claimed: launches of consecutive ids take distinct slots, and the host
// marks a record whose blocks outnumber its grid (two launches in one slot). The host starts
// each record empty (grid, arrived and first all ones, the rest zeros).
#ifndef TIMELINE
#define TIMELINE 0
#endif
#define TIMELINE_PHASES 4
#if TIMELINE
#define TIMELINE_SLOTS 1024
struct TimelineRec {
    unsigned long long grid, arrived, first, last, end, phase[TIMELINE_PHASES];
    unsigned int gx, gy, bx, blocks;
};
__device__ TimelineRec duet_timeline[TIMELINE_SLOTS];
__device__ __forceinline__ unsigned long long global_ns() {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}
// This launch's record.
__device__ __forceinline__ TimelineRec* timeline_rec() {
    unsigned long long id;
    asm("mov.u64 %0, %%gridid;" : "=l"(id));
    TimelineRec* r = &duet_timeline[(unsigned)(id * 2654435761ull) % TIMELINE_SLOTS];
    r->grid = id;
    return r;
}
__device__ void timeline_note(unsigned long long arrived, unsigned long long passed) {
    TimelineRec* r = timeline_rec();
    atomicMin(&r->arrived, arrived);
    atomicMin(&r->first, passed);
    atomicMax(&r->last, passed);
    atomicAdd(&r->blocks, 1u);
    r->gx = gridDim.x, r->gy = gridDim.y, r->bx = blockDim.x;
}
// k < TIMELINE_PHASES: phase k; TIMELINE_PHASES: the end.
__device__ void timeline_at(int k) {
    unsigned long long now = global_ns();
    TimelineRec* r = timeline_rec();
    atomicMax(k < TIMELINE_PHASES ? &r->phase[k] : &r->end, now);
}
struct TimelineEnd {
    __device__ ~TimelineEnd() {
        if (threadIdx.x == 0) timeline_at(TIMELINE_PHASES);
    }
};
#define TIMELINE_END TimelineEnd timeline_end_
__device__ __forceinline__ void timeline_phase(int k) {
    if (threadIdx.x == 0) timeline_at(k);
}
#else
#define TIMELINE_END
__device__ __forceinline__ void timeline_phase(int) {}
#endif

__device__ __forceinline__ void pdl_entry() {
#if TIMELINE
    unsigned long long arrived = global_ns();
#endif
    asm volatile("griddepcontrol.wait;" ::: "memory");
#if TIMELINE
    if (threadIdx.x == 0) timeline_note(arrived, global_ns());
#endif
    if (PDL_TRIGGER == 0) pdl_trigger();
}
// pdl_entry for a kernel that needs nothing of the kernel before it on its stream (the second
// wave of a one-token MoE block's gate/up, moe.rs): no wait; the timeline still notes it (its
// arrival is its release).
__device__ __forceinline__ void pdl_nowait() {
#if TIMELINE
    if (threadIdx.x == 0) {
        unsigned long long now = global_ns();
        timeline_note(now, now);
    }
#endif
    if (PDL_TRIGGER == 0) pdl_trigger();
}
__device__ __forceinline__ void pdl_late() {
    if (PDL_TRIGGER == 2) pdl_trigger();
}
// Kernels of a few short blocks (norms, splits, the router, plans, combines) let the next kernel
// launch right after their wait: its blocks take the SMs these leave idle and a GEMV asks L2
// for its first weights (prefetch_weights, prefetch_lines) while this kernel runs. (INT4 MoE
// block at one token +1-3 points; PDL_EARLY=0 to compare, performance.md.)
#ifndef PDL_EARLY
#define PDL_EARLY 1
#endif
__device__ __forceinline__ void pdl_entry_small() {
    pdl_entry();
    if (PDL_EARLY && PDL_TRIGGER != 0) pdl_trigger();
}

// Asks L2 for up to PDL_PREFETCH bytes at p (16-byte aligned; 0 turns it off), from one thread
// of the block, without waiting. The tensor-core GEMVs call it for the first weights they will
// read before their wait (the CUDA-core GEMV asks in lines: GEMV_LINE_PREFETCH in linear.cu):
// weights depend on no kernel, so they stream in while the kernel before finishes (FP8/INT8
// 6144->2048 54 -> 62% of the copy bandwidth). Only the first block of each SM's worth asks:
// the blocks that start before the wait ends. When every block made this bulk request for its
// first tile, the GEMVs of several waves lost 8-20 points (the expert down projection at 2-4
// tokens, bf16 6144->2048), and asking in the expert down projection did too (performance.md).
#ifndef PDL_PREFETCH
#define PDL_PREFETCH 32768
#endif
// Asks L2 for the n bytes at p (rounded down to 16; nothing unless p is 16-byte aligned), from
// the calling thread, without waiting.
__device__ __forceinline__ void l2_prefetch(const void* p, size_t n) {
    u32 len = (u32)n & ~15u;
    if (len != 0 && ((size_t)p & 15) == 0) asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(p), "r"(len) : "memory");
}
// Asks L2 for the n bytes at p in 128-byte lines, thread t of `threads` asking for lines t,
// t + threads, ... (the load units' requests, many in flight, where l2_prefetch is one bulk
// request), without waiting.
__device__ __forceinline__ void prefetch_lines(const void* p, size_t n, size_t t, size_t threads) {
    for (size_t off = t * 128; off < n; off += threads * 128) asm volatile("prefetch.global.L2 [%0];" ::"l"((const char*)p + off));
}
__device__ __forceinline__ void prefetch_weights(const void* p, size_t bytes) {
    if (PDL_PREFETCH == 0 || threadIdx.x != 0) return;
    u32 sms;
    asm("mov.u32 %0, %%nsmid;" : "=r"(sms));
    if (blockIdx.x + (size_t)gridDim.x * (blockIdx.y + (size_t)gridDim.y * blockIdx.z) >= sms) return;
    l2_prefetch(p, min(bytes, (size_t)PDL_PREFETCH));
}
