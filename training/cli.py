"""`bnfold-train`: train, export a checkpoint to a bundle, verify a bundle.

Errors a user can fix (missing data folder, empty class, bad option value, a bundle that would be
overwritten) print one line and exit 2, not a traceback; every flag is checked before anything is
trained or written. Under torchrun (`torchrun --nproc_per_node N -m training.cli train ...`)
`train` runs data-parallel; rank 0 alone prints, writes the checkpoint and exports the bundle.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from bnfold.bundle import NAME_PATTERN
from bnfold.cli import OneLineParser
from bnfold.errors import BnfoldError
from bnfold.preprocess import PreprocessSpec
from bnfold.toolchain.int8 import (
    Int8Options,
    Int8Request,
    add_quantize_arguments,
    int8_options,
    summary_line,
)
from training.data import (
    DataError,
    Splits,
    load_digits_dataset,
    load_image_folder,
    stratified_split,
)
from training.model import ModelConfig

if TYPE_CHECKING:
    from training.train import TrainConfig

DEFAULT_SEED = 0


def load_splits(data: str | None, seed: int, size: int, color_mode: str) -> Splits:
    """'digits' (default) or an image folder, split deterministically from the seed."""
    if data in (None, "digits"):
        ds = load_digits_dataset()
    else:
        channels = 1 if color_mode == "L" else 3
        spec = PreprocessSpec(
            color_mode=color_mode,
            height=size,
            width=size,
            resample="bilinear",
            mean=[0.5] * channels,
            std=[0.25] * channels,
        )
        ds = load_image_folder(Path(data), spec)
    return stratified_split(ds, seed)


def cmd_train(args: argparse.Namespace) -> int:
    from training.distributed import init_distributed, launched_by_torchrun, teardown

    if not launched_by_torchrun():
        if args.sync_bn:
            print(
                "bnfold-train: warning: --sync-bn does nothing in one process; launch with "
                "torchrun --nproc_per_node N",
                file=sys.stderr,
            )
        return train_and_export(args, None)
    dist = init_distributed(args.dist_backend)
    try:
        code = train_and_export(args, dist)
        dist.barrier()  # the others wait while rank 0 exports, then all leave together
        return code
    finally:
        teardown()


def train_and_export(args: argparse.Namespace, dist) -> int:
    """Train (one process, or this rank of a torchrun job), then fold and export on rank 0."""
    from training.train import fit

    if args.resume is not None and not args.resume.is_file():
        raise DataError(f"checkpoint {args.resume} does not exist")
    int8 = int8_options(args)  # a bad int8 flag is refused before any training
    splits = load_splits(args.data, args.seed, args.image_size, args.color_mode)
    if not args.no_export:
        check_bundle_target(args.models_dir, args.name, args.force)
    model_cfg, train_cfg = configs_from_args(args, splits, distributed=dist is not None)
    run_dir = Path(args.runs_dir) / args.name
    summary = fit(splits, model_cfg, train_cfg, run_dir, resume=args.resume, dist=dist)
    if dist is not None and not dist.is_main:
        return 0
    layout = ""
    if dist is not None:
        bn = "synchronized BN" if summary["sync_bn"] else "per-replica BN"
        layout = (
            f" [{summary['world_size']} processes x batch {summary['per_replica_batch']}, {bn}]"
        )
    print(
        f"trained {args.name}{layout}: test accuracy {summary['test_acc']:.4f} "
        f"({summary['n_test']} images); checkpoint {run_dir / 'checkpoint.pt'}"
    )
    if args.no_export:
        return 0
    return export_checkpoint(
        run_dir / "checkpoint.pt", args.name, args.models_dir, splits, int8, args.bf16
    )


def configs_from_args(
    args: argparse.Namespace, splits: Splits, distributed: bool = False
) -> tuple[ModelConfig, TrainConfig]:
    """The model and training configuration a `train` command line asks for."""
    from training.train import TrainConfig

    sample = splits.train.x[0]
    model_cfg = ModelConfig(
        in_channels=sample.shape[0],
        input_height=sample.shape[1],
        input_width=sample.shape[2],
        num_classes=len(splits.train.classes),
        widths=args.widths,
        blocks_per_stage=args.blocks_per_stage,
        residual=args.residual,
        hidden=args.hidden,
        bn_eps=args.bn_eps,
        bn_momentum=args.bn_momentum,
        bn_placement=args.bn_placement,
    )
    train_cfg = TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        sync_bn=bool(args.sync_bn and distributed),
        extra={
            "data": args.data or "digits",
            "image_size": args.image_size,
            "color_mode": args.color_mode,
        },
    )
    return model_cfg, train_cfg


def check_bundle_target(models_dir: str, name: str, force: bool) -> None:
    """Refuse, before any work, to replace a bundle (the shipped one included) without --force."""
    root = Path(models_dir)
    if root.exists() and not root.is_dir():
        raise DataError(f"--models-dir {root} is a file, not a folder")
    if (root / name).exists() and not force:
        raise DataError(
            f"bundle {root / name} already exists: pass --force to replace it, or choose "
            "another --name"
        )


def export_checkpoint(
    ckpt_path: Path,
    name: str,
    models_dir: str,
    splits: Splits | None,
    int8: Int8Options | None = None,
    bf16: bool = False,
) -> int:
    """Fold and export; with int8, calibrate on the training split, measure on the test split."""
    from training.export import export_bundle
    from training.train import load_checkpoint, model_from_checkpoint

    try:
        ckpt = load_checkpoint(ckpt_path)
    except Exception:  # torch raises pickle, zip or runtime errors for a file that is not one
        raise DataError(
            f"{ckpt_path} is not a bnfold checkpoint (torch.load with weights_only=True cannot "
            "read it)"
        ) from None
    if not isinstance(ckpt, dict) or not {"state_dict", "model_config", "epoch"} <= ckpt.keys():
        raise DataError(f"{ckpt_path} is not a bnfold checkpoint (no state_dict/model_config)")
    extra = ckpt["train_config"].get("extra", {})
    if splits is None:
        splits = load_splits(
            extra.get("data"),
            ckpt["train_config"]["seed"],
            extra.get("image_size", 32),
            extra.get("color_mode", "L"),
        )
    model = model_from_checkpoint(ckpt)
    request = None
    if int8 is not None:  # calibrated on the training split, measured on the test split
        source = f"{extra.get('data', 'digits')} train split"
        request = Int8Request(int8, splits.train.x, source, splits.test.y)
    manifest = export_bundle(
        model,
        name=name,
        classes=ckpt["classes"],
        spec=splits.test.spec,
        eval_x=splits.test.x,
        eval_labels=splits.test.y,
        split="test",
        out_dir=Path(models_dir),
        architecture=ckpt["model_config"],
        training_metrics=checkpoint_metrics(ckpt, model, splits),
        int8=request,
        bf16=bf16,
    )
    eq = manifest.equivalence
    folded = sum(r.folded for r in manifest.fold_report)
    print(
        f"exported {Path(models_dir) / name}: folded {folded}/{len(manifest.fold_report)} BN; "
        f"folded vs unfolded max |diff| {eq.folded_vs_unfolded.max_abs_diff:.3g} "
        f"(tolerance {eq.tolerance_abs:.3g}), top-1 agreement "
        f"{eq.folded_vs_unfolded.top1_agreement:.4f}, passed={eq.passed}"
    )
    for row in manifest.fold_report:
        if row.warning:
            print(f"warning: {row.bn}: {row.warning}")
    if manifest.bn_statistics is not None:
        from bnfold.toolchain.bnstats import summary_lines

        print("\n".join(summary_lines(manifest.bn_statistics)))
    if eq.int8 is not None:
        print(summary_line(eq.int8))
    if eq.bf16 is not None:
        from bnfold.toolchain.precision import summary_line as bf16_line

        print(bf16_line(eq.bf16))
    return 0 if eq.passed else 1


def checkpoint_metrics(ckpt: dict, model, splits: Splits) -> dict:
    """What the bundle says about training, taken from the checkpoint it holds and measured on
    its weights now, never from a summary file that another run may have left behind."""
    from training.train import evaluate, run_summary

    test = evaluate(model, splits.test.x, splits.test.y)
    config = ckpt["train_config"]
    # The checkpoint's history has one row per epoch it trained, resumed runs included.
    metrics = run_summary(test, ckpt.get("history") or [], splits, config["seed"]) | {
        "data": config.get("extra", {}).get("data", "digits"),
        "config": config,  # the TrainConfig that made these weights
    }
    if ckpt.get("distributed"):
        metrics |= ckpt["distributed"]
    return metrics


def cmd_export(args: argparse.Namespace) -> int:
    if not Path(args.checkpoint).is_file():
        raise DataError(f"checkpoint {args.checkpoint} does not exist")
    check_bundle_target(args.models_dir, args.name, args.force)
    int8 = int8_options(args)
    return export_checkpoint(
        Path(args.checkpoint), args.name, args.models_dir, None, int8, args.bf16
    )


def cmd_verify(args: argparse.Namespace) -> int:
    from bnfold.bundle import read_manifest
    from bnfold.toolchain.verify import verify_bundle

    bundle = Path(args.bundle)
    if not bundle.is_dir():
        raise DataError(f"bundle folder {bundle} does not exist")
    if not (bundle / "bundle.json").is_file():
        raise DataError(f"{bundle} is not a bundle: it has no bundle.json")
    x, labels = verification_split(bundle, read_manifest(bundle), args.data)
    res = verify_bundle(bundle, x, labels)
    print("\n".join(res.lines))
    print(f"{bundle}: {'verified' if res.ok else 'VERIFICATION FAILED'}")
    return 0 if res.ok else 1


def verification_split(bundle: Path, manifest, data: str | None):
    """(x, labels): the held-out split when it can be rebuilt, else (seeded inputs, None)."""
    source = data or manifest.training.get("data")
    seed = manifest.training.get("seed", DEFAULT_SEED)
    spec = manifest.input.preprocess
    if source == "digits" or (source and Path(source).is_dir()):
        test = load_splits(source, seed, spec.height, spec.color_mode).test
        return test.x, test.y
    from bnfold.preprocess import generated_batch

    return generated_batch(spec, 256, seed), None  # the model's layout (NCHW, or NHWC)


class _Parser(OneLineParser):
    """A usage error is one line (no usage block) and exit 2, as for `bnfold`."""

    help_hint = False


def _number(kind: type, low: float, *, inclusive: bool = True):
    """An argparse type: a `kind` (int/float) >= low (or > low), finite."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__}, got {text!r}") from None
        if not np.isfinite(value) or value < low or (value == low and not inclusive):
            bound = f">= {low:g}" if inclusive else f"> {low:g}"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text}")
        return value

    return parse


