#!/usr/bin/env python3
"""Compares two fixture folders made by make_fixtures.py (e.g. the committed ones against a rerun
on another machine): identical checkpoints, expected logits within f32 rounding, same tokens."""
import hashlib
import os
import sys

from safetensors.torch import load_file


def digest(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def main(a, b):
    bad = 0
    for variant in sorted(os.listdir(a)):
        da, db = os.path.join(a, variant), os.path.join(b, variant)
        if not os.path.isdir(da):
            continue
        for f in sorted(os.listdir(da)):
            if f.startswith("model") and f.endswith(".safetensors"):
                same = digest(os.path.join(da, f)) == digest(os.path.join(db, f))
                bad += not same
                print(f"{variant}/{f}: {'identical' if same else 'DIFFERENT'}")
        ea, eb = load_file(os.path.join(da, "expected.safetensors")), load_file(os.path.join(db, "expected.safetensors"))
        for k in ("logits", "mtp_logits"):
            d = (ea[k] - eb[k]).abs().max().item()
            bad += d > 1e-4
            print(f"{variant} {k}: max |diff| {d:.2e}")
        same = ea["greedy_ids"].tolist() == eb["greedy_ids"].tolist()
        bad += not same
        print(f"{variant} greedy ids: {'identical' if same else 'DIFFERENT'}")
    print("fixtures reproduce" if not bad else f"{bad} differences")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
