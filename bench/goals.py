"""The serving goals, checked on the serving figures of this run (pass/fail with the
numbers).

Goals are judged on "bnfold multipart", the request whose bytes on the wire equal the minimal
handler's and LitServe's; the raw-body and V2 figures are checked the same way for information.
A goal passes only when its bnfold target answered no errors. Where a goal fails, the serial
estimate says what this machine allows at best: one request costs at least the bare HTTP
stack's time, plus decoding and preprocessing one image, plus one image of compute at the
in-process limit (`1 / (1/bare + preprocess + 1/limit)` requests/s), unless those overlap.
"""

from __future__ import annotations

import statistics

PRIMARY = "bnfold multipart"
HEAVY_CONNECTIONS = 64
P99_FACTOR = 1.3
RAW = "bnfold raw"
MULTIPART_SHARE = 0.9  # multipart at most 10% behind the raw body


def check(rows: list[dict], preprocess_ms: dict[str, float]) -> list[dict]:
    """One row per (goal, model, bnfold target) that this run measured."""
    targets = list(dict.fromkeys(r["target"] for r in rows if r["role"] == "bnfold"))
    out = []
    for target in targets:
        out += _heavy_limit(rows, target, preprocess_ms)
        out += _digits_throughput(rows, target, preprocess_ms)
        out += _lone_request(rows, target)
    out += _multipart_vs_raw(rows)
    return out


def _series(rows: list[dict], model: str, role_or_target: str, conc: int) -> dict[int, dict]:
    """Rows of one target (by name or peer role) at one concurrency, by round."""
    return {
        r["round"]: r
        for r in rows
        if r["model"] == model
        and r["concurrency"] == conc
        and role_or_target in (r["target"], r["role"])
    }


def _paired(mine: dict[int, dict], peer: dict[int, dict], f) -> float | None:
    values = [f(mine[k], peer[k]) for k in mine if k in peer]
    return statistics.median(values) if values else None


def _row(goal, model, target, measured, required, passed, errors, detail) -> dict:
    return {
        "goal": goal,
        "model": model,
        "target": target,
        "primary": target == PRIMARY,
        "measured": measured,
        "required": required,
        "passed": bool(passed and errors == 0),
        "errors": errors,
        "detail": detail,
    }


def serial_estimate_rps(bare_rps: float, preprocess_ms: float, limit_rps: float) -> float:
    return 1.0 / (1.0 / bare_rps + preprocess_ms / 1e3 + 1.0 / limit_rps)


def _heavy_limit(rows, target, preprocess_ms) -> list[dict]:
    mine = _series(rows, "heavy", target, HEAVY_CONNECTIONS)
    limit = _series(rows, "heavy", "limit", HEAVY_CONNECTIONS)
    if not mine or not limit:
        return []
    errors = sum(r["errors"] for r in mine.values())
    share = _paired(mine, limit, lambda a, b: a["rps"] / b["rps"])
    # time the limit needs to clear 64 requests, x1.3, per round
    p99_over = _paired(
        mine, limit, lambda a, b: a["p99_ms"] / (P99_FACTOR * HEAVY_CONNECTIONS / b["rps"] * 1e3)
    )
    limit_rps = statistics.median(r["rps"] for r in limit.values())
    bound = _bound_note(rows, "heavy", preprocess_ms, limit_rps)
    clear_ms = HEAVY_CONNECTIONS / limit_rps * 1e3
    p99 = statistics.median(r["p99_ms"] for r in mine.values())
    return [
        _row(
            "heavy c64 throughput >= 90% of in-process limit",
            "heavy",
            target,
            f"{share:.0%} ({statistics.median(r['rps'] for r in mine.values()):,.0f} vs "
            f"{limit_rps:,.0f} img/s)",
            ">= 90%",
            share >= 0.9,
            errors,
            bound,
        ),
        _row(
            "heavy c64 p99 <= 1.3x time the limit clears 64",
            "heavy",
            target,
            f"p99 {p99:.0f} ms = {p99_over:.2f}x the bound",
            f"<= {P99_FACTOR * clear_ms:.0f} ms",
            p99_over <= 1.0,
            errors,
            f"the limit clears 64 images in {clear_ms:.0f} ms",
        ),
    ]