def _name(text: str) -> str:
    import re

    if not re.fullmatch(NAME_PATTERN, text):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a bundle name: letters, digits, '_', '.', '-', up to 64, "
            "starting with a letter or digit"
        )
    return text


def _widths(text: str) -> list[int]:
    try:
        widths = [int(w) for w in text.split(",")]
    except ValueError:
        msg = f"expected comma-separated ints like 32,64, got {text!r}"
        raise argparse.ArgumentTypeError(msg) from None
    if not widths or min(widths) < 1:
        raise argparse.ArgumentTypeError(f"widths must be positive, got {text!r}")
    return widths


def _momentum(text: str) -> float | None:
    if text.lower() == "none":
        return None
    try:
        value = float(text)
    except ValueError:
        msg = f"expected a number in (0, 1] or 'none', got {text!r}"
        raise argparse.ArgumentTypeError(msg) from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"momentum must be in (0, 1] or 'none', got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="bnfold-train", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a model, then fold and export its bundle")
    t.add_argument("--data", help="'digits' (default, embedded) or an image folder root/<class>/")
    t.add_argument("--name", type=_name, default="digits", help="bundle name: models/<name>/")
    t.add_argument("--epochs", type=_number(int, 1), default=30)
    t.add_argument(
        "--batch-size",
        type=_number(int, 1),
        default=64,
        help="per process under torchrun (global = N x this)",
    )
    t.add_argument("--lr", type=_number(float, 0, inclusive=False), default=1e-2)
    t.add_argument("--seed", type=_number(int, 0), default=DEFAULT_SEED)
    t.add_argument("--widths", type=_widths, default=[32, 64], help="channels per stage: 32,64")
    t.add_argument("--blocks-per-stage", type=_number(int, 1), default=1)
    t.add_argument("--residual", action="store_true", help="ResNet basic blocks")
    t.add_argument("--hidden", type=_number(int, 1), default=64)
    t.add_argument(
        "--bn-eps", type=_number(float, 0, inclusive=False), default=1e-5, help="Keras: 1e-3"
    )
    t.add_argument(
        "--bn-momentum",
        type=_momentum,
        default=0.1,
        help="PyTorch convention (Keras 0.99 = 0.01 here); 'none' = cumulative",
    )
    t.add_argument(
        "--bn-placement",
        choices=["pre", "post"],
        default="pre",
        help="pre: conv->BN->ReLU; post: conv->ReLU->BN",
    )
    t.add_argument("--image-size", type=_number(int, 1), default=32, help="for an image folder")
    t.add_argument("--color-mode", choices=["L", "RGB"], default="L", help="for an image folder")
    t.add_argument("--runs-dir", default="runs")
    t.add_argument("--models-dir", default="models")
    t.add_argument("--resume", type=Path, help="checkpoint to resume from")
    t.add_argument("--no-export", action="store_true", help="train only")
    t.add_argument("--force", action="store_true", help="replace models/<name>/ if it exists")
    t.add_argument(
        "--sync-bn",
        action="store_true",
        help="under torchrun: BN statistics over the global batch (for small per-process batches)",
    )
    t.add_argument(
        "--dist-backend",
        choices=["auto", "gloo", "nccl"],
        default="auto",
        help="under torchrun: auto = nccl with CUDA, gloo on CPU",
    )
    add_quantize_arguments(t)
    t.set_defaults(func=cmd_train)
    e = sub.add_parser("export", help="fold and export a checkpoint to models/<name>/")
    e.add_argument("checkpoint")
    e.add_argument("--name", type=_name, default="digits")
    e.add_argument("--models-dir", default="models")
    e.add_argument("--force", action="store_true", help="replace models/<name>/ if it exists")
    add_quantize_arguments(e)
    e.set_defaults(func=cmd_export)
    v = sub.add_parser("verify", help="check a bundle: checksums, BN counts, equivalence")
    v.add_argument("bundle")
    v.add_argument("--data", help="image folder to re-measure on (default: the bundle's own)")
    v.set_defaults(func=cmd_verify)
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (DataError, BnfoldError, ValueError, OSError) as exc:
        message = exc.message if isinstance(exc, BnfoldError) else str(exc)
        print(f"bnfold-train: error: {' '.join(message.split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
