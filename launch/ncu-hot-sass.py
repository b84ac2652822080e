#!/usr/bin/env python3
"""The instructions with the most warp-stall samples in an Nsight Compute source page.

Reads `ncu -i REPORT --page source --csv --print-source sass` output and prints the top N
instructions by their "Warp Stall Sampling (All Samples)" column, with their share of all
samples and the other sampling columns, so a device run brings back where a kernel waits
without the report viewer. If the columns are not found it prints the header it did find.
    usage: launch/ncu-hot-sass.py SASS_CSV [N]
"""
import csv
import sys


def main():
    path, top = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 30
    with open(path, newline="", errors="replace") as f:
        rows = list(csv.reader(f))
    # ncu may print notes before the table: the header is the first row naming a Source column.
    start = next((i for i, r in enumerate(rows) if any(c.strip() == "Source" for c in r)), None)
    if start is None:
        print(f"{path}: no Source column; first lines:", *rows[:5], sep="\n  ")
        return
    head = rows[start]
    col = {name.strip(): i for i, name in enumerate(head)}
    samples = next((i for name, i in col.items() if name.startswith("Warp Stall Sampling (All")), None)
    if samples is None:
        print(f"{path}: no stall-sampling column; columns: {', '.join(col)}")
        return
    others = [i for name, i in col.items() if "Sampling" in name and i != samples]

    def num(r, i):
        try:
            return float(r[i].replace(",", ""))
        except (IndexError, ValueError):
            return 0.0

    body = [r for r in rows[start + 1:] if len(r) == len(head)]
    total = sum(num(r, samples) for r in body) or 1.0
    print(f"{len(body)} instructions, {total:.0f} stall samples; top {top}:")
    for r in sorted(body, key=lambda r: -num(r, samples))[:top]:
        extra = " ".join(f"{head[i].strip()}={r[i]}" for i in others)
        addr = r[col["Address"]] if "Address" in col else ""
        print(f"{100 * num(r, samples) / total:5.1f}%  {addr:>6}  {r[col['Source']].strip():<60} {extra}")


if __name__ == "__main__":
    main()
