#!/usr/bin/env bash
# Runs on the GPU machine: `duet bench kernels --only PART` once per tuning configuration and
# prints the rows matching FILTER for each, so one device call compares several settings.
# A configuration is a line of environment assignments, for example
#   DUET_MMA_WARPS=4
#   DUET_KERNEL_DEFINES="-DINT4_UNR_ASYM=2 -DINT4_REGS=96"
# (kernels/linear_mma.cu lists the tuning constants; DUET_MMA_WARPS forces the warps of its blocks;
# DUET_BIN=PATH runs another build, for example the previous commit's carried beside this one.)
#   usage: launch/device-sweep.sh PART FILTER < configs
# Prepared configuration lists are in launch/sweeps/, for example
#   bash launch/device-sweep.sh gemv,experts 'gemv|experts|moe layer' < launch/sweeps/l2-fetch.txt
# (They stay as the records of the sweeps docs/performance.md cites: a setting an old list names
# may since have been removed, with the losers of its sweep; the commit of its table has it.)
# launch/sweep-table.py turns the output into one markdown table (a column per configuration).
# CHECK=1 also runs `duet bench check` under each configuration first and prints its verdict
# (about 30 s each), for settings that change what the kernels compute.
set -uo pipefail
cd "$(dirname "$0")/.."
source launch/cuda-env.sh
part=$1 filter=$2
while IFS= read -r cfg; do
    [ -z "$cfg" ] && continue
    echo "== ${cfg}"
    if [ -n "${CHECK:-}" ]; then
        env -S "$cfg" timeout 150 sh -c '"${DUET_BIN:-./target/release/duet}" "$@"' duet bench check --fixtures tests/fixtures 2>&1 | tail -1 | sed 's/^/check: /'
    fi
    env -S "$cfg" timeout 120 sh -c '"${DUET_BIN:-./target/release/duet}" "$@"' duet bench kernels --only "$part" 2>&1 | grep -E "$filter"
done
