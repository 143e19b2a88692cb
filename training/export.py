"""Export a trained model to ONNX with every BN kept, and hand it to the one bundle path.

The bundle is folded, measured and written by `bnfold.toolchain.build`, the same path
`bnfold import` takes; training adds its metadata (architecture, training metrics, torch
version), its own float64 reference (the torch model itself, run in float64), and the check
of every BN's running statistics against the held-out split (bnfold.toolchain.bnstats).

Traps avoided: torch's default dynamo exporter and the TorchScript exporter's constant folding
both fuse BN silently. The model is exported with the TorchScript exporter and
`training=PRESERVE` (the model is in eval mode, so BN exports with running statistics); its
BatchNormalization nodes are counted. Layer and BN nodes are renamed to their module paths
(`features.0.bn`), so the fold report names the modules a PyTorch user knows.
"""

from __future__ import annotations

import copy
import io
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from bnfold.bundle import InputSpec, Manifest, OutputSpec
from bnfold.preprocess import PreprocessSpec
from bnfold.toolchain.bnstats import check_statistics
from bnfold.toolchain.build import (
    BundleSpec,
    Measurement,
    fold_model,
    toolchain_versions,
    write_bundle,
)
from bnfold.toolchain.int8 import Int8Request
from bnfold.toolchain.verify import count_bn_nodes

OPSET = 17
INPUT_NAME, OUTPUT_NAME = "input", "logits"
NAMED_OPS = ("BatchNormalization", "Conv", "ConvTranspose", "Gemm", "MatMul")


def export_onnx(model: nn.Module, example: torch.Tensor) -> onnx.ModelProto:
    """TorchScript export, single file, dynamic batch, every BN kept as a node.

    PRESERVE on an eval-mode model exports BN with its running statistics and stops the
    exporter from fusing it.
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


def name_nodes_by_module(proto: onnx.ModelProto) -> None:
    """Rename each BN and layer node to its module path when that path names one node only."""
    nodes = [n for n in proto.graph.node if n.op_type in NAMED_OPS]
    paths = [scope_to_module_path(n.name) for n in nodes]
    taken = Counter(paths) + Counter(n.name for n in proto.graph.node)
    for node, path in zip(nodes, paths, strict=True):
        if path and taken[path] == 1:
            node.name = path


def float64_logits(model: nn.Module, x: np.ndarray) -> np.ndarray:
    """The torch model itself in float64: the reference the bundle's equivalence is measured
    against, independent of ONNX."""
    with torch.no_grad():
        return copy.deepcopy(model).double().eval()(torch.from_numpy(x).double()).numpy()


def export_bundle(
    model: nn.Module,
    *,
    name: str,
    classes: list[str],
    spec: PreprocessSpec,
    eval_x: np.ndarray,
    split: str,
    out_dir: Path,
    eval_labels: np.ndarray | None = None,
    architecture: dict | None = None,
    training_metrics: dict | None = None,
    int8: Int8Request | None = None,
    bf16: bool = False,
) -> Manifest:
    """Export `model` with its BNs, then fold, measure and write models/<name>/ atomically.

    With `int8`, the folded model is also quantized and measured on eval_x; quantized.onnx is
    written only when it passes, and the equivalence report's int8 section says why not. With
    `bf16`, the bf16 variant is measured too (eval_labels give its accuracy drop)."""
    model = model.eval()
    unfolded = export_onnx(model, torch.from_numpy(eval_x[:2]))
    _check_bn_count(model, unfolded)
    name_nodes_by_module(unfolded)
    fold = fold_model(unfolded, f"model {name!r}")
    bundle = BundleSpec(
        name=name,
        classes=list(classes),
        input=InputSpec(
            name=INPUT_NAME, shape=[-1, spec.channels, spec.height, spec.width], preprocess=spec
        ),
        output=OutputSpec(name=OUTPUT_NAME, shape=[-1, len(classes)]),
        versions={"torch": torch.__version__, **toolchain_versions(unfolded)},
        extra={
            "architecture": architecture or {},
            "training": training_metrics or {},
            "bn_statistics": check_statistics(
                unfolded, INPUT_NAME, eval_x, f"{len(eval_x)} images of the {split} split"
            ),
        },
    )
    measure = Measurement(eval_x, split, float64_logits(model, eval_x), labels=eval_labels)
    return write_bundle(Path(out_dir) / name, fold, bundle, measure, int8, bf16)


def _check_bn_count(model: nn.Module, unfolded: onnx.ModelProto) -> None:
    n_bn = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if count_bn_nodes(unfolded) != n_bn:
        raise RuntimeError(
            f"unfolded ONNX has {count_bn_nodes(unfolded)} "
            f"BatchNormalization nodes, the model has {n_bn}: the exporter folded"
        )
