"""The int8 variant of a bundle: made at export or import, re-checked by verify.

`add_int8_variant` quantizes a bundle's folded.onnx (bnfold.toolchain.quantize), measures it
against the folded float32 model on the held-out images and writes `quantized.onnx` only when it
passes the criterion; the report (in the equivalence report) says why when it does not. `check_int8`
re-measures a bundle's int8 file for verify.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from bnfold.bundle import (
    INT8,
    INT8_FILE,
    MANIFEST_NAME,
    Int8Report,
    Manifest,
    OnnxFile,
    read_manifest,
    sha256_file,
)
from bnfold.toolchain.quantize import (
    ACTIVATION_TYPES,
    DEFAULT_CALIBRATION_IMAGES,
    METHODS,
    QuantizeError,
    calibration_subset,
    failure_reason,
    measure_int8,
    quantize_model,
)


@dataclass(frozen=True)
class Int8Options:
    """What `--quantize int8` asks for (defaults: 256 images, MinMax, uint8 activations)."""

    calibration_images: int = DEFAULT_CALIBRATION_IMAGES
    method: str = "minmax"
    activation_type: str = "uint8"


@dataclass(frozen=True)
class Int8Request:
    """An int8 variant to add at export or import: options and the data they need."""

    options: Int8Options
    calibration: np.ndarray  # (N, C, H, W) preprocessed images; options.calibration_images drawn
    calibration_source: str  # where they came from, for the settings
    labels: np.ndarray | None = None  # (N,) labels of the held-out images, for the accuracies


def add_quantize_arguments(parser: argparse.ArgumentParser) -> None:
    """--quantize int8 and its settings, the same for `bnfold import` and `bnfold-train`."""
    g = parser.add_argument_group("int8 (static quantization of the folded model)")
    g.add_argument("--quantize", choices=["int8"], help="also write quantized.onnx if it passes")
    g.add_argument(
        "--calibration-images",
        type=_positive,
        metavar="N",
        help=f"calibration images drawn (default {DEFAULT_CALIBRATION_IMAGES})",
    )
    g.add_argument("--calibration-method", choices=list(METHODS), help="default minmax")
    g.add_argument("--activations", choices=list(ACTIVATION_TYPES), help="default uint8")
    parser.add_argument(
        "--bf16",
        action="store_true",
        help="also prove a bf16 variant (folded computed in bfloat16 by OpenVINO), served "
        "where the CPU computes bf16 natively",
    )


def int8_options(args: argparse.Namespace) -> Int8Options | None:
    """The options asked for; a setting without --quantize int8 is a mistake, said in one line."""
    given = {
        flag: value
        for flag, value in (
            ("--calibration-images", args.calibration_images),
            ("--calibration-method", args.calibration_method),
            ("--activations", args.activations),
        )
        if value is not None
    }
    if args.quantize is None:
        if given:
            raise QuantizeError(f"{', '.join(given)} only applies with --quantize int8")
        return None
    defaults = Int8Options()
    return Int8Options(
        calibration_images=args.calibration_images or defaults.calibration_images,
        method=args.calibration_method or defaults.method,
        activation_type=args.activations or defaults.activation_type,
    )


def summary_line(r: Int8Report) -> str:
    """One line on the int8 variant: written with its agreement, or why not."""
    if not r.passed:
        return f"int8: quantized.onnx not written: {r.reason}"
    d = r.int8_vs_folded
    acc = (
        ""
        if r.accuracy_int8 is None
        else f", accuracy {100 * r.accuracy_folded:.2f}% -> {100 * r.accuracy_int8:.2f}%"
    )
    return (
        f"int8: wrote quantized.onnx; on {r.n_images} {r.split} inputs top-1 agreement with "
        f"folded {100 * d.top1_agreement:.2f}%, max |int8 - folded| {d.max_abs_diff:.3g}{acc}"
    )


def whole_number(text: str, low: int, not_int: str, too_low: str) -> int:
    """An argparse value: an integer of at least `low`, or one line saying what is wrong."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{not_int}, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"{too_low}, got {value}")
    return value


