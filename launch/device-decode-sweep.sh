#!/usr/bin/env bash
# Runs on the GPU machine: decode speed of the real-width GLM-5.2 slice of
# benches/e2e_vs_transformers.py (written once, like that script does) under several settings,
# so one device call compares decode-level switches (graphs, PDL, kept graph buffers, kernels).
# Each configuration is a line of environment assignments, as for launch/device-sweep.sh (DUET_BIN
# runs another build); the
# runs alternate between the configurations, ROUNDS times (default 2).
#   usage: launch/device-decode-sweep.sh < configs
#   for example: bash launch/device-decode-sweep.sh < launch/sweeps/graph-buffers.txt
# TEMPERATURE=T samples at that temperature (seed 1, no top-p or top-k whatever the checkpoint's
# generation_config.json says) instead of greedy picks, for example to
# compare temperature draws on the device and on the host:
#   printf 'DUET_DEVICE_SAMPLING=0\nDUET_DEVICE_SAMPLING=1\n' | TEMPERATURE=1 SLICE=/tmp/glm52-int4 bash launch/device-decode-sweep.sh
# SLICE=DIR takes another checkpoint, for example the INT4 slice as the real GLM INT4 checkpoints
# store it (2 layers of 8 experts took 51 s and 9 GB on the 2-core development machine; docs/performance.md):
#   ./target/release/duet tiny --shape glm52 --layers 4 --experts 32 --quant int4-fp8mtp --out /tmp/glm52-int4
#   SLICE=/tmp/glm52-int4 bash launch/device-decode-sweep.sh < launch/sweeps/graph-buffers.txt
set -uo pipefail
cd "$(dirname "$0")/.."
source launch/cuda-env.sh
slice=${SLICE:-/tmp/glm52-slice}
if [ ! -f "$slice/config.json" ]; then
    python3 -c "import sys; sys.path.insert(0, 'benches'); import e2e_vs_transformers as e; e.build('$slice', 4, 32)" || exit 1
fi
mapfile -t cfgs < <(grep -v '^$')
prompt=$(python3 -c "import random; r = random.Random(1); print(','.join(str(r.randrange(150000)) for _ in range(32)))")
for round in $(seq "${ROUNDS:-2}"); do
    for cfg in "${cfgs[@]}"; do
        out=$(env -S "$cfg" timeout 300 sh -c '"${DUET_BIN:-./target/release/duet}" "$@"' duet generate --model "$slice" --device cuda --prompt-ids "$prompt" \
            --max-new-tokens 64 --temperature "${TEMPERATURE:-0}" --top-p 1 --top-k 0 --seed 1 --ignore-eos --json 2>&1 | tail -1)
        echo "round $round | $cfg | $(python3 -c "import json, sys; j = json.loads(sys.argv[1]); import hashlib; print(f\"{1e3 / j['decode_tok_s']:.3f} ms/token ({j['decode_tok_s']:.1f} tok/s), tokens {hashlib.md5(str(j['token_ids']).encode()).hexdigest()[:8]}\")" "$out" 2>/dev/null || echo "failed: $out")"
    done
done
