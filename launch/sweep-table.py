#!/usr/bin/env python3
"""One markdown table from the output of launch/device-sweep.sh: a row per benchmark row, a
column per configuration (in the order they ran; a repeated configuration gets its round
number), each cell the row's "% of copy bandwidth" (or its time when it has none).

Indented rows (each grouped GEMV alone, under its experts row; a MoE block's norm and router)
are named after the row above them, so the same sub-row of two formats stays apart.

    bash launch/device-sweep.sh gemv,experts 'gemv|experts|alone' < launch/sweeps/x.txt > out.txt
    python3 launch/sweep-table.py out.txt [FILTER]

FILTER (a regular expression) keeps only the rows whose name matches it.
"""
import re
import sys

ROW = re.compile(r"^(\s*)(\S.*?)\s{2,}([\d.]+) µs(?:\s+[\d.]+ GB/s\s+([\d.]+)%)?")
NORM_ROUTER = re.compile(r"(?:add \+ )?norm ([\d.]+) \+ router ([\d.]+) µs alone; the rest")


def main():
    path = sys.argv[1]
    keep = re.compile(sys.argv[2]) if len(sys.argv) > 2 else None
    configs, cells, order = [], {}, []
    parent = ""
    with open(path, errors="replace") as f:
        for line in f:
            line = line.rstrip("\n")
            if line.startswith("== "):
                name = line[3:].strip()
                rounds = sum(1 for c in configs if c.split(" (round")[0] == name)
                configs.append(f"{name} (round {rounds + 1})" if rounds else name)
                continue
            m = ROW.match(line)
            if not m or not configs:
                continue
            indent, label, time, pct = m.groups()
            # A MoE block's "norm N + router R µs alone; the rest" row: its numbers in the cell.
            nr = NORM_ROUTER.match(label.strip())
            if nr:
                label, pct, time = "norm + router alone; the rest", None, f"{nr.group(1)} + {nr.group(2)}; {time}"
            if indent:
                label = f"{parent} / {label.strip()}"
            else:
                parent = label
            if keep and not keep.search(label):
                continue
            if label not in cells:
                cells[label] = {}
                order.append(label)
            cells[label][configs[-1]] = f"{pct}%" if pct else f"{time} µs"
    if not configs:
        sys.exit(f"{path}: no '== configuration' lines (is it launch/device-sweep.sh output?)")
    print("| row | " + " | ".join(configs) + " |")
    print("|---|" + "---|" * len(configs))
    for label in order:
        print(f"| {label} | " + " | ".join(cells[label].get(c, "") for c in configs) + " |")


if __name__ == "__main__":
    main()
