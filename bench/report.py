"""results.json, results.md (Markdown tables), the plots, and the docs page that shows them."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from bench.plots import plot_model_exec, plot_serving
from bench.provenance import finite

PEER_COLUMNS = (
    ("bare", "x bare"),
    ("minimal", "x minimal"),
    ("minimal_workers", "x minimal, same workers"),
    ("litserve", "x LitServe"),
    ("limit", "x in-process"),
)
DOCS_HEADER = """# Performance

How fast bnfold serves, measured against its own limits and against the servers a user might
pick instead. Every figure comes from one run of `make bench` on one machine; bnfold's figures
are also given as ratios to neighbours measured in the same run (A B A B, median over rounds),
because these machines are shared and noisy and absolute numbers drift from run to run.
Rerun it with `make bench` (about 50 minutes on 2 cores, the model families and the peer
servers included; `python -m bench.run --quick` takes minutes).
"""


def write(results: dict, out: Path, docs: Path | None = None) -> list[Path]:
    """Write every artefact; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "results.json", out / "results.md"]
    paths[0].write_text(json.dumps(finite(results), indent=2, default=str) + "\n")
    plots = plot_serving(results, out / "serving.png")
    plots += plot_model_exec(results, out / "model_exec.png")
    results_md = "# bnfold benchmark results\n\n" + markdown(results, [p.name for p in plots])
    paths[1].write_text(results_md)
    if docs is not None:
        rel = [_relative(p, docs.parent) for p in plots]
        docs.parent.mkdir(parents=True, exist_ok=True)
        docs.write_text(DOCS_HEADER + "\n" + markdown(results, rel))
        paths.append(docs)
    return paths + plots


