"""`bnfold import`: any ONNX image classifier in, a verified bundle `models/<name>/` out.

What import adds to the one bundle path (bnfold.toolchain.build, which training uses too): the
user's graph checked and prepared for serving (each change recorded in `bundle.json`), its image
input and logits output found, the preprocessing from the flags, and the equivalence inputs:
sample images through the shared preprocessing, or generated inputs whose distribution the report
states, with the original graph's float64 logits on them (bnfold.toolchain.reference).
Torch-free: onnx, onnxruntime and numpy.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from pydantic import ValidationError

from bnfold.bundle import (
    NAME_PATTERN,
    BnStatisticsCheck,
    ImportRecord,
    InputSpec,
    Manifest,
    OutputSpec,
    Recalibration,
)
from bnfold.errors import BnfoldError, validation_message
from bnfold.preprocess import GENERATED_INPUTS, PreprocessSpec, generated_batch, preprocess_bytes
from bnfold.toolchain.bnstats import (
    MIN_IMAGES,
    accuracy,
    agreement,
    batchnorm_nodes,
    check_statistics,
    recalibrate,
    too_few_message,
)
from bnfold.toolchain.build import (
    BundleSpec,
    Measurement,
    NotEquivalentError,
    fold_model,
    toolchain_versions,
    write_bundle,
)
from bnfold.toolchain.image_input import (
    SCORE_OPS,
    ImageInput,
    check_classes,
    final_op,
    logits_output,
    resolve_image_input,
)
from bnfold.toolchain.int8 import Int8Options, Int8Request
from bnfold.toolchain.load import LoadedOnnx, ModelImportError, load_onnx
from bnfold.toolchain.progress import stage
from bnfold.toolchain.quantize import calibration_images
from bnfold.toolchain.reference import ReferenceUnavailable, evaluate_float64
from bnfold.toolchain.sessions import make_session
from bnfold.toolchain.verify import run_logits, within_budget

__all__ = ["ImportOptions", "NotEquivalentError", "equivalence_inputs", "import_model"]

N_GENERATED = 64  # generated inputs when no samples are given: enough for max/mean statistics
MAX_SAMPLES = 512  # sample images used at most (the float64 reference is numpy, and slow)
MAX_SIDE = 4096  # PreprocessSpec's bound on height and width
MAX_SAMPLE_BYTES = 64 * 2**20  # one sample image file at most
FLOAT32_MAX = float(np.finfo(np.float32).max)


@dataclass
class ImportOptions:
    """What the bundle needs that the ONNX file does not say (CLI flags, one field each)."""

    name: str
    models_dir: Path = Path("models")
    classes: list[str] | None = None
    num_classes: int | None = None
    layout: str | None = None  # "NCHW" | "NHWC"; inferred from the input shape when None
    size: tuple[int, int] | None = None  # (height, width); from the input shape when None
    color_mode: str | None = None  # "L" | "RGB"; from the channel count when None
    scale: float = 1.0 / 255.0
    mean: list[float] | None = None  # one value or one per channel; default 0
    std: list[float] | None = None  # one value or one per channel; default 1
    samples: Path | None = None
    input_name: str | None = None
    output_name: str | None = None  # the logits output, when the graph lists several
    force: bool = False
    seed: int = 0
    int8: Int8Options | None = None  # --quantize int8: also write quantized.onnx if it passes
    calibration: Path | None = None  # --calibration FOLDER: the images int8 is calibrated on
    recalibrate: bool = False  # --recalibrate: re-estimate BN statistics on --samples first
    bf16: bool = False  # --bf16: also prove the bf16 variant


def check_target(opts: ImportOptions) -> Path:
    """Refuse, before any work, a bad name or a bundle that would be replaced without force."""
    if not re.fullmatch(NAME_PATTERN, opts.name):
        raise ModelImportError(
            f"invalid --name {opts.name!r}: use letters, digits, '_', '.', '-' (up to 64, "
            "starting with a letter or digit)"
        )
    root = Path(opts.models_dir)
    if root.exists() and not root.is_dir():
        raise ModelImportError(f"--models-dir {root} is a file, not a folder")
    target = root / opts.name
    if target.exists() and not opts.force:
        raise ModelImportError(
            f"bundle {target} already exists: pass --force to replace it, or choose another --name"
        )
    return target


def preprocess_spec(image: ImageInput, opts: ImportOptions) -> PreprocessSpec:
    """Color mode from the channel count, size from the graph or --size, scale/mean/std."""
    mode = "L" if image.channels == 1 else "RGB"
    if opts.color_mode and opts.color_mode != mode:
        raise ModelImportError(
            f"--color-mode {opts.color_mode} needs {1 if opts.color_mode == 'L' else 3} "
            f"channel(s), but input {image.name!r} has {image.channels}: use --color-mode {mode}"
        )
    per_channel = {}
    for flag, values, default in (("mean", opts.mean, 0.0), ("std", opts.std, 1.0)):
        values = list(values) if values else [default]
        if len(values) == 1:
            values = values * image.channels
        if len(values) != image.channels:
            raise ModelImportError(
                f"--{flag} has {len(values)} values; give 1 or {image.channels} (one per channel)"
            )
        per_channel[flag] = values
    values = [opts.scale, *per_channel["mean"], *per_channel["std"]]
    if not all(math.isfinite(v) for v in values):
        raise ModelImportError("--scale, --mean and --std values must be finite numbers")
    if any(s <= 0 for s in per_channel["std"]) or opts.scale <= 0:
        raise ModelImportError("--scale and --std values must be > 0")
    _check_float32_range(opts.scale, per_channel["mean"], per_channel["std"])
    if max(image.height, image.width) > MAX_SIDE:
        raise ModelImportError(
            f"input {image.name!r} is {image.height}x{image.width} pixels; the serving "
            f"preprocessing makes images of at most {MAX_SIDE}x{MAX_SIDE}"
        )
    try:
        return PreprocessSpec(
            color_mode=mode,
            height=image.height,
            width=image.width,
            scale=opts.scale,
            layout=image.layout,
            **per_channel,
        )
    except ValidationError as exc:  # a bound checked only by the schema: still one sentence
        raise ModelImportError(f"preprocessing: {validation_message(exc.errors())}") from None


def _check_float32_range(scale: float, mean: list[float], std: list[float]) -> None:
    """Pixels 0 and 255 after `(p * scale - mean) / std` must be finite in float32: the model
    would otherwise see inf (or NaN) for every image."""
    extremes = [(p * scale - m) / s for p in (0.0, 255.0) for m, s in zip(mean, std, strict=True)]
    if not all(abs(v) <= FLOAT32_MAX for v in extremes):
        raise ModelImportError(
            "--scale, --mean and --std map pixels 0..255 outside float32's range "
            f"(up to {max(abs(v) for v in extremes):.3g}); the model would see inf"
        )


def prepare_for_serving(loaded: LoadedOnnx, image: ImageInput) -> tuple[onnx.ModelProto, list]:
    """The user's model as served: weights inline, initializers not overridable, a variable
    batch axis; every change described."""
    model = onnx.ModelProto()
    model.CopyFrom(loaded.model)
    changes = []
    if loaded.external_files:
        changes.append(
            f"weights stored inside the file (were in {', '.join(loaded.external_files)})"
        )
    inits = {t.name for t in model.graph.initializer}
    overridable = [i for i in model.graph.input if i.name in inits]
    if overridable:
        if model.ir_version < 4:  # IR 3 requires initializers among the inputs; 4 does not
            changes.append(f"IR version {model.ir_version} -> 4, so that weights can be constants")
            model.ir_version = 4
        kept = [i for i in model.graph.input if i.name not in inits]
        del model.graph.input[:]
        model.graph.input.extend(kept)
        changes.append(
            f"{len(overridable)} initializers no longer listed as graph inputs (the server never "
            "feeds them; as overridable inputs they are not constants and could not be folded)"
        )
    if isinstance(image.batch, int):
        _set_dim0(next(i for i in model.graph.input if i.name == image.name), "batch")
        for out in model.graph.output:
            _set_dim0(out, "batch")
        del model.graph.value_info[:]  # intermediate shapes noted with the fixed batch
        changes.append(
            f"input {image.name!r} and the outputs: batch axis {image.batch} -> variable "
            "'batch' (the server batches requests); intermediate shape annotations removed"
        )
    return model, changes


def _set_dim0(vi: onnx.ValueInfoProto, name: str) -> None:
    shape = vi.type.tensor_type.shape
    if shape.dim:
        shape.dim[0].Clear()
        shape.dim[0].dim_param = name


def equivalence_inputs(spec: PreprocessSpec, opts: ImportOptions) -> tuple[np.ndarray, str, str]:
    """(x, split, description): sample images through the shared preprocessing, or generated."""
    per_input = spec.channels * spec.height * spec.width
    if opts.samples is None:
        n = within_budget(per_input, N_GENERATED)
        x = generated_batch(spec, n, opts.seed)
        return x, "generated", f"{n} " + GENERATED_INPUTS.format(seed=opts.seed)
    folder = Path(opts.samples)
    if not folder.is_dir():
        raise ModelImportError(f"--samples {folder}: not a folder of images")
    limit = within_budget(per_input, MAX_SAMPLES)
    files = sample_files(folder)[:limit]
    rows = []
    for p in files:
        if p.stat().st_size > MAX_SAMPLE_BYTES:  # read whole: a stray video or disk image
            raise ModelImportError(
                f"--samples: {p}: {p.stat().st_size / 2**20:.0f} MiB, over the "
                f"{MAX_SAMPLE_BYTES // 2**20} MiB an image file may have here"
            )
        try:
            rows.append(preprocess_bytes(p.read_bytes(), spec))
        except BnfoldError as exc:
            raise ModelImportError(f"--samples: {p}: {exc.message}") from None
    desc = (
        f"{len(files)} sample images from {folder} (sorted by path, first {limit} at "
        "most), through this bundle's preprocessing"
    )
    return np.stack(rows), "samples", desc


def sample_files(folder: Path) -> list[Path]:
    """The image files under --samples, sorted by path (class folders included)."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    if not files:
        raise ModelImportError(f"--samples {folder}: no files in it")
    return files


