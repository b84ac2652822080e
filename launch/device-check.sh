#!/usr/bin/env bash
# Runs on the GPU machine (the `device` tool): the CUDA correctness table against the CPU
# oracle, the kernel benchmarks, and a rerun of the transformers fixture script compared with
# the committed fixtures. Results go to $OUT (or /tmp/duet-out).
#   usage: launch/device-check.sh [check] [kernels] [fixtures] [slice]   (default: the first three)
# slice: the INT4 4-layer GLM-5.2 slice (8 experts, made here) decoding 64 greedy tokens, whose
# hash must stay the same across performance changes (launch/device-decode-sweep.sh).
set -uo pipefail
cd "$(dirname "$0")/.."
source launch/cuda-env.sh
OUT=${OUT:-/tmp/duet-out}
mkdir -p "$OUT"
what=${*:-check kernels fixtures}
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv,noheader
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
status=0
for w in $what; do
    case $w in
        check) ./target/release/duet bench check --fixtures tests/fixtures 2>&1 | tee "$OUT/check.txt" || status=1 ;;
        kernels) ./target/release/duet bench kernels 2>&1 | tee "$OUT/kernels.txt" || status=1 ;;
        fixtures)
            PYTHONUNBUFFERED=1 python3 tests/reference/make_fixtures.py --out "$OUT/fixtures" 2>&1 | tee "$OUT/fixtures.txt" || status=1
            python3 tests/reference/compare_fixtures.py tests/fixtures "$OUT/fixtures" 2>&1 | tee -a "$OUT/fixtures.txt" || status=1
            rm -rf "$OUT/fixtures" ;;
        slice)
            [ -f /tmp/glm52-int4/config.json ] || ./target/release/duet tiny --shape glm52 --layers 4 --experts 8 --quant int4-fp8mtp --out /tmp/glm52-int4 >/dev/null || status=1
            printf 'DUET_SWEEP=default\n' | SLICE=/tmp/glm52-int4 ROUNDS=1 bash launch/device-decode-sweep.sh 2>&1 | tee "$OUT/slice.txt" || status=1 ;;
    esac
done
exit $status
