"""Fold BatchNormalization and per-channel constant Mul/Add chains in an ONNX graph, exactly.

Torch-free (onnx + numpy). Work in progress: the public API below is stable.
"""

from __future__ import annotations

from pathlib import Path

import onnx

from bnfold.foldreport import FoldReport

MAX_MODEL_BYTES = 2**31 - 1  # protobuf's limit for one serialized ModelProto


class FoldError(ValueError):
    """The model cannot be folded at all (not per node: those are refusals in the report)."""


def fold_onnx(model: onnx.ModelProto) -> tuple[onnx.ModelProto, FoldReport]:
    """Fold every per-channel affine map of `model` that folds exactly; a new model + report.

    The input is left untouched. Raises FoldError for a model that cannot be processed at all.
    """
    raise NotImplementedError


def fold_onnx_file(src: Path, dst: Path) -> FoldReport:
    """Load `src` (external data included), fold it, write `dst` atomically; the report."""
    raise NotImplementedError
