"""Engines and precisions in process: onnxruntime and OpenVINO, float32, bf16 and int8, on the
benchmark models (`make bench`; `python -m bench.engines` alone on the committed digits bundle).

For each model: folded.onnx in onnxruntime float32 (the reference), OpenVINO forced to float32,
OpenVINO bf16 where the CPU computes it natively, and the int8 file in onnxruntime and in
OpenVINO. Images/s at batch 1 and at the largest batch of the plan, as the median of rounds in
which the engines take turns (a shared machine's load falls on all of them alike), and each
one's max |logits - onnxruntime float32| relative to the logit scale on the same inputs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from bench.model_exec import latency_stats, ort_session, time_runs
from bnfold.toolchain.engines import OpenVinoSession, bf16_unavailable_reason, cpu_flags

ROUNDS = 3


def sessions(folded: Path, int8: Path | None, threads: int) -> dict[str, object]:
    """label -> a session answering onnxruntime's run(None, feeds)."""
    out = {
        "onnxruntime float32": ort_session(str(folded), "ALL", threads),
        "openvino float32": OpenVinoSession(folded, "float32", threads),
    }
    if bf16_unavailable_reason() is None:
        out["openvino bf16"] = OpenVinoSession(folded, "bf16", threads)
    if int8 is not None and int8.is_file():
        out["onnxruntime int8"] = ort_session(str(int8), "ALL", threads)
        out["openvino int8"] = OpenVinoSession(int8, "float32", threads)
    return out


def measure_model(
    name: str, folded: Path, int8: Path | None, shape: tuple, batches: list[int], seconds: float
) -> list[dict]:
    """One row per engine and batch: median images/s over ROUNDS, and the relative difference."""
    by_label = sessions(folded, int8, threads=0)
    input_name = by_label["onnxruntime float32"].get_inputs()[0].name
    rng = np.random.default_rng(0)
    rows = []
    for batch in batches:
        x = rng.normal(size=(batch, *shape)).astype(np.float32)
        want = by_label["onnxruntime float32"].run(None, {input_name: x})[0]
        scale = max(1.0, float(np.abs(want).max()))
        speeds: dict[str, list[float]] = {label: [] for label in by_label}
        for _ in range(ROUNDS):
            for label, s in by_label.items():
                times = time_runs(lambda s=s, f={input_name: x}: s.run(None, f), seconds)
                speeds[label].append(latency_stats(times, batch)["images_per_s"])
        for label, s in by_label.items():
            got = s.run(None, {input_name: x})[0]
            rows.append(
                {
                    "model": name,
                    "engine": label,
                    "batch": batch,
                    "images_per_s": float(np.median(speeds[label])),
                    "max_rel_diff": float(np.abs(got - want).max()) / scale,
                }
            )
    base = {r["batch"]: r["images_per_s"] for r in rows if r["engine"] == "onnxruntime float32"}
    for r in rows:
        r["vs_onnxruntime_float32"] = r["images_per_s"] / base[r["batch"]]
    return rows


def measure(models: dict, batches: list[int], seconds: float) -> dict:
    """The engines section for the benchmark models (their bundles, int8 included)."""
    rows = []
    for name, model in models.items():
        d = model.bundle_dir
        rows += measure_model(
            name, d / "folded.onnx", d / "quantized.onnx", model.input_shape, batches, seconds
        )
    return {
        "cpu_flags": list(cpu_flags()),
        "bf16": bf16_unavailable_reason() or "native",
        "rows": rows,
    }


def markdown(results: dict) -> str:
    if not results or not results.get("rows"):
        return ""
    lines = [
        "## Engines and precisions (in process)\n",
        f"CPU flags: {', '.join(results['cpu_flags']) or 'none read'}; bf16: {results['bf16']}. "
        f"Median of {ROUNDS} rounds in which the engines take turns; max relative difference to "
        "onnxruntime float32 on the same inputs.\n",
        "| model | engine | batch | images/s | vs onnxruntime float32 | max rel diff |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in results["rows"]:
        lines.append(
            f"| {r['model']} | {r['engine']} | {r['batch']} | {r['images_per_s']:,.0f} | "
            f"{r['vs_onnxruntime_float32']:.2f}x | {r['max_rel_diff']:.2g} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, default=Path("models/digits"))
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--seconds", type=float, default=1.0)
    args = p.parse_args(argv)
    from bnfold.bundle import read_manifest

    manifest = read_manifest(args.bundle)
    shape = tuple(manifest.input.shape[1:])
    rows = measure_model(
        manifest.name,
        args.bundle / "folded.onnx",
        args.bundle / "quantized.onnx",
        shape,
        args.batches,
        args.seconds,
    )
    result = {"cpu_flags": list(cpu_flags()), "bf16": bf16_unavailable_reason() or "native"}
    print(markdown({**result, "rows": rows}))
    print(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
