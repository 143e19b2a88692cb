"""Fold, export both ONNX variants, measure their equivalence, write the bundle atomically.

Traps avoided: torch's default dynamo exporter and the TorchScript exporter's
constant folding both fuse BN silently. The unfolded model is exported with the TorchScript
exporter and `training=PRESERVE` (the model is in eval mode, so BN exports with running
statistics); its BatchNormalization nodes are counted. The folded model is the original module
tree with the folded layers' new weights and each folded BN replaced by nn.Identity, so the ONNX
node names keep the module scopes that the per-layer probes are matched by.
"""

from __future__ import annotations

import copy
import datetime as dt
import io
import logging
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from bnfold.bundle import (
    INT8,
    EquivalenceReport,
    InputSpec,
    LayerDiff,
    LayerProbe,
    Manifest,
    OnnxFile,
    OutputSpec,
    sha256_file,
    write_bundle_atomically,
)
from bnfold.equivalence import equivalence_report, layer_diffs
from bnfold.toolchain.int8 import Int8Request, add_int8_variant
from bnfold.preprocess import PreprocessSpec
from bnfold.toolchain.sessions import make_probe_session, make_session, run_session
from bnfold.toolchain.verify import count_bn_nodes
from training.fold import FoldReport, fold_batchnorm

log = logging.getLogger(__name__)

OPSET = 17
INPUT_NAME, OUTPUT_NAME = "input", "logits"


def materialize_folded(model: nn.Module, folded_gm: nn.Module, report: FoldReport) -> nn.Module:
    """The original module tree with folded weights, each folded BN replaced by nn.Identity."""
    out = copy.deepcopy(model).eval()
    for row in report.folded:
        out.set_submodule(row.into, copy.deepcopy(folded_gm.get_submodule(row.into)))
        out.set_submodule(row.bn, nn.Identity())
    return out


def export_onnx(model: nn.Module, example: torch.Tensor) -> onnx.ModelProto:
    """TorchScript export, single file, dynamic batch, every remaining BN kept as a node.

    PRESERVE on an eval-mode model exports BN with its running statistics and stops the
    exporter from fusing it; in the folded model only the BNs our fold refused remain.
    """
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(
            model.eval(),
            (example,),
            buf,
            dynamo=False,
            opset_version=OPSET,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            training=torch.onnx.TrainingMode.PRESERVE,
        )
    proto = onnx.load_from_string(buf.getvalue())
    onnx.checker.check_model(proto, full_check=True)
    return proto


def scope_to_module_path(node_name: str) -> str:
    """'/features/features.0/conv/Conv' -> 'features.0.conv' (TorchScript exporter scopes)."""
    segments = node_name.strip("/").split("/")[:-1]
    path = ""
    for seg in segments:
        last = path.rsplit(".", 1)[-1] if path else ""
        if path and seg.startswith(last + ".") and not seg.startswith(path + "."):
            path = path + seg[len(last) :]
        elif path and seg.startswith(path + "."):
            path = seg
        else:
            path = f"{path}.{seg}" if path else seg
    return path


def module_output_tensor(proto: onnx.ModelProto, module_path: str) -> str | None:
    """Output of the last node in the module's scope (the module's output), or None."""
    found = None
    for node in proto.graph.node:
        if scope_to_module_path(node.name) == module_path:
            found = node.output[0]
    return found


def layer_probes(
    unfolded: onnx.ModelProto, folded: onnx.ModelProto, report: FoldReport
) -> list[LayerProbe]:
    """Tensors to compare per folded BN: BN output (unfolded) vs its folded layer's output."""
    probes = []
    for row in report.folded:
        unfolded_src = row.bn if row.direction == "backward" else row.into
        a = module_output_tensor(folded, row.into)
        b = module_output_tensor(unfolded, unfolded_src)
        if a is None or b is None:
            log.warning("no ONNX tensor found for %s: per-layer difference skipped", row.bn)
            continue
        probes.append(LayerProbe(bn=row.bn, folded_tensor=a, unfolded_tensor=b))
    return probes


def per_layer_diffs(
    folded_path: Path, unfolded_path: Path, probes: list[LayerProbe], x: np.ndarray
) -> list[LayerDiff]:
    """Run probe sessions that expose the matched tensors and diff them layer by layer."""
    if not probes:
        return []
    fs = make_probe_session(folded_path, [p.folded_tensor for p in probes])
    us = make_probe_session(unfolded_path, [p.unfolded_tensor for p in probes])
    f_out = fs.run([p.folded_tensor for p in probes], {INPUT_NAME: x})
    u_out = us.run([p.unfolded_tensor for p in probes], {INPUT_NAME: x})
    return layer_diffs(probes, f_out, u_out)


