"""`python -m bench.families_run`: every published CNN family (bench/families.py) at 224x224
through `bnfold import` (its default 64 generated inputs) and `bnfold verify`, timed.

Per family, each step in its own child process, so that peak memory does not mix: the export
(the framework's own, not timed against a goal), the import (wall time split by stage: load,
fold, float64 reference, measure, write; onnxruntime's float32 run of the unfolded graph on the
same inputs beside the reference's time; peak RSS from /proc's VmHWM) and the verify (wall, peak
RSS). Writes bench/results/families.md and families.json with the command and the machine.

    python -m bench.families_run [--only torch|keras] [--families resnet50,googlenet,...]
        [--size 224] [--out bench/results] [--keep-work]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GOALS = {"resnet50": {"import_s": 30.0, "verify_s": 10.0}}
MAX_FAMILY_S = 60.0  # no family's import or verify over this
REFERENCE_RATIO = 5.0  # the float64 reference within this factor of onnxruntime float32
EXPORT_TIMEOUT_S = 900
STEP_TIMEOUT_S = 900


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def peak_rss_mib() -> float:
    """This process's peak RSS: /proc's VmHWM, of its own address space. Not getrusage's
    ru_maxrss, which on Linux keeps the parent's peak across fork and exec: run from make bench
    (a 2.4 GB parent) every family read at least 2.4 GB."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --------------------------------------------------------------------------------------------
# Children: one import or one verify, answering one JSON line on stdout
# --------------------------------------------------------------------------------------------


