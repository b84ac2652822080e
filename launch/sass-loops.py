#!/usr/bin/env python3
"""The loops of a kernel's SASS with their instruction mix: how many instructions a hot loop
spends per tensor-core multiply, without a GPU.

Reads `cuobjdump -sass` output (a file or stdin) and prints each innermost loop (a backward
branch over at most 2000 instructions) that holds MMA instructions: its size and its counts of
MMA, weight loads (LDG.E.NA), all loads, compares, integer address arithmetic and register
zeroing (CS2R), the things that separate a lean loop from a busy one.
    python3 launch/kernel-regs.py linear_mma -DMMA_RUNS=1 --cubin /tmp/mma.cubin
    cuobjdump -sass -fun moe_gate_up_mma_g128a2_int4 /tmp/mma.cubin | python3 launch/sass-loops.py
(cuobjdump and nvdisasm: the nvidia-cuda-cuobjdump and nvidia-cuda-nvdisasm wheels.)
"""
import re
import sys


def main():
    text = open(sys.argv[1]).read() if len(sys.argv) > 1 else sys.stdin.read()
    ins = []
    for line in text.splitlines():
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if m:
            ins.append((int(m.group(1), 16), m.group(2).strip()))
    at = {a: i for i, (a, _) in enumerate(ins)}
    for i, (a, op) in enumerate(ins):
        m = re.search(r"BRA (?:!?U?P\w+, )?0x([0-9a-f]+)", op)
        if not m or int(m.group(1), 16) >= a or int(m.group(1), 16) not in at:
            continue
        body = [x for _, x in ins[at[int(m.group(1), 16)] : i + 1]]
        if len(body) > 2000:
            continue
        count = lambda p: sum(1 for x in body if re.search(p, x))
        mma = count(r"MMA")
        if mma:
            print(f"{int(m.group(1), 16):#x}-{a:#x}: {len(body)} instructions, MMA {mma}, weight loads {count('LDG.E.NA')}, "
                  f"loads {count('LDG')}, compares {count('ISETP')}, address {count('IMAD|LEA|IADD3')}, CS2R {count('CS2R')}")


if __name__ == "__main__":
    main()