def sample_labels(folder: Path, n: int, classes: list[str]) -> np.ndarray | None:
    """Labels of the first n sample files when every one sits in a folder named after a class
    (the layout training reads), else None: the images are unlabeled."""
    files = sample_files(folder)[:n]
    parents = [p.relative_to(folder).parts[:-1] for p in files]
    if not all(len(parts) == 1 and parts[0] in classes for parts in parents):
        return None
    return np.array([classes.index(parts[0]) for parts in parents])


def statistics_check(
    model: onnx.ModelProto, image: ImageInput, x: np.ndarray, split: str, inputs: str
) -> BnStatisticsCheck:
    """The BN statistics check on the sample images; generated inputs say nothing about data."""
    if split != "samples":
        return BnStatisticsCheck(
            checked=False,
            note="no sample images (--samples): generated inputs say nothing about the data "
            "the model will see",
        )
    return check_statistics(model, image.name, x, inputs)


def check_recalibration(unfolded: onnx.ModelProto, path: Path, samples, n: int) -> None:
    """Refuse --recalibrate before any work when it cannot be done."""
    if samples is None:
        raise ModelImportError(
            "--recalibrate needs --samples FOLDER: the images to re-estimate the statistics on"
        )
    if not batchnorm_nodes(unfolded):
        raise ModelImportError(
            f"--recalibrate: {path} has no BatchNormalization with running statistics "
            "(a BN exported as constant Mul/Add carries none to re-estimate)"
        )
    if n < MIN_IMAGES:
        raise ModelImportError(f"--recalibrate: --samples {samples}: {too_few_message(n)}")


