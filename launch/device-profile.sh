#!/usr/bin/env bash
# Runs on the GPU machine: Nsight Compute on the first launch of each named kernel while
# `duet bench kernels` drives it; prints the key figures per kernel, full reports in $OUT.
#   usage: launch/device-profile.sh [KERNEL:BENCH_PART ...]
set -uo pipefail
cd "$(dirname "$0")/.."
source launch/cuda-env.sh
OUT=${OUT:-/tmp/duet-out}
mkdir -p "$OUT"
targets=${*:-"index_scores:mla index_topk:mla mla_attend_split:mla moe_gate_up1_fp8:experts moe_down1_fp8:experts gemv1_fp8:gemv gemv1_int4:gemv"}
for t in $targets; do
    k=${t%%:*}; part=${t##*:}
    ncu --clock-control none -k "regex:^$k\$" --launch-count 1 \
        --section SpeedOfLight --section LaunchStats --section Occupancy --section MemoryWorkloadAnalysis --section WarpStateStats \
        ./target/release/duet bench kernels --only "$part" --reps 2 > "$OUT/ncu-$k.txt" 2>&1
    echo "== $k"
    grep -E "Duration|DRAM Throughput|Compute \(SM\) Throughput|Registers Per Thread|Achieved Occupancy|Grid Size|L1/TEX Hit|Mem Busy|Local Memory Spilling|Stall" "$OUT/ncu-$k.txt" | sed 's/  */ /g' | head -14
done
