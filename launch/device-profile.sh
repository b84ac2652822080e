#!/usr/bin/env bash
# Runs on the GPU machine: Nsight Compute on one launch of each kernel whose name matches while
# `duet bench kernels` drives it; prints the key figures per kernel, full reports in $OUT.
#   usage: launch/device-profile.sh [REGEX:BENCH_PART[:INVOCATION] ...]
# INVOCATION (default 1) counts launches of each matching kernel name, so for example
# 'index_scores|topk_.*:mla:3' profiles the indexer at the bench's third (128K) context.
set -uo pipefail
cd "$(dirname "$0")/.."
source launch/cuda-env.sh
OUT=${OUT:-/tmp/duet-out}
mkdir -p "$OUT"
targets=${*:-"index_scores|topk_.*:mla:3 mla_.*:mla:2 moe_.*_fp8:experts gemv1_fp8:gemv gemv1_int4:gemv"}
n=0
for t in $targets; do
    IFS=: read -r k part inv <<<"$t"
    n=$((n + 1))
    ncu --clock-control none --kernel-id "::regex:^($k)\$:${inv:-1}" \
        --section SpeedOfLight --section LaunchStats --section Occupancy --section MemoryWorkloadAnalysis --section WarpStateStats --section ComputeWorkloadAnalysis --section InstructionStats \
        ./target/release/duet bench kernels --only "$part" --reps 2 > "$OUT/ncu-$n.txt" 2>&1
    echo "== $k ($part, launch ${inv:-1})"
    grep -E "^  [a-z_0-9]+ |Duration|DRAM Throughput|Compute \(SM\) Throughput|Registers Per Thread|Achieved Occupancy|Grid Size|Block Size|Local Memory Spilling|Stall|Issue Slots Busy|Executed Ipc A" "$OUT/ncu-$n.txt" | sed 's/  */ /g'
done
