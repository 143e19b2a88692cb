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
# With the float64 reference, the tolerance is at least this many times the float32 error the
# unfolded model itself makes on the check inputs: folded and unfolded are two float32
# evaluations of one function, each off by about that much, possibly in opposite directions, so
# they can differ by twice it; the third part is room for the folded graph rounding somewhat
# worse than the original and for another CPU's kernels when the bundle is verified there.
# (A tiny MobileNetV2 measured: unfolded 2.31e-5 from float64, folded 2.48e-5 on the other
# side, 4.8e-5 apart, against 2e-5 of its scale, 4.7e-5.) A wrong fold is off by orders of
# magnitude more.
FLOAT32_ERRORS = 3.0


def tolerance_for(unfolded_logits: np.ndarray, reference64: np.ndarray | None = None) -> float:
    """The absolute tolerance for these logits: REL_TOLERANCE x max(1, max |logit|), or, given
    the float64 reference of the same inputs, FLOAT32_ERRORS x max |unfolded - reference| when
    that is larger (the unfolded model's own float32 error)."""
    scale = float(np.max(np.abs(unfolded_logits))) if unfolded_logits.size else 1.0
    tolerance = REL_TOLERANCE * max(1.0, scale)
    if reference64 is not None and reference64.shape == unfolded_logits.shape:
        error = np.abs(np.asarray(unfolded_logits, np.float64) - reference64)
        own = float(error.max()) if error.size else 0.0
        if np.isfinite(own):
            tolerance = max(tolerance, FLOAT32_ERRORS * own)
    return tolerance


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
    evaluated: reference_note says why; the tolerance is then 2e-5 of the scale alone)."""
    fvu = diff_stats(folded, unfolded)
    tol = tolerance_for(unfolded, ref64)
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
