"""Reduced-precision variants proved on the CPU that serves them.

A bf16 variant is folded.onnx computed in bfloat16 by OpenVINO's CPU plugin, judged like int8:
top-1 agreement with folded float32 (at least 99%) and, on labeled images, the accuracy drop (at
most 1 point). Its numbers, like int8's, depend on the CPU's kernels, so the bundle stores the
inputs it was measured on (`check_inputs.npy`) and the server measures each reduced-precision
variant again on them, on its own CPU, before serving it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bnfold.bundle import (
    CheckInputs,
    Manifest,
    ReducedPrecisionReport,
    bundle_file,
    sha256_file,
)
from bnfold.equivalence import diff_stats
from bnfold.toolchain.engines import OpenVinoSession, bf16_unavailable_reason, cpu_flags
from bnfold.toolchain.quantize import accuracies, failure_reason, verdict
from bnfold.toolchain.sessions import make_session, run_logits

CHECK_INPUTS_FILE = "check_inputs.npy"
CHECK_INPUT_BYTES = 8 * 2**20  # stored inputs at most: 64 digits images, ~13 at 3x224x224
MIN_CHECK_INPUTS = 8


def save_check_inputs(folder: Path, x: np.ndarray, source: str) -> CheckInputs:
    """The first inputs of x that fit CHECK_INPUT_BYTES (at least MIN_CHECK_INPUTS)."""
    n = max(MIN_CHECK_INPUTS, CHECK_INPUT_BYTES // max(1, x[0].nbytes))
    path = Path(folder) / CHECK_INPUTS_FILE
    np.save(path, np.ascontiguousarray(x[:n], dtype=np.float32), allow_pickle=False)
    return CheckInputs(path=path.name, sha256=sha256_file(path), n_images=len(x[:n]), source=source)


def load_check_inputs(bundle_dir: Path, manifest: Manifest) -> np.ndarray | None:
    """The bundle's stored check inputs when its checksum matches, else None. Raises
    BundleError for a path that leaves the bundle folder (nothing outside it is read)."""
    c = manifest.check_inputs
    if c is None:
        return None
    path = bundle_file(bundle_dir, c.path, "check_inputs.path")
    if not path.is_file() or sha256_file(path) != c.sha256:
        return None
    return np.load(path, allow_pickle=False)


def bf16_report(
    folded: Path, input_name: str, output: str, x: np.ndarray, labels, split: str
) -> ReducedPrecisionReport | None:
    """bf16 (OpenVINO) vs folded float32 (onnxruntime) on x; not passed, with the reason,
    where this CPU or installation cannot compute it (a server on another CPU may)."""
    where = {"precision": "bf16", "cpu_features": list(cpu_flags()), "split": split}
    unavailable = bf16_unavailable_reason()
    if unavailable is not None:
        why = f"not measured where the bundle was made: {unavailable}"
        return ReducedPrecisionReport(engine="openvino CPU", n_images=0, **where, **verdict(why))
    import openvino

    want = run_logits(make_session(Path(folded), "folded"), input_name, output, x)
    got = run_logits(OpenVinoSession(Path(folded), "bf16"), input_name, output, x)
    stats = diff_stats(got, want)
    acc_f, acc_v, drop = accuracies(got, want, labels)
    return ReducedPrecisionReport(
        engine=f"openvino {openvino.__version__} CPU",
        n_images=len(x),
        vs_folded=stats,
        accuracy_folded=acc_f,
        accuracy_variant=acc_v,
        accuracy_drop_points=drop,
        **where,
        **verdict(failure_reason(stats, drop, split, "bf16")),
    )


def recheck(variant: str, got: np.ndarray, want: np.ndarray, source: str) -> str | None:
    """The server's check of a reduced-precision variant on this CPU: None when it passes,
    else why it is not served."""
    reason = failure_reason(diff_stats(got, want), None, f"{len(got)} check", variant)
    return None if reason is None else f"failed its check on this CPU ({source}): {reason}"


def summary_line(r: ReducedPrecisionReport) -> str:
    """The bf16 report in one line, as the commands print it."""
    acc = ""
    if r.accuracy_folded is not None:
        acc = f", accuracy {r.accuracy_folded:.2%} -> {r.accuracy_variant:.2%}"
    if r.vs_folded is None:
        return f"bf16: {r.reason}"
    verdict = "passed (checked again where it is served)" if r.passed else f"failed: {r.reason}"
    return (
        f"bf16 ({r.engine}): on {r.n_images} {r.split} inputs top-1 agreement with folded "
        f"{r.vs_folded.top1_agreement:.2%}, max |bf16 - folded| {r.vs_folded.max_abs_diff:.3g}"
        f"{acc}; {verdict}"
    )
