#!/usr/bin/env python3
"""Turns `duet bench kernels` output into docs/performance.md's kernel table (markdown).

    python3 launch/kernels-table.py kernels.txt

Rows keep their order; a MoE block row gets its floor multiple (the inverse of its fraction),
the indented rows under a block or an experts row fold into one line each, and the sampling
rows (a time, no bytes) keep their time."""
import re
import sys

ROW = re.compile(r"^(\S.*?)\s+([\d.]+) µs\s+([\d.]+) GB/s\s+([\d.]+)%$")
SPLIT = re.compile(r"^\s+(?:add \+ )?norm ([\d.]+) \+ router ([\d.]+) µs alone; the rest\s+([\d.]+) µs$")
ALONE = re.compile(r"^\s+(gate/up|down) GEMV alone, .*?\s+([\d.]+) µs\s+[\d.]+ GB/s\s+([\d.]+)%$")
TIME = re.compile(r"^(pick from .*?)\s+([\d.]+) µs$")


def main(path):
    print("| kernel | time | GB/s | % of peak |")
    print("|---|---|---|---|")
    pending = {}

    def flush():
        if "gate/up" in pending and "down" in pending:
            (gt, gp), (dt, dp) = pending["gate/up"], pending["down"]
            print(f"| (gate/up / down alone) | {gt} / {dt} µs | | {gp} / {dp}% |")
        else:
            for name, (t, p) in pending.items():
                print(f"| ({name} alone) | {t} µs | | {p}% |")
        pending.clear()

    for line in open(path, encoding="utf-8"):
        line = line.rstrip("\n")
        if m := ALONE.match(line):
            pending[m.group(1)] = (m.group(2), m.group(3))
            continue
        flush()
        if m := TIME.match(line):
            print(f"| {m.group(1)} | {m.group(2)} µs | | |")
        elif m := SPLIT.match(line):
            print(f"| (alone: add + norm {m.group(1)} µs, router {m.group(2)} µs; the rest {m.group(3)} µs) | | | |")
        elif (m := ROW.match(line)) and not line.startswith("device copy"):
            label, us, gbs, pct = m.groups()
            if label.startswith("moe layer"):
                label = "MoE block" + label[len("moe layer"):]
                pct = f"{pct}% ({100 / float(pct):.2f}x floor)"
            else:
                pct += "%"
            print(f"| {label} | {us} µs | {gbs} | {pct} |")
    flush()


if __name__ == "__main__":
    main(sys.argv[1])
