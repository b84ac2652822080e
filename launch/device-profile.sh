#!/usr/bin/env bash
# Runs on the GPU machine: Nsight Compute on one launch of each kernel whose name matches while
# `duet bench kernels` drives it; prints the key figures per kernel, full reports in $OUT.
#   usage: launch/device-profile.sh [REGEX:BENCH_PART[:INVOCATION] ...]
# INVOCATION (default 1) counts launches of each matching kernel name, so for example
# 'index_scores|topk_.*:mla:3' profiles the indexer at the bench's third (128K) context.
# CASE='experts int4 8/token x1' runs only the bench rows whose label contains it (`--case`), so
# the first launch is that row's. SOURCE=1 collects the full set with source correlation and
# prints the instructions with the most stall samples and each kernel's stall reasons
# (launch/ncu-hot-sass.py), for example
#   CASE='experts int4 8/token x1' SOURCE=1 bash launch/device-profile.sh 'moe_gate_up_mma_g128a2_int4:experts'
set -uo pipefail
cd "$(dirname "$0")/.."
source launch/cuda-env.sh
OUT=${OUT:-/tmp/duet-out}
mkdir -p "$OUT"
targets=${*:-"index_scores|topk_.*:mla:3 mla_.*:mla:2 moe_.*_fp8:experts gemv1_fp8:gemv gemv1_int4:gemv"}
case_args=()
[ -n "${CASE:-}" ] && case_args=(--case "$CASE")
n=0
for t in $targets; do
    IFS=: read -r k part inv <<<"$t"
    n=$((n + 1))
    bench=(./target/release/duet bench kernels --only "$part" "${case_args[@]}" --reps 2)
    filter=(--clock-control none --kernel-id "::regex:^($k)\$:${inv:-1}")
    echo "== $k ($part, launch ${inv:-1}${CASE:+, case $CASE})"
    if [ -n "${SOURCE:-}" ]; then
        ncu "${filter[@]}" --set full --import-source yes -f -o "$OUT/ncu-$n" "${bench[@]}" > "$OUT/ncu-$n.log" 2>&1
        ncu -i "$OUT/ncu-$n.ncu-rep" --page details --print-details all > "$OUT/ncu-$n.txt" 2>&1
        ncu -i "$OUT/ncu-$n.ncu-rep" --page source --csv --print-source sass > "$OUT/ncu-$n-sass.csv" 2>&1
        grep -E "Duration|DRAM Throughput|L1/TEX Cache Throughput|L2 Cache Throughput|Mem Pipes Busy|Registers Per Thread|Achieved Occupancy|Grid Size|Block Size|Issue Slots Busy|L1/TEX Hit|Stall" "$OUT/ncu-$n.txt" | sed 's/  */ /g' | head -40
        python3 launch/ncu-hot-sass.py "$OUT/ncu-$n-sass.csv" 30
    else
        ncu "${filter[@]}" \
            --section SpeedOfLight --section LaunchStats --section Occupancy --section MemoryWorkloadAnalysis --section WarpStateStats --section ComputeWorkloadAnalysis --section InstructionStats \
            "${bench[@]}" > "$OUT/ncu-$n.txt" 2>&1
        grep -E "^  [a-z_0-9]+ |Duration|DRAM Throughput|L1/TEX Cache Throughput|L2 Cache Throughput|Mem Pipes Busy|Compute \(SM\) Throughput|Registers Per Thread|Achieved Occupancy|Grid Size|Block Size|Local Memory Spilling|Stall|Issue Slots Busy|Executed Ipc A" "$OUT/ncu-$n.txt" | sed 's/  */ /g'
    fi
done
# The device tool brings back at most 8 files: the reports (without the large .ncu-rep) go back
# as one archive, ncu.tgz.
rm -f "$OUT"/ncu-*.ncu-rep
if ls "$OUT"/ncu-* >/dev/null 2>&1; then
    (cd "$OUT" && tar czf ncu.tgz ncu-* && rm -f ncu-*)
fi