def _positive(text: str) -> int:
    return whole_number(text, 1, "expected a positive integer", "expected a positive integer")


def add_int8_variant(
    folder: Path, request: Int8Request, x: np.ndarray, split: str
) -> tuple[OnnxFile | None, Int8Report]:
    """Quantize folder/folded.onnx; write folder/quantized.onnx only if it passes on the
    held-out images x (N, C, H, W) with request.labels. Returns its entry (or None), the report."""
    folded = Path(folder) / "folded.onnx"
    options = request.options
    calib = calibration_subset(request.calibration, options.calibration_images)
    q = quantize_model(
        folded,
        calib,
        calibration_source=f"{request.calibration_source} ({len(calib)} images)",
        activation_type=options.activation_type,
        method=options.method,
    )
    settings = q.quantization.settings
    report = measure_int8(q.model, folded, x, request.labels, split=split, settings=settings)
    if not report.passed:
        return None, report
    path = Path(folder) / INT8_FILE
    path.write_bytes(q.model)
    proto = onnx.load_from_string(q.model)
    opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    entry = OnnxFile(
        path=INT8_FILE,
        sha256=sha256_file(path),
        batchnorm_nodes=sum(n.op_type == "BatchNormalization" for n in proto.graph.node),
        opset=opset,
        quantization=q.quantization,
    )
    return entry, report


def add_int8_to_bundle(bundle_dir: Path, request: Int8Request, x: np.ndarray, split: str):
    """add_int8_variant on an existing bundle, its manifest rewritten (atomically) to list the
    int8 file and report; a previous int8 variant is replaced. Returns the report."""
    bundle_dir = Path(bundle_dir)
    manifest = read_manifest(bundle_dir)
    (bundle_dir / INT8_FILE).unlink(missing_ok=True)
    entry, report = add_int8_variant(bundle_dir, request, x, split)
    files = {k: v for k, v in manifest.files.items() if k != INT8}
    if entry is not None:
        files[INT8] = entry
    equivalence = manifest.equivalence.model_copy(update={"int8": report})
    manifest = manifest.model_copy(update={"files": files, "equivalence": equivalence})
    tmp = bundle_dir / f".{MANIFEST_NAME}.tmp"
    tmp.write_text(manifest.model_dump_json(indent=2) + "\n")
    os.replace(tmp, bundle_dir / MANIFEST_NAME)
    return report


def check_int8(
    bundle_dir: Path, manifest: Manifest, x: np.ndarray, labels: np.ndarray | None
) -> tuple[bool, str] | None:
    """(ok, one line) for the bundle's int8 variant re-measured on x; None without one.

    The file's checksum is checked with the others (load_bundle); this checks that the manifest
    and the report agree about the file, and that the criterion still holds here.
    """
    report = manifest.equivalence.int8
    entry = manifest.files.get(INT8)
    if entry is None and report is None:
        return None
    if entry is None:
        if report is not None and report.passed:
            return False, f"the int8 report says passed but the bundle lists no {INT8_FILE}"
        return True, f"no int8 variant, as the report says: {report.reason}"
    if report is None or not report.passed:
        return False, f"{entry.path} is in the bundle but its int8 report is missing or failed"
    settings = entry.quantization.settings if entry.quantization else report.settings
    again = measure_int8(
        Path(bundle_dir) / entry.path,
        Path(bundle_dir) / manifest.files["folded"].path,
        x,
        labels,
        split="verify",
        settings=settings,
    )
    stats = again.int8_vs_folded
    drop = again.accuracy_drop_points
    acc = "" if drop is None else f", accuracy drop {drop:.2f} points"
    line = (
        f"int8 vs folded on {len(x)} inputs: max |diff| {stats.max_abs_diff:.3g}, top-1 "
        f"agreement {stats.top1_agreement:.4f}{acc}"
    )
    reason = failure_reason(stats, again.accuracy_drop_points, "verify")
    return (reason is None, line if reason is None else f"{line}: {reason}")
