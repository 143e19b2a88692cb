"""bnfold: fold an ONNX model, import one into a served bundle, verify a bundle. No torch.

    bnfold fold IN.onnx OUT.onnx             fold BN and per-channel Mul/Add, print the report
    bnfold import MODEL.onnx --name NAME ... write models/<name>/ (folded, unfolded, bundle.json)
    bnfold verify models/<name>              checksums, node counts, equivalence re-measured
    bnfold doctor BUNDLE|MODEL --samples DIR BN running statistics against the images

A mistake (a bad file, flag or name) prints one line on stderr and exits 2 without writing
anything; a folded model that is not equivalent exits 1 and writes nothing.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path

from bnfold.errors import BnfoldError

PROG = "bnfold"


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line on stderr (exit 2), not usage + error."""

    help_hint = True  # end the line with "(see PROG --help)"

    def error(self, message: str):
        hint = f" (see {self.prog} --help)" if self.help_hint else ""
        self.exit(2, f"{self.prog}: error: {message}{hint}\n")


def _size(text: str) -> int | tuple[int, int]:
    """'32' (with a second value) or '32x48'."""
    try:
        if "x" in text.lower():
            h, w = (int(v) for v in text.lower().split("x"))
        else:
            h = w = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected H W or HxW in pixels, got {text!r}") from None
    if h < 1 or w < 1:
        raise argparse.ArgumentTypeError(f"sizes must be >= 1 pixel, got {text!r}")
    return (h, w) if "x" in text.lower() else h


def _count(text: str) -> int:
    """A class count: an integer >= 2 (a classifier has at least two classes)."""
    from bnfold.toolchain.int8 import whole_number

    return whole_number(text, 2, "expected an integer", "a classifier has at least 2 classes")


def parse_size(values: list | None) -> tuple[int, int] | None:
    if not values:
        return None
    if len(values) == 1 and isinstance(values[0], tuple):
        return values[0]
    if len(values) == 2 and all(isinstance(v, int) for v in values):
        return values[0], values[1]
    raise BnfoldError("--size takes H W or HxW, e.g. --size 32 32 or --size 32x32")


def cmd_fold(args: argparse.Namespace) -> int:
    from bnfold.toolchain.fold import FoldError, fold_onnx, write_model_atomically
    from bnfold.toolchain.load import ModelImportError, load_onnx, ort_session
    from bnfold.toolchain.verify import fold_agreement

    src, dst = Path(args.src), Path(args.dst)
    loaded = load_onnx(src)  # the same one-line refusals as import: not ONNX, truncated, ...
    if dst.is_dir():
        raise ModelImportError(f"{dst} is a folder: give the output .onnx file name")
    inputs = [src, *(src.parent / f for f in loaded.external_files)]
    if dst.exists() and any(dst.samefile(p) for p in inputs):
        raise ModelImportError(f"{dst} is the model being folded (or its data): give a new name")
    try:
        folded, report = fold_onnx(loaded.model)
    except FoldError as exc:
        raise ModelImportError(f"{src}: cannot fold: {exc}") from None
    print(report.summary() or "no BatchNormalization or per-channel Mul/Add found")
    if report.folded:  # a fold is written only once onnxruntime agrees with the original
        try:
            ort_session(loaded.model, src)
            passed, line = fold_agreement(loaded.model, folded)
        except ModelImportError as exc:  # custom ops, say: the fold stands, unmeasured
            passed, line = None, f"not measured: {exc.message}"
        print(line)
        if passed is False:
            print(f"{PROG}: the folded model differs from {src}; nothing written", file=sys.stderr)
            return 1
    write_model_atomically(folded, dst)
    print(f"wrote {dst}: folded {len(report.folded)}, refused {len(report.refused)}")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    import onnx

    from bnfold.toolchain.image_input import output_notes, read_class_file
    from bnfold.toolchain.importer import ImportOptions, NotEquivalentError, import_model
    from bnfold.toolchain.int8 import int8_options

    opts = ImportOptions(
        name=args.name,
        models_dir=Path(args.models_dir),
        classes=read_class_file(Path(args.classes)) if args.classes else None,
        num_classes=args.num_classes,
        **_preprocess_options(args),
        output_name=args.output,
        force=args.force,
        int8=int8_options(args),
        calibration=Path(args.calibration) if args.calibration else None,
        recalibrate=args.recalibrate,
        bf16=args.bf16,
    )
    try:
        manifest = import_model(Path(args.model), opts)
    except NotEquivalentError as exc:
        print(f"{PROG}: {exc.message}", file=sys.stderr)
        return 1
    target = Path(args.models_dir) / args.name
    print_import_summary(manifest, target)
    unfolded = onnx.load(str(target / manifest.files["unfolded"].path))
    for note in output_notes(unfolded, manifest.output.name):
        print(f"warning: {note}")
    return 0