def recalibrated(
    loaded: LoadedOnnx,
    unfolded: onnx.ModelProto,
    image: ImageInput,
    output: str,
    samples: Path,
    x: np.ndarray,
    labels: np.ndarray | None,
) -> tuple[onnx.ModelProto, Recalibration]:
    """--recalibrate: the served model with its BN statistics re-estimated on the samples, and
    what changed (top-1 agreement with the original; accuracy before and after when labeled)."""
    new = recalibrate(unfolded, image.name, x)
    before, after = (
        run_logits(make_session(m.SerializeToString(), "unfolded"), image.name, output, x)
        for m in (unfolded, new)
    )
    record = Recalibration(
        inputs=f"{len(x)} sample images from {samples}",
        n_images=len(x),
        layers=len(batchnorm_nodes(new)),
        original_sha256=loaded.sha256,
        top1_agreement=agreement(before, after),
        accuracy_before=accuracy(before, labels),
        accuracy_after=accuracy(after, labels),
    )
    return new, record


def import_model(path: Path, opts: ImportOptions) -> Manifest:
    """Validate, fold, measure, and write `models/<name>/` atomically; the manifest written."""
    target = check_target(opts)
    with stage("load and check"):
        loaded = load_onnx(Path(path))
        image = resolve_image_input(
            loaded.model, loaded.path, opts.input_name, opts.layout, opts.size
        )
        spec = preprocess_spec(image, opts)
        unfolded, changes = prepare_for_serving(loaded, image)
        # the first onnxruntime session: an op it cannot run is refused here
        output, n_out = logits_output(unfolded, loaded.path, image, opts.output_name)
        classes = check_classes(opts.classes, opts.num_classes, n_out, output)
        x, split, inputs = equivalence_inputs(spec, opts)
        int8 = int8_request(spec, opts)  # calibration images read now: a bad folder, no work
        labels = sample_labels(Path(opts.samples), len(x), classes) if opts.samples else None
        if opts.recalibrate:
            check_recalibration(unfolded, loaded.path, opts.samples, len(x))
    original, extra = loaded.model, {}
    if opts.recalibrate:
        with stage("recalibrate"):
            unfolded, extra["recalibration"] = recalibrated(
                loaded, unfolded, image, output, opts.samples, x, labels
            )
            changes.append(
                "BatchNormalization running statistics re-estimated on the sample images "
                "(--recalibrate); the original's sha256 is in `recalibration`"
            )
            original, image = unfolded, dataclasses.replace(image, batch="batch")
    with stage("BN statistics"):  # of the model served: the recalibrated one when asked
        extra["bn_statistics"] = statistics_check(unfolded, image, x, split, inputs)
    with stage("fold"):
        fold = fold_model(unfolded, str(loaded.path))
    with stage("float64 reference"):
        ref64, note = _float64_logits(original, image, x, output)
    if ref64 is not None:
        _check_finite_logits(ref64, loaded.path, output)
    extra["imported"] = ImportRecord(
        source=loaded.path.name,
        sha256=loaded.sha256,
        external_data=loaded.external_files,
        producer=f"{loaded.model.producer_name} {loaded.model.producer_version}".strip(),
        ir_version=loaded.model.ir_version,
        changes=changes,
    )
    bundle = BundleSpec(
        name=opts.name,
        classes=classes,
        input=InputSpec(name=image.name, shape=image.served_shape, preprocess=spec),
        output=OutputSpec(
            name=output, shape=[-1, n_out], probabilities=final_op(unfolded, output) in SCORE_OPS
        ),
        versions=toolchain_versions(loaded.model),
        extra=extra,
    )
    # measured on the same inputs as the fold, int8 and bf16 included; labeled when the samples
    # sit in class folders
    measure = Measurement(x, split, ref64, inputs, note, labels)  # stages: write, measure, ...
    return write_bundle(target, fold, bundle, measure, int8, opts.bf16)


