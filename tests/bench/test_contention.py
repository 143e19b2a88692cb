"""bench/contention.py's report: every row's figures, with the command and machine at the top."""

from __future__ import annotations

from bench.contention import markdown


def test_the_report_lists_each_server_quiet_and_contended_with_its_cpu():
    rows = [
        {"server": "bnfold", "hogs": 0, "rps": 2863.4, "p99_ms": 36.7, "cores": 1.86,
         "calls_per_cpu_s": 1539.2, "errors": 0},
        {"server": "minimal-workers", "hogs": 2, "rps": 1848.0, "p99_ms": 174.7, "cores": 1.38,
         "calls_per_cpu_s": 1344.0, "errors": 0},
    ]  # fmt: skip
    env = {"command": "python -m bench.contention", "machine": "a CPU, 2 cores"}
    text = markdown({"environment": env, "rows": rows})
    assert "- command: python -m bench.contention" in text
    assert "| 0 | bnfold | 2,863 | 36.7 | 1.86 | 1,539 | 0 |" in text
    assert "| 2 | minimal-workers | 1,848 | 174.7 | 1.38 | 1,344 | 0 |" in text