def print_import_summary(manifest, target: Path) -> None:
    rows = manifest.fold_report
    for row in rows:
        what = f"folded {row.direction} into {row.into}" if row.folded else f"kept: {row.reason}"
        print(f"{row.op} {row.bn}: {what}" + (f"  WARNING: {row.warning}" if row.warning else ""))
    eq = manifest.equivalence
    print(
        f"imported {target}: folded {sum(r.folded for r in rows)}/{len(rows)}; on {eq.n_images} "
        f"{eq.split} inputs max |folded - unfolded| {eq.folded_vs_unfolded.max_abs_diff:.3g} "
        f"(tolerance {eq.tolerance_abs:.3g}), vs float64: folded "
        f"{eq.folded_vs_float64.max_abs_diff:.3g}, unfolded "
        f"{eq.unfolded_vs_float64.max_abs_diff:.3g}; top-1 agreement "
        f"{eq.folded_vs_unfolded.top1_agreement:.4f}"
    )
    for change in manifest.imported.changes:
        print(f"changed for serving: {change}")
    if eq.int8 is not None:
        from bnfold.toolchain.int8 import summary_line

        print(summary_line(eq.int8))
    if eq.bf16 is not None:
        from bnfold.toolchain.precision import summary_line as bf16_line

        print(bf16_line(eq.bf16))
    if manifest.layer_probes_note:
        print(f"note: {manifest.layer_probes_note}")
    print_statistics(manifest)


def _vs_float64(eq) -> str:
    if eq.folded_vs_float64 is None:
        return eq.reference_note or "float64 reference not measured"
    return (
        f"vs float64: folded {eq.folded_vs_float64.max_abs_diff:.3g}, unfolded "
        f"{eq.unfolded_vs_float64.max_abs_diff:.3g}"
    )


def print_statistics(manifest) -> None:
    """The BN statistics check and, when asked for, what recalibration changed."""
    from bnfold.toolchain.bnstats import summary_lines

    r = manifest.recalibration
    if r is not None:
        acc = ""
        if r.accuracy_before is not None:
            acc = f", accuracy {r.accuracy_before:.2%} -> {r.accuracy_after:.2%}"
        print(
            f"recalibrated: {r.layers} BatchNormalization layers re-estimated on {r.inputs}; "
            f"top-1 agreement with the original {r.top1_agreement:.2%}{acc}"
        )
    if manifest.bn_statistics is not None:
        print("\n".join(summary_lines(manifest.bn_statistics)))


def cmd_doctor(args: argparse.Namespace) -> int:
    from bnfold.bundle import read_manifest
    from bnfold.toolchain.bnstats import summary_lines
    from bnfold.toolchain.importer import ImportOptions, diagnose

    path = Path(args.model)
    if not path.exists():
        raise BnfoldError(f"{path} does not exist: give a bundle folder or an ONNX file")
    if args.samples is None and path.is_dir():  # the check stored at export or import
        check = read_manifest(path).bn_statistics
        if check is None:
            raise BnfoldError(f"{path}: no BN statistics check stored; pass --samples FOLDER")
        print("\n".join(summary_lines(check)))
        return 1 if check.flagged else 0
    check = diagnose(path, ImportOptions(name="-", **_preprocess_options(args)))
    print("\n".join(summary_lines(check)))
    return 1 if check.flagged else 0


def cmd_verify(args: argparse.Namespace) -> int:
    from bnfold.bundle import read_manifest
    from bnfold.toolchain.importer import ImportOptions, equivalence_inputs
    from bnfold.toolchain.verify import verify_bundle

    bundle = Path(args.bundle)
    if not bundle.is_dir():
        raise BnfoldError(f"bundle folder {bundle} does not exist")
    x = None
    if args.samples:
        spec = read_manifest(bundle).input.preprocess
        x = equivalence_inputs(spec, ImportOptions(name="-", samples=Path(args.samples)))[0]
    res = verify_bundle(bundle, x)
    print("\n".join(res.lines))
    print(f"{bundle}: {'verified' if res.ok else 'VERIFICATION FAILED'}")
    return 0 if res.ok else 1


def _preprocess_options(args: argparse.Namespace) -> dict:
    """ImportOptions' fields from _add_preprocess_arguments' flags and --samples."""
    return {
        "layout": args.layout,
        "size": parse_size(args.size),
        "color_mode": args.color_mode,
        "scale": args.scale,
        "mean": args.mean,
        "std": args.std,
        "samples": Path(args.samples) if args.samples else None,
        "input_name": args.input,
    }