class StageTimer:
    """Wraps module functions by name; the seconds spent in each, summed per stage."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def wrap(self, module, attr: str, stage: str) -> None:
        original = getattr(module, attr, None)
        if original is None:
            return

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start

        setattr(module, attr, timed)


def child_import(model: Path, models_dir: Path, name: str) -> dict:
    import onnx

    from bnfold.toolchain import build, importer
    from bnfold.toolchain.importer import ImportOptions, equivalence_inputs, import_model

    stages = StageTimer()
    for attr in ("load_onnx", "ort_session"):
        stages.wrap(importer, attr, "load")
    stages.wrap(importer, "fold_model", "fold")
    stages.wrap(importer, "_float64_logits", "reference")
    stages.wrap(importer, "write_bundle", "measure+write")
    stages.wrap(build, "measure_equivalence", "measure")
    opts = ImportOptions(name=name, models_dir=models_dir, num_classes=None, force=True)
    start = time.perf_counter()
    manifest = import_model(model, opts)
    wall = time.perf_counter() - start
    sec = stages.seconds
    sec["write"] = sec.pop("measure+write", 0.0) - sec.get("measure", 0.0)
    sec["other"] = wall - sum(sec.values())
    rss = peak_rss_mib()
    # onnxruntime float32 on the same inputs, the yardstick of the reference's cost
    from bnfold.toolchain.sessions import make_session
    from bnfold.toolchain.verify import run_logits

    bundle = models_dir / name
    x = equivalence_inputs(manifest.input.preprocess, opts)[0]
    session = make_session(bundle / "unfolded.onnx", "unfolded")
    run_logits(session, manifest.input.name, manifest.output.name, x[:1])  # warm
    t = time.perf_counter()
    run_logits(session, manifest.input.name, manifest.output.name, x)
    ort_s = time.perf_counter() - t
    eq = manifest.equivalence
    source = onnx.load(str(model), load_external_data=False)
    folded = onnx.load(str(bundle / "folded.onnx"))
    rows = manifest.fold_report
    return {
        "import_s": wall,
        "stages_s": sec,
        "ort_float32_s": ort_s,
        "n_inputs": int(len(x)),
        "peak_rss_mib": rss,
        "bn_in_source": sum(n.op_type == "BatchNormalization" for n in source.graph.node),
        "bn_left_in_folded": sum(n.op_type == "BatchNormalization" for n in folded.graph.node),
        "rows": len(rows),
        "folded": sum(r.folded for r in rows),
        "refused": sum(not r.folded for r in rows),
        "row_ops": sorted({r.op for r in rows}),
        "refused_reasons": sorted({r.reason or "?" for r in rows if not r.folded}),
        "passed": eq.passed,
        "tolerance_abs": eq.tolerance_abs,
        "folded_vs_unfolded": eq.folded_vs_unfolded.model_dump(),
        "folded_vs_float64": eq.folded_vs_float64.model_dump() if eq.folded_vs_float64 else None,
        "unfolded_vs_float64": (
            eq.unfolded_vs_float64.model_dump() if eq.unfolded_vs_float64 else None
        ),
        "reference_note": getattr(eq, "reference_note", None),
    }


def child_verify(bundle: Path) -> dict:
    from bnfold.toolchain.verify import verify_bundle

    start = time.perf_counter()
    res = verify_bundle(bundle)
    return {
        "verify_s": time.perf_counter() - start,
        "ok": res.ok,
        "lines": res.lines,
        "peak_rss_mib": peak_rss_mib(),
    }


def child_main(argv: list[str]) -> int:
    kind = argv[0]
    try:
        if kind == "import":
            out = child_import(Path(argv[1]), Path(argv[2]), argv[3])
        else:
            out = child_verify(Path(argv[1]))
    except BaseException as exc:  # noqa: BLE001 - reported, with where it came from
        import traceback

        tb = traceback.extract_tb(exc.__traceback__)
        where = [f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in tb[-4:]]
        message = getattr(exc, "message", None) or str(exc)
        out = {"error": f"{type(exc).__name__}: {message}"[:2000], "where": where,
               "peak_rss_mib": peak_rss_mib()}  # fmt: skip
    print("RESULT " + json.dumps(out), flush=True)
    return 0


# --------------------------------------------------------------------------------------------
# The parent: export, import, verify each family; the report
# --------------------------------------------------------------------------------------------


def _run_child(cmd: list[str], timeout: float, env: dict) -> tuple[dict, float]:
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env
        )
    except subprocess.TimeoutExpired:
        return {"error": f"stopped after {timeout:.0f} s"}, time.perf_counter() - start
    wall = time.perf_counter() - start
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :]), wall
    tail = (proc.stdout + proc.stderr)[-1500:]
    return {"error": f"exit {proc.returncode}: {tail}"}, wall


def run_family(framework: str, name: str, size: int, work: Path) -> dict:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONWARNINGS": "ignore"}
    py = sys.executable
    model = work / framework / f"{name}.onnx"
    row: dict = {"framework": framework, "family": name, "size": size}
    start = time.perf_counter()
    cmd = [py, "-m", "bench.families", framework, name, str(model), "--size", str(size)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env,
                          timeout=EXPORT_TIMEOUT_S)  # fmt: skip
    row["export_s"] = time.perf_counter() - start
    if proc.returncode != 0:
        row["error"] = f"export failed: {(proc.stdout + proc.stderr)[-1500:]}"
        return row
    row["exporter"] = proc.stdout.strip().splitlines()[-1].split(" with ", 1)[-1].split(":")[0]
    row["fallback"] = [ln for ln in proc.stderr.splitlines() if "dynamo export failed" in ln]
    row["onnx_mib"] = model.stat().st_size / 2**20
    bundle_name = name.replace("_", "-").lower()
    models = work / "models"
    imp, row["import_child_s"] = _run_child(
        [py, "-m", "bench.families_run", "--child", "import", str(model), str(models), bundle_name],
        STEP_TIMEOUT_S, env,
    )  # fmt: skip
    row["import"] = imp
    if "error" in imp:
        return row
    ver, row["verify_child_s"] = _run_child(
        [py, "-m", "bench.families_run", "--child", "verify", str(models / bundle_name)],
        STEP_TIMEOUT_S, env,
    )  # fmt: skip
    row["verify"] = ver
    shutil.rmtree(models / bundle_name, ignore_errors=True)
    model.unlink(missing_ok=True)
    return row


def goals(rows: list[dict]) -> list[dict]:
    out = []
    for row in rows:
        imp, ver = row.get("import", {}), row.get("verify", {})
        if "import_s" not in imp:
            out.append({"goal": "imports", "family": row["family"], "passed": False,
                        "measured": row.get("error") or imp.get("error", "?")})  # fmt: skip
            continue
        limits = GOALS.get(row["family"], {})
        for key, measured in (("import_s", imp["import_s"]), ("verify_s", ver.get("verify_s"))):
            limit = limits.get(key, MAX_FAMILY_S)
            ok = measured is not None and measured <= limit
            out.append({"goal": f"{key[:-2]} <= {limit:.0f} s", "family": row["family"],
                        "passed": ok, "measured": measured})  # fmt: skip
        ref, ort_s = imp["stages_s"].get("reference"), imp.get("ort_float32_s")
        if ref is not None and ort_s:
            out.append({"goal": f"reference <= {REFERENCE_RATIO:.0f}x onnxruntime float32",
                        "family": row["family"], "passed": ref <= REFERENCE_RATIO * ort_s,
                        "measured": ref / ort_s})  # fmt: skip
    return out


def environment(argv: list[str]) -> dict:
    from bench.provenance import cpu_count, cpu_model, git_commit, mem_gib

    return {
        "command": " ".join(["python -m bench.families_run", *argv]),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{cpu_model()}, {cpu_count()} cores, {mem_gib():.0f} GiB",
        "python": sys.version.split()[0],
        "bnfold": f"commit {git_commit()}",
        "load average at start": " ".join(f"{v:.2f}" for v in os.getloadavg()),
    }


def _f(v, fmt: str = ".1f") -> str:
    return "-" if v is None else format(v, fmt)


def markdown(results: dict) -> str:
    env = results["environment"]
    lines = [
        "# Published CNN families through bnfold import and verify",
        "",
        f"`{env['command']}` on {env['machine']}; {env['date']}; {env['bnfold']}; load average "
        f"(1, 5, 15 min) {env['load average at start']} at start, {env['load average at end']} at "
        "end, this run's own processes included: a load well above the core count means other "
        "jobs ran beside it, and then the times are longer than a quiet machine's.",
        "",
        "Each family: random weights, BatchNorm statistics estimated on random data then "
        "shifted/scaled (a tenth of the gammas negative), exported by its framework "
        "(bench/families.py), then imported with the default 64 generated inputs at "
        f"{results['size']}x{results['size']} and verified, each in its own process. "
        "Import stages: load (+ onnxruntime check), fold, float64 reference, measure "
        "(onnxruntime folded vs unfolded, per-layer probes), write. `ort f32`: onnxruntime "
        "running the unfolded graph on the same inputs (the reference's yardstick). "
        "BN rows: folded/refused (refused = BatchNormalization or Mul/Add left in folded.onnx). "
        "Diffs: max |folded - unfolded| (relative to the logit scale) and max |folded - float64|.",
        "",
        "| family | framework (exporter) | BN in file | rows folded / refused | import s "
        "(load / fold / ref / measure / write) | ort f32 s | verify s | peak RSS MiB import / "
        "verify | folded vs unfolded (rel) | folded vs float64 | verified |",
        "|---|---|---:|---:|---|---:|---:|---|---|---|---|",
    ]
    for row in results["rows"]:
        imp, ver = row.get("import", {}), row.get("verify", {})
        label = row.get("display", row["family"])
        fw = f"{row['framework']} ({row.get('exporter', '-')})"
        if "import_s" not in imp:
            err = (row.get("error") or imp.get("error", "?")).replace("\n", " ").replace("|", "/")
            where = ", ".join(imp.get("where", []))
            lines.append(f"| {label} | {fw} | - | - | **failed**: {err[:400]} ({where}) "
                         "| - | - | - | - | - | - |")  # fmt: skip
            continue
        st = imp["stages_s"]
        stages = " / ".join(
            _f(st.get(k)) for k in ("load", "fold", "reference", "measure", "write")
        )
        fu = imp["folded_vs_unfolded"]
        f64 = imp["folded_vs_float64"]
        f64s = f"{f64['max_abs_diff']:.2e}" if f64 else (imp.get("reference_note") or "-")
        lines.append(
            f"| {label} | {fw} | {imp['bn_in_source']} | {imp['folded']} / {imp['refused']} | "
            f"**{imp['import_s']:.1f}** ({stages}) | {_f(imp.get('ort_float32_s'), '.2f')} | "
            f"**{_f(ver.get('verify_s'))}** | {imp['peak_rss_mib']:.0f} / "
            f"{_f(ver.get('peak_rss_mib'), '.0f')} | {fu['max_abs_diff']:.2e} "
            f"({fu['max_rel_diff']:.1e}) | {f64s} | "
            f"{'yes' if ver.get('ok') else 'NO: ' + str(ver.get('error', ''))[:200]} |"
        )
    lines += ["", "Refused rows, with the reason bnfold gives:", ""]
    for row in results["rows"]:
        reasons = row.get("import", {}).get("refused_reasons") or []
        if reasons:  # node names left out: one line per kind of reason
            kinds = sorted({re.sub(r"'[^']*'", "'…'", r.replace("\n", " ")) for r in reasons})
            label = row.get("display", row["family"])
            lines.append(f"- {label}: " + "; ".join(kinds))
    lines += ["", "## Goals", "", "| goal | family | measured | |", "|---|---|---|---|"]
    for g in results["goals"]:
        m = g["measured"]
        shown = f"{m:.1f}" if isinstance(m, float) else str(m).replace("\n", " ")[:200]
        lines.append(
            f"| {g['goal']} | {g['family']} | {shown} | {'PASS' if g['passed'] else 'FAIL'} |"
        )
    exports = ", ".join(f"{r.get('display', r['family'])} {r['export_s']:.0f} s"
                        for r in results["rows"])  # fmt: skip
    lines += ["", f"Export times (the frameworks', not bnfold's): {exports}.", ""]
    return "\n".join(lines)


def run(frameworks: tuple[str, ...], names: list[str] | None, size: int, out: Path,
        argv: list[str], keep_work: bool = False) -> dict:  # fmt: skip
    from bench.families import KERAS_FAMILIES, TORCH_FAMILIES

    results: dict = {"environment": environment(argv), "size": size, "rows": []}
    work = Path(tempfile.mkdtemp(prefix="bnfold-families-"))
    try:
        for framework, table in (("torch", TORCH_FAMILIES), ("keras", KERAS_FAMILIES)):
            if framework not in frameworks:
                continue
            for name, display in table.items():
                if names and name not in names:
                    continue
                log(f"{framework} {display}: export, import, verify ...")
                row = run_family(framework, name, size, work)
                row["display"] = display
                results["rows"].append(row)
                imp, ver = row.get("import", {}), row.get("verify", {})
                log(
                    f"  export {row['export_s']:.0f} s; import {_f(imp.get('import_s'))} s; "
                    f"verify {_f(ver.get('verify_s'))} s; "
                    + (f"ERROR {row.get('error') or imp.get('error') or ver.get('error')}"
                       if "import_s" not in imp or "verify_s" not in ver else "ok")
                )  # fmt: skip
                write(results, out)  # a partial table survives an interrupted run
    finally:
        if keep_work:
            log(f"work folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    write(results, out)
    return results


def write(results: dict, out: Path) -> list[Path]:
    results["environment"]["load average at end"] = " ".join(f"{v:.2f}" for v in os.getloadavg())
    results["goals"] = goals(results["rows"])
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "families.json", out / "families.md"]
    paths[0].write_text(json.dumps(results, indent=2, default=str) + "\n")
    paths[1].write_text(markdown(results))
    return paths


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        return child_main(argv[1:])
    p = argparse.ArgumentParser(prog="python -m bench.families_run",
                                description=__doc__.splitlines()[0])  # fmt: skip
    p.add_argument("--only", choices=("torch", "keras"), help="one framework's families")
    p.add_argument("--families", help="comma-separated subset (bench/families.py names)")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    p.add_argument("--keep-work", action="store_true")
    args = p.parse_args(argv)
    frameworks = (args.only,) if args.only else ("torch", "keras")
    names = [n for n in (args.families or "").split(",") if n] or None
    results = run(frameworks, names, args.size, args.out, argv, args.keep_work)
    for g in results["goals"]:
        if not g["passed"]:
            log(f"goal FAIL: {g['goal']} [{g['family']}]: {g['measured']}")
    log(f"wrote {args.out / 'families.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
