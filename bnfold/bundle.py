"""The model bundle on disk: `models/<name>/{bundle.json, folded.onnx, unfolded.onnx}`.

This is the contract between training (writes it) and the service (reads it). One schema, owned
here, versioned by `schema_version`. Imports neither torch, FastAPI nor onnxruntime.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from bnfold.errors import BundleError
from bnfold.preprocess import PreprocessSpec

SCHEMA_VERSION = 1
MANIFEST_NAME = "bundle.json"
VARIANTS = ("folded", "unfolded")
Variant = Literal["folded", "unfolded"]
# Files a bundle may hold: the two float32 variants, and optionally the int8 one (quantized from
# the folded model; bnfold.toolchain.quantize).
FileVariant = Literal["folded", "unfolded", "int8"]
INT8 = "int8"
INT8_FILE = "quantized.onnx"


NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"  # a bundle name: also a folder name


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class TensorSpec(_Strict):
    """A model input or output as the Open Inference Protocol describes it."""

    name: str
    datatype: Literal["FP32"] = "FP32"
    shape: list[int] = Field(description="-1 marks the variable batch dimension.")


class OutputSpec(TensorSpec):
    """The served output: logits, or scores the graph already made (it ends in Softmax or
    Sigmoid), which the server reports as they are instead of taking their softmax again."""

    probabilities: bool = Field(
        False, description="The output already holds probabilities (a final Softmax/Sigmoid)."
    )


class InputSpec(TensorSpec):
    preprocess: PreprocessSpec


class QuantSettings(_Strict):
    """How the int8 variant was made: onnxruntime.quantization.quantize_static, static QDQ."""

    format: Literal["QDQ"] = "QDQ"
    weight_type: Literal["int8"] = "int8"
    per_channel: bool = Field(True, description="One weight scale per output channel.")
    activation_type: Literal["uint8", "int8"] = "uint8"
    calibration_method: Literal["minmax", "entropy", "percentile"] = "minmax"
    calibration_images: int = Field(ge=1)
    calibration_source: str = Field(description="Where the calibration images came from.")
    pre_process: str = Field(description="What ran before quantize_static.")
    float_logits: bool = Field(True, description="The output layer returns float32 logits.")
    onnxruntime: str = Field(description="onnxruntime version that quantized.")


class QuantNodeCounts(_Strict):
    """Nodes of the QDQ file, and what onnxruntime runs after fusing it (CPU, full optimization)."""

    quantize_linear: int = Field(ge=0)
    dequantize_linear: int = Field(ge=0)
    ops: dict[str, int] = Field(description="Other op types in the QDQ file.")
    int8_kernels: dict[str, int] = Field(description="Integer kernels onnxruntime runs.")
    float_ops: dict[str, int] = Field(description="Ops onnxruntime still runs in float32.")


class Quantization(_Strict):
    settings: QuantSettings
    nodes: QuantNodeCounts


class OnnxFile(_Strict):
    path: str = Field(description="File name relative to the bundle folder.")
    sha256: str = Field(pattern="^[0-9a-f]{64}$")
    batchnorm_nodes: int = Field(ge=0, description="BatchNormalization nodes in the graph.")
    opset: int
    quantization: Quantization | None = Field(None, description="The int8 file only.")
    op_counts: dict[str, int] | None = Field(
        None, description="Nodes per op type in the graph (written by `bnfold import`)."
    )


class FoldRow(_Strict):
    """What happened to one BatchNorm layer."""

    bn: str = Field(description="Qualified name of the BatchNorm module (ONNX: node name(s)).")
    folded: bool
    into: str | None = Field(None, description="Layer the BN was folded into.")
    direction: Literal["backward", "forward"] | None = None
    reason: str | None = Field(None, description="Why it was not folded.")
    scale_min: float | None = Field(None, description="min |gamma / sqrt(var + eps)|")
    scale_max: float | None = Field(None, description="max |gamma / sqrt(var + eps)|")
    warning: str | None = None
    op: Literal["BatchNormalization", "Mul/Add"] = Field(
        "BatchNormalization",
        description="The folded pattern: a BatchNorm layer or node, or a per-channel constant "
        "Mul/Add chain (how Keras and other converters export BN).",
    )
    probe: str | None = Field(
        None,
        description="A tensor with equal values in the unfolded and the folded ONNX graph "
        "(the BN output for a backward fold, the layer output for a forward fold).",
    )


class DiffStats(_Strict):
    """Elementwise difference between two sets of logits (or activations)."""

    max_abs_diff: float
    mean_abs_diff: float
    max_rel_diff: float = Field(description="max_abs_diff / max |reference|: relative to scale.")
    top1_agreement: float | None = Field(None, description="Fraction of equal argmax rows.")


class LayerDiff(_Strict):
    """Folded layer output vs the matching BN output of the unfolded model."""

    bn: str
    folded_tensor: str
    unfolded_tensor: str
    max_abs_diff: float
    mean_abs_diff: float
    max_rel_diff: float


class LayerProbe(_Strict):
    """Which ONNX tensors to compare for one folded BN."""

    bn: str
    folded_tensor: str
    unfolded_tensor: str


class Int8Report(_Strict):
    """int8 vs folded float32 on held-out images, and the pass criterion that gates the file."""

    split: str
    n_images: int
    settings: QuantSettings
    int8_vs_folded: DiffStats | None = None
    accuracy_folded: float | None = Field(None, description="None when no labels were given.")
    accuracy_int8: float | None = None
    accuracy_drop_points: float | None = Field(None, description="100 x (folded - int8).")
    min_top1_agreement: float
    max_accuracy_drop_points: float
    passed: bool
    reason: str | None = Field(None, description="Why the int8 file was not written.")


class ReducedPrecisionReport(_Strict):
    """A variant computed in reduced precision from folded.onnx (bf16), against folded float32
    on the equivalence inputs, measured on the CPU named here: its numbers depend on that CPU."""

    precision: Literal["bf16"]
    engine: str = Field(description="What computed it, e.g. 'openvino 2026.4.1 CPU'.")
    cpu_features: list[str] = Field(description="The CPU's relevant instruction-set flags.")
    split: str
    n_images: int
    vs_folded: DiffStats | None = Field(None, description="None when it could not run here.")
    accuracy_folded: float | None = Field(None, description="None when no labels were given.")
    accuracy_variant: float | None = None
    accuracy_drop_points: float | None = None
    min_top1_agreement: float
    max_accuracy_drop_points: float
    passed: bool
    reason: str | None = None


class CheckInputs(_Strict):
    """Inputs stored with the bundle (a .npy file, the model's input layout) on which the server
    re-measures reduced-precision variants on the CPU that serves them."""

    path: str
    sha256: str = Field(pattern="^[0-9a-f]{64}$")
    n_images: int
    source: str = Field(description="What they are: held-out images, samples, generated.")


class EquivalenceReport(_Strict):
    """Folded vs unfolded, measured with onnxruntime on held-out images at export."""

    split: str
    n_images: int
    tolerance_abs: float = Field(
        description="Allowed max |folded - unfolded| on logits: 2e-5 of the logit scale, or 3x "
        "the unfolded model's own float32 error against the float64 reference when larger."
    )
    folded_vs_unfolded: DiffStats
    folded_vs_float64: DiffStats | None = Field(
        description="None when the float64 reference could not be measured (reference_note)."
    )
    unfolded_vs_float64: DiffStats | None
    reference_note: str | None = Field(
        None, description="Why the float64 reference was not measured; onnxruntime decided."
    )
    per_layer: list[LayerDiff]
    passed: bool
    int8: Int8Report | None = Field(None, description="Present when int8 was requested.")
    bf16: ReducedPrecisionReport | None = Field(
        None, description="Present when bf16 was requested (served where it passes again)."
    )
    inputs: str | None = Field(
        None, description="What the inputs were and how they were made, when not a data split."
    )


class ImportRecord(_Strict):
    """Where an imported model (`bnfold import`) came from and what serving changed in it."""

    source: str = Field(description="File name of the ONNX model as given.")
    sha256: str = Field(pattern="^[0-9a-f]{64}$", description="sha256 of that file.")
    external_data: list[str] = Field(default_factory=list, description="Its weight files.")
    producer: str = Field(description="producer_name and producer_version of the file.")
    ir_version: int
    changes: list[str] = Field(
        default_factory=list,
        description="Every change made for serving; unfolded.onnx is the source otherwise.",
    )


class BnLayerCheck(_Strict):
    """One BatchNormalization's running statistics against the data it sees, per channel c:
    mean shift z_c = (data mean - running mean) / sqrt(running var + eps), variance ratio
    r_c = (data var + eps) / (running var + eps); summarised over the layer's channels."""

    bn: str
    channels: int
    mean_shift_rms: float = Field(description="RMS over channels of z_c (in running stds).")
    mean_shift_max: float = Field(description="max |z_c|.")
    var_ratio_median: float = Field(description="Median over channels of r_c.")
    log_var_ratio_rms: float = Field(description="RMS over channels of ln r_c.")
    initial_statistics: bool = Field(
        description="Running mean all 0 and running variance all 1: never updated."
    )
    flagged: bool


class BnStatisticsCheck(_Strict):
    """Every BatchNormalization's running statistics measured against data, in graph order."""

    checked: bool
    note: str | None = Field(None, description="Why not checked, or what limits the check.")
    inputs: str | None = Field(None, description="What the data was.")
    n_images: int = 0
    mean_shift_threshold: float | None = Field(
        None, description="A layer is flagged when the RMS of z_c exceeds this..."
    )
    log_var_ratio_threshold: float | None = Field(
        None, description="... or the RMS of ln r_c exceeds this."
    )
    layers: list[BnLayerCheck] = Field(default_factory=list)
    flagged: list[str] = Field(default_factory=list, description="Flagged layers, graph order.")
    causes: list[str] = Field(default_factory=list, description="What the numbers point at.")


class Recalibration(_Strict):
    """The running statistics were re-estimated on data before folding (`--recalibrate`)."""

    inputs: str = Field(description="The images the statistics were re-estimated on.")
    n_images: int
    layers: int = Field(description="BatchNormalization layers re-estimated.")
    original_sha256: str = Field(description="sha256 of the model file as given.")
    top1_agreement: float = Field(
        description="Top-1 agreement of the recalibrated with the original model on the images."
    )
    accuracy_before: float | None = Field(None, description="On labeled images (class folders).")
    accuracy_after: float | None = None


class Manifest(_Strict):
    """bundle.json."""

    schema_version: Literal[1] = SCHEMA_VERSION
    name: str = Field(pattern=NAME_PATTERN)
    version: str = "1"
    created: str
    classes: list[str] = Field(min_length=2)
    input: InputSpec
    output: OutputSpec
    files: dict[FileVariant, OnnxFile]
    fold_report: list[FoldRow]
    layer_probes: list[LayerProbe] = Field(default_factory=list)
    architecture: dict = Field(default_factory=dict, description="The ModelConfig trained.")
    training: dict = Field(default_factory=dict, description="Metrics of the training run.")
    versions: dict[str, str] = Field(default_factory=dict, description="torch, onnx, ...")
    equivalence: EquivalenceReport
    imported: ImportRecord | None = Field(None, description="Set by `bnfold import`.")
    layer_probes_note: str | None = Field(None, description="Why layer_probes is empty.")
    bn_statistics: BnStatisticsCheck | None = Field(
        None, description="The running statistics checked against data (held-out or samples)."
    )
    recalibration: Recalibration | None = Field(
        None, description="Set when the statistics were re-estimated before folding."
    )
    check_inputs: CheckInputs | None = None


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_manifest(bundle_dir: Path) -> Manifest:
    """Parse and validate bundle.json, with an error naming the file and the field. Every file
    it lists must be a plain name inside the bundle folder (`bundle_file`)."""
    path = Path(bundle_dir) / MANIFEST_NAME
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise BundleError(f"{path}: no {MANIFEST_NAME} in the bundle folder") from None
    except json.JSONDecodeError as exc:
        raise BundleError(f"{path}: not valid JSON ({exc})") from None
    try:
        manifest = Manifest.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise BundleError(f"{path}: invalid manifest at {where}: {first['msg']}") from None
    for field, name in listed_files(manifest):
        bundle_file(bundle_dir, name, field)
    return manifest


def listed_files(manifest: Manifest) -> list[tuple[str, str]]:
    """(manifest field, file name) of every file the manifest lists."""
    files = [(f"files.{variant}.path", f.path) for variant, f in manifest.files.items()]
    if manifest.check_inputs is not None:
        files.append(("check_inputs.path", manifest.check_inputs.path))
    return files


def bundle_file(bundle_dir: Path, name: str, field: str = "path") -> Path:
    """The file `name` of the bundle: a plain file name (no folder, no separator, not '.' or
    '..', not absolute) whose real path (symbolic links followed) lies in the bundle folder.
    Anything else raises BundleError without reading, hashing or even looking for the file it
    points at, so a manifest cannot make the server read (or reveal) a file outside its folder."""
    bundle_dir = Path(bundle_dir)
    plain = (
        bool(name)
        and name not in (".", "..")
        and "/" not in name
        and "\\" not in name
        and "\0" not in name
        and not os.path.isabs(name)
        and (os.altsep is None or os.altsep not in name)
    )
    if not plain:
        raise BundleError(
            f"{bundle_dir / MANIFEST_NAME}: {field} must be a file name inside the bundle folder "
            f"(no folder, separator, '..' or absolute path); it is {name[:80]!r}"
        )
    path = bundle_dir / name
    folder = os.path.realpath(bundle_dir)
    if os.path.dirname(os.path.realpath(path)) != folder:
        raise BundleError(
            f"{path}: {field} resolves outside the bundle folder (a symbolic link); a bundle "
            "holds its files itself"
        )
    return path


def verify_checksums(
    bundle_dir: Path, manifest: Manifest, variants: Collection[str] | None = None
) -> None:
    """Raise BundleError unless every ONNX file (or those of `variants`) matches its sha256.
    Only files confined to the bundle folder are read (`bundle_file`)."""
    for variant, f in manifest.files.items():
        if variants is not None and variant not in variants:
            continue
        path = bundle_file(bundle_dir, f.path, f"files.{variant}.path")
        if not path.is_file():
            raise BundleError(f"{path}: {variant} model file is missing")
        actual = sha256_file(path)
        if actual != f.sha256:
            raise BundleError(
                f"{path}: sha256 mismatch for the {variant} model "
                f"(manifest {f.sha256[:12]}..., file {actual[:12]}...): the file was modified"
            )


def load_bundle(bundle_dir: Path, variants: Collection[str] | None = None) -> Manifest:
    """Read the manifest and verify checksums (of `variants`' files, default all): the service's
    gate before creating sessions. The service checks the optional int8 file on its own, so a
    corrupted one costs only that variant."""
    manifest = read_manifest(bundle_dir)
    verify_checksums(bundle_dir, manifest, variants)
    return manifest


def write_bundle_atomically(target: Path, fill: Callable[[Path], None]) -> Path:
    """Build a bundle in a temporary sibling folder with `fill(tmp)`, then rename it into place.

    A crash mid-export leaves only a hidden temporary folder, never a half bundle that a server
    could load. An existing bundle at `target` is replaced.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        fill(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private; a bundle is meant to be read by servers
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / target.name)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def discover_bundles(models_dir: Path) -> list[Path]:
    """Bundle folders under models_dir: visible subfolders (temporary ones start with '.')."""
    models_dir = Path(models_dir)
    if not models_dir.is_dir():
        return []
    return sorted(p for p in models_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
