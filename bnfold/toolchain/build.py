"""The one path from an unfolded ONNX graph to a bundle: fold -> measure -> write.

Training (`training/export.py`, a model it exported with every BN kept) and `bnfold import` (the
user's graph, prepared for serving) both hand their `unfolded.onnx` here. Folding is
`bnfold.toolchain.fold` (one set of rules and refusal reasons for both), the equivalence report
is folded (full optimization) vs unfolded (BN executed) in onnxruntime and each against the
caller's float64 logits of the original model; reduced-precision variants (int8, bf16: when
asked) are judged against folded float32 on the same inputs,
which the bundle keeps for the server to check them again; the bundle is written atomically: a
fold that is not equivalent writes nothing.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from bnfold.bundle import (
    INT8,
    EquivalenceReport,
    InputSpec,
    LayerProbe,
    Manifest,
    OnnxFile,
    OutputSpec,
    sha256_file,
    write_bundle_atomically,
)
from bnfold.errors import BnfoldError
from bnfold.foldreport import FoldReport
from bnfold.toolchain.fold import FoldError, fold_onnx
from bnfold.toolchain.graph import infer_shapes_light
from bnfold.toolchain.int8 import Int8Request, add_int8_variant
from bnfold.toolchain.load import ModelImportError, default_opset, ort_session
from bnfold.toolchain.precision import bf16_report, save_check_inputs
from bnfold.toolchain.progress import stage
from bnfold.toolchain.verify import count_bn_nodes, measure_equivalence


class NotEquivalentError(BnfoldError):
    """The folded model is not equivalent within the tolerance: no bundle is written."""

    def __init__(self, message: str, report: EquivalenceReport) -> None:
        super().__init__(message)
        self.report = report


@dataclass
class Folded:
    """An unfolded graph and its fold: the folded graph, the report, the per-layer probes."""

    unfolded: onnx.ModelProto
    folded: onnx.ModelProto
    report: FoldReport
    probes: list[LayerProbe]
    probes_note: str | None
    session: Any = None  # onnxruntime's session of `folded` (the check), reused to measure it
    folded_bytes: bytes | None = None  # `folded` serialized once, for the session and the file


@dataclass
class Measurement:
    """The inputs equivalence is measured on and the original model's float64 logits on them."""

    x: np.ndarray  # (N, ...) in the model's input layout
    split: str  # "test", "samples", "generated"
    ref64: np.ndarray | None  # (N, classes) float64 logits of the original model, if measured
    inputs: str | None = None  # what x is, in words (import states it; training's split says it)
    reference_note: str | None = None  # why ref64 is None
    labels: np.ndarray | None = None  # (N,) labels of x, when it is a labeled split


@dataclass
class BundleSpec:
    """What bundle.json says besides the fold: name, classes, tensors, and the caller's own
    fields (training: architecture, training metrics; import: the import record)."""

    name: str
    classes: list[str]
    input: InputSpec
    output: OutputSpec
    versions: dict[str, str]
    extra: dict[str, Any] = field(default_factory=dict)


def fold_model(unfolded: onnx.ModelProto, source: str) -> Folded:
    """Fold, check onnxruntime runs the result, and find the per-layer probe tensors."""
    try:
        folded, report = fold_onnx(unfolded)
    except FoldError as exc:
        raise ModelImportError(f"{source}: cannot fold: {exc}") from None
    data = folded.SerializeToString()
    session = ort_session(data, Path(source), "folded")
    probes, note = layer_probes(report.rows, unfolded, folded)
    return Folded(unfolded, folded, report, probes, note, session, data)


