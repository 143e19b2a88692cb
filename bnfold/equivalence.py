"""Folded-vs-unfolded difference statistics: one implementation for export and live compare.

numpy only. `max_rel_diff` divides the largest absolute difference by the largest magnitude of the
reference, so the figure reads as "how many float32 ulps of the logit scale" at a glance
(float32 epsilon is 1.19e-7).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from bnfold.bundle import DiffStats, EquivalenceReport, LayerDiff, LayerProbe


def diff_stats(a: np.ndarray, reference: np.ndarray, classify: bool = True) -> DiffStats:
    """Elementwise |a - reference| in float64; argmax agreement over rows when classify."""
    a64 = np.asarray(a, dtype=np.float64)
    r64 = np.asarray(reference, dtype=np.float64)
    if a64.shape != r64.shape:
        raise ValueError(f"shape mismatch: {a64.shape} vs {r64.shape}")
    diff = np.abs(a64 - r64)
    scale = float(np.max(np.abs(r64))) if r64.size else 0.0
    max_abs = float(diff.max()) if diff.size else 0.0
    agreement = None
    if classify and a64.ndim == 2 and len(a64):
        agreement = float(np.mean(a64.argmax(1) == r64.argmax(1)))
    return DiffStats(
        max_abs_diff=max_abs,
        mean_abs_diff=float(diff.mean()) if diff.size else 0.0,
        max_rel_diff=max_abs / scale if scale > 0 else 0.0,
        top1_agreement=agreement,
    )


# Pass criterion for folded vs unfolded logits, relative to the logit scale (max |logit|, at
# least 1). float32 epsilon is 1.19e-7; each conv/linear layer adds rounding on dot products of up
# to a few hundred terms, and folding moves where rounding happens. 2e-5 of the scale (~170 ulps)
# is 10x above what we measure on the default model and far below any change of prediction.
REL_TOLERANCE = 2e-5


def tolerance_for(unfolded_logits: np.ndarray) -> float:
    """The absolute tolerance for these reference logits: REL_TOLERANCE x max(1, max |logit|)."""
    scale = float(np.max(np.abs(unfolded_logits))) if unfolded_logits.size else 1.0
    return REL_TOLERANCE * max(1.0, scale)


def is_equivalent(stats: DiffStats, tolerance_abs: float) -> bool:
    """The one definition of "equivalent", used by export, verify and live compare: every logit
    within the bundle's tolerance and the same top-1 class for every input."""
    agreement = 1.0 if stats.top1_agreement is None else stats.top1_agreement
    return stats.max_abs_diff <= tolerance_abs and agreement == 1.0


def equivalence_report(
    folded: np.ndarray,
    unfolded: np.ndarray,
    ref64: np.ndarray | None,
    *,
    split: str,
    per_layer: list[LayerDiff],
    inputs: str | None = None,
    reference_note: str | None = None,
) -> EquivalenceReport:
    """The report export and import store: folded vs unfolded logits judged by the one rule,
    and each against the float64 reference of the original model (None when it could not be
    evaluated: reference_note says why, and the rule does not need it)."""
    fvu = diff_stats(folded, unfolded)
    tol = tolerance_for(unfolded)
    return EquivalenceReport(
        split=split,
        n_images=len(folded),
        tolerance_abs=tol,
        folded_vs_unfolded=fvu,
        folded_vs_float64=None if ref64 is None else diff_stats(folded, ref64),
        unfolded_vs_float64=None if ref64 is None else diff_stats(unfolded, ref64),
        reference_note=reference_note,
        per_layer=per_layer,
        passed=is_equivalent(fvu, tol),
        inputs=inputs,
    )


def layer_diffs(
    probes: Sequence[LayerProbe],
    folded: Sequence[np.ndarray],
    unfolded: Sequence[np.ndarray],
) -> list[LayerDiff]:
    """One row per probe: its folded layer's output vs the matching unfolded (BN) output."""
    rows = []
    for probe, a, b in zip(probes, folded, unfolded, strict=True):
        s = diff_stats(a, b, classify=False)
        rows.append(
            LayerDiff(
                **probe.model_dump(),
                max_abs_diff=s.max_abs_diff,
                mean_abs_diff=s.mean_abs_diff,
                max_rel_diff=s.max_rel_diff,
            )
        )
    return rows


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row softmax in float64 for stable probabilities."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)
