"""Verify a bundle end to end before anyone serves it (`bnfold verify`, `bnfold-train verify`).

Checks: the manifest parses, every ONNX file matches its sha256 and passes onnx.checker, the
BatchNormalization node counts match the fold report (unfolded keeps every BN row's node, folded
only the refused ones; Mul/Add rows, how Keras exports BN, have no BN node), the recorded op
counts match, an imported bundle's folded graph has nothing left to fold, and folded vs
unfolded logits, re-measured with onnxruntime, stay within the bundle's stated tolerance with
full top-1 agreement. An int8 variant, when the bundle has one, must agree with its report and
still meet its criterion against the folded model (bnfold.toolchain.int8.check_int8).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError

from bnfold.bundle import (
    INT8,
    VARIANTS,
    EquivalenceReport,
    FoldRow,
    LayerProbe,
    Manifest,
    load_bundle,
)
from bnfold.equivalence import (
    diff_stats,
    equivalence_report,
    is_equivalent,
    layer_diffs,
    tolerance_for,
)
from bnfold.errors import BnfoldError
from bnfold.preprocess import generated_batch
from bnfold.toolchain.int8 import check_int8
from bnfold.toolchain.sessions import (
    INPUT_BUDGET,
    RUN_BUDGET,
    make_probe_session,
    make_session,
    run_logits,
    within_budget,
)

N_VERIFY = 64  # generated inputs when the caller gives none
PROBE_BUDGET = 2**20  # input values whose per-layer probes are compared (6 images at 3x224x224)


def count_bn_nodes(proto: onnx.ModelProto) -> int:
    """BatchNormalization nodes in the graph (the fold report says how many must remain)."""
    return sum(n.op_type == "BatchNormalization" for n in proto.graph.node)


def expected_bn_nodes(rows: list[FoldRow]) -> dict[str, int]:
    """BN nodes each variant must hold: one per BatchNormalization row, folded ones removed."""
    bn_rows = [r for r in rows if r.op == "BatchNormalization"]
    folded = sum(not r.folded for r in bn_rows)
    return {"unfolded": len(bn_rows), "folded": folded, "int8": folded}  # int8: from folded


def measure_equivalence(
    bundle_dir: Path,
    input_name: str,
    output: str,
    probes: list[LayerProbe],
    x: np.ndarray,
    split: str,
    ref64: np.ndarray | None,
    inputs: str | None = None,
    reference_note: str | None = None,
    folded_session=None,
) -> EquivalenceReport:
    """Folded (full optimization) vs unfolded (BN executed) in onnxruntime, each vs float64,
    and each probe's tensor in the folded vs the unfolded graph (both unoptimized) on the first
    few inputs: every probe tensor of both graphs is held at once. The unfolded probe run gives
    those inputs' logits too; the plain unfolded session runs the rest (a session with every
    probe as an output runs slower: their buffers cannot be reused).
    `folded_session`: the caller's session of this folded.onnx, made as a folded one is."""
    d = Path(bundle_dir)
    folded_session = folded_session or make_session(d / "folded.onnx", "folded")
    folded = run_logits(folded_session, input_name, output, x)
    k = within_budget(x[0].size, 256, PROBE_BUDGET) if probes else 0
    per_layer, head = [], []
    if k:
        names = {v: [getattr(p, f"{v}_tensor") for p in probes] for v in ("folded", "unfolded")}
        fetch = {"folded": names["folded"], "unfolded": [output, *names["unfolded"]]}
        got = {
            v: make_probe_session(d / f"{v}.onnx", names[v]).run(fetch[v], {input_name: x[:k]})
            for v in ("folded", "unfolded")
        }
        head = [got["unfolded"][0]]
        per_layer = layer_diffs(probes, got["folded"], got["unfolded"][1:])
    unfolded_session = make_session(d / "unfolded.onnx", "unfolded")
    rest = [run_logits(unfolded_session, input_name, output, x[k:])] if len(x) > k else []
    return equivalence_report(
        folded,
        np.concatenate(head + rest),
        ref64,
        split=split,
        per_layer=per_layer,
        inputs=inputs,
        reference_note=reference_note,
    )


@dataclass
class VerifyResult:
    ok: bool
    lines: list[str] = field(default_factory=list)

    def fail(self, msg: str) -> None:
        self.ok = False
        self.lines.append(f"FAIL {msg}")

    def good(self, msg: str) -> None:
        self.lines.append(f"ok   {msg}")


