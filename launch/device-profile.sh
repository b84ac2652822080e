#!/usr/bin/env bash
# Runs on the GPU machine: Nsight Compute on the first launches of the kernels named by the
# regex (default: the decode-critical ones), while `duet bench kernels` drives them.
#   usage: launch/device-profile.sh [KERNEL_REGEX] [BENCH_PARTS]
set -uo pipefail
cd "$(dirname "$0")/.."
source launch/cuda-env.sh
OUT=${OUT:-/tmp/duet-out}
mkdir -p "$OUT"
regex=${1:-"index_topk|index_scores|gemv1_fp8|gemv1_int4|gemv1_bf16|moe_gate_up1_fp8|moe_down1_fp8|moe_gate_up1_int4|mla_attend_split|mla_queries|mla_values"}
parts=${2:-gemv,experts,mla}
ncu --clock-control none -k "regex:$regex" --launch-count 14 \
    --section SpeedOfLight --section LaunchStats --section Occupancy --section MemoryWorkloadAnalysis \
    ./target/release/duet bench kernels --only "$parts" --reps 3 > "$OUT/ncu.txt" 2>&1
grep -E "^  [a-z_0-9]+.*\(|Duration|DRAM Throughput|Memory Throughput|Compute \(SM\) Throughput|Registers Per Thread|Achieved Occupancy|Block Size|Grid Size|Dynamic Shared" "$OUT/ncu.txt" | sed 's/  */ /g'