def main(argv: list[str] | None = None) -> int:
    """Re-render results.md, the plots (and a docs page) from a results.json."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m bench.report", description=main.__doc__)
    parser.add_argument("results", type=Path, help="a results.json written by bench.run")
    parser.add_argument("--docs", type=Path, help="also write this docs page")
    args = parser.parse_args(argv)
    results = json.loads(args.results.read_text())
    if "ratios" not in results["model_exec"]:  # written before exec ratios existed
        from bench.model_exec import exec_ratios

        results["model_exec"]["ratios"] = exec_ratios(
            results["model_exec"]["rows"], results["model_exec"]["limits"]
        )
    from bench import goals  # a pure function of the run's figures: re-checked as defined now

    results["goals"] = goals.check(results["serving"]["rows"], results["preprocess_ms"])
    for path in write(results, args.results.parent, args.docs):
        print(f"wrote {path}")
    return 0


def _relative(path: Path, start: Path) -> str:
    return os.path.relpath(path.resolve(), start.resolve())


# ---------------------------------------------------------------- Markdown


def markdown(results: dict, plots: list[str]) -> str:
    images = "\n".join(f"![{Path(p).stem}]({p})" for p in plots)
    parts = [
        _machine(results),
        _goals(results),
        _serving(results),
        _workers(results),
        _peers(results),
        _fold_cost(results),
        _model_exec(results),
        _int8(results),
        _engines(results),
        f"## Plots\n\n{images}\n",
    ]
    return "\n".join(p for p in parts if p)


def _engines(results: dict) -> str:
    engines = results.get("engines")
    if not engines:
        return ""
    if "error" in engines:
        return f"## Engines and precisions (in process)\n\nNot measured: {engines['error']}\n"
    from bench.engines import markdown as engines_markdown

    return engines_markdown(engines)


def _workers(results: dict) -> str:
    if not results.get("workers"):
        return ""
    from bench.workers import markdown as workers_markdown

    return (
        "## Worker processes (BNFOLD_WORKERS)\n\nDigits, multipart predict, 64 connections; "
        "memory summed over every process of the server; medians over rounds.\n\n"
        + workers_markdown(results["workers"])
        + "\n"
    )


def _peers(results: dict) -> str:
    """Triton, KServe, MLServer beside bnfold (bench/peers_run.py; details in peers.md)."""
    peers = results.get("peers")
    if not peers:
        return ""
    head = "## Beside Triton, KServe and MLServer (V2 REST JSON and binary, gRPC)\n\n"
    if "error" in peers:
        return head + f"Not measured: {peers['error']}\n"
    from bench.peers_run import ratio_table

    return (
        head + f"{peers['settings']['rounds']} round(s) x {peers['settings']['seconds']} s per "
        "point; load average "
        + peers["load_average"]
        + "; every figure in peers.md.\n\n"
        + ratio_table(peers)
    )


def _int8(results: dict) -> str:
    from bench.int8 import markdown as int8_markdown

    return "\n".join(int8_markdown(results["int8"])) if results.get("int8") else ""


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _machine(results: dict) -> str:
    env, plan = results["environment"], results["plan"]
    rows = [[k, v] for k, v in env.items()]
    rows.append(
        [
            "plan",
            f"{plan['name']}: {plan['rounds']} round(s) x {plan['wrk_seconds']} s "
            f"per target and concurrency, wrk -t1",
        ]
    )
    rows.append(["elapsed", f"{results['elapsed_s']:.0f} s"])
    return "## Run\n\n" + table(["", ""], rows)


def _goals(results: dict) -> str:
    goals = results["goals"]
    if not goals:
        return "## Goals\n\nNot measured by this plan (it serves no model at concurrency 64).\n"
    rows = [
        [
            ("**" if g["primary"] else "") + g["goal"] + ("**" if g["primary"] else ""),
            g["model"],
            g["target"],
            g["measured"],
            g["required"],
            "PASS" if g["passed"] else "FAIL",
            g["errors"],
            g["detail"],
        ]
        for g in goals
    ]
    note = (
        "Bold: judged on the multipart request, the same bytes the minimal handler and "
        "LitServe receive; raw body and V2 follow for information. A goal passes only with "
        "zero errors; requests/s count 2xx answers only. Serial estimate: per request, the "
        "bare HTTP stack's time + decoding and preprocessing one image + one image at the "
        "in-process limit, the most a server that overlaps none of them can do.\n\n"
    )
    header = ["goal", "model", "bnfold target", "measured", "required", "result", "errors", "note"]
    return "## Goals\n\n" + note + table(header, rows)


def _fmt(x: float | None, spec: str = ".2f") -> str:
    return "" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def _serving(results: dict) -> str:
    summary, ratios = results["serving"]["summary"], results["serving"]["ratios"]
    if not summary:
        return ""
    by = {(r["model"], r["target"], r["concurrency"], r["peer_role"]): r for r in ratios}
    out = [
        "## Serving over HTTP\n",
        "Requests/s and latency: median over rounds; `x peer`: bnfold's requests/s divided by "
        "the peer's in the same round (median over rounds). In-process ORT: images/s at its "
        "best batch, latency per batch.\n",
    ]
    for model in dict.fromkeys(r["model"] for r in summary):
        rows = []
        for r in (r for r in summary if r["model"] == model):
            cells = [
                _fmt(by.get((model, r["target"], r["concurrency"], role), {}).get("rps_ratio"))
                for role, _ in PEER_COLUMNS
            ]
            rows.append(
                [
                    r["target"],
                    r["concurrency"],
                    f"{r['rps']:,.0f}",
                    _fmt(r["p50_ms"]),
                    _fmt(r["p99_ms"]),
                    r["errors"],
                    *cells,
                ]
            )
        rows.sort(key=lambda row: row[1])
        header = ["target", "conc.", "req/s", "p50 ms", "p99 ms", "errors"]
        out.append(f"### {model}\n\n" + table(header + [c for _, c in PEER_COLUMNS], rows))
    return "\n".join(out)


def _fold_cost(results: dict) -> str:
    rows = []
    for name, m in results["models"].items():
        c, eq = m["fold_cost"], m["fold_cost"]["equivalence"]
        fvu = eq["folded_vs_unfolded"]
        rows.append(
            [
                name,
                c["bn_layers"],
                f"{c['folded']}/{c['refused']}",
                f"{c['fold_s']:.2f}",
                f"{c['export_s']:.1f}",
                f"{c['onnx_mb']['folded']:.1f}",
                f"{fvu['max_abs_diff']:.2e}",
                f"{fvu['max_rel_diff']:.2e}",
                f"{fvu['top1_agreement']:.0%}",
                "yes" if eq["passed"] else "NO",
            ]
        )
    header = [
        "model",
        "BN layers",
        "folded/refused",
        "fold s",
        "fold+export+check s",
        "ONNX MB",
        "max abs diff",
        "max rel diff",
        "top-1 agree",
        "equivalent",
    ]
    weights = "; ".join(f"{n}: {m['weights']}" for n, m in results["models"].items())
    return (
        "## Fold cost and equivalence\n\n`fold s`: fold_batchnorm alone (median of 3); the next "
        "column adds ONNX export of both variants and the equivalence measurement (folded vs "
        f"unfolded logits in onnxruntime). Weights: {weights}.\n\n" + table(header, rows)
    )


def _model_exec(results: dict) -> str:
    rows_all = results["model_exec"]["rows"]
    out = [
        "## Model execution in process\n",
        "Images/s at batch 1 and at the best batch size per configuration (threads = "
        "intra-op threads). Every point is in results.json with p50/p90/p99 latency.\n",
    ]
    for model in dict.fromkeys(r["model"] for r in rows_all):
        configs: dict[tuple, list[dict]] = {}
        for r in rows_all:
            if r["model"] == model:
                configs.setdefault(
                    (r["engine"], r["variant"], r["level"], r["threads"]), []
                ).append(r)
        rows = [_exec_row(cfg, pts) for cfg, pts in configs.items()]
        limit = results["model_exec"]["limits"][model]
        out.append(
            f"### {model}\n\nLimit (fastest folded onnxruntime point): "
            f"{limit['images_per_s']:,.0f} img/s ({limit['level']}, {limit['threads']} "
            f"threads, batch {limit['batch']}).\n\n"
        )
        out.append(_exec_ratio_table(results["model_exec"].get("ratios", []), model))
        header = [
            "engine",
            "variant",
            "level",
            "threads",
            "b=1 img/s",
            "b=1 p50 ms",
            "best img/s",
            "at batch",
            "skipped",
        ]
        out.append(table(header, rows))
    return "\n".join(out)


def _exec_ratio_table(ratios: list[dict], model: str) -> str:
    """Ratios of images/s, one row per comparison, one column per (threads, batch)."""
    mine = [r for r in ratios if r["model"] == model]
    columns = list(dict.fromkeys((r["threads"], r["batch"]) for r in mine))
    if not columns:
        return ""
    values = {(r["ratio"], r["threads"], r["batch"]): r["value"] for r in mine}
    rows = [
        [label] + [_fmt(values.get((label, *col))) for col in columns]
        for label in dict.fromkeys(r["ratio"] for r in mine)
    ]
    header = ["images/s ratio"] + [f"{t} thr, batch {b}" for t, b in columns]
    return table(header, rows) + "\n"


def _exec_row(cfg: tuple, points: list[dict]) -> list:
    done = [p for p in points if "images_per_s" in p]
    first = next((p for p in done if p["batch"] == 1), None)
    best = max(done, key=lambda p: p["images_per_s"]) if done else None
    skipped = ",".join(str(p["batch"]) for p in points if "skipped" in p)
    return [
        *cfg,
        _fmt(first and first["images_per_s"], ",.0f"),
        _fmt(first and first["p50_ms"]),
        _fmt(best and best["images_per_s"], ",.0f"),
        best["batch"] if best else "",
        skipped or "-",
    ]


if __name__ == "__main__":
    raise SystemExit(main())
