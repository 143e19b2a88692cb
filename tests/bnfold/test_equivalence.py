"""One definition of "equivalent" for export, verify and live compare."""

import numpy as np
import pytest

from bnfold.equivalence import diff_stats, is_equivalent


def test_equivalent_needs_both_the_tolerance_and_the_same_predictions():
    ref = np.array([[1.0, 0.9999999], [0.0, 2.0]], dtype=np.float32)
    close = ref + np.float32(1e-6)
    assert is_equivalent(diff_stats(close, ref), tolerance_abs=1e-5)
    # Within the tolerance, but row 0's top-1 class flips: not equivalent.
    flipped = ref.copy()
    flipped[0] = [0.9999995, 1.0000000]
    stats = diff_stats(flipped, ref)
    assert stats.max_abs_diff <= 1e-5 and stats.top1_agreement == 0.5
    assert not is_equivalent(stats, tolerance_abs=1e-5)
    # Same predictions, over the tolerance: not equivalent.
    assert not is_equivalent(diff_stats(ref + np.float32(1e-3), ref), tolerance_abs=1e-5)


def test_non_classifying_outputs_are_judged_by_the_tolerance_alone():
    ref = np.arange(12, dtype=np.float32).reshape(3, 4)
    stats = diff_stats(ref + np.float32(1e-6), ref, classify=False)
    assert stats.top1_agreement is None and is_equivalent(stats, tolerance_abs=1e-5)


def _report(folded, unfolded, ref64):
    from bnfold.equivalence import equivalence_report

    return equivalence_report(folded, unfolded, ref64, split="generated", per_layer=[])


def test_tolerance_widens_to_the_original_models_own_float32_error():
    """Two float32 evaluations of one function, each off from the float64 answer by about e in
    opposite directions, are 2e apart: equivalent when e is the original's own error, even
    past 2e-5 of the scale (the numbers of a tiny MobileNetV2: 2.31e-5 and 2.48e-5 off, 4.8e-5
    apart, scale 2.35)."""
    from bnfold.equivalence import FLOAT32_ERRORS, REL_TOLERANCE, tolerance_for

    truth = np.array([[2.35, -1.0, 0.5], [0.1, 1.7, -2.0]])
    unfolded = truth.copy()
    unfolded[0, 0] += 2.31e-5
    folded = truth.copy()
    folded[0, 0] -= 2.48e-5
    assert tolerance_for(unfolded) == pytest.approx(REL_TOLERANCE * np.abs(unfolded).max())
    assert tolerance_for(unfolded, truth) == pytest.approx(FLOAT32_ERRORS * 2.31e-5)
    assert not _report(folded, unfolded, None).passed  # 4.8e-5 > 2e-5 of the scale
    report = _report(folded, unfolded, truth)
    assert report.passed and report.tolerance_abs == pytest.approx(6.93e-5)
    # A model whose float32 error is tiny keeps 2e-5 of the scale, and a fold that is wrong
    # by more fails whatever the reference says.
    exact = truth + 1e-9
    assert tolerance_for(exact, truth) == pytest.approx(REL_TOLERANCE * np.abs(exact).max())
    wrong = truth.copy()
    wrong[1, 2] += 1e-3
    assert not _report(wrong, exact, truth).passed
    assert not _report(wrong, unfolded, truth).passed


def test_a_reference_of_another_shape_or_not_finite_leaves_the_tolerance_alone():
    from bnfold.equivalence import REL_TOLERANCE, tolerance_for

    unfolded = np.array([[3.0, -1.0]])
    base = REL_TOLERANCE * 3.0
    assert tolerance_for(unfolded, np.zeros((2, 2))) == pytest.approx(base)
    assert tolerance_for(unfolded, np.array([[np.nan, -1.0]])) == pytest.approx(base)
