// Does programmatic dependent launch take effect, eagerly and in CUDA graph replays?
// A chain of kernels, each launched with PROGRAMMATIC_STREAM_SERIALIZATION: every kernel
// stamps the global timer when its block 0 starts (before griddepcontrol.wait), when the wait
// returns, and when it ends; a kernel that starts before its predecessor ends launched early.
// Build and run on the GPU machine (nvcc is there; duet itself needs no nvcc):
//   nvcc -O2 -arch=sm_90a -o /tmp/pdl_probe benches/pdl_probe.cu && /tmp/pdl_probe
// "+allocs" puts a stream-ordered allocation and free between the kernels, as duet's operations
// make their outputs; captured, they become graph memory nodes between the kernel nodes. (Moving
// them off the chain after capture is not possible: CUDA refuses to remove edges from a graph
// that holds memory nodes.)
#include <cstdio>
#include <cuda_runtime.h>

#define CHECK(x)                                                                          \
    do {                                                                                  \
        cudaError_t e = (x);                                                              \
        if (e != cudaSuccess) {                                                           \
            fprintf(stderr, "%s: %s\n", #x, cudaGetErrorString(e));                       \
            return 1;                                                                     \
        }                                                                                 \
    } while (0)

__device__ unsigned long long now() {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}

// t[3i]: block 0 starts; t[3i + 1]: its wait returns; t[3i + 2]: it ends (after spin_ns).
__global__ void step(unsigned long long* t, int i, unsigned spin_ns) {
    bool stamp = threadIdx.x == 0 && blockIdx.x == 0;
    if (stamp) t[3 * i] = now();
    asm volatile("griddepcontrol.wait;" ::: "memory");
    if (stamp) t[3 * i + 1] = now();
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
    unsigned long long s = now();
    while (now() - s < spin_ns) {
    }
    __syncthreads();
    if (stamp) t[3 * i + 2] = now();
}

// alloc: a stream-ordered allocation (cudaMallocAsync, as cudarc's alloc) between the kernels.
static cudaError_t chain(cudaStream_t s, unsigned long long* t, int n, int blocks, unsigned spin_ns, bool pdl, bool alloc) {
    for (int i = 0; i < n; i++) {
        if (alloc) {
            void* p;
            cudaError_t e = cudaMallocAsync(&p, 4096, s);
            if (e != cudaSuccess) return e;
            e = cudaFreeAsync(p, s);
            if (e != cudaSuccess) return e;
        }
        cudaLaunchAttribute attr;
        attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
        attr.val.programmaticStreamSerializationAllowed = 1;
        cudaLaunchConfig_t cfg = {};
        cfg.gridDim = dim3(blocks);
        cfg.blockDim = dim3(128);
        cfg.stream = s;
        cfg.attrs = &attr;
        cfg.numAttrs = pdl ? 1 : 0;
        cudaError_t e = cudaLaunchKernelEx(&cfg, step, t, i, spin_ns);
        if (e != cudaSuccess) return e;
    }
    return cudaSuccess;
}

int main() {
    const int n = 8;
    int sms = 0;
    CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
    unsigned long long *d, h[3 * n];
    CHECK(cudaMalloc(&d, sizeof h));
    cudaStream_t s;
    CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    printf("PDL probe: %d kernels of %d blocks x 128 threads, each spinning 20 us; times in us relative to the previous kernel's end\n", n, sms);
    for (int alloc = 0; alloc < 2; alloc++)
        for (int graph = 0; graph < 2; graph++)
            for (int pdl = 0; pdl < 2; pdl++) {
                cudaGraph_t g = nullptr;
                cudaGraphExec_t exec = nullptr;
                if (graph) {
                    CHECK(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
                    CHECK(chain(s, d, n, sms, 20000, pdl, alloc));
                    CHECK(cudaStreamEndCapture(s, &g));
                    CHECK(cudaGraphInstantiate(&exec, g, 0));
                }
                for (int rep = 0; rep < 3; rep++) {  // the last repetition is printed
                    CHECK(cudaMemset(d, 0, sizeof h));
                    if (graph) CHECK(cudaGraphLaunch(exec, s));
                    else CHECK(chain(s, d, n, sms, 20000, pdl, alloc));
                    CHECK(cudaStreamSynchronize(s));
                }
                CHECK(cudaMemcpy(h, d, sizeof h, cudaMemcpyDeviceToHost));
                printf("%-6s %-8s pdl %-3s start:", graph ? "graph" : "eager", alloc ? "+allocs" : "", pdl ? "on" : "off");
                for (int i = 1; i < n; i++) printf(" %+7.2f", ((long long)h[3 * i] - (long long)h[3 * i - 1]) / 1e3);
                printf("   wait returns:");
                for (int i = 1; i < n; i++) printf(" %+6.2f", ((long long)h[3 * i + 1] - (long long)h[3 * i - 1]) / 1e3);
                printf("   total %.1f us\n", (h[3 * n - 1] - h[0]) / 1e3);
                if (graph) {
                    CHECK(cudaGraphExecDestroy(exec));
                    CHECK(cudaGraphDestroy(g));
                }
            }
    return 0;
}