def write_bundle(
    target: Path,
    fold: Folded,
    spec: BundleSpec,
    measure: Measurement,
    int8: Int8Request | None = None,
    bf16: bool = False,
) -> Manifest:
    """Save both graphs, measure their equivalence, add int8 and bf16 if asked, write
    bundle.json; all or nothing (a temporary folder renamed into place). A reduced-precision
    variant stores the inputs it was measured on, for the server to check it again."""
    holder: list[Manifest] = []

    def fill(tmp: Path) -> None:
        with stage("write"):
            files = {
                "folded": _save(tmp, "folded", fold.folded, fold.folded_bytes),
                "unfolded": _save(tmp, "unfolded", fold.unfolded),
            }
        with stage("measure"):
            eq = measure_equivalence(
                tmp,
                spec.input.name,
                spec.output.name,
                fold.probes,
                measure.x,
                measure.split,
                ref64=measure.ref64,
                inputs=measure.inputs,
                reference_note=measure.reference_note,
                folded_session=fold.session,
            )
        if not eq.passed:
            raise NotEquivalentError(not_equivalent_message(eq, fold.unfolded), eq)
        if int8 is not None:
            with stage("int8 variant"):
                entry, int8_report = add_int8_variant(tmp, int8, measure.x, measure.split)
            if entry is not None:
                files[INT8] = entry
            eq = eq.model_copy(update={"int8": int8_report})
        if bf16:
            folded = tmp / "folded.onnx"
            names = (spec.input.name, spec.output.name)
            with stage("bf16 variant"):
                report = bf16_report(folded, *names, measure.x, measure.labels, measure.split)
            eq = eq.model_copy(update={"bf16": report})
        checks = None
        if int8 is not None or bf16:
            source = measure.inputs or f"{len(measure.x)} images of the {measure.split} split"
            checks = save_check_inputs(tmp, measure.x, source)
        manifest = Manifest(
            name=spec.name,
            created=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            classes=list(spec.classes),
            input=spec.input,
            output=spec.output,
            files=files,
            fold_report=fold.report.rows,
            layer_probes=fold.probes,
            layer_probes_note=fold.probes_note,
            versions=spec.versions,
            equivalence=eq,
            check_inputs=checks,
            **spec.extra,
        )
        (tmp / "bundle.json").write_text(manifest.model_dump_json(indent=2) + "\n")
        holder.append(manifest)

    write_bundle_atomically(Path(target), fill)
    return holder[0]


def layer_probes(report_rows, unfolded: onnx.ModelProto, folded: onnx.ModelProto):
    """One probe per folded row whose `probe` tensor is a float32 tensor of both graphs (the
    probe sessions read float32), and a note if none."""
    f32 = [_float32_tensors(m) for m in (unfolded, folded)]
    rows = [r for r in report_rows if r.folded and r.probe]
    probes = [
        LayerProbe(bn=r.bn, folded_tensor=r.probe, unfolded_tensor=r.probe)
        for r in rows
        if all(r.probe in names for names in f32)
    ]
    if probes:
        return probes, None
    if not any(r.folded for r in report_rows):
        return [], "nothing was folded, so there are no per-layer differences to show"
    if rows and all(r.probe in {o for n in folded.graph.node for o in n.output} for r in rows):
        return [], "the folded layers' outputs are not float32, so they have no probe points"
    return [], "the folded graph has no tensor matching a folded layer's output (no probe points)"


def _float32_tensors(model: onnx.ModelProto) -> set[str]:
    """Node outputs that shape inference types as float32."""
    try:
        inferred = infer_shapes_light(model)
    except Exception:  # onnx raises several types; no types known, no probes
        return set()
    g = inferred.graph
    typed = {
        v.name for v in (*g.value_info, *g.output, *g.input)
        if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    }  # fmt: skip
    return typed & {o for n in g.node for o in n.output}


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    return dict(sorted(Counter(n.op_type for n in model.graph.node).items()))


def _save(
    folder: Path, variant: str, model: onnx.ModelProto, data: bytes | None = None
) -> OnnxFile:
    """`data`: the model already serialized (the same bytes onnx.save_model would write)."""
    path = folder / f"{variant}.onnx"
    path.write_bytes(model.SerializeToString() if data is None else data)
    return OnnxFile(
        path=path.name,
        sha256=sha256_file(path),
        batchnorm_nodes=count_bn_nodes(model),
        opset=default_opset(model),
        op_counts=op_counts(model),
    )


def not_equivalent_message(eq: EquivalenceReport, model: onnx.ModelProto) -> str:
    s = eq.folded_vs_unfolded
    half = any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer)
    hint = (
        "; the model computes in float16, whose rounding (~1e-3) a fold changes by more than "
        "the float32 tolerance: fold the float32 model, then convert it"
        if half
        else ""
    )
    return (
        f"folded model not equivalent: max |folded - unfolded| {s.max_abs_diff:.3g} "
        f"(tolerance {eq.tolerance_abs:.3g}), top-1 agreement {s.top1_agreement}{hint}; "
        "no bundle written"
    )


def toolchain_versions(model: onnx.ModelProto) -> dict[str, str]:
    """The versions that made the bundle's files."""
    import onnxruntime

    return {
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "opset": str(default_opset(model)),
    }
