"""INT8 after folding: why fold first, and what int8 buys in speed (`python -m bench.int8`).

For each benchmark model the same static quantization (bnfold.toolchain.quantize: QDQ,
per-channel int8 weights, uint8 activations, MinMax, the same calibration images) is applied
twice: to the folded model, and to the unfolded one with its BatchNormalization nodes left in
(quant_pre_process's optimizer off, or it would fuse Conv+BN itself). Both are measured against
the folded float32 model on held-out inputs. Then int8 vs float32 folded speed in process
(onnxruntime, full optimization) at batch 1 and at the best batch of the sweep, and the CPU's
8-bit dot-product instructions, which decide how much int8 can gain.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from bench.model_exec import latency_stats, ort_session, time_runs
from bench.models import BenchModel
from bench.plan import FULL, QUICK, Plan
from bnfold.bundle import INT8, read_manifest
from bnfold.toolchain.int8 import Int8Options, Int8Request, add_int8_to_bundle
from bnfold.toolchain.quantize import calibration_subset, measure_int8, quantize_model

CALIBRATION_IMAGES = 256
INT8_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8")


def cpu_int8_features(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict:
    """Which 8-bit dot-product paths this x86-64 CPU offers, and what they mean for int8."""
    flags: set[str] = set()
    for line in cpuinfo.read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    present = [f for f in INT8_FLAGS if f in flags]
    if "avx512_vnni" in flags or "avx_vnni" in flags:
        meaning = (
            "VNNI: one instruction multiplies u8 x s8 and accumulates into int32 (VPDPBUSD), "
            "4x the multiply-adds of float32 per instruction, no int16 saturation"
        )
    elif "avx2" in flags:
        meaning = (
            "AVX2 without VNNI: u8 x s8 through VPMADDUBSW + VPMADDWD (two instructions, an "
            "int16 intermediate that can saturate): a smaller gain over float32"
        )
    else:
        meaning = "no AVX2: onnxruntime's int8 kernels fall back to SSE paths; little or no gain"
    return {"flags": present, "meaning": meaning}


def eval_data(model: BenchModel, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, str]:
    """(calibration, held-out x, held-out labels or None, description) for one model."""
    if model.name == "digits":
        from training.data import load_digits_dataset, stratified_split

        splits = stratified_split(load_digits_dataset(), seed=0)
        calib = calibration_subset(splits.train.x, CALIBRATION_IMAGES)
        return calib, splits.test.x, splits.test.y, "digits: train split / test split (seed 0)"
    rng = np.random.default_rng(0)
    shape = (CALIBRATION_IMAGES + n, *model.input_shape)
    x = rng.normal(size=shape).astype(np.float32)
    return x[:CALIBRATION_IMAGES], x[CALIBRATION_IMAGES:], None, "random normal inputs"


def ensure_int8(model: BenchModel, n_eval: int) -> None:
    """The served bundle gets its int8 variant (as export makes it) when it has none, so the
    servers offer `variant=int8` too."""
    if INT8 in read_manifest(model.bundle_dir).files:
        return
    calib, x, y, source = eval_data(model, n_eval)
    request = Int8Request(Int8Options(), calib, source, y)
    report = add_int8_to_bundle(model.bundle_dir, request, x, "held-out")
    if not report.passed:
        raise RuntimeError(f"{model.name}: no int8 variant to serve: {report.reason}")


def served(serving_rows: list[dict], concurrency: int = 64) -> list[dict]:
    """V2 infer requests/s per variant at one concurrency (medians over rounds)."""
    rows = [r for r in serving_rows if r["concurrency"] == concurrency]
    by_model: dict[str, dict[str, float]] = {}
    for r in rows:
        if r["target"] in ("bnfold V2 infer", "bnfold V2 infer int8"):
            by_model.setdefault(r["model"], {})[r["target"]] = r["rps"]
    return [
        {"model": m, "concurrency": concurrency, "float32_rps": v.get("bnfold V2 infer"),
         "int8_rps": v.get("bnfold V2 infer int8")}
        for m, v in by_model.items()
    ]  # fmt: skip


def fold_first(model: BenchModel, work: Path, n_eval: int) -> dict:
    """The same quantization on the folded and on the unfolded model, measured the same way."""
    calib, x, y, source = eval_data(model, n_eval)
    folded = model.bundle_dir / "folded.onnx"
    out = {"data": source, "calibration_images": len(calib), "n_eval": len(x)}
    for variant, optimize in (("folded", True), ("unfolded", False)):
        q = quantize_model(
            model.bundle_dir / f"{variant}.onnx",
            calib,
            calibration_source=source,
            optimize=optimize,
        )
        path = work / f"{model.name}-{variant}-int8.onnx"
        path.write_bytes(q.model)
        settings = q.quantization.settings
        report = measure_int8(path, folded, x, y, split="held-out", settings=settings)
        out[variant] = {
            "file": str(path),
            "nodes": q.quantization.nodes.model_dump(),
            "report": report.model_dump(exclude={"settings"}),
        }
    return out


def speed(model: BenchModel, int8_paths: dict[str, str], plan: Plan) -> list[dict]:
    """Images/s of float32 folded and each int8 file (ALL), per thread count, over the batches."""
    files = {"float32 folded": str(model.bundle_dir / "folded.onnx"), **int8_paths}
    rows = []
    rng = np.random.default_rng(0)
    for threads in plan.threads:
        for label, path in files.items():
            session = ort_session(path, "ALL", threads)
            name_in = session.get_inputs()[0].name
            for batch in plan.batch_sizes:
                x = rng.normal(size=(batch, *model.input_shape)).astype(np.float32)
                times = time_runs(
                    lambda s=session, feed={name_in: x}: s.run(None, feed), plan.point_seconds
                )
                stats = latency_stats(times, batch)
                rows.append(
                    {
                        "model": model.name,
                        "variant": label,
                        "threads": threads,
                        "batch": batch,
                        **stats,
                    }
                )
                if stats["p50_ms"] / 1e3 > plan.max_run_seconds:
                    break  # larger batches would only take longer
    return rows


def speed_summary(rows: list[dict]) -> list[dict]:
    """int8 / float32 images/s at batch 1 and at each variant's best batch, per model/threads."""
    out = []
    for model, threads in sorted({(r["model"], r["threads"]) for r in rows}):
        mine = [r for r in rows if r["model"] == model and r["threads"] == threads]
        by_variant: dict[str, list[dict]] = {}
        for r in mine:
            by_variant.setdefault(r["variant"], []).append(r)
        base = by_variant.pop("float32 folded")
        b1 = next(r for r in base if r["batch"] == 1)["images_per_s"]
        best = max(base, key=lambda r: r["images_per_s"])
        for variant, vrows in by_variant.items():
            v1 = next(r for r in vrows if r["batch"] == 1)["images_per_s"]
            vbest = max(vrows, key=lambda r: r["images_per_s"])
            out.append(
                {
                    "model": model,
                    "threads": threads,
                    "variant": variant,
                    "float32_b1": b1,
                    "int8_b1": v1,
                    "ratio_b1": v1 / b1,
                    "float32_best": best["images_per_s"],
                    "float32_best_batch": best["batch"],
                    "int8_best": vbest["images_per_s"],
                    "int8_best_batch": vbest["batch"],
                    "ratio_best": vbest["images_per_s"] / best["images_per_s"],
                }
            )
    return out