def int8_request(spec: PreprocessSpec, opts: ImportOptions) -> Int8Request | None:
    """The calibration images of --calibration, when --quantize int8 was asked for."""
    if opts.int8 is None:
        return None
    if opts.calibration is None:
        raise ModelImportError(
            "--quantize int8 needs calibration images: add --calibration FOLDER (images like "
            "the ones the model will serve, through this bundle's preprocessing)"
        )
    x = calibration_images(opts.calibration, spec, opts.int8.calibration_images, opts.seed)
    return Int8Request(opts.int8, x, f"images from {opts.calibration}")


def _float64_logits(
    model: onnx.ModelProto, image: ImageInput, x: np.ndarray, output: str
) -> tuple[np.ndarray | None, str | None]:
    """The original graph (as given, fixed batch included) in float64, chunked to fit it; or
    None and why, when the reference cannot evaluate it (never the user's error: onnxruntime's
    folded-vs-unfolded comparison still decides)."""
    per_input = int(np.prod(x.shape[1:]))  # numpy's im2col needs ~kernel-size times more
    chunk = image.batch if isinstance(image.batch, int) else within_budget(per_input, 32, 2**20)
    n = len(x)
    pad = (-n) % chunk
    if pad:  # a fixed batch the input count does not divide: pad with copies, drop after
        x = np.concatenate([x, np.repeat(x[-1:], pad, axis=0)])
    try:
        return evaluate_float64(model, image.name, x, batch=chunk, output=output)[:n], None
    except ReferenceUnavailable as exc:
        return None, f"float64 reference not measured: {exc}"


def _check_finite_logits(ref64: np.ndarray, path: Path, output: str) -> None:
    """The user's own model must answer finite logits: NaN or inf (a negative BN variance, an
    overflow) is the model's fault, not a fold that failed to be equivalent."""
    bad = int((~np.isfinite(ref64)).any(axis=1).sum())
    if bad:
        raise ModelImportError(
            f"{path}: the model as given computes NaN or infinite {output!r} for {bad} of "
            f"{len(ref64)} inputs (float64 evaluation of the original graph): check its weights "
            "and statistics (e.g. a negative BatchNormalization variance) and --mean/--std"
        )


def diagnose(path: Path, opts: ImportOptions) -> BnStatisticsCheck:
    """`bnfold doctor`: the BN statistics check of a bundle (its unfolded.onnx and its
    preprocessing) or of an ONNX file (preprocessing from the flags), on --samples."""
    path = Path(path)
    if opts.samples is None:
        raise ModelImportError("doctor needs --samples FOLDER: the images to check against")
    if path.is_dir():
        from bnfold.bundle import load_bundle

        manifest = load_bundle(path)
        model = onnx.load(str(path / manifest.files["unfolded"].path))
        spec, input_name = manifest.input.preprocess, manifest.input.name
    else:
        loaded = load_onnx(path)
        image = resolve_image_input(
            loaded.model, loaded.path, opts.input_name, opts.layout, opts.size
        )
        spec, input_name = preprocess_spec(image, opts), image.name
        model = prepare_for_serving(loaded, image)[0]
    x, _, inputs = equivalence_inputs(spec, opts)
    if len(x) < MIN_IMAGES:
        raise ModelImportError(f"--samples {opts.samples}: {too_few_message(len(x))}")
    return check_statistics(model, input_name, x, inputs)