def verify_bundle(
    bundle_dir: Path, x: np.ndarray | None = None, labels: np.ndarray | None = None
) -> VerifyResult:
    """Verify the bundle at bundle_dir, re-measuring equivalence on inputs x in the model's
    layout ((N, C, H, W) or (N, H, W, C)); generated inputs when x is None. labels (N,) let
    the int8 check re-measure the accuracy drop too."""
    res = VerifyResult(ok=True)
    try:
        manifest = load_bundle(bundle_dir)
    except BnfoldError as exc:
        res.fail(exc.message)
        return res
    res.good("manifest valid, sha256 of every model file matches")
    protos = {}
    for variant in VARIANTS:
        protos[variant] = _check_file(res, Path(bundle_dir), manifest, variant)
    if INT8 in manifest.files:
        _check_file(res, Path(bundle_dir), manifest, INT8)
    if res.ok and manifest.imported is not None:
        _check_nothing_left(res, protos["folded"])
    if manifest.check_inputs is not None:
        _check_stored_inputs(res, Path(bundle_dir), manifest)
    if not res.ok:
        return res
    if x is None:
        spec = manifest.input.preprocess
        x = generated_batch(spec, within_budget(spec.channels * spec.height * spec.width, N_VERIFY))
    _check_logits(res, Path(bundle_dir), manifest, x)
    int8 = check_int8(Path(bundle_dir), manifest, x, labels)
    if int8 is not None and int8[0]:
        res.good(int8[1])
    elif int8 is not None:
        res.fail(int8[1])
    return res


