"""Time and peak memory of the BatchNorm statistics check and of recalibration on a ResNet-50
(`python -m bench.bn_statistics [--images 64]`): the hand-written ResNet-50 of bench/families.py
at 224x224 with realistic statistics, exported with its BNs, checked on uniform random images in
[-2, 2] (the distribution its statistics were estimated on). Each stage runs in its own child
process so that its peak RSS is its own."""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _child(stage: str, model: str, n: int) -> None:
    import onnx

    from bnfold.toolchain.bnstats import check_statistics, recalibrate

    proto = onnx.load(model)
    x = np.random.default_rng(1).uniform(-2, 2, (n, 3, 224, 224)).astype(np.float32)
    start = time.perf_counter()
    if stage == "check":
        result = check_statistics(proto, "image", x, f"{n} random images")
        extra = {"flagged": result.flagged, "layers": len(result.layers)}
    else:
        recalibrate(proto, "image", x)
        extra = {}
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"stage": stage, "seconds": seconds, "peak_rss_mib": peak, **extra}))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--child", nargs=2, metavar=("STAGE", "MODEL"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        _child(args.child[0], args.child[1], args.images)
        return 0
    from bench.families import export_torch

    with tempfile.TemporaryDirectory() as tmp:
        model = str(Path(tmp) / "resnet50.onnx")
        export_torch("resnet50", Path(model), 224, 1.0, None)
        for stage in ("check", "recalibrate"):
            cmd = [sys.executable, "-m", "bench.bn_statistics", "--images", str(args.images),
                   "--child", stage, model]  # fmt: skip
            print(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