def measure_equivalence(
    model: nn.Module,
    folded_path: Path,
    unfolded_path: Path,
    probes: list[LayerProbe],
    x: np.ndarray,
    split: str,
) -> EquivalenceReport:
    """Folded (full optimization) vs unfolded (BN executed) in onnxruntime, and each vs float64."""
    folded = run_session(make_session(folded_path, "folded"), x)
    unfolded = run_session(make_session(unfolded_path, "unfolded"), x)
    with torch.no_grad():
        ref64 = copy.deepcopy(model).double().eval()(torch.from_numpy(x).double()).numpy()
    per_layer = per_layer_diffs(folded_path, unfolded_path, probes, x[:256])
    return equivalence_report(folded, unfolded, ref64, split=split, per_layer=per_layer)


def export_bundle(
    model: nn.Module,
    *,
    name: str,
    classes: list[str],
    spec: PreprocessSpec,
    eval_x: np.ndarray,
    split: str,
    out_dir: Path,
    architecture: dict | None = None,
    training_metrics: dict | None = None,
    int8: Int8Request | None = None,
) -> Manifest:
    """Fold `model`, export both variants, measure, and write models/<name>/ atomically.

    With `int8`, the folded model is also quantized and measured on eval_x; quantized.onnx is
    written only when it passes, and the equivalence report's int8 section says why not."""
    model = model.eval()
    folded_gm, report = fold_batchnorm(model)
    folded = materialize_folded(model, folded_gm, report)
    example = torch.from_numpy(eval_x[:2])
    with torch.no_grad():  # the materialized tree must compute exactly what the fx graph does
        if not torch.equal(folded(example), folded_gm(example)):
            raise RuntimeError("materialized folded model differs from the folded fx graph")
    unfolded_proto = export_onnx(model, example)
    folded_proto = export_onnx(folded, example)
    _check_bn_counts(model, unfolded_proto, folded_proto, report)
    probes = layer_probes(unfolded_proto, folded_proto, report)
    n_classes = len(classes)

    def fill(tmp: Path) -> Manifest:
        files = {}
        for variant, proto in (("folded", folded_proto), ("unfolded", unfolded_proto)):
            path = tmp / f"{variant}.onnx"
            onnx.save_model(proto, str(path))
            files[variant] = OnnxFile(
                path=path.name,
                sha256=sha256_file(path),
                batchnorm_nodes=count_bn_nodes(proto),
                opset=OPSET,
            )
        equivalence = measure_equivalence(
            model, tmp / "folded.onnx", tmp / "unfolded.onnx", probes, eval_x, split
        )
        if int8 is not None:
            entry, int8_report = add_int8_variant(tmp, int8, eval_x, split)
            if entry is not None:
                files[INT8] = entry
            equivalence = equivalence.model_copy(update={"int8": int8_report})
        manifest = Manifest(
            name=name,
            created=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            classes=list(classes),
            input=InputSpec(
                name=INPUT_NAME, shape=[-1, spec.channels, spec.height, spec.width], preprocess=spec
            ),
            output=OutputSpec(name=OUTPUT_NAME, shape=[-1, n_classes]),
            files=files,
            fold_report=report.rows,
            layer_probes=probes,
            architecture=architecture or {},
            training=training_metrics or {},
            versions={
                "torch": torch.__version__,
                "onnx": onnx.__version__,
                "onnxruntime": _ort_version(),
                "opset": str(OPSET),
            },
            equivalence=equivalence,
        )
        (tmp / "bundle.json").write_text(manifest.model_dump_json(indent=2) + "\n")
        holder.append(manifest)

    holder: list[Manifest] = []
    write_bundle_atomically(Path(out_dir) / name, fill)
    return holder[0]


def _check_bn_counts(model, unfolded_proto, folded_proto, report: FoldReport) -> None:
    n_bn = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if count_bn_nodes(unfolded_proto) != n_bn:
        raise RuntimeError(
            f"unfolded ONNX has {count_bn_nodes(unfolded_proto)} "
            f"BatchNormalization nodes, the model has {n_bn}: the exporter folded"
        )
    if count_bn_nodes(folded_proto) != len(report.refused):
        raise RuntimeError(
            f"folded ONNX has {count_bn_nodes(folded_proto)} BatchNormalization "
            f"nodes, expected {len(report.refused)} (the refused ones)"
        )


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__