def _check_file(res: VerifyResult, bundle_dir: Path, manifest: Manifest, variant: str):
    """onnx.checker, BN count by the fold report's rows, recorded op counts."""
    f = manifest.files[variant]
    try:
        proto = onnx.load(str(bundle_dir / f.path))
    except DecodeError:  # its sha256 matched a manifest that was rewritten along with it
        res.fail(f"{f.path}: not a readable ONNX model")
        return None
    try:  # the checker reads the file itself: no copy serialized for it
        onnx.checker.check_model(str(bundle_dir / f.path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        res.fail(f"{f.path}: onnx.checker: {' '.join(str(exc).split())}")
        return proto
    expected = expected_bn_nodes(manifest.fold_report)[variant]
    n = count_bn_nodes(proto)
    if n != expected or n != f.batchnorm_nodes:
        res.fail(f"{f.path}: {n} BatchNormalization nodes, expected {expected}")
    else:
        res.good(f"{f.path}: {n} BatchNormalization nodes as the fold report says")
    if f.op_counts is not None:
        counts = dict(Counter(node.op_type for node in proto.graph.node))
        if counts != f.op_counts:
            res.fail(f"{f.path}: node counts {counts} differ from the manifest's {f.op_counts}")
    return proto


def _check_stored_inputs(res: VerifyResult, bundle_dir: Path, manifest: Manifest) -> None:
    from bnfold.bundle import sha256_file

    c = manifest.check_inputs
    path = bundle_dir / c.path
    if not path.is_file() or sha256_file(path) != c.sha256:
        res.fail(f"{c.path}: missing or its sha256 differs from the manifest")
    else:
        res.good(f"{c.path}: {c.n_images} check inputs, sha256 matches")


def _check_nothing_left(res: VerifyResult, folded: onnx.ModelProto) -> None:
    """Folding the folded graph again must fold nothing: no foldable BN or Mul/Add is left."""
    from bnfold.toolchain.fold import fold_onnx

    _, again = fold_onnx(folded)
    if again.folded:
        left = ", ".join(f"{r.bn} ({r.op})" for r in again.folded)
        res.fail(f"folded.onnx still has foldable nodes: {left}")
    else:
        res.good("folded.onnx: no foldable BatchNormalization or Mul/Add left")


def _check_logits(res: VerifyResult, bundle_dir: Path, manifest: Manifest, x: np.ndarray) -> None:
    name, out = manifest.input.name, manifest.output.name
    folded = run_logits(make_session(bundle_dir / "folded.onnx", "folded"), name, out, x)
    unfolded = run_logits(make_session(bundle_dir / "unfolded.onnx", "unfolded"), name, out, x)
    stats = diff_stats(folded, unfolded)
    tol = manifest.equivalence.tolerance_abs
    msg = (
        f"folded vs unfolded on {len(x)} inputs: max |diff| {stats.max_abs_diff:.3g} "
        f"(tolerance {tol:.3g}), top-1 agreement {stats.top1_agreement:.4f}"
    )
    if is_equivalent(stats, tol):
        res.good(msg)
    else:
        res.fail(msg)


N_FOLD_CHECK = 8  # random inputs `bnfold fold` compares the folded model on
FP16_ULPS = 16  # a float16 model's outputs: within 16 float16 ulps of their scale


def fold_agreement(
    original: onnx.ModelProto, folded: onnx.ModelProto, seed: int = 0
) -> tuple[bool | None, str]:
    """Folded vs original in onnxruntime on random N(0, 1) inputs, every output: (passed, line).

    Each float output must stay within the bundles' tolerance of its scale (bnfold.equivalence:
    2e-5 of it, or 3x the original's own float32 error against its float64 evaluation on the
    same inputs when that is larger; a full-size ResNet-50 differed by 3.27e-5 against 3.64e-5),
    or, for float16 outputs or float16 weights, within FP16_ULPS of float16's rounding at that
    scale (2e-5 is below one float16 ulp). passed is None when no inputs can be made (a
    variable dim other than the batch, a non-float input) or the original does not run on them.
    Outputs need not be logits: no top-1 test.
    """
    from bnfold.toolchain.load import ort_message

    feeds, reason = _random_feeds(original, np.random.default_rng(seed))
    if feeds is None:
        return None, f"not measured: {reason}"
    try:
        want = make_session(original.SerializeToString(), "unfolded").run(None, feeds)
    except Exception as exc:  # onnxruntime's own error types
        return None, f"not measured: the original fails on random inputs ({ort_message(exc)})"
    try:
        got = make_session(folded.SerializeToString(), "folded").run(None, feeds)
    except Exception as exc:
        return False, f"the folded model fails where the original runs ({ort_message(exc)})"
    half = any(t.data_type == onnx.TensorProto.FLOAT16 for t in original.graph.initializer)
    coarsest = float(np.finfo(np.float16).eps) if half else 0.0  # float16 weights: its rounding
    exact = _float64_outputs(original, feeds, len(want))
    worst = (0.0, 1.0)  # (diff, tolerance) of the output closest to failing
    passed = True
    for w, g, w64 in zip(want, got, exact, strict=True):
        if np.asarray(w).dtype.kind != "f":  # indices or labels (ArgMax): a near tie may flip
            continue
        diff, tol = _output_diff(np.asarray(w), np.asarray(g), coarsest, w64)
        passed &= bool(diff <= tol)  # NaN fails
        if not diff <= tol * worst[0] / worst[1]:  # a larger share of its tolerance, or NaN
            worst = (diff, tol)
    n = len(next(iter(feeds.values()), []))
    line = (
        f"folded vs original in onnxruntime on {n} random N(0, 1) inputs: max |diff| "
        f"{worst[0]:.3g} (tolerance {worst[1]:.3g})"
    )
    return passed, line


def _random_feeds(model: onnx.ModelProto, rng) -> tuple[dict | None, str]:
    """N(0, 1) values for every input the caller feeds ((batch, ...) as declared), or why not."""
    from bnfold.toolchain.load import dims, real_inputs

    feeds = {}
    for vi in real_inputs(model):
        tt = vi.type.tensor_type
        shape = dims(vi) if tt.HasField("shape") else None
        np_type = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type) if tt.elem_type else None
        if np_type is None or np_type.kind != "f" or shape is None:
            return None, f"input '{vi.name}' is not a float tensor of known rank"
        if not all(isinstance(d, int) for d in shape[1:]):
            return None, (
                f"input '{vi.name}' has variable dims {shape}; `bnfold import` measures it on "
                "images of a given size"
            )
        rest = [int(d) for d in shape[1:]]
        per_input = int(np.prod(rest, dtype=np.float64)) if rest else 1
        if per_input > INPUT_BUDGET:
            return None, (
                f"one input '{vi.name}' holds {per_input:.3g} values, over the {INPUT_BUDGET} "
                "this check holds"
            )
        batch = shape[0] if shape and isinstance(shape[0], int) else None
        n = batch or within_budget(per_input, N_FOLD_CHECK, RUN_BUDGET)
        feeds[vi.name] = rng.normal(size=[n, *rest] if shape else []).astype(np_type)
    return feeds, ""


def _float64_outputs(model: onnx.ModelProto, feeds: dict, count: int) -> list:
    """The original's outputs in float64 on `feeds` (bnfold.toolchain.reference), each None
    where it cannot be evaluated: the tolerance then is 2e-5 of the scale alone."""
    from bnfold.toolchain.reference import Float64Reference, ReferenceUnavailable, reused_heap

    try:
        with reused_heap():
            return list(Float64Reference(model).run(feeds))
    except (ReferenceUnavailable, MemoryError):  # an op it has no kernel for; too large
        return [None] * count


def _output_diff(
    w: np.ndarray, g: np.ndarray, coarsest: float, exact: np.ndarray | None = None
) -> tuple[float, float]:
    """(max |g - w| where w is finite, tolerance); NaN unless g has w's NaN/inf elsewhere (a
    Log or Sqrt of random inputs). `exact`: w's float64 evaluation, which widens the
    tolerance to the original's own float32 error when that is larger."""
    finite = np.isfinite(w)
    same_rest = np.array_equal(finite, np.isfinite(g)) and np.array_equal(
        w[~finite], g[~finite], equal_nan=True
    )
    w64, g64 = (np.where(finite, v, 0).astype(np.float64) for v in (w, g))
    ref = None
    if exact is not None and np.shape(exact) == w.shape:
        ref = np.where(finite, np.asarray(exact, dtype=np.float64), 0)
    tol = tolerance_for(w64, ref)
    eps = max(float(np.finfo(w.dtype).eps), coarsest)
    if eps > np.finfo(np.float32).eps:  # float16 outputs, or float16 layers inside
        scale = max(1.0, float(np.max(np.abs(w64))) if w64.size else 1.0)
        tol = max(tol, FP16_ULPS * eps * scale)
    diff = float(np.max(np.abs(g64 - w64), initial=0.0)) if same_rest else np.nan
    return diff, tol
