"""`python -m bench.run [--quick]`: measure bnfold against its limits and peers; write results.

Read top to bottom: the models are prepared (and their fold cost measured), executed in
process, served over HTTP next to the peers, the goals checked, the report written.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata as md
import importlib.util
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from bench.plan import FULL, QUICK, Plan
from bench.provenance import bnfold_settings, cpu_count, cpu_model, git_commit, mem_gib

REPO = Path(__file__).resolve().parent.parent
INSTALL_HINT = "install them with: bash scripts/install_bench_deps.sh"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def missing_tools() -> list[str]:
    """What the benchmark needs beyond the dev install, and is not here."""
    missing = []
    if shutil.which("wrk") is None:
        missing.append("wrk (the HTTP load generator, Debian package 'wrk')")
    if importlib.util.find_spec("litserve") is None:
        missing.append("litserve (the peer server, from PyPI, in this venv)")
    return missing


def prepare_models(plan: Plan, work: Path) -> dict:
    from bench.models import prepare_digits, prepare_heavy

    models = {}
    for name in plan.models:
        start = time.perf_counter()
        if name == "digits":
            models[name] = prepare_digits(work, plan.eval_images)
        else:
            models[name] = prepare_heavy(work, plan.heavy_size, plan.eval_images)
        log(f"prepared {name} ({time.perf_counter() - start:.1f} s): {models[name].weights}")
    return models


def execute_models(models: dict, plan: Plan) -> dict:
    from bench import model_exec

    rows = []
    for model in models.values():
        rows += model_exec.measure_model(model, plan, log)
    limits = {name: model_exec.best_limit(rows, name) for name in models}
    return {"rows": rows, "limits": limits, "ratios": model_exec.exec_ratios(rows, limits)}


def int8_section(models: dict, plan: Plan, work: Path) -> dict:
    """INT8 after folding (bench/int8.py); every served bundle gets its int8 variant."""
    from bench import int8 as int8_bench

    results = int8_bench.measure(models, plan, work, log)
    for model in models.values():
        int8_bench.ensure_int8(model, max(plan.eval_images, 64))
    return results


def engines_section(models: dict, plan: Plan) -> dict:
    """onnxruntime and OpenVINO at each precision, in process (bench/engines.py)."""
    if importlib.util.find_spec("openvino") is None:
        return {"error": "openvino is not installed (pip install 'bnfold[openvino]')"}
    from bench import engines

    batches = sorted({1, min(16, max(plan.batch_sizes))})
    return engines.measure(models, batches, plan.point_seconds * 4)


def serve_models(models: dict, limits: dict, plan: Plan, work: Path) -> dict:
    from bench import serving

    rows, payloads = [], {}
    for name in plan.serve_models:
        if name in models:
            measured = serving.measure_model(models[name], plan, limits[name], work, log)
            rows += measured["rows"]
            payloads[name] = measured["payload_bytes"]
    return {
        "rows": rows,
        "summary": serving.summarize(rows),
        "ratios": serving.ratios(rows),
        "payload_bytes": payloads,
    }


def workers_section(models: dict, plan: Plan, work: Path) -> dict:
    """Memory and throughput per worker count, digits model (bench/workers.py)."""
    if "digits" not in models or "digits" not in plan.serve_models:
        return {}
    from bench import workers

    return workers.measure(models["digits"], plan, work, log)


def families_section(plan: Plan, out: Path, argv: list[str]) -> dict:
    """The published CNN families imported and verified at 224x224 (bench/families_run.py):
    families.md and families.json in `out`; here, its goals."""
    if not plan.families:
        return {}
    from bench import families_run

    result = families_run.run(plan.families, None, 224, out, ["(from bench.run)", *argv])
    return {"table": str(out / "families.md"), "goals": result["goals"]}


def load_now() -> str:
    import os

    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def grpc_section(plan: Plan, out: Path) -> dict:
    """gRPC infer next to REST infer on one server, same run (bench/grpc_vs_rest.py)."""
    from bench import grpc_vs_rest

    levels = plan.concurrency if plan.name == "full" else plan.concurrency[:1]
    result = grpc_vs_rest.measure(max(plan.wrk_seconds, 1), plan.rounds, log, levels)
    out.mkdir(parents=True, exist_ok=True)
    (out / "grpc_vs_rest.md").write_text(grpc_vs_rest.markdown(result) + "\n")
    return result


def peers_section(plan: Plan, out: Path, argv: list[str], models: dict) -> dict:
    """bnfold beside Triton, KServe and MLServer on digits and heavy (the bundles prepared for
    this run), V2 REST JSON and binary and gRPC (bench/peers_run.py): bench/results/peers.md.
    A peer not installed or not started is listed with its reason."""
    from bench import peers_run

    settings = peers_run.Settings(plan.peer_seconds, plan.peer_rounds, plan.concurrency)
    command = " ".join(["python -m bench.run", *argv])
    bundles = tuple(models[n].bundle_dir for n in ("digits", "heavy") if n in models)
    try:
        return peers_run.run(settings, out, command, plan.peers, plan.bnfold_env, bundles)
    except Exception as exc:  # noqa: BLE001 (the rest of the run stands; the reason is shown)
        log(f"peers: not measured: {exc}")
        return {"error": str(exc)[-1000:]}


def contention_section(plan: Plan, out: Path, argv: list[str]) -> dict:
    """bnfold and the minimal handler quiet and beside two CPU hogs (bench/contention.py):
    bench/results/contention.md."""
    from bench import contention

    command = " ".join(["python -m bench.run", *argv])
    try:
        return contention.run(plan.peer_seconds, plan.peer_rounds, [0, 2], out, command)
    except Exception as exc:  # noqa: BLE001 (the rest of the run stands; the reason is shown)
        log(f"contention: not measured: {exc}")
        return {"error": str(exc)[-1000:]}


def preprocess_cost_ms(models: dict, repeats: int = 200, rounds: int = 5) -> dict[str, float]:
    """Decode + preprocess of the benchmark PNG, in process: the per-image floor of serving.
    The best of `rounds` rounds: one short round on a shared machine can come out 4x slow."""
    from bnfold.preprocess import preprocess_bytes

    out = {}
    for name, m in models.items():
        preprocess_bytes(m.png, m.spec)
        best = float("inf")
        for _ in range(rounds):
            start = time.perf_counter()
            for _ in range(repeats):
                preprocess_bytes(m.png, m.spec)
            best = min(best, (time.perf_counter() - start) / repeats * 1e3)
        out[name] = best
    return out


def environment(argv: list[str], plan: Plan) -> dict:
    def version(pkg: str) -> str:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return "not installed"

    wrk = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.split("\n")[0]
    return {
        "command": " ".join(["python -m bench.run", *argv]),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{cpu_model()}, {cpu_count()} cores, {mem_gib():.0f} GiB",
        "python": platform.python_version(),
        "packages": ", ".join(
            f"{p} {version(p)}"
            for p in ("onnxruntime", "torch", "fastapi", "uvicorn", "litserve", "uvloop")
        ),
        "load generator": wrk.split(" Copyright")[0],
        "bnfold": f"commit {git_commit()}; settings: {bnfold_settings(plan.bnfold_env)}",
    }


def run(plan: Plan, out: Path, docs: Path | None, argv: list[str], keep_work: bool) -> dict:
    """The whole benchmark into `out`; returns the results dict."""
    from bench import goals, report
    from bench import int8 as int8_bench

    start = time.perf_counter()
    load_at_start = load_now()  # other jobs on a shared machine show here
    work = Path(tempfile.mkdtemp(prefix="bnfold-bench-"))
    try:
        models = prepare_models(plan, work)
        exec_results = execute_models(models, plan)
        int8 = int8_section(models, plan, work)
        engines = engines_section(models, plan)
        serving = serve_models(models, exec_results["limits"], plan, work)
        int8["served"] = int8_bench.served(serving["rows"], max(plan.concurrency))
        grpc = grpc_section(plan, out) if "digits" in plan.serve_models else {}
        workers = workers_section(models, plan, work)
        peers = (
            peers_section(plan, out, argv, models)
            if plan.peers and "digits" in plan.serve_models
            else {}
        )
        contention = contention_section(plan, out, argv) if plan.peers else {}
        pre = preprocess_cost_ms(models)
        families = families_section(plan, out, argv)
    finally:
        if keep_work:
            log(f"work folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    results = {
        "environment": environment(argv, plan),
        "plan": plan.to_dict(),
        "models": {n: {"weights": m.weights, "fold_cost": m.fold_cost} for n, m in models.items()},
        "preprocess_ms": pre,
        "model_exec": exec_results,
        "int8": int8,
        "engines": engines,
        "serving": serving,
        "grpc_vs_rest": grpc,
        "workers": workers,
        "peers": peers,
        "contention": contention,
        "families": families,
        "goals": goals.check(serving["rows"], pre),
    }
    results["environment"]["load average (1, 5, 15 min) at start, at end"] = (
        f"{load_at_start}, {load_now()}"
    )
    results["elapsed_s"] = time.perf_counter() - start
    for path in report.write(results, out, docs):
        log(f"wrote {path}")
    return results


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--quick", action="store_true", help="seconds per target (the test's mode)")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="results folder (default bench/results, bench/results/quick with --quick)",
    )
    parser.add_argument(
        "--docs",
        type=Path,
        default=None,
        help="also write this docs page (default docs/performance.md for a full "
        "run into bench/results; none otherwise)",
    )
    parser.add_argument("--models", help="comma-separated subset of: digits,heavy")
    parser.add_argument(
        "--bnfold-env",
        action="append",
        default=[],
        metavar="BNFOLD_X=VALUE",
        help="a setting for the bnfold server (repeatable); default: its defaults",
    )
    parser.add_argument("--keep-work", action="store_true", help="keep bundles, payloads, logs")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    missing = missing_tools()
    if missing:
        log(f"bench: missing {'; '.join(missing)}. {INSTALL_HINT}")
        return 2
    plan = QUICK if args.quick else FULL
    if args.models:
        chosen = tuple(m for m in args.models.split(",") if m)
        unknown = set(chosen) - {"digits", "heavy"}
        if unknown:
            log(f"bench: unknown model(s) {sorted(unknown)}. Only digits and heavy are supported.")
            return 2
        plan = dataclasses.replace(
            plan,
            models=chosen,
            serve_models=tuple(m for m in plan.serve_models if m in chosen),
            families=(),
        )
    bad = [kv for kv in args.bnfold_env if not kv.startswith("BNFOLD_") or "=" not in kv]
    if bad:
        log(f"bench: invalid --bnfold-env {bad}: use BNFOLD_<SETTING>=<value>")
        return 2
    if args.bnfold_env:
        plan = dataclasses.replace(
            plan, bnfold_env=dict(kv.split("=", 1) for kv in args.bnfold_env)
        )
    out = args.out or (REPO / "bench" / "results" / ("quick" if args.quick else ""))
    docs = args.docs
    if (
        docs is None
        and not args.quick
        and args.out is None
        and args.models is None
        and not args.bnfold_env
    ):
        docs = REPO / "docs" / "performance.md"
    results = run(plan, out, docs, argv, args.keep_work)
    for g in (g for g in results["goals"] if g["primary"]):
        log(
            f"goal {'PASS' if g['passed'] else 'FAIL'}: {g['goal']} [{g['model']}]: {g['measured']}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
