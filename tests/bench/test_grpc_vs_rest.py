"""bench/grpc_vs_rest.py: one short real run (every target answers, no errors, finite figures)
and the table it writes. Form only, never speed."""

from __future__ import annotations

import math
import shutil

import pytest

from bench import grpc_vs_rest

pytestmark = pytest.mark.e2e


def test_one_short_round_measures_every_target_and_writes_the_table():
    if shutil.which("wrk") is None:
        pytest.fail("wrk is missing: bash scripts/install_bench_deps.sh")
    result = grpc_vs_rest.measure(1.0, 1, log=lambda m: None, concurrency=(1, 4))
    for target in grpc_vs_rest.TARGETS:
        for c in (1, 4):
            row = result["table"][target][c]
            assert row["errors"] == 0, (target, c)
            assert row["rps"] > 0 and math.isfinite(row["p50_ms"]), (target, c)
    assert math.isfinite(result["table"]["grpc"][4]["x_rest-binary"])
    table = grpc_vs_rest.markdown(result).splitlines()
    assert table[0] == "| digits, one image per request: requests/s (p50 ms) | c=1 | c=4 |"
    assert len(table) == 2 + len(grpc_vs_rest.TARGETS) + 1
    assert table[-1].startswith("| gRPC / REST binary (same client family) | ")