def _bound_note(rows, model, preprocess_ms, limit_rps, relative_to: str = "limit") -> str:
    """The serial estimate, as a share of the limit or of the bare ceiling."""
    bare = _series(rows, model, "bare", HEAVY_CONNECTIONS)
    if not bare or model not in preprocess_ms:
        return ""
    bare_rps = statistics.median(r["rps"] for r in bare.values())
    est = serial_estimate_rps(bare_rps, preprocess_ms[model], limit_rps)
    share = est / (limit_rps if relative_to == "limit" else bare_rps)
    return (
        f"serial estimate {est:,.0f} req/s = {share:.0%} of the {relative_to} "
        f"(bare {bare_rps:,.0f} req/s, preprocess {preprocess_ms[model]:.2f} ms/image, "
        f"limit {limit_rps:,.0f} img/s)"
    )


def _digits_throughput(rows, target, preprocess_ms) -> list[dict]:
    mine = _series(rows, "digits", target, HEAVY_CONNECTIONS)
    out = []
    for role, need in (("minimal", 1.5), ("bare", 0.6), ("minimal_workers", 1.0)):
        peer = _series(rows, "digits", role, HEAVY_CONNECTIONS)
        if not mine or not peer:
            continue
        ratio = _paired(mine, peer, lambda a, b: a["rps"] / b["rps"])
        limit = _series(rows, "digits", "limit", HEAVY_CONNECTIONS)
        note = ""
        if role == "bare" and limit:
            limit_rps = statistics.median(r["rps"] for r in limit.values())
            note = _bound_note(rows, "digits", preprocess_ms, limit_rps, "bare ceiling")
        what = {
            "minimal": "minimal handler",
            "bare": "bare HTTP ceiling",
            "minimal_workers": "minimal handler with bnfold's number of uvicorn workers",
        }[role]
        out.append(
            _row(
                f"digits c64 throughput >= {need:g}x {what}",
                "digits",
                target,
                f"{ratio:.2f}x",
                f">= {need:g}x",
                ratio >= need,
                sum(r["errors"] for r in mine.values()),
                note or f"{statistics.median(r['rps'] for r in mine.values()):,.0f} req/s",
            )
        )
    return out


def _lone_request(rows, target) -> list[dict]:
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = _series(rows, model, target, 1)
        peer = _series(rows, model, "minimal", 1)
        if not mine or not peer:
            continue
        diff = _paired(mine, peer, lambda a, b: a["p50_ms"] - b["p50_ms"])
        p50 = statistics.median(r["p50_ms"] for r in mine.values())
        ref = statistics.median(r["p50_ms"] for r in peer.values())
        out.append(
            _row(
                "c1 median latency within 0.3 ms of minimal handler",
                model,
                target,
                f"{diff:+.2f} ms ({p50:.2f} vs {ref:.2f} ms)",
                "<= +0.30 ms",
                diff <= 0.3,
                sum(r["errors"] for r in mine.values()),
                "",
            )
        )
    return out


def _multipart_vs_raw(rows) -> list[dict]:
    """Parsing the multipart form must cost little next to the rest of a predict: multipart
    requests/s at least 90% of raw-body requests/s, same model and concurrency, same round."""
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        for conc in (16, HEAVY_CONNECTIONS):
            mine = _series(rows, model, PRIMARY, conc)
            raw = _series(rows, model, RAW, conc)
            if not mine or not raw:
                continue
            ratio = _paired(mine, raw, lambda a, b: a["rps"] / b["rps"])
            out.append(
                _row(
                    f"c{conc} multipart at most 10% behind raw body",
                    model,
                    PRIMARY,
                    f"{ratio:.2f}x raw",
                    f">= {MULTIPART_SHARE:g}x",
                    ratio >= MULTIPART_SHARE,
                    sum(r["errors"] for r in (*mine.values(), *raw.values())),
                    f"{statistics.median(r['rps'] for r in raw.values()):,.0f} raw req/s",
                )
            )
    return out