def measure(models: dict[str, BenchModel], plan: Plan, work: Path, log: Callable) -> dict:
    """The whole int8 section of the benchmark."""
    results = {"cpu": cpu_int8_features(), "fold_first": {}, "speed": []}
    for name, model in models.items():
        comparison = fold_first(model, work, n_eval=max(plan.eval_images, 64))
        results["fold_first"][name] = comparison
        log(f"  {name} int8: folded-first vs unfolded quantized, see results")
        paths = {
            "int8 (folded first)": comparison["folded"]["file"],
            "int8 (BN left in)": comparison["unfolded"]["file"],
        }
        results["speed"] += speed(model, paths, plan)
        for variant in ("folded", "unfolded"):
            del comparison[variant]["file"]  # the work folder does not outlive the run
    results["speed_summary"] = speed_summary(results["speed"])
    return results


def markdown(results: dict) -> list[str]:
    """The int8 section of results.md."""
    lines = [
        "## INT8 after folding",
        "",
        f"CPU: {', '.join(results['cpu']['flags'])}. {results['cpu']['meaning']}.",
        "",
    ]
    lines += [
        "| model | quantized from | max abs diff | mean abs diff | top-1 agreement | "
        "accuracy float32 -> int8 | BN / float ops left at run time |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, cmp in results["fold_first"].items():
        for variant in ("folded", "unfolded"):
            r, nodes = cmp[variant]["report"], cmp[variant]["nodes"]
            d = r["int8_vs_folded"]
            acc = (
                "n/a (random inputs)"
                if r["accuracy_int8"] is None
                else f"{100 * r['accuracy_folded']:.2f}% -> {100 * r['accuracy_int8']:.2f}%"
            )
            left = ", ".join(f"{k} {v}" for k, v in nodes["float_ops"].items()) or "none"
            lines.append(
                f"| {name} | {variant} | {d['max_abs_diff']:.3g} | "
                f"{d['mean_abs_diff']:.3g} | {100 * d['top1_agreement']:.2f}% | {acc} | "
                f"{left} |"
            )
    lines += [
        "",
        "| model | threads | variant | batch 1 img/s (x float32) | best img/s "
        "(batch) (x float32) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for s in results["speed_summary"]:
        lines.append(
            f"| {s['model']} | {s['threads']} | {s['variant']} | {s['int8_b1']:,.0f} "
            f"(x{s['ratio_b1']:.2f}) | {s['int8_best']:,.0f} ({s['int8_best_batch']}) "
            f"(x{s['ratio_best']:.2f}) |"
        )
    if results.get("served"):
        c = results["served"][0]["concurrency"]
        lines += [
            "",
            f"| model | V2 infer at c={c}, float32 folded req/s | int8 req/s | x |",
            "| --- | --- | --- | --- |",
        ]
        for r in results["served"]:
            f, q = r["float32_rps"], r["int8_rps"]
            ratio = f"x{q / f:.2f}" if f and q else "n/a"
            lines.append(f"| {r['model']} | {f or 0:,.0f} | {q or 0:,.0f} | {ratio} |")
    return lines + [""]


def main(argv: list[str] | None = None) -> int:
    """Standalone: prepare the models as `make bench` does, run the int8 section, print it."""
    from bench.models import prepare_digits, prepare_heavy

    p = argparse.ArgumentParser(prog="python -m bench.int8", description=__doc__.splitlines()[0])
    p.add_argument("--models", default="digits,heavy", help="comma-separated: digits,heavy")
    p.add_argument("--quick", action="store_true", help="the seconds-long plan")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    plan = QUICK if args.quick else FULL
    with tempfile.TemporaryDirectory(prefix="bnfold-int8-bench-") as tmp:
        work = Path(tmp)
        models = {}
        for name in args.models.split(","):
            if name == "digits":
                models[name] = prepare_digits(work, plan.eval_images)
            elif name == "heavy":
                models[name] = prepare_heavy(work, plan.heavy_size, plan.eval_images)
            else:
                print(
                    f"bench.int8: unknown model {name!r}. Only digits and heavy.", file=sys.stderr
                )
                return 2
        results = measure(models, plan, work, lambda m: print(m, file=sys.stderr))
    print("\n".join(markdown(results)))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
