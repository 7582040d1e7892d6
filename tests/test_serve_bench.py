"""benchmarks/bench_serve.py still runs end to end (a small smoke run; nothing is timed or compared
here: docs/performance.md records real runs)."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_serve  # noqa: E402


def test_serve_benchmark_smoke_run():
    r = bench_serve.bench("cpu", hidden=64, layers=1, heads=4, clients=(1, 2), per_client=1, new_tokens=4, batch=2,
                          peer=False)
    assert [(row["server"], row["clients"]) for row in r["rows"]] == [
        ("batched", 1), ("batched", 2), ("one-at-a-time", 1), ("one-at-a-time", 2)]
    for row in r["rows"]:
        assert row["tokens"] == 4 * row["clients"] and row["tokens_per_s"] > 0 and row["ttft_p50"] > 0
