"""The fold report: one `FoldRow` per BatchNorm (or per-channel Mul/Add chain), torch-free.

Both folds produce it: `bnfold/toolchain/fold.py` (ONNX graphs, the one that makes bundles) and
`training/fold.py` (torch.fx, `fold_batchnorm` for PyTorch users). The rows are what
`bundle.json` stores under `fold_report`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from bnfold.bundle import FoldRow

# Refusal reasons both folds give in the same words.
PADDED_REASON = "not folded: next conv is zero-padded, forward fold inexact"


@dataclass
class FoldReport:
    """One FoldRow per BatchNorm (or affine chain) found, in graph order."""

    rows: list[FoldRow] = field(default_factory=list)

    @property
    def folded(self) -> list[FoldRow]:
        return [r for r in self.rows if r.folded]

    @property
    def refused(self) -> list[FoldRow]:
        return [r for r in self.rows if not r.folded]

    @property
    def warnings(self) -> list[FoldRow]:
        return [r for r in self.rows if r.warning]

    def summary(self) -> str:
        """One line per row: what happened, the range of |s|, any warning."""
        return "\n".join(_summary_line(r) for r in self.rows)


def _summary_line(r: FoldRow) -> str:
    what = f"folded {r.direction} into {r.into}" if r.folded else r.reason
    scale = "" if r.scale_max is None else f"  |s| in [{r.scale_min:.3g}, {r.scale_max:.3g}]"
    warn = f"  WARNING: {r.warning}" if r.warning else ""
    op = "" if r.op == "BatchNormalization" else f" ({r.op})"
    return f"{r.bn}{op}: {what}{scale}{warn}"
