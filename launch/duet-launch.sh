#!/usr/bin/env bash
# Starts one `duet rank` per NUMA node (one per Grace+Hopper module on a GH200 box), each pinned
# to its node and GPU, waits until rank 0's API reports ready, forwards SIGINT/SIGTERM, and stops
# everything as soon as one rank fails. Each rank logs to LOG_DIR/rankN.log.
#
# Usage:
#   launch/duet-launch.sh --model DIR [options] [-- extra args for every rank]
#
# Knobs (flags, or the environment variables in brackets):
#   --model DIR          checkpoint folder                                   [DUET_MODEL]
#   --ranks N            ranks to start (default: NUMA nodes with CPUs, at least 2) [DUET_RANKS]
#   --http ADDR          rank 0's OpenAI API address (default 127.0.0.1:8000) [DUET_HTTP]
#   --port P             QUIC base port; rank r uses P + r (default 29500)   [DUET_PORT]
#   --split L1[,L2..]    first layer of ranks 1.. (default: balanced by bytes) [DUET_SPLIT]
#   --transport T        shm (one host, default) or quic                     [DUET_TRANSPORT]
#   --device D           auto (default), cuda or cpu                         [DUET_DEVICE]
#   --spec-tokens K      MTP draft tokens per step; reserved: only 0 until speculative
#                        decoding lands                                       [DUET_SPEC_TOKENS]
#   --log-dir DIR        per-rank logs (default ./duet-logs)                 [DUET_LOG_DIR]
#   --ready-timeout S    seconds to wait for readiness (default 1800)
#   --duet PATH          the duet binary (default: target/release/duet, else duet on PATH)
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"

model=${DUET_MODEL:-}
ranks=${DUET_RANKS:-}
http=${DUET_HTTP:-127.0.0.1:8000}
port=${DUET_PORT:-29500}
split=${DUET_SPLIT:-}
transport=${DUET_TRANSPORT:-shm}
device=${DUET_DEVICE:-auto}
spec=${DUET_SPEC_TOKENS:-0}
log_dir=${DUET_LOG_DIR:-./duet-logs}
ready_timeout=1800
duet=""
extra=()
while [ $# -gt 0 ]; do
    case $1 in
        --model) model=$2; shift 2 ;;
        --ranks) ranks=$2; shift 2 ;;
        --http) http=$2; shift 2 ;;
        --port) port=$2; shift 2 ;;
        --split) split=$2; shift 2 ;;
        --transport) transport=$2; shift 2 ;;
        --device) device=$2; shift 2 ;;
        --spec-tokens) spec=$2; shift 2 ;;
        --log-dir) log_dir=$2; shift 2 ;;
        --ready-timeout) ready_timeout=$2; shift 2 ;;
        --duet) duet=$2; shift 2 ;;
        --) shift; extra=("$@"); break ;;
        -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
        *) echo "duet-launch: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done
[ -n "$model" ] || { echo "duet-launch: --model is required" >&2; exit 2; }
if [ "$spec" != "0" ]; then
    echo "duet-launch: --spec-tokens $spec: speculative decoding is not available yet; use 0" >&2
    exit 2
fi
if [ -z "$duet" ]; then
    if [ -x "$here/../target/release/duet" ]; then duet="$here/../target/release/duet"; else duet=$(command -v duet || true); fi
fi
[ -x "$duet" ] || { echo "duet-launch: no duet binary (build with cargo build --release, or pass --duet)" >&2; exit 2; }

# NUMA nodes that have CPUs (Grace); GPU-memory nodes without CPUs are skipped.
nodes=()
for n in /sys/devices/system/node/node[0-9]*; do
    [ -r "$n/cpulist" ] && [ -n "$(tr -d '[:space:]' < "$n/cpulist")" ] && nodes+=("${n##*node}")
done
gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
if [ -z "$ranks" ]; then
    ranks=${#nodes[@]}
    [ "$ranks" -ge 2 ] || ranks=2
fi

[ -f "$here/cuda-env.sh" ] && source "$here/cuda-env.sh"
mkdir -p "$log_dir"
run_dir=$(mktemp -d "${TMPDIR:-/tmp}/duet-launch.XXXXXX")
pids=()

stop_all() {
    for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null; done
    sleep 2
    for p in "${pids[@]}"; do kill -KILL "$p" 2>/dev/null; done
    wait 2>/dev/null
    rm -rf "$run_dir"
}
on_signal() {
    echo "duet-launch: stopping the ranks" >&2
    stop_all
    exit 130
}
trap on_signal INT TERM

for ((r = 0; r < ranks; r++)); do
    args=(rank --rank "$r" --world "$ranks" --model "$model" --run-dir "$run_dir" --port "$port"
          --transport "$transport" --device "$device")
    [ -n "$split" ] && args+=(--split "$split")
    if [ "${#nodes[@]}" -ge "$ranks" ]; then args+=(--numa-node "${nodes[$r]}"); fi
    if [ "${gpus:-0}" -ge "$ranks" ]; then args+=(--gpu "$r"); fi
    [ "$r" = 0 ] && args+=(--http "$http")
    DUET_LOG=${DUET_LOG:-info} "$duet" "${args[@]}" "${extra[@]}" > "$log_dir/rank$r.log" 2>&1 &
    pids+=($!)
    echo "duet-launch: rank $r pid ${pids[-1]} -> $log_dir/rank$r.log" >&2
done

# Ready when rank 0 answers /health with 200; a rank that exits first is a failure.
deadline=$((SECONDS + ready_timeout))
until curl -sf "http://$http/health" >/dev/null 2>&1; do
    for i in "${!pids[@]}"; do
        if ! kill -0 "${pids[$i]}" 2>/dev/null; then
            echo "duet-launch: rank $i exited during start-up; see $log_dir/rank$i.log:" >&2
            tail -5 "$log_dir/rank$i.log" >&2
            stop_all
            exit 1
        fi
    done
    if [ $SECONDS -ge $deadline ]; then
        echo "duet-launch: not ready after ${ready_timeout}s" >&2
        stop_all
        exit 1
    fi
    sleep 0.5
done
echo "duet-launch: $ranks ranks ready; OpenAI API on http://$http (duet prompt \"...\" --server http://$http)" >&2

# Run until a rank exits (a failure unless we are stopping) or a signal arrives.
while true; do
    for i in "${!pids[@]}"; do
        if ! kill -0 "${pids[$i]}" 2>/dev/null; then
            wait "${pids[$i]}"; code=$?
            echo "duet-launch: rank $i exited with status $code; stopping the others (see $log_dir/rank$i.log)" >&2
            stop_all
            exit 1
        fi
    done
    sleep 1
done
