#!/usr/bin/env python3
"""Kernels whose machine code issues a global load after a global store several times: a sign
that the compiler kept loads behind stores they might alias, so that a kernel waits a memory
round trip per store instead of one for all its loads (how the add + norm read its row in eight
round trips until e900948). Without a GPU: compiles kernels/NAME.cu as duet does
(launch/kernel-regs.py --cubin) and reads its SASS with cuobjdump.

    python3 launch/sass-stores.py                  # every module, kernels with 3 or more
    python3 launch/sass-stores.py linear_mma --least 1 --show rms_norm_split

cuobjdump and nvdisasm come from PATH or the pip wheels nvidia-cuda-cuobjdump (13.2.51) and
nvidia-cuda-nvdisasm; libnvrtc as for kernel-regs.py.
"""
import argparse
import glob
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULES = ["linear", "linear_mma", "elementwise", "attention"]


def tool_path():
    """PATH with the pip wheels' CUDA binaries (cuobjdump, nvdisasm) added."""
    dirs = []
    try:
        import nvidia

        dirs = [os.path.join(p, "cu13", "bin") for p in nvidia.__path__]
    except ImportError:
        pass
    return os.pathsep.join(dirs + [os.environ.get("PATH", "")])


def sass(module, defines):
    with tempfile.TemporaryDirectory() as d:
        cubin = os.path.join(d, module + ".cubin")
        subprocess.run([sys.executable, os.path.join(ROOT, "launch", "kernel-regs.py"), module, *defines, "--cubin", cubin], check=True, stdout=subprocess.DEVNULL)
        env = dict(os.environ, PATH=tool_path())
        return subprocess.run(["cuobjdump", "-sass", cubin], check=True, capture_output=True, text=True, env=env).stdout


def functions(text):
    """(name, [(op, line)]) per function: op 'L' for a global load, 'S' for a global store."""
    name, ops = None, []
    for line in text.splitlines():
        m = re.search(r"Function : (\S+)", line)
        if m:
            if name:
                yield name, ops
            name, ops = m.group(1), []
        elif re.search(r"\bLDG\.", line):
            ops.append(("L", line.strip()))
        elif re.search(r"\bSTG\.", line):
            ops.append(("S", line.strip()))
    if name:
        yield name, ops


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("modules", nargs="*", default=MODULES)
    ap.add_argument("--least", type=int, default=3, help="report kernels with at least this many load-after-store steps")
    ap.add_argument("--show", help="print the global loads and stores of kernels matching this regex")
    ap.add_argument("-D", dest="defines", action="append", default=[], help="a -D define passed to the compile (NAME=VALUE)")
    args = ap.parse_args()
    defines = ["-D" + d for d in args.defines]
    for module in args.modules:
        for name, ops in functions(sass(module, defines)):
            steps = sum(1 for a, b in zip(ops, ops[1:]) if a[0] == "S" and b[0] == "L")
            if steps >= args.least:
                print(f"{module:12s} {name:45s} {steps:3d} loads after a store")
            if args.show and re.search(args.show, name):
                for op, line in ops:
                    print(f"    {op} {line}")


if __name__ == "__main__":
    main()
