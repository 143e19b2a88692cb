"""BatchNorm's small-batch weakness, and what synchronized BN does about it, measured on digits.

For each per-replica batch size, trains the default model twice with the real command,
`torchrun --nproc_per_node 2 -m training.cli train`, once with per-replica BN and once with
`--sync-bn`, on loopback (gloo), and records test accuracy (eval mode: running statistics).
Writes docs/bn_batch_experiment.json and docs/bn_batch_experiment.md.

    .venv/bin/python scripts/bn_batch_experiment.py            # ~3 minutes on 2 CPU cores
    .venv/bin/python scripts/bn_batch_experiment.py --seed 1 --batches 8,32 \
        --stem bn_batch_experiment_seed1                         # a second seed, for the noise
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_run(batch: int, sync_bn: bool, args: argparse.Namespace, runs_dir: Path) -> dict:
    """One 2-process training run through the CLI; its summary.json plus the wall time."""
    name = f"b{batch}_{'sync' if sync_bn else 'local'}_s{args.seed}"
    cmd = [
        str(Path(sys.executable).with_name("torchrun")),
        f"--nproc_per_node={args.nproc}",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        "-m",
        "training.cli",
        "train",
        f"--name={name}",
        f"--epochs={args.epochs}",
        f"--batch-size={batch}",
        f"--seed={args.seed}",
        f"--runs-dir={runs_dir}",
        "--no-export",
    ] + (["--sync-bn"] if sync_bn else [])
    env = os.environ | {"GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    summary = json.loads((runs_dir / name / "summary.json").read_text())
    history = [
        json.loads(ln) for ln in (runs_dir / name / "metrics.jsonl").read_text().splitlines()
    ]
    row = {
        "per_replica_batch": batch,
        "global_batch": batch * args.nproc,
        "sync_bn": sync_bn,
        "test_acc": summary["test_acc"],
        "val_acc": summary["val_acc"],
        "final_train_acc": history[-1]["train_acc"],  # train mode: batch statistics
        "seconds": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps(row), flush=True)
    return row


def markdown_table(rows: list[dict], meta: dict) -> str:
    by_key = {(r["per_replica_batch"], r["sync_bn"]): r for r in rows}
    lines = [
        f"Digits, {meta['nproc']} CPU processes (gloo), default model, {meta['epochs']} epochs, "
        f"seed {meta['seed']}, {meta['n_test']} test images (1 image = "
        f"{100 / meta['n_test']:.2f} points). Test accuracy in eval mode (running statistics).",
        "",
        "| per-replica batch | global batch | test acc, per-replica BN | test acc, `--sync-bn` "
        "| train acc (last epoch), per-replica / sync | wall s, per-replica / sync |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for batch in meta["batches"]:
        local, sync = by_key[(batch, False)], by_key[(batch, True)]
        lines.append(
            f"| {batch} | {local['global_batch']} | {local['test_acc']:.4f} | "
            f"{sync['test_acc']:.4f} | {local['final_train_acc']:.3f} / "
            f"{sync['final_train_acc']:.3f} | {local['seconds']:.0f} / {sync['seconds']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", default="2,4,8,32", help="per-replica batch sizes")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--out-dir", type=Path, default=REPO / "docs")
    p.add_argument("--stem", default="bn_batch_experiment", help="output file names: STEM.json/.md")
    args = p.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for batch in batches:
            for sync_bn in (False, True):
                rows.append(train_run(batch, sync_bn, args, Path(tmp)))
        n_test = json.loads(next(Path(tmp).glob("*/summary.json")).read_text())["n_test"]
    meta = {
        "command": "torchrun --nproc_per_node N -m training.cli train [--sync-bn] --no-export",
        "nproc": args.nproc,
        "epochs": args.epochs,
        "seed": args.seed,
        "batches": batches,
        "n_test": n_test,
        "lr": 1e-2,
        "model": "default (widths 32,64, BN before ReLU)",
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"{args.stem}.json").write_text(
        json.dumps({"meta": meta, "runs": rows}, indent=2) + "\n"
    )
    table = markdown_table(rows, meta)
    (args.out_dir / f"{args.stem}.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
