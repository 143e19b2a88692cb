"""The benchmark harness: `python -m bench.run --quick` once, and its results checked for form.

These tests assert that the harness works (every target answered, every figure is a finite
number in the right place, the report and plots exist), never how fast anything is. wrk and
litserve are required: when missing, the tests fail with the command that installs them.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from bench import run as bench_run
from bench.model_exec import ORT_LEVELS
from bench.plan import QUICK
from bench.serving import MINIMAL_WORKERS, PEERS, bnfold_workers, ratios
from bench.wrk_load import parse_wrk

REPO = Path(__file__).resolve().parents[2]
QUICK_TIMEOUT_S = 240  # the quick run takes ~45 s on 2 busy cores; this only catches a hang
HTTP_TARGETS = {
    "bnfold multipart",
    "bnfold raw",
    "bnfold V2 infer",
    "bnfold V2 infer int8",  # the int8 variant (bench/int8.py gives every served bundle one)
    "bare FastAPI",
    "minimal handler",
    "LitServe",
}
# With more than one usable core bnfold runs several workers, and so does a minimal handler.
SAME_WORKERS = bnfold_workers(QUICK) > 1
if SAME_WORKERS:
    HTTP_TARGETS.add(MINIMAL_WORKERS)
PEERS_HERE = tuple(p for p in PEERS if SAME_WORKERS or p != "minimal_workers")


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> tuple[dict, Path]:
    missing = bench_run.missing_tools()
    if missing:
        pytest.fail(f"benchmark tools missing: {'; '.join(missing)}. {bench_run.INSTALL_HINT}")
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run(
        [sys.executable, "-m", "bench.run", "--quick", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=QUICK_TIMEOUT_S,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "results.json").read_text()), out


@pytest.mark.e2e
def test_writes_json_markdown_and_plots(quick):
    results, out = quick
    assert results["plan"]["name"] == "quick"
    for name in ("serving.png", "model_exec.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    md = (out / "results.md").read_text()
    for heading in ("## Goals", "## Serving over HTTP", "## Fold cost", "## Model execution"):
        assert heading in md
    assert all(target in md for target in HTTP_TARGETS)


@pytest.mark.e2e
def test_model_exec_covers_every_configuration(quick):
    results, _ = quick
    plan, rows = results["plan"], results["model_exec"]["rows"]
    configs = {(r["model"], r["engine"], r["variant"], r["level"], r["threads"]) for r in rows}
    n_ort = 2 * len(ORT_LEVELS) * len(plan["threads"])  # variant x level x threads
    n_torch = 2 * len(plan["threads"])  # unfolded module and folded GraphModule
    assert len(configs) == len(plan["models"]) * (n_ort + n_torch)
    assert {r["level"] for r in rows} == {*ORT_LEVELS, "eager"}
    for r in rows:
        if "skipped" in r:
            continue
        assert r["images_per_s"] > 0 and r["runs"] >= 2
        assert 0 < r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"]
    for model, limit in results["model_exec"]["limits"].items():
        folded = [
            r
            for r in rows
            if r["model"] == model
            and r["variant"] == "folded"
            and r["engine"] == "onnxruntime"
            and "images_per_s" in r
        ]
        assert limit["images_per_s"] == max(r["images_per_s"] for r in folded)


@pytest.mark.e2e
def test_every_http_target_answered_without_errors(quick):
    results, _ = quick
    summary = results["serving"]["summary"]
    seen = {(r["target"], r["concurrency"]) for r in summary}
    expected = {
        (t, c) for t in HTTP_TARGETS | {"in-process ORT"} for c in results["plan"]["concurrency"]
    }
    assert seen == expected
    for r in summary:
        # An error here means a body the server refused: a harness bug, not slowness.
        assert r["errors"] == 0, r
        assert r["requests"] > 0 and r["rps"] > 0 and 0 < r["p50_ms"] <= r["p99_ms"], r


@pytest.mark.e2e
def test_ratios_and_goals_are_numbers(quick):
    results, _ = quick
    got = results["serving"]["ratios"]
    bnfold = [t for t in HTTP_TARGETS if t.startswith("bnfold")]
    conc = results["plan"]["concurrency"]
    assert {(r["target"], r["concurrency"], r["peer_role"]) for r in got} == {
        (t, c, p) for t in bnfold for c in conc for p in PEERS_HERE
    }
    assert all(math.isfinite(r["rps_ratio"]) and r["rps_ratio"] > 0 for r in got)
    lone = [g for g in results["goals"] if g["goal"].startswith("c1 median latency")]
    assert {g["target"] for g in lone} == set(bnfold)
    assert all(isinstance(g["passed"], bool) for g in lone)
    behind = [g for g in results["goals"] if g["goal"].endswith("behind raw body")]
    served = {r["model"] for r in results["serving"]["rows"]}
    assert {(g["model"], g["goal"][:4]) for g in behind} == {(m, "c16 ") for m in served}
    assert all(g["measured"].endswith("x raw") and isinstance(g["passed"], bool) for g in behind)


@pytest.mark.e2e
def test_fold_cost_and_equivalence_for_both_models(quick):
    results, _ = quick
    assert set(results["models"]) == {"digits", "heavy"}
    for name, model in results["models"].items():
        cost = model["fold_cost"]
        assert cost["folded"] == cost["bn_layers"] > 0, name
        assert 0 < cost["fold_s"] < cost["export_s"], name
        assert cost["equivalence"]["passed"], name
        assert cost["equivalence"]["folded_vs_unfolded"]["top1_agreement"] == 1.0, name


WRK_OUT = (
    "Running 1s test @ http://127.0.0.1:1/predict\n"
    'BENCH_JSON {"requests": 200, "duration_us": 2000000, "bytes": 1, "non2xx": 3, '
    '"last_bad_status": 503, "connect_errors": 1, "read_errors": 0, "write_errors": 0, '
    '"timeouts": 2, "latency_us": {"min": 100, "mean": 900.0, "max": 9000, "p50": 800, '
    '"p90": 1500, "p99": 4000}}\n'
)


def test_parse_wrk_counts_statuses_socket_errors_and_timeouts():
    row = parse_wrk(WRK_OUT)
    assert row["rps"] == (200 - 3) / 2.0  # only 2xx answers count as served
    assert (row["p50_ms"], row["p99_ms"]) == (0.8, 4.0)
    assert row["errors"] == 3 + 1 + 2
    assert row["last_bad_status"] == 503


def test_parse_wrk_failure_raises_with_stderr():
    with pytest.raises(RuntimeError, match="unable to connect"):
        parse_wrk("", "unable to connect to 127.0.0.1:1", 1)


def _row(target, role, rnd, rps, p50=1.0):
    return {
        "model": "m",
        "target": target,
        "role": role,
        "concurrency": 1,
        "round": rnd,
        "rps": rps,
        "p50_ms": p50,
        "p99_ms": 2 * p50,
    }


def test_ratios_pair_rounds_then_take_the_median():
    # Round by round 2.0, 3.0, 10.0 (the peer slowed down in round 2): median 3.0. A ratio of
    # medians would give 200 / 100 = 2.0 and mix rounds.
    rows = [
        _row("bnfold raw", "bnfold", 0, 200),
        _row("minimal handler", "minimal", 0, 100),
        _row("bnfold raw", "bnfold", 1, 300),
        _row("minimal handler", "minimal", 1, 100),
        _row("bnfold raw", "bnfold", 2, 100),
        _row("minimal handler", "minimal", 2, 10),
    ]
    (only,) = ratios(rows)
    assert (only["target"], only["peer"]) == ("bnfold raw", "minimal handler")
    assert only["rps_ratio"] == 3.0


def test_missing_tools_fail_with_the_install_command(monkeypatch, capsys):
    monkeypatch.setattr(bench_run.shutil, "which", lambda name: None)
    assert bench_run.main(["--quick"]) == 2
    err = capsys.readouterr().err
    assert "wrk" in err and "scripts/install_bench_deps.sh" in err


@pytest.mark.e2e
def test_int8_section_covers_every_model(quick):
    """Folded-first vs BN-left-in quantization, int8 speed in process and served: all there."""
    results, out = quick
    int8 = results["int8"]
    assert int8["cpu"]["meaning"] and isinstance(int8["cpu"]["flags"], list)
    assert set(int8["fold_first"]) == set(results["plan"]["models"])
    for cmp in int8["fold_first"].values():
        for variant in ("folded", "unfolded"):
            d = cmp[variant]["report"]["int8_vs_folded"]
            assert math.isfinite(d["max_abs_diff"]) and 0 <= d["top1_agreement"] <= 1
        assert cmp["folded"]["nodes"]["float_ops"] == {}  # folded first: all 8-bit at run time
        assert cmp["unfolded"]["nodes"]["float_ops"]["BatchNormalization"] > 0
    kinds = {(r["model"], r["variant"], r["threads"]) for r in int8["speed"]}
    variants = ("float32 folded", "int8 (folded first)", "int8 (BN left in)")
    assert len(kinds) == len(results["plan"]["models"]) * len(variants) * len(
        results["plan"]["threads"]
    )
    assert all(r["images_per_s"] > 0 for r in int8["speed"])
    assert int8["served"] and all(r["int8_rps"] > 0 for r in int8["served"])
    assert "## INT8 after folding" in (out / "results.md").read_text()


@pytest.mark.e2e
def test_workers_section_has_every_worker_count(quick):
    from bench.workers import counts

    results, out = quick
    summary = results["workers"]["summary"]
    assert [s["workers"] for s in summary] == counts()
    for s in summary:
        assert s["errors"] == 0 and s["rps"] > 0, s
        assert 0 < s["idle_rss_mib"] <= s["flood_rss_mib"], s  # flood: the peak, idle included
    assert "## Worker processes (BNFOLD_WORKERS)" in (out / "results.md").read_text()
