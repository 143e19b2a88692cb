"""One definition of "equivalent" for export, verify and live compare."""

import numpy as np

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
