#!/usr/bin/env python3
"""Registers and spills of duet's kernels as ptxas reports them, through NVRTC, without a GPU.

Compiles kernels/NAME.cu as duet does (kernels/common.cuh prepended, sm_90a) with
`--ptxas-options=-v` and any -D tuning defines, and prints each entry point's registers and spill
bytes: a quick check that a tuning setting (chunks in flight, row tiles) fits its register cap
before spending device time on it.

    python3 launch/kernel-regs.py linear_mma -DINT4_UNR_ASYM=4 --filter int4
    python3 launch/kernel-regs.py linear_mma --cubin /tmp/mma.cubin && cuobjdump -sass /tmp/mma.cubin

libnvrtc comes from LD_LIBRARY_PATH or the nvidia-cuda-nvrtc wheel (as in .ci/run).
"""
import argparse
import ctypes
import glob
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def nvrtc():
    """libnvrtc, with its builtins library loaded first (NVRTC opens it by name, and a library
    already loaded is found whatever the search path)."""
    dirs = [d for d in os.environ.get("LD_LIBRARY_PATH", "").split(":") if d]
    try:
        import nvidia

        dirs += [os.path.join(p, "cu13", "lib") for p in nvidia.__path__]
    except ImportError:
        pass
    for d in dirs:
        libs = sorted(glob.glob(os.path.join(d, "libnvrtc.so*")))
        if not libs:
            continue
        for b in sorted(glob.glob(os.path.join(d, "libnvrtc-builtins.so*"))):
            ctypes.CDLL(b, mode=ctypes.RTLD_GLOBAL)
        return ctypes.CDLL(libs[0])
    sys.exit("libnvrtc not found: pip install nvidia-cuda-nvrtc==13.0.88, or set LD_LIBRARY_PATH")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("module", help="kernels/MODULE.cu, e.g. linear_mma; -DNAME=VALUE defines may follow")
    ap.add_argument("--filter", default="", help="only entry points matching this regex")
    ap.add_argument("--cubin", help="also write the cubin here (for cuobjdump -sass, from the nvidia-cuda-cuobjdump wheel)")
    args, rest = ap.parse_known_args()
    args.defines = [d for d in rest if d.startswith("-D")]
    if len(args.defines) != len(rest):
        sys.exit(f"only -DNAME=VALUE defines may follow the module: {rest}")
    lib = nvrtc()
    common = open(os.path.join(ROOT, "kernels", "common.cuh")).read()
    src = common + f'\n#line 1 "{args.module}.cu"\n' + open(os.path.join(ROOT, "kernels", args.module + ".cu")).read()
    prog = ctypes.c_void_p()
    if lib.nvrtcCreateProgram(ctypes.byref(prog), src.encode(), args.module.encode(), 0, None, None) != 0:
        sys.exit("nvrtcCreateProgram failed")
    opts = ["--std=c++17", "--gpu-architecture=sm_90a", "--ptxas-options=-v"] + args.defines
    rc = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*[o.encode() for o in opts]))
    n = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
    buf = ctypes.create_string_buffer(n.value)
    lib.nvrtcGetProgramLog(prog, buf)
    log = buf.value.decode()
    if rc != 0:
        sys.exit(log)
    if args.cubin:
        size = ctypes.c_size_t()
        lib.nvrtcGetCUBINSize(prog, ctypes.byref(size))
        cubin = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetCUBIN(prog, cubin)
        with open(args.cubin, "wb") as f:
            f.write(cubin.raw)
    entry, spills = None, {}
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '(\w+)'", line)
        if m:
            entry = m.group(1)
            continue
        if entry is None or not re.search(args.filter, entry):
            continue
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            spills[entry] = (int(m.group(1)), int(m.group(2)))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            st, ld = spills.get(entry, (0, 0))
            print(f"{entry:40} {int(m.group(1)):4} registers  {st:5} B spill stores  {ld:5} B spill loads")


if __name__ == "__main__":
    main()