def _add_preprocess_arguments(p: argparse.ArgumentParser) -> None:
    """How images become the model's input (import, and doctor on an ONNX file)."""
    p.add_argument("--layout", choices=["NCHW", "NHWC"], help="default: from the input shape")
    p.add_argument(
        "--size", nargs="+", type=_size, metavar="H W", help="H W or HxW (variable-size inputs)"
    )
    p.add_argument("--color-mode", choices=["L", "RGB"], help="default: from the channel count")
    p.add_argument("--scale", type=float, default=1.0 / 255.0, help="multiplies 0..255 pixels")
    p.add_argument("--mean", type=float, nargs="+", help="subtracted after scaling (1 or C)")
    p.add_argument("--std", type=float, nargs="+", help="divides after the mean (1 or C)")
    p.add_argument("--input", metavar="NAME", help="the image input, when the model has several")


def build_parser() -> argparse.ArgumentParser:
    from bnfold.toolchain.int8 import add_quantize_arguments

    p = OneLineParser(prog=PROG, description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    f = sub.add_parser("fold", help="fold an ONNX model into another ONNX file")
    f.add_argument("src", metavar="IN.onnx")
    f.add_argument("dst", metavar="OUT.onnx")
    f.set_defaults(func=cmd_fold)
    i = sub.add_parser("import", help="import an ONNX classifier as models/<name>/")
    i.add_argument("model", metavar="MODEL.onnx")
    i.add_argument("--name", required=True, help="bundle name: <models-dir>/<name>/")
    i.add_argument("--models-dir", default="models")
    c = i.add_mutually_exclusive_group()
    c.add_argument("--classes", metavar="FILE", help="class names, one per line")
    c.add_argument("--num-classes", type=_count, metavar="N", help="classes named 0..N-1")
    _add_preprocess_arguments(i)
    i.add_argument("--samples", metavar="FOLDER", help="images to measure equivalence on")
    i.add_argument("--output", metavar="NAME", help="the logits output (default: the first)")
    i.add_argument("--force", action="store_true", help="replace an existing bundle")
    add_quantize_arguments(i)
    i.add_argument(
        "--calibration", metavar="FOLDER", help="with --quantize: images to calibrate on"
    )
    i.add_argument(
        "--recalibrate",
        action="store_true",
        help="re-estimate BN statistics on --samples before folding",
    )
    i.set_defaults(func=cmd_import)
    d = sub.add_parser("doctor", help="check BN statistics against sample images")
    d.add_argument("model", metavar="BUNDLE_OR_MODEL")
    d.add_argument("--samples", metavar="FOLDER", help="images the model will see")
    _add_preprocess_arguments(d)
    d.set_defaults(func=cmd_doctor)
    v = sub.add_parser("verify", help="check a bundle: checksums, node counts, equivalence")
    v.add_argument("bundle")
    v.add_argument("--samples", metavar="FOLDER", help="images to re-measure on (else generated)")
    v.set_defaults(func=cmd_verify)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `bnfold` command."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    warnings.simplefilter("ignore")  # library notices would break the one-line error contract
    try:
        import onnx  # noqa: F401  the toolchain's own dependencies, absent from a base install
        import onnxruntime
    except ImportError as exc:
        return _fail(f"{exc.name} is not installed: pip install 'bnfold[toolchain]'", 2)
    args = build_parser().parse_args(argv)
    onnxruntime.set_default_logger_severity(4)  # its C++ log lines would break the one-line rule
    stages = _Stages()
    progress = logging.getLogger("bnfold.progress")
    progress.addHandler(stages)
    progress.setLevel(logging.INFO)
    progress.propagate = False
    try:
        code = _run(args)
    finally:
        progress.removeHandler(stages)
    if code == 0:  # a mistake stays one line on stderr with nothing on stdout
        for line in stages.lines:
            print(f"time: {line}")
    return code


def _run(args: argparse.Namespace) -> int:
    """The command, its mistakes turned into one line and an exit code."""
    try:
        return args.func(args)
    except BnfoldError as exc:
        return _fail(exc.message, 2)
    except KeyboardInterrupt:  # Ctrl-C: bundles and folded files are written atomically
        print(f"{PROG}: interrupted; nothing written", file=sys.stderr)
        return 130
    except MemoryError as exc:  # numpy's float64 reference on a large input, say
        return _fail(f"not enough memory for this model's input size ({exc})", 2)
    except (OSError, ValueError) as exc:  # file system, or a value no check above foresaw
        return _fail(f"{type(exc).__name__}: {exc}", 2)
    except Exception as exc:  # a bug of ours: still one line; BNFOLD_DEBUG=1 shows the traceback
        if os.environ.get("BNFOLD_DEBUG"):
            raise
        return _fail(f"internal error ({type(exc).__name__}: {exc}); rerun with BNFOLD_DEBUG=1", 1)


class _Stages(logging.Handler):
    """Each stage's time: live on a terminal's stderr, and kept for the summary on stdout."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        line = self.format(record)
        self.lines.append(line)
        if sys.stderr.isatty():
            print(f"{PROG}: {line}", file=sys.stderr, flush=True)


def _fail(message: str, code: int) -> int:
    print(f"{PROG}: error: {' '.join(message.split())}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
