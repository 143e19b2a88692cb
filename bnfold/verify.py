"""`bnfold-train verify`: re-check a bundle end to end before anyone serves it.

Checks: the manifest parses, every ONNX file matches its sha256 and passes onnx.checker, the
BatchNormalization node counts match the fold report (unfolded keeps every BN, folded keeps only
the refused ones), and folded vs unfolded logits, re-measured with onnxruntime, stay within the
bundle's stated tolerance with full top-1 agreement.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from bnfold.bundle import load_bundle
from bnfold.equivalence import diff_stats
from bnfold.errors import BnfoldError
from bnfold.sessions import make_session, run_session


def count_bn_nodes(proto: onnx.ModelProto) -> int:
    """BatchNormalization nodes in the graph (the fold report says how many must remain)."""
    return sum(n.op_type == "BatchNormalization" for n in proto.graph.node)


@dataclass
class VerifyResult:
    ok: bool
    lines: list[str] = field(default_factory=list)

    def fail(self, msg: str) -> None:
        self.ok = False
        self.lines.append(f"FAIL {msg}")

    def good(self, msg: str) -> None:
        self.lines.append(f"ok   {msg}")


def verify_bundle(bundle_dir: Path, x: np.ndarray) -> VerifyResult:
    """Verify the bundle at bundle_dir, re-measuring equivalence on inputs x (N, C, H, W)."""
    res = VerifyResult(ok=True)
    try:
        manifest = load_bundle(bundle_dir)
    except BnfoldError as exc:
        res.fail(exc.message)
        return res
    res.good("manifest valid, sha256 of folded.onnx and unfolded.onnx match")
    n_rows, n_refused = len(manifest.fold_report), sum(not r.folded for r in manifest.fold_report)
    expected = {"unfolded": n_rows, "folded": n_refused}
    for variant, f in manifest.files.items():
        proto = onnx.load(str(Path(bundle_dir) / f.path))
        try:
            onnx.checker.check_model(proto, full_check=True)
        except onnx.checker.ValidationError as exc:
            res.fail(f"{f.path}: onnx.checker: {exc}")
            continue
        n = count_bn_nodes(proto)
        if n != expected[variant] or n != f.batchnorm_nodes:
            res.fail(f"{f.path}: {n} BatchNormalization nodes, expected {expected[variant]}")
        else:
            res.good(f"{f.path}: {n} BatchNormalization nodes as the fold report says")
    if not res.ok:
        return res
    folded = run_session(make_session(Path(bundle_dir) / "folded.onnx", "folded"), x)
    unfolded = run_session(make_session(Path(bundle_dir) / "unfolded.onnx", "unfolded"), x)
    stats = diff_stats(folded, unfolded)
    tol = manifest.equivalence.tolerance_abs
    msg = (
        f"folded vs unfolded on {len(x)} inputs: max |diff| {stats.max_abs_diff:.3g} "
        f"(tolerance {tol:.3g}), top-1 agreement {stats.top1_agreement:.4f}"
    )
    if stats.max_abs_diff <= tol and stats.top1_agreement == 1.0:
        res.good(msg)
    else:
        res.fail(msg)
    return res
